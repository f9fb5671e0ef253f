//! The one table of capability names (module, step, trigger and IaC resource types the plugin
//! registers). Everything that lists types (type lists, contract registry, schemas, plugin.json
//! tests) reads from here.

use crate::pb::EVENTBUS_PACKAGE;

/// A full eventbus message name as a literal; must agree with `EVENTBUS_PACKAGE` (tested).
macro_rules! eventbus {
    ($m:literal) => {
        concat!("workflow.plugin.eventbus.v1.", $m)
    };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModuleKind {
    Broker,
    Stream,
    Consumer,
    Kv,
    ObjectStore,
}

impl ModuleKind {
    pub fn config_message(self) -> &'static str {
        match self {
            ModuleKind::Broker => "ClusterConfig",
            ModuleKind::Stream => "StreamConfig",
            ModuleKind::Consumer => "ConsumerConfig",
            ModuleKind::Kv => "KvBucketConfig",
            ModuleKind::ObjectStore => "ObjectStoreConfig",
        }
    }
}

/// (type name, kind): v0.1 `infra.*` names and v0.2 `eventbus.*` names share factories.
pub const MODULE_TYPES: &[(&str, ModuleKind)] = &[
    ("infra.eventbus", ModuleKind::Broker),
    ("infra.eventbus.stream", ModuleKind::Stream),
    ("infra.eventbus.consumer", ModuleKind::Consumer),
    ("infra.eventbus.kv", ModuleKind::Kv),
    ("infra.eventbus.object_store", ModuleKind::ObjectStore),
    ("eventbus.broker", ModuleKind::Broker),
    ("eventbus.stream", ModuleKind::Stream),
    ("eventbus.consumer", ModuleKind::Consumer),
    ("eventbus.kv", ModuleKind::Kv),
    ("eventbus.object_store", ModuleKind::ObjectStore),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StepKind {
    Publish,
    Consume,
    Ack,
    Kv,
    Object,
}

impl StepKind {
    pub fn type_name(self) -> &'static str {
        match self {
            StepKind::Publish => "step.eventbus.publish",
            StepKind::Consume => "step.eventbus.consume",
            StepKind::Ack => "step.eventbus.ack",
            StepKind::Kv => "step.eventbus.kv",
            StepKind::Object => "step.eventbus.object",
        }
    }
    /// (config, input, output) message names, unqualified.
    pub fn messages(self) -> (&'static str, &'static str, &'static str) {
        match self {
            StepKind::Publish => ("PublishStepConfig", "PublishRequest", "PublishResponse"),
            StepKind::Consume => ("ConsumeStepConfig", "ConsumeRequest", "ConsumeResponse"),
            StepKind::Ack => ("AckStepConfig", "AckRequest", "AckResponse"),
            StepKind::Kv => ("KvStepConfig", "KvRequest", "KvResponse"),
            StepKind::Object => ("ObjectStepConfig", "ObjectRequest", "ObjectResponse"),
        }
    }

    /// (config, input) full names, static: ExecuteStep needs them on every call and
    /// formatting them there cost more than the protobuf decode they guard (callgrind).
    pub fn full_messages(self) -> (&'static str, &'static str) {
        match self {
            StepKind::Publish => (eventbus!("PublishStepConfig"), eventbus!("PublishRequest")),
            StepKind::Consume => (eventbus!("ConsumeStepConfig"), eventbus!("ConsumeRequest")),
            StepKind::Ack => (eventbus!("AckStepConfig"), eventbus!("AckRequest")),
            StepKind::Kv => (eventbus!("KvStepConfig"), eventbus!("KvRequest")),
            StepKind::Object => (eventbus!("ObjectStepConfig"), eventbus!("ObjectRequest")),
        }
    }

    /// The output message packed as the `typed_output` Any.
    pub fn pack_output<M: prost::Message>(self, msg: &M) -> prost_types::Any {
        let type_url = match self {
            StepKind::Publish => concat!("type.googleapis.com/", eventbus!("PublishResponse")),
            StepKind::Consume => concat!("type.googleapis.com/", eventbus!("ConsumeResponse")),
            StepKind::Ack => concat!("type.googleapis.com/", eventbus!("AckResponse")),
            StepKind::Kv => concat!("type.googleapis.com/", eventbus!("KvResponse")),
            StepKind::Object => concat!("type.googleapis.com/", eventbus!("ObjectResponse")),
        };
        prost_types::Any {
            type_url: type_url.to_string(),
            value: msg.encode_to_vec(),
        }
    }
}

pub const STEP_TYPES: &[StepKind] = &[
    StepKind::Publish,
    StepKind::Consume,
    StepKind::Ack,
    StepKind::Kv,
    StepKind::Object,
];

pub const TRIGGER_TYPE: &str = "trigger.eventbus.subscribe";
pub const TRIGGER_CONFIG_MESSAGE: &str = "SubscribeTriggerConfig";
pub const TRIGGER_OUTPUT_MESSAGE: &str = "Message";

/// IaC resource types served by the provider (the v0.1 names, as wfctl routes `infra.*`).
pub const IAC_RESOURCE_TYPES: &[&str] = &[
    "infra.eventbus",
    "infra.eventbus.stream",
    "infra.eventbus.consumer",
    "infra.eventbus.kv",
    "infra.eventbus.kv_entry",
    "infra.eventbus.object_store",
];

pub fn qualified(message: &str) -> String {
    format!("{EVENTBUS_PACKAGE}.{message}")
}

pub fn module_kind(type_name: &str) -> Option<ModuleKind> {
    MODULE_TYPES
        .iter()
        .find(|(n, _)| *n == type_name)
        .map(|(_, k)| *k)
}

pub fn step_kind(type_name: &str) -> Option<StepKind> {
    STEP_TYPES
        .iter()
        .copied()
        .find(|k| k.type_name() == type_name)
}

pub fn module_type_names() -> Vec<String> {
    MODULE_TYPES.iter().map(|(n, _)| n.to_string()).collect()
}

pub fn step_type_names() -> Vec<String> {
    STEP_TYPES
        .iter()
        .map(|k| k.type_name().to_string())
        .collect()
}

pub fn trigger_type_names() -> Vec<String> {
    vec![TRIGGER_TYPE.to_string()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_step_names_agree_with_the_package() {
        for kind in STEP_TYPES.iter().copied() {
            let (c, i, o) = kind.messages();
            assert_eq!(kind.full_messages(), (&*qualified(c), &*qualified(i)));
            let any = kind.pack_output(&());
            assert_eq!(
                any.type_url,
                format!("type.googleapis.com/{}", qualified(o))
            );
        }
    }
}
