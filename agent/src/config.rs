//! TOML configuration: `${VAR}` interpolation, `PHILOTES_<SECTION>_<KEY>` overrides, validation.
//!
//! Every error names the offending key (`pipelines[0].batch_rows`, `iceberg.catalog`, ...) on one
//! line, so `philotes check` and `philotes run` can print it and exit with status 2.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

mod secret;
mod source;
pub use secret::Secret;
pub use source::Source;

/// A configuration problem, naming the key it concerns.
#[derive(Debug, thiserror::Error)]
#[error("config: {key}: {message}")]
pub struct ConfigError {
    /// Dotted path of the offending key (or the file for read/syntax errors).
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Management API and `/metrics` listener.
    #[serde(default)]
    pub api: ApiConfig,
    /// OpenTelemetry export and logging.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Catalog and warehouse.
    #[serde(default)]
    pub iceberg: IcebergConfig,
    /// Table upkeep: metadata cleanup, snapshot expiry, compaction, orphan removal.
    #[serde(default)]
    pub maintenance: MaintenanceConfig,
    /// Hot standby: several agents on one config, one leading each pipeline.
    #[serde(default)]
    pub ha: HaConfig,
    /// One entry per replicated database.
    #[serde(default)]
    pub pipelines: Vec<PipelineConfig>,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Address of the HTTP listener (`/metrics`, `/health/*`, `/api/v1/*`).
    pub listen: String,
    /// Bearer token for mutating and sensitive routes; empty means no auth.
    pub token: Option<Secret>,
    /// Set to false to run without any HTTP listener.
    pub enabled: bool,
    /// Allow a non-loopback `listen` without a token (mutating routes then need no auth).
    pub allow_insecure: bool,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            token: None,
            enabled: true,
            allow_insecure: false,
        }
    }
}

/// `telemetry.otlp_protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum OtlpProtocol {
    /// OTLP/HTTP with protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC.
    #[serde(rename = "grpc")]
    Grpc,
}

impl OtlpProtocol {
    /// The value as written in the config (and in `OTEL_EXPORTER_OTLP_PROTOCOL`).
    pub fn as_str(self) -> &'static str {
        match self {
            OtlpProtocol::HttpProtobuf => "http/protobuf",
            OtlpProtocol::Grpc => "grpc",
        }
    }
}

/// `telemetry.log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `iceberg.catalog`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CatalogKind {
    /// A SQL database (SQLite or PostgreSQL) holding `iceberg_tables`.
    Sql,
    /// An Iceberg REST catalog.
    Rest,
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Serve the Prometheus exposition on `/metrics`.
    pub prometheus: bool,
    /// OTLP endpoint to push metrics and traces to; absent = no push.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `grpc`.
    pub otlp_protocol: OtlpProtocol,
    /// Period of the OTLP metric export.
    #[serde(with = "duration_str")]
    pub export_interval: Duration,
    /// Export spans over OTLP.
    pub traces: bool,
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// Default log filter when `RUST_LOG` is not set.
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            prometheus: true,
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            export_interval: Duration::from_secs(10),
            traces: true,
            log_format: LogFormat::Text,
            log_level: "info".into(),
        }
    }
}

/// `[iceberg]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IcebergConfig {
    /// `sql` or `rest`.
    pub catalog: CatalogKind,
    /// Name of the SQL catalog (a column of `iceberg_tables`).
    pub catalog_name: String,
    /// `sqlite://...`/`postgres://...` for sql, `http(s)://...` for rest.
    pub uri: String,
    /// Local path, `file://` or `s3://bucket/prefix`.
    pub warehouse: String,
    /// REST: bearer token.
    pub token: Option<Secret>,
    /// REST: OAuth2 client credential `id:secret`.
    pub credential: Option<Secret>,
    /// REST: OAuth2 token endpoint.
    pub oauth2_server_uri: Option<String>,
    /// REST: OAuth2 scope.
    pub scope: Option<String>,
    /// REST: path prefix.
    pub prefix: Option<String>,
    /// Extra catalog properties passed through unchanged.
    pub properties: BTreeMap<String, String>,
    /// Object storage settings for `s3://` warehouses.
    pub s3: S3Config,
}

impl Default for IcebergConfig {
    fn default() -> Self {
        Self {
            catalog: CatalogKind::Sql,
            catalog_name: "philotes".into(),
            uri: "sqlite://./data/catalog.db".into(),
            warehouse: "./data/warehouse".into(),
            token: None,
            credential: None,
            oauth2_server_uri: None,
            scope: None,
            prefix: None,
            properties: BTreeMap::new(),
            s3: S3Config::default(),
        }
    }
}

