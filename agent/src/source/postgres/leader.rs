//! Leadership of a pipeline among agents running one configuration (`[ha]`), from PostgreSQL
//! itself: a session-level advisory lock keyed by the slot name. The session that holds it
//! leads; it proves it is alive by running a query now and then (its `query_start` in
//! `pg_stat_activity` moves), so a standby can tell a dead or cut-off leader from a busy one
//! without any other coordination service. A session ends with its process, so a killed
//! leader's lock is free at once; a partitioned one is terminated by the standby.

use std::time::Duration;

use super::conn::SourceUrl;
use super::session::{Session, SourceError};

/// First key of every philotes lock (`'phlt'`), so they never collide with an application's
/// single-key locks and are easy to find in `pg_locks`.
const LOCK_CLASS: i32 = 0x7068_6c74;

/// The advisory lock of one slot, on its own plain SQL session.
pub struct LeaderLock {
    session: Session,
    key: i32,
    slot: String,
}

/// Who holds the lock when this session could not take it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Holder {
    /// The leader's backend pid.
    pub pid: i32,
    /// Since the leader's last query (its heartbeat) started.
    pub silent: Duration,
}

/// The lock's second key: the slot name hashed (FNV-1a, stable across builds and hosts).
pub fn lock_key(slot: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in slot.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // pg_locks shows the keys as oids: keep them non-negative so they read the same.
    (h & 0x7fff_ffff) as i32
}

impl LeaderLock {
    /// Open the lock's session for `slot` (nothing is locked yet).
    pub async fn connect(url: &SourceUrl, slot: &str) -> Result<Self, SourceError> {
        Ok(Self {
            session: Session::connect_sql(url, "philotes-ha").await?,
            key: lock_key(slot),
            slot: slot.to_string(),
        })
    }

    /// Take the lock if it is free: `Ok(None)` when this session holds it now, else the
    /// holder (None inside when it let go between the two looks).
    pub async fn try_acquire(&mut self) -> Result<Option<Option<Holder>>, SourceError> {
        let got = self
            .session
            .scalar(&format!(
                "SELECT pg_catalog.pg_try_advisory_lock({LOCK_CLASS}, {})::text",
                self.key
            ))
            .await?;
        if got.as_deref() == Some("true") {
            return Ok(None);
        }
        Ok(Some(self.holder().await?))
    }

    /// The session holding the lock and how long it has been silent.
    async fn holder(&mut self) -> Result<Option<Holder>, SourceError> {
        // Two-key advisory locks show as classid/objid with objsubid 2.
        let rows = self
            .session
            .query(&format!(
                "SELECT l.pid::text, \
                 extract(epoch FROM pg_catalog.clock_timestamp() - a.query_start)::text \
                 FROM pg_catalog.pg_locks l JOIN pg_catalog.pg_stat_activity a ON a.pid = l.pid \
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
                 AND l.classid = {LOCK_CLASS} AND l.objid = {} \
                 AND l.database = (SELECT oid FROM pg_catalog.pg_database \
                                   WHERE datname = pg_catalog.current_database())",
                self.key
            ))
            .await?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let field = |i: usize| row.get(i).cloned().flatten();
        let pid = field(0)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| SourceError::Query("pg_locks: the lock holder has no pid".into()))?;
        // A holder whose last query has no start time has never run one: treat it as just
        // started (it will heartbeat soon or be found silent later).
        let silent = field(1)
            .and_then(|s| s.parse::<f64>().ok())
            .map(|s| Duration::from_secs_f64(s.max(0.0)))
            .unwrap_or_default();
        Ok(Some(Holder { pid, silent }))
    }

    /// The backend streaming from the slot now, if any.
    pub async fn slot_consumer(&mut self) -> Result<Option<i32>, SourceError> {
        Ok(self
            .session
            .slot_holder(&self.slot)
            .await?
            .and_then(|p| p.parse().ok()))
    }

    /// Terminate backend `pid` (a silent leader's lock session or its walsender); whether
    /// the server signalled it.
    pub async fn terminate(&mut self, pid: i32) -> Result<bool, SourceError> {
        Ok(self
            .session
            .scalar(&format!(
                "SELECT pg_catalog.pg_terminate_backend({pid})::text"
            ))
            .await?
            .as_deref()
            == Some("true"))
    }

    /// Prove this leader alive (moves its `query_start`), and that the lock is still held
    /// by this session: a session the server terminated fails here.
    pub async fn heartbeat(&mut self) -> Result<(), SourceError> {
        self.session.scalar("SELECT 1").await.map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_are_stable_and_non_negative() {
        assert_eq!(lock_key("philotes_p"), lock_key("philotes_p"));
        assert_ne!(lock_key("philotes_p"), lock_key("philotes_q"));
        for s in ["", "a", "philotes_orders", "x".repeat(63).as_str()] {
            assert!(lock_key(s) >= 0, "{s}");
        }
    }
}
