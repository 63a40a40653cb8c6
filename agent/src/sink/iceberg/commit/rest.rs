//! The REST catalog's commit endpoint (`POST /v1/{prefix}/namespaces/{ns}/tables/{table}`
//! with requirements and updates). iceberg-catalog-rest keeps its HTTP client and auth
//! crate-private, so the small part we need (bearer token, or OAuth2 client credentials, and
//! the server's `prefix`) is done here with the crate's public request/response types.

use std::collections::HashMap;

use iceberg::table::Table;
use iceberg::{TableRequirement, TableUpdate};
use iceberg_catalog_rest::{CommitTableRequest, CommitTableResponse};
use tokio::sync::Mutex;

use super::CommitError;
use crate::config::IcebergConfig;

/// Commits through a REST catalog.
pub(super) struct RestCommitter {
    http: reqwest::Client,
    base: String,
    warehouse: String,
    /// Resolved at the first commit: `Some(prefix or none)`.
    prefix: Mutex<Option<Option<String>>>,
    configured_prefix: Option<String>,
    token: Mutex<Option<String>>,
    credential: Option<String>,
    oauth2_uri: String,
    scope: String,
    secrets: Vec<String>,
}

fn failed(e: impl std::fmt::Display, secrets: &[String]) -> CommitError {
    CommitError::Failed(crate::sink::iceberg::catalog::scrub(e.to_string(), secrets))
}

impl RestCommitter {
    /// No network yet: a catalog that is down at start must not stop the agent (the pipeline
    /// retries on its own); the server's `prefix` is asked for at the first commit.
    pub(super) async fn new(cfg: &IcebergConfig) -> Result<Self, CommitError> {
        let secrets = cfg.secrets();
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| failed(e, &secrets))?;
        let base = cfg.uri.trim_end_matches('/').to_string();
        Ok(Self {
            http,
            oauth2_uri: cfg
                .oauth2_server_uri
                .clone()
                .unwrap_or_else(|| format!("{base}/v1/oauth/tokens")),
            base,
            warehouse: cfg.warehouse.clone(),
            prefix: Mutex::new(None),
            configured_prefix: cfg.prefix.clone(),
            token: Mutex::new(cfg.token.as_ref().map(|t| t.expose().to_string())),
            credential: cfg.credential.as_ref().map(|c| c.expose().to_string()),
            scope: cfg.scope.clone().unwrap_or_else(|| "catalog".into()),
            secrets,
        })
    }

    /// The path prefix: the server's configuration may set it (defaults < ours < overrides).
    async fn prefix(&self) -> Result<Option<String>, CommitError> {
        if let Some(p) = self.prefix.lock().await.clone() {
            return Ok(p);
        }
        let mut config_url = format!("{}/v1/config", self.base);
        if !self.warehouse.is_empty() {
            let w: String =
                url::form_urlencoded::byte_serialize(self.warehouse.as_bytes()).collect();
            config_url.push_str(&format!("?warehouse={w}"));
        }
        let req = self.authorize(self.http.get(config_url)).await?;
        let resp = req.send().await.map_err(|e| failed(e, &self.secrets))?;
        let mut prefix = self.configured_prefix.clone();
        if resp.status().is_success() {
            #[derive(serde::Deserialize, Default)]
            struct ServerConfig {
                #[serde(default)]
                defaults: HashMap<String, String>,
                #[serde(default)]
                overrides: HashMap<String, String>,
            }
            let c: ServerConfig = resp.json().await.unwrap_or_default();
            if let Some(p) = c.overrides.get("prefix") {
                prefix = Some(p.clone());
            } else if prefix.is_none() {
                prefix = c.defaults.get("prefix").cloned();
            }
        }
        *self.prefix.lock().await = Some(prefix.clone());
        Ok(prefix)
    }

    async fn authorize(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::RequestBuilder, CommitError> {
        let mut token = self.token.lock().await;
        if token.is_none() {
            if let Some(cred) = &self.credential {
                let (id, secret) = cred.split_once(':').unwrap_or(("", cred.as_str()));
                let mut form = vec![
                    ("grant_type", "client_credentials"),
                    ("client_secret", secret),
                    ("scope", self.scope.as_str()),
                ];
                if !id.is_empty() {
                    form.push(("client_id", id));
                }
                let resp = self
                    .http
                    .post(&self.oauth2_uri)
                    .form(&form)
                    .send()
                    .await
                    .map_err(|e| failed(e, &self.secrets))?;
                if !resp.status().is_success() {
                    return Err(CommitError::Failed(format!(
                        "OAuth2 token request failed with status {}",
                        resp.status()
                    )));
                }
                #[derive(serde::Deserialize)]
                struct TokenResponse {
                    access_token: String,
                }
                let t: TokenResponse = resp.json().await.map_err(|e| failed(e, &self.secrets))?;
                *token = Some(t.access_token);
            }
        }
        Ok(match token.as_deref() {
            Some(t) => req.bearer_auth(t),
            None => req,
        })
    }

    fn table_url(&self, table: &Table, prefix: Option<&str>) -> String {
        let ident = table.identifier();
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        // Namespace levels are joined with the unit separator, as the spec says.
        let ns = enc(&ident.namespace().join("\u{1f}"));
        let prefix = prefix
            .map(|p| format!("{}/", p.trim_matches('/')))
            .unwrap_or_default();
        format!(
            "{}/v1/{prefix}namespaces/{ns}/tables/{}",
            self.base,
            enc(ident.name())
        )
    }

    pub(super) async fn commit(
        &self,
        table: &Table,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<Table, CommitError> {
        let body = CommitTableRequest {
            identifier: Some(table.identifier().clone()),
            requirements,
            updates,
        };
        let prefix = self.prefix().await?;
        let url = self.table_url(table, prefix.as_deref());
        let req = self.authorize(self.http.post(url).json(&body)).await?;
        let resp = match req.send().await {
            Ok(r) => r,
            // The request may have reached the server: the caller must look before retrying.
            Err(e) => {
                return Err(CommitError::Unknown(crate::sink::iceberg::catalog::scrub(
                    e.to_string(),
                    &self.secrets,
                )))
            }
        };
        let status = resp.status();
        if status.is_success() {
            let r: CommitTableResponse = resp.json().await.map_err(|e| failed(e, &self.secrets))?;
            return super::committed(table, r.metadata, r.metadata_location);
        }
        let text = resp.text().await.unwrap_or_default();
        let text: String = text.chars().take(500).collect();
        match status.as_u16() {
            409 => Err(CommitError::Conflict(text)),
            500 | 502 | 503 | 504 => Err(CommitError::Unknown(format!("{status}: {text}"))),
            _ => Err(CommitError::Failed(format!("{status}: {text}"))),
        }
    }
}