/// `[maintenance]`: what keeps the tables the agent writes healthy for months.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaintenanceConfig {
    /// Run maintenance inside the agent (`false`: leave it to Spark, Trino or `philotes maintain`).
    pub enabled: bool,
    /// How often each table's debt is examined.
    #[serde(with = "duration_str")]
    pub interval: Duration,
    /// Snapshots older than this are expired (the newest `retain_last` are always kept).
    #[serde(with = "duration_str")]
    pub snapshot_retention: Duration,
    /// Snapshots always kept, however old.
    pub retain_last: u32,
    /// Previous metadata files kept (`write.metadata.previous-versions-max`); older ones are
    /// deleted after each commit.
    pub metadata_versions: u32,
    /// Size compaction aims for when it rewrites small data files.
    #[serde(with = "size_str")]
    pub target_file_size: u64,
    /// Compaction starts once a partition has this many small files.
    pub min_input_files: u32,
    /// A mirror's data file is rewritten without its deleted rows once this fraction of them
    /// is deleted.
    pub delete_ratio: f64,
    /// Files under a table's location that no snapshot references are deleted once this old.
    #[serde(with = "duration_str")]
    pub orphan_age: Duration,
}

impl Default for MaintenanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(60),
            snapshot_retention: Duration::from_secs(3600),
            retain_last: 10,
            metadata_versions: 10,
            target_file_size: 128 << 20,
            min_input_files: 8,
            delete_ratio: 0.3,
            orphan_age: Duration::from_secs(86_400),
        }
    }
}

/// `[ha]`: several agents may run the same configuration; for each pipeline the one holding
/// its PostgreSQL advisory lock streams, the others stand by.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// Stand by instead of refusing a slot another agent holds.
    pub enabled: bool,
    /// A leader silent (no heartbeat on its lock session) this long is cut off and a standby
    /// takes over; a leader that cannot heartbeat for half of it steps down by itself.
    #[serde(with = "duration_str")]
    pub takeover_timeout: Duration,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            takeover_timeout: Duration::from_secs(15),
        }
    }
}

impl HaConfig {
    /// How often the leader proves it is alive (a query on its lock session).
    pub fn heartbeat_interval(&self) -> Duration {
        self.takeover_timeout / 5
    }

    /// How often a standby looks at the leader.
    pub fn poll_interval(&self) -> Duration {
        (self.takeover_timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(1))
    }
}

/// `[iceberg.s3]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Custom endpoint (MinIO, SeaweedFS, moto...).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Static access key; absent = default AWS credential chain.
    pub access_key_id: Option<Secret>,
    /// Static secret key.
    pub secret_access_key: Option<Secret>,
    /// Session token for temporary credentials.
    pub session_token: Option<Secret>,
    /// Path-style addressing (needed by most non-AWS servers).
    pub path_style: bool,
}

/// Whether to copy existing rows before streaming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotMode {
    /// Copy existing rows (`_cdc_op = 'R'`), then stream.
    Initial,
    /// Stream changes only.
    Never,
}

/// What each source table becomes in Iceberg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableMode {
    /// `<namespace>.<table>` is an append-only changelog (`_cdc_*` columns).
    #[default]
    Changelog,
    /// `<namespace>.<table>` holds the current state: one row per key, position deletes.
    Mirror,
    /// The mirror at `<namespace>.<table>`, the changelog at `<namespace>.<table>_changelog`.
    Both,
}

impl TableMode {
    /// Whether a mirror table is written.
    pub fn mirror(self) -> bool {
        matches!(self, TableMode::Mirror | TableMode::Both)
    }

    /// Whether a changelog table is written.
    pub fn changelog(self) -> bool {
        matches!(self, TableMode::Changelog | TableMode::Both)
    }
}

/// One `[[pipelines]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Unique name; the `source` label of every metric.
    pub name: String,
    /// `postgres://user:password@host:port/db?sslmode=...`, parsed when the file is read.
    pub source: Source,
    /// Replication slot (default `philotes_<name>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// Publication (default `philotes_<name>`).
    #[serde(default)]
    pub publication: Option<String>,
    /// `schema.table` (or `table` for `public`).
    pub tables: Vec<String>,
    /// Also stream every other table in the publication, including tables added to it while
    /// the agent runs (`false`: only `tables`).
    #[serde(default = "default_true")]
    pub follow_publication: bool,
    /// Receive large transactions while they are still in progress (pgoutput protocol 2,
    /// PostgreSQL 14+) and spool them locally until they commit (`false`: the server spools
    /// them and sends them after the commit).
    #[serde(default = "default_true")]
    pub stream_in_progress: bool,
    /// Receive values in their binary (send) form when every published column's type has a
    /// binary reader (pgoutput `binary 'true'`, PostgreSQL 14+); text otherwise.
    #[serde(default = "default_true")]
    pub binary: bool,
    /// Install an event trigger that writes each altered table's columns (numbers, names,
    /// types) into the WAL at the `ALTER TABLE`, so that schema changes are placed by the
    /// columns of their time rather than the catalog's now (needs a superuser; without one,
    /// or `false`, the catalog is read as before).
    #[serde(default = "default_true")]
    pub ddl_messages: bool,
    /// Directory for the spool files of in-progress transactions (default: `$TMPDIR`, else
    /// `/var/tmp`).
    #[serde(default)]
    pub spool_dir: Option<std::path::PathBuf>,
    /// Iceberg namespace (default: the pipeline name).
    #[serde(default)]
    pub namespace: Option<String>,
    /// What each source table becomes: `changelog`, `mirror` or `both`.
    #[serde(default)]
    pub mode: TableMode,
    /// Per-table override of `mode`: `"schema.table"` (or `"table"` in `public`) → mode.
    #[serde(default)]
    pub table_modes: std::collections::BTreeMap<String, TableMode>,
    /// Memory a mirror table's key index may hold (per table); past it the pipeline stops with
    /// an error naming the table instead of running out of memory.
    #[serde(default = "default_mirror_index_memory", with = "size_str")]
    pub mirror_index_memory: u64,
    /// Initial snapshot mode.
    #[serde(default = "default_snapshot")]
    pub snapshot: SnapshotMode,
    /// Sessions that read one table's initial snapshot in parallel (block ranges of the same
    /// exported snapshot; PostgreSQL 14 or later, else 1).
    #[serde(default = "default_snapshot_readers")]
    pub snapshot_readers: u32,
    /// Rows between the commits of an initial snapshot; each records the copy's progress so
    /// a crash resumes after the last one.
    #[serde(default = "default_snapshot_chunk_rows")]
    pub snapshot_chunk_rows: u64,
    /// Flush once this many rows are buffered.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: u64,
    /// Flush once this many bytes are buffered.
    #[serde(default = "default_batch_bytes", with = "size_str")]
    pub batch_bytes: u64,
    /// Flush at the next transaction boundary once the oldest buffered change is this old.
    #[serde(default = "default_flush_interval", with = "duration_str")]
    pub flush_interval: Duration,
    /// Upper bound of buffered, not yet written data.
    #[serde(default = "default_max_buffer", with = "size_str")]
    pub max_buffer_bytes: u64,
    /// Emit a logical-decoding heartbeat message this often (keeps an idle slot moving).
    #[serde(default, with = "opt_duration_str")]
    pub heartbeat_interval: Option<Duration>,
    /// Alarm (error state, not ready, `error_type="slot_lag"`) when the slot retains more WAL.
    #[serde(default, with = "opt_size_str")]
    pub max_slot_lag_bytes: Option<u64>,
}

