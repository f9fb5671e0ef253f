//! Subjects on Kafka: a record carries its subject in a header (and, by default, as its key, so
//! one subject keeps its order within a partition); consumers filter on it in the plugin with
//! the NATS wildcard rules (`*` one token, `>` the rest), and a stream's `subjects` patterns
//! pick the topic a subject is published to, as on NATS.

/// Record headers the plugin writes and reads. User headers with these names are refused at
/// publish (they would be taken for the plugin's own).
pub const SUBJECT_HEADER: &str = "eventbus.subject";
pub const CORRELATION_HEADER: &str = "eventbus.correlation_id";
pub const MSG_ID_HEADER: &str = "eventbus.msg_id";
/// Deliveries before this copy was written (absent: 0). A nak re-produces the record with the
/// count raised, so the count survives a restart of the plugin.
pub const DELIVERY_COUNT_HEADER: &str = "eventbus.delivery_count";
/// Unix milliseconds before which a retry copy is not handed out.
pub const NOT_BEFORE_HEADER: &str = "eventbus.not_before";
/// `<partition>:<offset>` of the record a retry copy stands for (the first of its chain), so
/// every delivery of one message reports the same position.
pub const ORIGIN_HEADER: &str = "eventbus.origin";
/// The consumer group a retry copy is for; other groups pass over it.
pub const RETRY_GROUP_HEADER: &str = "eventbus.retry_group";
/// Dead-letter copies: where the record came from and why it was given up.
pub const DLQ_TOPIC_HEADER: &str = "eventbus.dlq.topic";
pub const DLQ_PARTITION_HEADER: &str = "eventbus.dlq.partition";
pub const DLQ_OFFSET_HEADER: &str = "eventbus.dlq.offset";
pub const DLQ_GROUP_HEADER: &str = "eventbus.dlq.group";
pub const DLQ_REASON_HEADER: &str = "eventbus.dlq.reason";

/// Header names reserved for the plugin.
pub fn is_reserved_header(name: &str) -> bool {
    name.starts_with("eventbus.")
}

/// NATS subject matching: `pattern` may hold `*` (exactly one token) and a final `>` (one or
/// more tokens); anything else matches literally.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether any of `filters` matches (an empty filter list matches everything).
pub fn any_matches(filters: &[String], subject: &str) -> bool {
    filters.is_empty() || filters.iter().any(|f| subject_matches(f, subject))
}

/// The topic whose subject patterns match `subject`, first declared first.
pub fn pick_topic<'a>(
    topics: impl IntoIterator<Item = (&'a str, &'a [String])>,
    subject: &str,
) -> Option<&'a str> {
    topics
        .into_iter()
        .find(|(_, pats)| pats.iter().any(|p| subject_matches(p, subject)))
        .map(|(t, _)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_wildcards() {
        assert!(subject_matches("orders.created", "orders.created"));
        assert!(!subject_matches("orders.created", "orders.created.eu"));
        assert!(subject_matches("orders.*", "orders.created"));
        assert!(!subject_matches("orders.*", "orders"));
        assert!(!subject_matches("orders.*", "orders.created.eu"));
        assert!(subject_matches("orders.>", "orders.created.eu"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches(">", "anything.at.all"));
        assert!(subject_matches("*.created", "orders.created"));
        assert!(!subject_matches("*.created", "orders.updated"));
        assert!(subject_matches("a.*.c.>", "a.b.c.d.e"));
        assert!(!subject_matches("a.*.c.>", "a.b.x.d"));
        assert!(any_matches(&[], "x"));
        assert!(any_matches(&["y".into(), "x".into()], "x"));
        assert!(!any_matches(&["y".into()], "x"));
    }

    #[test]
    fn the_first_matching_stream_takes_the_subject() {
        let a = vec!["orders.>".to_string()];
        let b = vec!["orders.eu.*".to_string(), "billing.*".to_string()];
        let topics = [("orders", a.as_slice()), ("eu", b.as_slice())];
        assert_eq!(pick_topic(topics, "orders.eu.created"), Some("orders"));
        assert_eq!(pick_topic(topics, "billing.paid"), Some("eu"));
        assert_eq!(pick_topic(topics, "shipping.sent"), None);
    }

    #[test]
    fn reserved_headers() {
        assert!(is_reserved_header(SUBJECT_HEADER));
        assert!(is_reserved_header(DLQ_REASON_HEADER));
        assert!(!is_reserved_header("traceparent"));
    }
}
