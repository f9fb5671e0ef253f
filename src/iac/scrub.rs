//! Config problems as the IaC face reports them (Create, Update, Diff, Plan): wfctl prints
//! these messages and CI keeps its logs, so a problem never quotes a secret nor more than
//! `MAX_QUOTE` characters of any value.
//!
//! Secret are: every value under `auth`, whatever its type (a token given as a number is still
//! a token), and the userinfo of the urls in `dsn` and `servers`. A problem about `auth` is
//! rewritten from the config's shape alone; a problem about a url that carries credentials
//! says what is wrong without quoting it; every other problem gets secret text and long values
//! cut out wherever they appear.

use crate::iac::error::DriverError;
use serde_json::{Map, Value as Json};

/// The most characters of one config value an error quotes.
pub(crate) const MAX_QUOTE: usize = 200;
/// The longest problem line kept whole (room for a field list after a quoted value).
const MAX_LINE: usize = 1000;
/// Values never shown, whatever their type.
const SECRET_KEY: &str = "auth";
/// Keys whose strings are urls that may carry `user:password@`.
const URL_KEYS: [&str; 2] = ["dsn", "servers"];
const HIDDEN: &str = "<not shown>";

/// `s` as `"..."` with at most `MAX_QUOTE` characters of it, saying how much was left out.
pub(crate) fn quote(s: &str) -> String {
    match s.char_indices().nth(MAX_QUOTE) {
        None => format!("{s:?}"),
        Some((cut, _)) => format!("{:?}… ({} more bytes)", &s[..cut], s.len() - cut),
    }
}

/// What to cut out of the problems found in one config.
pub(crate) struct Scrubber {
    auth: Option<Json>,
    url_has_userinfo: bool,
    /// Secret texts, longest first (so a longer one is replaced before its parts).
    secrets: Vec<String>,
    /// Values and keys over `MAX_QUOTE` characters, longest first.
    long: Vec<String>,
}

impl Scrubber {
    pub(crate) fn new(config: &Map<String, Json>) -> Scrubber {
        let mut s = Scrubber {
            auth: config.get(SECRET_KEY).cloned(),
            url_has_userinfo: false,
            secrets: Vec::new(),
            long: Vec::new(),
        };
        if let Some(a) = &s.auth {
            leaves(a, &mut |v| {
                let text = match v {
                    Json::String(t) => t.clone(),
                    other => other.to_string(),
                };
                s.secrets.push(text);
            });
        }
        for key in URL_KEYS {
            if let Some(v) = config.get(key) {
                leaves(v, &mut |v| {
                    if let Json::String(url) = v {
                        for info in userinfo(url) {
                            s.url_has_userinfo = true;
                            s.secrets.extend(
                                info.split([',', ':', '@'])
                                    .filter(|p| p.len() >= 4)
                                    .map(String::from),
                            );
                            s.secrets.push(info);
                        }
                    }
                });
            }
        }
        walk_strings(config, &mut |t| {
            if t.chars().nth(MAX_QUOTE).is_some() {
                s.long.push(t.to_string());
            }
        });
        s.secrets.retain(|t| !t.is_empty());
        s.secrets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        s.long.sort_by_key(|t| std::cmp::Reverse(t.len()));
        s
    }

    /// One problem line (`field: problem`, optionally prefixed `config.`) made safe to show.
    pub(crate) fn line(&self, line: &str) -> String {
        let body = line.strip_prefix("config.").unwrap_or(line);
        let prefix = &line[..line.len() - body.len()];
        let field = body
            .split([':', '.', '['])
            .next()
            .unwrap_or_default()
            .trim();
        if field == SECRET_KEY {
            return format!("{prefix}{}", self.auth_problem(line));
        }
        if URL_KEYS.contains(&field) && self.url_has_userinfo {
            return format!(
                "{prefix}{field}: is not a list of NATS urls (e.g. nats://user:password@127.0.0.1:4222,nats://host2:4222); \
                 the value is not shown because it carries credentials (percent-encode any ',', ':', '@' or '/' in a user or password)"
            );
        }
        let mut out = line.to_string();
        for secret in &self.secrets {
            for form in forms(secret) {
                out = out.replace(&form, HIDDEN);
            }
        }
        for long in &self.long {
            let short = quote(long);
            for form in forms(long) {
                out = out.replace(&form, &short);
            }
        }
        if let Some((cut, _)) = out.char_indices().nth(MAX_LINE) {
            let more = out.len() - cut;
            out.truncate(cut);
            out.push_str(&format!("… ({more} more bytes)"));
        }
        out
    }

    /// `e` with its config problems made safe to show (other errors pass unchanged).
    pub(crate) fn error(&self, e: DriverError) -> DriverError {
        match e {
            DriverError::Config(mut e) => {
                let mut shown: Vec<String> = Vec::with_capacity(e.problems.len());
                for p in e.problems.iter().map(|p| self.line(p)) {
                    if !shown.contains(&p) {
                        shown.push(p);
                    }
                }
                e.problems = shown;
                DriverError::Config(e)
            }
            DriverError::Invalid { what, message } => DriverError::Invalid {
                what,
                message: self.line(&message),
            },
            other => other,
        }
    }