/// Most users want the rows that already exist too (Debezium's default is `initial` as well).
fn default_snapshot() -> SnapshotMode {
    SnapshotMode::Initial
}
fn default_true() -> bool {
    true
}
fn default_snapshot_chunk_rows() -> u64 {
    1_000_000
}

fn default_snapshot_readers() -> u32 {
    2
}
fn default_batch_rows() -> u64 {
    100_000
}
fn default_batch_bytes() -> u64 {
    64 << 20
}
fn default_flush_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_max_buffer() -> u64 {
    256 << 20
}

fn default_mirror_index_memory() -> u64 {
    2 << 30
}

impl PipelineConfig {
    /// Replication slot name.
    pub fn slot_name(&self) -> String {
        self.slot
            .clone()
            .unwrap_or_else(|| format!("philotes_{}", self.name))
    }
    /// Publication name.
    pub fn publication_name(&self) -> String {
        self.publication
            .clone()
            .unwrap_or_else(|| format!("philotes_{}", self.name))
    }
    /// Iceberg namespace.
    pub fn namespace_name(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| self.name.clone())
    }
    /// The mode of source table `schema.table`: its `table_modes` entry, else `mode`.
    pub fn mode_for(&self, table: &str) -> TableMode {
        self.table_modes
            .iter()
            .find(|(k, _)| {
                let (s, t) = split_table(k);
                format!("{s}.{t}") == table
            })
            .map_or(self.mode, |(_, m)| *m)
    }

    /// Tables as `(schema, table)` pairs.
    pub fn table_names(&self) -> Vec<(String, String)> {
        self.tables.iter().map(|t| split_table(t)).collect()
    }
}

/// Split `schema.table` (default schema `public`) into the names as the catalog has them:
/// each part as written (case kept: `public.Orders` is the table created as `"Orders"`), or in
/// double quotes, which may hold a dot (`public."a.b"`, `""` for a quote).
pub fn split_table(t: &str) -> (String, String) {
    parse_table(t).unwrap_or_else(|| match t.split_once('.') {
        Some((s, n)) => (s.to_string(), n.to_string()),
        None => ("public".to_string(), t.to_string()),
    })
}

/// [`split_table`], or None when `t` is not one or two names (an unclosed quote, an empty
/// part, text after a closing quote).
fn parse_table(t: &str) -> Option<(String, String)> {
    let (first, rest) = parse_name(t)?;
    if rest.is_empty() {
        return Some(("public".to_string(), first));
    }
    let (second, rest) = parse_name(rest.strip_prefix('.')?)?;
    rest.is_empty().then_some((first, second))
}

/// One name at the start of `s` and what follows it.
fn parse_name(s: &str) -> Option<(String, &str)> {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s.find('.').unwrap_or(s.len());
        return (end > 0).then(|| (s[..end].to_string(), &s[end..]));
    };
    let mut name = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        if c != '"' {
            name.push(c);
        } else if quoted[i + 1..].starts_with('"') {
            name.push('"');
            chars.next();
        } else {
            return (!name.is_empty()).then(|| (name, &quoted[i + 1..]));
        }
    }
    None
}

/// A table or schema name PostgreSQL can have: 1-63 bytes, no control characters.
fn valid_table_part(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && !s.chars().any(char::is_control)
}

