//! The io_uring I/O engine. It owns one ring thread, which owns the
//! `IoUring` and every buffer the kernel may touch, from submission until the
//! operation's last completion is reaped, even when the caller has given up.
//!
//! Callers on any tokio worker push a request onto a lock-free queue and
//! await a oneshot reply; they never block. The ring thread keeps an
//! `IORING_OP_READ` pending on an eventfd so that, when it sleeps in
//! `io_uring_enter`, a caller can wake it by writing to that eventfd. A
//! caller writes only if the thread announced it was sleeping: see
//! `Shared::state` for the handshake.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Write as _};
use std::mem;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use bytes::{Buf, Bytes};
use crossbeam_queue::SegQueue;
use io_uring::{opcode, squeue, types, IoUring, Probe};
use tokio::sync::oneshot;

use super::aligned::AlignedBuf;
use super::engine::{FallocateMode, IoEngine};
use crate::wake::{AfterPush, WakeState};

/// `user_data` of the pending eventfd read; every other value is a slot index.
const WAKE: u64 = u64::MAX;

/// Largest length put in one SQE: a multiple of any O_DIRECT alignment, and
/// below the kernel's per-call limit. Longer transfers continue as short ones.
const MAX_CHUNK: usize = 1 << 30;

/// [`IoEngine`] over io_uring, served by a dedicated ring thread.
pub struct UringEngine {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for UringEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UringEngine").finish_non_exhaustive()
    }
}

/// What callers and the ring thread share.
struct Shared {
    queue: SegQueue<Request>,
    /// The sleep/wake handshake with callers (see [`super::wake`]).
    state: WakeState,
    wake_fd: File,
}

impl Shared {
    fn new() -> io::Result<Self> {
        // SAFETY: eventfd takes no pointers; its result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            queue: SegQueue::new(),
            state: WakeState::new(),
            // SAFETY: `fd` is a fresh descriptor that nothing else owns.
            wake_fd: File::from(unsafe { OwnedFd::from_raw_fd(fd) }),
        })
    }

    /// Adds 1 to the eventfd counter, completing the ring thread's read.
    fn wake(&self) -> io::Result<()> {
        (&self.wake_fd).write_all(&1u64.to_ne_bytes())
    }

    fn drop_queued(&self) {
        while self.queue.pop().is_some() {}
    }
}

enum Request {
    Op(Op),
    Shutdown,
}

type Reply = oneshot::Sender<io::Result<()>>;

/// One operation and its progress. While it sits in the ring thread's slab,
/// its buffer is what the kernel reads or writes.
enum Op {
    Read {
        buf: AlignedBuf,
        offset: u64,
        done: usize,
        reply: oneshot::Sender<(AlignedBuf, io::Result<()>)>,
    },
    Write {
        /// The bytes not yet written; `offset` is where they go.
        data: Bytes,
        offset: u64,
        durable: bool,
        reply: Reply,
    },
    SyncData {
        reply: Reply,
    },
    Fallocate {
        mode: FallocateMode,
        offset: u64,
        len: u64,
        reply: Reply,
    },
}

