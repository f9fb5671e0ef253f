//! The one ending of every apply and broker delete, for every resource kind and provider:
//! the record in the provider state and the outputs wfctl gets back.

use crate::iac::ctx::Ctx;
use crate::iac::error::DriverError;
use crate::iac::kind::{CONSUMER_TYPE, STREAM_TYPE};
use crate::iac::state::{BrokerRecord, ResourceRecord};
use serde_json::Value as Json;

use super::Output;

/// Flags that live in the provider's records, not on the server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Flags {
    pub broker: String,
    pub broker_ref: String,
    pub prevent_destroy: bool,
    pub bind: bool,
}

/// What an apply records in the provider state: a broker (by its name) or a stream or
/// consumer (by resource name).
pub enum Record {
    Broker(Box<BrokerRecord>),
    Resource(ResourceRecord),
}

/// The one ending of every apply, for every kind and provider: record the resource in the
/// provider state, then answer with the outputs recorded.
pub fn record_and_output(
    ctx: &Ctx,
    name: &str,
    record: Record,
    provider_id: String,
    sensitive: Vec<String>,
) -> Result<Output, DriverError> {
    let outputs = match &record {
        Record::Broker(b) => b.outputs.clone(),
        Record::Resource(r) => r.outputs.clone(),
    };
    ctx.state.update(|s| match record {
        Record::Broker(b) => {
            s.brokers.insert(name.to_string(), *b);
        }
        Record::Resource(r) => {
            s.resources.insert(name.to_string(), r);
        }
    })?;
    Ok(Output {
        provider_id,
        outputs,
        sensitive,
        status: "running".into(),
    })
}

/// Where an applied stream or consumer lives and the flags its record keeps (what every
/// provider's apply knows once the server or database holds it).
pub struct Placed<'a> {
    pub broker: &'a str,
    /// Explicit NATS servers ("" broker), empty elsewhere.
    pub servers: &'a [String],
    pub stream: &'a str,
    /// `None` for a stream.
    pub durable: Option<&'a str>,
    pub provider_id: String,
    pub broker_ref: &'a str,
    pub prevent_destroy: bool,
    pub bind: bool,
}

/// `record` for a stream or consumer: its flags, the provider's outputs built from them, and
/// the resource record.
pub fn record_placed(
    ctx: &Ctx,
    resource: &str,
    at: Placed<'_>,
    outputs: impl FnOnce(&Flags) -> Json,
) -> Result<Output, DriverError> {
    let type_name = match at.durable {
        None => STREAM_TYPE,
        Some(_) => CONSUMER_TYPE,
    };
    record_placed_as(ctx, resource, at, type_name, outputs)
}

/// `record_placed` for a resource of `type_name` (a key-value bucket is placed as its stream).
pub fn record_placed_as(
    ctx: &Ctx,
    resource: &str,
    at: Placed<'_>,
    type_name: &str,
    outputs: impl FnOnce(&Flags) -> Json,
) -> Result<Output, DriverError> {
    let flags = Flags {
        broker: at.broker.to_string(),
        broker_ref: at.broker_ref.to_string(),
        prevent_destroy: at.prevent_destroy,
        bind: at.bind,
    };
    let provider_id = at.provider_id;
    let rec = ResourceRecord {
        type_name: type_name.into(),
        provider_id: provider_id.clone(),
        broker: at.broker.to_string(),
        servers: at.servers.to_vec(),
        stream: at.stream.to_string(),
        durable: at.durable.unwrap_or_default().to_string(),
        prevent_destroy: at.prevent_destroy,
        bind: at.bind,
        released: false,
        outputs: outputs(&flags),
    };
    record_and_output(
        ctx,
        resource,
        Record::Resource(rec),
        provider_id,
        Vec::new(),
    )
}

/// The one ending of every broker delete: the record goes, and with it the records of
/// streams and consumers released on it.
pub fn forget_broker(ctx: &Ctx, name: &str) -> Result<(), DriverError> {
    ctx.state.update(|s| {
        s.brokers.remove(name);
        s.resources
            .retain(|_, res| !(res.released && res.broker == name));
    })
}
