//! The COPY BOTH phase of a replication session. A task of its own owns the socket: it
//! parses XLogData and keepalives into batches for the apply loop and reports the confirmed
//! position to the server, also while the apply loop is busy (a long Iceberg commit must not
//! let `wal_sender_timeout` expire).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use postgres_protocol::message::backend::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::sync::{mpsc, oneshot, Notify};

use super::{error_text, io_err, parse, split_copy_data, Backend, Conn, PgStream, WireError};

/// Microseconds from 1970-01-01 to 2000-01-01 (PostgreSQL's epoch).
const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// What the server sent on the replication stream.
#[derive(Debug, Clone)]
pub enum ReplEvent {
    /// A pgoutput message.
    XLogData {
        /// The pgoutput message.
        data: Bytes,
    },
    /// A keepalive: the server has sent everything up to `wal_end`.
    KeepAlive {
        /// The server's current WAL end.
        wal_end: u64,
    },
}

/// How often the task reports progress.
#[derive(Debug, Clone, Copy)]
pub struct StatusTiming {
    /// Report a new confirmed position within this long.
    pub changed: Duration,
    /// Report at least this often when nothing changes.
    pub idle: Duration,
}

pub(super) type Batch = Result<Vec<ReplEvent>, WireError>;

/// A started replication stream; dropping it closes the connection.
pub struct ReplicationStream {
    rx: mpsc::Receiver<Batch>,
    pending: VecDeque<ReplEvent>,
    confirmed: Arc<AtomicU64>,
    /// Wakes the TCP task when the confirmed position moves, so that the report goes out at
    /// once (when one is due) rather than at its next tick.
    moved: Arc<Notify>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl ReplicationStream {
    /// Take over `conn`, which has just received CopyBothResponse.
    pub(crate) fn spawn(conn: Conn, timing: StatusTiming) -> Self {
        let (stream, rbuf) = conn.into_parts();
        let (tx, rx) = mpsc::channel(4);
        let (stop_tx, stop_rx) = oneshot::channel();
        let confirmed = Arc::new(AtomicU64::new(0));
        let moved = Arc::new(Notify::new());
        let task = match stream {
            // A local socket is read by a thread of its own, in paced reads (see `paced`).
            PgStream::Unix(s) => {
                let progress = Progress::new(confirmed.clone(), timing);
                match s.into_std() {
                    Ok(s) => tokio::task::spawn_blocking(move || {
                        super::paced::run(s, rbuf, tx, progress, stop_rx)
                    }),
                    Err(e) => tokio::spawn(async move {
                        let _ = tx.send(Err(e.into())).await;
                    }),
                }
            }
            stream => tokio::spawn(io_task(
                stream,
                rbuf,
                tx,
                confirmed.clone(),
                moved.clone(),
                stop_rx,
                timing,
            )),
        };
        Self {
            rx,
            pending: VecDeque::new(),
            confirmed,
            moved,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// The next event; None when the server ended the stream. Cancel safe.
    pub async fn recv(&mut self) -> Result<Option<ReplEvent>, WireError> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Ok(Some(ev));
            }
            match self.rx.recv().await {
                Some(Ok(batch)) => self.pending.extend(batch),
                Some(Err(e)) => return Err(e),
                None => return Ok(None),
            }
        }
    }

    /// The next event already received, if any, without waiting (no trip through a select).
    pub fn try_recv(&mut self) -> Option<ReplEvent> {
        self.pending.pop_front()
    }

    /// Everything up to `lsn` is durable: the server may release it.
    pub fn confirm(&self, lsn: crate::model::Lsn) {
        if self.confirmed.fetch_max(lsn.get(), Ordering::Relaxed) < lsn.get() {
            self.moved.notify_one();
        }
    }

    /// Report the confirmed position one last time and end the stream.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

impl Drop for ReplicationStream {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Parse one CopyData payload of the stream.
fn event(mut payload: Bytes) -> Result<Option<(ReplEvent, bool)>, WireError> {
    let u64_at = |b: &Bytes, i: usize| {
        b.get(i..i + 8)
            .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
    };
    match payload.first() {
        Some(b'w') if payload.len() >= 25 => {
            // Advance in place: a slice would clone (and later drop) the shared buffer's
            // reference count once more per message, across threads.
            bytes::Buf::advance(&mut payload, 25);
            Ok(Some((ReplEvent::XLogData { data: payload }, false)))
        }
        Some(b'k') if payload.len() >= 18 => Ok(Some((
            ReplEvent::KeepAlive {
                wal_end: u64_at(&payload, 1).unwrap_or(0),
            },
            payload[17] == 1,
        ))),
        Some(b'w' | b'k') => Err(WireError::Protocol("truncated replication message".into())),
        _ => Ok(None),
    }
}

/// Standby status update: written, flushed and applied are all the confirmed position (a
/// logical slot only uses the flushed one).
fn status_message(lsn: u64, out: &mut BytesMut) {
    let now = chrono::Utc::now().timestamp_micros() - PG_EPOCH_UNIX_MICROS;
    out.put_u8(b'd');
    out.put_u32(4 + 1 + 8 * 4 + 1);
    out.put_u8(b'r');
    out.put_u64(lsn);
    out.put_u64(lsn);
    out.put_u64(lsn);
    out.put_i64(now);
    out.put_u8(0);
}

/// When the confirmed position is due to be reported, shared by both readers.
pub(super) struct Progress {
    confirmed: Arc<AtomicU64>,
    sent: u64,
    sent_at: Instant,
    timing: StatusTiming,
}

impl Progress {
    pub(super) fn new(confirmed: Arc<AtomicU64>, timing: StatusTiming) -> Self {
        Self {
            confirmed,
            sent: 0,
            sent_at: Instant::now(),
            timing,
        }
    }

