//! Bytes a synchronous Parquet writer produces, held until an async upload takes them: the
//! writer needs `std::io::Write`, the object store is written through `FileIO`.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// Bytes the Parquet writer produced and the uploader has not taken yet.
#[derive(Clone, Default)]
pub(crate) struct Spool(Arc<Mutex<Vec<u8>>>);

impl Spool {
    /// Everything produced since the last call.
    pub(crate) fn take(&self) -> Vec<u8> {
        match self.0.lock() {
            Ok(mut b) => std::mem::take(&mut *b),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        }
    }
}

impl Write for Spool {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock() {
            Ok(mut b) => b.extend_from_slice(buf),
            Err(p) => p.into_inner().extend_from_slice(buf),
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
