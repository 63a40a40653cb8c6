//! PostgreSQL logical replication: connection settings, session set-up, pgoutput decoding, types.

pub mod binary;
pub mod conn;
pub mod copy;
pub mod ddl;
pub mod leader;
pub mod pgoutput;
pub mod session;
pub mod snapshot;
pub mod types;
pub mod wire;
