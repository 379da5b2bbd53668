//! The seed session against a real target on 127.0.0.1, with a real disk
//! file behind a protected disk: a disk equal to the replica captures
//! nothing; one changed chunk is the one chunk captured, as it is now; a
//! state the journal holds no entry boundary for is refused with the reason
//! (what makes `cdp protect` copy the whole disk instead).

use std::os::unix::fs::FileExt;
use std::path::Path;

use bytes::Bytes;
use filter::backing::{Backing, BackingOptions};
use filter::capture::{capture_ring, CaptureReceiver, RecordKind};
use filter::protected::ProtectedDisk;
use pipeline::batch::{Batch, Extent};
use pipeline::codec::{FrameKind, FrameMeta};
use pipeline::failback::Totals;
use pipeline::key::Key;
use pipeline::seed::{self, SeedError};
use pipeline::session::{self, Hello};
use target_writer::roller::LongTermOptions;
use target_writer::server::{self, TargetConfig};
use target_writer::JournalOptions;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Three 4 MiB windows and a short fourth, whose last chunk is short too.
const SIZE: u64 = 3 * (4 << 20) + 5000;
const CHUNK: u64 = 64 << 10;
const HELLO: Hello = Hello {
    disk_id: *b"seed-test-disk-1",
    disk_size: SIZE,
};

fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4096) as u8).collect()
}

/// Ships `data` at `offset` as the batch of records `first..=last`.
async fn ship(addr: &str, key: &Key, first: u64, last: u64, offset: u64, data: &[u8]) {
    let mut stream = TcpStream::connect(addr)
        .await
        .expect("connect to the target");
    let (mut session, state) = session::connect(&mut stream, key, HELLO)
        .await
        .expect("replication handshake");
    assert_eq!(state.next_seq, first, "the target's next sequence number");
    let batch = Batch {
        first_seq: first,
        last_seq: last,
        ends_on_barrier: true,
        in_sync: false,
        tag: None,
        extents: vec![Extent::Data {
            offset,
            data: Bytes::copy_from_slice(data),
        }],
    };
    let meta = FrameMeta {
        kind: FrameKind::Batch,
        disk_id: HELLO.disk_id,
        first_seq: first,
        last_seq: last,
        point_time_ns: 1,
    };
    session
        .send(&mut stream, &meta, &batch.encode())
        .await
        .expect("send the batch");
    let (ack, _) = session.receive(&mut stream).await.expect("its ack");
    assert_eq!(ack.kind, FrameKind::Ack);
}

/// Runs a seeded sync of `disk` against the state before `before`.
async fn compare(
    addr: &str,
    key: &Key,
    disk: &ProtectedDisk,
    before: u64,
) -> Result<Totals, SeedError> {
    let shutdown = CancellationToken::new();
    let totals = seed::sync(addr, key, HELLO, before, disk, &shutdown, |_| {}).await?;
    Ok(totals.expect("not shut down"))
}

/// Every record captured so far, as (kind, offset, len).
fn captured(receiver: &mut CaptureReceiver) -> Vec<(RecordKind, u64, u64)> {
    std::iter::from_fn(|| receiver.try_recv())
        .map(|r| (r.kind, r.offset, r.len))
        .collect()
}

fn open_disk(path: &Path) -> (ProtectedDisk, CaptureReceiver) {
    let (sender, receiver) = capture_ring(64 << 20, 0);
    let backing = Backing::open(path, BackingOptions::default()).expect("open the disk");
    (ProtectedDisk::new(backing, sender), receiver)
}

#[test]
fn the_seed_session_finds_exactly_the_chunks_that_differ() {
    let dir = tempfile::tempdir().expect("a scratch directory");
    let key = Key::generate(dir.path().join("key")).expect("a key");
    let disk_path = dir.path().join("disk.img");
    let content = pattern(SIZE);
    std::fs::write(&disk_path, &content).expect("write the disk");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let config = TargetConfig {
            listen: "127.0.0.1:0".parse().expect("an address"),
            dir: dir.path().join("target"),
            key: key.clone(),
            journal: JournalOptions::default(),
            long_term: LongTermOptions::default(),
        };
        let (bound, address) = tokio::sync::oneshot::channel();
        let target = tokio::spawn(server::run(config, shutdown.clone(), move |addr| {
            let _ = bound.send(addr);
        }));
        let addr = address.await.expect("the target listens").to_string();
        // The replica: the disk in two entries, records 0..=9 and 10..=19.
        let half = SIZE / 2;
        ship(&addr, &key, 0, 9, 0, &content[..half as usize]).await;
        ship(&addr, &key, 10, 19, half, &content[half as usize..]).await;

        let (disk, mut records) = open_disk(&disk_path);
        let equal = compare(&addr, &key, &disk, 20).await.expect("compare");
        assert_eq!(
            (equal.windows, equal.chunks, equal.differing, equal.bytes),
            (4, SIZE.div_ceil(CHUNK), 0, 0),
            "a disk equal to the replica"
        );
        assert_eq!(
            captured(&mut records),
            [],
            "nothing differs, nothing is captured"
        );

        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk_path)
            .unwrap();
        file.write_all_at(b"changed", 5 * CHUNK + 10).unwrap();
        file.write_all_at(b"the short last chunk", SIZE - 100)
            .unwrap();
        let changed = compare(&addr, &key, &disk, 20).await.expect("compare");
        let last = SIZE.div_ceil(CHUNK) - 1;
        assert_eq!(
            (changed.differing, changed.bytes),
            (2, CHUNK + (SIZE - last * CHUNK)),
            "two chunks changed"
        );
        assert_eq!(
            captured(&mut records),
            [
                (RecordKind::Write, 5 * CHUNK, CHUNK),
                (RecordKind::Write, last * CHUNK, SIZE - last * CHUNK)
            ],
            "the changed chunks, whole"
        );

        // Records 10..=19 are one entry: there is no state ending at 14.
        match compare(&addr, &key, &disk, 15).await {
            Err(SeedError::Refused(why)) => assert!(
                why.contains("holds no copy of the disk ending at sequence number 14"),
                "the refusal says why: {why}"
            ),
            other => panic!("a state inside an entry was not refused: {other:?}"),
        }
        // The state before 10 is the first half only, zeros after it, and
        // the target never got the change to chunk 5 (nothing here ships
        // what was captured): chunk 5 differs, and every chunk from the one
        // holding the second half's first byte.
        let first_half = compare(&addr, &key, &disk, 10).await.expect("compare");
        assert_eq!(
            first_half.differing,
            1 + SIZE.div_ceil(CHUNK) - half / CHUNK,
            "chunk 5 and the second half"
        );

        shutdown.cancel();
        target.await.expect("the target task").expect("the target");
    });
}
