use std::io::Write;

use super::*;

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shiva-filelog-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// What `run` returns, and what it logged.
fn logged<T>(run: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buffer(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    let result = tracing::subscriber::with_default(subscriber, run);
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap()).into_owned();
    (result, text)
}

#[test]
fn appended_records_read_back_in_order_with_dense_offsets_and_tombstones() {
    let dir = scratch("roundtrip");
    let mut log = TopicLog::open(&dir, "control").unwrap();
    assert_eq!(log.append(&[(b"a", Some(b"1")), (b"b", Some(b""))], 7).unwrap(), vec![0, 1]);
    assert_eq!(log.append(&[(b"a", None)], 8).unwrap(), vec![2]);
    let mut cursor = Cursor::open(log.dir()).unwrap();
    let frames = cursor.read_new().unwrap();
    type Seen<'a> = (i64, i64, &'a [u8], Option<&'a [u8]>);
    let seen: Vec<Seen<'_>> = frames
        .iter()
        .map(|frame| (frame.offset, frame.timestamp_ms, frame.key.as_slice(), frame.value.as_deref()))
        .collect();
    assert_eq!(
        seen,
        vec![(0, 7, &b"a"[..], Some(&b"1"[..])), (1, 7, &b"b"[..], Some(&b""[..])), (2, 8, &b"a"[..], None)]
    );
    assert!(cursor.read_new().unwrap().is_empty());
    // Another handle (another process) goes on from the last offset.
    let mut other = TopicLog::open(&dir, "control").unwrap();
    assert_eq!(other.append(&[(b"c", Some(b"3"))], 9).unwrap(), vec![3]);
    assert_eq!(cursor.read_new().unwrap()[0].offset, 3);
}

#[test]
fn appenders_at_once_never_interleave_and_take_each_offset_once() {
    let dir = scratch("concurrent");
    TopicLog::open(&dir, "t").unwrap();
    let threads: Vec<_> = (0..4)
        .map(|writer| {
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut log = TopicLog::open(&dir, "t").unwrap();
                let mut acked = Vec::new();
                for i in 0..100 {
                    let key = format!("w{writer}-{i}");
                    let value = vec![b'x'; (i * 37) % 3000];
                    let offsets = log.append(&[(key.as_bytes(), Some(&value))], 0).unwrap();
                    acked.push((offsets[0], key));
                }
                acked
            })
        })
        .collect();
    let mut acked: Vec<(i64, String)> =
        threads.into_iter().flat_map(|thread| thread.join().unwrap()).collect();
    acked.sort();
    let frames = Cursor::open(&dir.join("t")).unwrap().read_new().unwrap();
    assert_eq!(frames.len(), 400);
    for (index, frame) in frames.iter().enumerate() {
        assert_eq!(frame.offset, index as i64);
        assert_eq!(acked[index], (frame.offset, String::from_utf8(frame.key.clone()).unwrap()));
    }
}

#[test]
fn a_torn_tail_is_not_read_and_the_next_append_cuts_it() {
    // What a kill leaves: part of a prefix, a frame cut short; what a power cut may: zeros.
    for torn in [vec![0x10, 0, 0], vec![40, 0, 0, 0, 1, 2, 3, 4, 5], vec![0; 100]] {
        let dir = scratch("torn");
        let mut log = TopicLog::open(&dir, "t").unwrap();
        log.append(&[(b"a", Some(b"1")), (b"b", Some(b"2"))], 0).unwrap();
        let before = std::fs::metadata(log.segment_path()).unwrap().len();
        OpenOptions::new().append(true).open(log.segment_path()).unwrap().write_all(&torn).unwrap();
        let mut cursor = Cursor::open(log.dir()).unwrap();
        assert_eq!(cursor.read_new().unwrap().len(), 2, "the torn frame is not read");
        assert!(cursor.read_new().unwrap().is_empty());
        // The next open (another handle: another process) cuts it, and says so in its log; the
        // handle that saw it first (the writer's, as if it lived on) appends in its place.
        let (_, said) = logged(|| TopicLog::open(&dir, "t").unwrap());
        assert_eq!(std::fs::metadata(log.segment_path()).unwrap().len(), before, "cut at open");
        let offsets = log.append(&[(b"c", Some(b"3"))], 0).unwrap();
        assert_eq!(offsets, vec![2]);
        assert!(
            said.contains("cutting a torn write") && said.contains(&format!("cut={}", torn.len())),
            "{said}"
        );
        let frames = cursor.read_new().unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].offset, frames[0].key.as_slice()), (2, &b"c"[..]));
        let mut whole = Cursor::open(log.dir()).unwrap();
        assert_eq!(whole.read_new().unwrap().len(), 3);
        assert!(std::fs::metadata(log.segment_path()).unwrap().len() > before);
    }
}

