//! Opening a replication session: checks (wal_level, tables), publication and slot, then
//! START_REPLICATION — all on one authenticated `replication=database` connection.

use std::time::Duration;

use super::conn::SourceUrl;
use super::wire::replication::{ReplicationStream, StatusTiming};
use super::wire::{Conn, WireError};
use crate::model::{ColumnKind, ErrorType, Lsn};

/// Why a source cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Network, TLS or authentication failure, or a dropped connection.
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// Redacted URL.
        url: String,
        /// Cause.
        reason: String,
    },
    /// The server is not configured for logical replication.
    #[error("wal_level is {0:?} on the source; logical replication needs wal_level = logical")]
    WalLevel(String),
    /// A configured table is missing.
    #[error("table {0} does not exist in the source database")]
    MissingTable(String),
    /// A configured name is a relation logical replication cannot stream.
    #[error("{table} cannot be streamed: {why}")]
    NotATable {
        /// `schema.table` as configured.
        table: String,
        /// What it is instead.
        why: &'static str,
    },
    /// The slot exists but was made for another plugin or database.
    #[error("replication slot {slot:?} is unusable: {reason}")]
    Slot {
        /// Slot name.
        slot: String,
        /// Cause.
        reason: String,
    },
    /// The publication cannot carry a configured table as configured.
    #[error("publication {publication:?} is unusable: {reason}")]
    Publication {
        /// Publication name.
        publication: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// Any other server error.
    #[error("source query failed: {0}")]
    Query(String),
    /// The replication protocol carried something undecodable.
    #[error(transparent)]
    Decode(#[from] super::pgoutput::DecodeError),
}

impl SourceError {
    /// True for errors that a retry can cure (connection loss, server restart).
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Connect { .. } | SourceError::Query(_))
    }

    /// The `error_type` label for `philotes_cdc_errors_total`.
    pub fn error_type(&self) -> ErrorType {
        match self {
            SourceError::Connect { .. } => ErrorType::Connection,
            SourceError::WalLevel(_)
            | SourceError::MissingTable(_)
            | SourceError::NotATable { .. }
            | SourceError::Slot { .. }
            | SourceError::Publication { .. } => ErrorType::Config,
            SourceError::Query(_) => ErrorType::SourceQuery,
            SourceError::Decode(_) => ErrorType::Decode,
        }
    }
}

/// Map a transport error, keeping the password out of the message.
pub fn wire_error(url: &SourceUrl, e: WireError) -> SourceError {
    match e {
        WireError::Server(m) => SourceError::Query(m),
        other => {
            let mut reason = other.to_string();
            if !url.password.is_empty() {
                reason = reason.replace(&url.password, "***");
            }
            SourceError::Connect {
                url: url.display(),
                reason,
            }
        }
    }
}

/// How the stream is started.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamOptions {
    /// Ask for in-progress transactions (pgoutput protocol 2, PostgreSQL 14+).
    pub in_progress: bool,
    /// Ask for values in their binary (send) form (`binary 'true'`, PostgreSQL 14+).
    pub binary: bool,
}

/// A replication session on which setup queries run before streaming starts.
pub struct Session {
    conn: Conn,
    url: SourceUrl,
    slot: String,
    publication: String,
    start: Lsn,
}

/// `SELECT {select}` over the replicated columns of `schema.table` (`a` is `pg_attribute`,
/// `joins` adds more), in column order — the columns and order a Relation message has.
fn column_query(schema: &str, table: &str, select: &str, joins: &str) -> String {
    let rel = format!("{}.{}", quote_ident(schema), quote_ident(table));
    column_query_on(&quote_literal(&rel), select, joins)
}

/// [`column_query`] of the relation `rel` (a quoted name or an OID).
fn column_query_on(rel: &str, select: &str, joins: &str) -> String {
    format!(
        "SELECT {select} FROM pg_catalog.pg_attribute a {joins} \
         WHERE a.attrelid = {rel}::regclass AND a.attnum > 0 AND NOT a.attisdropped \
         AND a.attgenerated = '' ORDER BY a.attnum"
    )
}

/// `s` as an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// `s` as a quoted SQL identifier.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Prefix of the transactional messages the DDL event trigger writes: a table's columns at
/// the end of an `ALTER TABLE` (`{"oid": …, "columns": [[attnum, name, type, typmod,
/// hasdef], …]}`).
pub const DDL_MESSAGE_PREFIX: &str = "philotes.columns";

