//! Route handlers. Each one's `#[utoipa::path]` is its entry in the OpenAPI document; the
//! router registers it from there (`utoipa_axum::routes!`), so path and document agree.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use utoipa::IntoParams;

use super::schema::{
    Control, CopyAccepted, DeadLetters, Document, ErrorBody, Live, LiveStatus, PipelineList,
    PipelineSummary, Ready, ReadyStatus, RedactedConfig, Requested, TableEntry, TableList, Version,
};
use super::{ApiError, ApiState};
use crate::pipeline::{status, Control as PipelineControl};
use crate::telemetry::status::{PipelineStatus, TableStatus};
use crate::telemetry::PipelineState;

/// Liveness probe (always open).
#[utoipa::path(get, path = "/health/live", operation_id = "live",
    responses((status = 200, description = "Alive", body = Live)))]
pub(super) async fn live() -> Json<Live> {
    Json(Live {
        status: LiveStatus::Ok,
    })
}

/// Readiness: every pipeline streaming (always open).
#[utoipa::path(get, path = "/health/ready", operation_id = "ready", responses(
    (status = 200, description = "Ready", body = Ready),
    (status = 503, description = "Not ready", body = Ready)))]
pub(super) async fn ready(State(s): State<ApiState>) -> Response {
    let mut reasons = Vec::new();
    if *s.inner.stopping.borrow() {
        reasons.push("the agent is shutting down".to_string());
    }
    for p in &s.inner.pipelines {
        let st = status::snapshot(&p.status);
        if st.slot_lag_exceeded {
            reasons.push(format!(
                "pipeline {}: replication slot retains {} bytes of WAL, above max_slot_lag_bytes",
                p.name,
                st.slot_lag_bytes.unwrap_or(0)
            ));
        }
        if st.state != PipelineState::Streaming {
            let mut r = format!("pipeline {} is {:?}", p.name, st.state).to_lowercase();
            if let Some(e) = &st.last_error {
                r.push_str(&format!(": {e}"));
            }
            reasons.push(r);
        }
    }
    if reasons.is_empty() {
        Json(Ready {
            status: ReadyStatus::Ready,
            reasons,
        })
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Ready {
                status: ReadyStatus::NotReady,
                reasons,
            }),
        )
            .into_response()
    }
}

/// Agent version.
#[utoipa::path(get, path = "/api/v1/version", operation_id = "version",
    responses((status = 200, description = "Version", body = Version)))]
pub(super) async fn version() -> Json<Version> {
    Json(Version {
        name: "philotes".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

/// Configuration with every secret redacted.
#[utoipa::path(get, path = "/api/v1/config", operation_id = "config",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Config", body = RedactedConfig),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody)))]
pub(super) async fn config(State(s): State<ApiState>) -> Json<RedactedConfig> {
    Json(RedactedConfig(s.inner.config_json.clone()))
}

/// Every pipeline.
#[utoipa::path(get, path = "/api/v1/pipelines", operation_id = "listPipelines",
    responses((status = 200, description = "Pipelines", body = PipelineList)))]
pub(super) async fn pipelines(State(s): State<ApiState>) -> Json<PipelineList> {
    let pipelines = s
        .inner
        .pipelines
        .iter()
        .map(|p| {
            let st = status::snapshot(&p.status);
            PipelineSummary {
                name: st.name,
                state: st.state,
                committed_lsn: st.committed_lsn,
                confirmed_lsn: st.confirmed_lsn,
                lag_seconds: st.lag_seconds,
                retry: st.retry,
                last_error: st.last_error,
            }
        })
        .collect();
    Json(PipelineList { pipelines })
}

/// Path parameters (`{name}`, or `({name}, {table})`), rejected as a JSON 400 when they
/// cannot be decoded.
pub(super) struct Params<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> FromRequestParts<S> for Params<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(v)) => Ok(Params(v)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("unknown pipeline {name:?}"))
}

/// State, LSNs, lag, per-table counts, last error.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}", operation_id = "getPipeline",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Status", body = PipelineStatus),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody)))]
pub(super) async fn pipeline(
    State(s): State<ApiState>,
    Params(name): Params<String>,
) -> Result<Json<PipelineStatus>, ApiError> {
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    Ok(Json(status::snapshot(&p.status)))
}

/// Tables of a pipeline.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}/tables", operation_id = "getTables",
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Tables", body = TableList),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody)))]
pub(super) async fn tables(
    State(s): State<ApiState>,
    Params(name): Params<String>,
) -> Result<Json<TableList>, ApiError> {
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    let st = status::snapshot(&p.status);
    let ns = p.config.namespace_name();
    let tables = p
        .config
        .table_names()
        .iter()
        .map(|(schema, table)| {
            let key = format!("{schema}.{table}");
            let t = st.tables.get(&key).cloned().unwrap_or_default();
            TableEntry {
                source_table: key,
                status: TableStatus {
                    iceberg_table: format!(
                        "{ns}.{}",
                        crate::pipeline::iceberg_table_name(schema, table)
                    ),
                    ..t
                },
            }
        })
        .collect();
    Ok(Json(TableList { tables }))
}

