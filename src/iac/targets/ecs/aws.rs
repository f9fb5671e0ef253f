//! The AWS clients of one broker (credentials from the standard chain, one endpoint override
//! for tests) and the retry that rides out eventual consistency.
//! Throttling and transient faults are retried by the SDK's standard retry (exponential
//! backoff with jitter) before an error gets here.

pub use super::error::{classify, AwsError};
use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region};
use std::time::Duration;

/// The SDK clients this target uses, for one region.
#[derive(Clone, Debug)]
pub struct Aws {
    pub region: String,
    pub ecs: aws_sdk_ecs::Client,
    pub discovery: aws_sdk_servicediscovery::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub secrets: aws_sdk_secretsmanager::Client,
    pub ec2: super::ec2::Ec2,
    pub logs: aws_sdk_cloudwatchlogs::Client,
}

impl Aws {
    /// Clients for `region` (else the chain's) through `endpoint` (else AWS's), with
    /// credentials from the standard chain.
    pub async fn connect(region: Option<&str>, endpoint: Option<&str>) -> Result<Aws, AwsError> {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(8)
                    .with_initial_backoff(Duration::from_millis(200))
                    .with_max_backoff(Duration::from_secs(20)),
            );
        if let Some(r) = region {
            loader = loader.region(Region::new(r.to_string()));
        }
        if let Some(e) = endpoint {
            loader = loader.endpoint_url(e);
        }
        let conf = loader.load().await;
        let region = conf
            .region()
            .map(|r| r.as_ref().to_string())
            .ok_or(AwsError::NoRegion)?;
        Ok(Aws {
            region: region.clone(),
            ecs: aws_sdk_ecs::Client::new(&conf),
            discovery: aws_sdk_servicediscovery::Client::new(&conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&conf),
            secrets: aws_sdk_secretsmanager::Client::new(&conf),
            ec2: super::ec2::Ec2::new(&region, endpoint, conf.credentials_provider())?,
            logs: aws_sdk_cloudwatchlogs::Client::new(&conf),
        })
    }
}

/// Runs `f` again while it fails with an error eventual consistency clears (up to `budget`),
/// backing off from 250 ms to 5 s.
pub async fn settle<T, F, Fut>(budget: Duration, mut f: F) -> Result<T, AwsError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, AwsError>>,
{
    let start = std::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    loop {
        match f().await {
            Err(e) if e.is_eventual() && start.elapsed() + pause < budget => {
                tracing::debug!(error = %e, "waiting for AWS to catch up");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}