/// A column as the catalog describes it now.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogColumn {
    /// Its name.
    pub name: String,
    /// Its number in the table (`pg_attribute.attnum`).
    pub attnum: i32,
    /// Its type's OID.
    pub type_oid: u32,
    /// Its type modifier (`pg_attribute.atttypmod`, -1 if none).
    pub type_modifier: i32,
    /// The kind of its base type, for a domain or an array of domains or enums.
    pub kind: Option<ColumnKind>,
    /// The type whose binary (send) form its values have: a domain's base type, text for an
    /// enum (`enum_send` sends the label), else its own.
    pub binary_oid: u32,
    /// It has a default (`pg_attribute.atthasdef`): added so, rows that existed have a value
    /// that no change carried.
    pub has_default: bool,
}

impl Session {
    /// Connect and authenticate; nothing is started yet.
    pub async fn connect(
        url: &SourceUrl,
        slot: &str,
        publication: &str,
        start: Option<Lsn>,
    ) -> Result<Self, SourceError> {
        let mut s = Self::connect_with(url, &SourceUrl::startup_options()).await?;
        s.slot = slot.to_string();
        s.publication = publication.to_string();
        s.start = start.unwrap_or(Lsn::ZERO);
        Ok(s)
    }

    /// A plain SQL session (no replication protocol), named `application_name` in
    /// `pg_stat_activity`.
    pub async fn connect_sql(url: &SourceUrl, application_name: &str) -> Result<Self, SourceError> {
        Self::connect_with(url, &[("application_name", application_name)]).await
    }

    async fn connect_with(url: &SourceUrl, options: &[(&str, &str)]) -> Result<Self, SourceError> {
        // Bounded, so an unreachable host fails within the connect timeout instead of hanging.
        let conn =
            match tokio::time::timeout(url.connect_timeout, Conn::connect(url, options)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return Err(wire_error(url, e)),
                Err(_) => {
                    return Err(SourceError::Connect {
                        url: url.display(),
                        reason: format!("timed out after {:?}", url.connect_timeout),
                    })
                }
            };
        Ok(Self {
            conn,
            url: url.clone(),
            slot: String::new(),
            publication: String::new(),
            start: Lsn::ZERO,
        })
    }

