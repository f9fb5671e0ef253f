//! The IaC face's one error type and its one conversion to the host's error shape.
//!
//! wfctl recognises a missing resource only by the text `iac: resource not found` in the gRPC
//! message (docs/iac-host.md §3.2), so `NotFound` always renders with that prefix and nothing else
//! does.

use crate::config::error::ConfigError;
use crate::nats::NatsError;

/// The text wfctl matches to recognise "resource not found".
pub const NOT_FOUND_SENTINEL: &str = "iac: resource not found";

#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{NOT_FOUND_SENTINEL}: {what}")]
    NotFound { what: String },
    #[error("resource_type is required (one of: {known})")]
    EmptyType { known: String },
    #[error("unknown resource type {type_name:?}; this provider serves: {known}")]
    UnknownType { type_name: String, known: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{what}: {message}")]
    Invalid { what: String, message: String },
    #[error("{what}: config_json is not JSON")]
    NotJson {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// Built only by `targets::for_target`, which lists the targets that exist.
    #[error(
        "infra.eventbus {broker:?}: deploy target {target:?} is not available yet in the eventbus IaC provider; use deploy_target {available}"
    )]
    NotYet {
        broker: String,
        target: String,
        available: String,
    },
    /// A platform API refused or failed (a cloud target's provisioning calls).
    #[error("{what}")]
    Platform {
        what: String,
        class: PlatformClass,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{what}: {message}")]
    BrokerUnknown { what: String, message: String },
    #[error("{what}: {reason}")]
    Refused { what: String, reason: String },
    #[error("{what}")]
    Nats {
        what: String,
        #[source]
        source: NatsError,
    },
    /// A pgchannel broker's database refused or failed (`crate::pg` errors never carry the
    /// password).
    #[error("{what}")]
    Pg {
        what: String,
        #[source]
        source: crate::pg::PgError,
    },
    /// A kafka cluster refused or failed (`crate::kafka` errors never carry a password).
    #[error("{what}")]
    Kafka {
        what: String,
        #[source]
        source: crate::kafka::KafkaError,
    },
    #[error("{what}")]
    Local {
        what: String,
        #[source]
        source: super::targets::nats_server::LocalError,
    },
    #[error("provider state {path}")]
    State {
        path: String,
        #[source]
        source: StateCause,
    },
    /// A blocking task (process work, probes) died before answering.
    #[error("{what}: worker failed")]
    Worker {
        what: String,
        #[source]
        source: tokio::task::JoinError,
    },
    #[error("{0} is not supported by the eventbus IaC provider")]
    Unsupported(String),
}

/// Why the provider state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateCause {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl DriverError {
    pub fn not_found(what: impl Into<String>) -> Self {
        DriverError::NotFound { what: what.into() }
    }

    pub fn invalid(what: impl Into<String>, message: impl Into<String>) -> Self {
        DriverError::Invalid {
            what: what.into(),
            message: message.into(),
        }
    }

    pub fn refused(what: impl Into<String>, reason: impl Into<String>) -> Self {
        DriverError::Refused {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// A NATS failure about `what`; a server-side "not found" becomes our `NotFound`.
    pub fn nats(what: impl Into<String>, source: NatsError) -> Self {
        let what = what.into();
        if source.is_not_found() {
            return DriverError::NotFound { what };
        }
        DriverError::Nats { what, source }
    }

    /// A pgchannel database failure about `what`.
    pub fn pg(what: impl Into<String>, source: crate::pg::PgError) -> Self {
        DriverError::Pg {
            what: what.into(),
            source,
        }
    }

    /// A kafka failure about `what`; an unknown topic becomes our `NotFound`.
    pub fn kafka(what: impl Into<String>, source: crate::kafka::KafkaError) -> Self {
        let what = what.into();
        if matches!(source, crate::kafka::KafkaError::TopicNotFound(_)) {
            return DriverError::NotFound { what };
        }
        DriverError::Kafka { what, source }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, DriverError::NotFound { .. })
    }

    /// The broker could not be reached (as opposed to a refusal or a missing resource).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            DriverError::Nats {
                source: NatsError::Unavailable { .. } | NatsError::TimedOut { .. },
                ..
            }
        )
    }
}

/// How a platform API failure reaches wfctl.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlatformClass {
    /// Credentials missing, rejected or short of a permission.
    Auth,
    /// The request (config) was refused as invalid.
    Invalid,
    /// Unreachable or rate-limited: try again later.
    Unavailable,
    /// The platform did not finish in the time allowed.
    Timeout,
    /// Anything else (a failed deployment, an unexpected answer).
    Failed,
}

