//! The API's response bodies. Handlers return these types and the OpenAPI document is generated
//! from them and from the handlers' `#[utoipa::path]` attributes (routes registered with
//! `utoipa_axum::routes!`), so the document cannot drift from what is served.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::model::DeadLetter;
use crate::telemetry::status::{PipelineStatus, RetryStatus, TableStatus};
use crate::telemetry::PipelineState;

/// Every error: `{"error": "..."}` with a 4xx or 5xx status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Error)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// `status` of a live agent.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum LiveStatus {
    /// Always.
    Ok,
}

/// Liveness.
#[derive(Debug, Serialize, ToSchema)]
pub struct Live {
    /// `ok`.
    pub status: LiveStatus,
}

/// `status` of a readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub enum ReadyStatus {
    /// Every pipeline streams.
    #[serde(rename = "ready")]
    Ready,
    /// At least one pipeline does not (see `reasons`).
    #[serde(rename = "not ready")]
    NotReady,
}

/// Readiness, with the reasons when not ready.
#[derive(Debug, Serialize, ToSchema)]
pub struct Ready {
    /// `ready` or `not ready`.
    pub status: ReadyStatus,
    /// Why not ready, one line per pipeline problem.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
}

/// The agent's name and version.
#[derive(Debug, Serialize, ToSchema)]
pub struct Version {
    /// `philotes`.
    pub name: String,
    /// The crate version.
    pub version: String,
}

/// The configuration as loaded, every secret redacted.
#[derive(Debug, Serialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Object)]
pub struct RedactedConfig(pub serde_json::Value);

/// The OpenAPI document itself.
#[derive(Debug, Serialize, ToSchema)]
#[serde(transparent)]
#[schema(value_type = Object)]
pub struct Document(pub serde_json::Value);

/// One pipeline in the list.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineSummary {
    /// Pipeline name.
    pub name: String,
    /// Current state.
    pub state: PipelineState,
    /// Commit LSN of the last transaction committed to Iceberg.
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub committed_lsn: String,
    /// Position confirmed to PostgreSQL.
    #[schema(pattern = "^[0-9A-F]+/[0-9A-F]+$")]
    pub confirmed_lsn: String,
    /// Seconds between the last received commit and now.
    #[schema(minimum = 0)]
    pub lag_seconds: f64,
    /// Set while the pipeline waits to try again after a failed attempt.
    pub retry: Option<RetryStatus>,
    /// Last error, if any.
    pub last_error: Option<String>,
}

/// Every pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct PipelineList {
    /// In configuration order.
    pub pipelines: Vec<PipelineSummary>,
}

/// One table of a pipeline: its source name and its counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct TableEntry {
    /// Source table (`schema.table`).
    pub source_table: String,
    /// The counters, with the Iceberg table the configuration maps it to.
    #[serde(flatten)]
    pub status: TableStatus,
}

/// The tables of a pipeline.
#[derive(Debug, Serialize, ToSchema)]
pub struct TableList {
    /// In configuration order.
    pub tables: Vec<TableEntry>,
}

/// The state a control request asked for.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Requested {
    /// Pause requested.
    Paused,
    /// Resume requested.
    Streaming,
}

/// A pause or resume request, accepted.
#[derive(Debug, Serialize, ToSchema)]
pub struct Control {
    /// Pipeline name.
    pub pipeline: String,
    /// What was asked for.
    pub requested: Requested,
}

/// A request to copy a table again, accepted: the pipeline finishes the transaction it is
/// in, commits, and copies the table behind a truncate marker before streaming on.
#[derive(Debug, Serialize, ToSchema)]
pub struct CopyAccepted {
    /// Pipeline name.
    pub pipeline: String,
    /// Source table (`schema.table`, as configured).
    pub table: String,
}

/// Dead letters, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeadLetters {
    /// At most `limit` entries.
    pub entries: Vec<DeadLetter>,
}

/// Adds the bearer scheme that the protected routes name.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document's fixed parts; the paths come from the router (`utoipa_axum`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Philotes management API",
        description = "Probes, status and control of the Philotes CDC agent. Errors are JSON \
                       {\"error\": \"...\"}. When [api] token is set, routes marked with bearer \
                       security need `Authorization: Bearer <token>`."
    ),
    components(schemas(ErrorBody, PipelineStatus, TableStatus, RetryStatus)),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;
