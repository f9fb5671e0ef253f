//! The only door to generated code. Everything else imports wire types from here.

#[allow(clippy::all, missing_docs, unreachable_pub)]
mod generated {
    pub mod workflow_plugin_v1 {
        tonic::include_proto!("workflow.plugin.v1");
    }
    pub mod iac {
        tonic::include_proto!("workflow.plugin.external.iac");
    }
    pub mod go_plugin {
        tonic::include_proto!("plugin");
    }
    pub mod eventbus {
        tonic::include_proto!("workflow.plugin.eventbus.v1");
    }
}

pub use generated::eventbus;
pub use generated::go_plugin;
pub use generated::iac;
pub use generated::workflow_plugin_v1 as plugin;

/// Encoded `google.protobuf.FileDescriptorSet` of `eventbus.proto` and all of its imports.
pub const EVENTBUS_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/eventbus_descriptor.bin"));

/// Fully-qualified names of the IaC services the plugin serves (its SERVICE descriptors and
/// plugin.json list them).
pub const IAC_SERVICES: &[&str] = &[
    "workflow.plugin.external.iac.IaCProviderDriftDetector",
    "workflow.plugin.external.iac.IaCProviderEnumerator",
    "workflow.plugin.external.iac.IaCProviderRequired",
    "workflow.plugin.external.iac.IaCProviderValidator",
    "workflow.plugin.external.iac.ResourceDriver",
];

/// Protobuf package of our own messages.
pub const EVENTBUS_PACKAGE: &str = "workflow.plugin.eventbus.v1";

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn registry_descriptor_set_holds_eventbus_and_every_import() {
        let set = prost_types::FileDescriptorSet::decode(EVENTBUS_DESCRIPTOR_SET).unwrap();
        let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
        assert!(names.contains(&"eventbus.proto"), "{names:?}");
        for file in &set.file {
            for dep in &file.dependency {
                assert!(
                    names.contains(&dep.as_str()),
                    "{} imports missing {dep}",
                    file.name()
                );
            }
        }
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "file names must be unique");
    }
}