/// Refuse a change while the agent drains for shutdown: the pipelines are stopping, and a
/// request taken now would be lost with the process.
fn not_stopping(s: &ApiState) -> Result<(), ApiError> {
    if *s.inner.stopping.borrow() {
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent is shutting down".into(),
        ));
    }
    Ok(())
}

fn set_control(s: &ApiState, name: &str, c: PipelineControl) -> Result<Json<Control>, ApiError> {
    let p = s.pipeline(name).ok_or_else(|| unknown(name))?;
    not_stopping(s)?;
    let _ = p.control.send(c);
    let requested = match c {
        PipelineControl::Pause => Requested::Paused,
        PipelineControl::Run => Requested::Streaming,
    };
    Ok(Json(Control {
        pipeline: name.to_string(),
        requested,
    }))
}

/// Pause: flush what is buffered, stop reading, keep the slot.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/pause", operation_id = "pause",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Pause requested", body = Control),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody)))]
pub(super) async fn pause(
    State(s): State<ApiState>,
    Params(name): Params<String>,
) -> Result<Json<Control>, ApiError> {
    set_control(&s, &name, PipelineControl::Pause)
}

/// Resume streaming from where it paused.
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/resume", operation_id = "resume",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Pipeline name")),
    responses(
        (status = 200, description = "Resume requested", body = Control),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody)))]
pub(super) async fn resume(
    State(s): State<ApiState>,
    Params(name): Params<String>,
) -> Result<Json<Control>, ApiError> {
    set_control(&s, &name, PipelineControl::Run)
}

/// Copy a table again: a truncate marker, then every row as of a new snapshot (the mirror
/// empties and fills again; the changelog keeps its history).
#[utoipa::path(post, path = "/api/v1/pipelines/{name}/tables/{table}/snapshot",
    operation_id = "snapshotTable",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Pipeline name"),
        ("table" = String, Path, description = "Source table, `schema.table` as configured")),
    responses(
        (status = 202, description = "Copy requested", body = CopyAccepted),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline or table", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "Body is not JSON", body = ErrorBody),
        (status = 503, description = "The agent is shutting down", body = ErrorBody)))]
pub(super) async fn snapshot_table(
    State(s): State<ApiState>,
    Params((name, table)): Params<(String, String)>,
) -> Result<(StatusCode, Json<CopyAccepted>), ApiError> {
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    // Configured tables, and those that joined through the publication (in the status).
    let known = p
        .config
        .table_names()
        .iter()
        .any(|(sc, t)| format!("{sc}.{t}") == table)
        || status::snapshot(&p.status).tables.contains_key(&table);
    if !known {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("pipeline {name:?} does not stream table {table:?} (give it as schema.table)"),
        ));
    }
    not_stopping(&s)?;
    p.copies
        .ask(&table, crate::pipeline::requests::CopyReason::Requested);
    Ok((
        StatusCode::ACCEPTED,
        Json(CopyAccepted {
            pipeline: name,
            table,
        }),
    ))
}

/// Query of the dead-letter route.
#[derive(Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct DlqQuery {
    /// Entries to return (default 100).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<i64>,
}

/// Dead letters, newest first.
#[utoipa::path(get, path = "/api/v1/pipelines/{name}/dlq", operation_id = "getDeadLetters",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Pipeline name"), DlqQuery),
    responses(
        (status = 200, description = "Dead letters", body = DeadLetters),
        (status = 400, description = "Bad request", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token", body = ErrorBody),
        (status = 404, description = "Unknown pipeline", body = ErrorBody),
        (status = 500, description = "The dead-letter table could not be read", body = ErrorBody)))]
pub(super) async fn dlq(
    State(s): State<ApiState>,
    Params(name): Params<String>,
    q: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Json<DeadLetters>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.body_text()))?;
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            "limit must be between 1 and 10000".into(),
        ));
    }
    let entries = p.dead_letters(limit as usize).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the dead-letter table failed: {e}"),
        )
    })?;
    Ok(Json(DeadLetters { entries }))
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", operation_id = "openapi",
    responses((status = 200, description = "OpenAPI 3.1 document", body = Document)))]
pub(super) async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::document(),
    )
        .into_response()
}

pub(super) async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "no such route".into())
}

pub(super) async fn method_not_allowed() -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed on this route".into(),
    )
}
