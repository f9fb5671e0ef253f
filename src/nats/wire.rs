//! The size of a message as the server counts it against `max_payload`: the payload plus the
//! whole header block (`NATS/1.0` line, every `Name: value` line, the blank line), which is
//! what a publish sends in its `HPUB` total. Every publish the plugin makes is checked here
//! first, so an oversized one fails with our words (naming what counted) instead of the
//! client's, and the dead-letter copy is fitted to the limit rather than retried forever.

use super::NatsError;
use async_nats::HeaderMap;

/// `NATS/1.0\r\n` before the headers and `\r\n` after them.
const BLOCK_FRAMING: usize = 10 + 2;
/// `: ` and `\r\n` around each value.
const LINE_FRAMING: usize = 4;

/// Bytes the header block takes on the wire; an empty map sends none.
pub fn headers_len(headers: &HeaderMap) -> usize {
    if headers.is_empty() {
        return 0;
    }
    let mut len = BLOCK_FRAMING;
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for v in values {
            len += name.len() + v.as_str().len() + LINE_FRAMING;
        }
    }
    len
}

/// Refuses a message over the connection's `max_payload`, counted on payload plus headers.
/// `what` names the message (e.g. "the message" or "the dead-letter copy").
pub fn check_fits(
    what: &str,
    headers: &HeaderMap,
    payload: usize,
    max_payload: usize,
) -> Result<(), NatsError> {
    let size = headers_len(headers) + payload;
    if size <= max_payload {
        return Ok(());
    }
    Err(NatsError::TooLarge {
        what: what.to_string(),
        size,
        payload,
        limit: max_payload,
    })
}

/// What [`fit_dead_letter`] had to leave out to stay within `max_payload`.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Trimmed {
    /// Headers left out whole (the original's own first).
    pub dropped: usize,
    /// Added headers kept with a shortened value.
    pub truncated: usize,
}

impl Trimmed {
    pub fn any(&self) -> bool {
        self.dropped + self.truncated > 0
    }
}

