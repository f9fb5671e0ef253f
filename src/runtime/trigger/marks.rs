//! What the pipelines of running batches did with their messages: held by the batch trigger,
//! marked by the ack step, read back when the run ends. A leaf both sides take.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// What a pipeline did with one message of its batch through `step.eventbus.ack`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mark {
    /// Untouched: the run's outcome decides.
    Held,
    /// Naked by the pipeline: the trigger's failure rules apply.
    Failed,
    /// Acked or terminated by the pipeline: the trigger sends nothing more.
    Settled,
}

/// Tokens of messages held by running batches, shared by the trigger and the ack step.
#[derive(Default)]
pub struct Marks {
    /// Tokens held, so acks outside batch runs skip the lock.
    held: AtomicUsize,
    map: Mutex<HashMap<String, Mark>>,
}

impl Marks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Mark>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn hold<'a>(&self, tokens: impl Iterator<Item = &'a str>) {
        let mut map = self.lock();
        for t in tokens {
            if map.insert(t.to_string(), Mark::Held).is_none() {
                self.held.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Records a nak of a held message; false when the token is not held (the nak is sent).
    pub fn mark_failed(&self, token: &str) -> bool {
        if self.held.load(Ordering::Relaxed) == 0 {
            return false;
        }
        match self.lock().get_mut(token) {
            Some(m @ (Mark::Held | Mark::Failed)) => {
                *m = Mark::Failed;
                true
            }
            _ => false,
        }
    }

    pub fn mark_settled(&self, token: &str) {
        if self.held.load(Ordering::Relaxed) == 0 {
            return;
        }
        if let Some(m) = self.lock().get_mut(token) {
            *m = Mark::Settled;
        }
    }

    /// Stops holding the tokens; their marks in the same order.
    pub fn release(&self, tokens: &[String]) -> Vec<Mark> {
        let mut map = self.lock();
        tokens
            .iter()
            .map(|t| match map.remove(t) {
                Some(m) => {
                    self.held.fetch_sub(1, Ordering::Relaxed);
                    m
                }
                None => Mark::Held,
            })
            .collect()
    }

    /// Tokens still ours to settle when the run ends (held or marked failed).
    pub(super) fn unsettled(&self, tokens: &[String]) -> Vec<String> {
        let map = self.lock();
        tokens
            .iter()
            .filter(|t| matches!(map.get(*t), Some(Mark::Held | Mark::Failed)))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_follow_the_pipeline() {
        let m = Marks::default();
        let tokens: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert!(!m.mark_failed("a"), "nothing held: the nak is sent");
        m.hold(tokens.iter().map(String::as_str));
        assert!(m.mark_failed("a"));
        m.mark_settled("b");
        assert!(!m.mark_failed("b"), "settled stays settled");
        assert!(!m.mark_failed("zzz"));
        assert_eq!(m.unsettled(&tokens), vec!["a".to_string(), "c".to_string()]);
        assert_eq!(
            m.release(&tokens),
            vec![Mark::Failed, Mark::Settled, Mark::Held]
        );
        assert_eq!(m.held.load(Ordering::Relaxed), 0);
        assert!(!m.mark_failed("a"));
    }
}