    /// Run one query and return its rows as text.
    pub async fn query(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, SourceError> {
        let rows = self
            .conn
            .simple_query(sql)
            .await
            .map_err(|e| wire_error(&self.url, e))?;
        Ok(rows
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|c| c.map(|b| String::from_utf8_lossy(&b).into_owned()))
                    .collect()
            })
            .collect())
    }

    /// The first column of the first row of `sql`, if any.
    pub async fn scalar(&mut self, sql: &str) -> Result<Option<String>, SourceError> {
        Ok(self
            .query(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// Fail unless `wal_level = logical`.
    pub async fn check_wal_level(&mut self) -> Result<(), SourceError> {
        let level = self.scalar("SHOW wal_level").await?.unwrap_or_default();
        if level != "logical" {
            return Err(SourceError::WalLevel(level));
        }
        Ok(())
    }

    /// Fail naming the first configured table that does not exist.
    pub async fn check_tables(&mut self, tables: &[(String, String)]) -> Result<(), SourceError> {
        for (schema, table) in tables {
            let sql = format!(
                "SELECT c.relkind::text, c.relpersistence::text FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = {} AND c.relname = {}",
                quote_literal(schema),
                quote_literal(table)
            );
            let row = self.query(&sql).await?.into_iter().next();
            let name = || format!("{schema}.{table}");
            let Some(row) = row else {
                return Err(SourceError::MissingTable(name()));
            };
            let (kind, persistence) = (
                row.first().cloned().flatten().unwrap_or_default(),
                row.get(1).cloned().flatten().unwrap_or_default(),
            );
            let why = match (kind.as_str(), persistence.as_str()) {
                ("r" | "p", "p") => continue,
                ("r" | "p", "u") => {
                    "it is UNLOGGED: its changes never reach the WAL (ALTER TABLE … SET LOGGED)"
                }
                ("r" | "p", _) => "it is a temporary table",
                ("v", _) => "it is a view: logical replication publishes tables (stream the tables it reads)",
                ("m", _) => "it is a materialized view: logical replication publishes tables (stream the tables it reads)",
                ("f", _) => "it is a foreign table: its rows live in another server",
                _ => "it is not a table",
            };
            return Err(SourceError::NotATable { table: name(), why });
        }
        Ok(())
    }

    /// Whether table `schema.table` exists.
    pub async fn table_exists(&mut self, schema: &str, table: &str) -> Result<bool, SourceError> {
        let sql = format!(
            "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} \
             AND c.relkind IN ('r', 'p')",
            quote_literal(schema),
            quote_literal(table)
        );
        Ok(!self.query(&sql).await?.is_empty())
    }

    /// `schema.table` of relation `oid` as committed (None: there is no such relation).
    pub async fn relation_name(&mut self, oid: u32) -> Result<Option<String>, SourceError> {
        let sql = format!(
            "SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = {oid}"
        );
        Ok(self
            .query(&sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// Whether relation `oid` is a partition whose changes the publication sends under an
    /// ancestor's name (`publish_via_partition_root`). pgoutput sends such a partition's
    /// Relation message after its ancestor's, though no row comes under the partition's OID.
    pub async fn published_as_ancestor(&mut self, oid: u32) -> Result<bool, SourceError> {
        if self.server_version().await? < 130_000 {
            return Ok(false);
        }
        let sql = format!(
            "SELECT 1 FROM pg_catalog.pg_class c, pg_catalog.pg_publication p \
             WHERE c.oid = {oid} AND c.relispartition AND p.pubname = {pubname} AND p.pubviaroot \
             AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_tables t \
               WHERE t.pubname = p.pubname AND (pg_catalog.quote_ident(t.schemaname) || '.' \
               || pg_catalog.quote_ident(t.tablename))::regclass = c.oid)",
            pubname = quote_literal(&self.publication)
        );
        Ok(!self.query(&sql).await?.is_empty())
    }

    /// The tables with REPLICA IDENTITY FULL (`schema.table`), each with its primary key
    /// columns (none: the whole row is its identity). Their Relation messages flag every column
    /// as key and every UPDATE sends the whole old row.
    pub async fn full_identity_keys(
        &mut self,
    ) -> Result<std::collections::HashMap<String, Vec<String>>, SourceError> {
        let rows = self
            .query(
                "SELECT n.nspname, c.relname, a.attname FROM pg_catalog.pg_class c \
                 JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                 LEFT JOIN pg_catalog.pg_index i ON i.indrelid = c.oid AND i.indisprimary \
                 LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid \
                   AND a.attnum = ANY(i.indkey) \
                 WHERE c.relreplident = 'f' AND c.relkind IN ('r', 'p') \
                 ORDER BY 1, 2, array_position(i.indkey::int2[], a.attnum)",
            )
            .await?;
        let mut out: std::collections::HashMap<String, Vec<String>> = Default::default();
        for r in rows {
            if let (Some(Some(s)), Some(Some(t))) = (r.first(), r.get(1)) {
                let cols = out.entry(format!("{s}.{t}")).or_default();
                if let Some(Some(c)) = r.get(2) {
                    cols.push(c.clone());
                }
            }
        }
        Ok(out)
    }

    /// Tables in `publication` now, as `(schema, table)`.
    pub async fn publication_tables(
        &mut self,
        publication: &str,
    ) -> Result<Vec<(String, String)>, SourceError> {
        Ok(self
            .query(&format!(
                "SELECT schemaname, tablename FROM pg_catalog.pg_publication_tables \
                 WHERE pubname = {} ORDER BY 1, 2",
                quote_literal(publication)
            ))
            .await?
            .into_iter()
            .filter_map(|r| match (r.first(), r.get(1)) {
                (Some(Some(s)), Some(Some(t))) => Some((s.clone(), t.clone())),
                _ => None,
            })
            .collect())
    }

    /// The leaf partitions (OID, `schema.table` quoted) of partitioned table `schema.table`,
    /// at any depth; None when it is not a partitioned table (or does not exist).
    pub async fn leaf_partitions(
        &mut self,
        schema: &str,
        table: &str,
    ) -> Result<Option<Vec<(u32, String)>>, SourceError> {
        // One query: a row without an OID says the root is a partitioned table (which may
        // have no partition at all), then one row per leaf.
        let sql = format!(
            "WITH RECURSIVE root AS (SELECT c.oid FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relname = {} AND c.relkind = 'p'), \
             tree(relid) AS (SELECT oid FROM root \
             UNION ALL SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree ON i.inhparent = tree.relid) \
             SELECT NULL::text, NULL::text FROM root \
             UNION ALL SELECT c.oid::text, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(c.relname) \
             FROM tree JOIN pg_catalog.pg_class c ON c.oid = tree.relid \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.relkind = 'r'",
            quote_literal(schema),
            quote_literal(table)
        );
        let rows = self.query(&sql).await?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut leaves: Vec<(u32, String)> = rows
            .into_iter()
            .filter_map(|r| {
                let oid = r.first().cloned().flatten()?.parse().ok()?;
                Some((oid, r.get(1).cloned().flatten()?))
            })
            .collect();
        leaves.sort_unstable();
        Ok(Some(leaves))
    }

    /// Whether leaf partition `leaf` (`quoted`: its `schema.table`, quoted) of `schema.table`
    /// has rows older than its youngest link to that table (`pg_inherits` rows, by age):
    /// rows that joined by `ATTACH PARTITION`, unpublished. Rows inserted after a partition
    /// was created (or attached) are younger, and were published.
    pub async fn has_rows_older_than_attach(
        &mut self,
        leaf: u32,
        quoted: &str,
        schema: &str,
        table: &str,
    ) -> Result<bool, SourceError> {
        let root = format!(
            "(SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
             ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {})",
            quote_literal(schema),
            quote_literal(table)
        );
        let sql = format!(
            "WITH RECURSIVE up(relid, link) AS ( \
               SELECT i.inhparent, pg_catalog.age(i.xmin) FROM pg_catalog.pg_inherits i \
               WHERE i.inhrelid = {leaf}::oid \
               UNION ALL SELECT i.inhparent, LEAST(up.link, pg_catalog.age(i.xmin)) \
               FROM pg_catalog.pg_inherits i JOIN up ON i.inhrelid = up.relid) \
             SELECT EXISTS (SELECT 1 FROM ONLY {quoted} \
               WHERE pg_catalog.age(xmin) > (SELECT min(link) FROM up WHERE relid = {root}))::text"
        );
        Ok(self.scalar(&sql).await?.as_deref() == Some("true"))
    }

    /// The OIDs of `tables` (those that exist), with their `schema.table`.
    pub async fn table_oids(
        &mut self,
        tables: &[(String, String)],
    ) -> Result<Vec<(u32, String)>, SourceError> {
        let mut out = Vec::new();
        for (schema, table) in tables {
            let sql = format!(
                "SELECT c.oid FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
                 ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {}",
                quote_literal(schema),
                quote_literal(table)
            );
            if let Some(oid) = self
                .query(&sql)
                .await?
                .into_iter()
                .next()
                .and_then(|r| r.into_iter().next().flatten())
                .and_then(|v| v.parse().ok())
            {
                out.push((oid, format!("{schema}.{table}")));
            }
        }
        Ok(out)
    }

    /// Which of relations `oids` `publication` does not publish (any more): dropped, or
    /// removed from it.
    pub async fn unpublished(
        &mut self,
        publication: &str,
        oids: &[u32],
    ) -> Result<Vec<u32>, SourceError> {
        if oids.is_empty() {
            return Ok(Vec::new());
        }
        let list = oids
            .iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT o FROM unnest(ARRAY[{list}]::oid[]) o WHERE NOT EXISTS (\
             SELECT 1 FROM pg_catalog.pg_publication_tables t \
             JOIN pg_catalog.pg_namespace n ON n.nspname = t.schemaname \
             JOIN pg_catalog.pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename \
             WHERE t.pubname = {} AND c.oid = o)",
            quote_literal(publication)
        );
        Ok(self
            .query(&sql)
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten()?.parse().ok())
            .collect())
    }

    /// The configured tables that are partitioned, as `schema.table`.
    async fn partitioned_tables(
        &mut self,
        tables: &[(String, String)],
    ) -> Result<Vec<String>, SourceError> {
        let mut out = Vec::new();
        for (schema, table) in tables {
            let sql = format!(
                "SELECT 1 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n \
                 ON n.oid = c.relnamespace WHERE n.nspname = {} AND c.relname = {} \
                 AND c.relkind = 'p'",
                quote_literal(schema),
                quote_literal(table)
            );
            if !self.query(&sql).await?.is_empty() {
                out.push(format!("{schema}.{table}"));
            }
        }
        Ok(out)
    }

    /// Refuse a configured partitioned table that `publication` (if it exists) would publish
    /// under its partitions' names, which are not configured tables: their changes would be
    /// left out. Returns whether any configured table is partitioned.
    pub async fn check_partitioned(
        &mut self,
        publication: &str,
        tables: &[(String, String)],
    ) -> Result<bool, SourceError> {
        let partitioned = self.partitioned_tables(tables).await?;
        let Some(first) = partitioned.first() else {
            return Ok(false);
        };
        let version = self.server_version().await?;
        if version < 130_000 {
            return Err(SourceError::Publication {
                publication: publication.into(),
                reason: format!(
                    "table {first} is partitioned, and PostgreSQL {} cannot publish a partitioned table (13 and later can)",
                    version / 10_000
                ),
            });
        }
        let via_root = self
            .scalar(&format!(
                "SELECT pubviaroot::text FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(publication)
            ))
            .await?;
        if via_root.as_deref() == Some("false") {
            return Err(SourceError::Publication {
                publication: publication.into(),
                reason: format!(
                    "it publishes the changes of partitioned table {first} under the names of its partitions; run ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
                    quote_ident(publication)
                ),
            });
        }
        Ok(true)
    }

    /// Refuse a publication (if it exists) that leaves out inserts, updates, deletes or
    /// truncates (`WITH (publish = …)`): those changes would never reach Iceberg, and a
    /// mirror would keep every deleted row, with nothing to tell.
    pub async fn check_operations(&mut self, publication: &str) -> Result<(), SourceError> {
        // `pubtruncate` is PostgreSQL 11's; to_jsonb reads it where it exists.
        let sql = format!(
            "SELECT concat_ws(',', CASE WHEN NOT pubinsert THEN 'insert' END, \
             CASE WHEN NOT pubupdate THEN 'update' END, CASE WHEN NOT pubdelete THEN 'delete' END, \
             CASE WHEN to_jsonb(p) ->> 'pubtruncate' = 'false' THEN 'truncate' END) \
             FROM pg_catalog.pg_publication p WHERE pubname = {}",
            quote_literal(publication)
        );
        let missing = self.scalar(&sql).await?.unwrap_or_default();
        if missing.is_empty() {
            return Ok(());
        }
        Err(SourceError::Publication {
            publication: publication.into(),
            reason: format!(
                "it does not publish {}: those changes would never reach Iceberg; run ALTER PUBLICATION {} SET (publish = 'insert, update, delete, truncate')",
                missing.replace(',', ", "),
                quote_ident(publication)
            ),
        })
    }

    /// Create the publication if missing (publishing partitioned tables under their own name),
    /// and add configured tables it lacks.
    pub async fn ensure_publication(
        &mut self,
        publication: &str,
        tables: &[(String, String)],
    ) -> Result<(), SourceError> {
        let partitioned = self.check_partitioned(publication, tables).await?;
        self.check_operations(publication).await?;
        let list = tables
            .iter()
            .map(|(s, t)| format!("{}.{}", quote_ident(s), quote_ident(t)))
            .collect::<Vec<_>>();
        let exists = !self
            .query(&format!(
                "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = {}",
                quote_literal(publication)
            ))
            .await?
            .is_empty();
        if !exists {
            tracing::info!(publication, "creating publication");
            let with = if partitioned {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            };
            self.query(&format!(
                "CREATE PUBLICATION {} FOR TABLE {}{with}",
                quote_ident(publication),
                list.join(", ")
            ))
            .await?;
            return Ok(());
        }
        let present = self.publication_tables(publication).await?;
        for ((s, t), quoted) in tables.iter().zip(&list) {
            if !present.iter().any(|(ps, pt)| ps == s && pt == t) {
                tracing::info!(publication, table = %format!("{s}.{t}"), "adding table to publication");
                self.query(&format!(
                    "ALTER PUBLICATION {} ADD TABLE {quoted}",
                    quote_ident(publication)
                ))
                .await?;
            }
        }
        Ok(())
    }

    /// Create a temporary slot that exports a snapshot; returns (consistent point, snapshot
    /// name). The snapshot stays usable while this session is open and idle.
    pub async fn export_snapshot(&mut self, temp_slot: &str) -> Result<(Lsn, String), SourceError> {
        let rows = self
            .query(&format!(
                "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT",
                quote_ident(temp_slot)
            ))
            .await?;
        let row = rows.into_iter().next().unwrap_or_default();
        let lsn = row
            .get(1)
            .cloned()
            .flatten()
            .and_then(|l| Lsn::parse_pg(&l));
        let name = row.get(2).cloned().flatten();
        match (lsn, name) {
            (Some(l), Some(n)) => Ok((l, n)),
            _ => Err(SourceError::Query(
                "CREATE_REPLICATION_SLOT returned no snapshot".into(),
            )),
        }
    }

    /// The table's columns as a Relation message would list them, with the key the sink uses:
    /// the replica identity index, or the primary key (also with REPLICA IDENTITY FULL, whose
    /// Relation messages flag every column; a FULL table without one has no key columns).
    pub async fn relation_columns(
        &mut self,
        schema: &str,
        table: &str,
    ) -> Result<Vec<super::pgoutput::RelationColumn>, SourceError> {
        let rows = self
            .query(&column_query(
                schema,
                table,
                "a.attname, a.atttypid::int8::text, a.atttypmod::text, \
                 (EXISTS (SELECT 1 FROM pg_catalog.pg_index i \
                   WHERE i.indrelid = c.oid AND ((c.relreplident = 'i' AND i.indisreplident) \
                     OR (c.relreplident IN ('d', 'f') AND i.indisprimary)) \
                   AND a.attnum = ANY(i.indkey)))::text",
                "JOIN pg_catalog.pg_class c ON c.oid = a.attrelid",
            ))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                super::pgoutput::RelationColumn {
                    name: get(0),
                    type_oid: get(1).parse().unwrap_or(25),
                    type_modifier: get(2).parse().unwrap_or(-1),
                    key: get(3) == "true",
                }
            })
            .collect())
    }

    /// What the catalog says now of the table's columns: each column's number (`attnum`, kept
    /// by RENAME and ALTER TYPE, never reused) and, for a domain or an array of domains or
    /// enums, the kind of its base type (a Relation message names only the domain's OID); a
    /// column declared with several dimensions (`int4[][]`) is text, as Iceberg has no list of
    /// lists to hold it (its values would all be dead letters otherwise).
    ///
    /// By OID when known: the catalog is the present, and the table may have another name by
    /// now than the change being applied says.
    pub async fn column_info(
        &mut self,
        schema: &str,
        table: &str,
        oid: Option<u32>,
    ) -> Result<Vec<CatalogColumn>, SourceError> {
        let rel = match oid {
            Some(o) => o.to_string(),
            None => quote_literal(&format!("{}.{}", quote_ident(schema), quote_ident(table))),
        };
        let rows = self
            .query(&column_query_on(
                &rel,
                "a.attname, a.attnum::text, t.typtype::text, t.typbasetype::int8::text, \
                 t.typtypmod::text, et.typtype::text, et.typbasetype::int8::text, \
                 et.typtypmod::text, a.atttypid::int8::text, \
                 (CASE t.typtype WHEN 'e' THEN 25 WHEN 'd' THEN t.typbasetype ELSE t.oid END)::int8::text, \
                 a.atttypmod::text, a.attndims::text, a.atthasdef::text",
                "JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 LEFT JOIN pg_catalog.pg_type et ON t.typcategory = 'A' AND et.oid = t.typelem",
            ))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                let num = |i: usize| get(i).parse::<i64>().ok();
                let base = |oid: Option<i64>, typmod: Option<i64>| {
                    ColumnKind::from_oid(oid.unwrap_or(25) as u32, typmod.unwrap_or(-1) as i32)
                };
                let kind = match (get(2).as_str(), get(5).as_str()) {
                    _ if num(11).unwrap_or(0) > 1 && !get(5).is_empty() => Some(ColumnKind::Text),
                    ("d", _) => Some(base(num(3), num(4))),
                    (_, "d") => Some(ColumnKind::List(Box::new(base(num(6), num(7))))),
                    (_, "e") => Some(ColumnKind::List(Box::new(ColumnKind::Text))),
                    _ => None,
                };
                CatalogColumn {
                    name: get(0),
                    attnum: num(1).unwrap_or(0) as i32,
                    type_oid: num(8).unwrap_or(0) as u32,
                    type_modifier: num(10).unwrap_or(-1) as i32,
                    kind,
                    binary_oid: num(9).or(num(8)).unwrap_or(0) as u32,
                    has_default: get(12) == "true",
                }
            })
            .collect())
    }

    /// Each column's name and output function, schema-qualified and quoted, in
    /// `relation_columns` order: calling it gives the column's text form even in a binary COPY.
    pub async fn output_functions(
        &mut self,
        schema: &str,
        table: &str,
    ) -> Result<Vec<(String, String)>, SourceError> {
        let rows = self
            .query(&column_query(
                schema,
                table,
                "a.attname, pg_catalog.quote_ident(n.nspname) || '.' || pg_catalog.quote_ident(p.proname)",
                "JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 JOIN pg_catalog.pg_proc p ON p.oid = t.typoutput \
                 JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace",
            ))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let get = |i: usize| r.get(i).cloned().flatten().unwrap_or_default();
                (get(0), get(1))
            })
            .collect())
    }

    /// `server_version_num` (e.g. 150004).
    /// An unreadable answer is an error: taking it for 0 would quietly turn protocol 2 and
    /// parallel snapshot readers off.
    pub async fn server_version(&mut self) -> Result<u32, SourceError> {
        let v = self
            .scalar("SELECT pg_catalog.current_setting('server_version_num')")
            .await?;
        v.as_deref()
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                SourceError::Query(format!(
                    "server_version_num is not a number: {:?}",
                    v.unwrap_or_default()
                ))
            })
    }

    /// Start `COPY ... TO STDOUT`; then call [`Session::copy_out_into`] until false.
    pub async fn copy_out_start(&mut self, sql: &str) -> Result<(), SourceError> {
        self.conn
            .copy_out_start(sql)
            .await
            .map_err(|e| wire_error(&self.url, e))
    }

    /// Append the copy's data that has arrived to `out`; false when the copy completed.
    pub async fn copy_out_into(&mut self, out: &mut bytes::BytesMut) -> Result<bool, SourceError> {
        self.conn
            .copy_out_into(out)
            .await
            .map_err(|e| wire_error(&self.url, e))
    }

    /// PID of the consumer holding `slot`, if another session streams from it now.
    pub async fn slot_holder(&mut self, slot: &str) -> Result<Option<String>, SourceError> {
        self.scalar(&format!(
            "SELECT active_pid::text FROM pg_catalog.pg_replication_slots \
             WHERE slot_name = {} AND active",
            quote_literal(slot)
        ))
        .await
    }

    /// Create the logical slot if missing; returns its `confirmed_flush_lsn` (None if new).
    pub async fn ensure_slot(&mut self, slot: &str) -> Result<Option<Lsn>, SourceError> {
        let rows = self
            .query(&format!(
                "SELECT plugin, database, active_pid::text, confirmed_flush_lsn::text \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?;
        if let Some(row) = rows.into_iter().next() {
            let get = |i: usize| row.get(i).cloned().flatten();
            let plugin = get(0).unwrap_or_default();
            if plugin != "pgoutput" {
                return Err(SourceError::Slot {
                    slot: slot.into(),
                    reason: format!("it uses plugin {plugin:?}, not pgoutput"),
                });
            }
            if get(1).as_deref() != Some(self.url.database.as_str()) {
                return Err(SourceError::Slot {
                    slot: slot.into(),
                    reason: format!("it belongs to database {:?}", get(1).unwrap_or_default()),
                });
            }
            if let Some(pid) = get(2) {
                return Err(SourceError::Slot {
                    slot: slot.into(),
                    reason: format!(
                        "it is in use by another consumer (pid {pid}); is a second agent running?"
                    ),
                });
            }
            return Ok(get(3).and_then(|l| Lsn::parse_pg(&l)));
        }
        tracing::info!(slot, "creating replication slot");
        self.query(&format!(
            "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            quote_ident(slot)
        ))
        .await?;
        Ok(None)
    }

    /// Install (or keep) the event trigger that writes a table's columns into the WAL at the
    /// end of each `ALTER TABLE` (a transactional message, prefix [`DDL_MESSAGE_PREFIX`]).
    /// Where no message can be written (`wal_level` lowered, the function's use revoked) it
    /// writes none rather than fail the DDL. No exception block: its subtransaction let the
    /// decoder send a message after the row changes that followed it (seen with
    /// `test_decoding`).
    /// False when it is not in place: the role is not a superuser (event triggers need one),
    /// or creating it failed (another agent creating it at once, say); the stream then goes on
    /// with the catalog as it is now.
    pub async fn ensure_ddl_messages(&mut self) -> Result<bool, SourceError> {
        // One disabled by an administrator (`ALTER EVENT TRIGGER … DISABLE`) stays so.
        let installed = "SELECT (e.evtenabled <> 'D')::text FROM pg_catalog.pg_event_trigger e \
             JOIN pg_catalog.pg_proc p ON p.oid = e.evtfoid \
             WHERE e.evtname = 'philotes_columns_after_ddl_v1' \
             AND p.proname = 'philotes_columns_after_ddl_v1'";
        if let Some(enabled) = self.scalar(installed).await? {
            return Ok(enabled == "true");
        }
        let superuser = self
            .scalar("SELECT rolsuper::text FROM pg_catalog.pg_roles WHERE rolname = current_user")
            .await?;
        if superuser.as_deref() != Some("true") {
            return Ok(false);
        }
        let create = format!(
            "CREATE OR REPLACE FUNCTION public.philotes_columns_after_ddl_v1() \
             RETURNS event_trigger LANGUAGE plpgsql AS $philotes$ \
             DECLARE r record; \
             BEGIN \
               IF pg_catalog.current_setting('wal_level') <> 'logical' \
                  OR NOT pg_catalog.has_function_privilege( \
                    'pg_catalog.pg_logical_emit_message(boolean, text, text)', 'EXECUTE') \
               THEN RETURN; END IF; \
               FOR r IN SELECT DISTINCT d.objid FROM pg_catalog.pg_event_trigger_ddl_commands() d \
                 JOIN pg_catalog.pg_class c ON c.oid = d.objid \
                 WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass \
                   AND c.relkind IN ('r', 'p') LOOP \
                 PERFORM pg_catalog.pg_logical_emit_message(true, '{DDL_MESSAGE_PREFIX}', \
                   (SELECT pg_catalog.json_build_object('oid', r.objid::int8, 'columns', \
                      pg_catalog.json_agg(pg_catalog.json_build_array(a.attnum, a.attname, \
                        a.atttypid::int8, a.atttypmod, a.atthasdef) ORDER BY a.attnum))::text \
                    FROM pg_catalog.pg_attribute a \
                    WHERE a.attrelid = r.objid AND a.attnum > 0 AND NOT a.attisdropped)); \
               END LOOP; \
             END $philotes$; \
             DROP EVENT TRIGGER IF EXISTS philotes_columns_after_ddl_v1; \
             CREATE EVENT TRIGGER philotes_columns_after_ddl_v1 ON ddl_command_end \
               WHEN TAG IN ('ALTER TABLE') \
               EXECUTE FUNCTION public.philotes_columns_after_ddl_v1();"
        );
        match self.query(&format!("BEGIN; {create} COMMIT;")).await {
            Ok(_) => Ok(true),
            Err(e) => {
                let _ = self.query("ROLLBACK").await;
                tracing::warn!(error = %e, "the DDL event trigger could not be installed: schema changes are placed by the catalog as it is now");
                Ok(false)
            }
        }
    }

    /// Write a non-transactional logical message (`philotes.heartbeat`): WAL moves and reaches
    /// the stream even when the published tables are idle, so the slot can advance.
    pub async fn emit_heartbeat(&mut self) -> Result<(), SourceError> {
        self.query("SELECT pg_catalog.pg_logical_emit_message(false, 'philotes.heartbeat', '')")
            .await
            .map(|_| ())
    }

    /// WAL retained by `slot` (`pg_current_wal_lsn() - restart_lsn`), None if the slot is gone.
    pub async fn slot_retained_bytes(&mut self, slot: &str) -> Result<Option<i64>, SourceError> {
        Ok(self
            .scalar(&format!(
                "SELECT (pg_catalog.pg_current_wal_lsn() - restart_lsn)::bigint \
                 FROM pg_catalog.pg_replication_slots WHERE slot_name = {}",
                quote_literal(slot)
            ))
            .await?
            .and_then(|v| v.parse().ok()))
    }

    /// The START_REPLICATION command for this session.
    fn start_command(&self, opts: StreamOptions) -> String {
        let proto = if opts.in_progress {
            "proto_version '2', streaming 'on'"
        } else {
            "proto_version '1'"
        };
        let binary = if opts.binary { ", binary 'true'" } else { "" };
        format!(
            "START_REPLICATION SLOT {} LOGICAL {} ({proto}, publication_names {}, messages 'true'{binary})",
            quote_ident(&self.slot),
            self.start.pg(),
            quote_literal(&quote_ident(&self.publication)),
        )
    }

    /// The type OIDs of every column of every table in the publication, as their binary form
    /// has them (a domain's base type, text for an enum: see [`CatalogColumn::binary_oid`]),
    /// to decide whether the stream can be read in binary.
    pub async fn publication_column_types(&mut self) -> Result<Vec<u32>, SourceError> {
        let rows = self
            .query(&format!(
                "SELECT DISTINCT (CASE t.typtype WHEN 'e' THEN 25 WHEN 'd' THEN t.typbasetype \
                 ELSE t.oid END)::int8::text FROM pg_catalog.pg_publication_tables p \
                 JOIN pg_catalog.pg_attribute a ON a.attrelid = \
                 (pg_catalog.quote_ident(p.schemaname) || '.' || pg_catalog.quote_ident(p.tablename))::regclass \
                 JOIN pg_catalog.pg_type t ON t.oid = a.atttypid \
                 WHERE p.pubname = {} AND a.attnum > 0 AND NOT a.attisdropped",
                quote_literal(&self.publication)
            ))
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten()?.parse().ok())
            .collect())
    }

    /// Send START_REPLICATION and wait until the server accepted it.
    pub async fn start(mut self, opts: StreamOptions) -> Result<ReplicationStream, SourceError> {
        let url = self.url.clone();
        let sql = self.start_command(opts);
        let accepted =
            tokio::time::timeout(Duration::from_secs(30), self.conn.start_copy_both(&sql));
        match accepted.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(wire_error(&url, e)),
            Err(_) => {
                return Err(SourceError::Connect {
                    url: url.display(),
                    reason: "START_REPLICATION was not answered within 30s".into(),
                })
            }
        }
        let stream = ReplicationStream::spawn(
            self.conn,
            StatusTiming {
                // An ack goes out as soon as a commit confirms a new position, at most one
                // per 250 ms (WAL is released promptly); idle sessions report every 5 s.
                changed: Duration::from_millis(250),
                idle: Duration::from_secs(5),
            },
        );
        stream.confirm(self.start);
        Ok(stream)
    }
}
