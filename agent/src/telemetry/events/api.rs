//! What the HTTP API serves.

use std::time::Duration;

use opentelemetry::KeyValue;

use crate::telemetry::Metrics;

/// One API request was answered.
#[derive(Debug)]
pub struct ApiRequestServed<'a> {
    /// The route template (`/api/v1/pipelines/{name}`), never the raw path: bounded cardinality.
    pub endpoint: &'a str,
    /// HTTP method.
    pub method: &'a str,
    /// Response status code.
    pub status: u16,
    /// Time to the response head.
    pub duration: Duration,
    /// Request body bytes (Content-Length, 0 when absent).
    pub request_bytes: u64,
    /// Response body bytes when known in advance (0 for streamed bodies).
    pub response_bytes: u64,
}

impl ApiRequestServed<'_> {
    /// Record the `philotes_api_*` instruments.
    pub fn emit(&self, m: &Metrics) {
        let base = [
            KeyValue::new("endpoint", self.endpoint.to_string()),
            KeyValue::new("method", self.method.to_string()),
        ];
        m.api_duration.record(self.duration.as_secs_f64(), &base);
        m.api_request_size.record(self.request_bytes, &base);
        m.api_response_size.record(self.response_bytes, &base);
        let mut with_status = base.to_vec();
        with_status.push(KeyValue::new("status", self.status.to_string()));
        m.api_requests.add(1, &with_status);
    }
}
