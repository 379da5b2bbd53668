//! The cutter: drains a capture ring and cuts the stream into [`Batch`]es,
//! one per RPO interval (earlier when a batch grows too large, and right
//! after a tagged barrier, so that a tagged point is exactly one batch's end).
//!
//! This module owns *when* the stream is cut; what a batch holds is
//! [`crate::batch`]'s business.

use std::time::{Duration, Instant};

use filter::capture::{CaptureReceiver, Record, RecordKind};

use crate::batch::{Batch, BatchBuilder};

/// Longest sleep while holding records and waiting for the interval to end.
/// The ring's consumer wakes every 2 ms on its own, so polling at this rate
/// adds no latency the ring does not have already.
const POLL: Duration = Duration::from_millis(1);

/// Records taken from the ring between looks at the clock, so that a stream
/// that never runs dry is still cut on time.
const DRAIN_CHUNK: usize = 1024;

/// What one extent costs in memory besides its data (map entry and node
/// share), so that a flood of small trims also counts toward the limit.
const EXTENT_COST: usize = 64;

/// Cuts batches from a capture ring, one per RPO interval.
///
/// Consistency: the cutter cuts at the newest record it has received, with no
/// regard for barriers, and that is safe. Sequence order respects causality
/// (a change acknowledged before another was submitted has the lower
/// number), so every prefix of the stream is a state the disk could have
/// been in at a crash, and a batch boundary is a crash-consistent restore
/// point. [`Batch::ends_on_barrier`] tells the target where the stronger
/// points (after a flush or FUA write) are.
///
/// Memory and back-pressure: records are taken off the ring as they come,
/// which gives their credits back to the producers, so the cutter itself
/// holds at most about `max_batch_bytes` (data plus a small cost per extent;
/// see [`BatchBuilder`] on buffers kept alive by slices); everything else is
/// what the caller keeps. The caller (the transport) must stop calling
/// [`Cutter::next_batch`] while it holds too many unacknowledged batches: the
/// ring then fills, producers wait for credits, and the wait reaches the NBD
/// clients as slower acknowledgements. Nothing is dropped.
#[derive(Debug)]
pub struct Cutter {
    receiver: CaptureReceiver,
    rpo: Duration,
    max_batch_bytes: usize,
    builder: BatchBuilder,
    /// When the previous batch was cut (or the cutter made).
    last_cut: Instant,
}

impl Cutter {
    /// A cutter cutting `receiver`'s stream every `rpo`, or as soon as the
    /// batch holds `max_batch_bytes`. The first interval starts now.
    pub fn new(receiver: CaptureReceiver, rpo: Duration, max_batch_bytes: usize) -> Self {
        Cutter {
            receiver,
            rpo,
            max_batch_bytes,
            builder: BatchBuilder::new(),
            last_cut: Instant::now(),
        }
    }

    /// The next batch; blocks until it is cut. A batch is cut at the newest
    /// record received once `rpo` has passed since the previous cut, or
    /// earlier once it holds `max_batch_bytes`, or right after a tagged
    /// barrier (the batch then carries the tag). An interval without records
    /// yields no batch: the cutter waits for the next record and cuts as soon
    /// as it has drained what the ring holds. Batches follow one another with
    /// no gap in sequence numbers. Returns `None` once every sender is gone
    /// and every record was handed out.
    ///
    /// Closing is noticed only while no records are held (the ring cannot be
    /// asked whether senders remain without blocking in `recv`): records held
    /// when the senders go are handed out when their interval ends, not sooner.
    ///
    /// Idle, the cutter sleeps in the ring's `recv`; holding records, it
    /// polls the ring every millisecond until the interval ends.
    pub fn next_batch(&mut self) -> Option<Batch> {
        loop {
            let mut drained = 0;
            while drained < DRAIN_CHUNK {
                let Some(record) = self.receiver.try_recv() else {
                    break;
                };
                drained += 1;
                self.builder.push(&record);
                if self.must_cut(&record) {
                    return self.cut();
                }
            }
            if self.builder.is_empty() {
                // Nothing held and nothing ready: sleep until a record comes.
                let record = self.receiver.recv()?;
                self.builder.push(&record);
                if self.must_cut(&record) {
                    return self.cut();
                }
                continue;
            }
            let now = Instant::now();
            let due = self.last_cut + self.rpo;
            if now >= due {
                return self.cut();
            }
            if drained < DRAIN_CHUNK {
                // The ring ran dry; look again shortly.
                std::thread::sleep(POLL.min(due - now));
            }
        }
    }

