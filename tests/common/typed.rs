//! The host's side of typed payloads: YAML/JSON → strict protojson decode → Any, and typed
//! output → the JSON map the host merges into pipeline state.

use eventbus_plugin::pb::plugin::{plugin_service_client::PluginServiceClient, ContractKind};
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, Kind, SerializeOptions};
use serde_json::{Map, Value as Json};
use std::collections::HashMap;
use tonic::transport::Channel;

pub struct Codec {
    pub pool: DescriptorPool,
    pub modules: HashMap<String, String>,
    pub steps: HashMap<String, (String, String, String)>,
    pub registry: eventbus_plugin::pb::plugin::ContractRegistry,
}

pub fn yaml_to_json(yaml: &str) -> Json {
    if yaml.trim().is_empty() {
        return Json::Object(Map::new());
    }
    let v: serde_yaml::Value = serde_yaml::from_str(yaml).expect("test YAML parses");
    serde_json::to_value(v).expect("YAML → JSON")
}

pub fn json_to_struct(j: &Json) -> prost_types::Struct {
    match eventbus_plugin::config::decode::json_to_value(j).kind {
        Some(prost_types::value::Kind::StructValue(s)) => s,
        _ => prost_types::Struct::default(),
    }
}

impl Codec {
    pub async fn from_registry(client: &mut PluginServiceClient<Channel>) -> Codec {
        let registry = client
            .get_contract_registry(())
            .await
            .expect("GetContractRegistry")
            .into_inner();
        let set = registry
            .file_descriptor_set
            .clone()
            .expect("registry carries a FileDescriptorSet");
        // Loads on its own, as protodesc.NewFiles must: every import present, names unique.
        let pool =
            DescriptorPool::from_file_descriptor_set(set).expect("descriptor set loads on its own");
        let mut modules = HashMap::new();
        let mut steps = HashMap::new();
        for d in &registry.contracts {
            if d.kind == ContractKind::Module as i32 {
                modules.insert(d.module_type.clone(), d.config_message.clone());
            } else if d.kind == ContractKind::Step as i32 {
                steps.insert(
                    d.step_type.clone(),
                    (
                        d.config_message.clone(),
                        d.input_message.clone(),
                        d.output_message.clone(),
                    ),
                );
            }
        }
        Codec {
            pool,
            modules,
            steps,
            registry,
        }
    }

    pub fn module_config(&self, type_name: &str) -> String {
        self.modules
            .get(type_name)
            .cloned()
            .unwrap_or_else(|| panic!("no module contract for {type_name}"))
    }

    pub fn step_messages(&self, type_name: &str) -> (String, String, String) {
        self.steps
            .get(type_name)
            .cloned()
            .unwrap_or_else(|| panic!("no step contract for {type_name}"))
    }

    /// The host's `mapToTypedAny`: drop top-level `_` keys, coerce top-level strings for
    /// bool/number fields, then strict protojson (unknown keys are errors).
    pub fn typed_from_json(&self, message: &str, json: &Json) -> Result<prost_types::Any, String> {
        let desc = self
            .pool
            .get_message_by_name(message)
            .ok_or_else(|| format!("codec for {message} not found"))?;
        let mut map = match json {
            Json::Object(m) => m.clone(),
            Json::Null => Map::new(),
            other => return Err(format!("config must be a map, got {other}")),
        };
        map.retain(|k, _| !k.starts_with('_'));
        let keys: Vec<String> = map.keys().cloned().collect();
        for k in keys {
            let Some(f) = desc
                .get_field_by_name(&k)
                .or_else(|| desc.get_field_by_json_name(&k))
            else {
                continue;
            };
            if f.is_list() || f.is_map() {
                continue;
            }
            if let Some(Json::String(s)) = map.get(&k).cloned() {
                let numeric = matches!(
                    f.kind(),
                    Kind::Int32
                        | Kind::Int64
                        | Kind::Uint32
                        | Kind::Uint64
                        | Kind::Sint32
                        | Kind::Sint64
                        | Kind::Float
                        | Kind::Double
                        | Kind::Fixed32
                        | Kind::Fixed64
                        | Kind::Sfixed32
                        | Kind::Sfixed64
                );
                if s.is_empty() && (numeric || matches!(f.kind(), Kind::Bool)) {
                    map.remove(&k);
                } else if matches!(f.kind(), Kind::Bool) {
                    match s.to_ascii_lowercase().as_str() {
                        "true" | "1" | "yes" | "on" => {
                            map.insert(k, Json::Bool(true));
                        }
                        "false" | "0" | "no" | "off" => {
                            map.insert(k, Json::Bool(false));
                        }
                        _ => {}
                    }
                } else if numeric {
                    if let Ok(n) = s.parse::<i64>() {
                        map.insert(k, Json::from(n));
                    }
                }
            }
        }
        let msg = DynamicMessage::deserialize(desc, Json::Object(map))
            .map_err(|e| format!("{message}: {e}"))?;
        Ok(prost_types::Any {
            type_url: format!("type.googleapis.com/{message}"),
            value: msg.encode_to_vec(),
        })
    }

    pub fn typed_from_yaml(&self, message: &str, yaml: &str) -> Result<prost_types::Any, String> {
        self.typed_from_json(message, &yaml_to_json(yaml))
    }

    /// The host's step input: pipeline state filtered to the input message's top-level fields.
    pub fn typed_input(&self, message: &str, current: &Json) -> Result<prost_types::Any, String> {
        let desc = self
            .pool
            .get_message_by_name(message)
            .ok_or_else(|| format!("codec for {message} not found"))?;
        let mut filtered = Map::new();
        if let Json::Object(m) = current {
            for (k, v) in m {
                if let Some(f) = desc
                    .get_field_by_name(k)
                    .or_else(|| desc.get_field_by_json_name(k))
                {
                    filtered.insert(f.name().to_string(), v.clone());
                }
            }
        }
        self.typed_from_json(message, &Json::Object(filtered))
    }

    /// protojson with proto names and no unpopulated fields; whole top-level numbers as ints.
    pub fn render_output(&self, message: &str, any: &prost_types::Any) -> Result<Json, String> {
        let name = any.type_url.rsplit('/').next().unwrap_or_default();
        if name != message {
            return Err(format!(
                "typed_output is {}, contract says {message}",
                any.type_url
            ));
        }
        let desc = self.pool.get_message_by_name(message).ok_or("no codec")?;
        let msg = DynamicMessage::decode(desc, any.value.as_slice()).map_err(|e| e.to_string())?;
        let opts = SerializeOptions::new()
            .use_proto_field_name(true)
            .skip_default_fields(true);
        let mut ser = serde_json::Serializer::new(Vec::new());
        msg.serialize_with_options(&mut ser, &opts)
            .map_err(|e| e.to_string())?;
        serde_json::from_slice(&ser.into_inner()).map_err(|e| e.to_string())
    }
}