    /// An `auth` problem told from the config's shape; no value under `auth` is quoted.
    fn auth_problem(&self, original: &str) -> String {
        let valid =
            "auth is an object of strings: token, user with password, creds_file or nkey_seed_file";
        match &self.auth {
            Some(Json::Object(m)) => {
                let wrong: Vec<String> = m
                    .iter()
                    .filter(|(_, v)| !v.is_string())
                    .map(|(k, v)| format!("auth.{}: must be a string, got {}", quote(k), kind(v)))
                    .collect();
                if wrong.is_empty() {
                    // A key problem (unknown or misspelt key): keys are shown, values are not.
                    let mut out = original
                        .strip_prefix("config.")
                        .unwrap_or(original)
                        .to_string();
                    for secret in &self.secrets {
                        for form in forms(secret) {
                            out = out.replace(&form, HIDDEN);
                        }
                    }
                    out
                } else {
                    format!("{} (values are not shown); {valid}", wrong.join("; "))
                }
            }
            Some(other) => format!(
                "auth: must be an object, got {} (the value is not shown); {valid}",
                kind(other)
            ),
            None => format!("auth: invalid (the value is not shown); {valid}"),
        }
    }
}

/// How a value may appear in an error: raw, JSON-quoted, Rust-quoted.
fn forms(s: &str) -> [String; 3] {
    [
        s.to_string(),
        serde_json::to_string(s).unwrap_or_default(),
        format!("{s:?}"),
    ]
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "a list",
        Json::Object(_) => "an object",
    }
}

/// Every scalar under `v`.
fn leaves(v: &Json, f: &mut impl FnMut(&Json)) {
    match v {
        Json::Array(a) => a.iter().for_each(|x| leaves(x, f)),
        Json::Object(m) => m.values().for_each(|x| leaves(x, f)),
        other => f(other),
    }
}

/// Every key and string value in the config.
fn walk_strings(m: &Map<String, Json>, f: &mut impl FnMut(&str)) {
    fn value(v: &Json, f: &mut impl FnMut(&str)) {
        match v {
            Json::String(s) => f(s),
            Json::Array(a) => a.iter().for_each(|x| value(x, f)),
            Json::Object(m) => walk_strings(m, f),
            _ => {}
        }
    }
    for (k, v) in m {
        f(k);
        value(v, f);
    }
}

/// The secret parts (userinfo, password values) of the urls in `s`, as the one masking finds
/// them ([`crate::secret::secret_parts`]).
fn userinfo(s: &str) -> Vec<String> {
    crate::secret::secret_parts(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scrubber(v: Json) -> Scrubber {
        Scrubber::new(v.as_object().unwrap())
    }

    #[test]
    fn auth_problems_never_quote_auth_values() {
        let s = scrubber(json!({"auth": "tok-123"}));
        let l = s.line(r#"config.auth: invalid type: string "tok-123", expected a map"#);
        assert!(!l.contains("tok-123") && l.contains("got a string"), "{l}");
        let s = scrubber(json!({"auth": {"password": 98765, "user": "u"}}));
        let l = s.line("auth: invalid type: integer `98765`, expected a string");
        assert!(
            !l.contains("98765") && l.contains("auth.\"password\""),
            "{l}"
        );
        let s = scrubber(json!({"auth": {"tokn": "abcdef"}}));
        let l = s.line(r#"auth: unknown field `tokn` (value "abcdef")"#);
        assert!(l.contains("tokn") && !l.contains("abcdef"), "{l}");
    }

    #[test]
    fn url_userinfo_and_long_values_are_cut_out_everywhere() {
        let s =
            scrubber(json!({"dsn": "nats://al:pa,ss-SECRET@h:4222", "version": "v".repeat(5000)}));
        let l = s.line("config.dsn: nats://al:pa is not a NATS url");
        assert!(!l.contains("pa") || !l.contains("al:pa"), "{l}");
        assert!(!l.contains("SECRET"), "{l}");
        let l = s.line(&format!(
            "config.version: {:?} is not a version",
            "v".repeat(5000)
        ));
        assert!(l.len() < 400 && l.contains("more bytes"), "{l}");
        let other = s.line("config.colour: ss-SECRET unknown");
        assert!(!other.contains("SECRET"), "{other}");
        assert_eq!(userinfo("nats://a:b,c@h:1,tls://d@e:2"), ["a:b,c", "d"]);
        assert!(userinfo("nats://h:1").is_empty());
    }

    #[test]
    fn quote_keeps_short_values_and_cuts_long_ones() {
        assert_eq!(quote("ab"), "\"ab\"");
        let q = quote(&"x".repeat(300));
        assert!(
            q.starts_with(&format!("\"{}\"", "x".repeat(200))) && q.ends_with("(100 more bytes)")
        );
    }
}
