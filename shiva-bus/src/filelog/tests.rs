use std::io::Write;

use super::*;

fn scratch(label: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shiva-filelog-{}-{label}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn appended_records_read_back_in_order_with_dense_offsets_and_tombstones() {
    let dir = scratch("roundtrip");
    let mut log = TopicLog::open(&dir, "control").unwrap();
    assert_eq!(log.append(&[(b"a", Some(b"1")), (b"b", Some(b""))], 7).unwrap(), vec![0, 1]);
    assert_eq!(log.append(&[(b"a", None)], 8).unwrap(), vec![2]);
    let mut cursor = Cursor::open(log.path()).unwrap();
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
    let frames = Cursor::open(&dir.join("t.log")).unwrap().read_new().unwrap();
    assert_eq!(frames.len(), 400);
    for (index, frame) in frames.iter().enumerate() {
        assert_eq!(frame.offset, index as i64);
        assert_eq!(acked[index], (frame.offset, String::from_utf8(frame.key.clone()).unwrap()));
    }
}

#[test]
fn a_torn_tail_is_not_read_and_the_next_append_cuts_it() {
    for torn in [vec![0x10, 0, 0], vec![40, 0, 0, 0, 1, 2, 3, 4, 5], {
        // A whole frame whose checksum does not check.
        let mut bytes = Vec::new();
        Frame { offset: 2, timestamp_ms: 0, key: b"k".to_vec(), value: None }.encode(&mut bytes).unwrap();
        bytes[4] ^= 0xff;
        bytes
    }] {
        let dir = scratch("torn");
        let mut log = TopicLog::open(&dir, "t").unwrap();
        log.append(&[(b"a", Some(b"1")), (b"b", Some(b"2"))], 0).unwrap();
        let before = std::fs::metadata(log.path()).unwrap().len();
        OpenOptions::new().append(true).open(log.path()).unwrap().write_all(&torn).unwrap();
        let mut cursor = Cursor::open(log.path()).unwrap();
        assert_eq!(cursor.read_new().unwrap().len(), 2, "the torn frame is not read");
        assert!(cursor.read_new().unwrap().is_empty());
        // The next appender (another handle: another process) cuts it and writes in its place.
        let mut other = TopicLog::open(&dir, "t").unwrap();
        assert_eq!(other.append(&[(b"c", Some(b"3"))], 0).unwrap(), vec![2]);
        let frames = cursor.read_new().unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!((frames[0].offset, frames[0].key.as_slice()), (2, &b"c"[..]));
        let mut whole = Cursor::open(log.path()).unwrap();
        assert_eq!(whole.read_new().unwrap().len(), 3);
        assert!(std::fs::metadata(log.path()).unwrap().len() > before);
    }
}

#[test]
fn a_record_too_large_is_refused_and_nothing_is_written() {
    let dir = scratch("large");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    let huge = vec![0u8; MAX_BODY];
    let err = log.append(&[(b"k", Some(&huge))], 0).unwrap_err();
    assert!(matches!(err, FileLogError::TooLarge { .. }), "{err}");
    assert_eq!(std::fs::metadata(log.path()).unwrap().len(), 0);
    assert_eq!(log.append(&[(b"k", Some(b"v"))], 0).unwrap(), vec![0]);
}
