//! Who this instance is (IMDSv2) and how the SDK is configured.

use std::time::Duration;

use aws_config::imds;
use aws_config::provider_config::ProviderConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_smithy_http_client::tls;
use aws_smithy_runtime_api::client::http::SharedHttpClient;
use aws_smithy_types::retry::RetryConfig;

use crate::error::AwsError;

/// This instance as the metadata service describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceIdentity {
    pub instance_id: String,
    pub region: String,
    pub availability_zone: String,
    pub instance_type: String,
    pub private_ip: String,
}

/// The HTTPS client every AWS call uses: hyper 1 with rustls on the ring provider (the same
/// TLS stack as the rest of the workspace; no aws-lc-rs), trusting the platform's roots. Plain
/// `http://` endpoints (the metadata service, test emulators) work through it too.
pub fn https_client() -> SharedHttpClient {
    aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https()
}

/// The SDK configuration for production: the default credential chain (environment, profile,
/// web identity, then the instance profile through IMDSv2), `region` or the default region
/// chain, standard retries with 8 attempts. `AWS_ENDPOINT_URL` and the other `AWS_*`
/// variables are honoured by the SDK itself.
pub async fn sdk_config(region: Option<String>) -> SdkConfig {
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(https_client());
    // 8 attempts by default (busy accounts throttle); the SDKs' own AWS_MAX_ATTEMPTS (and
    // AWS_RETRY_MODE) override it, as operators expect of any AWS tool.
    if std::env::var_os("AWS_MAX_ATTEMPTS").is_none() {
        loader = loader.retry_config(RetryConfig::standard().with_max_attempts(8));
    }
    if let Some(r) = region {
        loader = loader.region(Region::new(r));
    }
    loader.load().await
}

/// Reads this instance's identity from IMDSv2 with the SDK's metadata client (token session,
/// retries), at the default endpoint or `AWS_EC2_METADATA_SERVICE_ENDPOINT`.
pub async fn instance_identity() -> Result<InstanceIdentity, AwsError> {
    let client = imds::Client::builder()
        .configure(&ProviderConfig::default().with_http_client(https_client()))
        .connect_timeout(Duration::from_secs(2))
        .read_timeout(Duration::from_secs(5))
        .build();
    instance_identity_from(&client).await
}

/// [`instance_identity`] through a given metadata client (for an explicit endpoint).
pub async fn instance_identity_from(client: &imds::Client) -> Result<InstanceIdentity, AwsError> {
    async fn get(client: &imds::Client, path: &str) -> Result<String, AwsError> {
        let full = format!("/latest/meta-data/{path}");
        let v = client.get(&full).await.map_err(|e| AwsError::Imds {
            path: full.clone(),
            message: aws_smithy_types::error::display::DisplayErrorContext(&e).to_string(),
        })?;
        let v = v.as_ref().trim().to_string();
        if v.is_empty() {
            return Err(AwsError::Imds {
                path: full,
                message: "empty answer".into(),
            });
        }
        Ok(v)
    }
    let instance_id = get(client, "instance-id").await?;
    let availability_zone = get(client, "placement/availability-zone").await?;
    let region = get(client, "placement/region").await?;
    let instance_type = get(client, "instance-type").await?;
    let private_ip = get(client, "local-ipv4").await?;
    Ok(InstanceIdentity {
        instance_id,
        region,
        availability_zone,
        instance_type,
        private_ip,
    })
}
