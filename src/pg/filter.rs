//! Consumer subject filters and their SQL.
//!
//! Kept from the Go plugin: an entry may be a comma list, `prefix.>` matches below prefix,
//! anything else is an exact subject. Not kept: `*` was passed through to SQL unchecked and
//! `%`/`_` in a prefix were LIKE wildcards. Here `*` is refused when the consumer is defined,
//! and the LIKE pattern escapes `\`, `%` and `_`.

use super::PgError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubjectFilter {
    Exact(String),
    /// `prefix.>`: the prefix without the trailing `.>`.
    Below(String),
    /// `>` alone: everything.
    All,
}

impl SubjectFilter {
    pub fn matches(&self, subject: &str) -> bool {
        match self {
            SubjectFilter::Exact(s) => s == subject,
            SubjectFilter::Below(p) => subject
                .strip_prefix(p.as_str())
                .is_some_and(|r| r.starts_with('.') && r.len() > 1),
            SubjectFilter::All => true,
        }
    }

    /// The LIKE pattern of a `Below` filter, with the default escape character `\`.
    pub(crate) fn like_pattern(prefix: &str) -> String {
        let mut out = String::with_capacity(prefix.len() + 3);
        for c in prefix.chars() {
            if matches!(c, '\\' | '%' | '_') {
                out.push('\\');
            }
            out.push(c);
        }
        out.push_str(".%");
        out
    }
}

/// Parses a consumer's filters; empty means everything.
pub fn parse_filters(entries: &[String]) -> Result<Vec<SubjectFilter>, PgError> {
    let mut out = Vec::new();
    for entry in entries {
        for part in entry.split(',') {
            let f = part.trim();
            if f.is_empty() {
                continue;
            }
            out.push(parse_one(f)?);
        }
    }
    Ok(out)
}

fn parse_one(f: &str) -> Result<SubjectFilter, PgError> {
    let tokens: Vec<&str> = f.split('.').collect();
    if tokens.iter().any(|t| t.contains('*')) {
        return Err(PgError::invalid(format!(
            "filter_subject {f:?}: `*` wildcards are not supported by pgchannel; use a literal \
             subject, a comma list, or a `prefix.>` filter"
        )));
    }
    if tokens.iter().any(|t| t.is_empty()) {
        return Err(PgError::invalid(format!(
            "filter_subject {f:?}: empty token (subjects are dot-separated words)"
        )));
    }
    if f == ">" {
        return Ok(SubjectFilter::All);
    }
    let gt = tokens.iter().position(|t| t.contains('>'));
    match gt {
        None => Ok(SubjectFilter::Exact(f.to_string())),
        Some(i) if i == tokens.len() - 1 && tokens[i] == ">" => {
            Ok(SubjectFilter::Below(tokens[..i].join(".")))
        }
        Some(_) => Err(PgError::invalid(format!(
            "filter_subject {f:?}: `>` must be the last token, alone (e.g. \"orders.>\")"
        ))),
    }
}

/// SQL parameters for [`FILTER_SQL`]: (match everything, exact subjects, LIKE patterns).
pub(crate) fn sql_params(filters: &[SubjectFilter]) -> (bool, Vec<String>, Vec<String>) {
    let mut all = filters.is_empty();
    let mut exact = Vec::new();
    let mut like = Vec::new();
    for f in filters {
        match f {
            SubjectFilter::All => all = true,
            SubjectFilter::Exact(s) => exact.push(s.clone()),
            SubjectFilter::Below(p) => like.push(SubjectFilter::like_pattern(p)),
        }
    }
    (all, exact, like)
}

/// Subject predicate on `e.subject` with three parameters starting at `$n`; constant text so
/// the prepared statement is shared by every consumer.
pub(crate) fn filter_sql(n: usize) -> String {
    format!(
        "(${n}::bool OR e.subject = ANY(${}::text[]) OR e.subject LIKE ANY(${}::text[]))",
        n + 1,
        n + 2
    )
}

/// NATS subject matching for stream subjects (`*` one token, `>` the rest), used to find the
/// stream that owns a published subject.
pub(crate) fn stream_subject_matches(pattern: &str, subject: &str) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_filter_syntax_parses_and_star_is_refused() {
        let f = parse_filters(&["a.b, c.>".to_string()]).unwrap();
        assert_eq!(
            f,
            vec![
                SubjectFilter::Exact("a.b".into()),
                SubjectFilter::Below("c".into())
            ]
        );
        let e = parse_filters(&["a.*".to_string()]).unwrap_err().to_string();
        assert!(e.contains("a.*") && e.contains("not supported"), "{e}");
        assert!(parse_filters(&["a.>.b".to_string()]).is_err());
        assert_eq!(
            parse_filters(&[">".into()]).unwrap(),
            vec![SubjectFilter::All]
        );
    }

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(SubjectFilter::like_pattern("a_b%c\\d"), "a\\_b\\%c\\\\d.%");
        assert!(SubjectFilter::Below("a_b".into()).matches("a_b.x"));
        assert!(!SubjectFilter::Below("a_b".into()).matches("aXb.x"));
        assert!(!SubjectFilter::Below("a".into()).matches("a"));
    }

    #[test]
    fn stream_subjects_match_like_nats() {
        assert!(stream_subject_matches("orders.>", "orders.eu.new"));
        assert!(!stream_subject_matches("orders.>", "orders"));
        assert!(stream_subject_matches("orders.*", "orders.eu"));
        assert!(!stream_subject_matches("orders.*", "orders.eu.x"));
        assert!(stream_subject_matches("a.b", "a.b"));
    }
}