/// Sections whose keys `PHILOTES_<SECTION>_<KEY>` may override (longest first).
const OVERRIDE_SECTIONS: &[(&str, &[&str])] = &[
    ("ICEBERG_S3_", &["iceberg", "s3"]),
    ("MAINTENANCE_", &["maintenance"]),
    ("TELEMETRY_", &["telemetry"]),
    ("ICEBERG_", &["iceberg"]),
    ("API_", &["api"]),
    ("HA_", &["ha"]),
];

/// Keys whose override value is a boolean rather than a string.
const BOOL_KEYS: &[&str] = &[
    "api.allow_insecure",
    "telemetry.prometheus",
    "telemetry.traces",
    "iceberg.s3.path_style",
    "api.enabled",
    "maintenance.enabled",
    "ha.enabled",
];

/// Keys whose override value is a number with a fraction.
const FLOAT_KEYS: &[&str] = &["maintenance.delete_ratio"];

/// Keys whose override value is a whole number.
const INT_KEYS: &[&str] = &[
    "maintenance.retain_last",
    "maintenance.metadata_versions",
    "maintenance.min_input_files",
];

impl Config {
    /// Read, interpolate, override and validate the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(path.display().to_string(), format!("cannot read: {e}"))
        })?;
        let env: Vec<(String, String)> = std::env::vars().collect();
        Self::parse(&text, &env)
    }

    /// Parse config text against an explicit environment (testable without touching the process).
    pub fn parse(text: &str, env: &[(String, String)]) -> Result<Self, ConfigError> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| {
            let msg = e.message().replace('\n', " ");
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            ConfigError::new(
                line.map(|l| format!("line {l}"))
                    .unwrap_or_else(|| "file".into()),
                format!("TOML syntax: {msg}"),
            )
        })?;
        let lookup = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        interpolate(&mut value, "", &lookup)?;
        apply_overrides(&mut value, env)?;
        let mut cfg: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            let (key, msg) = deserialize_error(if path == "." { "config" } else { &path }, &inner);
            ConfigError::new(key, msg)
        })?;
        // An empty token (e.g. `${PHILOTES_API_TOKEN:-}` with the variable unset) means no auth.
        if cfg.api.token.as_ref().is_some_and(Secret::is_empty) {
            cfg.api.token = None;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// Semantic checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.api.enabled {
            let addr = self.api.listen.parse::<SocketAddr>().map_err(|e| {
                ConfigError::new("api.listen", format!("not a socket address: {e}"))
            })?;
            let has_token = self.api.token.as_ref().is_some_and(|t| !t.is_empty());
            if !addr.ip().is_loopback() && !has_token && !self.api.allow_insecure {
                return Err(ConfigError::new(
                    "api.listen",
                    format!(
                        "{addr} is not a loopback address and [api] token is not set; set a token \
                         (or api.allow_insecure = true to accept unauthenticated control)"
                    ),
                ));
            }
        }
        let t = &self.telemetry;
        if let Some(ep) = &t.otlp_endpoint {
            check_url("telemetry.otlp_endpoint", ep, &["http", "https"])?;
        }
        if t.export_interval.is_zero() {
            return Err(ConfigError::new(
                "telemetry.export_interval",
                "must be greater than zero",
            ));
        }
        let ice = &self.iceberg;
        match ice.catalog {
            CatalogKind::Sql => {
                if !(ice.uri.starts_with("sqlite:")
                    || ice.uri.starts_with("postgres://")
                    || ice.uri.starts_with("postgresql://"))
                {
                    return Err(ConfigError::new(
                        "iceberg.uri",
                        "the sql catalog needs a sqlite:// or postgres:// URI",
                    ));
                }
            }
            CatalogKind::Rest => check_url("iceberg.uri", &ice.uri, &["http", "https"])?,
        }
        if ice.catalog_name.is_empty() {
            return Err(ConfigError::new(
                "iceberg.catalog_name",
                "must not be empty",
            ));
        }
        if ice.warehouse.is_empty() {
            return Err(ConfigError::new("iceberg.warehouse", "must not be empty"));
        }
        if ice.warehouse.contains("://")
            && !(ice.warehouse.starts_with("file://") || ice.warehouse.starts_with("s3://"))
        {
            return Err(ConfigError::new(
                "iceberg.warehouse",
                "must be a path, file:// or s3:// location",
            ));
        }
        if let Some(ep) = &ice.s3.endpoint {
            check_url("iceberg.s3.endpoint", ep, &["http", "https"])?;
        }
        let m = &self.maintenance;
        if m.interval < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "maintenance.interval",
                "must be at least 1s",
            ));
        }
        if m.retain_last == 0 {
            return Err(ConfigError::new(
                "maintenance.retain_last",
                "must be at least 1 (the current snapshot is always kept)",
            ));
        }
        if m.metadata_versions == 0 {
            return Err(ConfigError::new(
                "maintenance.metadata_versions",
                "must be at least 1",
            ));
        }
        if m.target_file_size < (1 << 20) {
            return Err(ConfigError::new(
                "maintenance.target_file_size",
                "must be at least 1MiB",
            ));
        }
        if m.min_input_files < 2 {
            return Err(ConfigError::new(
                "maintenance.min_input_files",
                "must be at least 2 (one file has nothing to merge with)",
            ));
        }
        if !(m.delete_ratio > 0.0 && m.delete_ratio <= 1.0) {
            return Err(ConfigError::new(
                "maintenance.delete_ratio",
                "must be above 0 and at most 1 (the deleted fraction of a data file)",
            ));
        }
        // A flush's files exist before its commit references them: a short age would delete
        // them in between.
        if m.orphan_age < Duration::from_secs(3600) {
            return Err(ConfigError::new(
                "maintenance.orphan_age",
                "must be at least 1h (younger files may belong to a commit in progress)",
            ));
        }
        if self.ha.takeover_timeout < Duration::from_secs(2) {
            return Err(ConfigError::new(
                "ha.takeover_timeout",
                "must be at least 2s (the leader heartbeats every fifth of it)",
            ));
        }
        if self.pipelines.is_empty() {
            return Err(ConfigError::new(
                "pipelines",
                "at least one [[pipelines]] entry is required",
            ));
        }
        let mut names = HashSet::new();
        let mut slots = HashSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            let key = |k: &str| format!("pipelines[{i}].{k}");
            if !valid_ident(&p.name) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("{:?} must be 1-48 characters of a-z, 0-9 and _", p.name),
                ));
            }
            if !names.insert(p.name.clone()) {
                return Err(ConfigError::new(
                    key("name"),
                    format!("duplicate pipeline name {:?}", p.name),
                ));
            }
            let slot = p.slot_name();
            if !valid_pg_name(&slot) {
                return Err(ConfigError::new(
                    key("slot"),
                    format!("{slot:?} must be 1-63 characters of a-z, 0-9 and _"),
                ));
            }
            if !slots.insert((p.source.expose().to_string(), slot.clone())) {
                return Err(ConfigError::new(
                    key("slot"),
                    format!("slot {slot:?} is used by two pipelines on the same source"),
                ));
            }
            if !valid_pg_name(&p.publication_name()) {
                return Err(ConfigError::new(
                    key("publication"),
                    "must be 1-63 characters of a-z, 0-9 and _",
                ));
            }
            if p.tables.is_empty() {
                return Err(ConfigError::new(
                    key("tables"),
                    "must list at least one table",
                ));
            }
            for (j, t) in p.tables.iter().enumerate() {
                let Some((s, n)) =
                    parse_table(t).filter(|(s, n)| valid_table_part(s) && valid_table_part(n))
                else {
                    return Err(ConfigError::new(
                        format!("pipelines[{i}].tables[{j}]"),
                        format!("{t:?} must be `table` or `schema.table`, names as the catalog has them (case kept), a name with a dot in double quotes"),
                    ));
                };
                // `a.b` and `public.a__b` would write into one Iceberg table.
                let iceberg = crate::model::iceberg_table_name(&s, &n);
                if let Some(other) = p.tables[..j].iter().find(|o| {
                    let (os, on) = split_table(o);
                    crate::model::iceberg_table_name(&os, &on) == iceberg
                }) {
                    return Err(ConfigError::new(
                        format!("pipelines[{i}].tables[{j}]"),
                        format!("{t:?} and {other:?} map to the same Iceberg table {iceberg:?}; put them in separate pipelines with their own namespace"),
                    ));
                }
            }
            if !valid_ident(&p.namespace_name()) {
                return Err(ConfigError::new(
                    key("namespace"),
                    "must be 1-48 characters of a-z, 0-9 and _",
                ));
            }
            if !(1..=16).contains(&p.snapshot_readers) {
                return Err(ConfigError::new(
                    key("snapshot_readers"),
                    "must be between 1 and 16",
                ));
            }
            if p.snapshot_chunk_rows == 0 {
                return Err(ConfigError::new(
                    key("snapshot_chunk_rows"),
                    "must be at least 1",
                ));
            }
            if p.batch_rows == 0 {
                return Err(ConfigError::new(
                    key("batch_rows"),
                    "must be greater than zero",
                ));
            }
            if p.flush_interval.is_zero() {
                return Err(ConfigError::new(
                    key("flush_interval"),
                    "must be greater than zero",
                ));
            }
            if p.heartbeat_interval
                .is_some_and(|d| d < Duration::from_secs(1))
            {
                return Err(ConfigError::new(
                    key("heartbeat_interval"),
                    "must be at least 1s",
                ));
            }
            if p.max_buffer_bytes < (1 << 20) {
                return Err(ConfigError::new(
                    key("max_buffer_bytes"),
                    "must be at least 1MiB",
                ));
            }
            if p.mirror_index_memory < (1 << 20) {
                return Err(ConfigError::new(
                    key("mirror_index_memory"),
                    "must be at least 1MiB",
                ));
            }
            // An override for a table the pipeline does not stream is a typo, unless tables
            // may join the publication.
            let tables = p.table_names();
            for name in p.table_modes.keys() {
                if !p.follow_publication && !tables.contains(&split_table(name)) {
                    return Err(ConfigError::new(
                        key(&format!("table_modes.\"{name}\"")),
                        "names a table that is not in `tables`",
                    ));
                }
            }
        }
        Ok(())
    }

    /// Every secret in the configuration (tokens, keys, source passwords), for log scrubbing.
    pub fn secrets(&self) -> Vec<String> {
        // The same list the API's redaction hides (and the catalog's error scrubbing uses).
        let mut out: Vec<String> = self.iceberg.secrets();
        out.extend(self.api.token.iter().map(|t| t.expose().to_string()));
        for p in &self.pipelines {
            out.push(p.source.url().password.clone());
            // The URL form too (percent-encoded), as a URL may be logged whole.
            if let Ok(parsed) = url::Url::parse(p.source.expose()) {
                if let Some(pw) = parsed.password() {
                    out.push(pw.to_string());
                }
            }
        }
        out.retain(|s| !s.is_empty());
        out
    }

    /// The configuration as JSON with every secret replaced by `"***"`.
    pub fn redacted(&self) -> serde_json::Value {
        let mut c = self.clone();
        // Tokens and keys are `Secret`s: they serialize as "***" by themselves.
        c.iceberg.uri = redact_url(&c.iceberg.uri);
        for (k, v) in c.iceberg.properties.iter_mut() {
            if is_secret_property(k) {
                *v = "***".into();
            }
        }
        serde_json::to_value(&c).unwrap_or(serde_json::Value::Null)
    }
}