#[test]
fn a_record_too_large_is_refused_and_nothing_is_written() {
    let dir = scratch("large");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    let huge = vec![0u8; MAX_BODY];
    let err = log.append(&[(b"k", Some(&huge))], 0).unwrap_err();
    assert!(matches!(err, FileLogError::TooLarge { .. }), "{err}");
    assert_eq!(std::fs::metadata(log.segment_path()).unwrap().len(), 0);
    assert_eq!(log.append(&[(b"k", Some(b"v"))], 0).unwrap(), vec![0]);
}

#[test]
fn a_batch_with_a_record_too_large_writes_nothing_and_leaves_no_gap() {
    let dir = scratch("batch-large");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    let huge = vec![0u8; MAX_BODY];
    assert!(log.append(&[(b"a", Some(b"1")), (b"b", Some(&huge))], 0).is_err());
    assert_eq!(log.append(&[(b"c", Some(b"3"))], 0).unwrap(), vec![0], "no offset is skipped");
}

#[test]
fn damage_before_the_tail_is_an_error_and_is_never_cut() {
    let dir = scratch("damage");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    log.append(&[(b"a", Some(b"1")), (b"b", Some(b"2")), (b"c", Some(b"3"))], 0).unwrap();
    let path = log.segment_path().to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[PREFIX + FIXED] ^= 0xff; // the first frame's key
    std::fs::write(&path, &bytes).unwrap();
    let err = TopicLog::open(&dir, "t").err().expect("a damaged file is refused");
    assert!(matches!(err, FileLogError::Damaged { at: 0, .. }), "{err}");
    let err = Cursor::open(&dir.join("t")).unwrap().read_new().unwrap_err();
    assert!(matches!(err, FileLogError::Damaged { .. }), "{err}");
    // A handle that read past the damage before it happened only looks at what follows: a
    // torn tail there is cut as usual.
    OpenOptions::new().append(true).open(&path).unwrap().write_all(b"torn").unwrap();
    assert_eq!(log.append(&[(b"d", Some(b"4"))], 0).unwrap(), vec![3]);
    assert!(std::fs::metadata(&path).unwrap().len() as usize > len);
    // A whole frame with a bad checksum at the tail is damage too: no kill leaves one.
    let dir = scratch("checksum");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    log.append(&[(b"a", Some(b"1"))], 0).unwrap();
    let mut bad = Vec::new();
    Frame { offset: 1, timestamp_ms: 0, key: b"k".to_vec(), value: None }.encode(&mut bad).unwrap();
    bad[4] ^= 0xff;
    OpenOptions::new().append(true).open(log.segment_path()).unwrap().write_all(&bad).unwrap();
    let size = std::fs::metadata(log.segment_path()).unwrap().len();
    assert!(matches!(log.append(&[(b"b", None)], 0), Err(FileLogError::Damaged { .. })));
    assert_eq!(std::fs::metadata(log.segment_path()).unwrap().len(), size, "nothing cut");
    let mut cursor = Cursor::open(log.dir()).unwrap();
    assert_eq!(cursor.read_new().unwrap().len(), 1, "the frames before the damage first");
    assert!(matches!(cursor.read_new(), Err(FileLogError::Damaged { .. })));
    // A frame whose offset is not the next one is damage, wherever it is.
    let dir = scratch("sequence");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    log.append(&[(b"a", Some(b"1"))], 0).unwrap();
    let mut stray = Vec::new();
    Frame { offset: 7, timestamp_ms: 0, key: b"x".to_vec(), value: None }.encode(&mut stray).unwrap();
    OpenOptions::new().append(true).open(log.segment_path()).unwrap().write_all(&stray).unwrap();
    let err = TopicLog::open(&dir, "t").err().expect("refused");
    assert!(err.to_string().contains("offset 7 where offset 1"), "{err}");
}

