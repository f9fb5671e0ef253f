//! The kafka layer's one error type. Every variant renders as one line naming the operation;
//! none carries a password (client configs never reach an error).

use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// Bad settings or definitions: `<what>: <why, and what is valid>`.
    #[error("kafka: {0}")]
    Invalid(String),
    #[error("kafka: topic \"{0}\" not found")]
    TopicNotFound(String),
    /// A change Kafka does not allow in place (partitions down, replication factor).
    #[error("kafka: {0}")]
    Refused(String),
    #[error("kafka: Ack: malformed ack token {0:?} (want \"<topic>:<partition>:<offset>:<epoch>:<group>\")")]
    MalformedToken(String),
    /// The message cannot be settled here (already settled, or its partition moved).
    #[error("kafka: Ack: {0}")]
    Settle(String),
    /// A client or broker failure during `op`; `transient` when a retry may succeed.
    #[error("kafka: {op}: {msg}")]
    Client {
        op: &'static str,
        msg: String,
        transient: bool,
    },
    #[error("kafka: {0}: timed out")]
    TimedOut(&'static str),
    #[error("kafka: {0}: cancelled")]
    Cancelled(&'static str),
}

impl KafkaError {
    pub fn invalid(msg: impl Into<String>) -> Self {
        KafkaError::Invalid(msg.into())
    }

    /// Lifts an rdkafka error once, by code (never by text).
    pub fn client(op: &'static str, e: RdError) -> Self {
        let code = e.rdkafka_error_code();
        let transient = code.is_some_and(is_transient);
        KafkaError::Client {
            op,
            msg: e.to_string(),
            transient,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            KafkaError::Client {
                transient: true,
                ..
            } | KafkaError::TimedOut(_)
        )
    }
}

fn is_transient(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode as C;
    matches!(
        code,
        C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::MessageTimedOut
            | C::OperationTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
            | C::CoordinatorLoadInProgress
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::RebalanceInProgress
            | C::QueueFull
    )
}
