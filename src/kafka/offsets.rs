//! Per-message settlement over Kafka's cumulative offsets.
//!
//! A committed offset is the next offset a group reads, per partition, and committing N covers
//! everything below N. Messages are settled one by one and out of order, so the tracker keeps,
//! per assigned partition, the offsets handed out and not yet settled, and the commit point is
//! the lowest unsettled offset (or one past the highest offset seen when nothing is pending).
//! Offsets may have gaps (compaction, transaction markers): only offsets seen count.
//!
//! Every assignment of a partition gets a new epoch; a settle carrying an older epoch is stale
//! (the partition went to another member or came back after a rebalance, and the message will be
//! delivered again from the committed point), so it is refused instead of moving the new
//! assignment's commit point. Pure: no I/O, no clock.

use std::collections::{BTreeSet, HashMap};

/// A topic partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    pub topic: String,
    pub partition: i32,
}

impl TopicPartition {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SettleError {
    /// The partition is not assigned to this member (any more).
    NotAssigned,
    /// The partition was re-assigned since the message was handed out.
    StaleEpoch { current: u64 },
    /// Settled already, or never handed out.
    NotPending,
}

impl std::fmt::Display for SettleError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettleError::NotAssigned => f.write_str(
                "the partition is no longer assigned to this consumer (a rebalance moved it); \
                 the message will be delivered again",
            ),
            SettleError::StaleEpoch { .. } => f.write_str(
                "the partition was re-assigned since this message was delivered; it will be \
                 delivered again",
            ),
            SettleError::NotPending => f.write_str("the message is already settled"),
        }
    }
}

#[derive(Clone, Debug, Default)]
struct PartState {
    epoch: u64,
    /// Handed out (or held for later delivery) and not yet settled.
    unsettled: BTreeSet<i64>,
    /// One past the highest offset seen in this assignment; None until the first record.
    next: Option<i64>,
    /// The last commit point written (or read at assignment); commits only move forward.
    committed: Option<i64>,
}

impl PartState {
    fn point(&self) -> Option<i64> {
        self.unsettled.first().copied().or(self.next)
    }
}

