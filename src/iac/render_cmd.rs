//! `workflow-plugin-eventbus render <infra.yaml> <out-dir>`: the Kubernetes objects of every
//! `kubernetes` / `aws.eks` broker in an infra file, written as YAML for review (`kubectl diff
//! -R -f`, GitOps) without a cluster and without the engine. The files hold exactly the
//! objects apply sends: the same render, the same JSON, serialized once more as YAML.

use crate::iac::drivers::BROKER_TYPE;
use crate::iac::targets::kubernetes::config::{LABEL_MANAGED_BY, MANAGED_BY};
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

/// The deepest nesting an infra file may have. Real ones stay under ten levels; the YAML
/// parser's time grows with the square of the depth (80,000 nested `[` took 12 s), so the
/// depth is bounded before it parses.
pub const MAX_DEPTH: usize = 64;

/// Refuses text nested deeper than [`MAX_DEPTH`] in flow style (`[`, `{`) or in block
/// sequences opened on one line (`- - - x`), without parsing it: one pass over the text that
/// skips quoted scalars and comments, and may over-count (a `[` inside a plain scalar), never
/// under-count.
fn check_depth(text: &str) -> Result<(), String> {
    let (mut flow, mut line) = (0usize, 1usize);
    let (mut quote, mut comment) = (None::<char>, false);
    let mut dashes = 0usize;
    let mut line_start = true;
    let mut prev = '\n';
    let mut chars = text.chars().peekable();
    let deep = |line: usize| {
        format!("nesting deeper than {MAX_DEPTH} levels at line {line}; an infra file is not nested that deep")
    };
    while let Some(c) = chars.next() {
        if c == '\n' {
            line += 1;
            comment = false;
            line_start = true;
            dashes = 0;
            prev = c;
            continue;
        }
        if comment {
            continue;
        }
        match quote {
            Some('\'') if c == '\'' => {
                if chars.peek() == Some(&'\'') {
                    chars.next();
                } else {
                    quote = None;
                }
            }
            Some('"') if c == '\\' => {
                chars.next();
            }
            Some('"') if c == '"' => quote = None,
            Some(_) => {}
            None => match c {
                '#' if prev.is_whitespace() => comment = true,
                // A quote opens a quoted scalar only where a scalar starts (`don't` is plain).
                '\'' | '"' if prev.is_whitespace() || "[{,:".contains(prev) => quote = Some(c),
                '[' | '{' => {
                    flow += 1;
                    if flow > MAX_DEPTH {
                        return Err(deep(line));
                    }
                }
                ']' | '}' => flow = flow.saturating_sub(1),
                '-' | '?' | ':' if line_start && chars.peek().is_some_and(|n| *n == ' ') => {
                    dashes += 1;
                    if dashes > MAX_DEPTH {
                        return Err(deep(line));
                    }
                }
                ' ' => {}
                _ => line_start = false,
            },
        }
        prev = c;
    }
    Ok(())
}

/// `NN-<kind>.yaml`: numbered in apply order.
fn object_file(i: usize, kind: &str) -> String {
    format!("{:02}-{}.yaml", i + 1, kind.to_ascii_lowercase())
}

/// Whether a file name is one this subcommand writes (`NN-<kind>.yaml`).
fn numbered(name: &str) -> bool {
    name.len() > 8
        && name.as_bytes()[..2].iter().all(u8::is_ascii_digit)
        && name.as_bytes()[2] == b'-'
        && name.ends_with(".yaml")
        && name[3..name.len() - 5]
            .chars()
            .all(|c| c.is_ascii_lowercase())
}

/// The most a file this subcommand wrote can hold (a StatefulSet is a few KiB).
const OURS_MAX: u64 = 1 << 20;