impl IcebergConfig {
    /// Every secret in `[iceberg]`, to scrub from logs and error messages: the keys
    /// `/api/v1/config` hides, including the access key id and secret-looking `properties`.
    pub fn secrets(&self) -> Vec<String> {
        [
            &self.token,
            &self.credential,
            &self.s3.access_key_id,
            &self.s3.secret_access_key,
            &self.s3.session_token,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.expose().to_string())
        .chain(
            self.properties
                .iter()
                .filter(|(k, _)| is_secret_property(k))
                .map(|(_, v)| v.clone()),
        )
        .filter(|s| s.len() >= 3)
        .collect()
    }
}

/// A serde error as (key, message): one line, no trailing space, the key named once. serde
/// says ``unknown field `x`, expected one of `a`, `b` `` and the path may or may not end in `x`
/// already; the key becomes the full path of the unknown key and the message lists the valid
/// ones.
fn deserialize_error(path: &str, inner: &str) -> (String, String) {
    let mut one_line = inner.split_whitespace().collect::<Vec<_>>().join(" ");
    // The TOML deserializer ends with ` in `key`` (or ` in section`): the key is named already.
    if let Some(i) = one_line.rfind(" in ") {
        let tail = one_line[i + 4..].trim_matches('`');
        let path_plain = path.replace(['[', ']'], ".");
        if !tail.contains(' ') && (path.contains(tail) || path_plain.contains(tail)) {
            one_line.truncate(i);
        }
    }
    let join = |field: &str| {
        if path == "config" {
            field.to_string()
        } else {
            format!("{path}.{field}")
        }
    };
    if let Some((field, _)) = one_line
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split_once('`'))
    {
        return (join(field), "required key is missing".to_string());
    }
    let Some((field, tail)) = one_line
        .strip_prefix("unknown field `")
        .and_then(|rest| rest.split_once('`'))
    else {
        return (path.to_string(), one_line);
    };
    let key = if path.rsplit('.').next() == Some(field) {
        path.to_string()
    } else {
        join(field)
    };
    let valid = tail
        .trim_start_matches(',')
        .trim()
        .trim_start_matches("expected one of")
        .trim_start_matches("expected")
        .trim()
        .replace('`', "");
    let msg = if valid.is_empty() || valid.starts_with("no fields") {
        "unknown key".to_string()
    } else {
        format!("unknown key (valid keys: {valid})")
    };
    (key, msg)
}

