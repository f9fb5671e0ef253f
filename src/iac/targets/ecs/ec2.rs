//! The few EC2 calls this target makes (the broker's security group), as signed EC2 Query API
//! requests (form-encoded POST, XML answer, SigV4 through `aws-sigv4`) instead of the
//! `aws-sdk-ec2` crate: that crate generates code for EC2's ~700 operations and alone took
//! longer to compile than every other AWS crate here together, for five calls.

use super::error::{of_code, AwsError};
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use std::time::{Duration, SystemTime};

/// EC2's Query API version.
const VERSION: &str = "2016-11-15";

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

#[derive(Clone)]
pub struct Ec2 {
    endpoint: String,
    region: String,
    credentials: Option<SharedCredentialsProvider>,
    http: Client<Https, Full<Bytes>>,
}

impl std::fmt::Debug for Ec2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ec2")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish()
    }
}

/// `application/x-www-form-urlencoded` the way SigV4 canonicalizes it: every byte but
/// `A-Z a-z 0-9 - _ . ~` as `%XX`.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The text of the first `<tag>...</tag>` in `xml`, unescaped.
pub fn tag(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(unescape(&xml[start..end]))
}

/// Every `<tag>...</tag>` text in `xml`.
pub fn tags(xml: &str, name: &str) -> Vec<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(unescape(&after[..j]));
        rest = &after[j + close.len()..];
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

impl Ec2 {
    pub fn new(
        region: &str,
        endpoint: Option<&str>,
        credentials: Option<SharedCredentialsProvider>,
    ) -> Result<Ec2, AwsError> {
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_native_roots(tokio_rustls::rustls::crypto::ring::default_provider())
            .map_err(|e| AwsError::Unreachable {
                op: "ec2".into(),
                detail: format!("no TLS root certificates: {e}"),
            })?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Ec2 {
            endpoint: endpoint
                .map(|e| e.trim_end_matches('/').to_string())
                .unwrap_or_else(|| format!("https://ec2.{region}.amazonaws.com")),
            region: region.to_string(),
            credentials,
            http: Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls),
        })
    }

    /// Calls `action` with `params`; the response's XML. Throttling and server faults are
    /// retried with backoff (up to 8 attempts, as the SDK clients do).
    pub async fn call(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, AwsError> {
        let op = format!("ec2:{action}");
        let mut pause = Duration::from_millis(200);
        for attempt in 1.. {
            match self.once(&op, action, params).await {
                Err(e @ (AwsError::Throttled { .. } | AwsError::Unavailable { .. }))
                    if attempt < 8 =>
                {
                    tracing::debug!(error = %e, attempt, "EC2 call retried");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(20));
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    async fn once(
        &self,
        op: &str,
        action: &str,
        params: &[(String, String)],
    ) -> Result<String, AwsError> {
        use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
        let mut body = format!("Action={}&Version={VERSION}", encode(action));
        for (k, v) in params {
            body.push_str(&format!("&{}={}", encode(k), encode(v)));
        }
        let creds = match &self.credentials {
            Some(p) => p
                .provide_credentials()
                .await
                .map_err(|e| AwsError::NoCredentials(crate::error_chain::render(&e)))?,
            None => return Err(AwsError::NoCredentials("no credentials provider".into())),
        };
        let identity = creds.into();
        let uri = format!("{}/", self.endpoint);
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let mut req = hyper::Request::builder()
            .method("POST")
            .uri(&uri)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body.clone())))
            .map_err(|e| AwsError::Unreachable {
                op: op.into(),
                detail: e.to_string(),
            })?;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.region)
            .name("ec2")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .map_err(|e| AwsError::NoCredentials(e.to_string()))?
            .into();
        let signable = SignableRequest::new(
            "POST",
            uri.as_str(),
            [("content-type", content_type)].into_iter(),
            SignableBody::Bytes(body.as_bytes()),
        )
        .map_err(|e| AwsError::Unreachable {
            op: op.into(),
            detail: e.to_string(),
        })?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| AwsError::NoCredentials(e.to_string()))?
            .into_parts();
        instructions.apply_to_request_http1x(&mut req);
        let resp = tokio::time::timeout(Duration::from_secs(60), self.http.request(req))
            .await
            .map_err(|_| AwsError::TimedOut { op: op.into() })?
            .map_err(|e| AwsError::Unreachable {
                op: op.into(),
                detail: crate::error_chain::render(&e),
            })?;
        let status = resp.status();
        let bytes = tokio::time::timeout(Duration::from_secs(60), resp.into_body().collect())
            .await
            .map_err(|_| AwsError::TimedOut { op: op.into() })?
            .map_err(|e| AwsError::Unreachable {
                op: op.into(),
                detail: e.to_string(),
            })?
            .to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if status.is_success() {
            return Ok(text);
        }
        let code = tag(&text, "Code").unwrap_or_else(|| format!("HTTP {}", status.as_u16()));
        let message = tag(&text, "Message").unwrap_or_default();
        if status.is_server_error() && !code.contains("Throttl") {
            return Err(AwsError::Unavailable {
                op: op.into(),
                code,
                message,
            });
        }
        Err(of_code(op.into(), code, message))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_encoding_and_xml_reading() {
        assert_eq!(encode("a b/c~"), "a%20b%2Fc~");
        let x = "<R><groupId>sg-1</groupId><item><groupId>sg-2</groupId></item><Message>a &amp; b</Message></R>";
        assert_eq!(tag(x, "groupId").as_deref(), Some("sg-1"));
        assert_eq!(tags(x, "groupId"), ["sg-1", "sg-2"]);
        assert_eq!(tag(x, "Message").as_deref(), Some("a & b"));
    }
}
