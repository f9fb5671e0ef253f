//! What may reach the NATS connection from user input: publish subjects, header names and
//! values, ack tokens and durations. Every check runs before async-nats or std time arithmetic
//! sees the value, because async-nats asserts on bad headers (a panic inside a step), the server
//! drops the whole shared connection on an over-long control line, and a publish to a `$JS.`
//! subject is a JetStream API call (stream delete, purge, consumer delete).
//!
//! Single-message and bulk paths call the same functions, so both refuse the same inputs with
//! the same words. Errors quote values through [`quote`], so a huge value never makes a huge error.

use super::names::check_publish_subject;
/// Durations are checked where configs are: the same words for every config and step.
pub use crate::config::error::{check_duration, MAX_DURATION};
use crate::secret::quote;

/// The longest subject or ack token we send. The server's control line (`HPUB <subject>
/// <reply> <sizes>`) is limited to 4 KiB by default and a longer one closes the connection for
/// every user of the broker; 1 KiB leaves room for the reply inbox and is far above real subjects.
pub const MAX_SUBJECT_LEN: usize = 1024;
/// Header names are protocol tokens; values travel in the message's header block.
pub const MAX_HEADER_NAME_LEN: usize = 256;
pub const MAX_HEADER_VALUE_LEN: usize = 16 * 1024;

/// First subject tokens that address the server itself: the JetStream API and acks (`$JS`,
/// `$JSC`), Raft traffic (`$NRG`), the system account (`$SYS`), other `$` namespaces, and
/// request-reply inboxes (`_INBOX`), where a publish would answer someone else's request.
fn reserved(first: &str) -> bool {
    first.starts_with('$') || first == "_INBOX"
}

/// A subject a pipeline may publish to: concrete (no wildcards), at most [`MAX_SUBJECT_LEN`]
/// bytes, and outside the server's reserved namespaces.
pub fn check_publish_target(subject: &str) -> Result<(), String> {
    if subject.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "{} is {} bytes long; subjects are limited to {MAX_SUBJECT_LEN} bytes",
            quote(subject),
            subject.len()
        ));
    }
    check_publish_subject(subject)?;
    let first = subject.split('.').next().unwrap_or_default();
    if reserved(first) {
        return Err(format!(
            "{} is in the server's reserved {first:?} namespace ($-prefixed subjects are NATS/JetStream APIs, _INBOX is for replies); publish to an application subject such as orders.created",
            quote(subject)
        ));
    }
    Ok(())
}

/// A header name: 1 to [`MAX_HEADER_NAME_LEN`] printable ASCII characters without `:`
/// (the wire form is `Name: value`).
pub fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a header name is empty".into());
    }
    if name.len() > MAX_HEADER_NAME_LEN {
        return Err(format!(
            "header name {} is longer than {MAX_HEADER_NAME_LEN} bytes",
            quote(name)
        ));
    }
    if let Some(c) = name.chars().find(|c| !c.is_ascii_graphic() || *c == ':') {
        return Err(format!(
            "header name {} contains {c:?}; names are printable ASCII without spaces or ':' (e.g. X-Tenant)",
            quote(name)
        ));
    }
    Ok(())
}

/// A header value (also `correlation_id` and `message_id`): no CR, LF or NUL, which would end
/// or corrupt the header block, and at most [`MAX_HEADER_VALUE_LEN`] bytes.
pub fn check_header_value(value: &str) -> Result<(), String> {
    if value.len() > MAX_HEADER_VALUE_LEN {
        return Err(format!(
            "is {} bytes long; header values are limited to {MAX_HEADER_VALUE_LEN} bytes",
            value.len()
        ));
    }
    if value.contains(['\r', '\n', '\0']) {
        return Err(format!(
            "{} contains a line break or NUL, which headers cannot carry",
            quote(value)
        ));
    }
    Ok(())
}

/// Every header of a map, naming the offending one.
pub fn check_headers<'a>(
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
) -> Result<(), String> {
    for (k, v) in headers {
        check_header_name(k)?;
        check_header_value(v).map_err(|e| format!("header {k:?} value {e}"))?;
    }
    Ok(())
}

/// The prefix of every JetStream ack subject.
pub const ACK_PREFIX: &str = "$JS.ACK.";