#[test]
fn a_reader_reads_a_long_file_in_chunks() {
    let dir = scratch("chunks");
    let mut log = TopicLog::open_with(&dir, "t", u64::MAX).unwrap();
    let value = vec![b'v'; 100_000];
    for _ in 0..10 {
        let batch: Vec<(&[u8], Option<&[u8]>)> = (0..10).map(|_| (&b"k"[..], Some(&value[..]))).collect();
        log.append(&batch, 0).unwrap();
    }
    let mut cursor = Cursor::open(log.dir()).unwrap();
    let mut sizes = Vec::new();
    loop {
        let frames = cursor.read_new().unwrap();
        if frames.is_empty() {
            break;
        }
        sizes.push(frames.len());
    }
    assert!(sizes.len() >= 2, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 100);
    // A new appender reads the file before taking the lock, and goes on after it.
    assert_eq!(TopicLog::open(&dir, "t").unwrap().append(&[(b"z", None)], 0).unwrap(), vec![100]);
}

/// Reads everything a cursor has now, checking that offsets only increase.
fn drain(cursor: &mut Cursor, seen: &mut Vec<Frame>) {
    loop {
        let frames = cursor.read_new().unwrap();
        if frames.is_empty() {
            return;
        }
        for frame in frames {
            if let Some(last) = seen.last() {
                assert!(frame.offset > last.offset, "offset {} after {}", frame.offset, last.offset);
            }
            seen.push(frame);
        }
    }
}

/// The newest value of each key among `frames` (tombstones remove the key).
fn state(frames: &[Frame]) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
    let mut state = std::collections::BTreeMap::new();
    for frame in frames {
        match &frame.value {
            Some(value) => state.insert(frame.key.clone(), value.clone()),
            None => state.remove(&frame.key),
        };
    }
    state
}

#[test]
fn appends_start_new_segments_and_readers_follow_them_with_dense_offsets() {
    let dir = scratch("segments");
    let mut log = TopicLog::open_with(&dir, "t", 300).unwrap();
    let mut cursor = Cursor::open(log.dir()).unwrap();
    let mut seen = Vec::new();
    for i in 0..60 {
        let key = format!("k{i}");
        assert_eq!(log.append(&[(key.as_bytes(), Some(b"some value"))], i).unwrap(), vec![i]);
        if i % 7 == 0 {
            drain(&mut cursor, &mut seen);
        }
    }
    drain(&mut cursor, &mut seen);
    assert_eq!(seen.iter().map(|frame| frame.offset).collect::<Vec<_>>(), (0..60).collect::<Vec<_>>());
    assert!(segments(log.dir()).unwrap().len() > 5);
    // Another process's handle goes on in the last segment, after the last offset.
    let mut other = TopicLog::open_with(&dir, "t", 300).unwrap();
    assert_eq!(other.append(&[(b"z", None)], 0).unwrap(), vec![60]);
    assert_eq!(log.append(&[(b"y", None)], 0).unwrap(), vec![61], "a stale handle finds the last segment");
    let mut fresh = Vec::new();
    drain(&mut Cursor::at(log.dir(), 59).unwrap(), &mut fresh);
    assert_eq!(fresh.iter().map(|frame| frame.offset).collect::<Vec<_>>(), vec![59, 60, 61]);
}

