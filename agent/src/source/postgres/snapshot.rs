//! The PostgreSQL side of an initial copy: table facts, block ranges read in parallel by
//! `COPY … TO STDOUT (FORMAT binary)` sessions that import one exported snapshot, and the
//! `xmin` filter that keeps a resumed copy at the first snapshot's point. The pipeline drives
//! it (chunks, commits, progress); this module holds every line of SQL it needs.

use std::sync::Arc;

use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::conn::SourceUrl;
use super::copy::{BinaryCopy, CopyRows};
use super::session::{quote_ident, quote_literal, Session, SourceError};

/// Rows per batch handed from a snapshot reader to the converting task, at most.
pub const BATCH_ROWS: usize = 20_000;

/// Bytes per batch (data and index), at most: what the readers hold ahead of the converting
/// task is a few batches each, so it is bounded in bytes whatever the width of a row (20,000
/// rows of a wide table would be tens of MB per batch).
pub const BATCH_BYTES: usize = 1 << 20;

/// Each reader receives into buffers of this size, filled with whole rows before they are
/// parsed: one allocation size the allocator reuses (a buffer per read, sized to the read,
/// left the arenas fragmented with every size in between; session 20).
const READ_BYTES: usize = 256 << 10;

/// One reader's share of the table: row versions after `after` (else from block `from`) and
/// below block `to`, of the table itself or of one of its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TidRange {
    /// The partition (`"schema"."name"`) this range reads, for a partitioned table; None:
    /// the table itself. Absent in the progress of copies recorded before partitions were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<String>,
    /// Copied up to and including this (block, offset).
    pub after: Option<(u32, u16)>,
    /// First block, while nothing is copied yet.
    from: u64,
    /// End block, exclusive; None: to the end (rows added after the size was measured too).
    to: Option<u64>,
}

impl TidRange {
    /// What names the range across a copy's chunks and restarts (its partition and first
    /// block; its progress moves, the list of ranges left shrinks).
    pub fn key(&self) -> String {
        format!("{}@{}", self.part.as_deref().unwrap_or(""), self.from)
    }

    /// SQL conditions selecting what is left of the range.
    pub fn conditions(&self) -> Vec<String> {
        let mut c = Vec::new();
        match self.after {
            Some((b, o)) => c.push(format!("ctid > '({b},{o})'::tid")),
            None if self.from > 0 => c.push(format!("ctid >= '({},0)'::tid", self.from)),
            None => {}
        }
        if let Some(to) = self.to {
            c.push(format!("ctid < '({to},0)'::tid"));
        }
        c
    }
}

/// `readers` equal block ranges over a table of `blocks` blocks, the last one open-ended.
pub fn split_blocks(readers: u64, blocks: u64) -> Vec<TidRange> {
    let readers = readers.max(1);
    (0..readers)
        .map(|r| TidRange {
            part: None,
            after: None,
            from: blocks * r / readers,
            to: (r + 1 < readers).then(|| blocks * (r + 1) / readers),
        })
        .collect()
}

/// Row versions a first snapshot (`xmax`, in-progress `xip`) could see, for a copy resumed in
/// a snapshot whose xmax is `now_xmax`; None when `xmin` cannot be compared exactly (the
/// cluster is past its first 2^32 transaction ids, so a raw `xmin` may belong to an earlier
/// epoch).
pub fn visible_then(xmax: u64, xip: &[u64], now_xmax: u64) -> Option<String> {
    if now_xmax >= 1 << 32 {
        return None;
    }
    let mut c = format!("xmin::text::bigint < {xmax}");
    if !xip.is_empty() {
        let list: Vec<String> = xip.iter().map(u64::to_string).collect();
        c.push_str(&format!(
            " AND xmin::text::bigint NOT IN ({})",
            list.join(",")
        ));
    }
    Some(c)
}

/// What a snapshot reader sends: a batch of rows, or the end of its range.
pub enum Fetched {
    /// Rows of reader `.0`, each ending with its `ctid`, and the share of the read-ahead
    /// their buffers took (returned when the batch is dropped, once converted).
    Rows(usize, CopyRows, Share),
    /// Reader `.0` reached the end of its range.
    Done(usize),
}

/// The receive buffers all readers of one copy may hold at once, one permit each: the bound
/// on what they fetch ahead of the converting task, which takes all of it back while a chunk
/// commits, so that the commit's row-group flush never meets a full read-ahead (that meeting
/// was the whole difference between the peak memory of a 10M-row copy and a 1M-row one).
#[derive(Clone)]
pub struct ReadAhead {
    permits: Arc<Semaphore>,
    total: u32,
}

