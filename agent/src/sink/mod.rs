//! Where changes go: Apache Iceberg tables.

pub mod iceberg;
