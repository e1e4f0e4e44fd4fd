//! The one layer every EC2 and EBS request goes through: an SDK interceptor on both clients
//! of the backend that counts each request (every attempt and every page: what EC2's
//! request-rate buckets count) by operation and outcome, and times it, into the server's
//! `slipway_aws_requests_total{op,outcome}` and `slipway_aws_request_duration_seconds{op}`.
//!
//! An interceptor rather than a wrapper around each call site: a call added later cannot
//! forget to be counted, and retries the SDK makes on its own are seen one by one.

use std::time::Instant;

use crate::metrics::AwsApiMetrics;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};

/// Error codes AWS answers a throttled request with (EC2 query API, EBS and other JSON APIs).
const THROTTLE_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "SlowDown",
];

/// The `outcome` label of a request answered with `status` and `body` (`None`: no answer).
pub fn outcome(status: Option<u16>, body: &[u8]) -> &'static str {
    let Some(status) = status else {
        return "transport_error";
    };
    if status < 300 {
        return "ok";
    }
    let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
    let throttled = status == 429
        || THROTTLE_CODES.iter().any(|c| {
            text.contains(&format!("<Code>{c}</Code>"))
                || text.contains(&format!("\"{c}\""))
                || text.contains(&format!("#{c}\""))
        });
    if throttled {
        "throttled"
    } else if status >= 500 {
        "server_error"
    } else {
        "client_error"
    }
}

#[derive(Debug, Clone, Copy)]
struct AttemptStart(Instant);

impl Storable for AttemptStart {
    type Storer = StoreReplace<Self>;
}

/// Counts and times every request of the client it is installed on.
#[derive(Clone)]
pub struct ApiInterceptor {
    pub metrics: AwsApiMetrics,
}

impl std::fmt::Debug for ApiInterceptor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiInterceptor")
    }
}

impl Intercept for ApiInterceptor {
    fn name(&self) -> &'static str {
        "slipway-aws-api-metrics"
    }

    fn read_before_attempt(
        &self,
        _ctx: &BeforeTransmitInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(AttemptStart(Instant::now()));
        Ok(())
    }

    fn read_after_attempt(
        &self,
        ctx: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let op = cfg
            .load::<Metadata>()
            .map(|m| m.name().to_string())
            .unwrap_or_else(|| "unknown".into());
        let seconds = cfg
            .load::<AttemptStart>()
            .map(|s| s.0.elapsed().as_secs_f64())
            .unwrap_or_default();
        let resp = ctx.response();
        let status = resp.map(|r| r.status().as_u16());
        let body = resp.and_then(|r| r.body().bytes()).unwrap_or_default();
        let outcome = outcome(status, body);
        self.metrics.observe(&op, outcome, seconds);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_from_status_and_error_code() {
        let ec2 = |code: &str| {
            format!("<Response><Errors><Error><Code>{code}</Code></Error></Errors></Response>")
        };
        assert_eq!(outcome(Some(200), b""), "ok");
        assert_eq!(outcome(None, b""), "transport_error");
        assert_eq!(
            outcome(Some(503), ec2("RequestLimitExceeded").as_bytes()),
            "throttled"
        );
        assert_eq!(
            outcome(Some(503), ec2("Unavailable").as_bytes()),
            "server_error"
        );
        assert_eq!(
            outcome(Some(400), ec2("InvalidVolume.NotFound").as_bytes()),
            "client_error"
        );
        assert_eq!(
            outcome(
                Some(400),
                br#"{"__type":"ThrottlingException","message":"x"}"#
            ),
            "throttled"
        );
        assert_eq!(outcome(Some(429), b""), "throttled");
    }
}
