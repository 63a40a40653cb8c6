//! The neutral model between the source and the sink: what a column is, and how a source
//! table is named in Iceberg. The source produces it (from PostgreSQL OIDs and catalogs), the
//! sink consumes it (as Iceberg types), and neither knows the other.

/// The logical kind of a source column, which decides its Iceberg and Arrow types.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ColumnKind {
    /// int2 / int4 → Iceberg int.
    Int32,
    /// int8 → long.
    Int64,
    /// float4 → float.
    Float32,
    /// float8 → double.
    Float64,
    /// numeric(p,s) with p ≤ 38 → decimal(p,s).
    Decimal {
        /// Precision.
        precision: u8,
        /// Scale.
        scale: u8,
    },
    /// bool → boolean.
    Bool,
    /// Text and everything without a better mapping (the PostgreSQL text form).
    Text,
    /// bytea → binary.
    Bytea,
    /// date → date.
    Date,
    /// time → time (microseconds).
    Time,
    /// timestamp → timestamp (microseconds).
    Timestamp,
    /// timestamptz → timestamptz (microseconds, UTC).
    TimestampTz,
    /// uuid → uuid.
    Uuid,
    /// One-dimensional array → list<element>.
    List(Box<ColumnKind>),
}

/// What a change did to a row: the `_cdc_op` column's values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `I`: a new row.
    Insert,
    /// `U`: the row's new values.
    Update,
    /// `D`: the row's key (or old values) at its deletion.
    Delete,
    /// `T`: the table was truncated.
    Truncate,
    /// `R`: a row read by an initial snapshot.
    Read,
}

impl Op {
    /// The `_cdc_op` letter as a byte.
    pub fn letter(self) -> u8 {
        match self {
            Op::Insert => b'I',
            Op::Update => b'U',
            Op::Delete => b'D',
            Op::Truncate => b'T',
            Op::Read => b'R',
        }
    }

    /// The `_cdc_op` letter.
    pub fn code(self) -> &'static str {
        match self {
            Op::Insert => "I",
            Op::Update => "U",
            Op::Delete => "D",
            Op::Truncate => "T",
            Op::Read => "R",
        }
    }
}

/// A source column as the sink sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Its logical kind.
    pub kind: ColumnKind,
    /// Part of the key that identifies a row.
    pub key: bool,
}

/// Iceberg table name for a source table (contract: `<schema>__<table>` outside `public`).
pub fn iceberg_table_name(schema: &str, table: &str) -> String {
    // Engines read a dot in a table's name as a namespace separator.
    let name = if schema == "public" {
        table.to_string()
    } else {
        format!("{schema}__{table}")
    };
    name.replace('.', "_")
}

/// The `error_type` label of `philotes_cdc_errors_total` (and a retry's `error_type` in the
/// API): the contract's closed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// Connecting to PostgreSQL, or the replication stream ended.
    Connection,
    /// A setting the source or catalog refuses (wal_level, missing table, slot in use, …).
    Config,
    /// A query on the source failed.
    SourceQuery,
    /// A pgoutput message could not be decoded.
    Decode,
    /// Opening the catalog, a namespace or a table.
    IcebergCatalog,
    /// Writing data files.
    IcebergWrite,
    /// Committing a snapshot.
    IcebergCommit,
    /// Another writer committed first (rebased, or the retries ran out).
    CommitConflict,
    /// Building a batch.
    Batch,
    /// A schema change Iceberg cannot follow.
    Schema,
    /// Spooling a streamed in-progress transaction.
    Spool,
    /// State stored in a table cannot be read.
    State,
    /// A row that could not be converted went to the dead-letter table.
    Conversion,
    /// The slot retains more WAL than `max_slot_lag_bytes`.
    SlotLag,
    /// A commit refused because another agent committed to the table since this one last
    /// looked (a deposed leader's late commit): this agent steps down.
    Fenced,
}

impl ErrorType {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Connection => "connection",
            ErrorType::Config => "config",
            ErrorType::SourceQuery => "source_query",
            ErrorType::Decode => "decode",
            ErrorType::IcebergCatalog => "iceberg_catalog",
            ErrorType::IcebergWrite => "iceberg_write",
            ErrorType::IcebergCommit => "iceberg_commit",
            ErrorType::CommitConflict => "commit_conflict",
            ErrorType::Batch => "batch",
            ErrorType::Schema => "schema",
            ErrorType::Spool => "spool",
            ErrorType::State => "state",
            ErrorType::Conversion => "conversion",
            ErrorType::SlotLag => "slot_lag",
            ErrorType::Fenced => "fenced",
        }
    }
}

impl std::fmt::Display for ErrorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One row of a pipeline's dead-letter table, as the API shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// Source table (`schema.table`) the change came from.
    pub source_table: Option<String>,
    /// Commit LSN of the change's transaction.
    #[serde(rename = "_cdc_lsn")]
    pub cdc_lsn: i64,
    /// Position of the change inside its transaction.
    #[serde(rename = "_cdc_seq")]
    pub cdc_seq: i64,
    /// The change's operation (`I`, `U`, `D`, `R`).
    #[serde(rename = "_cdc_op")]
    pub cdc_op: Option<String>,
    /// Why the row could not be converted.
    pub error: Option<String>,
    /// The row as the source sent it, as JSON text.
    pub row_json: Option<String>,
    /// When it was dead-lettered (RFC 3339).
    pub time: Option<String>,
}

/// A position in the source's write-ahead log (PostgreSQL's `pg_lsn`). It has no `Display`:
/// the API and logs show it as PostgreSQL does ([`Lsn::pg`], `X/Y`), table properties store
/// the number ([`Lsn::get`]), and the type makes each choice explicit.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// The start of the log (nothing committed yet).
    pub const ZERO: Lsn = Lsn(0);

    /// The position as a number.
    pub fn get(self) -> u64 {
        self.0
    }

    /// `n` bytes before this position (the start of the log at the least).
    pub fn saturating_sub(self, n: u64) -> Lsn {
        Lsn(self.0.saturating_sub(n))
    }

    /// PostgreSQL's `X/Y` form.
    pub fn pg(self) -> String {
        format!("{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }

    /// Parse PostgreSQL's `X/Y` form.
    pub fn parse_pg(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.split_once('/')?;
        let hi = u32::from_str_radix(hi, 16).ok()?;
        let lo = u32::from_str_radix(lo, 16).ok()?;
        Some(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

#[cfg(test)]
mod tests {
    use super::Lsn;

    #[test]
    fn lsn_round_trips_through_the_postgres_form() {
        for v in [0u64, 1, 0x1_6B37_4D48, u64::MAX] {
            assert_eq!(Lsn::parse_pg(&Lsn(v).pg()), Some(Lsn(v)));
        }
        assert_eq!(Lsn(0x1_6B37_4D48).pg(), "1/6B374D48");
        assert_eq!(Lsn::parse_pg("16/B374D848"), Some(Lsn(0x16_B374_D848)));
        assert_eq!(Lsn::parse_pg("nope"), None);
        assert_eq!(Lsn::parse_pg("1/2/3"), None);
        assert_eq!(Lsn::parse_pg("100000000/0"), None);
    }
}
