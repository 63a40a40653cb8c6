//! A log writer that removes configured secrets from every line before it reaches stderr.
//!
//! Philotes never logs a secret itself, but libraries may (reqsign, for one, prints its static
//! S3 credential at debug level). Every secret of the config is replaced by `***` here, so no
//! log level can leak one.

use std::io::Write;
use std::sync::Arc;

use tracing_subscriber::fmt::MakeWriter;

/// Makes stderr writers that scrub `secrets`.
#[derive(Clone)]
pub struct ScrubbingStderr {
    secrets: Arc<[String]>,
}

impl ScrubbingStderr {
    /// Scrub these strings (empty and very short ones are ignored).
    pub fn new(secrets: Vec<String>) -> Self {
        let mut s: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 3).collect();
        // Longest first, so a secret containing another is replaced whole.
        s.sort_by_key(|x| std::cmp::Reverse(x.len()));
        Self { secrets: s.into() }
    }
}

/// One event's writer.
pub struct ScrubWriter {
    secrets: Arc<[String]>,
}

impl Write for ScrubWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // The fmt layer writes each formatted event in one call, so a secret is never split.
        let mut err = std::io::stderr().lock();
        if self.secrets.is_empty() {
            err.write_all(buf)?;
        } else {
            let mut line = String::from_utf8_lossy(buf).into_owned();
            for s in self.secrets.iter() {
                if line.contains(s.as_str()) {
                    line = line.replace(s.as_str(), "***");
                }
            }
            err.write_all(line.as_bytes())?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for ScrubbingStderr {
    type Writer = ScrubWriter;

    fn make_writer(&'a self) -> ScrubWriter {
        ScrubWriter {
            secrets: self.secrets.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_replaced() {
        let w = ScrubbingStderr::new(vec!["hunter2".into(), "".into()]);
        assert_eq!(w.secrets.len(), 1);
        let mut out = w.make_writer();
        // Writes to stderr; here we only check that it reports the full length written.
        assert_eq!(out.write(b"password hunter2\n").unwrap(), 17);
    }
}
