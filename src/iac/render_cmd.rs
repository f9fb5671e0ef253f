//! `workflow-plugin-eventbus render <infra.yaml> <out-dir>`: the Kubernetes objects of every
//! `kubernetes` / `aws.eks` broker in an infra file, written as YAML for review (`kubectl diff
//! -R -f`, GitOps) without a cluster and without the engine. The files hold exactly the
//! objects apply sends: the same render, the same JSON, serialized once more as YAML.

use crate::iac::drivers::BROKER_TYPE;
use crate::iac::targets::kubernetes::{render, to_yaml, Flavor};
use crate::iac::targets::BrokerDesired;
use serde_json::Value as Json;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum RenderCmdError {
    #[error("usage: workflow-plugin-eventbus render <infra.yaml> <out-dir>")]
    Usage,
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not YAML: {source}")]
    Yaml {
        path: String,
        source: serde_yaml::Error,
    },
    #[error("{path}: {message}")]
    Shape { path: String, message: String },
    #[error("{0}")]
    Broker(String),
    #[error("{path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// One file written: the broker module, the object and where it went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub module: String,
    pub kind: String,
    pub name: String,
    pub path: PathBuf,
}

/// `${NAME}` from the environment, as wfctl expands an infra file before the provider sees it;
/// an unset variable is an error (an empty token would render a broken Secret).
fn expand(module: &str, v: &mut Json) -> Result<(), RenderCmdError> {
    match v {
        Json::String(s) => {
            let mut out = String::new();
            let mut rest = s.as_str();
            while let Some(at) = rest.find("${") {
                out.push_str(&rest[..at]);
                let after = &rest[at + 2..];
                let Some(end) = after.find('}') else {
                    out.push_str(&rest[at..]);
                    rest = "";
                    break;
                };
                let name = &after[..end];
                let ok = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !ok {
                    out.push_str(&rest[at..at + 2 + end + 1]);
                } else {
                    match std::env::var(name) {
                        Ok(value) => out.push_str(&value),
                        Err(_) => {
                            return Err(RenderCmdError::Broker(format!(
                            "{BROKER_TYPE} {module:?}: ${{{name}}} is not set in the environment"
                        )))
                        }
                    }
                }
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Json::Array(a) => {
            for x in a {
                expand(module, x)?;
            }
        }
        Json::Object(m) => {
            for x in m.values_mut() {
                expand(module, x)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn write_file(path: &Path, text: &str, private: bool) -> Result<(), RenderCmdError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| RenderCmdError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        // A Secret's file is readable by its owner only: it holds the broker's credentials.
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

/// `NN-<kind>.yaml`: numbered in apply order.
fn object_file(i: usize, kind: &str) -> String {
    format!("{:02}-{}.yaml", i + 1, kind.to_ascii_lowercase())
}

/// Files an earlier run wrote for this broker (`NN-<kind>.yaml`) go first: with auth turned off
/// there is no Secret any more, and a stale file would show one in a review or `kubectl diff`.
/// Other files in the directory are left alone.
fn remove_stale(dir: &Path) -> Result<(), RenderCmdError> {
    let err = |source| RenderCmdError::Write {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = name.len() > 8
            && name.as_bytes()[..2].iter().all(u8::is_ascii_digit)
            && name.as_bytes()[2] == b'-'
            && name.ends_with(".yaml")
            && name[3..name.len() - 5]
                .chars()
                .all(|c| c.is_ascii_lowercase());
        if ours && entry.file_type().map_err(err)?.is_file() {
            std::fs::remove_file(entry.path()).map_err(err)?;
        }
    }
    Ok(())
}

/// Renders every kubernetes / aws.eks broker of `infra` into `<out>/<broker name base>/`,
/// one `NN-<kind>.yaml` per object in apply order. Nothing is written unless every broker
/// renders.
pub fn run(infra: &Path, out: &Path) -> Result<Vec<Written>, RenderCmdError> {
    let path = infra.display().to_string();
    let text = std::fs::read_to_string(infra).map_err(|source| RenderCmdError::Read {
        path: path.clone(),
        source,
    })?;
    let doc: Json = serde_yaml::from_str(&text).map_err(|source| RenderCmdError::Yaml {
        path: path.clone(),
        source,
    })?;
    let shape = |message: String| RenderCmdError::Shape {
        path: path.clone(),
        message,
    };
    let modules = match doc.get("modules") {
        Some(Json::Array(m)) => m.clone(),
        Some(_) => {
            return Err(shape(
                "modules must be a list of {name, type, config}".into(),
            ))
        }
        None => {
            return Err(shape(
                "no modules list (an infra file lists modules: [{name, type, config}])".into(),
            ))
        }
    };
    let mut rendered = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        if m.get("type").and_then(Json::as_str) != Some(BROKER_TYPE) {
            continue;
        }
        let Some(name) = m.get("name").and_then(Json::as_str) else {
            return Err(shape(format!(
                "modules[{i}]: {BROKER_TYPE} module without a name"
            )));
        };
        let mut config = match m.get("config") {
            Some(c @ Json::Object(_)) => c.clone(),
            None | Some(Json::Null) => Json::Object(Default::default()),
            Some(_) => {
                return Err(shape(format!(
                    "modules[{i}] ({name}): config must be a mapping"
                )))
            }
        };
        let flavor = match config.get("deploy_target").and_then(Json::as_str) {
            Some("kubernetes") => Flavor::Kubernetes,
            Some("aws.eks") => Flavor::Eks,
            _ => continue,
        };
        expand(name, &mut config)?;
        let bytes = serde_json::to_vec(&config).map_err(|e| shape(e.to_string()))?;
        let r = BrokerDesired::decode(name, &bytes)
            .and_then(|d| render(name, &d, flavor))
            .map_err(|e| RenderCmdError::Broker(crate::error_chain::render(&e)))?;
        rendered.push((name.to_string(), r));
    }
    if rendered.is_empty() {
        return Err(shape(format!(
            "no {BROKER_TYPE} module with deploy_target kubernetes or aws.eks"
        )));
    }
    let mut written = Vec::new();
    for (module, r) in rendered {
        let dir = out.join(&r.names.base);
        std::fs::create_dir_all(&dir).map_err(|source| RenderCmdError::Write {
            path: dir.display().to_string(),
            source,
        })?;
        remove_stale(&dir)?;
        for (i, o) in r.objects.iter().enumerate() {
            let file = dir.join(object_file(i, o.kind));
            let yaml = to_yaml(o).map_err(|e| RenderCmdError::Broker(e.to_string()))?;
            write_file(&file, &yaml, o.kind == "Secret")?;
            written.push(Written {
                module: module.clone(),
                kind: o.kind.to_string(),
                name: o.name.clone(),
                path: file,
            });
        }
    }
    Ok(written)
}

/// The subcommand: arguments after `render`; prints what it wrote, one line per file, and
/// returns the exit code (errors are one line per problem on stderr).
pub fn main(args: &[String]) -> i32 {
    let result = match args {
        [infra, out] => run(Path::new(infra), Path::new(out)),
        _ => Err(RenderCmdError::Usage),
    };
    match result {
        Ok(written) => {
            for w in written {
                println!("{} {} {}/{}", w.path.display(), w.module, w.kind, w.name);
            }
            0
        }
        Err(e) => {
            for line in crate::error_chain::render(&e).lines() {
                eprintln!("render: {line}");
            }
            if matches!(e, RenderCmdError::Usage) {
                2
            } else {
                1
            }
        }
    }
}