#[test]
fn compaction_keeps_the_newest_record_per_key_at_its_offset_and_appends_go_on_meanwhile() {
    let dir = scratch("compact");
    let mut log = TopicLog::open_with(&dir, "t", 400).unwrap();
    let mut written = Vec::new();
    for round in 0..30i64 {
        for key in 0..5 {
            let key = format!("k{key}");
            let value = format!("v{round}");
            let offset = log.append(&[(key.as_bytes(), Some(value.as_bytes()))], 0).unwrap()[0];
            written.push(Frame {
                offset,
                timestamp_ms: 0,
                key: key.into_bytes(),
                value: Some(value.into_bytes()),
            });
        }
    }
    let before = segments(log.dir()).unwrap().len();
    assert!(before > 3);
    // An appender holds its lock: cleaning goes on regardless.
    let held = lock(&log.dir().join("append.lock"), FlockArg::LockExclusive).unwrap();
    let cleaned = clean(log.dir(), Cleanup::Compact { tombstones_ms: 1000 }, 0).unwrap().expect("cleaned");
    drop(held);
    assert_eq!(cleaned.segments, before - 1);
    assert_eq!(segments(log.dir()).unwrap().len(), 2, "one compacted segment, then the last");
    let mut seen = Vec::new();
    drain(&mut Cursor::open(log.dir()).unwrap(), &mut seen);
    assert!(seen.len() < written.len());
    assert_eq!(state(&seen), state(&written));
    for frame in &seen {
        assert!(written.contains(frame), "{frame:?} is a record as written, at its offset");
    }
    // Nothing to do with one segment before the last; appends go on from the same offset.
    assert_eq!(clean(log.dir(), Cleanup::Compact { tombstones_ms: 1000 }, 0).unwrap(), None);
    assert_eq!(log.append(&[(b"k0", None)], 0).unwrap(), vec![150]);
}

#[test]
fn tombstones_stay_for_their_retention_then_go_with_their_key() {
    // Retention runs from a tombstone's first compaction, as Kafka's from its first cleaning:
    // one written long ago (by its timestamp) still stays through its first compaction.
    let dir = scratch("tombstones");
    let mut log = TopicLog::open_with(&dir, "t", 100).unwrap();
    log.append(&[(b"gone", Some(b"1"))], 1_000).unwrap();
    log.append(&[(b"gone", None)], 2_000).unwrap();
    for i in 0..10 {
        log.append(&[(b"other", Some(format!("{i}").as_bytes()))], 2_000).unwrap();
    }
    let read = |dir: &Path| {
        let mut seen = Vec::new();
        drain(&mut Cursor::open(dir).unwrap(), &mut seen);
        seen
    };
    let first = 5_000_000;
    clean(log.dir(), Cleanup::Compact { tombstones_ms: 10_000 }, first).unwrap().expect("cleaned");
    let seen = read(log.dir());
    assert!(seen.iter().any(|frame| frame.key == b"gone" && frame.value.is_none()), "the tombstone stays");
    assert!(!seen.iter().any(|frame| frame.key == b"gone" && frame.value.is_some()));
    for i in 10..20 {
        log.append(&[(b"other", Some(format!("{i}").as_bytes()))], first + 5_000).unwrap();
    }
    clean(log.dir(), Cleanup::Compact { tombstones_ms: 10_000 }, first + 5_000).unwrap().expect("cleaned");
    assert!(read(log.dir()).iter().any(|frame| frame.key == b"gone"), "within its retention: stays");
    for i in 20..30 {
        log.append(&[(b"other", Some(format!("{i}").as_bytes()))], first + 20_000).unwrap();
    }
    clean(log.dir(), Cleanup::Compact { tombstones_ms: 10_000 }, first + 20_000).unwrap().expect("cleaned");
    assert!(!read(log.dir()).iter().any(|frame| frame.key == b"gone"), "the key is gone");
}

