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
    // What a kill leaves: part of a prefix, a frame cut short; what a power cut may: zeros.
    for torn in [vec![0x10, 0, 0], vec![40, 0, 0, 0, 1, 2, 3, 4, 5], vec![0; 100]] {
        let dir = scratch("torn");
        let mut log = TopicLog::open(&dir, "t").unwrap();
        log.append(&[(b"a", Some(b"1")), (b"b", Some(b"2"))], 0).unwrap();
        let before = std::fs::metadata(log.path()).unwrap().len();
        OpenOptions::new().append(true).open(log.path()).unwrap().write_all(&torn).unwrap();
        let mut cursor = Cursor::open(log.path()).unwrap();
        assert_eq!(cursor.read_new().unwrap().len(), 2, "the torn frame is not read");
        assert!(cursor.read_new().unwrap().is_empty());
        // The next appender (another handle: another process) cuts it and writes in its place,
        // and says so in its log.
        let mut other = TopicLog::open(&dir, "t").unwrap();
        let (offsets, said) = logged(|| other.append(&[(b"c", Some(b"3"))], 0).unwrap());
        assert_eq!(offsets, vec![2]);
        assert!(
            said.contains("cutting a torn write") && said.contains(&format!("cut={}", torn.len())),
            "{said}"
        );
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
    let path = log.path().to_owned();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    bytes[PREFIX + FIXED] ^= 0xff; // the first frame's key
    std::fs::write(&path, &bytes).unwrap();
    let err = TopicLog::open(&dir, "t").err().expect("a damaged file is refused");
    assert!(matches!(err, FileLogError::Damaged { at: 0, .. }), "{err}");
    let err = Cursor::open(&path).unwrap().read_new().unwrap_err();
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
    OpenOptions::new().append(true).open(log.path()).unwrap().write_all(&bad).unwrap();
    let size = std::fs::metadata(log.path()).unwrap().len();
    assert!(matches!(log.append(&[(b"b", None)], 0), Err(FileLogError::Damaged { .. })));
    assert_eq!(std::fs::metadata(log.path()).unwrap().len(), size, "nothing cut");
    let mut cursor = Cursor::open(log.path()).unwrap();
    assert_eq!(cursor.read_new().unwrap().len(), 1, "the frames before the damage first");
    assert!(matches!(cursor.read_new(), Err(FileLogError::Damaged { .. })));
    // A frame whose offset is not the next one is damage, wherever it is.
    let dir = scratch("sequence");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    log.append(&[(b"a", Some(b"1"))], 0).unwrap();
    let mut stray = Vec::new();
    Frame { offset: 7, timestamp_ms: 0, key: b"x".to_vec(), value: None }.encode(&mut stray).unwrap();
    OpenOptions::new().append(true).open(log.path()).unwrap().write_all(&stray).unwrap();
    let err = TopicLog::open(&dir, "t").err().expect("refused");
    assert!(err.to_string().contains("offset 7 where offset 1"), "{err}");
}

#[test]
fn a_reader_reads_a_long_file_in_chunks() {
    let dir = scratch("chunks");
    let mut log = TopicLog::open(&dir, "t").unwrap();
    let value = vec![b'v'; 100_000];
    for _ in 0..10 {
        let batch: Vec<(&[u8], Option<&[u8]>)> = (0..10).map(|_| (&b"k"[..], Some(&value[..]))).collect();
        log.append(&batch, 0).unwrap();
    }
    let mut cursor = Cursor::open(log.path()).unwrap();
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
