//! A transaction the server streams while it is still in progress (pgoutput protocol 2): the
//! spool that records every change, and the rows converted as they arrived, so that the
//! conversion of a large transaction overlaps its transfer instead of following its commit.
//!
//! Converting early is an optimisation the spool can always take back. It stops at the first
//! change it cannot take as it comes (a truncate, a relation that is not the table as it
//! stands, a value for the dead-letter table, REPLICA IDENTITY FULL, the memory budget) and
//! Stream Commit replays the spool from there; a rolled-back subtransaction inside what was
//! converted discards the conversion and the whole spool is replayed.

use crate::pipeline::batch::{Finished, TableBatch};
use crate::pipeline::spool::Spool;
use crate::sink::iceberg::early::EarlyFile;
use crate::source::postgres::pgoutput::RelationColumn;

/// One in-progress transaction.
pub(super) struct Streamed {
    spool: Spool,
    early: Early,
}

/// Rows of the transaction converted before its commit, commit LSN and time left blank.
pub(super) struct Early {
    /// None while every change is converted as it arrives; else the spool offset of the
    /// first change that was not (the replay starts there).
    stopped_at: Option<u64>,
    /// The next change's `_cdc_seq`.
    pub(super) seq: u64,
    /// Per table, in the order first changed.
    pub(super) tables: Vec<EarlyTable>,
    /// Bytes of the finished batches.
    done_bytes: u64,
}

/// One table's converted rows.
pub(super) struct EarlyTable {
    /// Index of the table in the applier.
    pub(super) idx: usize,
    /// Builders of the table's layout when the first row came.
    pub(super) batch: TableBatch,
    /// Batches finished so far (the builders are kept small), unless they went to `file`
    /// alone.
    pub(super) done: Vec<Finished>,
    /// A mirror beside the table takes the batches themselves at the commit: they are kept
    /// even while `file` encodes them for the changelog.
    pub(super) keep: bool,
    /// The table's Parquet file being encoded from the finished batches, when the table
    /// takes one (opened at the first batch finished).
    pub(super) file: Option<EarlyFile>,
    /// The relation the rows were read with: at the commit, the table must still have it.
    pub(super) columns: Vec<RelationColumn>,
    /// Inserts, updates, deletes, truncates.
    pub(super) counts: [u64; 4],
}

impl Streamed {
    /// A transaction whose first block began: nothing converted yet.
    pub(super) fn new(spool: Spool) -> Self {
        Self {
            spool,
            early: Early {
                stopped_at: None,
                seq: 0,
                tables: Vec::new(),
                done_bytes: 0,
            },
        }
    }

    /// Every change so far was converted: the next one should be too.
    pub(super) fn converting(&self) -> bool {
        self.early.stopped_at.is_none()
    }

    /// Convert nothing more: the replay starts at the next change spooled.
    pub(super) fn stop(&mut self) {
        if self.early.stopped_at.is_none() {
            self.early.stopped_at = Some(self.spool.bytes());
        }
    }

    /// Forget what was converted: the replay starts at the beginning.
    pub(super) fn discard(&mut self) {
        self.early = Early {
            stopped_at: Some(0),
            seq: 0,
            tables: Vec::new(),
            done_bytes: 0,
        };
    }

    /// The early rows, to add to.
    pub(super) fn early_mut(&mut self) -> &mut Early {
        &mut self.early
    }

    /// Append one change to the spool.
    pub(super) fn push(&mut self, subxid: u32, parts: &[&[u8]]) -> std::io::Result<()> {
        self.spool.push(subxid, parts)
    }

    /// Subtransaction `subxid` rolled back: its changes leave the spool, and a conversion
    /// that took any of them is discarded.
    pub(super) fn abort_subxact(&mut self, subxid: u32) -> std::io::Result<()> {
        let converted_to = self.early.stopped_at.unwrap_or(self.spool.bytes());
        self.spool.abort_subxact(subxid)?;
        if self.spool.bytes() < converted_to {
            self.discard();
        }
        Ok(())
    }

    /// Changes spooled.
    pub(super) fn changes(&self) -> u64 {
        self.spool.changes()
    }