/// Some permits of a [`ReadAhead`], returned when dropped.
#[derive(Default)]
pub struct Share(Option<OwnedSemaphorePermit>);

impl Share {
    fn add(&mut self, permit: OwnedSemaphorePermit) {
        match &mut self.0 {
            Some(held) => held.merge(permit),
            None => self.0 = Some(permit),
        }
    }
}

impl ReadAhead {
    /// Room for what `readers` readers hold in the steady state, so that only a chunk commit
    /// makes them wait: a batch each being filled, two queued, one being converted (a batch is
    /// at most `BATCH_BYTES` plus the buffer that crossed it: five buffers).
    pub fn new(readers: usize) -> Self {
        let per_batch = BATCH_BYTES / READ_BYTES + 1;
        let total = (per_batch * (readers.max(1) + 3)) as u32;
        Self {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Wait until every buffer is back and hold them all: the readers hand on what they
    /// hold meanwhile (the caller must go on receiving it), then wait until it is dropped.
    pub async fn hold_all(&self) -> Share {
        Share(
            self.permits
                .clone()
                .acquire_many_owned(self.total)
                .await
                .ok(),
        )
    }

    /// A permit for one more buffer, or None when the budget is spent (or being held).
    fn try_take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_owned().ok()
    }

    /// A permit for one more buffer, once one is returned; None only if the budget is gone.
    async fn take(&self) -> Option<OwnedSemaphorePermit> {
        self.permits.clone().acquire_owned().await.ok()
    }
}

/// The (block, offset) of a binary `tid` value.
pub fn parse_tid(v: Option<&[u8]>) -> Option<(u32, u16)> {
    let b = v?;
    (b.len() == 6).then(|| {
        (
            u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            u16::from_be_bytes([b[4], b[5]]),
        )
    })
}

/// What a copy needs to know of a table before it starts.
pub struct TableFacts {
    /// `"schema"."table"`, quoted.
    pub rel: String,
    /// Estimated rows (`pg_class.reltuples`), for progress lines.
    pub estimate: u64,
    /// Its relfilenode now (a rewrite changes every ctid); a partitioned table's is its
    /// partitions' in order (attaching or detaching one changes it too).
    pub filenode: String,
    rel_oid: String,
    /// A partitioned table's leaf partitions with storage (quoted) and their size in blocks;
    /// None for a table with storage of its own.
    partitions: Option<Vec<(String, u64)>>,
}

/// The leaf partitions of a partitioned table (`{oid}`), at any depth, with their
/// relfilenode, estimated rows and size in blocks. Foreign partitions have no WAL, so logical
/// replication never sees their changes: they are not copied either.
const LEAF_PARTITIONS: &str = "WITH RECURSIVE tree(relid) AS (SELECT {oid}::oid \
     UNION ALL SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid) \
     SELECT pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname), \
     pg_catalog.pg_relation_filenode(c.oid)::text, GREATEST(c.reltuples, 0)::bigint::text, \
     (pg_catalog.pg_relation_size(c.oid) / pg_catalog.current_setting('block_size')::bigint)::text \
     FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid \
     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
     WHERE c.relkind = 'r' ORDER BY 1";

/// Facts of `schema.name` read on `reader`.
pub async fn table_facts(
    reader: &mut Session,
    schema: &str,
    name: &str,
) -> Result<TableFacts, SourceError> {
    // Tables can join through the publication with any name: quote everything.
    let rel = format!("{}.{}", quote_ident(schema), quote_ident(name));
    let rel_oid = format!("{}::regclass", quote_literal(&rel));
    // A partitioned table's own estimate is unused (its partitions' are summed below).
    let row = reader
        .query(&format!(
            "SELECT relkind::text, GREATEST(reltuples, 0)::bigint::text FROM pg_catalog.pg_class WHERE oid = {rel_oid}"
        ))
        .await?
        .into_iter()
        .next()
        .unwrap_or_default();
    let kind = row.first().cloned().flatten();
    let estimate: u64 = row
        .get(1)
        .cloned()
        .flatten()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if kind.as_deref() == Some("p") {
        let rows = reader
            .query(&LEAF_PARTITIONS.replace("{oid}", &rel_oid))
            .await?;
        let field = |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten();
        let number = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        let mut filenodes = Vec::new();
        let mut estimate = 0;
        let mut partitions = Vec::new();
        for r in &rows {
            let Some(name) = field(r, 0) else { continue };
            filenodes.push(field(r, 1).unwrap_or_default());
            estimate += number(field(r, 2));
            partitions.push((name, number(field(r, 3))));
        }
        return Ok(TableFacts {
            rel,
            estimate,
            filenode: filenodes.join(","),
            rel_oid,
            partitions: Some(partitions),
        });
    }
    let filenode = reader
        .scalar(&format!(
            "SELECT pg_catalog.pg_relation_filenode({rel_oid})::text"
        ))
        .await?
        .unwrap_or_default();
    Ok(TableFacts {
        rel,
        estimate,
        filenode,
        rel_oid,
        partitions: None,
    })
}

/// The select list of a copy: fixed-width types in their send form (cheaper to produce and
/// to read than text, `binary[i]`), every other column wrapped in its output function, whose
/// cstring result is the same text a text-mode read would give.
pub async fn select_list(
    reader: &mut Session,
    schema: &str,
    name: &str,
    columns: &[String],
    binary: &[bool],
) -> Result<String, SourceError> {
    let outputs = reader.output_functions(schema, name).await?;
    let mut list = Vec::with_capacity(columns.len());
    for (c, &bin) in columns.iter().zip(binary) {
        let Some((_, f)) = outputs.iter().find(|(n, _)| n == c) else {
            return Err(SourceError::Query(format!(
                "{schema}.{name} changed while the snapshot started; it will be retried"
            )));
        };
        let col = quote_ident(c);
        list.push(if bin || f.is_empty() {
            col
        } else {
            format!("{f}({col})")
        });
    }
    Ok(list.join(", "))
}

/// What a publication publishes of one table (PostgreSQL 15+): the copy takes the same
/// columns and rows as the stream, as PostgreSQL's own table synchronization does.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Published {
    /// Its column list; None: every column.
    pub columns: Option<Vec<String>>,
    /// Its row filter, an SQL condition; None: every row.
    pub row_filter: Option<String>,
}

