//! The SQL catalog's commit: write the new metadata file, then compare-and-swap
//! `iceberg_tables.metadata_location` from the base's location to the new one. The same
//! statement PyIceberg and Java's JDBC catalog run (no `iceberg_type` column: PyIceberg's
//! schema has none).

use std::str::FromStr;

use iceberg::spec::TableMetadata;
use iceberg::table::Table;
use iceberg::{MetadataLocation, TableRequirement, TableUpdate};
use sqlx::postgres::PgPoolOptions;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};

use super::CommitError;
use crate::config::IcebergConfig;

enum Pool {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Commits through the SQL catalog's table.
pub(super) struct SqlCommitter {
    pool: Pool,
    catalog_name: String,
}

fn sql_err(e: sqlx::Error) -> CommitError {
    CommitError::Failed(format!("catalog database: {e}"))
}

impl SqlCommitter {
    pub(super) async fn connect(cfg: &IcebergConfig) -> Result<Self, CommitError> {
        let pool = if cfg.uri.starts_with("sqlite:") {
            let uri = crate::sink::iceberg::catalog::sqlite_uri(&cfg.uri)
                .map_err(|e| CommitError::Failed(e.to_string()))?;
            let opts = SqliteConnectOptions::from_str(&uri)
                .map_err(sql_err)?
                // The pipeline's catalog writes the same file: wait for its lock, never fail.
                .busy_timeout(std::time::Duration::from_secs(30));
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(2)
                    .connect_with(opts)
                    .await
                    .map_err(sql_err)?,
            )
        } else {
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&cfg.uri)
                    .await
                    .map_err(sql_err)?,
            )
        };
        Ok(Self {
            pool,
            catalog_name: cfg.catalog_name.clone(),
        })
    }

    /// The metadata location the catalog holds for `ident`.
    pub(super) async fn location_of(
        &self,
        ident: &iceberg::TableIdent,
    ) -> Result<Option<String>, CommitError> {
        self.current_location(&ident.namespace().join("."), ident.name())
            .await
    }

    async fn current_location(&self, ns: &str, name: &str) -> Result<Option<String>, CommitError> {
        const Q: &str = "SELECT metadata_location FROM iceberg_tables \
                         WHERE catalog_name = $1 AND table_namespace = $2 AND table_name = $3";
        let loc: Option<Option<String>> = match &self.pool {
            Pool::Sqlite(p) => sqlx::query_scalar(&Q.replace('$', "?"))
                .bind(&self.catalog_name)
                .bind(ns)
                .bind(name)
                .fetch_optional(p)
                .await
                .map_err(sql_err)?,
            Pool::Postgres(p) => sqlx::query_scalar(Q)
                .bind(&self.catalog_name)
                .bind(ns)
                .bind(name)
                .fetch_optional(p)
                .await
                .map_err(sql_err)?,
        };
        Ok(loc.flatten())
    }

    async fn swap(&self, ns: &str, name: &str, from: &str, to: &str) -> Result<u64, CommitError> {
        const Q: &str =
            "UPDATE iceberg_tables SET metadata_location = $1, previous_metadata_location = $2 \
                         WHERE catalog_name = $3 AND table_namespace = $4 AND table_name = $5 \
                         AND metadata_location = $6";
        let n = match &self.pool {
            Pool::Sqlite(p) => sqlx::query(&Q.replace('$', "?"))
                .bind(to)
                .bind(from)
                .bind(&self.catalog_name)
                .bind(ns)
                .bind(name)
                .bind(from)
                .execute(p)
                .await
                .map_err(sql_err)?
                .rows_affected(),
            Pool::Postgres(p) => sqlx::query(Q)
                .bind(to)
                .bind(from)
                .bind(&self.catalog_name)
                .bind(ns)
                .bind(name)
                .bind(from)
                .execute(p)
                .await
                .map_err(sql_err)?
                .rows_affected(),
        };
        Ok(n)
    }

    /// Check `requirements` on the catalog's current metadata, apply `updates`, write the new
    /// metadata file and swap it in.
    pub(super) async fn commit(
        &self,
        table: &Table,
        requirements: Vec<TableRequirement>,
        updates: Vec<TableUpdate>,
    ) -> Result<Table, CommitError> {
        let ident = table.identifier();
        let ns = ident.namespace().join(".");
        let io = table.file_io();
        // A lost race re-checks the requirements on the newer state and applies the updates
        // there, as a REST catalog does server-side; only a failed requirement is a conflict.
        let mut lost = 0;
        let (built, new_location) = loop {
            let current = self
                .current_location(&ns, ident.name())
                .await?
                .ok_or_else(|| {
                    CommitError::Failed(format!("table {ident} is not in the catalog"))
                })?;
            let base = if table.metadata_location() == Some(current.as_str()) {
                table.metadata().clone()
            } else {
                TableMetadata::read_from(io, &current).await?
            };
            for r in &requirements {
                r.check(Some(&base))?;
            }
            let mut builder = base.into_builder(Some(current.clone()));
            for u in updates.iter().cloned() {
                builder = u.apply(builder)?;
            }
            let built = builder.build()?;
            let location = MetadataLocation::from_str(&current)?
                .with_next_version()
                .with_new_metadata(&built.metadata);
            built.metadata.write_to(io, &location).await?;
            let new_location = location.to_string();
            if self
                .swap(&ns, ident.name(), &current, &new_location)
                .await?
                == 1
            {
                break (built, new_location);
            }
            let _ = io.delete(&new_location).await;
            lost += 1;
            if lost >= 5 {
                return Err(CommitError::Conflict(format!(
                    "{ident}: metadata_location changed during the commit, {lost} times"
                )));
            }
        };
        super::committed(table, built.metadata, new_location)
    }
}
