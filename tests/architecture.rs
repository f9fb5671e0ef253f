//! Architecture rules the compiler does not enforce, checked by reading `src/`:
//! no two files import each other (directly or through a ring of files), the IaC face uses
//! nothing from the runtime face, and the runtime modules use nothing from the IaC face.
//! An edge is any `crate::…` or `super::…` path in a file (tests at its end excluded), resolved
//! to the file that defines the named module; a parent's `mod child;` line is not an edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`["iac", "plan"]`) of every library file under `src/`.
fn modules() -> BTreeMap<Vec<String>, PathBuf> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<Vec<String>, PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("src/ is readable")
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            let name = p
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if p.is_dir() {
                let mut pre = prefix.to_vec();
                pre.push(name);
                walk(&p, &pre, out);
            } else if let Some(stem) = name.strip_suffix(".rs") {
                let mut m = prefix.to_vec();
                match stem {
                    "mod" | "lib" => {}
                    "main" if prefix.is_empty() => continue,
                    _ => m.push(stem.to_string()),
                }
                out.insert(m, p);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(&src(), &[], &mut out);
    out
}

/// The file's text up to its unit-test module (tests may reach anywhere).
fn body(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source file is readable");
    let cut = text.find("#[cfg(test)]\nmod tests").unwrap_or(text.len());
    // Line comments may mention paths without using them.
    text[..cut]
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path a `use` tree or expression names, starting at `i` just after `crate::`/`super::`;
/// brace groups expand into one path per leaf.
fn paths_at(s: &str, mut i: usize, prefix: Vec<String>, out: &mut Vec<Vec<String>>) -> usize {
    let b = s.as_bytes();
    let mut path = prefix;
    loop {
        while i < b.len() && (b[i] as char).is_whitespace() {
            i += 1;
        }
        if i < b.len() && b[i] == b'{' {
            i += 1;
            loop {
                i = paths_at(s, i, path.clone(), out);
                while i < b.len() && (b[i] as char).is_whitespace() {
                    i += 1;
                }
                if i < b.len() && b[i] == b',' {
                    i += 1;
                    continue;
                }
                if i < b.len() && b[i] == b'}' {
                    i += 1;
                }
                return i;
            }
        }
        let start = i;
        while i < b.len() && is_ident(b[i] as char) {
            i += 1;
        }
        if start == i {
            out.push(path);
            return i;
        }
        path.push(s[start..i].to_string());
        if s[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The files `module` (defined in a `mod.rs` when `is_mod`) refers to.
fn edges(
    module: &[String],
    is_mod: bool,
    text: &str,
    mods: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeSet<Vec<String>> {
    let mut found = Vec::new();
    for (at, _) in text.match_indices("crate::") {
        if at > 0 && is_ident(text[..at].chars().last().unwrap_or(' ')) {
            continue;
        }
        paths_at(text, at + "crate::".len(), Vec::new(), &mut found);
    }
    for (at, _) in text.match_indices("super::") {
        if at > 0 && is_ident(text[..at].chars().last().unwrap_or(' ')) {
            continue;
        }
        // `super` of a file module is its folder's module; of a mod.rs, the folder's parent.
        let mut base = module.to_vec();
        if !is_mod || !base.is_empty() {
            base.pop();
        }
        let mut rest = &text[at + "super::".len()..];
        let mut skip = at + "super::".len();
        while rest.starts_with("super::") {
            base.pop();
            rest = &rest["super::".len()..];
            skip += "super::".len();
        }
        paths_at(text, skip, base, &mut found);
    }
    let mut out = BTreeSet::new();
    for p in found {
        // The longest prefix that is a file is the target.
        let target = (0..=p.len())
            .rev()
            .map(|n| p[..n].to_vec())
            .find(|m| mods.contains_key(m));
        if let Some(t) = target {
            if t != module && !t.is_empty() {
                out.insert(t);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules();
    mods.iter()
        .map(|(m, path)| {
            let is_mod = path
                .file_name()
                .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
            (m.clone(), edges(m, is_mod, &body(path), &mods))
        })
        .collect()
}

fn name(m: &[String]) -> String {
    format!("crate::{}", m.join("::"))
}

/// Strongly connected components with more than one file (Tarjan).
fn rings(g: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on: BTreeSet<&'a Vec<String>>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a Vec<String>) {
        t.index.insert(v, t.next);
        t.low.insert(v, t.next);
        t.next += 1;
        t.stack.push(v);
        t.on.insert(v);
        let g = t.g;
        for w in g.get(v).into_iter().flatten() {
            let Some((w, _)) = g.get_key_value(w) else {
                continue;
            };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(lw));
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low[v];
                t.low.insert(v, lv.min(iw));
            }
        }
        if t.low[v] == t.index[v] {
            let mut ring = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                ring.push(name(w));
                if w == v {
                    break;
                }
            }
            if ring.len() > 1 {
                ring.sort();
                t.out.push(ring);
            }
        }
    }
    let mut t = T {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_two_files_import_each_other() {
    let g = graph();
    assert!(g.len() > 20, "the scan found the source files");
    let found = rings(&g);
    assert!(found.is_empty(), "import rings in src/: {found:#?}");
}

fn starts(m: &[String], prefix: &[&str]) -> bool {
    m.len() >= prefix.len() && m.iter().zip(prefix).all(|(a, b)| a == b)
}

/// Imports from the IaC face into the runtime that remain: the runtime's vocabulary of type
/// names (`types`). Config decoding, its problems and the broker spec live in `config`, under
/// both faces. The list may only shrink: a new edge fails, and so does a listed edge that is
/// gone (delete it here).
const KNOWN_CROSSINGS: &[&str] = &["crate::iac::drivers::values -> crate::runtime::types"];

#[test]
fn faces_keep_their_direction() {
    let mut found = BTreeSet::new();
    for (from, tos) in graph() {
        for to in tos {
            let iac_to_runtime = starts(&from, &["iac"]) && starts(&to, &["runtime"]);
            let runtime_to_iac = starts(&from, &["runtime"]) && starts(&to, &["iac"]);
            if iac_to_runtime || runtime_to_iac {
                found.insert(format!("{} -> {}", name(&from), name(&to)));
            }
        }
    }
    let known: BTreeSet<String> = KNOWN_CROSSINGS.iter().map(|s| s.to_string()).collect();
    let new: Vec<_> = found.difference(&known).collect();
    assert!(new.is_empty(), "new imports across faces: {new:#?}");
    let gone: Vec<_> = known.difference(&found).collect();
    assert!(
        gone.is_empty(),
        "no longer imported, remove from KNOWN_CROSSINGS: {gone:#?}"
    );
}

/// The scanner itself: a ring written into the text is found.
#[test]
fn the_scanner_sees_grouped_and_relative_paths() {
    let mods: BTreeMap<Vec<String>, PathBuf> = [
        vec!["a".to_string()],
        vec!["a".to_string(), "b".to_string()],
        vec!["c".to_string()],
    ]
    .into_iter()
    .map(|m| (m, PathBuf::new()))
    .collect();
    let e = edges(
        &["a".to_string(), "b".to_string()],
        false,
        "use crate::{c::X, a::{self}};\nfn f() { super::g() }",
        &mods,
    );
    assert_eq!(
        e,
        [vec!["a".to_string()], vec!["c".to_string()]]
            .into_iter()
            .collect()
    );
}
