//! Read pacing for the replication socket: while the server streams faster than it idles, the
//! kernel wakes the reader once per batch of messages instead of once per TCP segment.
//!
//! Reading each segment as it arrived cost a worker wake-up, an `epoll_wait` and two `recv`s per
//! few hundred bytes: the kernel's share was over half of the agent's CPU while streaming.
//! Linux's `SO_RCVLOWAT` holds the socket's readiness back until that many bytes wait; lowering
//! it again signals readiness at once if any bytes wait (`tcp_set_rcvlowat`), which is how a
//! short timer bounds the delay. Elsewhere pacing is off and every arrival is read.

use std::time::Duration;

/// Bytes to wait for once a read found the socket nearly empty. Small on purpose: the server
/// sends a segment per message (often ~100 bytes), and the kernel charges each its buffer
/// overhead, so 8 KiB and more waiting in the socket filled its receive buffer — the window
/// closed, the walsender stalled (and with 32 KiB the kernel pruned the queue). 4 KiB took a
/// third off the agent's CPU at the same throughput (docs/performance.md, "Session 14").
pub(super) const BATCH_BYTES: usize = 4 << 10;
/// The longest a message waits in the socket for more to join it: nothing beside the flush
/// interval, and at the fastest rate seen (~15 MB/s on loopback) well inside a socket buffer.
pub(super) const MAX_WAIT: Duration = Duration::from_millis(1);

/// The low-water mark of one TCP socket.
pub(super) struct Pacing {
    #[cfg(target_os = "linux")]
    fd: Option<std::os::fd::RawFd>,
    raised: bool,
}

impl Pacing {
    /// Pacing for the socket `fd` (None: a transport it does not apply to).
    #[cfg(target_os = "linux")]
    pub(super) fn new(fd: Option<std::os::fd::RawFd>) -> Self {
        Self { fd, raised: false }
    }

    /// No pacing on this platform.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn new<T>(_: Option<T>) -> Self {
        Self { raised: false }
    }

    /// Whether reads wait for a batch now (the caller bounds that wait with [`MAX_WAIT`]).
    pub(super) fn raised(&self) -> bool {
        self.raised
    }

    /// Wait for [`BATCH_BYTES`] before the socket reads as ready; false if that is not possible.
    pub(super) fn raise(&mut self) -> bool {
        if !self.raised {
            self.raised = self.set(BATCH_BYTES);
        }
        self.raised
    }

    /// Any byte makes the socket ready again (signalled at once if bytes wait).
    pub(super) fn lower(&mut self) {
        // If this fails the mark stays raised: a batch or the next timer ends the wait.
        if self.raised && self.set(1) {
            self.raised = false;
        }
    }

    #[cfg(target_os = "linux")]
    fn set(&self, bytes: usize) -> bool {
        let Some(fd) = self.fd else {
            return false;
        };
        let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: `fd` is the open socket the replication task owns for as long as this lives;
        // the option value is a c_int on the stack, passed with its size.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }

    #[cfg(not(target_os = "linux"))]
    fn set(&self, _: usize) -> bool {
        false
    }
}
