//! What an AWS answer means for this target: one error kind per family of AWS error codes
//! (the codes differ per service, the families do not), each with its own words and class.

use crate::iac::error::PlatformClass;
use aws_sdk_ecs::error::{ProvideErrorMetadata, SdkError};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error(
        "no AWS region: set aws.region (or region), AWS_REGION, or a region in the AWS profile"
    )]
    NoRegion,
    #[error("no usable AWS credentials ({0}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with a task or instance role")]
    NoCredentials(String),
    #[error("{op}: AWS rejected the credentials ({code}: {message}); check the access key, session token or profile")]
    BadCredentials {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: access denied ({code}: {message}); the caller needs this permission (README: IAM permissions for aws.ecs)")]
    Denied {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: AWS kept throttling ({code}) through the retries; try again later or raise the API rate quota")]
    Throttled { op: String, code: String },
    #[error("{op}: AWS refused the request as invalid ({code}: {message})")]
    Invalid {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: an AWS quota is exhausted ({code}: {message}); raise it in Service Quotas or delete unused resources")]
    Quota {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: {code}: {message}")]
    NotFound {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: AWS is unavailable ({code}: {message}); try again later")]
    Unavailable {
        op: String,
        code: String,
        message: String,
    },
    #[error("{op}: cannot reach the AWS endpoint: {detail}")]
    Unreachable { op: String, detail: String },
    #[error("{op}: the AWS call timed out")]
    TimedOut { op: String },
    #[error("{op}: {code}: {message}")]
    Other {
        op: String,
        code: String,
        message: String,
    },
    #[error("{what} is not ready after {waited:?}: {state}")]
    NotReady {
        what: String,
        waited: Duration,
        state: String,
    },
    #[error("{0}")]
    Conflict(String),
}

impl AwsError {
    pub fn class(&self) -> PlatformClass {
        match self {
            AwsError::NoRegion | AwsError::Invalid { .. } | AwsError::Conflict(_) => {
                PlatformClass::Invalid
            }
            AwsError::NoCredentials(_)
            | AwsError::BadCredentials { .. }
            | AwsError::Denied { .. } => PlatformClass::Auth,
            AwsError::Throttled { .. }
            | AwsError::Unavailable { .. }
            | AwsError::Unreachable { .. } => PlatformClass::Unavailable,
            AwsError::TimedOut { .. } | AwsError::NotReady { .. } => PlatformClass::Timeout,
            AwsError::Quota { .. } | AwsError::NotFound { .. } | AwsError::Other { .. } => {
                PlatformClass::Failed
            }
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, AwsError::NotFound { .. })
    }

    /// Whether the error is one AWS's eventual consistency clears up on its own (a resource
    /// just created not yet visible to another service).
    pub fn is_eventual(&self) -> bool {
        match self {
            AwsError::NotFound { message, .. } | AwsError::Invalid { message, .. } => {
                let m = message.to_ascii_lowercase();
                m.contains("does not exist")
                    || m.contains("not found")
                    || m.contains("could not be found")
                    || m.contains("is not active")
                    || m.contains("is in use")
                    || m.contains("dependency")
            }
            AwsError::Other { code, .. } => {
                code.contains("DependencyViolation") || code.contains("ResourceInUse")
            }
            _ => false,
        }
    }
}

/// What an SDK error means, for the operation `op` (`ecs:CreateService`).
pub fn classify<E, R>(op: &str, e: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let op = op.to_string();
    match e {
        SdkError::ConstructionFailure(c) => {
            let detail = format!("{c:?}");
            if detail.to_ascii_lowercase().contains("credential") {
                AwsError::NoCredentials(detail)
            } else {
                AwsError::Other {
                    op,
                    code: "ConstructionFailure".into(),
                    message: detail,
                }
            }
        }
        SdkError::TimeoutError(_) => AwsError::TimedOut { op },
        SdkError::DispatchFailure(d) => {
            let detail = format!("{d:?}");
            if detail.to_ascii_lowercase().contains("credential") {
                AwsError::NoCredentials(detail)
            } else {
                AwsError::Unreachable { op, detail }
            }
        }
        other => {
            let code = other.code().unwrap_or("Unknown").to_string();
            let message = other
                .message()
                .map(str::to_string)
                .unwrap_or_else(|| crate::error_chain::render(&other));
            of_code(op, code, message)
        }
    }
}

/// The class of a service error code (the codes differ per service, the families do not).
pub(crate) fn of_code(op: String, code: String, message: String) -> AwsError {
    let c = code.as_str();
    if matches!(
        c,
        "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "AuthFailure"
            | "InvalidSignatureException"
            | "SignatureDoesNotMatch"
            | "MissingAuthenticationToken"
    ) {
        AwsError::BadCredentials { op, code, message }
    } else if c.contains("AccessDenied")
        || c == "UnauthorizedOperation"
        || c == "AccessDeniedException"
    {
        AwsError::Denied { op, code, message }
    } else if c.contains("Throttl")
        || c == "RequestLimitExceeded"
        || c == "TooManyRequestsException"
    {
        AwsError::Throttled { op, code }
    } else if c.contains("LimitExceeded") || c.contains("Quota") || c.starts_with("TooMany") {
        AwsError::Quota { op, code, message }
    } else if c.contains("NotFound")
        || c.starts_with("InvalidGroup.NotFound")
        || c.ends_with(".NotFound")
    {
        AwsError::NotFound { op, code, message }
    } else if c.contains("ServiceUnavailable")
        || c == "ServerException"
        || c == "InternalFailure"
        || c.contains("InternalError")
    {
        AwsError::Unavailable { op, code, message }
    } else if c.starts_with("Invalid")
        || c.contains("Validation")
        || c == "ClientException"
        || c.contains("Malformed")
    {
        AwsError::Invalid { op, code, message }
    } else {
        AwsError::Other { op, code, message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_family_has_its_own_class_and_words() {
        let e = |c: &str| of_code("ecs:CreateService".into(), c.into(), "m".into());
        assert!(matches!(
            e("AccessDeniedException"),
            AwsError::Denied { .. }
        ));
        assert!(matches!(
            e("UnrecognizedClientException"),
            AwsError::BadCredentials { .. }
        ));
        assert!(matches!(
            e("ThrottlingException"),
            AwsError::Throttled { .. }
        ));
        assert!(matches!(
            e("RequestLimitExceeded"),
            AwsError::Throttled { .. }
        ));
        assert!(matches!(
            e("LimitExceededException"),
            AwsError::Quota { .. }
        ));
        assert!(matches!(
            e("ServiceNotFoundException"),
            AwsError::NotFound { .. }
        ));
        assert!(matches!(
            e("InvalidGroup.NotFound"),
            AwsError::NotFound { .. }
        ));
        assert!(matches!(
            e("InvalidParameterException"),
            AwsError::Invalid { .. }
        ));
        assert!(matches!(e("ServerException"), AwsError::Unavailable { .. }));
        assert!(matches!(e("Whatever"), AwsError::Other { .. }));
        let words: std::collections::BTreeSet<String> = [
            "AccessDeniedException",
            "ExpiredToken",
            "ThrottlingException",
            "LimitExceededException",
            "InvalidParameterException",
            "ServerException",
        ]
        .iter()
        .map(|c| e(c).to_string().replace(c, ""))
        .collect();
        assert_eq!(words.len(), 6, "{words:?}");
    }
}