    /// Bytes spooled.
    pub(super) fn spool_bytes(&self) -> u64 {
        self.spool.bytes()
    }

    /// Changes converted so far (their positions in the transaction).
    pub(super) fn converted(&self) -> u64 {
        self.early.seq
    }

    /// Bytes held in converted rows.
    pub(super) fn early_bytes(&self) -> u64 {
        self.early.bytes()
    }

    /// The spool, the converted rows, and the spool offset the replay starts at.
    pub(super) fn into_parts(self) -> (Spool, Early, u64) {
        let from = self.early.stopped_at.unwrap_or(self.spool.bytes());
        (self.spool, self.early, from)
    }
}

impl Early {
    /// Bytes held: finished batches, what the early files hold, and open builders.
    pub(super) fn bytes(&self) -> u64 {
        self.done_bytes
            + self
                .tables
                .iter()
                .map(|t| {
                    let file = t.file.as_ref().map_or(0, |f| {
                        // Kept batches are counted in `done_bytes`; the file's queue shares them.
                        if t.keep {
                            f.encoded()
                        } else {
                            f.held()
                        }
                    });
                    t.batch.bytes() as u64 + file
                })
                .sum::<u64>()
    }

    /// Table `idx`'s converted rows, started with `start` (builders, relation, whether a
    /// mirror takes the batches) on its first.
    pub(super) fn table(
        &mut self,
        idx: usize,
        start: impl FnOnce() -> (TableBatch, Vec<RelationColumn>, bool),
    ) -> &mut EarlyTable {
        let pos = match self.tables.iter().position(|t| t.idx == idx) {
            Some(p) => p,
            None => {
                let (batch, columns, keep) = start();
                self.tables.push(EarlyTable {
                    idx,
                    batch,
                    done: Vec::new(),
                    keep,
                    file: None,
                    columns,
                    counts: [0; 4],
                });
                self.tables.len() - 1
            }
        };
        &mut self.tables[pos]
    }

    /// Finish table `idx`'s builders into a batch when they hold `rows` rows or `bytes` bytes
    /// (small batches: the writer takes them one by one at the commit). The first batch
    /// finished asks `open` for an early file, which then encodes every batch as it comes.
    pub(super) fn seal(
        &mut self,
        idx: usize,
        rows: u64,
        bytes: u64,
        open: impl FnOnce() -> Option<EarlyFile>,
    ) -> Result<(), crate::pipeline::batch::BatchError> {
        let Some(t) = self.tables.iter_mut().find(|t| t.idx == idx) else {
            return Ok(());
        };
        if (t.batch.rows() as u64) < rows && (t.batch.bytes() as u64) < bytes {
            return Ok(());
        }
        // The builders' count of the bytes their rows hold: the arrays' allocated capacity
        // runs up to twice that, but pages never written are never resident.
        let held = t.batch.bytes() as u64;
        if let Some(b) = t.batch.finish()? {
            if t.file.is_none() && t.done.is_empty() {
                t.file = open();
            }
            match &mut t.file {
                // Counted by the file from now on: queued, then encoded.
                Some(f) if !t.keep => f.send(b.0),
                // Kept for the mirror too: the file's queue shares the batch's arrays.
                Some(f) => {
                    f.send(b.0.clone());
                    self.done_bytes += held;
                    t.done.push(b);
                }
                None => {
                    self.done_bytes += held;
                    t.done.push(b);
                }
            }
        }
        Ok(())
    }
}

impl EarlyTable {
    /// Every converted row: as batches in order (for a mirror beside the table, or when
    /// there is no early file), and in the early file (which takes the last batch too).
    pub(super) fn finish(
        mut self,
    ) -> Result<(TableBatch, Vec<Finished>, Option<EarlyFile>), crate::pipeline::batch::BatchError>
    {
        if let Some(b) = self.batch.finish()? {
            match &mut self.file {
                Some(f) if !self.keep => f.send(b.0),
                Some(f) => {
                    f.send(b.0.clone());
                    self.done.push(b);
                }
                None => self.done.push(b),
            }
        }
        Ok((self.batch, self.done, self.file))
    }
}