#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: HashMap<TopicPartition, PartState>,
    epochs: u64,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The partition is ours (again), starting at `committed` when known. Anything tracked from
    /// an earlier assignment is forgotten. Returns the new epoch.
    pub fn assign(&mut self, tp: TopicPartition, committed: Option<i64>) -> u64 {
        self.epochs += 1;
        let epoch = self.epochs;
        self.parts.insert(
            tp,
            PartState {
                epoch,
                committed: committed.filter(|o| *o >= 0),
                ..Default::default()
            },
        );
        epoch
    }

    /// The partition is taken away: returns the commit point to write before letting go (None
    /// when it would not move the committed offset). Unsettled messages are dropped: the next
    /// owner reads them again from that point.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        let st = self.parts.remove(tp)?;
        let p = st.point()?;
        (st.committed.is_none_or(|c| p > c)).then_some(p)
    }

    pub fn epoch(&self, tp: &TopicPartition) -> Option<u64> {
        self.parts.get(tp).map(|s| s.epoch)
    }

    pub fn is_assigned(&self, tp: &TopicPartition) -> bool {
        self.parts.contains_key(tp)
    }

    /// A record was read and is handed out (or held): it blocks the commit point until settled.
    /// Returns the epoch to put in its token; None when the partition is not assigned (a record
    /// fetched just before a revoke: drop it, it will be read again).
    pub fn track(&mut self, tp: &TopicPartition, offset: i64) -> Option<u64> {
        let st = self.parts.get_mut(tp)?;
        st.next = Some(st.next.map_or(offset + 1, |n| n.max(offset + 1)));
        st.unsettled.insert(offset);
        Some(st.epoch)
    }

    /// A record was read and needs no handling (filtered out, or a retry copy for another
    /// group): it moves the commit point like a settled one.
    pub fn pass_over(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        let Some(st) = self.parts.get_mut(tp) else {
            return false;
        };
        st.next = Some(st.next.map_or(offset + 1, |n| n.max(offset + 1)));
        true
    }

    /// Settles one handed-out offset of the given assignment epoch.
    pub fn settle(
        &mut self,
        tp: &TopicPartition,
        epoch: u64,
        offset: i64,
    ) -> Result<(), SettleError> {
        let st = self.parts.get_mut(tp).ok_or(SettleError::NotAssigned)?;
        if st.epoch != epoch {
            return Err(SettleError::StaleEpoch { current: st.epoch });
        }
        if st.unsettled.remove(&offset) {
            Ok(())
        } else {
            Err(SettleError::NotPending)
        }
    }

    /// Whether `offset` is handed out and unsettled in the given epoch.
    pub fn is_pending(&self, tp: &TopicPartition, epoch: u64, offset: i64) -> bool {
        self.parts
            .get(tp)
            .is_some_and(|s| s.epoch == epoch && s.unsettled.contains(&offset))
    }

    /// Commit points that would move a partition's committed offset forward, sorted.
    pub fn commit_points(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<(TopicPartition, i64)> = self
            .parts
            .iter()
            .filter_map(|(tp, st)| {
                let p = st.point()?;
                st.committed.is_none_or(|c| p > c).then(|| (tp.clone(), p))
            })
            .collect();
        out.sort();
        out
    }

    /// Records a successful commit (a late result for a revoked partition is ignored).
    pub fn committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(st) = self.parts.get_mut(tp) {
            st.committed = Some(st.committed.map_or(offset, |c| c.max(offset)));
        }
    }

    /// Unsettled messages over all partitions.
    pub fn unsettled(&self) -> usize {
        self.parts.values().map(|s| s.unsettled.len()).sum()
    }

    pub fn assigned(&self) -> Vec<TopicPartition> {
        let mut v: Vec<_> = self.parts.keys().cloned().collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("orders", p)
    }

    #[test]
    fn commit_point_is_the_lowest_unsettled_offset() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0), None);
        for o in 10..15 {
            assert_eq!(t.track(&tp(0), o), Some(e));
        }
        assert_eq!(t.commit_points(), vec![(tp(0), 10)]);
        // Settling out of order: 12 and 13 first; the point stays at 10.
        t.settle(&tp(0), e, 12).unwrap();
        t.settle(&tp(0), e, 13).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 10)]);
        t.settle(&tp(0), e, 10).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 11)]);
        t.settle(&tp(0), e, 11).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 14)]);
        t.settle(&tp(0), e, 14).unwrap();
        assert_eq!(
            t.commit_points(),
            vec![(tp(0), 15)],
            "all settled: one past the last"
        );
        assert_eq!(t.unsettled(), 0);
    }

    #[test]
    fn commits_only_move_forward_and_are_not_repeated() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0), Some(5));
        assert!(t.commit_points().is_empty(), "nothing seen yet");
        t.track(&tp(0), 5);
        assert!(
            t.commit_points().is_empty(),
            "5 unsettled: point 5 = committed"
        );
        t.settle(&tp(0), e, 5).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 6)]);
        t.committed(&tp(0), 6);
        assert!(t.commit_points().is_empty());
        // A late, older commit result does not move it back.
        t.committed(&tp(0), 3);
        t.pass_over(&tp(0), 6);
        assert_eq!(t.commit_points(), vec![(tp(0), 7)]);
    }

    #[test]
    fn passed_over_records_move_the_point_but_never_past_an_unsettled_one() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(1), None);
        t.track(&tp(1), 0);
        assert!(t.pass_over(&tp(1), 1));
        assert!(t.pass_over(&tp(1), 2));
        assert_eq!(t.commit_points(), vec![(tp(1), 0)]);
        t.settle(&tp(1), e, 0).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(1), 3)]);
        // Gaps (compaction, markers): only what was seen counts.
        t.track(&tp(1), 10);
        t.settle(&tp(1), e, 10).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(1), 11)]);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        let e0 = t.assign(tp(0), None);
        let e1 = t.assign(tp(1), None);
        assert_ne!(e0, e1);
        t.track(&tp(0), 0);
        t.track(&tp(1), 0);
        t.track(&tp(1), 1);
        t.settle(&tp(1), e1, 0).unwrap();
        t.settle(&tp(1), e1, 1).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 0), (tp(1), 2)]);
        assert_eq!(
            t.settle(&tp(0), e1, 0),
            Err(SettleError::StaleEpoch { current: e0 }),
            "an epoch of another partition is stale here"
        );
    }

    #[test]
    fn revoke_returns_the_settled_point_and_drops_the_rest() {
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0), Some(0));
        for o in 0..4 {
            t.track(&tp(0), o);
        }
        t.settle(&tp(0), e, 0).unwrap();
        t.settle(&tp(0), e, 2).unwrap();
        // 1 and 3 unsettled: commit 1; 1, 2 and 3 are read again by the next owner.
        assert_eq!(t.revoke(&tp(0)), Some(1));
        assert_eq!(t.settle(&tp(0), e, 1), Err(SettleError::NotAssigned));
        assert_eq!(
            t.track(&tp(0), 4),
            None,
            "a record after revoke is not tracked"
        );
        assert!(!t.pass_over(&tp(0), 4));
        assert_eq!(t.unsettled(), 0);
        // Nothing settled beyond the committed point: nothing to commit.
        let e = t.assign(tp(0), Some(1));
        t.track(&tp(0), 1);
        assert_eq!(t.revoke(&tp(0)), None);
        // Revoking an unknown partition is harmless.
        assert_eq!(t.revoke(&tp(9)), None);
        let _ = e;
    }

    #[test]
    fn a_settle_from_before_a_reassignment_is_stale() {
        let mut t = OffsetTracker::new();
        let old = t.assign(tp(0), None);
        t.track(&tp(0), 7);
        t.revoke(&tp(0));
        let new = t.assign(tp(0), None);
        t.track(&tp(0), 7);
        assert_eq!(
            t.settle(&tp(0), old, 7),
            Err(SettleError::StaleEpoch { current: new })
        );
        assert!(t.is_pending(&tp(0), new, 7));
        t.settle(&tp(0), new, 7).unwrap();
        assert_eq!(t.settle(&tp(0), new, 7), Err(SettleError::NotPending));
        assert_eq!(t.settle(&tp(0), new, 99), Err(SettleError::NotPending));
    }

    #[test]
    fn redelivered_records_after_a_rebalance_do_not_move_the_point_backwards() {
        // The committed point was 5; the new owner re-reads 5.. and must not commit below 5.
        let mut t = OffsetTracker::new();
        let e = t.assign(tp(0), Some(5));
        t.track(&tp(0), 5);
        t.track(&tp(0), 6);
        t.settle(&tp(0), e, 6).unwrap();
        assert!(t.commit_points().is_empty());
        t.settle(&tp(0), e, 5).unwrap();
        assert_eq!(t.commit_points(), vec![(tp(0), 7)]);
        // A negative "committed" (librdkafka's Invalid/-1001 mapped by the caller) is unknown.
        let mut t = OffsetTracker::new();
        t.assign(tp(0), Some(-1001));
        t.pass_over(&tp(0), 0);
        assert_eq!(t.commit_points(), vec![(tp(0), 1)]);
    }

    #[test]
    fn model_check_against_a_brute_force_oracle() {
        // A small deterministic pseudo-random walk over track/settle/pass_over, checked
        // against the definition: the point is the first offset seen and not settled, or one
        // past the last seen.
        let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _round in 0..200 {
            let mut t = OffsetTracker::new();
            let e = t.assign(tp(0), None);
            let mut seen: Vec<(i64, bool)> = Vec::new(); // (offset, settled)
            let mut next = 0i64;
            for _ in 0..40 {
                match rnd(3) {
                    0 => {
                        next += 1 + rnd(2) as i64; // gaps happen
                        t.track(&tp(0), next);
                        seen.push((next, false));
                    }
                    1 => {
                        next += 1;
                        t.pass_over(&tp(0), next);
                        seen.push((next, true));
                    }
                    _ => {
                        let open: Vec<usize> = (0..seen.len()).filter(|i| !seen[*i].1).collect();
                        if !open.is_empty() {
                            let i = open[rnd(open.len() as u64) as usize];
                            t.settle(&tp(0), e, seen[i].0).unwrap();
                            seen[i].1 = true;
                        }
                    }
                }
                let want = seen
                    .iter()
                    .find(|(_, s)| !s)
                    .map(|(o, _)| *o)
                    .or(seen.last().map(|(o, _)| o + 1));
                let got = t.commit_points().first().map(|(_, o)| *o);
                assert_eq!(got, want, "{seen:?}");
            }
        }
    }
}
