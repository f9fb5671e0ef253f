//! Secrets never reach a log line or an error message: they are only readable through
//! `expose`, and every formatting path prints a placeholder.

use std::fmt;

#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// `nats://user:pass@host:4222` → `nats://***@host:4222`, for logs and errors (a list is
/// shown entry by entry, trimmed). Through [`mask`], like every other masked connection string.
pub fn redact_url(url: &str) -> String {
    mask(url, Userinfo::Hidden)
        .split(',')
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(",")
}

/// How [`mask`] shows the userinfo of a url.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Userinfo {
    /// `scheme://***@host/...`
    Hidden,
    /// `scheme://user:***@host/...`: the user name stays visible when it is unambiguous.
    User,
    /// `scheme://host`: userinfo, path and query left out (a url to show as an address).
    Dropped,
}

/// libpq's connection keywords (PostgreSQL 17). A `key=value` DSN shows only these, and in
/// a url query a `password` value runs up to the next `&` that starts one of them.
const LIBPQ_KEYS: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "passfile",
    "require_auth",
    "channel_binding",
    "connect_timeout",
    "client_encoding",
    "options",
    "application_name",
    "fallback_application_name",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "tcp_user_timeout",
    "replication",
    "gssencmode",
    "sslmode",
    "sslnegotiation",
    "sslcompression",
    "sslcert",
    "sslkey",
    "sslpassword",
    "sslcertmode",
    "sslrootcert",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "requirepeer",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "krbsrvname",
    "gsslib",
    "gssdelegation",
    "service",
    "target_session_attrs",
    "load_balance_hosts",
    "requiressl",
];
/// Keywords whose values are secrets.
const SECRET_KEYS: &[&str] = &["password", "sslpassword"];

/// Whether `key` is a libpq connection keyword (shown in masked DSNs and error texts).
pub fn libpq_key(key: &str) -> bool {
    LIBPQ_KEYS.contains(&key)
}