/// What is at `path`: nothing, a file this subcommand wrote (a regular file holding one
/// object labelled `app.kubernetes.io/managed-by: workflow-plugin-eventbus`), or something
/// else (a user's file, a symbolic link, a directory), which is never overwritten or removed.
#[derive(Debug, PartialEq, Eq)]
enum Found {
    Nothing,
    Ours,
    Other(&'static str),
}

fn found(path: &Path) -> std::io::Result<Found> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Found::Nothing),
        Err(e) => return Err(e),
    };
    if m.file_type().is_symlink() {
        return Ok(Found::Other("is a symbolic link"));
    }
    if !m.is_file() || m.len() > OURS_MAX {
        return Ok(Found::Other("was not written by workflow-plugin-eventbus"));
    }
    let mut text = String::new();
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?
        .take(OURS_MAX)
        .read_to_string(&mut text)
        .ok();
    // (bounded like an infra file: a planted deep file must not stall the parser)
    let managed = check_depth(&text)
        .ok()
        .and_then(|_| serde_yaml::from_str::<Json>(&text).ok())
        .and_then(|v| {
            v.pointer("/metadata/labels")
                .and_then(|l| l.get(LABEL_MANAGED_BY))
                .cloned()
        })
        .is_some_and(|v| v == MANAGED_BY);
    Ok(if managed {
        Found::Ours
    } else {
        Found::Other("was not written by workflow-plugin-eventbus (no app.kubernetes.io/managed-by label of it)")
    })
}

/// Files an earlier run wrote for this broker (`NN-<kind>.yaml` carrying our managed-by
/// label) go first: with auth turned off there is no Secret any more, and a stale file would
/// show one in a review or `kubectl diff`. Other files are left alone, a user's numbered file
/// or a symbolic link included.
fn remove_stale(dir: &Path) -> Result<(), RenderCmdError> {
    let err = |source| RenderCmdError::Write {
        path: dir.display().to_string(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let entry = entry.map_err(err)?;
        let name = entry.file_name().to_string_lossy().to_string();
        if numbered(&name) && found(&entry.path()).map_err(err)? == Found::Ours {
            std::fs::remove_file(entry.path()).map_err(err)?;
        }
    }
    Ok(())
}

/// Before anything is written: the broker's directory under `out` is a real directory (or
/// absent), and every file name to be written is free or holds a file of ours. `out` itself
/// is taken as given (a path the user names, like any on a command line, link or not);
/// nothing this subcommand names beneath it is ever followed.
fn check_targets(dir: &Path, files: &[String]) -> Result<(), RenderCmdError> {
    let write_err = |path: &Path, source| RenderCmdError::Write {
        path: path.display().to_string(),
        source,
    };
    crate::iac::files::refuse_link_dir(dir).map_err(|e| write_err(dir, e))?;
    for f in files {
        let path = dir.join(f);
        if let Found::Other(why) = found(&path).map_err(|e| write_err(&path, e))? {
            return Err(RenderCmdError::Shape {
                path: path.display().to_string(),
                message: format!("{why}; not overwriting it (move it away)"),
            });
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
    check_depth(&text).map_err(|message| RenderCmdError::Shape {
        path: path.clone(),
        message,
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
    for (_, r) in &rendered {
        let files: Vec<String> = r
            .objects
            .iter()
            .enumerate()
            .map(|(i, o)| object_file(i, o.kind))
            .collect();
        check_targets(&out.join(&r.names.base), &files)?;
    }
    let mut written = Vec::new();
    for (module, r) in rendered {
        let dir = out.join(&r.names.base);
        let write_err = |path: &Path, source| RenderCmdError::Write {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(out).map_err(|e| write_err(out, e))?;
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(write_err(&dir, e))
            }
            _ => crate::iac::files::refuse_link_dir(&dir).map_err(|e| write_err(&dir, e))?,
        }
        remove_stale(&dir)?;
        for (i, o) in r.objects.iter().enumerate() {
            let file = dir.join(object_file(i, o.kind));
            let yaml = to_yaml(o).map_err(|e| RenderCmdError::Broker(e.to_string()))?;
            // A Secret's file is readable by its owner only: it holds the broker's credentials.
            let mode = if o.kind == "Secret" { 0o600 } else { 0o644 };
            crate::iac::files::write_file(&file, yaml.as_bytes(), mode)
                .map_err(|e| write_err(&file, e))?;
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
