//! The AWS backend's request metrics.
//!
//! Defined here, not in the server's metrics module, because this crate compiles against the
//! backend traits alone and never against the server (docs/ARCHITECTURE.md); the server
//! registers them in its registry ([`AwsApiMetrics::collectors`]) and serves them with its own.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts};
use slipway_backend::LATENCY_BUCKETS;

/// Outcomes of an AWS API request (the `outcome` label's closed set): answered, throttled
/// (`RequestLimitExceeded`, `Throttling…`, HTTP 429, EBS's `SlowDown`), refused for another
/// reason (4xx), failed on AWS's side (5xx), or never answered (connect, timeout).
pub const AWS_OUTCOMES: &[&str] = &[
    "ok",
    "throttled",
    "client_error",
    "server_error",
    "transport_error",
];

/// Every EC2 and EBS request the AWS backend makes, counted by the SDK interceptor that all of
/// its clients carry. Created before the server (the backend needs them first) and registered
/// into the server's registry by `slipway_server::metrics::Metrics::register_backend`.
#[derive(Clone)]
pub struct AwsApiMetrics {
    /// Requests (each attempt and each page is one: what EC2's request-rate bucket counts)
    /// by operation and outcome.
    pub requests: IntCounterVec,
    /// Latency of each request by operation.
    pub seconds: HistogramVec,
}

impl AwsApiMetrics {
    pub fn new() -> Self {
        AwsApiMetrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "slipway_aws_requests_total",
                    "EC2 and EBS API requests (attempts and pages included) by operation and outcome (ok, throttled, client_error, server_error, transport_error).",
                ),
                &["op", "outcome"],
            )
            .unwrap(),
            seconds: HistogramVec::new(
                HistogramOpts::new(
                    "slipway_aws_request_duration_seconds",
                    "Latency of EC2 and EBS API requests by operation.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["op"],
            )
            .unwrap(),
        }
    }

    /// Records one request.
    pub fn observe(&self, op: &str, outcome: &str, seconds: f64) {
        debug_assert!(AWS_OUTCOMES.contains(&outcome), "{outcome}");
        self.requests.with_label_values(&[op, outcome]).inc();
        self.seconds.with_label_values(&[op]).observe(seconds);
    }

    /// Requests of operations whose name starts with `Describe` (or `List`), all outcomes:
    /// the calls that share EC2's per-account describe budget.
    pub fn describe_requests(&self) -> u64 {
        use prometheus::core::Collector;
        self.requests
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.get_name() == "op" && l.get_value().starts_with("Describe"))
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Requests with `outcome` so far, all operations.
    pub fn outcome_total(&self, outcome: &str) -> u64 {
        use prometheus::core::Collector;
        self.requests
            .collect()
            .iter()
            .flat_map(|mf| mf.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.get_name() == "outcome" && l.get_value() == outcome)
            })
            .map(|m| m.get_counter().get_value() as u64)
            .sum()
    }

    /// Requests of `op` with `outcome` so far.
    pub fn count(&self, op: &str, outcome: &str) -> u64 {
        self.requests.with_label_values(&[op, outcome]).get()
    }
}

impl Default for AwsApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl AwsApiMetrics {
    /// The collectors to register with the server's registry.
    pub fn collectors(&self) -> Vec<Box<dyn prometheus::core::Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.seconds.clone()),
        ]
    }
}
