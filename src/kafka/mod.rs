//! kafka: a Kafka cluster as the event bus (domain layer; no gRPC, no runtime types).
//!
//! A stream is a topic (`topic`), a consumer is a consumer group on it (`group`), a subject
//! travels in the `eventbus.subject` header and is the default record key (`subject`). The
//! producer is idempotent (`producer`); consumers settle each message over Kafka's cumulative
//! offsets (`offsets`, `consumer`). Client properties come from one place (`client`).
//!
//! What Kafka can and cannot promise, plainly:
//! * **Order**: per partition. One subject (the default key) always lands on one partition, so
//!   its messages keep their order; across subjects there is no order. A nak'd message comes
//!   back after the messages behind it (its retry copy is appended).
//! * **At least once**: an offset is committed only when every message below it is settled, so
//!   a crash or a rebalance redelivers what was in flight (and possibly some settled messages
//!   above an unsettled one). Nothing settled-and-committed is delivered again to the group.
//! * **message_id de-duplication**: only a producer's own retries are de-duplicated (the
//!   idempotent producer, one producer session). Two publishes with the same `message_id`, a
//!   re-send after a restart, or sends from two processes are all stored; `message_id` travels
//!   in the `eventbus.msg_id` header so consumers can de-duplicate. Publish never reports
//!   `duplicate`.
//! * **Delivery counts** survive a restart (the count is a header of the retry copy); a
//!   delivery that ends in a crash before its settle is not counted.
//! * **Retention** is by age and size only; acks never delete records, so other groups (and
//!   later replays) see everything, including the retry copies of any group (groups pass over
//!   copies that are not theirs).

pub mod admin;
mod client;
mod consumer;
mod error;
pub mod group;
pub mod offsets;
mod producer;
pub mod provider;
pub mod spec;
pub mod subject;
pub mod topic;

#[cfg(test)]
mod tests;

pub use client::KafkaSettings;
pub use consumer::{AckOp, AckToken, ConsumerOpts, DeadLetter, Delivery, KafkaGroupConsumer};
pub use error::KafkaError;
pub use group::{position_new_group, GroupSpec, OffsetLookup, StartPolicy};
pub use offsets::{OffsetTracker, TopicPartition};
pub use producer::{KafkaProducer, Outgoing, Published, DEFAULT_WINDOW};
pub use topic::{Ensured, TopicAdmin, TopicSpec};
