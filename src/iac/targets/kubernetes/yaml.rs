//! The YAML that `render` writes: block style as kubectl prints it, every string that a YAML
//! 1.1 reader (kubectl's go-yaml v2, PyYAML) or a YAML 1.2 reader would take for anything but a
//! string written double-quoted. A label value `yes`, `on`, `NO` or `1_000` is a string to the
//! API server, and stays one in the file: plain, a 1.1 reader makes it a bool or an integer and
//! the apply is refused (issue 19 finding 7).

use serde_json::Value as Json;

/// `v` (an object as apply sends it) as one YAML document.
pub fn to_yaml(v: &Json) -> String {
    let mut out = String::new();
    match v {
        Json::Object(m) if !m.is_empty() => map(&mut out, m, 0),
        Json::Array(a) if !a.is_empty() => seq(&mut out, a, 0),
        other => {
            out.push_str(&scalar(other, 0));
            out.push('\n');
        }
    }
    out
}

fn pad(out: &mut String, n: usize) {
    out.extend(std::iter::repeat_n(' ', n));
}

fn map(out: &mut String, m: &serde_json::Map<String, Json>, indent: usize) {
    for (k, v) in m {
        pad(out, indent);
        if plain_ok(k) {
            out.push_str(k);
        } else {
            out.push_str(&serde_json::to_string(k).unwrap_or_else(|_| "\"\"".into()));
        }
        out.push(':');
        match v {
            Json::Object(inner) if !inner.is_empty() => {
                out.push('\n');
                map(out, inner, indent + 2);
            }
            // As kubectl (libyaml) writes it: a sequence under a key is not indented.
            Json::Array(items) if !items.is_empty() => {
                out.push('\n');
                seq(out, items, indent);
            }
            other => {
                out.push(' ');
                out.push_str(&scalar(other, indent + 2));
                out.push('\n');
            }
        }
    }
}

fn seq(out: &mut String, items: &[Json], indent: usize) {
    for v in items {
        match v {
            Json::Object(_) | Json::Array(_) if !empty(v) => {
                // The nested block at indent + 2, its first line's indentation becoming "- ".
                let mut inner = String::new();
                match v {
                    Json::Object(m) => map(&mut inner, m, indent + 2),
                    Json::Array(a) => seq(&mut inner, a, indent + 2),
                    _ => {}
                }
                pad(out, indent);
                out.push_str("- ");
                out.push_str(&inner[indent + 2..]);
            }
            other => {
                pad(out, indent);
                out.push_str("- ");
                out.push_str(&scalar(other, indent + 2));
                out.push('\n');
            }
        }
    }
}

fn empty(v: &Json) -> bool {
    match v {
        Json::Object(m) => m.is_empty(),
        Json::Array(a) => a.is_empty(),
        _ => false,
    }
}

/// A scalar, or an empty collection, in place; `indent` is where a block's content goes.
fn scalar(v: &Json, indent: usize) -> String {
    match v {
        Json::Null => "null".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => string(s, indent),
        Json::Object(_) => "{}".into(),
        Json::Array(_) => "[]".into(),
    }
}

