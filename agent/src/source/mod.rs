//! Where changes come from.

pub mod postgres;