impl Op {
    /// The SQE for what remains of this operation. It points into the
    /// operation's own buffer (heap memory, which stays put when the `Op`
    /// moves), so the `Op` must outlive the SQE's completion.
    fn sqe(&mut self, fd: types::Fd) -> squeue::Entry {
        match self {
            Op::Read {
                buf, offset, done, ..
            } => {
                let rest = &mut buf.as_mut_slice()[*done..];
                opcode::Read::new(fd, rest.as_mut_ptr(), chunk(rest.len()))
                    .offset(*offset + *done as u64)
                    .build()
            }
            Op::Write {
                data,
                offset,
                durable,
                ..
            } => opcode::Write::new(fd, data.as_ptr(), chunk(data.len()))
                .offset(*offset)
                .rw_flags(if *durable { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::SyncData { .. } => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::Fallocate {
                mode, offset, len, ..
            } => opcode::Fallocate::new(fd, *len)
                .offset(*offset)
                .mode(mode.flags())
                .build(),
        }
    }

    /// Accounts for a completion: the final result, or `None` when the rest
    /// must be resubmitted (short transfer or EINTR).
    fn advance(&mut self, res: i32) -> Option<io::Result<()>> {
        if res == -libc::EINTR {
            return None;
        }
        if res < 0 {
            return Some(Err(io::Error::from_raw_os_error(-res)));
        }
        let n = res as usize;
        match self {
            Op::Read { buf, done, .. } => {
                *done += n;
                // A read of 0 is end of file: the rest of `buf` stays zero.
                (n == 0 || *done == buf.len()).then_some(Ok(()))
            }
            Op::Write { data, offset, .. } => {
                data.advance(n);
                *offset += n as u64;
                if data.is_empty() {
                    Some(Ok(()))
                } else if n == 0 {
                    Some(Err(io::ErrorKind::WriteZero.into()))
                } else {
                    None
                }
            }
            Op::SyncData { .. } | Op::Fallocate { .. } => Some(Ok(())),
        }
    }

    /// Sends the result (and a read's buffer) back; a caller that gave up
    /// just drops it.
    fn finish(self, result: io::Result<()>) {
        match self {
            Op::Read { buf, reply, .. } => drop(reply.send((buf, result))),
            Op::Write { reply, .. } | Op::SyncData { reply } | Op::Fallocate { reply, .. } => {
                drop(reply.send(result))
            }
        }
    }

    /// Gives up on an operation the kernel may still be using: its buffer is
    /// leaked, and its caller sees the reply channel close.
    fn abandon(self) {
        match self {
            Op::Read { buf, .. } => mem::forget(buf),
            Op::Write { data, .. } => mem::forget(data),
            Op::SyncData { .. } | Op::Fallocate { .. } => {}
        }
    }
}

fn chunk(len: usize) -> u32 {
    len.min(MAX_CHUNK) as u32
}

fn thread_gone() -> io::Error {
    io::Error::other("io_uring engine thread has exited")
}

impl UringEngine {
    /// Sets up a ring of `queue_depth` entries and its thread. Fails when
    /// io_uring is unavailable (old kernel, seccomp) or lacks an operation
    /// this engine uses; the caller can then fall back to
    /// [`crate::backing::sync::SyncEngine`].
    pub fn new(file: Arc<File>, queue_depth: u32) -> io::Result<Self> {
        let ring = IoUring::new(queue_depth)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let needed = [
            opcode::Read::CODE,
            opcode::Write::CODE,
            opcode::Fsync::CODE,
            opcode::Fallocate::CODE,
        ];
        if !needed.into_iter().all(|code| probe.is_supported(code)) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "io_uring lacks read, write, fsync or fallocate",
            ));
        }
        let shared = Arc::new(Shared::new()?);
        let mut state = RingThread {
            cq_capacity: ring.params().cq_entries() as usize,
            ring,
            fd: types::Fd(file.as_raw_fd()),
            _file: file,
            shared: Arc::clone(&shared),
            slots: Vec::new(),
            free: Vec::new(),
            pending: VecDeque::new(),
            in_kernel: 0,
            wake_sink: Box::new(0),
            wake_armed: false,
            closing: false,
        };
        let thread = thread::Builder::new()
            .name("io-uring".into())
            .spawn(move || {
                if let Err(e) = state.run() {
                    tracing::error!(error = %e, "io_uring engine thread failed");
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Hands `request` to the ring thread, waking it if it sleeps. Errors
    /// only if the eventfd write fails, which leaves the request queued.
    fn submit(&self, request: Request) -> io::Result<()> {
        let shared = &self.shared;
        shared.queue.push(request);
        match shared.state.after_push() {
            AfterPush::Wake => shared.wake(),
            AfterPush::Drain => {
                shared.drop_queued();
                Ok(())
            }
            AfterPush::Nothing => Ok(()),
        }
    }

    /// Runs an operation that only returns a status.
    async fn status(&self, op: impl FnOnce(Reply) -> Op) -> io::Result<()> {
        let (reply, receiver) = oneshot::channel();
        self.submit(Request::Op(op(reply)))?;
        receiver.await.unwrap_or_else(|_| Err(thread_gone()))
    }
}

impl IoEngine for UringEngine {
    async fn read_at(&self, buf: AlignedBuf, offset: u64) -> (AlignedBuf, io::Result<()>) {
        let len = buf.len();
        let (reply, receiver) = oneshot::channel();
        let read = Op::Read {
            buf,
            offset,
            done: 0,
            reply,
        };
        if let Err(e) = self.submit(Request::Op(read)) {
            return (AlignedBuf::zeroed(len), Err(e));
        }
        // If the thread died, the buffer is gone with it; hand back a fresh one.
        receiver
            .await
            .unwrap_or_else(|_| (AlignedBuf::zeroed(len), Err(thread_gone())))
    }

    async fn write_at(&self, data: Bytes, offset: u64, durable: bool) -> io::Result<()> {
        self.status(|reply| Op::Write {
            data,
            offset,
            durable,
            reply,
        })
        .await
    }

    async fn sync_data(&self) -> io::Result<()> {
        self.status(|reply| Op::SyncData { reply }).await
    }

    async fn fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> io::Result<()> {
        self.status(|reply| Op::Fallocate {
            mode,
            offset,
            len,
            reply,
        })
        .await
    }
}

impl Drop for UringEngine {
    /// Lets the thread finish every operation already submitted, then joins it.
    fn drop(&mut self) {
        if let Err(e) = self.submit(Request::Shutdown) {
            tracing::error!(error = %e, "cannot wake the io_uring thread; detaching it");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("io_uring engine thread panicked");
            }
        }
    }
}

/// Everything the ring thread owns.
struct RingThread {
    ring: IoUring,
    fd: types::Fd,
    /// Keeps `fd` open.
    _file: Arc<File>,
    shared: Arc<Shared>,
    /// Operations from submission until their last completion, indexed by
    /// `user_data`; `free` lists the empty slots.
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    /// SQEs waiting for room in the submission queue.
    pending: VecDeque<squeue::Entry>,
    /// SQEs pushed to the submission queue and not yet completed; kept at
    /// most `cq_capacity` so that completions never overflow.
    in_kernel: usize,
    cq_capacity: usize,
    /// Where the pending eventfd read (if `wake_armed`) puts the counter.
    wake_sink: Box<u64>,
    wake_armed: bool,
    /// Shutdown was requested: finish what is in flight, then exit.
    closing: bool,
}

impl RingThread {
    fn run(&mut self) -> io::Result<()> {
        loop {
            self.take_requests();
            let idle = self.free.len() == self.slots.len();
            if self.closing && idle {
                if !self.wake_armed {
                    return Ok(());
                }
                // Complete our own eventfd read, so its sink is free to drop.
                self.shared.wake()?;
            } else if !self.closing && !self.wake_armed {
                self.arm_wake();
            }
            self.push_pending();

            let queue = &self.shared.queue;
            let want = usize::from(self.shared.state.may_sleep(|| queue.is_empty()));
            let entered = self.ring.submit_and_wait(want);
            self.shared.state.awake();
            if let Err(e) = entered {
                let transient = [libc::EINTR, libc::EAGAIN, libc::EBUSY];
                if !transient.contains(&e.raw_os_error().unwrap_or(0)) {
                    return Err(e);
                }
            }
            self.reap();
        }
    }

    /// Moves every queued request into the slab, ready for submission.
    fn take_requests(&mut self) {
        while let Some(request) = self.shared.queue.pop() {
            let mut op = match request {
                Request::Op(op) => op,
                Request::Shutdown => {
                    self.closing = true;
                    continue;
                }
            };
            let slot = self.free.pop().unwrap_or(self.slots.len());
            self.pending
                .push_back(op.sqe(self.fd).user_data(slot as u64));
            if slot == self.slots.len() {
                self.slots.push(Some(op));
            } else {
                self.slots[slot] = Some(op);
            }
        }
    }

    fn arm_wake(&mut self) {
        let sink: *mut u64 = &mut *self.wake_sink;
        let read = opcode::Read::new(types::Fd(self.shared.wake_fd.as_raw_fd()), sink.cast(), 8);
        self.pending.push_front(read.build().user_data(WAKE));
        self.wake_armed = true;
    }

    /// Moves pending SQEs into the submission queue while it and the
    /// completion queue have room.
    fn push_pending(&mut self) {
        let mut sq = self.ring.submission();
        while self.in_kernel < self.cq_capacity {
            let Some(entry) = self.pending.pop_front() else {
                break;
            };
            // SAFETY: the entry points into heap memory the kernel may use
            // until the entry's completion: the AlignedBuf or Bytes of the Op
            // in slot `user_data`, or `wake_sink` for WAKE. This thread owns
            // both and keeps them until `reap` sees that completion (or
            // leaks them in `Drop`), whatever the caller does meanwhile.
            if unsafe { sq.push(&entry) }.is_err() {
                self.pending.push_front(entry);
                break;
            }
            self.in_kernel += 1;
        }
    }

    /// Handles every available completion: finishes operations, or queues
    /// the rest of a short transfer.
    fn reap(&mut self) {
        loop {
            let Some(cqe) = self.ring.completion().next() else {
                return;
            };
            self.in_kernel -= 1;
            if cqe.user_data() == WAKE {
                self.wake_armed = false;
                continue;
            }
            let slot = cqe.user_data() as usize;
            let Some(mut op) = self.slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!(slot, "io_uring completion for an empty slot");
                continue;
            };
            match op.advance(cqe.result()) {
                Some(result) => {
                    self.free.push(slot);
                    op.finish(result);
                }
                None => {
                    self.pending
                        .push_back(op.sqe(self.fd).user_data(slot as u64));
                    self.slots[slot] = Some(op);
                }
            }
        }
    }
}

impl Drop for RingThread {
    /// Normally nothing is in flight here. After a fatal ring error or a
    /// panic, the kernel may still use the buffers of unfinished operations
    /// and the wake sink, so they are leaked rather than freed.
    fn drop(&mut self) {
        for op in self.slots.drain(..).flatten() {
            op.abandon();
        }
        if self.wake_armed {
            mem::forget(mem::take(&mut self.wake_sink));
        }
        self.shared.state.die();
        self.shared.drop_queued();
    }
}

#[cfg(test)]
mod tests {
    use std::future::{poll_fn, Future};
    use std::task::Poll;
    use std::time::Duration;