/// The one masking of a connection string, for every log line, error, IaC output and plan
/// diff: a PostgreSQL url, a libpq `key=value` DSN or a (comma-separated) NATS url list.
///
/// Passwords are often generated and often not percent-encoded, so a `/`, `?`, `@`, `#`, `%`,
/// `:` or space may sit anywhere in a user or password, where parsers disagree about it
/// (tokio-postgres ends the userinfo at the first `@`, a url parser at the last `@` before
/// the first `/`). The mask therefore hides the union of every reading:
/// - userinfo runs from after `scheme://` to the last `@` of that url (a list holds several
///   urls, each starting at `,scheme://`);
/// - a `password=` / `sslpassword=` query value runs to the next `&<libpq keyword>=`, or to
///   the end of the url when none follows;
/// - a user name is shown (`Userinfo::User`) only when it holds none of `/ ? # & = @` nor
///   whitespace, so it cannot be a host, path or query read as a user;
/// - `key=value` DSNs show libpq keywords only, secret values as `***`, an unknown keyword
///   (a typo, or a fragment of an unquoted value) as `***`, and nothing of a DSN that does
///   not parse.
///
/// A masked part shows as `***`; more is hidden than strictly needed when a string is
/// ambiguous, never less.
pub fn mask(dsn: &str, how: Userinfo) -> String {
    let d = dsn.trim();
    if is_url(d) {
        urls(d)
            .into_iter()
            .map(|u| mask_one_url(d, u, how))
            .collect::<Vec<_>>()
            .join(",")
    } else {
        match parse_kv(d) {
            Ok(pairs) => pairs
                .into_iter()
                .map(|(k, v)| {
                    if SECRET_KEYS.contains(&k.as_str()) {
                        format!("{k}=***")
                    } else if !libpq_key(&k) {
                        "***".to_string()
                    } else if v.is_empty() || v.contains(char::is_whitespace) {
                        format!("{k}='{v}'")
                    } else {
                        format!("{k}={v}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
            // Unparseable: show nothing of it rather than risk the password.
            Err(_) => "<unparseable dsn>".to_string(),
        }
    }
}

/// The secret texts of a connection string as [`mask`] finds them (userinfo, password
/// values; for a `key=value` DSN every value that is not shown), for cutting them out of
/// text that quotes the string (a serde or server error).
pub fn secret_parts(dsn: &str) -> Vec<String> {
    let d = dsn.trim();
    if is_url(d) {
        let mut out = Vec::new();
        for u in urls(d) {
            for (a, b) in u.ranges(d, Userinfo::Hidden) {
                out.push(d[a..b].to_string());
            }
        }
        out
    } else {
        match parse_kv(d) {
            Ok(pairs) => pairs
                .into_iter()
                .filter(|(k, _)| SECRET_KEYS.contains(&k.as_str()) || !libpq_key(k))
                .flat_map(|(k, v)| [k, v])
                .filter(|t| !libpq_key(t))
                .collect(),
            Err(_) => vec![d.to_string()],
        }
    }
}

/// A url (list) rather than a `key=value` DSN: it starts with `scheme://`, or has no `=`.
fn is_url(d: &str) -> bool {
    let scheme_end = d
        .find(|c: char| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
        .unwrap_or(0);
    (scheme_end > 0 && d[scheme_end..].starts_with("://")) || !d.contains('=')
}

/// One url of a list: `scheme` is empty for a bare `host:port`; `body` is the byte range after
/// `scheme://`.
#[derive(Clone, Copy)]
struct Url<'a> {
    scheme: &'a str,
    start: usize,
    end: usize,
}

/// The urls of a comma-separated list: a new url starts only at `,scheme://` (a comma inside
/// a password does not split it).
fn urls(d: &str) -> Vec<Url<'_>> {
    let mut starts: Vec<(usize, usize)> = Vec::new(); // (scheme start, body start)
    for (i, _) in d.match_indices("://") {
        let s = d[..i]
            .rfind(|c: char| !(c.is_ascii_alphanumeric() || "+.-".contains(c)))
            .map(|p| p + 1)
            .unwrap_or(0);
        if s == i {
            continue;
        }
        let before = d[..s].trim_end();
        if s == 0 || before.ends_with(',') {
            starts.push((s, i + 3));
        }
    }
    let mut out = Vec::new();
    let first = starts.first().map(|(s, _)| *s).unwrap_or(d.len());
    if first > 0 || starts.is_empty() {
        // Bare urls before the first scheme (or no scheme at all).
        let end = d[..first]
            .trim_end()
            .strip_suffix(',')
            .map(str::len)
            .unwrap_or(first);
        out.push(Url {
            scheme: "",
            start: 0,
            end,
        });
    }
    for (n, (s, b)) in starts.iter().enumerate() {
        let end = match starts.get(n + 1) {
            Some((next, _)) => d[..*next]
                .trim_end()
                .strip_suffix(',')
                .map(str::len)
                .unwrap_or(*next),
            None => d.len(),
        };
        out.push(Url {
            scheme: &d[*s..b - 3],
            start: *b,
            end,
        });
    }
    out
}

/// Whether a user name cannot be a host, path or query read as one.
fn plain_user(u: &str) -> bool {
    !u.chars().any(|c| "/?#&=@".contains(c) || c.is_whitespace())
}

impl Url<'_> {
    /// The secret byte ranges (into `d`) of this url, merged and sorted.
    fn ranges(&self, d: &str, how: Userinfo) -> Vec<(usize, usize)> {
        let body = &d[self.start..self.end];
        let mut r: Vec<(usize, usize)> = Vec::new();
        // Query values of secret keys: `?password=` or `&password=` anywhere in the body.
        for key in SECRET_KEYS {
            for sep in ['?', '&'] {
                let pat = format!("{sep}{key}=");
                for (i, _) in body.match_indices(&pat) {
                    let v = i + pat.len();
                    let mut end = body.len();
                    for (j, _) in body[v..].match_indices('&') {
                        let next = &body[v + j + 1..];
                        if next.split_once('=').is_some_and(|(k, _)| libpq_key(k)) {
                            end = v + j;
                            break;
                        }
                    }
                    r.push((self.start + v, self.start + end));
                }
            }
        }
        if let Some(at) = body.rfind('@') {
            let info = &body[..at];
            let from = match (how, info.split_once(':')) {
                (Userinfo::User, Some((u, _))) if plain_user(u) => u.len() + 1,
                (Userinfo::User, None) if plain_user(info) => at,
                _ => 0,
            };
            if from < at {
                r.push((self.start + from, self.start + at));
            }
        }
        r.sort();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (a, b) in r {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        merged
    }
}

fn mask_one_url(d: &str, u: Url<'_>, how: Userinfo) -> String {
    let prefix = if u.scheme.is_empty() {
        String::new()
    } else {
        format!("{}://", u.scheme)
    };
    let ranges = u.ranges(d, how);
    if how == Userinfo::Dropped {
        let body = &d[u.start..u.end];
        let host_start = body.rfind('@').map(|a| a + 1).unwrap_or(0);
        let host_end = body[host_start..]
            .find(['/', '?', '#'])
            .map(|e| host_start + e)
            .unwrap_or(body.len());
        let (a, b) = (u.start + host_start, u.start + host_end);
        let hidden = ranges.iter().any(|(x, y)| *x < b && a < *y);
        let host = if hidden { "***" } else { &d[a..b] };
        return format!("{prefix}{host}");
    }
    let mut out = prefix;
    let mut at = u.start;
    for (a, b) in ranges {
        out.push_str(&d[at..a]);
        out.push_str("***");
        at = b;
    }
    out.push_str(&d[at..u.end]);
    out
}

/// libpq `key=value` syntax: `key = value`, values optionally single-quoted, `\` escapes.
pub fn parse_kv(dsn: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    let mut it = dsn.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return Err("expected `=` after a keyword (key=value form)".into());
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut val = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            loop {
                match it.next() {
                    None => return Err("unterminated quoted value".into()),
                    Some('\\') => {
                        if let Some(c) = it.next() {
                            val.push(c);
                        }
                    }
                    Some('\'') => break,
                    Some(c) => val.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    if let Some(n) = it.next() {
                        val.push(n);
                    }
                } else {
                    val.push(c);
                }
            }
        }
        out.push((key, val));
    }
}

/// An error text of a connection-string parser (tokio-postgres, async-nats) with every
/// back-quoted word that is not a libpq keyword replaced by `***`: such parsers quote the
/// option or character they choked on, which may be a fragment of an unencoded password.
pub fn scrub_parser_error(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('`');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, p) in parts.enumerate() {
        out.push('`');
        if i % 2 == 0 && !libpq_key(p) {
            out.push_str("***");
        } else {
            out.push_str(p);
        }
    }
    out
}