/// Whether an `iceberg.properties` entry holds a secret (hidden in `/api/v1/config` and
/// scrubbed from logs alike).
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["secret", "token", "password", "credential", "key"]
        .iter()
        .any(|s| k.contains(s))
}

/// Replace the password of a URL (and any `password=` query parameter) with `***`.
pub fn redact_url(u: &str) -> String {
    match url::Url::parse(u) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            let pairs: Vec<(String, String)> = parsed
                .query_pairs()
                .map(|(k, v)| {
                    if k.eq_ignore_ascii_case("password") {
                        (k.into_owned(), "***".to_string())
                    } else {
                        (k.into_owned(), v.into_owned())
                    }
                })
                .collect();
            if !pairs.is_empty() {
                parsed.query_pairs_mut().clear().extend_pairs(pairs);
            }
            parsed.to_string()
        }
        Err(_) => "***".into(),
    }
}

fn check_url(key: &str, v: &str, schemes: &[&str]) -> Result<(), ConfigError> {
    let u = url::Url::parse(v)
        .map_err(|e| ConfigError::new(key, format!("not a URL ({e}): {:?}", redact_url(v))))?;
    if !schemes.contains(&u.scheme()) {
        return Err(ConfigError::new(
            key,
            format!("scheme must be one of {schemes:?}, got {:?}", u.scheme()),
        ));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(ConfigError::new(key, "URL has no host"));
    }
    Ok(())
}

fn valid_ident(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 48
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

fn valid_pg_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !s.as_bytes()[0].is_ascii_digit()
}