#[test]
fn readers_mid_way_through_compactions_and_crashes_between_rename_and_removal_miss_nothing() {
    // A pseudo-random interleaving of appends, readers at every position, compactions, and
    // compactions that stop after their rename (their inputs left behind, as a crash leaves
    // them): every reader ends with the topic's state, reading each offset once, in order.
    let mut seed: u64 = 0x5eed;
    let mut random = move |below: u64| {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (seed >> 33) % below
    };
    for case in 0..20 {
        let dir = scratch(&format!("interleave-{case}"));
        let mut log = TopicLog::open_with(&dir, "t", 200 + random(400)).unwrap();
        let topic = log.dir().to_owned();
        let mut written = Vec::new();
        let mut readers: Vec<(Cursor, Vec<Frame>)> = Vec::new();
        for step in 0..400 {
            match random(10) {
                0..=5 => {
                    let key = format!("k{}", random(8));
                    let value = (random(5) > 0).then(|| format!("v{step}").into_bytes());
                    let offset = log.append(&[(key.as_bytes(), value.as_deref())], 0).unwrap()[0];
                    written.push(Frame { offset, timestamp_ms: 0, key: key.into_bytes(), value });
                }
                6 => readers.push((Cursor::open(&topic).unwrap(), Vec::new())),
                7 => {
                    let index = random(readers.len() as u64 + 1) as usize;
                    if let Some((cursor, seen)) = readers.get_mut(index) {
                        // Part way: one call only.
                        seen.extend(cursor.read_new().unwrap());
                    }
                }
                8 => {
                    clean(&topic, Cleanup::Compact { tombstones_ms: i64::MAX }, 0).unwrap();
                }
                _ => {
                    // A compaction whose inputs after the first come back: the files a crash
                    // after the rename leaves.
                    let mut listed = segments(&topic).unwrap();
                    listed.pop();
                    let saved: Vec<(PathBuf, Vec<u8>)> = listed
                        .iter()
                        .skip(1)
                        .map(|(_, path)| (path.clone(), std::fs::read(path).unwrap()))
                        .collect();
                    clean(&topic, Cleanup::Compact { tombstones_ms: i64::MAX }, 0).unwrap();
                    for (path, bytes) in saved {
                        std::fs::write(path, bytes).unwrap();
                    }
                }
            }
        }
        readers.push((Cursor::open(&topic).unwrap(), Vec::new()));
        for (cursor, seen) in &mut readers {
            let mut rest = Vec::new();
            drain(cursor, &mut rest);
            seen.extend(rest);
            for pair in seen.windows(2) {
                assert!(pair[0].offset < pair[1].offset, "case {case}: offsets in order, once");
            }
            for frame in seen.iter() {
                assert!(written.contains(frame), "case {case}: {frame:?} as written");
            }
            assert_eq!(state(seen), state(&written), "case {case}");
        }
    }
}

#[test]
fn old_segments_of_a_delete_topic_go_and_a_reader_before_them_goes_on_at_the_first_left() {
    let dir = scratch("retention");
    let mut log = TopicLog::open_with(&dir, "t", 100).unwrap();
    for i in 0..20 {
        log.append(&[(b"line", Some(b"some output"))], i * 1_000).unwrap();
    }
    let cleaned =
        clean(log.dir(), Cleanup::Delete { retention_ms: 5_000 }, 20_000).unwrap().expect("cleaned");
    assert!(cleaned.segments > 0);
    let mut seen = Vec::new();
    drain(&mut Cursor::open(log.dir()).unwrap(), &mut seen);
    assert!(seen[0].offset > 0);
    assert!(seen.iter().all(|frame| 20_000 - frame.timestamp_ms <= 5_000 + 2_000), "{seen:?}");
    assert_eq!(seen.last().unwrap().offset, 19);
}

#[test]
fn a_reader_following_an_appender_across_many_new_segments_misses_no_record() {
    // The appender starts a new segment every few records while the reader reads: a record
    // written to a segment just before the next one appears is still read.
    let dir = scratch("follow");
    let topic = dir.join("t");
    TopicLog::open_with(&dir, "t", 4096).unwrap();
    let count = 5000;
    let writer = {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let mut log = TopicLog::open_with(&dir, "t", 4096).unwrap();
            for i in 0..count {
                log.append_with(&[(b"k", Some(&vec![b'v'; (i * 31) % 700]))], 0, false).unwrap();
            }
        })
    };
    let mut cursor = Cursor::open(&topic).unwrap();
    let mut seen = Vec::new();
    while seen.len() < count {
        let frames = cursor.read_new().unwrap();
        seen.extend(frames.into_iter().map(|frame| frame.offset));
        if writer.is_finished() && seen.len() < count {
            let rest = cursor.read_new().unwrap();
            assert!(!rest.is_empty() || seen.len() == count, "stuck at {} of {count}", seen.len());
            seen.extend(rest.into_iter().map(|frame| frame.offset));
        }
    }
    writer.join().unwrap();
    assert_eq!(seen, (0..count as i64).collect::<Vec<_>>());
}

