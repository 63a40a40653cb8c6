//! Every integration test in one binary (one link of arrow, iceberg and the agent, not
//! twelve), sharing the harness in `common`. Each module is one area; see its header.

mod common;

mod api;
mod bad_input;
mod core_data_path;
mod demo;
mod ha;
mod maintenance;
mod mirror;
mod reliability;
mod schema_changes;
mod snapshot;
mod source_auth;
mod source_features;
mod stack;
mod storage;
mod telemetry;
