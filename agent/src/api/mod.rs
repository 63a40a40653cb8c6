//! HTTP API on hyper (axum routing): probes, `/metrics`, pipeline status and control.

mod routes;
mod schema;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use tokio::sync::watch;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;
use tracing::Instrument;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::config::Config;
use crate::pipeline::PipelineHandle;
use crate::telemetry::events::ApiRequestServed;
use crate::telemetry::{Metrics, Telemetry};

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Longest a handler may take, so no request holds resources forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

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
    registry: Option<crate::telemetry::Exposition>,
    /// True once the agent drains for shutdown (readiness reports it).
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl ApiState {
    /// State for `cfg`'s pipelines; `stopping` turns true when the agent starts to drain.
    pub fn new(
        cfg: &Config,
        pipelines: Vec<PipelineHandle>,
        telemetry: &Telemetry,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
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
                stopping,
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
        (self.0, Json(schema::ErrorBody { error: self.1 })).into_response()
    }
}

/// Every documented route, with the document generated from the handlers.
fn routes(state: &ApiState) -> OpenApiRouter<ApiState> {
    let protected = OpenApiRouter::default()
        .routes(routes!(routes::config))
        .routes(routes!(routes::pause))
        .routes(routes!(routes::resume))
        .routes(routes!(routes::snapshot_table))
        .routes(routes!(routes::dlq))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    OpenApiRouter::with_openapi(schema::ApiDoc::openapi())
        .routes(routes!(routes::live))
        .routes(routes!(routes::ready))
        .routes(routes!(metrics_endpoint))
        .routes(routes!(routes::version))
        .routes(routes!(routes::pipelines))
        .routes(routes!(routes::pipeline))
        .routes(routes!(routes::tables))
        .routes(routes!(routes::openapi))
        .merge(protected)
}

/// The OpenAPI document of [`routes`], rendered once.
static DOCUMENT: OnceLock<String> = OnceLock::new();

/// `/api/v1/openapi.json`.
fn document() -> &'static str {
    DOCUMENT.get().map(String::as_str).unwrap_or("{}")
}

/// The router with every route and middleware.
pub fn router(state: ApiState) -> Router {
    let (router, doc) = routes(&state).split_for_parts();
    DOCUMENT.get_or_init(|| doc.to_json().unwrap_or_else(|_| "{}".into()));
    // Outermost last: observe sees every answer; errors become JSON after the timeout and the
    // limits have answered.
    router
        .fallback(routes::not_found)
        .method_not_allowed_fallback(routes::method_not_allowed)
        .layer(middleware::from_fn(json_bodies))
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(middleware::from_fn(oversized))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            REQUEST_TIMEOUT,
        ))
        .layer(middleware::map_response(json_errors))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Prometheus exposition (always open).
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", responses(
    (status = 200, description = "Metrics", body = String, content_type = "text/plain"),
    (status = 404, description = "Prometheus endpoint disabled", body = schema::ErrorBody)))]
async fn metrics_endpoint(State(s): State<ApiState>) -> Response {
    let Some(reg) = &s.inner.registry else {
        return ApiError(
            StatusCode::NOT_FOUND,
            "the Prometheus endpoint is disabled".into(),
        )
        .into_response();
    };
    match reg.render() {
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
    let app = router(state);
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

/// A body announced larger than the limit is answered 413 here, after reading it (up to
/// 1 MiB) so the client gets the answer instead of a connection reset while it still sends;
/// beyond that the connection is closed after the answer. Bodies without a length are cut off
/// by tower-http's `RequestBodyLimitLayer`.
async fn oversized(req: Request, next: Next) -> Response {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(l) if l > MAX_BODY_BYTES as u64 => {
            if l <= 1 << 20 {
                let body = http_body_util::Limited::new(req.into_body(), 1 << 20);
                let _ = http_body_util::BodyExt::collect(body).await;
            }
            too_large().into_response()
        }
        _ => next.run(req).await,
    }
}

fn too_large() -> ApiError {
    ApiError(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// A request body (on any method but GET) must be JSON (415 otherwise) and parse (400).
async fn json_bodies(req: Request, next: Next) -> Response {
    let has_body = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "0")
        || req.headers().contains_key(header::TRANSFER_ENCODING);
    if !has_body || req.method() == axum::http::Method::GET {
        return next.run(req).await;
    }
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
    let (parts, body) = req.into_parts();
    let bytes = match http_body_util::BodyExt::collect(body).await {
        Ok(c) => c.to_bytes(),
        Err(e) if is_length_limit(&e) => return too_large().into_response(),
        Err(_) => {
            return ApiError(StatusCode::BAD_REQUEST, "request body unreadable".into())
                .into_response()
        }
    };
    if serde_json::from_slice::<serde_json::Value>(&bytes).is_err() {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "request body is not valid JSON".into(),
        )
        .into_response();
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// Whether tower-http's body limit cut the body off.
fn is_length_limit(e: &axum::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Every error answer is JSON `{"error": …}`, also those of tower-http's timeout and body
/// limit and of any other layer that answers in plain text.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if is_json || !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    match status {
        StatusCode::SERVICE_UNAVAILABLE => {
            ApiError(status, "request timed out".into()).into_response()
        }
        StatusCode::PAYLOAD_TOO_LARGE => too_large().into_response(),
        _ => ApiError(
            status,
            status
                .canonical_reason()
                .unwrap_or("request failed")
                .to_lowercase(),
        )
        .into_response(),
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
