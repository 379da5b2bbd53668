//! The ring's tests: property tests of the producer/consumer protocol with
//! either kind of consumer, back-pressure, wake-ups and closing.

use super::*;
use proptest::prelude::*;
use std::collections::HashSet;

/// Who drains the ring in [`run`].
#[derive(Debug, Clone, Copy)]
enum Drainer {
    Thread,
    Inline,
}

/// Runs `producers` tasks on a multi-threaded runtime, each sending
/// `per_producer` records whose offset encodes (producer, index), while
/// `drainer` drains the ring. Returns what the consumer saw, and what the
/// receiver says it was handed.
fn run(
    drainer: Drainer,
    budget: usize,
    producers: u64,
    per_producer: u64,
    data_len: usize,
) -> (Vec<Record>, Delivered) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (sender, consumer) = match drainer {
        Drainer::Thread => {
            let (sender, mut receiver) = capture_ring(budget, 1000);
            let seen = seen.clone();
            let consumer = std::thread::spawn(move || {
                while let Some(record) = receiver.recv() {
                    seen.lock().unwrap().push(record);
                }
                receiver.delivered()
            });
            (sender, consumer)
        }
        Drainer::Inline => {
            let into = seen.clone();
            let (sender, receiver) = capture_ring_inline(budget, 1000, move |record| {
                into.lock().unwrap().push(record)
            });
            (sender, std::thread::spawn(move || receiver.wait_closed()))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut tasks = Vec::new();
        for p in 0..producers {
            let sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let mut last_seq = None;
                for i in 0..per_producer {
                    let data = Bytes::from(vec![p as u8; data_len]);
                    let seq = sender
                        .send(RecordKind::Write, false, p << 32 | i, data_len as u64, data)
                        .await
                        .unwrap();
                    // Causality: a send that returned earlier has a lower seq.
                    assert!(last_seq.is_none_or(|last| last < seq));
                    last_seq = Some(seq);
                    if i % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
    let delivered = consumer.join().unwrap();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (seen, delivered)
}

/// Checks what [`run`] saw.
fn check_stream(
    (seen, delivered): (Vec<Record>, Delivered),
    producers: u64,
    per_producer: u64,
    data_len: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(seen.len() as u64, producers * per_producer);
    for (i, record) in seen.iter().enumerate() {
        prop_assert_eq!(
            record.seq,
            1000 + i as u64,
            "gap or reorder at position {}",
            i
        );
        prop_assert_eq!(record.data.len(), data_len);
    }
    let distinct: HashSet<u64> = seen.iter().map(|r| r.offset).collect();
    prop_assert_eq!(distinct.len(), seen.len(), "a record was delivered twice");
    // Each producer's records come out in the order it sent them.
    for p in 0..producers {
        let mine: Vec<u64> = seen
            .iter()
            .filter(|r| r.offset >> 32 == p)
            .map(|r| r.offset & 0xffff_ffff)
            .collect();
        prop_assert!(
            mine.windows(2).all(|w| w[0] < w[1]),
            "producer {} out of order",
            p
        );
    }
    let expected = Delivered {
        records: seen.len() as u64,
        data_bytes: seen.len() as u64 * data_len as u64,
        next_seq: 1000 + seen.len() as u64,
    };
    prop_assert_eq!(delivered, expected);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn nothing_lost_doubled_or_reordered(
        drainer in prop_oneof![Just(Drainer::Thread), Just(Drainer::Inline)],
        budget_pages in 2usize..64,
        producers in 1u64..6,
        per_producer in 1u64..300,
        data_len in 0usize..10_000,
    ) {
        let stream = run(drainer, budget_pages * CREDIT_BYTES, producers, per_producer, data_len);
        check_stream(stream, producers, per_producer, data_len)?;
    }
}

#[test]
fn an_inline_consumer_has_a_lone_record_before_its_send_returns() {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let into = seen.clone();
    let (sender, receiver) = capture_ring_inline(1 << 20, 7, move |record: Record| {
        into.lock().unwrap().push(record.seq)
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    for expected in 7..10 {
        let seq = runtime
            .block_on(sender.send(RecordKind::Write, false, 0, 1, Bytes::from_static(b"x")))
            .unwrap();
        assert_eq!(seq, expected);
        assert_eq!(
            seen.lock().unwrap().last(),
            Some(&expected),
            "record {seq} not consumed yet"
        );
    }
    drop(sender);
    let delivered = receiver.wait_closed();
    assert_eq!((delivered.records, delivered.next_seq), (3, 10));
}

#[test]
fn full_ring_makes_producers_wait_until_the_consumer_drains() {
    let (sender, mut receiver) = capture_ring(4 * CREDIT_BYTES, 0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async {
        // Two records of one page each cost 2 credits apiece: the ring is full.
        for _ in 0..2 {
            sender
                .send(
                    RecordKind::Write,
                    false,
                    0,
                    10,
                    Bytes::from_static(b"0123456789"),
                )
                .await
                .unwrap();
        }
        let blocked = tokio::time::timeout(
            Duration::from_millis(50),
            sender.send(RecordKind::Flush, false, 0, 0, Bytes::new()),
        )
        .await;
        assert!(blocked.is_err(), "a full ring accepted another record");
        assert_eq!(receiver.try_recv().map(|r| r.seq), Some(0));
        let seq = sender
            .send(RecordKind::Flush, false, 0, 0, Bytes::new())
            .await
            .unwrap();
        assert_eq!(seq, 2);
    });
}

#[test]
fn the_consumer_is_woken_for_a_megabyte_a_batch_or_a_barrier() {
    let (sender, mut receiver) = capture_ring(256 << 20, 0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let shared = &*sender.shared;
    let Consumer::Thread(wake) = &shared.consumer else {
        panic!("capture_ring has a consumer thread")
    };
    let write = |len: usize| {
        let data = Bytes::from(vec![1u8; len]);
        runtime.block_on(sender.send(RecordKind::Write, false, 0, len as u64, data))
    };
    write(64 << 10).unwrap();
    assert!(
        !wake.worth_waking(shared, false),
        "64 KiB waits for the tick"
    );
    assert!(
        wake.worth_waking(shared, true),
        "a barrier is always worth it"
    );
    write(WAKE_BYTES - (64 << 10)).unwrap();
    assert!(
        wake.worth_waking(shared, false),
        "1 MiB of data is worth it"
    );
    while receiver.try_recv().is_some() {}
    assert!(!wake.worth_waking(shared, false), "drained");
    for _ in 0..wake.batch {
        write(512).unwrap();
    }
    assert!(
        wake.worth_waking(shared, false),
        "a batch of small records is worth it"
    );
}

/// Voluntary context switches of thread `tid` of this process so far.
fn context_switches(tid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("voluntary_ctxt_switches:"))
        .expect("a voluntary_ctxt_switches line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn an_idle_consumer_sleeps_until_a_record_comes() {
    let (sender, mut receiver) = capture_ring(1 << 20, 0);
    let (delivered, seen) = std::sync::mpsc::channel();
    let consumer = std::thread::spawn(move || {
        // SAFETY: gettid has no arguments and cannot fail.
        delivered.send(Err(unsafe { libc::gettid() })).unwrap();
        while let Some(record) = receiver.recv() {
            delivered.send(Ok(record.seq)).unwrap();
        }
    });
    let Ok(Err(tid)) = seen.recv() else {
        panic!("the consumer sends its thread id first")
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    // Lone small records, each after the consumer has gone to sleep:
    // every one must still wake it (a lost wake-up would hang here).
    for seq in 0..50 {
        std::thread::sleep(CONSUMER_TICK * 3);
        runtime
            .block_on(sender.send(RecordKind::Write, false, 0, 1, Bytes::from_static(b"x")))
            .unwrap();
        let got = seen.recv_timeout(Duration::from_secs(5));
        assert_eq!(
            got,
            Ok(Ok(seq)),
            "record {seq} was not delivered to a sleeping consumer"
        );
    }
    std::thread::sleep(CONSUMER_TICK * 3);
    let before = context_switches(tid);
    std::thread::sleep(CONSUMER_TICK * 100);
    let woken = context_switches(tid) - before;
    assert!(
        woken <= 2,
        "an idle consumer woke {woken} times in {:?}",
        CONSUMER_TICK * 100
    );
    drop(sender);
    consumer.join().unwrap();
}

#[test]
fn senders_fail_once_the_receiver_is_gone() {
    let (sender, receiver) = capture_ring(1 << 20, 0);
    drop(receiver);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let result = runtime.block_on(sender.send(RecordKind::Flush, false, 0, 0, Bytes::new()));
    assert_eq!(result, Err(CaptureClosed));
}
