//! The resource types this provider serves, by name: what the drivers, the targets and the
//! services all name, so none of them imports another for it. Which code serves a kind is the
//! drivers' (`Kind::driver`).

use crate::iac::error::DriverError;

pub const BROKER_TYPE: &str = "infra.eventbus";
pub const STREAM_TYPE: &str = "infra.eventbus.stream";
pub const CONSUMER_TYPE: &str = "infra.eventbus.consumer";
pub const KV_TYPE: &str = "infra.eventbus.kv";
pub const KV_ENTRY_TYPE: &str = "infra.eventbus.kv_entry";
pub const OBJECT_STORE_TYPE: &str = "infra.eventbus.object_store";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Consumer,
    KvEntry,
    Kv,
    ObjectStore,
    Stream,
    Broker,
}

impl Kind {
    /// In deletion order: consumers and keys, then streams and buckets, then brokers.
    pub const DELETE_ORDER: [Kind; 6] = [
        Kind::Consumer,
        Kind::KvEntry,
        Kind::Kv,
        Kind::ObjectStore,
        Kind::Stream,
        Kind::Broker,
    ];

    pub fn parse(type_name: &str) -> Result<Kind, DriverError> {
        match type_name {
            BROKER_TYPE => Ok(Kind::Broker),
            STREAM_TYPE => Ok(Kind::Stream),
            CONSUMER_TYPE => Ok(Kind::Consumer),
            KV_TYPE => Ok(Kind::Kv),
            KV_ENTRY_TYPE => Ok(Kind::KvEntry),
            OBJECT_STORE_TYPE => Ok(Kind::ObjectStore),
            "" => Err(DriverError::EmptyType {
                known: Kind::ALL.map(Kind::type_name).join(", "),
            }),
            other => Err(DriverError::UnknownType {
                type_name: other.to_string(),
                known: Kind::ALL.map(Kind::type_name).join(", "),
            }),
        }
    }

    /// Every kind, in the order capabilities list them.
    pub const ALL: [Kind; 6] = [
        Kind::Broker,
        Kind::Stream,
        Kind::Consumer,
        Kind::Kv,
        Kind::KvEntry,
        Kind::ObjectStore,
    ];

    pub fn type_name(self) -> &'static str {
        match self {
            Kind::Broker => BROKER_TYPE,
            Kind::Stream => STREAM_TYPE,
            Kind::Consumer => CONSUMER_TYPE,
            Kind::Kv => KV_TYPE,
            Kind::KvEntry => KV_ENTRY_TYPE,
            Kind::ObjectStore => OBJECT_STORE_TYPE,
        }
    }
}