impl From<DriverError> for tonic::Status {
    fn from(e: DriverError) -> Self {
        let msg = crate::error_chain::render(&e);
        match &e {
            DriverError::NotFound { .. } => tonic::Status::not_found(msg),
            DriverError::EmptyType { .. }
            | DriverError::UnknownType { .. }
            | DriverError::Config(_)
            | DriverError::Invalid { .. }
            | DriverError::NotJson { .. } => tonic::Status::invalid_argument(msg),
            DriverError::Platform { class, .. } => match class {
                PlatformClass::Auth => tonic::Status::permission_denied(msg),
                PlatformClass::Invalid => tonic::Status::invalid_argument(msg),
                PlatformClass::Unavailable => tonic::Status::unavailable(msg),
                PlatformClass::Timeout => tonic::Status::deadline_exceeded(msg),
                PlatformClass::Failed => tonic::Status::failed_precondition(msg),
            },
            DriverError::NotYet { .. }
            | DriverError::BrokerUnknown { .. }
            | DriverError::Refused { .. } => tonic::Status::failed_precondition(msg),
            DriverError::Nats { source, .. } => match source {
                NatsError::Unavailable { .. } | NatsError::TimedOut { .. } => {
                    tonic::Status::unavailable(msg)
                }
                NatsError::Settings(_) => tonic::Status::invalid_argument(msg),
                _ => tonic::Status::failed_precondition(msg),
            },
            DriverError::Pg { source, .. } => {
                if source.is_transient() {
                    tonic::Status::unavailable(msg)
                } else {
                    tonic::Status::failed_precondition(msg)
                }
            }
            DriverError::Kafka { source, .. } => match source {
                s if s.is_transient() => tonic::Status::unavailable(msg),
                crate::kafka::KafkaError::Invalid(_) => tonic::Status::invalid_argument(msg),
                _ => tonic::Status::failed_precondition(msg),
            },
            DriverError::Local { .. } | DriverError::State { .. } | DriverError::Worker { .. } => {
                tonic::Status::internal(msg)
            }
            DriverError::Unsupported(_) => tonic::Status::unimplemented(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_not_found_carries_the_sentinel() {
        let s: tonic::Status = DriverError::not_found("stream \"ORDERS\" on broker \"bus\"").into();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert!(
            s.message().starts_with(NOT_FOUND_SENTINEL),
            "{}",
            s.message()
        );
        let lifted: tonic::Status = DriverError::nats(
            "stream \"X\"",
            NatsError::NotFound {
                what: "stream \"X\"".into(),
            },
        )
        .into();
        assert!(lifted.message().contains(NOT_FOUND_SENTINEL));
        for e in [
            DriverError::UnknownType {
                type_name: "infra.database".into(),
                known: "x".into(),
            },
            not_yet("b", crate::providers::DeployTarget::AwsMsk),
            DriverError::refused("stream \"S\"", "prevent_destroy is set"),
            DriverError::nats(
                "stream \"S\"",
                NatsError::Unavailable {
                    broker: "b".into(),
                    detail: "down".into(),
                },
            ),
            DriverError::Unsupported("Scale of infra.eventbus.consumer".into()),
        ] {
            let s: tonic::Status = e.into();
            assert!(!s.message().contains(NOT_FOUND_SENTINEL), "{}", s.message());
            assert_ne!(s.code(), tonic::Code::NotFound);
        }
        let s: tonic::Status = DriverError::Unsupported("Troubleshoot".into()).into();
        assert_eq!(s.code(), tonic::Code::Unimplemented);
    }

    fn not_yet(broker: &str, t: crate::providers::DeployTarget) -> DriverError {
        match crate::iac::targets::for_target(broker, t) {
            Err(e) => e,
            Ok(_) => panic!("{t} is provisioned"),
        }
    }

    #[test]
    fn not_yet_names_the_target_and_the_alternatives() {
        let m = not_yet("bus", crate::providers::DeployTarget::AwsMsk).to_string();
        assert_eq!(
            m,
            "infra.eventbus \"bus\": deploy target \"aws.msk\" is not available yet in the eventbus IaC provider; \
             use deploy_target local (nats-server processes on this machine) or self_hosted (servers you name with dsn/servers) \
             or digitalocean.app_platform (one non-durable broker as an App Platform app) \
             or kubernetes (a durable JetStream cluster as a StatefulSet, through the Kubernetes API) \
             or aws.eks (the same on EKS: gp3 volumes, zone spread) \
             or aws.ecs (a JetStream cluster as one Fargate service per node, through the AWS APIs)"
        );
    }
}
