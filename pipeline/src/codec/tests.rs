//! Tests of [`super`].
use super::*;
use proptest::prelude::*;

fn new_key() -> Key {
    let dir = tempfile::tempdir().unwrap();
    Key::generate(dir.path().join("key")).unwrap()
}

fn new_salt() -> SessionSalt {
    SessionSalt {
        source_nonce: SessionSalt::random_half(),
        target_nonce: SessionSalt::random_half(),
    }
}

fn meta(first_seq: u64) -> FrameMeta {
    FrameMeta {
        kind: FrameKind::Batch,
        disk_id: *b"disk-0123456789a",
        first_seq,
        last_seq: first_seq + 9,
        point_time_ns: 1_750_000_000_123_456_789,
    }
}

/// Deterministic bytes that zstd cannot shrink.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

fn text(len: usize) -> Vec<u8> {
    let line = b"2025-06-01T12:00:00Z host kernel: EXT4-fs (nbd0): mounted filesystem\n";
    line.iter().copied().cycle().take(len).collect()
}

fn format_byte(frame: &[u8]) -> u8 {
    frame[5]
}

#[test]
fn salt_bytes_round_trip() {
    let salt = new_salt();
    let bytes = salt.to_bytes();
    assert_eq!(bytes[..32], salt.source_nonce);
    assert_eq!(bytes[32..], salt.target_nonce);
    assert_eq!(SessionSalt::from_bytes(&bytes), salt);
    assert_ne!(SessionSalt::random_half(), SessionSalt::random_half());
}

#[test]
fn compressible_data_is_stored_compressed() {
    let (key, salt) = (new_key(), new_salt());
    let mut sealer = Sealer::new(&key, &salt, Direction::SourceToTarget);
    let mut opener = Opener::new(&key, &salt, Direction::SourceToTarget);
    for (i, plaintext) in [vec![0u8; 1 << 20], text(300_000), text(100)]
        .iter()
        .enumerate()
    {
        let frame = sealer.seal(&meta(i as u64), plaintext);
        assert_eq!(format_byte(&frame), BodyFormat::Zstd as u8);
        let body_len = frame.len() - FRAME_HEADER_LEN - TAG_LEN;
        assert!(body_len < plaintext.len(), "{body_len}-byte body");
        assert_eq!(
            frame_len(frame[..64].try_into().unwrap()).unwrap(),
            frame.len()
        );
        let (opened_meta, opened) = opener.open(&frame).unwrap();
        assert_eq!(opened_meta, meta(i as u64));
        assert_eq!(&opened, plaintext);
    }
}

#[test]
fn incompressible_data_is_stored_as_is() {
    let (key, salt) = (new_key(), new_salt());
    let mut sealer = Sealer::new(&key, &salt, Direction::SourceToTarget);
    let mut opener = Opener::new(&key, &salt, Direction::SourceToTarget);
    for (i, plaintext) in [noise(1 << 20, 1), noise(10, 2), Vec::new(), text(8)]
        .iter()
        .enumerate()
    {
        let frame = sealer.seal(&meta(i as u64), plaintext);
        assert_eq!(format_byte(&frame), BodyFormat::Stored as u8);
        assert_eq!(frame.len(), FRAME_HEADER_LEN + plaintext.len() + TAG_LEN);
        if !plaintext.is_empty() {
            assert_ne!(
                &frame[64..64 + plaintext.len()],
                &plaintext[..],
                "encrypted"
            );
        }
        let (opened_meta, opened) = opener.open(&frame).unwrap();
        assert_eq!(opened_meta, meta(i as u64));
        assert_eq!(&opened, plaintext);
    }
}

#[test]
fn header_fields_are_laid_out_as_specified() {
    let (key, salt) = (new_key(), new_salt());
    let mut sealer = Sealer::new(&key, &salt, Direction::TargetToSource);
    let ack = FrameMeta {
        kind: FrameKind::Ack,
        ..meta(5)
    };
    sealer.seal(&ack, b"first");
    let frame = sealer.seal(&ack, b"second");
    assert_eq!(&frame[0..8], b"CDPF\x01\x00\x02\x00");
    assert_eq!(&frame[8..24], b"disk-0123456789a");
    assert_eq!(frame[24..32], 5u64.to_be_bytes());
    assert_eq!(frame[32..40], 14u64.to_be_bytes());
    assert_eq!(frame[40..48], ack.point_time_ns.to_be_bytes());
    assert_eq!(frame[48..56], 1u64.to_be_bytes(), "second frame, counter 1");
    assert_eq!(frame[56..60], 6u32.to_be_bytes());
    assert_eq!(frame[60..64], 22u32.to_be_bytes());
}

