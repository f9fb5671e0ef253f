//! Architecture rules the compiler does not enforce, checked by reading `src/`:
//! no two files import each other (directly or through a ring of files), the IaC face uses
//! nothing from the runtime face, the runtime modules use nothing from the IaC face, and
//! `config/` (under every provider) imports no provider module.
//! An edge is any `crate::…`, `super::…` or `self::…` path in a file (tests at its end
//! excluded), any path starting at a child module by its bare name (`api::X` in a `mod.rs`),
//! and any path through a name a `use` brought in (`use super::pg;` then `pg::spec::X`), each
//! resolved to the file that defines the named module; a parent's `mod child;` line is not an
//! edge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Module path (`["iac", "plan"]`) of every library file under `root`.
fn modules(root: &Path) -> BTreeMap<Vec<String>, PathBuf> {
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
    walk(root, &[], &mut out);
    out
}

/// The file's text up to its unit-test module (tests may reach anywhere).
fn body(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("source file is readable");
    // Test-only modules (`#[cfg(test)]` then `mod …`, public or not) end the part scanned.
    let cut = text
        .match_indices("#[cfg(test)]\n")
        .find(|(at, m)| {
            let next = text[at + m.len()..].trim_start();
            let next = next
                .strip_prefix("pub(crate) ")
                .or_else(|| next.strip_prefix("pub "))
                .unwrap_or(next);
            next.starts_with("mod ")
        })
        .map_or(text.len(), |(at, _)| at);
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

/// Where `ident` starts when `text[..end]` ends with one that is not itself the tail of a
/// path (`a::ident`), a field (`x.ident`) or a macro variable (`$ident`).
fn bare_ident_before(text: &str, end: usize) -> Option<usize> {
    let b = text.as_bytes();
    let mut start = end;
    while start > 0 && is_ident(b[start - 1] as char) {
        start -= 1;
    }
    if start == end || b[start].is_ascii_digit() {
        return None;
    }
    if start > 0 && matches!(b[start - 1], b':' | b'.' | b'$') {
        return None;
    }
    Some(start)
}

/// Names a module re-exports (`pub use child::X;`), each with the path it stands for.
type Exports = BTreeMap<Vec<String>, BTreeMap<String, Vec<String>>>;

/// The files `module` (defined in a `mod.rs` when `is_mod`) refers to.
fn edges(
    module: &[String],
    is_mod: bool,
    text: &str,
    mods: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeSet<Vec<String>> {
    let found = paths(module, is_mod, text, mods, &BTreeMap::new());
    resolve(module, found, mods, &Exports::new())
}

/// Where the file's `pub use` statements are (`pub`/`pub(crate)`/… through `;`).
fn reexport_spans(text: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (at, _) in text.match_indices("pub") {
        let line_start = text[..at].rfind('\n').map_or(0, |n| n + 1);
        if !text[line_start..at].trim().is_empty() {
            continue;
        }
        let mut rest = &text[at + "pub".len()..];
        if rest.starts_with('(') {
            let Some(close) = rest.find(')') else {
                continue;
            };
            rest = &rest[close + 1..];
        }
        if !rest.starts_with(" use ") {
            continue;
        }
        let end = text[at..].find(';').map_or(text.len(), |e| at + e + 1);
        out.push((at, end));
    }
    out
}

/// The file without its `pub use` statements: a re-export renames, it does not use (whoever
/// imports the name is led to the file that defines it, `resolve`).
fn without_reexports(text: &str) -> String {
    let mut out = text.to_string();
    for (a, b) in reexport_spans(text) {
        out.replace_range(a..b, &" ".repeat(b - a));
    }
    out
}

/// Whether `ident` occurs in `text` as a whole identifier.
fn mentions(text: &str, ident: &str) -> bool {
    text.match_indices(ident).any(|(at, _)| {
        let before = text[..at].chars().last().is_some_and(is_ident);
        let after = text[at + ident.len()..]
            .chars()
            .next()
            .is_some_and(is_ident);
        !before && !after
    })
}

/// The `pub use` statements of a file, as (exported name, path it stands for).
fn exports(
    module: &[String],
    is_mod: bool,
    text: &str,
    mods: &BTreeMap<Vec<String>, PathBuf>,
) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (a, b) in reexport_spans(text) {
        let stmt = &text[a..b];
        let Some(u) = stmt.find(" use ") else {
            continue;
        };
        let stmt = &stmt[u + " use ".len()..];
        for mut p in paths(module, is_mod, stmt, mods, &BTreeMap::new()) {
            if p.last().is_some_and(|l| l == "self") {
                p.pop();
            }
            if let Some(last) = p.last() {
                out.insert(last.clone(), p.clone());
            }
        }
    }
    out
}

/// Every path a file names, made absolute; `names` are modules the file brought in by name
/// elsewhere (its re-exports).
fn paths(
    module: &[String],
    is_mod: bool,
    text: &str,
    mods: &BTreeMap<Vec<String>, PathBuf>,
    names: &BTreeMap<String, Vec<String>>,
) -> Vec<Vec<String>> {
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
        if text[..at].ends_with("::") {
            continue; // `super::super::`: read from the first one
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
    for (at, _) in text.match_indices("self::") {
        if bare_ident_before(text, at + "self".len()) != Some(at) {
            continue;
        }
        paths_at(text, at + "self::".len(), module.to_vec(), &mut found);
    }
    // Names that reach a module without a `crate`/`super`/`self` in front: the module's
    // children, and the modules a `use` (or a path) above named by their last segment.
    let mut local: BTreeMap<String, Vec<String>> = mods
        .keys()
        .filter(|m| m.len() == module.len() + 1 && m.starts_with(module))
        .map(|m| (m[module.len()].clone(), m.clone()))
        .chain(
            names
                .iter()
                .filter(|(_, p)| mods.contains_key(*p))
                .map(|(n, p)| (n.clone(), p.clone())),
        )
        .collect();
    for p in &found {
        let mut p = p.clone();
        if p.last().is_some_and(|l| l == "self") {
            p.pop();
        }
        if mods.contains_key(&p) && !p.is_empty() {
            local.insert(p[p.len() - 1].clone(), p);
        }
    }
    for (at, _) in text.match_indices("::") {
        let Some(start) = bare_ident_before(text, at) else {
            continue;
        };
        let ident = &text[start..at];
        if matches!(ident, "crate" | "super" | "self" | "Self") {
            continue;
        }
        if let Some(base) = local.get(ident) {
            paths_at(text, at + "::".len(), base.clone(), &mut found);
        }
    }
    found
}

/// The files `found` paths name: the longest prefix that is a file, followed through the
/// re-exports of a folder's module (`crate::nats::NatsError` is `nats/error.rs` when
/// `nats/mod.rs` says `pub use error::NatsError;`).
fn resolve(
    module: &[String],
    found: Vec<Vec<String>>,
    mods: &BTreeMap<Vec<String>, PathBuf>,
    exports: &Exports,
) -> BTreeSet<Vec<String>> {
    let file = |p: &[String]| {
        (0..=p.len())
            .rev()
            .map(|n| p[..n].to_vec())
            .find(|m| mods.contains_key(m))
    };
    let mut out = BTreeSet::new();
    for mut p in found {
        let mut target = file(&p);
        for _ in 0..8 {
            let Some(t) = &target else { break };
            let Some(via) = p.get(t.len()).and_then(|n| exports.get(t)?.get(n)) else {
                break;
            };
            if via.starts_with(t) && via.len() == t.len() + 1 && !mods.contains_key(via) {
                break; // `pub use self::X`-like: defined here
            }
            p = via.iter().chain(&p[t.len() + 1..]).cloned().collect();
            target = file(&p);
        }
        if let Some(t) = target {
            if t != module && !t.is_empty() {
                out.insert(t);
            }
        }
    }
    out
}

fn graph() -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    graph_of(&src())
}

fn graph_of(root: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mods = modules(root);
    let files: Vec<(&Vec<String>, bool, String)> = mods
        .iter()
        .map(|(m, path)| {
            let is_mod = path
                .file_name()
                .is_some_and(|n| n == "mod.rs" || n == "lib.rs");
            (m, is_mod, body(path))
        })
        .collect();
    let exports: Exports = files
        .iter()
        .map(|(m, is_mod, text)| ((*m).clone(), exports(m, *is_mod, text, &mods)))
        .collect();
    files
        .iter()
        .map(|(m, is_mod, text)| {
            let text = without_reexports(text);
            let mut found = paths(m, *is_mod, &text, &mods, &exports[*m]);
            // A re-exported name the file itself uses is a use.
            found.extend(
                exports[*m]
                    .iter()
                    .filter(|(n, _)| mentions(&text, n))
                    .map(|(_, p)| p.clone()),
            );
            ((*m).clone(), resolve(m, found, &mods, &exports))
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

/// The provider modules: what a provider-neutral layer (`config/`) must not import.
const PROVIDERS: &[&str] = &["nats", "pg", "kafka", "kinesis"];

#[test]
fn config_imports_no_provider() {
    let mut found = Vec::new();
    for (from, tos) in graph() {
        if !starts(&from, &["config"]) {
            continue;
        }
        for to in tos {
            if PROVIDERS.iter().any(|p| starts(&to, &[p])) {
                found.push(format!("{} -> {}", name(&from), name(&to)));
            }
        }
    }
    assert!(found.is_empty(), "config/ imports a provider: {found:#?}");
}

fn starts(m: &[String], prefix: &[&str]) -> bool {
    m.len() >= prefix.len() && m.iter().zip(prefix).all(|(a, b)| a == b)
}

/// Imports from the IaC face into the runtime that remain: the runtime's vocabulary of type
/// names (`types`). Config decoding, its problems and the broker spec live in `config`, under
/// both faces. The list may only shrink: a new edge fails, and so does a listed edge that is
/// gone (delete it here).
const KNOWN_CROSSINGS: &[&str] = &["crate::iac::values -> crate::runtime::types"];

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

/// The checker on a small tree written for it: rings that close through a `mod.rs` naming a
/// child by its bare name, through `self::`, and through a name a `use` brought in are found;
/// the same tree without the closing edge has none.
#[test]
fn the_checker_finds_rings_through_child_paths() {
    fn tree(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        dir
    }
    let ring_of = |files: &[(&str, &str)]| {
        let dir = tree(files);
        rings(&graph_of(dir.path()))
    };
    let base = [
        ("lib.rs", "pub mod drivers;\npub mod targets;\n"),
        (
            "drivers/mod.rs",
            "pub struct Ctx;\npub fn run() { crate::targets::pick(); }\n",
        ),
        (
            "targets/local.rs",
            "use crate::drivers::Ctx;\npub fn go(_: &Ctx) {}\n",
        ),
    ];
    // A `mod.rs` using a child by its bare name.
    let mut files = base.to_vec();
    files.push((
        "targets/mod.rs",
        "mod local;\npub fn pick() -> fn(&crate::drivers::Ctx) { local::go }\n",
    ));
    let want = vec![vec![
        "crate::drivers".to_string(),
        "crate::targets".to_string(),
        "crate::targets::local".to_string(),
    ]];
    assert_eq!(ring_of(&files), want, "bare child path");
    // Through `self::`.
    files[3].1 = "mod local;\npub fn pick() { self::local::go(&crate::drivers::Ctx) }\n";
    assert_eq!(ring_of(&files), want, "self:: path");
    // Through a name a `use` brought in: `targets` is the folder's module, whose `mod local;`
    // is no edge, so only `targets::local::go` reaches the file that closes the ring.
    let files = [
        ("lib.rs", "pub mod drivers;\npub mod targets;\n"),
        (
            "drivers/mod.rs",
            "use crate::targets;\npub struct Ctx;\npub fn run() { targets::local::go(&Ctx) }\n",
        ),
        ("targets/mod.rs", "pub mod local;\n"),
        (
            "targets/local.rs",
            "use crate::drivers::Ctx;\npub fn go(_: &Ctx) {}\n",
        ),
    ];
    assert_eq!(
        ring_of(&files),
        vec![vec![
            "crate::drivers".to_string(),
            "crate::targets::local".to_string(),
        ]],
        "use alias"
    );
    // No edge back from the targets: no ring. A field or a foreign path that spells a child's
    // name is not an edge, nor is a re-export (`pub use local::go;`: who imports `go` from
    // `targets` is led to `local`).
    let files = [
        ("lib.rs", "pub mod drivers;\npub mod targets;\n"),
        (
            "drivers/mod.rs",
            "pub struct Ctx;\npub fn run() { crate::targets::pick(); }\n",
        ),
        (
            "targets/mod.rs",
            "mod local;\npub use local::go;\npub fn pick() { x.local::<u8>(); std::local::f(); }\n",
        ),
        ("targets/local.rs", "pub fn go() { super::pick() }\n"),
    ];
    assert!(ring_of(&files).is_empty(), "{:#?}", ring_of(&files));
    let mut files = files.to_vec();
    files[1].1 = "pub struct Ctx;\npub fn run() { crate::targets::go(); }\n";
    files[3].1 = "pub fn go() { crate::drivers::run() }\n";
    assert_eq!(
        ring_of(&files),
        vec![vec![
            "crate::drivers".to_string(),
            "crate::targets::local".to_string(),
        ]],
        "through a re-export"
    );
    // A re-export whose name the file uses itself is a use.
    let mut files = files.to_vec();
    files[1].1 = "pub struct Ctx;\npub fn run() { crate::targets::pick(); }\n";
    files[2].1 = "mod local;\npub use local::go;\npub fn pick() { go() }\n";
    files[3].1 = "pub fn go() { crate::drivers::run() }\n";
    assert_eq!(ring_of(&files), want, "a re-exported name in use");
}
