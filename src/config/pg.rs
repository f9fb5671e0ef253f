//! The pgchannel part of a broker config: the Postgres dsn (a secret), pool size and poll
//! interval, checked at load with one line per problem. The domain layer (`crate::pg`) gets its
//! `PgSettings` from this through the runtime and IaC faces, so config depends on nothing of it.

use crate::secret::{quote, Secret};
use std::time::Duration;

pub const DEFAULT_MAX_CONNS: usize = 16;
/// A pool larger than this is more likely a typo than a plan: Postgres' own default
/// max_connections is 100 for the whole server.
pub const MAX_MAX_CONNS: usize = 1000;
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// The poll tick is a safety net under LISTEN/NOTIFY; longer than this and a lost notify
/// leaves a message waiting unreasonably long.
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(3600);

/// libpq `sslmode` values (tokio-postgres itself knows only the first three).
pub const SSL_MODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

#[derive(Clone, Debug)]
pub struct PgConfig {
    /// `dsn` from the module config; `None` means `EVENTBUS_<NAME>_URI` is read at connect.
    pub explicit_dsn: Option<Secret>,
    pub max_conns: usize,
    pub poll_interval: Duration,
    pub connect_timeout: Duration,
}

/// A Go `time.ParseDuration` text: `300ms`, `1.5s`, `1h2m3s`, `-1s`; units ns, us (µs), ms, s,
/// m, h. Returns the signed value in nanoseconds, so callers can tell zero and negative apart.
pub fn parse_go_duration(s: &str) -> Option<i128> {
    let s = s.trim();
    let (neg, mut rest) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if rest == "0" {
        return Some(0);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total: f64 = 0.0;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, tail) = rest.split_at(num_end);
        if num.is_empty() || num == "." {
            return None;
        }
        let n: f64 = num.parse().ok()?;
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        let scale = match unit {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        total += n * scale;
        if !total.is_finite() || total > 9.3e18 {
            return None; // past Go's int64 nanoseconds
        }
        rest = tail;
    }
    let ns = total.round() as i128;
    Some(if neg { -ns } else { ns })
}

/// `poll_interval`: empty means 1s; anything unparsable, zero or negative is refused (the Go
/// provider silently used 1s for those, so a typo went unnoticed: B16).
pub fn check_poll_interval(s: &str) -> Result<Duration, String> {
    if s.trim().is_empty() {
        return Ok(DEFAULT_POLL_INTERVAL);
    }
    let bad = || {
        format!(
            "{} is not a positive duration such as \"500ms\", \"1s\" or \"1m30s\" (at most 1h)",
            quote(s)
        )
    };
    let ns = parse_go_duration(s).ok_or_else(bad)?;
    if ns <= 0 {
        return Err(bad());
    }
    let d = Duration::from_nanos(ns as u64);
    if d > MAX_POLL_INTERVAL {
        return Err(bad());
    }
    Ok(d)
}

pub fn check_max_conns(n: i32) -> Result<usize, String> {
    if n < 0 || n as usize > MAX_MAX_CONNS {
        return Err(format!(
            "{n} is out of range (1..={MAX_MAX_CONNS}; 0 means {DEFAULT_MAX_CONNS})"
        ));
    }
    Ok(if n == 0 {
        DEFAULT_MAX_CONNS
    } else {
        n as usize
    })
}

/// The `key=value` parameters of a dsn in either libpq form (URL query or keyword list), for
/// the checks below. Values are not unquoted beyond libpq's single quotes.
fn params(dsn: &str) -> Vec<(String, String)> {
    let dsn = dsn.trim();
    if dsn.starts_with("postgres://") || dsn.starts_with("postgresql://") {
        let Some((_, q)) = dsn.split_once('?') else {
            return Vec::new();
        };
        q.split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), percent_decode(v)))
            .collect()
    } else {
        dsn.split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('\'').to_string()))
            .collect()
    }
}

