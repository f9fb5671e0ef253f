//! plugin.json, plugin.contracts.json, the runtime registry and the README must agree, and the
//! static files must pass the rules wfctl's `--strict-contracts` audit applies.

use eventbus_plugin::pb::plugin::{ContractKind, ContractMode};
use eventbus_plugin::runtime::{schema, types};
use serde_json::Value;
use std::collections::BTreeSet;

fn read(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn plugin_json_matches_runtime_type_lists() {
    let m = read("plugin.json");
    let caps = &m["capabilities"];
    assert!(caps.is_object(), "capabilities must be the object form");
    assert_eq!(
        strings(&caps["moduleTypes"]),
        types::module_type_names().into_iter().collect()
    );
    assert_eq!(
        strings(&caps["stepTypes"]),
        types::step_type_names().into_iter().collect()
    );
    assert_eq!(
        strings(&caps["triggerTypes"]),
        types::trigger_type_names().into_iter().collect()
    );
    assert_eq!(m["version"], env!("CARGO_PKG_VERSION"));
    let name = m["name"].as_str().unwrap();
    assert!(name.chars().next().unwrap().is_ascii_lowercase());
    assert!(name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    for key in ["author", "description", "license", "minEngineVersion"] {
        assert!(m[key].as_str().is_some_and(|s| !s.is_empty()), "{key}");
    }
    assert!(
        m.get("moduleTypes").is_none(),
        "no legacy top-level type lists"
    );
    for d in m["downloads"].as_array().unwrap() {
        assert!(["linux", "darwin", "windows"].contains(&d["os"].as_str().unwrap()));
        assert!(["amd64", "arm64"].contains(&d["arch"].as_str().unwrap()));
        assert!(d["url"]
            .as_str()
            .unwrap()
            .contains(&format!("v{}", env!("CARGO_PKG_VERSION"))));
    }
    // IaC services advertised in plugin.json are served (SERVICE descriptors at runtime).
    let advertised = strings(&m["capabilities"]["iacServices"]);
    let served: BTreeSet<String> = schema::contract_descriptors()
        .into_iter()
        .filter(|d| d.kind == ContractKind::Service as i32)
        .map(|d| d.service_name)
        .collect();
    assert_eq!(advertised, served);
}

fn normalise_kind(k: &str) -> &'static str {
    match k.to_ascii_lowercase().as_str() {
        "module" | "modules" | "contract_kind_module" => "module",
        "step" | "steps" | "contract_kind_step" => "step",
        "trigger" | "triggers" | "contract_kind_trigger" => "trigger",
        "service" | "service_method" | "contract_kind_service" => "service",
        _ => "unknown",
    }
}

#[test]
fn contracts_json_is_strict_for_every_advertised_type_and_matches_the_registry() {
    let c = read("plugin.contracts.json");
    let mut file: BTreeSet<(String, String, String, String, String)> = BTreeSet::new();
    for d in c["contracts"].as_array().unwrap() {
        let kind = normalise_kind(d["kind"].as_str().unwrap());
        assert_ne!(kind, "unknown", "{d}");
        let mode = d["mode"].as_str().unwrap().to_ascii_lowercase();
        assert!(
            [
                "strict",
                "strict_proto",
                "strict_contract",
                "typed",
                "contract_mode_strict_proto"
            ]
            .contains(&mode.as_str()),
            "{d}"
        );
        let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
        file.insert((kind.into(), s("type"), s("config"), s("input"), s("output")));
    }
    let mut runtime = BTreeSet::new();
    for d in schema::contract_descriptors() {
        assert_eq!(d.mode, ContractMode::StrictProto as i32);
        let (kind, ty) = match ContractKind::try_from(d.kind).unwrap() {
            ContractKind::Module => ("module", d.module_type.clone()),
            ContractKind::Step => ("step", d.step_type.clone()),
            ContractKind::Trigger => ("trigger", d.trigger_type.clone()),
            ContractKind::Service => continue,
            other => panic!("unexpected {other:?}"),
        };
        runtime.insert((
            kind.to_string(),
            ty,
            d.config_message,
            d.input_message,
            d.output_message,
        ));
    }
    assert_eq!(
        file, runtime,
        "plugin.contracts.json and GetContractRegistry disagree"
    );
    // wfctl audit: every advertised type has a descriptor of its kind.
    let m = read("plugin.json");
    for (key, kind) in [
        ("moduleTypes", "module"),
        ("stepTypes", "step"),
        ("triggerTypes", "trigger"),
    ] {
        for t in strings(&m["capabilities"][key]) {
            assert!(
                file.iter().any(|(k, ty, ..)| k == kind && *ty == t),
                "missing_{kind}_contract_descriptor for {t}"
            );
        }
    }
}

#[test]
fn readme_documents_every_type() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    for t in types::module_type_names()
        .into_iter()
        .chain(types::step_type_names())
        .chain(types::trigger_type_names())
    {
        assert!(readme.contains(&t), "README does not mention {t}");
    }
}

#[test]
fn plugin_json_declares_the_iac_provider_wfctl_discovers() {
    let m = read("plugin.json");
    let types: BTreeSet<String> = types::IAC_RESOURCE_TYPES
        .iter()
        .map(|s| s.to_string())
        .collect();
    // wfctl's discovery reads the object form capabilities.iacProvider.name.
    assert_eq!(m["capabilities"]["iacProvider"]["name"], "eventbus");
    assert_eq!(
        strings(&m["capabilities"]["iacProvider"]["resourceTypes"]),
        types
    );
    assert_eq!(m["iacProvider"]["name"], "eventbus");
    assert_eq!(m["iacProvider"]["computePlanVersion"], "v2");
    assert_eq!(strings(&m["iacProvider"]["resourceTypes"]), types);
    for required in [
        "workflow.plugin.external.iac.IaCProviderRequired",
        "workflow.plugin.external.iac.ResourceDriver",
    ] {
        assert!(
            strings(&m["capabilities"]["iacServices"]).contains(required),
            "{required}"
        );
    }
}