/// Replace `${VAR}` in every string; an unset variable is an error naming the key.
fn interpolate(
    v: &mut toml::Value,
    path: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match v {
        toml::Value::String(s) if s.contains("${") => {
            *s = expand(s, lookup).map_err(|m| ConfigError::new(path, m))?;
        }
        toml::Value::Array(a) => {
            for (i, item) in a.iter_mut().enumerate() {
                interpolate(item, &format!("{path}[{i}]"), lookup)?;
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                interpolate(item, &p, lookup)?;
            }
        }
        _ => {}
    }
    Ok(())
}

fn expand(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let after = &rest[i + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unterminated ${ in value".to_string())?;
        let name = &after[..end];
        // `${VAR:-default}` as in shells, for optional secrets with local defaults.
        let (name, default) = match name.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (name, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("bad variable name in ${{{name}}}"));
        }
        match lookup(name)
            .filter(|v| !v.is_empty())
            .or(default.map(String::from))
        {
            Some(v) => out.push_str(&v),
            None => return Err(format!("environment variable {name} is not set")),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

fn apply_overrides(v: &mut toml::Value, env: &[(String, String)]) -> Result<(), ConfigError> {
    let Some(root) = v.as_table_mut() else {
        return Ok(());
    };
    for (name, val) in env {
        let Some(rest) = name.strip_prefix("PHILOTES_") else {
            continue;
        };
        let Some((prefix, path)) = OVERRIDE_SECTIONS
            .iter()
            .find(|(p, _)| rest.starts_with(p))
            .map(|(p, path)| (*p, *path))
        else {
            continue;
        };
        let key = rest[prefix.len()..].to_ascii_lowercase();
        if key.is_empty() {
            continue;
        }
        let dotted = format!("{}.{key}", path.join("."));
        let new = if BOOL_KEYS.contains(&dotted.as_str()) {
            match val.to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" => toml::Value::Boolean(true),
                "false" | "0" | "no" => toml::Value::Boolean(false),
                _ => {
                    return Err(ConfigError::new(
                        dotted,
                        format!("{name} must be true or false"),
                    ))
                }
            }
        } else if INT_KEYS.contains(&dotted.as_str()) {
            match val.trim().parse::<i64>() {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => {
                    return Err(ConfigError::new(
                        dotted,
                        format!("{name} must be a whole number"),
                    ))
                }
            }
        } else if FLOAT_KEYS.contains(&dotted.as_str()) {
            match val.trim().parse::<f64>() {
                Ok(n) => toml::Value::Float(n),
                Err(_) => return Err(ConfigError::new(dotted, format!("{name} must be a number"))),
            }
        } else {
            toml::Value::String(val.clone())
        };
        let mut table = &mut *root;
        for seg in path {
            let entry = table
                .entry(seg.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
            table = match entry.as_table_mut() {
                Some(t) => t,
                None => return Err(ConfigError::new(*seg, "must be a table")),
            };
        }
        table.insert(key, new);
    }
    Ok(())
}

/// Parse a size such as `256MiB`, `64MB`, `1024` (bytes), through `bytesize` (SI and IEC
/// units, case-insensitive).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    s.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| format!("invalid size {s:?} ({e}); e.g. \"256MiB\""))
}

mod duration_str {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(s.trim()).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); e.g. \"1s\", \"500ms\""
            ))
        })
    }

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

mod opt_duration_str {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration_str::deserialize(d).map(Some)
    }

    pub fn serialize<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }
}

mod opt_size_str {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        super::size_str::deserialize(d).map(Some)
    }

    pub fn serialize<S: serde::Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.serialize_u64(*v),
            None => s.serialize_none(),
        }
    }
}

mod size_str {
    use super::*;

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Int(u64),
        Str(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a size such as \"256MiB\""))?
        {
            Raw::Int(n) => Ok(n),
            Raw::Str(s) => parse_size(&s).map_err(serde::de::Error::custom),
        }
    }

    pub fn serialize<S: serde::Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[pipelines]]
