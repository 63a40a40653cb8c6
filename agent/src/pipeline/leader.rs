//! `[ha]`: which of several agents on one configuration streams a pipeline. The leader holds
//! the slot's advisory lock ([`LeaderLock`]) and heartbeats on its session; a standby polls,
//! and cuts off a leader silent for `ha.takeover_timeout` (its lock session and its walsender
//! are terminated). A leader whose heartbeat fails steps down by itself. Two agents that both
//! believe they lead for a moment cannot both commit: every commit is fenced on the table's
//! position and writer (sink/iceberg), so the late one is refused.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{AbortOnDrop, PipelineError};
use crate::config::HaConfig;
use crate::source::postgres::conn::SourceUrl;
use crate::source::postgres::leader::LeaderLock;
use crate::source::postgres::session::SourceError;
use crate::telemetry::events::{
    LeaderDeposed, LeaderSession, LeadershipLost, LeadershipTaken, StandingBy,
};
use crate::telemetry::status::SharedStatus;
use crate::telemetry::SourceMetrics;

/// This agent leads the pipeline while the lease is not lost.
pub(super) struct Lease {
    lost: watch::Receiver<bool>,
    _heartbeat: AbortOnDrop,
}

impl Lease {
    /// Turns true when the leadership is gone (heartbeat failed): stop without committing.
    pub(super) fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Whether the leadership is gone.
    pub(super) fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }
}

/// One pipeline's bid for leadership.
pub(super) struct Contender<'a> {
    /// Pipeline name.
    pub name: &'a str,
    /// Its source.
    pub url: &'a SourceUrl,
    /// Its slot (the lock's key).
    pub slot: &'a str,
    /// `[ha]`.
    pub ha: &'a HaConfig,
    /// Its instruments.
    pub metrics: &'a SourceMetrics,
    /// Its live status.
    pub status: &'a SharedStatus,
}

impl Contender<'_> {
    /// Wait until this agent leads (standing by meanwhile); None on shutdown.
    pub(super) async fn lead(
        &self,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<Option<Lease>, PipelineError> {
        let mut lock = LeaderLock::connect(self.url, self.slot).await?;
        let mut standing_by = false;
        // The leader last deposed: its session may outlive the termination for a moment
        // (the server ends it asynchronously), and one leader is deposed once.
        let mut deposed: Option<i32> = None;
        loop {
            if *shutdown.borrow() {
                return Ok(None);
            }
            let Some(holder) = lock.try_acquire().await? else {
                break;
            };
            if !standing_by {
                StandingBy {
                    pipeline: self.name,
                    leader_pid: holder.map(|h| h.pid),
                }
                .emit(self.metrics, self.status);
                standing_by = true;
            }
            if let Some(h) = holder.filter(|h| h.silent >= self.ha.takeover_timeout) {
                if deposed != Some(h.pid) {
                    LeaderDeposed {
                        pipeline: self.name,
                        pid: h.pid,
                        session: LeaderSession::Lock,
                        silent: Some(h.silent),
                    }
                    .emit(self.metrics);
                    deposed = Some(h.pid);
                }
                lock.terminate(h.pid).await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            super::retry::pause(self.ha.poll_interval(), shutdown).await;
        }
        self.free_slot(&mut lock).await?;
        LeadershipTaken {
            pipeline: self.name,
            after_standby: standing_by,
        }
        .emit(self.metrics);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(heartbeat(
            lock,
            self.ha.heartbeat_interval(),
            self.ha.takeover_timeout / 2,
            self.name.to_string(),
            tx,
        ));
        Ok(Some(Lease {
            lost: rx,
            _heartbeat: AbortOnDrop(task),
        }))
    }

    /// With the lock held, a walsender still streaming from the slot is a cut-off leader's
    /// the server has not noticed yet: terminate it so this agent can stream.
    async fn free_slot(&self, lock: &mut LeaderLock) -> Result<(), PipelineError> {
        let deadline = Instant::now() + self.ha.takeover_timeout;
        while let Some(pid) = lock.slot_consumer().await? {
            if Instant::now() > deadline {
                return Err(SourceError::Slot {
                    slot: self.slot.to_string(),
                    reason: format!("its consumer (pid {pid}) did not end after termination"),
                }
                .into());
            }
            LeaderDeposed {
                pipeline: self.name,
                pid,
                session: LeaderSession::Walsender,
                silent: None,
            }
            .emit(self.metrics);
            lock.terminate(pid).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }
}

/// Run a query on the lock's session every `every`; the first that fails or takes longer
/// than `limit` ends the leadership (the session is dropped, releasing the lock if the server
/// still holds it for us).
async fn heartbeat(
    mut lock: LeaderLock,
    every: Duration,
    limit: Duration,
    pipeline: String,
    lost: watch::Sender<bool>,
) {
    let reason = loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(limit, lock.heartbeat()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break format!("the leader's lock session failed: {e}"),
            Err(_) => break format!("the leader's lock session did not answer in {limit:?}"),
        }
    };
    LeadershipLost {
        pipeline: &pipeline,
        reason: &reason,
    }
    .emit();
    let _ = lost.send(true);
}