#[test]
fn every_flipped_bit_is_refused() {
    let (key, salt) = (new_key(), new_salt());
    let mut sealer = Sealer::new(&key, &salt, Direction::SourceToTarget);
    let mut opener = Opener::new(&key, &salt, Direction::SourceToTarget);
    let stored = sealer.seal(&meta(0), &noise(40, 3));
    let compressed = sealer.seal(&meta(10), &text(400));
    assert_eq!(format_byte(&stored), 0);
    assert_eq!(format_byte(&compressed), 1);
    for good in [&stored, &compressed] {
        for bit in 0..good.len() * 8 {
            let mut bad = good.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(
                opener.open(&bad).is_err(),
                "flip of bit {bit} went unnoticed"
            );
            assert!(open_at_rest(
                &key,
                &salt,
                Direction::SourceToTarget,
                BytesMut::from(&bad[..])
            )
            .is_err());
        }
        // Refused frames leave the opener as it was.
        opener.open(good).unwrap();
    }
    // Truncated or extended frames are refused too.
    assert!(matches!(
        opener.open(&compressed[..63]),
        Err(CodecError::Truncated { len: 63 })
    ));
    let mut longer = compressed.clone();
    longer.push(0);
    assert!(matches!(
        opener.open(&longer),
        Err(CodecError::FrameLength { counter: 1, .. })
    ));
}

#[test]
fn altered_body_fails_authentication() {
    let (key, salt) = (new_key(), new_salt());
    let mut sealer = Sealer::new(&key, &salt, Direction::SourceToTarget);
    let mut frame = sealer.seal(&meta(0), &text(1000));
    *frame.last_mut().unwrap() ^= 0x80;
    let err = Opener::new(&key, &salt, Direction::SourceToTarget)
        .open(&frame)
        .unwrap_err();
    assert!(
        matches!(err, CodecError::Authentication { counter: 0, .. }),
        "{err:?}"
    );
}

#[test]
fn wrong_key_salt_or_direction_is_refused() {
    let (key, salt) = (new_key(), new_salt());
    let frame = Sealer::new(&key, &salt, Direction::SourceToTarget).seal(&meta(0), &text(500));
    let wrong = [
        Opener::new(&new_key(), &salt, Direction::SourceToTarget),
        Opener::new(&key, &new_salt(), Direction::SourceToTarget),
        Opener::new(&key, &salt, Direction::TargetToSource),
    ];
    for mut opener in wrong {
        let err = opener.open(&frame).unwrap_err();
        assert!(matches!(err, CodecError::Authentication { .. }), "{err:?}");
    }
    let err = open_at_rest(
        &new_key(),
        &salt,
        Direction::SourceToTarget,
        BytesMut::from(&frame[..]),
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "frame 0 ({}-byte body) failed authentication: wrong key, session or direction, or altered bytes",
            frame.len() - 64
        )
    );
}

#[test]
fn replayed_frames_are_refused_in_session_but_open_at_rest() {
    let (key, salt) = (new_key(), new_salt());
    let dir = Direction::SourceToTarget;
    let mut sealer = Sealer::new(&key, &salt, dir);
    let frames: Vec<Vec<u8>> = (0..3)
        .map(|i| sealer.seal(&meta(i * 10), &text(200)))
        .collect();
    let mut opener = Opener::new(&key, &salt, dir);
    opener.open(&frames[0]).unwrap();
    let err = opener.open(&frames[0]).unwrap_err();
    assert!(
        matches!(
            err,
            CodecError::Replayed {
                counter: 0,
                last: 0
            }
        ),
        "{err:?}"
    );
    opener.open(&frames[2]).unwrap();
    let err = opener.open(&frames[1]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "frame 1 is not newer than the last frame opened (2): replayed or reordered frame refused"
    );
    for (i, frame) in frames.iter().enumerate().rev() {
        let (opened_meta, plaintext) =
            open_at_rest(&key, &salt, dir, BytesMut::from(&frame[..])).unwrap();
        assert_eq!(opened_meta, meta(i as u64 * 10));
        assert_eq!(plaintext, text(200));
    }
    let (_, again) = open_at_rest(&key, &salt, dir, BytesMut::from(&frames[0][..])).unwrap();
    assert_eq!(again, text(200));
}