    use super::*;
    use crate::backing::sync::tests::{
        concurrent_random_writes, direct_file, direct_io_round_trip, durable_write_and_sync,
        pattern, punch_hole_reads_zeros, read, read_past_eof_gives_zeros,
        round_trip_at_odd_offsets, temp_file,
    };

    fn engine() -> UringEngine {
        UringEngine::new(temp_file(), 64).expect("io_uring engine")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_round_trip_at_odd_offsets() {
        round_trip_at_odd_offsets(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_read_past_eof_gives_zeros() {
        read_past_eof_gives_zeros(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_durable_write_and_sync() {
        durable_write_and_sync(&engine()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_punch_hole_reads_zeros() {
        punch_hole_reads_zeros(&engine()).await;
    }

    /// With a queue depth of 8, most of the 2000 operations wait in `pending`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_concurrent_random_writes() {
        let engine = UringEngine::new(temp_file(), 8).expect("io_uring engine");
        concurrent_random_writes(Arc::new(engine)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_direct_io_round_trip() {
        match direct_file() {
            Some(file) => {
                let engine = UringEngine::new(file, 16).expect("io_uring engine");
                direct_io_round_trip(&engine).await;
            }
            None => eprintln!("skipped: file system refuses O_DIRECT"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_invalid_queue_depth_fails_cleanly() {
        assert!(UringEngine::new(temp_file(), 0).is_err());
    }

    /// Callers drop their futures after submitting, then the engine is
    /// dropped with the operations in flight: the drop waits for them (so
    /// every write lands) and returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_drop_with_operations_in_flight() {
        let file = temp_file();
        let engine = UringEngine::new(Arc::clone(&file), 4).expect("io_uring engine");
        let mut writes: Vec<_> = (0..500u64)
            .map(|i| Box::pin(engine.write_at(pattern(4096, i as u8), i * 4096, false)))
            .collect();
        let mut reads: Vec<_> = (0..500u64)
            .map(|i| Box::pin(engine.read_at(AlignedBuf::zeroed(4096), i * 4096)))
            .collect();
        poll_fn(|cx| {
            for write in &mut writes {
                let _ = write.as_mut().poll(cx);
            }
            for read in &mut reads {
                let _ = read.as_mut().poll(cx);
            }
            Poll::Ready(())
        })
        .await;
        drop(writes);
        drop(reads);
        let dropped = tokio::task::spawn_blocking(move || drop(engine));
        tokio::time::timeout(Duration::from_secs(30), dropped)
            .await
            .expect("drop hung")
            .expect("drop panicked");

        let check = crate::backing::sync::SyncEngine::new(file);
        for i in 0..500u64 {
            assert_eq!(read(&check, i * 4096, 4096).await, pattern(4096, i as u8));
        }
    }

    #[test]
    fn short_transfers_resume_where_they_stopped() {
        let (reply, _receiver) = oneshot::channel();
        let mut write = Op::Write {
            data: pattern(100, 0),
            offset: 10,
            durable: false,
            reply,
        };
        assert!(write.advance(40).is_none());
        assert!(write.advance(-libc::EINTR).is_none());
        let Op::Write { data, offset, .. } = &write else {
            unreachable!()
        };
        assert_eq!((&data[..], *offset), (&pattern(100, 0)[40..], 50));
        assert!(matches!(write.advance(0), Some(Err(e)) if e.kind() == io::ErrorKind::WriteZero));

        let (reply, _receiver) = oneshot::channel();
        let mut read = Op::Read {
            buf: AlignedBuf::zeroed(100),
            offset: 0,
            done: 0,
            reply,
        };
        assert!(read.advance(30).is_none());
        assert!(matches!(read.advance(0), Some(Ok(()))));
        let failed = read.advance(-libc::EIO);
        assert!(matches!(failed, Some(Err(e)) if e.raw_os_error() == Some(libc::EIO)));
    }

    /// A caller of an engine whose thread is gone gets an error, not a hang.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn uring_dead_thread_fails_calls() {
        let shared = Shared::new().expect("eventfd");
        shared.state.die();
        let engine = UringEngine {
            shared: Arc::new(shared),
            thread: None,
        };
        let (buf, result) = engine.read_at(AlignedBuf::zeroed(512), 0).await;
        assert_eq!(buf.len(), 512);
        assert!(result.is_err());
        assert!(engine.write_at(pattern(10, 0), 0, true).await.is_err());
        assert!(engine.sync_data().await.is_err());
    }
}