/// The headers of a dead-letter copy within `max_payload`: `kept` (the original's own) plus
/// `added` (where it came from and why) when all fit. Otherwise the added ones come first,
/// shortest first, each whole if it fits or cut to the room left (subject and reason are the
/// long ones), then the original's own, each whole if it still fits. Only a payload that alone
/// exceeds the limit cannot be sent at all.
pub fn fit_dead_letter(
    kept: HeaderMap,
    added: &[(&'static str, String)],
    payload: usize,
    max_payload: usize,
) -> Result<(HeaderMap, Trimmed), NatsError> {
    let mut full = kept.clone();
    for (k, v) in added {
        full.insert(*k, v.as_str());
    }
    if check_fits("", &full, payload, max_payload).is_ok() {
        return Ok((full, Trimmed::default()));
    }
    if payload > max_payload {
        return Err(NatsError::TooLarge {
            what: "the dead-letter copy".into(),
            size: payload,
            payload,
            limit: max_payload,
        });
    }
    let room = max_payload - payload;
    let mut out = HeaderMap::new();
    let mut used = 0usize;
    let mut trimmed = Trimmed::default();
    // The room a line of `name` would leave for its value, counting the block's framing when
    // it is the first line.
    let space = |used: usize, name: &str| {
        let framing = if used == 0 { BLOCK_FRAMING } else { 0 };
        room.checked_sub(used + framing + name.len() + LINE_FRAMING)
    };
    let mut order: Vec<&(&'static str, String)> = added.iter().collect();
    order.sort_by_key(|(_, v)| v.len());
    for (name, value) in order {
        let Some(left) = space(used, name).filter(|l| *l > 0) else {
            trimmed.dropped += 1;
            continue;
        };
        let mut cut = value.len().min(left);
        while !value.is_char_boundary(cut) {
            cut -= 1;
        }
        if cut < value.len() {
            trimmed.truncated += 1;
        }
        used = used.max(BLOCK_FRAMING) + name.len() + cut + LINE_FRAMING;
        out.insert(*name, &value[..cut]);
    }
    for (name, values) in kept.iter() {
        let key: &str = name.as_ref();
        if added.iter().any(|(k, _)| k.eq_ignore_ascii_case(key)) {
            continue;
        }
        for v in values {
            match space(used, key) {
                Some(left) if left >= v.as_str().len() => {
                    used = used.max(BLOCK_FRAMING) + key.len() + v.as_str().len() + LINE_FRAMING;
                    out.append(name.clone(), v.clone());
                }
                _ => trimmed.dropped += 1,
            }
        }
    }
    Ok((out, trimmed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn added(reason: &str) -> Vec<(&'static str, String)> {
        vec![
            ("Eventbus-Original-Subject", "orders.created".into()),
            ("Eventbus-Original-Stream", "ORDERS".into()),
            ("Eventbus-Original-Sequence", "42".into()),
            ("Eventbus-Delivery-Count", "5".into()),
            ("Eventbus-Error", reason.into()),
        ]
    }

    #[test]
    fn the_length_is_the_serialized_block() {
        let mut h = HeaderMap::new();
        assert_eq!(headers_len(&h), 0);
        h.insert("A", "1");
        h.append("Bb", "22");
        h.append("Bb", "333");
        // What async-nats writes for this map (its own serializer is crate-private).
        let wire = "NATS/1.0\r\nA: 1\r\nBb: 22\r\nBb: 333\r\n\r\n";
        assert_eq!(headers_len(&h), wire.len());
        assert!(check_fits("m", &h, 100 - wire.len(), 100).is_ok());
        let e = check_fits("the message", &h, 101 - wire.len(), 100).unwrap_err();
        assert!(e.to_string().contains("max_payload of 100"), "{e}");
    }

    #[test]
    fn a_copy_that_fits_keeps_everything() {
        let mut kept = HeaderMap::new();
        kept.insert("X-Tenant", "t1");
        let (h, t) = fit_dead_letter(kept, &added("boom"), 10, 1024).unwrap();
        assert_eq!(t, Trimmed::default());
        assert_eq!(h.get("X-Tenant").unwrap().as_str(), "t1");
        assert_eq!(h.get("Eventbus-Error").unwrap().as_str(), "boom");
    }

    #[test]
    fn a_tight_copy_keeps_the_origin_and_cuts_the_reason_then_drops_the_original_headers() {
        let mut kept = HeaderMap::new();
        kept.insert("X-Big", "v".repeat(300).as_str());
        let reason = "é".repeat(256);
        let max = 1000;
        for payload in [100, 500, 700, 850] {
            let (h, t) = fit_dead_letter(kept.clone(), &added(&reason), payload, max).unwrap();
            assert!(headers_len(&h) + payload <= max, "{payload}: {h:?}");
            assert!(t.any(), "{payload}");
            if payload <= 700 {
                for k in [
                    "Eventbus-Original-Stream",
                    "Eventbus-Original-Sequence",
                    "Eventbus-Delivery-Count",
                    "Eventbus-Original-Subject",
                ] {
                    assert!(h.get(k).is_some(), "{payload}: {k} in {h:?}");
                }
                let r = h.get("Eventbus-Error").unwrap().as_str();
                assert!(!r.is_empty() && reason.starts_with(r), "{payload}");
                assert_eq!(r.len() < reason.len(), payload >= 500, "{payload}");
            }
        }
        // Exactly the payload: nothing else fits, the copy goes bare.
        let (h, t) = fit_dead_letter(kept.clone(), &added(&reason), max, max).unwrap();
        assert!(h.is_empty());
        assert_eq!(t.dropped, 6);
    }

    #[test]
    fn a_payload_over_the_limit_cannot_be_copied() {
        let e = fit_dead_letter(HeaderMap::new(), &added("x"), 1001, 1000).unwrap_err();
        assert!(matches!(e, NatsError::TooLarge { size: 1001, .. }), "{e}");
    }
}
