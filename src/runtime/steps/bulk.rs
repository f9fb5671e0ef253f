//! What bulk publish and bulk ack share: when a partly failed call fails the step, and how the
//! error names the items that failed.

use super::StepOutput;
use crate::nats::ack::AckKind;
use crate::pb::eventbus::{AckResponse, BulkAckResult};
use crate::runtime::types::StepKind;
use crate::runtime::RuntimeError;

/// The most items one bulk call takes: past this a list is more likely a mistake (a whole
/// table fed in) than a batch, and its results would not fit the host's message limit.
pub const MAX_ITEMS: usize = 10_000;

/// How many failed items an error message lists by name before summarising the rest.
const NAMED_FAILURES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOn {
    /// The step fails when any item failed (default): nothing is silently half done.
    Any,
    /// The step fails only when every item failed.
    All,
    /// The step never fails for item errors; the results say which failed.
    None,
}

impl FailOn {
    pub fn parse(s: &str) -> Result<FailOn, String> {
        match s {
            "" | "any" => Ok(FailOn::Any),
            "all" => Ok(FailOn::All),
            "none" => Ok(FailOn::None),
            other => Err(format!(
                "{} is not valid; use any (fail when one item failed), all (fail when every item failed) or none (never; read the results)",
                crate::secret::quote(other)
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            FailOn::Any => "any",
            FailOn::All => "all",
            FailOn::None => "none",
        }
    }

    pub fn fails(self, failed: usize, total: usize) -> bool {
        match self {
            FailOn::Any => failed > 0,
            FailOn::All => total > 0 && failed == total,
            FailOn::None => false,
        }
    }
}

/// `3 of 100 messages failed (fail_on: any): #4 subject ...; #17 ...; and 1 more`.
pub fn failure_summary<'a>(
    what: &str,
    total: usize,
    fail_on: FailOn,
    failures: impl Iterator<Item = (usize, &'a str)>,
) -> String {
    let failures: Vec<_> = failures.collect();
    let mut s = format!(
        "{} of {total} {what} failed (fail_on: {}): ",
        failures.len(),
        fail_on.name()
    );
    let named: Vec<String> = failures
        .iter()
        .take(NAMED_FAILURES)
        .map(|(i, e)| format!("#{i} {e}"))
        .collect();
    s.push_str(&named.join("; "));
    if failures.len() > NAMED_FAILURES {
        s.push_str(&format!(
            "; and {} more (see results)",
            failures.len() - NAMED_FAILURES
        ));
    }
    s
}

/// The in-flight window of a bulk call: at least 1, at most `max`, `default` when unset.
pub fn window(configured: i32, default: usize, max: usize) -> usize {
    if configured <= 0 {
        default
    } else {
        (configured as usize).min(max)
    }
}

/// The bulk ack's result, whichever provider settled the tokens: the step fails per `fail_on`
/// with a summary of the failed tokens, else one result per token in list order.
pub(crate) fn ack_output(
    component: &str,
    kind: AckKind,
    fail_on: FailOn,
    results: Vec<BulkAckResult>,
) -> Result<StepOutput, RuntimeError> {
    let total = results.len();
    let failed = results.iter().filter(|r| !r.error.is_empty()).count();
    if fail_on.fails(failed, total) {
        return Err(RuntimeError::failed(
            component,
            failure_summary(
                "ack tokens",
                total,
                fail_on,
                results
                    .iter()
                    .filter(|r| !r.error.is_empty())
                    .map(|r| (r.index as usize, r.error.as_str())),
            ),
        ));
    }
    let out = AckResponse {
        action: kind.name().to_string(),
        acked: (total - failed) as i32,
        failed: failed as i32,
        results,
    };
    Ok(StepOutput {
        typed: StepKind::Ack.pack_output(&out),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fail_on_rules() {
        assert!(FailOn::Any.fails(1, 100));
        assert!(!FailOn::Any.fails(0, 100));
        assert!(!FailOn::All.fails(99, 100));
        assert!(FailOn::All.fails(100, 100));
        assert!(!FailOn::None.fails(100, 100));
        assert_eq!(FailOn::parse("").unwrap(), FailOn::Any);
        assert!(FailOn::parse("some").unwrap_err().contains("any"));
    }

    #[test]
    fn summary_names_the_first_failures() {
        let errs: Vec<(usize, String)> = (0..7).map(|i| (i * 10, format!("e{i}"))).collect();
        let s = failure_summary(
            "messages",
            100,
            FailOn::Any,
            errs.iter().map(|(i, e)| (*i, e.as_str())),
        );
        assert!(
            s.starts_with("7 of 100 messages failed (fail_on: any): #0 e0; #10 e1"),
            "{s}"
        );
        assert!(s.ends_with("and 2 more (see results)"), "{s}");
    }
}