/// What `publication` publishes of `schema.name` (nothing is filtered before PostgreSQL 15,
/// which has neither column lists nor row filters).
pub async fn published(
    reader: &mut Session,
    publication: &str,
    schema: &str,
    name: &str,
) -> Result<Published, SourceError> {
    if reader.server_version().await? < 150_000 {
        return Ok(Published::default());
    }
    let rows = reader
        .query(&format!(
            "SELECT pg_catalog.array_to_json(attnames)::text, rowfilter \
             FROM pg_catalog.pg_publication_tables \
             WHERE pubname = {} AND schemaname = {} AND tablename = {}",
            quote_literal(publication),
            quote_literal(schema),
            quote_literal(name)
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(Published::default());
    };
    let columns = match row.first().cloned().flatten() {
        Some(json) => Some(serde_json::from_str::<Vec<String>>(&json).map_err(|e| {
            SourceError::Query(format!(
                "cannot read the published columns of {schema}.{name}: {e}"
            ))
        })?),
        None => None,
    };
    Ok(Published {
        columns,
        row_filter: row.get(1).cloned().flatten(),
    })
}

/// Block ranges for a copy from the start, for up to `readers` sessions. Several sessions read
/// disjoint block ranges of the same snapshot (a TID range scan each, PostgreSQL 14+): the
/// server's per-row output work, the largest part of a copy, then runs on more than one core.
/// Every row version has exactly one ctid, so the ranges cover each visible row once.
pub async fn plan_ranges(
    reader: &mut Session,
    facts: &TableFacts,
    readers: u32,
) -> Result<Vec<TidRange>, SourceError> {
    let readers = match reader.server_version().await? {
        v if v >= 140_000 => readers.max(1) as u64,
        _ => 1,
    };
    // Small tables (and small partitions) are not worth a second session.
    let split = |blocks: u64| split_blocks(if blocks < 64 { 1 } else { readers }, blocks);
    if let Some(partitions) = &facts.partitions {
        // Ctids repeat across partitions: each partition gets ranges of its own.
        return Ok(partitions
            .iter()
            .flat_map(|(name, blocks)| {
                split(*blocks).into_iter().map(|r| TidRange {
                    part: Some(name.clone()),
                    ..r
                })
            })
            .collect());
    }
    let blocks: u64 = reader
        .scalar(&format!(
            "SELECT (pg_catalog.pg_relation_size({}) / \
             pg_catalog.current_setting('block_size')::bigint)::text",
            facts.rel_oid
        ))
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(split(blocks))
}

/// The name of the temporary slot that exports a copy's snapshot: unique per pipeline slot and
/// process, within the 63-character limit.
pub fn temp_slot_name(slot: &str) -> String {
    let hash = slot.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    });
    format!(
        "{}_{hash:08x}_snap_{}",
        slot.chars().take(30).collect::<String>(),
        std::process::id()
    )
}