#[test]
fn no_two_sealers_share_a_key_and_nonce() {
    let key = new_key();
    let (salt_a, salt_b) = (new_salt(), new_salt());
    let plaintext = noise(4096, 9);
    let first_frames: Vec<Vec<u8>> = [
        (salt_a, Direction::SourceToTarget),
        (salt_a, Direction::TargetToSource),
        (salt_b, Direction::SourceToTarget),
        (salt_b, Direction::TargetToSource),
    ]
    .iter()
    .map(|(salt, dir)| Sealer::new(&key, salt, *dir).seal(&meta(0), &plaintext))
    .collect();
    // Same header (counter 0), same plaintext: only the key differs.
    for (i, a) in first_frames.iter().enumerate() {
        for b in &first_frames[i + 1..] {
            assert_eq!(a[..64], b[..64]);
            assert_ne!(a[64..], b[64..]);
        }
    }
    // Within one sealer the counter, and so the nonce, moves on.
    let mut sealer = Sealer::new(&key, &salt_a, Direction::SourceToTarget);
    let bodies: Vec<Vec<u8>> = (0..3).map(|_| sealer.seal(&meta(0), &plaintext)).collect();
    for (counter, frame) in bodies.iter().enumerate() {
        assert_eq!(frame[48..56], (counter as u64).to_be_bytes());
    }
    assert_ne!(bodies[0][64..], bodies[1][64..]);
    assert_ne!(bodies[1][64..], bodies[2][64..]);
}

#[test]
fn oversized_lengths_are_refused_before_allocating() {
    let (key, salt) = (new_key(), new_salt());
    let mut frame = Sealer::new(&key, &salt, Direction::SourceToTarget).seal(&meta(0), b"x");
    frame[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
    let header: [u8; 64] = frame[..64].try_into().unwrap();
    let err = frame_len(&header).unwrap_err();
    assert_eq!(
        err.to_string(),
        "bad frame header: plaintext length 4294967295 exceeds the limit of 268435456 bytes"
    );
    let err = Opener::new(&key, &salt, Direction::SourceToTarget)
        .open(&frame)
        .unwrap_err();
    assert!(matches!(
        err,
        CodecError::Header(HeaderError::PlainTooLong { .. })
    ));
}

#[test]
fn handshake_proof_needs_the_key_role_salt_and_transcript() {
    let (key, salt) = (new_key(), new_salt());
    let transcript = b"hello from source; salt exchanged";
    let role = Direction::SourceToTarget;
    let proof = handshake_proof(&key, &salt, role, transcript);
    assert!(verify_proof(&key, &salt, role, transcript, &proof));
    assert!(!verify_proof(&new_key(), &salt, role, transcript, &proof));
    assert!(!verify_proof(&key, &new_salt(), role, transcript, &proof));
    assert!(!verify_proof(
        &key,
        &salt,
        Direction::TargetToSource,
        transcript,
        &proof
    ));
    assert!(!verify_proof(
        &key,
        &salt,
        role,
        b"hello from someone else",
        &proof
    ));
    assert!(!verify_proof(&key, &salt, role, transcript, &proof[..31]));
    let mut flipped = proof;
    flipped[0] ^= 1;
    assert!(!verify_proof(&key, &salt, role, transcript, &flipped));
    assert_ne!(
        handshake_proof(&key, &salt, Direction::TargetToSource, transcript),
        proof
    );
}

fn any_meta() -> impl Strategy<Value = FrameMeta> {
    (
        prop_oneof![Just(FrameKind::Batch), Just(FrameKind::Ack)],
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(
            |(kind, disk_id, first_seq, last_seq, point_time_ns)| FrameMeta {
                kind,
                disk_id,
                first_seq,
                last_seq,
                point_time_ns,
            },
        )
}

/// Random bytes, repeated a random number of times so that some
/// plaintexts compress and some do not.
fn any_plaintext() -> impl Strategy<Value = Vec<u8>> {
    (prop::collection::vec(any::<u8>(), 0..2048), 1usize..40)
        .prop_map(|(chunk, repeats)| chunk.repeat(repeats))
}

proptest! {
    #[test]
    fn frames_round_trip(frames in prop::collection::vec((any_meta(), any_plaintext()), 1..6)) {
        let (key, salt) = (new_key(), new_salt());
        let dir = Direction::SourceToTarget;
        let mut sealer = Sealer::new(&key, &salt, dir);
        let mut opener = Opener::new(&key, &salt, dir);
        for (meta, plaintext) in &frames {
            let frame = sealer.seal(meta, plaintext);
            prop_assert!(frame.len() <= FRAME_HEADER_LEN + plaintext.len() + TAG_LEN);
            let header: [u8; 64] = frame[..64].try_into().unwrap();
            prop_assert_eq!(frame_len(&header).unwrap(), frame.len());
            let (opened_meta, opened) = opener.open(&frame).unwrap();
            prop_assert_eq!(&opened_meta, meta);
            prop_assert_eq!(&opened, plaintext);
            let (at_rest_meta, at_rest) = open_at_rest(&key, &salt, dir, BytesMut::from(&frame[..])).unwrap();
            prop_assert_eq!(&at_rest_meta, meta);
            prop_assert_eq!(&at_rest, plaintext);
        }
    }
}
