//! The replication stream of a Unix-domain socket, read by a thread of its own in paced reads.
//!
//! The walsender writes every pgoutput message with a send of its own, so a reader waiting on
//! readiness wakes for every few messages, and the walsender pays for each wake-up. On a local
//! socket the sender does a message's kernel work whether or not the reader is waiting, so a
//! reader that, after emptying the socket, lets [`PACE`] pass before it reads again saves both
//! processes most wake-ups and costs the walsender nothing. A reader that falls behind never
//! waits: a read that fills the buffer is followed by the next at once. Over TCP on loopback
//! the receiver's protocol work moves into the sender while the receiver is not reading
//! (docs/performance.md, sessions 14 and 16), so TCP keeps the readiness-driven task.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::io_err;
use super::replication::{drain, Batch, Drained, Progress, COPY_DONE};

/// How long the reader lets messages gather after it emptied the socket.
///
/// 500 µs: with PostgreSQL's walsender sending about 200 messages per millisecond, 1 ms let
/// its socket buffer fill and stall it now and then; 200 µs saved little (docs/performance.md,
/// session 17).
pub(super) const PACE: Duration = Duration::from_micros(500);

/// How long a read waits for data before status reports and the stop signal are looked at.
const POLL: Duration = Duration::from_millis(50);

/// Size of one read.
const READ_SIZE: usize = 256 * 1024;

/// Read `sock` until the server ends the stream, `stop` fires or the receiver goes away.
pub(super) fn run(
    sock: UnixStream,
    mut rbuf: BytesMut,
    tx: mpsc::Sender<Batch>,
    mut progress: Progress,
    mut stop: oneshot::Receiver<()>,
) {
    let fail = |e: super::WireError| {
        let _ = tx.try_send(Err(e)).or_else(|e| match e {
            TrySendError::Full(item) => tx.blocking_send(item).map_err(|_| ()),
            TrySendError::Closed(_) => Err(()),
        });
    };
    // Blocking, with timeouts: a read returns what has arrived, or waits for it at most POLL.
    let setup = sock
        .set_nonblocking(false)
        .and_then(|()| sock.set_read_timeout(Some(POLL)))
        .and_then(|()| sock.set_write_timeout(Some(Duration::from_secs(30))));
    if let Err(e) = setup {
        fail(e.into());
        return;
    }
    let report = |progress: &mut Progress, force: bool| -> std::io::Result<()> {
        match progress.due(force) {
            Some(buf) => (&sock).write_all(&buf),
            None => Ok(()),
        }
    };
    let finish = |progress: &mut Progress| {
        let _ = report(progress, true);
        let _ = (&sock).write_all(&COPY_DONE);
    };
    let mut chunk = vec![0u8; READ_SIZE];
    let mut drained_socket = false;
    loop {
        let Drained {
            batch,
            reply,
            ended,
            failure,
        } = drain(&mut rbuf);
        if reply {
            // A broken connection shows on the next read.
            let _ = report(&mut progress, true);
        }
        if !batch.is_empty() {
            let mut item = Ok(batch);
            let mut wait = Duration::from_millis(1);
            loop {
                match tx.try_send(item) {
                    Ok(()) => break,
                    Err(TrySendError::Closed(_)) => return,
                    Err(TrySendError::Full(back)) => {
                        // The apply loop is busy (an Iceberg commit): keep the server informed.
                        item = back;
                        let _ = report(&mut progress, false);
                        match stop_asked(&mut stop) {
                            Some(true) => return finish(&mut progress),
                            Some(false) => return,
                            None => {}
                        }
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_millis(20));
                    }
                }
            }
        }
        if let Some(e) = failure {
            return fail(e);
        }
        if ended {
            return finish(&mut progress);
        }
        match stop_asked(&mut stop) {
            Some(true) => return finish(&mut progress),
            Some(false) => return,
            None if tx.is_closed() => return,
            None => {}
        }
        if let Err(e) = report(&mut progress, false) {
            return fail(e.into());
        }
        if drained_socket {
            std::thread::sleep(PACE);
        }
        match (&sock).read(&mut chunk) {
            Ok(0) => return fail(io_err("during replication")),
            Ok(n) => {
                rbuf.extend_from_slice(&chunk[..n]);
                drained_socket = n < chunk.len();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                drained_socket = false;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return fail(e.into()),
        }
    }
}

/// Some(true): stop cleanly (final report, CopyDone); Some(false): the stream was dropped, just
/// end; None: go on.
fn stop_asked(stop: &mut oneshot::Receiver<()>) -> Option<bool> {
    match stop.try_recv() {
        Ok(()) => Some(true),
        Err(oneshot::error::TryRecvError::Closed) => Some(false),
        Err(oneshot::error::TryRecvError::Empty) => None,
    }
}