#[test]
fn a_handle_whose_segment_was_closed_or_compacted_meanwhile_appends_at_the_end() {
    let dir = scratch("stale");
    let mut idle = TopicLog::open_with(&dir, "t", 300).unwrap();
    let mut busy = TopicLog::open_with(&dir, "t", 300).unwrap();
    assert_eq!(idle.append(&[(b"a", Some(b"first"))], 0).unwrap(), vec![0]);
    let mut later = TopicLog::open_with(&dir, "t", 300).unwrap();
    for i in 1..40 {
        assert_eq!(busy.append(&[(b"b", Some(b"some value"))], 0).unwrap(), vec![i]);
    }
    // `later`'s segment is closed (still there); `idle`'s is compacted away below.
    assert_eq!(later.append(&[(b"c", None)], 0).unwrap(), vec![40]);
    clean(&dir.join("t"), Cleanup::Compact { tombstones_ms: i64::MAX }, 0).unwrap().expect("cleaned");
    assert_eq!(idle.append(&[(b"a", Some(b"second"))], 0).unwrap(), vec![41]);
    assert_eq!(busy.append(&[(b"b", None)], 0).unwrap(), vec![42]);
    let mut seen = Vec::new();
    drain(&mut Cursor::open(&dir.join("t")).unwrap(), &mut seen);
    let tail: Vec<(i64, &[u8])> =
        seen.iter().rev().take(2).map(|frame| (frame.offset, frame.key.as_slice())).collect();
    assert_eq!(tail, vec![(42, &b"b"[..]), (41, &b"a"[..])]);
    assert_eq!(state(&seen).get(&b"a"[..]).map(Vec::as_slice), Some(&b"second"[..]));
}

#[test]
fn a_topic_deleted_and_recreated_under_its_reader_and_appender_is_an_error_not_a_silent_gap() {
    let dir = scratch("recreated");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    log.append(&[(b"a", Some(b"1")), (b"b", Some(b"2"))], 0).unwrap();
    let mut cursor = Cursor::open(log.dir()).unwrap();
    assert_eq!(cursor.read_new().unwrap().len(), 2);
    std::fs::remove_dir_all(log.dir()).unwrap();
    let mut fresh = TopicLog::open(&dir, "t").unwrap();
    assert_eq!(fresh.append(&[(b"c", Some(b"3"))], 0).unwrap(), vec![0]);
    let err = cursor.read_new().unwrap_err();
    assert!(matches!(err, FileLogError::Regressed { next: 2, .. }), "{err}");
    let err = log.append(&[(b"d", None)], 0).unwrap_err();
    assert!(err.to_string().contains("deleted or recreated"), "{err}");
}

#[test]
fn a_segment_removed_between_listing_and_opening_is_listed_again() {
    // As a cleaner does between a reader's listing and its open: `open_segment` says gone.
    let dir = scratch("gone");
    let mut log = TopicLog::open_with(&dir, "t", 100).unwrap();
    for _ in 0..10 {
        log.append(&[(b"k", Some(b"a value of some size"))], 0).unwrap();
    }
    let cursor = Cursor::open(log.dir()).unwrap();
    assert!(cursor.open_segment(3, &log.dir().join(segment_name(3))).unwrap().is_none());
    clean(log.dir(), Cleanup::Compact { tombstones_ms: 0 }, 0).unwrap().expect("cleaned");
    let mut seen = Vec::new();
    drain(&mut Cursor::open(log.dir()).unwrap(), &mut seen);
    assert_eq!(seen.last().unwrap().offset, 9);
}