/// Characters of a value quoted in an error message.
pub const QUOTE_MAX: usize = 200;

/// A value for an error message: Debug-quoted, cut to [`QUOTE_MAX`] characters with the full
/// length stated, so a huge value never becomes a huge error.
pub fn quote(value: &str) -> String {
    if value.chars().count() <= QUOTE_MAX {
        return format!("{value:?}");
    }
    let head: String = value.chars().take(QUOTE_MAX).collect();
    format!("{head:?}... ({} bytes)", value.len())
}

/// A short stable fingerprint (sha256, 16 hex digits) of some values; "" when all are empty.
pub fn fingerprint(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    if parts.iter().all(|p| p.is_empty()) {
        return String::new();
    }
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_hide_and_detect() {
        assert_eq!(fingerprint(&["", ""]), "");
        let a = fingerprint(&["hunter2", ""]);
        assert_eq!(a.len(), 16);
        assert!(!a.contains("hunter2"));
        assert_ne!(a, fingerprint(&["", "hunter2"]));
    }

    #[test]
    fn secrets_do_not_format() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        assert_eq!(
            redact_url("nats://u:hunter2@a:4222, tls://tok@b:4222,c:1"),
            "nats://***@a:4222,tls://***@b:4222,c:1"
        );
    }

    /// Issue 19 finding 2: a password with `/` (or `?`, `@`, `#`, `%`, `:`, a space) not
    /// percent-encoded leaked through every masking. Each of them at the start, middle and
    /// end of the user and of the password, in every form a connection string takes.
    #[test]
    fn reserved_characters_anywhere_in_user_or_password_never_leak() {
        use crate::iac::targets::strip_userinfo;
        use crate::pg::PgSettings;
        let put = |base: &str, c: &str, pos: usize| match pos {
            0 => format!("{c}{base}"),
            1 => format!("{}{c}{}", &base[..3], &base[3..]),
            2 => format!("{base}{c}"),
            _ => base.to_string(),
        };
        let kv_quote = |v: &str| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"));
        let enc = |v: &str| {
            v.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        };
        let leaks = |shown: &str| shown.contains("SECRET") || shown.contains("PWx");
        for c in ["/", "?", "@", "#", "%", ":", " "] {
            for pu in 0..4 {
                for pp in 0..3 {
                    let user = put("appuser", c, pu);
                    let pw = put("PWxSECRET", c, pp);
                    let case = format!("char {c:?}, user {user:?}, password {pw:?}");
                    let pg_urls = [
                        format!("postgres://{user}:{pw}@dbhost:5432/app?sslmode=require"),
                        format!("postgresql://{}:{}@dbhost/app", enc(&user), enc(&pw)),
                        format!(
                            "postgres://dbhost/app?user={}&password={pw}&sslmode=require",
                            enc(&user)
                        ),
                        format!("postgres://dbhost/app?password={pw}"),
                    ];
                    for (i, dsn) in pg_urls.iter().enumerate() {
                        let shown = PgSettings::new("bus", dsn.as_str()).redacted_dsn();
                        assert!(!leaks(&shown), "{case}: {dsn} -> {shown}");
                        if i < 2 {
                            assert!(shown.contains("dbhost"), "{case}: {dsn} -> {shown}");
                        }
                        for part in secret_parts(dsn) {
                            assert!(!part.is_empty(), "{case}");
                        }
                        let mut cut = dsn.clone();
                        for part in secret_parts(dsn) {
                            cut = cut.replace(&part, "");
                        }
                        assert!(!cut.contains("SECRET"), "{case}: {dsn} -> {cut}");
                    }
                    let kvs = [
                        format!(
                            "host=dbhost user={} password={} dbname=app",
                            kv_quote(&user),
                            kv_quote(&pw)
                        ),
                        format!("host=dbhost user={user} password={pw} dbname=app"),
                        format!("password = {} host=dbhost", kv_quote(&pw)),
                    ];
                    for (i, dsn) in kvs.iter().enumerate() {
                        let shown = PgSettings::new("bus", dsn.as_str()).redacted_dsn();
                        assert!(!leaks(&shown), "{case}: {dsn} -> {shown}");
                        if i != 1 {
                            assert!(shown.contains("host=dbhost"), "{case}: {dsn} -> {shown}");
                        }
                    }
                    let nats = [
                        format!("nats://{user}:{pw}@h1:4222,nats://h2:4222"),
                        format!("{user}:{pw}@h1:4222"),
                        format!("tls://{}:{}@h1:4222", enc(&user), enc(&pw)),
                        format!("nats://h0:4222, nats://{user}:{pw}@h1:4222"),
                    ];
                    for url in &nats {
                        for shown in [
                            redact_url(url),
                            strip_userinfo(url),
                            mask(url, Userinfo::User),
                        ] {
                            assert!(!leaks(&shown), "{case}: {url} -> {shown}");
                        }
                    }
                }
            }
        }
        // The shapes stay readable where nothing is ambiguous.
        assert_eq!(
            PgSettings::new("bus", "postgres://u:ab/cd@host/db").redacted_dsn(),
            "postgres://u:***@host/db"
        );
        assert_eq!(
            mask(
                "postgres://u:p@h/db?password=x&application_name=a&b",
                Userinfo::User
            ),
            "postgres://u:***@h/db?password=***&application_name=a&b"
        );
        assert_eq!(
            mask("postgres://h/db?password=x&b=c", Userinfo::User),
            "postgres://h/db?password=***"
        );
        assert_eq!(
            mask("host=h pasword=typo password=x", Userinfo::User),
            "host=h *** password=***"
        );
        assert_eq!(strip_userinfo("nats://u:a/b@h:4222/x"), "nats://h:4222");
        assert_eq!(
            scrub_parser_error("invalid configuration: unknown option `cd`; `sslmode`"),
            "invalid configuration: unknown option `***`; `sslmode`"
        );
    }

    #[test]
    fn quotes_are_capped() {
        assert_eq!(quote("ab"), "\"ab\"");
        let q = quote(&"x".repeat(1 << 20));
        assert!(q.len() < 260 && q.ends_with("(1048576 bytes)"), "{q}");
    }
}
