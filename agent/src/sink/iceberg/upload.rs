//! Bytes a synchronous Parquet writer produces, held until an async upload takes them: the
//! writer needs `std::io::Write`, the object store is written through `FileIO`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use iceberg::io::{FileIO, FileWrite};

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

/// The upload of one file a Parquet writer writes into `spool`. An object store's writer
/// (OpenDAL) gathers the pieces into parts of its minimum multipart size itself, so they are
/// handed over as they come.
pub(crate) struct Upload {
    /// Where the file goes.
    pub(crate) path: String,
    spool: Spool,
    file: Box<dyn FileWrite>,
    /// Bytes handed to the store so far.
    pub(crate) size: u64,
}

impl Upload {
    /// Open `path` in `io` for what the writer puts in `spool`.
    pub(crate) async fn create(
        io: &FileIO,
        path: String,
        spool: Spool,
    ) -> Result<Self, iceberg::Error> {
        let file = io.new_output(&path)?.writer().await?;
        Ok(Self {
            path,
            spool,
            file,
            size: 0,
        })
    }

    /// Hand what the writer produced so far to the store.
    pub(crate) async fn drain(&mut self) -> Result<(), iceberg::Error> {
        let produced = self.spool.take();
        if produced.is_empty() {
            return Ok(());
        }
        self.size += produced.len() as u64;
        self.file.write(Bytes::from(produced)).await
    }

    /// Hand over the rest and finish the file.
    pub(crate) async fn close(&mut self) -> Result<(), iceberg::Error> {
        self.drain().await?;
        self.file.close().await
    }
}