/// The query one reader copies: `list` and the `ctid` of `rel` (or of the range's partition),
/// what is left of `range`, and `extra` conditions (a resumed copy's visibility, the
/// publication's row filter). A TID range scan
/// returns rows in ctid order: the last ctid of a batch is the reader's position. `ONLY`:
/// rows of tables inheriting from `rel` are theirs (their changes are not `rel`'s either) and
/// would break the ctid order.
pub fn range_select(list: &str, rel: &str, range: &TidRange, extra: Option<&str>) -> String {
    let mut conds = range.conditions();
    conds.extend(extra.map(str::to_string));
    let filter = if conds.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conds.join(" AND "))
    };
    let rel = range.part.as_deref().unwrap_or(rel);
    format!("SELECT {list}, ctid FROM ONLY {rel}{filter}")
}

/// Open a read-only transaction on `session` that sees exactly the exported `snapshot`.
async fn import_snapshot(session: &mut Session, snapshot: &str) -> Result<(), SourceError> {
    // A synchronized scan may start mid-table and wrap around; the recorded progress assumes
    // ctid order.
    session.query("SET synchronize_seqscans = off").await?;
    session
        .query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    session
        .query(&format!(
            "SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "")
        ))
        .await?;
    Ok(())
}

/// The exported snapshot's xmax and in-progress transaction ids (64-bit, with their epoch),
/// read by importing it.
pub async fn snapshot_xids(
    session: &mut Session,
    snapshot: &str,
) -> Result<(u64, Vec<u64>), SourceError> {
    import_snapshot(session, snapshot).await?;
    let rows = session
        .query(
            "SELECT pg_catalog.txid_snapshot_xmax(s)::text, \
             coalesce((SELECT pg_catalog.string_agg(x::text, ',') \
                       FROM pg_catalog.txid_snapshot_xip(s) x), '') \
             FROM pg_catalog.txid_current_snapshot() s",
        )
        .await?;
    session.query("COMMIT").await?;
    let row = rows.into_iter().next().unwrap_or_default();
    let get = |i: usize| row.get(i).cloned().flatten().unwrap_or_default();
    let xmax = get(0)
        .parse()
        .map_err(|_| SourceError::Query("cannot read the snapshot's xmax".into()))?;
    let xip = get(1)
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| SourceError::Query(format!("cannot read the snapshot's xip {s:?}")))
        })
        .collect::<Result<_, _>>()?;
    Ok((xmax, xip))
}