name = "shop"
source = "postgres://u:pw@127.0.0.1:5432/shop"
tables = ["orders"]
"#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn table_names_are_the_catalogs_with_quotes_for_dots() {
        let pair = |s: &str, t: &str| Some((s.to_string(), t.to_string()));
        assert_eq!(parse_table("orders"), pair("public", "orders"));
        assert_eq!(parse_table("sales.Orders"), pair("sales", "Orders"));
        assert_eq!(
            parse_table("public.Order Items"),
            pair("public", "Order Items")
        );
        assert_eq!(
            parse_table(r#""my.schema"."a ""b"".c""#),
            pair("my.schema", r#"a "b".c"#)
        );
        assert_eq!(parse_table(r#"s."T""#), pair("s", "T"));
        for bad in ["a.b.c", "", ".t", "s.", r#""open"#, r#""a"b"#, r#""""#] {
            assert_eq!(parse_table(bad), None, "{bad:?}");
        }
        let bad = Config::parse(&MIN.replace("\"orders\"", "\"a.b.c\""), &[]).unwrap_err();
        assert!(bad.to_string().contains("pipelines[0].tables[0]"), "{bad}");
        let ok =
            Config::parse(&MIN.replace("\"orders\"", "'public.\"Order.Items\"'"), &[]).unwrap();
        assert_eq!(
            ok.pipelines[0].table_names(),
            vec![("public".into(), "Order.Items".into())]
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::parse(MIN, &[]).unwrap();
        let p = &c.pipelines[0];
        assert_eq!(p.slot_name(), "philotes_shop");
        assert_eq!(p.namespace_name(), "shop");
        assert_eq!(p.flush_interval, Duration::from_secs(1));
        assert_eq!(p.max_buffer_bytes, 256 << 20);
        assert_eq!(c.iceberg.catalog_name, "philotes");
    }

    #[test]
    fn interpolation_and_overrides() {
        let text = format!("[api]\ntoken = \"${{TOK}}\"\n{MIN}");
        let c = Config::parse(
            &text,
            &env(&[
                ("TOK", "s3cret"),
                ("PHILOTES_ICEBERG_WAREHOUSE", "/tmp/wh"),
                ("PHILOTES_TELEMETRY_PROMETHEUS", "false"),
                ("PHILOTES_ICEBERG_S3_PATH_STYLE", "true"),
            ]),
        )
        .unwrap();
        assert_eq!(c.api.token.as_ref().map(Secret::expose), Some("s3cret"));
        assert_eq!(c.iceberg.warehouse, "/tmp/wh");
        assert!(!c.telemetry.prometheus);
        assert!(c.iceberg.s3.path_style);
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (format!("bogus = 1\n{MIN}"), "bogus"),
            (
                MIN.replace(
                    "tables = [\"orders\"]",
                    "tables = [\"orders\"]\nbatch_rows = \"x\"",
                ),
                "pipelines[0].batch_rows",
            ),
            (
                MIN.replace("source = \"postgres://u:pw@127.0.0.1:5432/shop\"\n", ""),
                "pipelines[0]",
            ),
            (
                MIN.replace("tables = [\"orders\"]", "tables = []"),
                "pipelines[0].tables",
            ),
            (
                MIN.replace(
                    "tables = [\"orders\"]",
                    "tables = [\"orders\"]\nflush_interval = \"soon\"",
                ),
                "pipelines[0].flush_interval",
            ),
            (
                format!("[iceberg]\ncatalog = \"hive\"\n{MIN}"),
                "iceberg.catalog",
            ),
            (
                format!("[api]\ntoken = \"${{NOPE_NOT_SET}}\"\n{MIN}"),
                "api.token",
            ),
            (format!("{MIN}{MIN}"), "pipelines[1].name"),
            ("[[pipelines]\n".to_string(), "line 1"),
        ];
        for (text, key) in cases {
            let e = Config::parse(&text, &[]).unwrap_err();
            assert!(e.key.starts_with(key), "{text}\n=> {e}");
            assert!(!e.to_string().contains('\n'), "one line: {e}");
        }
    }

    #[test]
    fn non_loopback_api_needs_a_token() {
        let open = format!("[api]\nlisten = \"0.0.0.0:8080\"\n{MIN}");
        assert_eq!(Config::parse(&open, &[]).unwrap_err().key, "api.listen");
        let with_token = format!("[api]\nlisten = \"0.0.0.0:8080\"\ntoken = \"t0k\"\n{MIN}");
        assert!(Config::parse(&with_token, &[]).is_ok());
        let allowed = format!("[api]\nlisten = \"0.0.0.0:8080\"\nallow_insecure = true\n{MIN}");
        assert!(Config::parse(&allowed, &[]).is_ok());
    }

    #[test]
    fn redaction_hides_secrets() {
        let text = format!(
            "[api]\ntoken = \"tok123\"\n[iceberg.s3]\nsecret_access_key = \"sk999\"\n{MIN}"
        );
        let c = Config::parse(&text, &[]).unwrap();
        let j = c.redacted().to_string();
        for secret in ["tok123", "sk999", ":pw@"] {
            assert!(!j.contains(secret), "{secret} leaked in {j}");
        }
    }

    #[test]
    fn what_the_api_hides_the_logs_scrub_too() {
        let text = format!(
            "[api]\ntoken = \"tok123\"\n[iceberg]\ntoken = \"itok456\"\ncredential = \"id:cred789\"\n\
             [iceberg.properties]\n\"header.X-Api-Key\" = \"hdrkey321\"\n\"s3.signer\" = \"not-a-secret\"\n\
             [iceberg.s3]\naccess_key_id = \"AKIA1234\"\nsecret_access_key = \"sk999\"\nsession_token = \"sess777\"\n{MIN}"
        );
        let c = Config::parse(&text, &[]).unwrap();
        let hidden = c.redacted().to_string();
        let scrubbed = c.secrets();
        for secret in [
            "tok123",
            "itok456",
            "id:cred789",
            "hdrkey321",
            "AKIA1234",
            "sk999",
            "sess777",
            "pw",
        ] {
            assert!(!hidden.contains(secret), "{secret} shown in {hidden}");
            assert!(
                scrubbed.iter().any(|s| s == secret),
                "{secret} not scrubbed from logs: {scrubbed:?}"
            );
        }
        assert!(hidden.contains("not-a-secret"));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_size("1kb").unwrap(), 1000);
        assert!(parse_size("lots").is_err());
    }
}