    /// The status update to send now, if one is due (or `force`d); counted as sent.
    pub(super) fn due(&mut self, force: bool) -> Option<BytesMut> {
        let lsn = self.confirmed.load(Ordering::Relaxed);
        let wait = if lsn != self.sent {
            self.timing.changed
        } else {
            self.timing.idle
        };
        if !force && self.sent_at.elapsed() < wait {
            return None;
        }
        let mut buf = BytesMut::with_capacity(40);
        status_message(lsn, &mut buf);
        self.sent = lsn;
        self.sent_at = Instant::now();
        Some(buf)
    }
}

/// CopyDone: the server ends the stream cleanly.
pub(super) const COPY_DONE: [u8; 5] = [b'c', 0, 0, 0, 4];

struct Reporter {
    wr: WriteHalf<PgStream>,
    progress: Progress,
}

impl Reporter {
    async fn report(&mut self, force: bool) -> Result<(), WireError> {
        if let Some(buf) = self.progress.due(force) {
            self.wr.write_all(&buf).await?;
            self.wr.flush().await?;
        }
        Ok(())
    }

    async fn finish(&mut self) {
        let _ = self.report(true).await;
        let _ = self.wr.write_all(&COPY_DONE).await;
        let _ = self.wr.flush().await;
    }
}

/// What one pass over the read buffer found.
pub(super) struct Drained {
    /// The events, in order.
    pub batch: Vec<ReplEvent>,
    /// A keepalive asked for an immediate reply.
    pub reply: bool,
    /// The server ended the stream (CopyDone).
    pub ended: bool,
    /// The stream cannot go on.
    pub failure: Option<WireError>,
}

/// Take every complete message off the front of `rbuf`.
pub(super) fn drain(rbuf: &mut BytesMut) -> Drained {
    let mut d = Drained {
        batch: Vec::new(),
        reply: false,
        ended: false,
        failure: None,
    };
    loop {
        let payload = match split_copy_data(rbuf) {
            Ok(Some(p)) => p,
            Ok(None) => match parse(rbuf) {
                Ok(Some(Backend::Msg(Message::CopyData(body)))) => body.into_bytes(),
                Ok(Some(Backend::Msg(Message::ErrorResponse(e)))) => {
                    d.failure = Some(WireError::Server(error_text(&e)));
                    break;
                }
                Ok(Some(Backend::Msg(Message::CopyDone))) => {
                    d.ended = true;
                    break;
                }
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(e) => {
                    d.failure = Some(e);
                    break;
                }
            },
            Err(e) => {
                d.failure = Some(e);
                break;
            }
        };
        match event(payload) {
            Ok(Some((ev, r))) => {
                d.reply |= r;
                d.batch.push(ev);
            }
            Ok(None) => {}
            Err(e) => {
                d.failure = Some(e);
                break;
            }
        }
    }
    d
}

async fn io_task(
    stream: PgStream,
    mut rbuf: BytesMut,
    tx: mpsc::Sender<Batch>,
    confirmed: Arc<AtomicU64>,
    moved: Arc<Notify>,
    mut stop: oneshot::Receiver<()>,
    timing: StatusTiming,
) {
    let (mut rd, wr) = tokio::io::split(stream);
    let mut rep = Reporter {
        wr,
        progress: Progress::new(confirmed, timing),
    };
    let mut tick = tokio::time::interval(timing.changed.min(timing.idle));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let Drained {
            batch,
            reply,
            ended,
            failure,
        } = drain(&mut rbuf);
        if reply && rep.report(true).await.is_err() {
            // The read side reports the broken connection.
        }
        if !batch.is_empty() {
            let mut item = Some(Ok(batch));
            while item.is_some() {
                tokio::select! {
                    permit = tx.reserve() => match permit {
                        Ok(p) => {
                            if let Some(it) = item.take() {
                                p.send(it);
                            }
                        }
                        Err(_) => return,
                    },
                    _ = tick.tick() => {
                        let _ = rep.report(false).await;
                    }
                    _ = moved.notified() => {
                        let _ = rep.report(false).await;
                    }
                    _ = &mut stop => {
                        rep.finish().await;
                        return;
                    }
                }
            }
        }
        if let Some(e) = failure {
            let _ = tx.send(Err(e)).await;
            return;
        }
        if ended {
            rep.finish().await;
            return;
        }
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(256 * 1024);
        }
        tokio::select! {
            n = rd.read_buf(&mut rbuf) => match n {
                Ok(0) => {
                    let _ = tx.send(Err(io_err("during replication"))).await;
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            },
            _ = tick.tick() => {
                if let Err(e) = rep.report(false).await {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            _ = moved.notified() => {
                if let Err(e) = rep.report(false).await {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
            _ = &mut stop => {
                rep.finish().await;
                return;
            }
        }
    }
}