/// Copy `select` inside the exported `snapshot` on a session of its own (`COPY ... TO
/// STDOUT` in binary: no round trips, rows sliced out of the received messages), into `tx`
/// in batches tagged with reader `r`, each receive buffer taken from `budget` first.
#[allow(clippy::too_many_arguments)]
pub async fn copy_range(
    url: &SourceUrl,
    slot: &str,
    publication: &str,
    snapshot: &str,
    select: &str,
    r: usize,
    budget: &ReadAhead,
    tx: &tokio::sync::mpsc::Sender<Result<Fetched, SourceError>>,
) -> Result<(), SourceError> {
    let mut reader = Session::connect(url, slot, publication, None).await?;
    import_snapshot(&mut reader, snapshot).await?;
    let mut parser = BinaryCopy::default();
    let mut rows = CopyRows::default();
    // The buffers behind `rows` and `data`: they travel with the batch.
    let mut share = Share::default();
    let mut data = BytesMut::new();
    reader
        .copy_out_start(&format!("COPY ({select}) TO STDOUT (FORMAT binary)"))
        .await?;
    loop {
        if data.capacity() == 0 {
            let permit = match budget.try_take() {
                Some(p) => p,
                None => {
                    // Spent, or a chunk commit is taking it all back: what this reader holds
                    // goes on first (the converting task returns buffers as it converts).
                    if !rows.is_empty() {
                        let batch = Fetched::Rows(r, rows.take(), std::mem::take(&mut share));
                        if tx.send(Ok(batch)).await.is_err() {
                            return Ok(());
                        }
                    }
                    match budget.take().await {
                        Some(p) => p,
                        None => return Ok(()),
                    }
                }
            };
            share.add(permit);
            data = BytesMut::with_capacity(READ_BYTES);
        }
        let before = data.len();
        let more = reader.copy_out_into(&mut data).await?;
        let full = data.len() == before || data.capacity() - data.len() < READ_BYTES / 8;
        if !data.is_empty() && (full || !more) {
            parser
                .feed(std::mem::take(&mut data).freeze(), &mut rows)
                .map_err(|e| SourceError::Query(e.to_string()))?;
            if rows.len() >= BATCH_ROWS || rows.held_bytes() >= BATCH_BYTES {
                let batch = Fetched::Rows(r, rows.take(), std::mem::take(&mut share));
                if tx.send(Ok(batch)).await.is_err() {
                    return Ok(());
                }
            }
        }
        if !more {
            break;
        }
    }
    if !parser.finished() {
        return Err(SourceError::Query(
            "binary COPY ended without its trailer".into(),
        ));
    }
    if !rows.is_empty() && tx.send(Ok(Fetched::Rows(r, rows, share))).await.is_err() {
        return Ok(());
    }
    reader.query("COMMIT").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holding_the_read_ahead_waits_for_every_buffer_and_stops_the_readers() {
        let budget = ReadAhead::new(1);
        let mut held = Share::default();
        while let Some(p) = budget.try_take() {
            held.add(p);
        }
        // Spent: a reader would hand on what it holds and wait.
        assert_eq!(
            budget.total as usize,
            held.0.as_ref().map_or(0, |p| p.num_permits())
        );
        let mut one = Share::default();
        one.add(held.0.as_mut().and_then(|p| p.split(1)).unwrap());
        let hold = budget.hold_all();
        tokio::pin!(hold);
        // Not while a batch is still out.
        assert!(futures::poll!(&mut hold).is_pending());
        drop(held);
        assert!(futures::poll!(&mut hold).is_pending());
        // Buffers returned while the hold waits go to it, not to a reader.
        assert!(budget.try_take().is_none());
        drop(one);
        let all = hold.await;
        assert!(budget.try_take().is_none());
        drop(all);
        assert!(budget.try_take().is_some());
    }

    #[test]
    fn ranges_cover_the_table_once() {
        let r = split_blocks(3, 100);
        assert_eq!(r[0].conditions(), vec!["ctid < '(33,0)'::tid"]);
        assert_eq!(
            r[1].conditions(),
            vec!["ctid >= '(33,0)'::tid", "ctid < '(66,0)'::tid"]
        );
        assert_eq!(r[2].conditions(), vec!["ctid >= '(66,0)'::tid"]);
        assert!(split_blocks(1, 100)[0].conditions().is_empty());
        let resumed = TidRange {
            part: None,
            after: Some((40, 7)),
            from: 33,
            to: Some(66),
        };
        assert_eq!(
            resumed.conditions(),
            vec!["ctid > '(40,7)'::tid", "ctid < '(66,0)'::tid"]
        );
        assert_eq!(
            range_select("a, b", "\"public\".\"t\"", &resumed, Some("xmin::text::bigint < 9")),
            "SELECT a, b, ctid FROM ONLY \"public\".\"t\" WHERE ctid > '(40,7)'::tid AND ctid < '(66,0)'::tid AND xmin::text::bigint < 9"
        );
        // A partition's range reads the partition.
        let part = TidRange {
            part: Some("\"public\".\"t_2024\"".into()),
            ..resumed
        };
        assert_eq!(
            range_select("a", "\"public\".\"t\"", &part, None),
            "SELECT a, ctid FROM ONLY \"public\".\"t_2024\" WHERE ctid > '(40,7)'::tid AND ctid < '(66,0)'::tid"
        );
    }

    #[test]
    fn progress_recorded_before_partitions_still_reads() {
        let old: TidRange = serde_json::from_str(r#"{"after":[3,1],"from":0,"to":null}"#).unwrap();
        assert_eq!(old.part, None);
        assert_eq!(old.after, Some((3, 1)));
        // Written back the same way for a table that is not partitioned.
        assert!(!serde_json::to_string(&old).unwrap().contains("part"));
    }

    #[test]
    fn a_resumed_copy_filters_on_the_first_snapshot() {
        assert_eq!(
            visible_then(900, &[880, 895], 1000).as_deref(),
            Some("xmin::text::bigint < 900 AND xmin::text::bigint NOT IN (880,895)")
        );
        // Past the first epoch a raw xmin may alias a recent id: no filter, nothing lost.
        assert_eq!(visible_then(900, &[], (1 << 32) + 5), None);
        assert_eq!(parse_tid(Some(&[0, 0, 1, 0, 0, 3])), Some((256, 3)));
        assert_eq!(parse_tid(None), None);
    }
}
