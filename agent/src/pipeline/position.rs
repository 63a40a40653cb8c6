//! The replication positions the apply loop keeps, and the rules for what may be confirmed to
//! PostgreSQL. Confirming an LSN lets the server discard the WAL before it, so a position is
//! confirmed only when every change before it is committed to Iceberg. Pure bookkeeping, so
//! the rules are tested without a server.

use crate::model::Lsn;

/// The last transaction fully received: its commit LSN and the LSN just past it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Committed {
    /// Commit LSN (what the tables record as `philotes.lsn`).
    pub lsn: Lsn,
    /// End of the commit record: where the stream resumes after it.
    pub end_lsn: Lsn,
}

/// Received and confirmed positions.
#[derive(Debug, Default)]
pub(super) struct Positions {
    last: Committed,
    confirmed: Lsn,
}

impl Positions {
    /// Start from the slot's confirmed position.
    pub fn new(confirmed: Lsn) -> Self {
        Self {
            last: Committed::default(),
            confirmed,
        }
    }

    /// A transaction's commit was received (its changes may still be buffered).
    pub fn received(&mut self, lsn: Lsn, end_lsn: Lsn) {
        self.last = Committed { lsn, end_lsn };
    }

    /// The last transaction fully received.
    pub fn last(&self) -> Committed {
        self.last
    }

    /// The position confirmed to the server so far: a restart streams nothing before it.
    pub fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// After a flush: the end of the last complete transaction, once nothing received is
    /// still uncommitted and it moves forward.
    pub fn ack_point(&self, uncommitted: bool) -> Option<Lsn> {
        (!uncommitted && self.last.end_lsn > self.confirmed).then_some(self.last.end_lsn)
    }

    /// At a keepalive or heartbeat: the server has sent everything before `lsn`; with no
    /// transaction open and nothing uncommitted it can be confirmed, so an idle slot (or one
    /// whose changes are all filtered out) does not retain WAL.
    pub fn idle_point(&self, lsn: Lsn, txn_open: bool, uncommitted: bool) -> Option<Lsn> {
        (!txn_open && !uncommitted && lsn > self.confirmed).then_some(lsn)
    }

    /// Record that `lsn` was confirmed.
    pub fn confirm(&mut self, lsn: Lsn) {
        self.confirmed = self.confirmed.max(lsn);
    }
}

/// Exactly-once across restarts: a change of a transaction at or below the table's committed
/// `philotes.lsn` is already in the table and is skipped.
pub(super) fn already_committed(change_lsn: Lsn, table_lsn: Lsn) -> bool {
    change_lsn <= table_lsn
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_confirmed_while_a_change_is_uncommitted() {
        let mut p = Positions::new(Lsn(100));
        p.received(Lsn(200), Lsn(210));
        assert_eq!(
            p.ack_point(true),
            None,
            "buffered changes hold the position back"
        );
        assert_eq!(
            p.ack_point(false),
            Some(Lsn(210)),
            "then the end of the last transaction"
        );
        p.confirm(Lsn(210));
        assert_eq!(p.ack_point(false), None, "nothing new to confirm");
    }

    #[test]
    fn the_confirmed_position_never_moves_back() {
        let mut p = Positions::new(Lsn(500));
        // A replayed transaction below the slot's position (after a restart).
        p.received(Lsn(300), Lsn(310));
        assert_eq!(p.ack_point(false), None);
        p.confirm(Lsn(310));
        assert_eq!(p.confirmed(), Lsn(500));
        assert_eq!(p.idle_point(Lsn(400), false, false), None);
    }

    #[test]
    fn an_idle_point_is_confirmed_only_between_transactions_with_nothing_buffered() {
        let mut p = Positions::new(Lsn(100));
        assert_eq!(
            p.idle_point(Lsn(150), true, false),
            None,
            "inside a transaction"
        );
        assert_eq!(
            p.idle_point(Lsn(150), false, true),
            None,
            "changes not yet committed"
        );
        assert_eq!(p.idle_point(Lsn(150), false, false), Some(Lsn(150)));
        p.confirm(Lsn(150));
        assert_eq!(
            p.idle_point(Lsn(150), false, false),
            None,
            "already confirmed"
        );
    }

    #[test]
    fn a_flush_confirms_the_commit_end_not_the_commit_lsn() {
        let mut p = Positions::new(Lsn(0));
        p.received(Lsn(1000), Lsn(1040));
        p.received(Lsn(2000), Lsn(2040));
        assert_eq!(
            p.last(),
            Committed {
                lsn: Lsn(2000),
                end_lsn: Lsn(2040)
            }
        );
        // Resuming at the end skips the whole transaction; at its commit LSN it would be sent
        // again (and skipped by `already_committed`).
        assert_eq!(p.ack_point(false), Some(Lsn(2040)));
    }

    #[test]
    fn replayed_changes_at_or_below_the_table_position_are_skipped() {
        assert!(already_committed(Lsn(1000), Lsn(1000)));
        assert!(already_committed(Lsn(999), Lsn(1000)));
        assert!(!already_committed(Lsn(1001), Lsn(1000)));
        assert!(!already_committed(Lsn(1), Lsn(0)));
    }
}
