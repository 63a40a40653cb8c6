//! HTTP API on hyper (axum routing): probes, `/metrics`, pipeline status and control.

mod openapi;
mod routes;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;
use tracing::Instrument;

use crate::config::Config;
use crate::pipeline::PipelineHandle;
use crate::telemetry::events::ApiRequestServed;
use crate::telemetry::{Metrics, Telemetry};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Shared state of the API handlers.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    pipelines: Vec<PipelineHandle>,
    config_json: serde_json::Value,
    token: Option<String>,
    metrics: Metrics,
    registry: Option<prometheus::Registry>,
}

impl ApiState {
    /// State for `cfg`'s pipelines.
    pub fn new(cfg: &Config, pipelines: Vec<PipelineHandle>, telemetry: &Telemetry) -> Self {
        Self {
            inner: Arc::new(Inner {
                pipelines,
                config_json: cfg.redacted(),
                token: cfg
                    .api
                    .token
                    .as_ref()
                    .filter(|t| !t.is_empty())
                    .map(|t| t.expose().to_string()),
                metrics: telemetry.metrics.clone(),
                registry: telemetry.registry.clone(),
            }),
        }
    }

    fn pipeline(&self, name: &str) -> Option<&PipelineHandle> {
        self.inner.pipelines.iter().find(|p| p.name == name)
    }
}

/// A JSON error response `{"error": "..."}`.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// The router with every route and middleware.
pub fn router(state: ApiState) -> Router {
    let protected = Router::new()
        .route("/api/v1/config", get(routes::config))
        .route("/api/v1/pipelines/{name}/pause", post(routes::pause))
        .route("/api/v1/pipelines/{name}/resume", post(routes::resume))
        .route("/api/v1/pipelines/{name}/dlq", get(routes::dlq))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health/live", get(routes::live))
        .route("/health/ready", get(routes::ready))
        .route("/metrics", get(metrics_endpoint))
        .route("/api/v1/version", get(routes::version))
        .route("/api/v1/pipelines", get(routes::pipelines))
        .route("/api/v1/pipelines/{name}", get(routes::pipeline))
        .route("/api/v1/pipelines/{name}/tables", get(routes::tables))
        .route("/api/v1/openapi.json", get(routes::openapi))
        .merge(protected)
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn(limits))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn metrics_endpoint(State(s): State<ApiState>) -> Response {
    let Some(reg) = &s.inner.registry else {
        return ApiError(
            StatusCode::NOT_FOUND,
            "the Prometheus endpoint is disabled".into(),
        )
        .into_response();
    };
    match prometheus::TextEncoder::new().encode_to_string(&reg.gather()) {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(prometheus::TEXT_FORMAT),
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Constant-time comparison (`subtle`), so the token cannot be guessed byte by byte from
/// timings. Different lengths never match (the length is not a secret worth hiding).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.ct_eq(b).into()
}

async fn auth(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    if let Some(token) = &s.inner.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or invalid bearer token".into(),
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Metrics and a server span for every request; `endpoint` is the route template.
async fn observe(State(s): State<ApiState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let req_size = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    let span = tracing::info_span!(
        parent: None,
        "http.request",
        otel.name = %format!("{method} {endpoint}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %endpoint,
        url.path = %req.uri().path(),
        url.scheme = "http",
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::telemetry::record_trace_id(&span);
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    span.record("http.response.status_code", status);
    let resp_size = axum::body::HttpBody::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    ApiRequestServed {
        endpoint: &endpoint,
        method: &method,
        status,
        duration: started.elapsed(),
        request_bytes: req_size,
        response_bytes: resp_size,
    }
    .emit(&s.inner.metrics);
    resp
}

/// Serve until `shutdown` turns true, on hyper directly: a header-read timeout keeps slow or
/// broken clients from holding connections, and shutdown drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    mut shutdown: watch::Receiver<bool>,
) {
    let app = router(state).layer(middleware::from_fn(timeout_mw));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!("api accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let svc = hyper_util::service::TowerToHyperService::new(app.clone());
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    let _ = conn.await;
                });
            }
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
        }
    }
    if tokio::time::timeout(Duration::from_secs(5), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("api: connections still open after 5s; closing");
    }
}

/// Refuse oversized bodies (413) and non-JSON bodies on POST (415) before any handler runs.
async fn limits(req: Request, next: Next) -> Response {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(l) = len.filter(|l| *l > MAX_BODY_BYTES as u64) {
        // Read (and drop) a moderately oversized body so the client gets the 413 instead of a
        // reset connection; beyond 1 MiB the connection is simply closed after the answer.
        if l <= 1 << 20 {
            let body = http_body_util::Limited::new(req.into_body(), 1 << 20);
            let _ = http_body_util::BodyExt::collect(body).await;
        }
        return ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        )
        .into_response();
    }
    let has_body =
        len.is_some_and(|l| l > 0) || req.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body && req.method() != axum::http::Method::GET {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        if !json {
            return ApiError(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request bodies must be application/json".into(),
            )
            .into_response();
        }
    }
    // Bodies without a length are cut off at the limit too; a JSON body must parse.
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    if !has_body {
        return next
            .run(Request::from_parts(parts, axum::body::Body::new(limited)))
            .await;
    }
    let bytes = match http_body_util::BodyExt::collect(limited).await {
        Ok(c) => c.to_bytes(),
        Err(_) => {
            return ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body larger than {MAX_BODY_BYTES} bytes"),
            )
            .into_response()
        }
    };
    if parts.method != axum::http::Method::GET
        && serde_json::from_slice::<serde_json::Value>(&bytes).is_err()
    {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "request body is not valid JSON".into(),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Bound the time a handler may take, so no request holds resources forever.
async fn timeout_mw(req: Request, next: Next) -> Response {
    match tokio::time::timeout(Duration::from_secs(30), next.run(req)).await {
        Ok(r) => r,
        Err(_) => {
            ApiError(StatusCode::SERVICE_UNAVAILABLE, "request timed out".into()).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_compare_is_exact() {
        let token = b"s3cret-token";
        assert!(constant_time_eq(token, token));
        assert!(!constant_time_eq(b"s3cret-tokeN", token));
        assert!(!constant_time_eq(b"s3cret", token));
        // The old compare folded the length difference into a byte: 256 trailing 0xff bytes
        // after the token matched.
        let mut longer = token.to_vec();
        longer.extend(std::iter::repeat_n(0xff, 256));
        assert!(!constant_time_eq(&longer, token));
        assert!(!constant_time_eq(b"", token));
    }
}