fn percent_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let Some(h) = v
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(h);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Shape checks a reader can do without connecting: the form, `sslmode`, `sslrootcert`. The
/// dsn itself never appears in a message (it may hold a password).
pub fn check_dsn(dsn: &str) -> Result<(), String> {
    let d = dsn.trim();
    let url = d.starts_with("postgres://") || d.starts_with("postgresql://");
    if !url && !d.contains('=') {
        let scheme = d.split_once("://").map(|(s, _)| s);
        return Err(match scheme {
            Some(s) => format!(
                "is a {} url, not a PostgreSQL connection string (postgres://user@host:5432/db?sslmode=require or \"host=... dbname=...\")",
                quote(s)
            ),
            None => "is not a PostgreSQL connection string (postgres://user@host:5432/db?sslmode=require or \"host=... dbname=...\")".into(),
        });
    }
    for (k, v) in params(d) {
        match k.as_str() {
            "sslmode" if !SSL_MODES.contains(&v.as_str()) => {
                return Err(format!(
                    "sslmode {} is not a libpq sslmode (one of: {})",
                    quote(&v),
                    SSL_MODES.join(", ")
                ))
            }
            "sslrootcert" | "sslcert" | "sslkey"
                if v != "system" && !std::path::Path::new(&v).is_file() =>
            {
                return Err(format!("{k} {} is not a readable file", quote(&v)))
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("1s"), Some(1_000_000_000));
        assert_eq!(parse_go_duration("1.5s"), Some(1_500_000_000));
        assert_eq!(parse_go_duration("1m30s"), Some(90_000_000_000));
        assert_eq!(parse_go_duration("250ms"), Some(250_000_000));
        assert_eq!(parse_go_duration("10us"), Some(10_000));
        assert_eq!(parse_go_duration("-1s"), Some(-1_000_000_000));
        assert_eq!(parse_go_duration("0"), Some(0));
        assert_eq!(parse_go_duration("1"), None, "Go wants a unit");
        assert_eq!(parse_go_duration("1sec"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("1e300h"), None);
    }

    #[test]
    fn poll_interval_is_never_silently_one_second() {
        assert_eq!(check_poll_interval("").unwrap(), Duration::from_secs(1));
        assert_eq!(
            check_poll_interval("250ms").unwrap(),
            Duration::from_millis(250)
        );
        for bad in ["0s", "-1s", "fast", "1", "2h"] {
            let e = check_poll_interval(bad).unwrap_err();
            assert!(e.contains("positive duration"), "{bad}: {e}");
        }
    }

    #[test]
    fn max_conns_bounds() {
        assert_eq!(check_max_conns(0).unwrap(), 16);
        assert_eq!(check_max_conns(4).unwrap(), 4);
        assert!(check_max_conns(-1).is_err());
        assert!(check_max_conns(100_000).is_err());
    }

    #[test]
    fn dsn_checks_never_echo_the_dsn() {
        assert!(check_dsn("postgres://u:secret@h/db?sslmode=require").is_ok());
        assert!(check_dsn("host=/tmp dbname=x user=u password=secret").is_ok());
        let e = check_dsn("postgres://u:secret@h/db?sslmode=sometimes").unwrap_err();
        assert!(e.contains("sslmode") && !e.contains("secret"), "{e}");
        let e = check_dsn("nats://u:secret@h:4222").unwrap_err();
        assert!(e.contains("\"nats\"") && !e.contains("secret"), "{e}");
        let e = check_dsn("postgres://h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem")
            .unwrap_err();
        assert!(e.contains("sslrootcert"), "{e}");
    }

    #[test]
    fn redaction() {
        let redact_dsn = |d: &str| crate::secret::mask(d, crate::secret::Userinfo::User);
        assert_eq!(
            redact_dsn("postgres://app:s3cret@db:5432/ev?sslmode=require"),
            "postgres://app:***@db:5432/ev?sslmode=require"
        );
        assert_eq!(
            redact_dsn("postgres://db/ev?user=app&password=s3cret"),
            "postgres://db/ev?user=app&password=***"
        );
        assert_eq!(
            redact_dsn("host=db user=app password=s3cret dbname=ev"),
            "host=db user=app password=*** dbname=ev"
        );
    }
}
