//! Philotes: an OpenTelemetry-native change-data-capture agent streaming PostgreSQL logical
//! replication into Apache Iceberg tables.
//!
//! The data path reads left to right: [`source::postgres`] → [`pipeline`] → [`sink::iceberg`],
//! with [`telemetry`], [`api`] and [`config`] beside them; [`model`] is what the source hands
//! the sink.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod agent;
pub mod api;
pub mod check;
pub mod config;
pub mod demo;
pub mod maintenance;
pub mod memory;
pub mod model;
pub mod pipeline;
pub mod sink;
pub mod source;
pub mod telemetry;