/// A JetStream ack token exactly as the server issues it: `$JS.ACK.` followed by either
/// `<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<timestamp>.<pending>` (7
/// tokens, older servers) or `<domain>.<account hash>.` before those and up to three more
/// trailing tokens (9 to 12). Counters are decimal; names have no wildcards or whitespace.
/// Anything else is refused before it is sent, so a token can publish nowhere but an ack.
pub fn check_ack_token(token: &str) -> Result<(), String> {
    let not_a_token = || {
        format!(
            "{} is not a JetStream ack token (it must be the `$JS.ACK.<stream>.<consumer>.<counters>` reply subject of a consumed or triggered message)",
            quote(token)
        )
    };
    if token.is_empty() {
        return Err("is required (the ack_token of a consumed or triggered message)".into());
    }
    if token.len() > MAX_SUBJECT_LEN {
        return Err(format!(
            "is {} bytes long; a JetStream ack token is at most {MAX_SUBJECT_LEN}",
            token.len()
        ));
    }
    let Some(rest) = token.strip_prefix(ACK_PREFIX) else {
        return Err(not_a_token());
    };
    let tokens: Vec<&str> = rest.split('.').collect();
    // Index of the first of the five counters (delivered, stream seq, consumer seq, timestamp,
    // pending).
    let counters = match tokens.len() {
        7 => 2,
        9..=12 => 4,
        _ => return Err(not_a_token()),
    };
    let name_ok = |t: &str| {
        !t.is_empty()
            && !t
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || c == '*' || c == '>')
    };
    let number_ok =
        |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
    for (i, t) in tokens.iter().enumerate() {
        let ok = if (counters..counters + 5).contains(&i) {
            number_ok(t)
        } else {
            name_ok(t)
        };
        if !ok {
            return Err(not_a_token());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn server_namespaces_and_wildcards_are_not_publish_targets() {
        assert!(check_publish_target("orders.created").is_ok());
        for bad in [
            "$JS.API.STREAM.DELETE.ORDERS",
            "$JS.API.STREAM.PURGE.ORDERS",
            "$JS.API.CONSUMER.DELETE.ORDERS.worker",
            "$JS.ACK.S.c.1.1.1.1.0",
            "$SYS.REQ.SERVER.PING",
            "$KV.bucket.key",
            "_INBOX.abc",
            "orders.*",
            "orders.>",
        ] {
            assert!(check_publish_target(bad).is_err(), "{bad}");
        }
        let long = format!("a.{}", "b".repeat(100_000));
        let e = check_publish_target(&long).unwrap_err();
        assert!(e.len() < 400, "{e}");
    }

    #[test]
    fn header_names_and_values_that_async_nats_would_panic_on_are_refused() {
        assert!(check_header_name("X-Tenant").is_ok());
        for bad in ["", "a b", "a:b", "a\r\nb", "é", "a\tb"] {
            assert!(check_header_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_header_value("any text: even spaces").is_ok());
        for bad in ["a\rb", "a\nb", "a\0b"] {
            assert!(check_header_value(bad).is_err(), "{bad:?}");
        }
        assert!(check_header_value(&"v".repeat(MAX_HEADER_VALUE_LEN + 1)).is_err());
    }

    #[test]
    fn ack_tokens_follow_the_server_grammar() {
        for ok in [
            "$JS.ACK.ORDERS.worker.1.5.3.1700000000000000000.0",
            "$JS.ACK._.HASH.ORDERS.worker.1.5.3.1700000000000000000.0",
            "$JS.ACK.hub.HASH.ORDERS.worker.1.5.3.1700000000000000000.0.rand",
        ] {
            assert_eq!(check_ack_token(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "$JS.ACK.",
            "$JS.ACK.x",
            "$JS.API.STREAM.DELETE.ORDERS",
            "orders.created",
            "$JS.ACK.ORDERS.worker.1.5.x.17.0",
            "$JS.ACK.ORDERS.wor ker.1.5.3.17.0",
            "$JS.ACK.ORDERS.*.1.5.3.17.0",
            "$JS.ACK.ORDERS..1.5.3.17.0",
        ] {
            assert!(check_ack_token(bad).is_err(), "{bad:?}");
        }
        let huge = format!("$JS.ACK.{}.c.1.1.1.1.0", "S".repeat(100_000));
        let e = check_ack_token(&huge).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn durations_are_bounded_before_time_arithmetic() {
        let d = |seconds, nanos| Some(prost_types::Duration { seconds, nanos });
        assert_eq!(
            check_duration(&d(5, 0), MAX_DURATION),
            Ok(Some(Duration::from_secs(5)))
        );
        assert_eq!(check_duration(&None, MAX_DURATION), Ok(None));
        assert!(check_duration(&d(i64::MAX, 999_999_999), MAX_DURATION).is_err());
        assert!(check_duration(&d(-1, 0), MAX_DURATION).is_err());
        assert!(check_duration(&d(1, 2_000_000_000), MAX_DURATION).is_err());
    }
}