    /// The batch must end at `record`, just pushed: it holds as much as it
    /// may, or `record` is a tagged barrier (an application-consistent point
    /// is the end of a batch, never inside one).
    fn must_cut(&self, record: &Record) -> bool {
        record.kind == RecordKind::Tag
            || self.builder.data_bytes() + self.builder.extent_count() * EXTENT_COST
                >= self.max_batch_bytes
    }

    fn cut(&mut self) -> Option<Batch> {
        self.last_cut = Instant::now();
        self.builder.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Extent;
    use bytes::Bytes;
    use filter::capture::{capture_ring, CaptureSender, RecordKind};
    use std::future::Future;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    const FIRST_SEQ: u64 = 1000;
    const DISK: usize = 2 << 20;

    /// What the producers send.
    #[derive(Debug, Clone, Copy)]
    struct Workload {
        write_len: usize,
        /// How far apart consecutive changes start.
        stride: u64,
        /// Every seventh change a flush and every seventh a trim; else only writes.
        mixed: bool,
    }

    impl Workload {
        /// The `i`th change.
        fn nth(self, i: u64) -> (RecordKind, bool, u64, u64, Bytes) {
            let offset = (i * self.stride) % (DISK - self.write_len) as u64;
            match i % 7 {
                3 if self.mixed => (RecordKind::Flush, false, 0, 0, Bytes::new()),
                5 if self.mixed => (RecordKind::Trim, false, offset, 1000, Bytes::new()),
                _ => {
                    let data: Vec<u8> = (0..self.write_len)
                        .map(|b| (i as usize + b) as u8 | 1)
                        .collect();
                    let len = self.write_len as u64;
                    (RecordKind::Write, i % 4 == 0, offset, len, data.into())
                }
            }
        }

        async fn send(self, sender: &CaptureSender, i: u64) {
            let (kind, fua, offset, len, data) = self.nth(i);
            let seq = sender.send(kind, fua, offset, len, data).await.unwrap();
            assert_eq!(seq, FIRST_SEQ + i);
        }
    }

    /// The disk after changes `0..n`, applied one by one.
    fn model(n: u64, workload: Workload) -> Vec<u8> {
        let mut disk = vec![0xAA; DISK];
        for i in 0..n {
            let (kind, _, offset, len, data) = workload.nth(i);
            let range = offset as usize..(offset + len) as usize;
            match kind {
                RecordKind::Write => disk[range].copy_from_slice(&data),
                RecordKind::Trim | RecordKind::Zero => disk[range].fill(0),
                RecordKind::Flush | RecordKind::Tag => {}
            }
        }
        disk
    }

    /// Runs `produce` on a tokio runtime on a thread of its own.
    fn spawn_producer<F, Fut>(sender: CaptureSender, produce: F) -> JoinHandle<()>
    where
        F: FnOnce(CaptureSender) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(produce(sender));
        })
    }

    /// Every batch until the cutter ends, with the time each was handed out.
    fn collect(cutter: &mut Cutter) -> Vec<(Instant, Batch)> {
        let batches: Vec<_> =
            std::iter::from_fn(|| cutter.next_batch().map(|batch| (Instant::now(), batch)))
                .collect();
        assert!(cutter.next_batch().is_none(), "a batch after the end");
        batches
    }

    /// Checks that the batches cover `FIRST_SEQ..FIRST_SEQ + n` without gaps
    /// and, applied in order, give the model's disk.
    fn check_stream(batches: &[(Instant, Batch)], n: u64, workload: Workload) {
        let mut next = FIRST_SEQ;
        let mut disk = vec![0xAA; DISK];
        for (_, batch) in batches {
            assert_eq!(batch.first_seq, next, "seq ranges not contiguous");
            assert!(batch.last_seq >= batch.first_seq);
            next = batch.last_seq + 1;
            for extent in &batch.extents {
                let range = extent.range();
                let range = range.start as usize..range.end as usize;
                match extent {
                    Extent::Data { data, .. } => disk[range].copy_from_slice(data),
                    Extent::Zero { .. } => disk[range].fill(0),
                }
            }
        }
        assert_eq!(next, FIRST_SEQ + n, "records lost");
        assert!(
            disk == model(n, workload),
            "batches differ from the records"
        );
    }

    #[test]
    fn batches_come_once_per_rpo_of_100_ms_and_nothing_is_lost() {
        const N: u64 = 60;
        let workload = Workload {
            write_len: 512,
            stride: 300, // overlapping heavily
            mixed: true,
        };
        let rpo = Duration::from_millis(100);
        let (sender, receiver) = capture_ring(1 << 20, FIRST_SEQ);
        let start = Instant::now();
        let mut cutter = Cutter::new(receiver, rpo, 64 << 20);
        let producer = spawn_producer(sender, move |sender| async move {
            for i in 0..N {
                workload.send(&sender, i).await;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let batches = collect(&mut cutter);
        producer.join().unwrap();
        check_stream(&batches, N, workload);
        // About 60 × 10 ms of records: one batch per interval, no more often.
        assert!(batches.len() >= 4, "only {} batches", batches.len());
        let slack = Duration::from_millis(5);
        assert!(batches[0].0 - start + slack >= rpo, "first batch too early");
        for pair in batches.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(gap + slack >= rpo, "batches {gap:?} apart");
        }
    }

    #[test]
    fn an_idle_interval_yields_no_batch_and_the_next_record_is_cut_promptly() {
        let workload = Workload {
            write_len: 512,
            stride: 4096,
            mixed: false,
        };
        let rpo = Duration::from_millis(100);
        let (sender, receiver) = capture_ring(1 << 20, FIRST_SEQ);
        let mut cutter = Cutter::new(receiver, rpo, 64 << 20);
        let (sent_tx, sent_rx) = mpsc::channel();
        let producer = spawn_producer(sender, move |sender| async move {
            workload.send(&sender, 0).await;
            tokio::time::sleep(Duration::from_millis(350)).await;
            workload.send(&sender, 1).await;
            sent_tx.send(Instant::now()).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
        });
        let batches = collect(&mut cutter);
        producer.join().unwrap();
        check_stream(&batches, 2, workload);
        let seqs: Vec<_> = batches
            .iter()
            .map(|(_, b)| (b.first_seq, b.last_seq))
            .collect();
        assert_eq!(
            seqs,
            [(FIRST_SEQ, FIRST_SEQ), (FIRST_SEQ + 1, FIRST_SEQ + 1)]
        );
        // The interval had long passed: no waiting for another one.
        let waited = batches[1].0 - sent_rx.recv().unwrap();
        assert!(waited < Duration::from_millis(80), "waited {waited:?}");
    }

    #[test]
    fn a_tagged_barrier_ends_its_batch_at_once() {
        let workload = Workload {
            write_len: 512,
            stride: 4096,
            mixed: false,
        };
        let (sender, receiver) = capture_ring(1 << 20, FIRST_SEQ);
        let start = Instant::now();
        let mut cutter = Cutter::new(receiver, Duration::from_secs(60), 64 << 20);
        let producer = spawn_producer(sender, move |sender| async move {
            workload.send(&sender, 0).await;
            workload.send(&sender, 1).await;
            let tag = Bytes::from_static(b"quiesced");
            let seq = sender.send(RecordKind::Tag, false, 0, 0, tag).await;
            assert_eq!(seq, Ok(FIRST_SEQ + 2));
            workload.send(&sender, 3).await;
            let tag = Bytes::from_static(b"again");
            sender
                .send(RecordKind::Tag, false, 0, 0, tag)
                .await
                .unwrap();
        });
        let batches = collect(&mut cutter);
        producer.join().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "waited for the RPO"
        );
        let cuts: Vec<_> = batches
            .iter()
            .map(|(_, b)| {
                (
                    b.first_seq,
                    b.last_seq,
                    b.tag.as_ref().map(|t| t.to_string()),
                )
            })
            .collect();
        assert_eq!(
            cuts,
            [
                (FIRST_SEQ, FIRST_SEQ + 2, Some("quiesced".to_string())),
                (FIRST_SEQ + 3, FIRST_SEQ + 4, Some("again".to_string())),
            ]
        );
        assert!(batches.iter().all(|(_, b)| b.ends_on_barrier));
    }

    #[test]
    fn max_batch_bytes_cuts_early() {
        const N: u64 = 28;
        const WRITE: usize = 64 << 10;
        let workload = Workload {
            write_len: WRITE,
            stride: WRITE as u64, // adjacent, not overlapping
            mixed: false,
        };
        // Four writes fill a batch; N is a multiple of four, so no records are
        // held when the senders go (held records would wait for the RPO).
        let max = 4 * WRITE;
        let (sender, receiver) = capture_ring(1 << 20, FIRST_SEQ);
        let start = Instant::now();
        let mut cutter = Cutter::new(receiver, Duration::from_secs(60), max);
        let producer = spawn_producer(sender, move |sender| async move {
            for i in 0..N {
                workload.send(&sender, i).await;
            }
        });
        let batches = collect(&mut cutter);
        producer.join().unwrap();
        check_stream(&batches, N, workload);
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "waited for the RPO"
        );
        for (_, batch) in &batches {
            let data: usize = batch
                .extents
                .iter()
                .map(|e| match e {
                    Extent::Data { data, .. } => data.len(),
                    Extent::Zero { .. } => 0,
                })
                .sum();
            assert_eq!(data, max);
            assert_eq!(batch.last_seq - batch.first_seq + 1, 4);
        }
    }
}
