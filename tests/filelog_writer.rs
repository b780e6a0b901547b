//! A file-bus appender for the crash tests (`tests/tests/filebus.rs`): appends records to one
//! topic of the file bus as fast as it can and prints `<offset> <key>` for each once it is
//! acknowledged (durable), until killed.
//!
//! usage: filelog-writer DIR TOPIC WRITER_ID

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, dir, topic, id] = args.as_slice() else {
        eprintln!("usage: filelog-writer DIR TOPIC WRITER_ID");
        std::process::exit(2);
    };
    let mut log =
        shiva_bus::filelog::TopicLog::open(std::path::Path::new(dir), topic).unwrap_or_else(|err| {
            eprintln!("filelog-writer: {err}");
            std::process::exit(1);
        });
    let stdout = std::io::stdout();
    for i in 0u64.. {
        // Records of 0 to ~20 KB, so that kills land mid-write too; some batches of two.
        let value = vec![b'v'; ((i * 7919) % 20_000) as usize];
        let (first, second) = (format!("{id}-{i}-a"), format!("{id}-{i}-b"));
        let batch: Vec<(&[u8], Option<&[u8]>)> = match i % 3 {
            0 => vec![(first.as_bytes(), Some(&value)), (second.as_bytes(), None)],
            _ => vec![(first.as_bytes(), Some(&value))],
        };
        let offsets = log.append(&batch, 0).unwrap_or_else(|err| {
            eprintln!("filelog-writer: {err}");
            std::process::exit(1);
        });
        let mut out = stdout.lock();
        let printed = offsets
            .iter()
            .zip(&batch)
            .try_for_each(|(offset, (key, _))| writeln!(out, "{offset} {}", String::from_utf8_lossy(key)))
            .and_then(|()| out.flush());
        if printed.is_err() {
            // Nobody reads the acknowledgements any more (the test is gone): stop.
            std::process::exit(0);
        }
    }
}
