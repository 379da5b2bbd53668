//! Both roles over an in-memory connection, on real files.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::*;
use crate::key::Key;
use crate::protect::disk_id;

/// Five full windows and a short last chunk.
const SIZE: u64 = 5 * WINDOW_CHUNKS * CHUNK_SIZE + 1000;

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn disk_file(path: &Path, size: u64, seed: u64) -> PathBuf {
    std::fs::write(path, pseudo_random(size as usize, seed)).unwrap();
    path.to_path_buf()
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(data, offset).unwrap();
}

type Results = (
    Result<Summary, FailbackError>,
    Result<Summary, FailbackError>,
);

/// Runs a pass: `original` receives, `failover` sends as the failback of
/// `original_id`.
async fn pass(
    original: &Path,
    failover: &Path,
    (receiver_key, sender_key): (&Key, &Key),
    original_id: [u8; 16],
) -> Results {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    let original = Disk::open(original, true).unwrap();
    let failover = Disk::open(failover, false).unwrap();
    let receiver = async move { receive(&mut a, receiver_key, &original, |_, _| {}).await };
    let sender = async move { send(&mut b, sender_key, &failover, original_id, |_, _| {}).await };
    tokio::join!(receiver, sender)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_differing_chunks_travel_and_the_disks_end_equal() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(dir.path().join("key")).unwrap();
    let a = disk_file(&dir.path().join("a.img"), SIZE, 1);
    let b = dir.path().join("b.img");
    std::fs::copy(&a, &b).unwrap();
    // Changed on the failover side: one byte, a whole chunk, a write across
    // two chunks in different windows, the short last chunk.
    write_at(&b, 3 * CHUNK_SIZE + 17, b"x");
    write_at(&b, 70 * CHUNK_SIZE, &[0xaa; CHUNK_SIZE as usize]);
    write_at(&b, 128 * CHUNK_SIZE - 10, &[0xbb; 20]);
    write_at(&b, SIZE - 5, b"tail!");
    // Changed on the original side after the failover point.
    write_at(&a, 200 * CHUNK_SIZE + 4096, &[0xcc; 4096]);
    let id = disk_id(&a, SIZE);

    let (received, sent) = pass(&a, &b, (&key, &key), id).await;
    let (received, sent) = (received.unwrap(), sent.unwrap());
    let want = Totals {
        windows: 6,
        chunks: 5 * WINDOW_CHUNKS + 1,
        differing: 6,
        bytes: 5 * CHUNK_SIZE + 1000,
    };
    assert_eq!(sent.totals, want);
    assert_eq!(received.totals, want);
    assert!(sent.wire_bytes < 2 * want.bytes, "{sent:?}");
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());

    let (received, sent) = pass(&a, &b, (&key, &key), id).await;
    assert_eq!(sent.unwrap().totals.differing, 0);
    assert_eq!(received.unwrap().totals.differing, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_key_is_caught_by_each_side_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Key::generate(dir.path().join("ours")).unwrap();
    let theirs = Key::generate(dir.path().join("theirs")).unwrap();
    let a = disk_file(&dir.path().join("a.img"), SIZE, 1);
    let b = disk_file(&dir.path().join("b.img"), SIZE, 2);
    let (received, sent) = pass(&a, &b, (&ours, &theirs), disk_id(&a, SIZE)).await;
    assert!(
        matches!(
            sent,
            Err(FailbackError::Session(SessionError::PeerWrongKey {
                peer: "receiver"
            }))
        ),
        "{sent:?}"
    );
    assert!(
        matches!(
            received,
            Err(FailbackError::Session(SessionError::OurProofRejected {
                peer: "sender"
            }))
        ),
        "{received:?}"
    );
    assert!(std::fs::read(&a).unwrap() == pseudo_random(SIZE as usize, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_disk_is_turned_away_after_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let key = Key::generate(dir.path().join("key")).unwrap();
    let a = disk_file(&dir.path().join("a.img"), SIZE, 1);
    let small = disk_file(&dir.path().join("small.img"), SIZE - CHUNK_SIZE, 2);
    let b = disk_file(&dir.path().join("b.img"), SIZE, 3);

    let (received, sent) = pass(&a, &small, (&key, &key), disk_id(&a, SIZE)).await;
    let Err(FailbackError::Session(SessionError::Refused { message: why, .. })) = sent else {
        panic!("{sent:?}")
    };
    assert!(why.contains("the sender's disk is"), "{why}");
    assert!(matches!(
        received,
        Err(FailbackError::Session(SessionError::TurnedAway { .. }))
    ));

    let (received, sent) = pass(&a, &b, (&key, &key), disk_id(&b, SIZE)).await;
    let Err(FailbackError::Session(SessionError::Refused { message: why, .. })) = sent else {
        panic!("{sent:?}")
    };
    assert!(why.contains("the sender fails back disk"), "{why}");
    assert!(matches!(
        received,
        Err(FailbackError::Session(SessionError::TurnedAway { .. }))
    ));
    assert!(std::fs::read(&a).unwrap() == pseudo_random(SIZE as usize, 1));
}

#[test]
fn chunk_entries_must_be_in_range_in_order_and_whole() {
    let len = |i: u64| if i == 9 { 3 } else { 4 };
    let mut b = Vec::new();
    wire::push_chunk(&mut b, 5, b"abcd");
    wire::push_chunk(&mut b, 9, b"xyz");
    let entries = wire::decode_chunks(&b, 4, 9, len).unwrap();
    assert_eq!(entries, vec![(5, 8..12), (9, 20..23)]);
    assert!(wire::decode_chunks(&b, 6, 9, len).is_err());
    assert!(wire::decode_chunks(&b[..22], 4, 9, len).is_err());
    let mut twice = b.clone();
    wire::push_chunk(&mut twice, 9, b"xyz");
    assert!(wire::decode_chunks(&twice, 4, 9, len).is_err());
    let totals = Totals {
        windows: 1,
        chunks: 2,
        differing: 3,
        bytes: 4,
    };
    assert_eq!(Totals::decode(&totals.encode()).unwrap(), totals);
    assert!(Totals::decode(&[0; 31]).is_err());
}
