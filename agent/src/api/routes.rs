//! Route handlers.

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{ApiError, ApiState};
use crate::pipeline::{status, Control};
use crate::telemetry::PipelineState;

pub(super) async fn live() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

pub(super) async fn ready(State(s): State<ApiState>) -> Response {
    let mut reasons = Vec::new();
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
        Json(json!({ "status": "ready" })).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reasons": reasons })),
        )
            .into_response()
    }
}

pub(super) async fn version() -> Json<Value> {
    Json(json!({
        "name": "philotes",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

pub(super) async fn config(State(s): State<ApiState>) -> Json<Value> {
    Json(s.inner.config_json.clone())
}

pub(super) async fn pipelines(State(s): State<ApiState>) -> Json<Value> {
    let list: Vec<Value> = s
        .inner
        .pipelines
        .iter()
        .map(|p| {
            let st = status::snapshot(&p.status);
            json!({
                "name": st.name,
                "state": st.state,
                "committed_lsn": st.committed_lsn,
                "confirmed_lsn": st.confirmed_lsn,
                "lag_seconds": st.lag_seconds,
                "retry": st.retry,
                "last_error": st.last_error,
            })
        })
        .collect();
    Json(json!({ "pipelines": list }))
}

/// The `{name}` path parameter, rejected as a JSON 400 when it cannot be decoded.
pub(super) struct Name(String);

impl<S: Send + Sync> FromRequestParts<S> for Name {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Path::<String>::from_request_parts(parts, state).await {
            Ok(Path(n)) => Ok(Name(n)),
            Err(e) => Err(ApiError(StatusCode::BAD_REQUEST, e.body_text())),
        }
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("unknown pipeline {name:?}"))
}

pub(super) async fn pipeline(
    State(s): State<ApiState>,
    Name(name): Name,
) -> Result<Json<Value>, ApiError> {
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    Ok(Json(
        serde_json::to_value(status::snapshot(&p.status)).unwrap_or(Value::Null),
    ))
}

pub(super) async fn tables(
    State(s): State<ApiState>,
    Name(name): Name,
) -> Result<Json<Value>, ApiError> {
    let p = s.pipeline(&name).ok_or_else(|| unknown(&name))?;
    let st = status::snapshot(&p.status);
    let ns = p.config.namespace_name();
    let list: Vec<Value> = p
        .config
        .table_names()
        .iter()
        .map(|(schema, table)| {
            let key = format!("{schema}.{table}");
            let t = st.tables.get(&key).cloned().unwrap_or_default();
            json!({
                "source_table": key,
                "iceberg_table": format!("{ns}.{}", crate::pipeline::iceberg_table_name(schema, table)),
                "inserts": t.inserts,
                "updates": t.updates,
                "deletes": t.deletes,
                "truncates": t.truncates,
                "committed_rows": t.committed_rows,
                "commits": t.commits,
                "committed_lsn": t.committed_lsn,
                "last_commit_at": t.last_commit_at,
            })
        })
        .collect();
    Ok(Json(json!({ "tables": list })))
}

fn set_control(s: &ApiState, name: &str, c: Control) -> Result<Json<Value>, ApiError> {
    let p = s.pipeline(name).ok_or_else(|| unknown(name))?;
    let _ = p.control.send(c);
    let requested = match c {
        Control::Pause => "paused",
        Control::Run => "streaming",
    };
    Ok(Json(json!({ "pipeline": name, "requested": requested })))
}

pub(super) async fn pause(
    State(s): State<ApiState>,
    Name(name): Name,
) -> Result<Json<Value>, ApiError> {
    set_control(&s, &name, Control::Pause)
}

pub(super) async fn resume(
    State(s): State<ApiState>,
    Name(name): Name,
) -> Result<Json<Value>, ApiError> {
    set_control(&s, &name, Control::Run)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DlqQuery {
    limit: Option<i64>,
}

pub(super) async fn dlq(
    State(s): State<ApiState>,
    Name(name): Name,
    q: Result<Query<DlqQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "entries": entries })))
}

pub(super) async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        super::openapi::DOCUMENT,
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