/// A string: plain when every reader takes it for this string, a literal block for text of
/// several lines, double-quoted (JSON escapes are YAML escapes) otherwise.
fn string(s: &str, indent: usize) -> String {
    if s.contains('\n') {
        if let Some(block) = literal(s, indent) {
            return block;
        }
    } else if plain_ok(s) {
        return s.to_string();
    }
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// `|` (one final newline), `|-` (none) or `|+` (several) with the lines at `indent`; `None`
/// when a literal block cannot hold `s` as is.
fn literal(s: &str, indent: usize) -> Option<String> {
    let printable = s
        .chars()
        .all(|c| c == '\n' || c == '\t' || !(c.is_control() || c == '\u{feff}'));
    if !printable || s.starts_with([' ', '\t', '\n']) {
        return None;
    }
    let body = s.trim_end_matches('\n');
    let chomp = match s.len() - body.len() {
        0 => "-",
        1 => "",
        _ => "+",
    };
    let mut out = format!("|{chomp}");
    for line in s.strip_suffix('\n').unwrap_or(s).split('\n') {
        out.push('\n');
        if !line.is_empty() {
            out.extend(std::iter::repeat_n(' ', indent));
            out.push_str(line);
        }
    }
    Some(out)
}

/// Whether `s` can be written plain: printable ASCII, no leading or trailing space, no
/// indicator that starts or breaks a plain scalar, and not a form any reader resolves to
/// something else ([`non_string`]).
pub fn plain_ok(s: &str) -> bool {
    let Some(first) = s.chars().next() else {
        return false;
    };
    let second = s.chars().nth(1);
    s.chars().all(|c| (' '..='~').contains(&c))
        && !s.starts_with(' ')
        && !s.ends_with(' ')
        && !s.ends_with(':')
        && !s.contains(": ")
        && !s.contains(" #")
        && (!"-?:".contains(first) || second.is_some_and(|c| c != ' '))
        && !",[]{}#&*!|>'\"%@`".contains(first)
        && !non_string(s)
}

/// Whether a YAML 1.1 or 1.2 reader resolves plain `s` to something other than a string:
/// booleans (`y`, `yes`, `on`, `off`, `true` ... in any case), null (`~`, `null`), integers
/// (binary, octal, decimal, hex, `_` separators, base 60 `1:30`), floats (`1.5`, `1e3`,
/// `.inf`, `.nan`), timestamps (`2024-01-01`), the merge key `<<` and the value key `=`.
/// Errs towards "yes": anything that starts like a number and holds only number characters.
pub fn non_string(s: &str) -> bool {
    const WORDS: [&str; 14] = [
        "y", "n", "yes", "no", "on", "off", "true", "false", "null", "~", "<<", "=", ".inf", ".nan",
    ];
    let lower = s.to_ascii_lowercase();
    let unsigned = lower.trim_start_matches(['-', '+']);
    if WORDS.contains(&lower.as_str()) || WORDS.contains(&unsigned) {
        return true;
    }
    let b = unsigned.as_bytes();
    let numeric_start = b.first().is_some_and(|c| c.is_ascii_digit())
        || (b.first() == Some(&b'.') && b.get(1).is_some_and(|c| c.is_ascii_digit()));
    if !numeric_start {
        return false;
    }
    // Numbers of every base and form, base 60, and dates/timestamps (`2024-01-01`, `...T10:00:00Z`).
    let number_chars = unsigned
        .chars()
        .all(|c| c.is_ascii_hexdigit() || "_.:+-xob".contains(c));
    let timestamp = b.len() >= 8
        && b[..4].iter().all(u8::is_ascii_digit)
        && b[4] == b'-'
        && unsigned
            .chars()
            .all(|c| c.is_ascii_digit() || "-:.tz +".contains(c));
    number_chars || timestamp
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every YAML 1.1 (and 1.2 core) form that is not a string when written plain.
    pub const NON_STRINGS: &[&str] = &[
        // bool (1.1): y|Y|yes|Yes|YES|n|N|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF
        "y",
        "Y",
        "yes",
        "Yes",
        "YES",
        "n",
        "N",
        "no",
        "No",
        "NO",
        "true",
        "True",
        "TRUE",
        "false",
        "False",
        "FALSE",
        "on",
        "On",
        "ON",
        "off",
        "Off",
        "OFF",
        // null
        "~",
        "null",
        "Null",
        "NULL",
        // int: binary, octal, decimal, hex, base 60, separators, signs
        "0b1010",
        "-0b1_0",
        "0755",
        "0o17",
        "0",
        "42",
        "-17",
        "+17",
        "1_000",
        "0x1F",
        "0xdead_beef",
        "190:20:30",
        "1:30",
        // float: fixed, exponent, base 60, inf, nan
        "1.5",
        "-1.5",
        "1.",
        ".5",
        "6.8523015e+5",
        "685.230_15e+03",
        "1e3",
        "1E-3",
        "190:20:30.15",
        ".inf",
        "-.inf",
        "+.Inf",
        ".INF",
        ".nan",
        ".NaN",
        ".NAN",
        // timestamps
        "2001-12-14",
        "2001-12-14t21:59:43.10-05:00",
        "2001-12-14 21:59:43.10 -5",
        "2001-12-15T02:59:43.1Z",
        // merge and value keys
        "<<",
        "=",
    ];

    #[test]
    fn every_yaml_1_1_non_string_form_is_quoted() {
        for s in NON_STRINGS {
            assert!(!plain_ok(s), "{s} must be quoted");
            let y = to_yaml(&json!({"v": s}));
            assert_eq!(y, format!("v: {}\n", serde_json::to_string(s).unwrap()));
            let back: Json = serde_yaml::from_str(&y).unwrap();
            assert_eq!(back, json!({"v": s}));
        }
        for s in [
            "nats",
            "500m",
            "1Gi",
            "orders-bus",
            "app.kubernetes.io/name",
            "--config",
            "/etc/nats-config/nats.conf",
            "nats:2.10.29-alpine",
            "$(POD_NAME)",
            "yesterday",
            "one",
            "offset",
            "Never",
            "TCP",
            "nats-server",
            "-c",
        ] {
            assert!(plain_ok(s), "{s} stays plain");
        }
        for s in [
            "", " x", "x ", "a: b", "a #b", "- x", "#x", "*x", "&x", "!x", "'x", "\"x", "x:",
        ] {
            assert!(!plain_ok(s), "{s:?} must be quoted");
        }
    }

    #[test]
    fn blocks_round_trip() {
        let v = json!({
            "apiVersion": "v1",
            "data": {"nats.conf": "a: 1\n\n  b {\n}\n", "two": "x\n\n", "none": "x\ny", "sp": " lead\nx"},
            "list": [{"a": 1, "b": [true, null, "on"]}, [1, [2]], {}, [], "s"],
            "empty": {}, "nil": null, "n": 1.5,
            "yes": "NO",
        });
        let y = to_yaml(&v);
        let back: Json = serde_yaml::from_str(&y).unwrap();
        assert_eq!(back, v, "{y}");
        assert!(
            y.contains("  nats.conf: |\n    a: 1\n\n      b {\n    }\n"),
            "{y}"
        );
        assert!(y.contains("\"yes\": \"NO\""), "{y}");
        assert!(y.contains("list:\n- a: 1\n  b:\n  - true\n"), "{y}");
    }
}
