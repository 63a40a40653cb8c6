//! The OpenAPI 3.1 document, kept by hand beside the routes (a test checks they agree).

/// `/api/v1/openapi.json`.
pub const DOCUMENT: &str = include_str!("openapi.json");
