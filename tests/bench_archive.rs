//! The archiving pipeline alone, on one thread: records already in memory → cut → encode →
//! zstd → publish (write, fsync, link, fsync) to a local directory. No Kafka.

use std::time::Instant;

use shiva_archiver::cut::{Batch, Limits};
use shiva_archiver::dest::FileDest;
use shiva_archiver::format::{Codec, Record, encode_file};

/// Synthetic access-log lines, about 135 bytes each, varied enough not to compress trivially.
fn records(count: usize) -> Vec<Record> {
    let paths =
        ["/api/v1/orders", "/api/v1/users/42/profile", "/static/app.js", "/health", "/api/v2/search?q=shiva"];
    let agents = [
        "curl/8.5.0",
        "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
        "okhttp/4.12.0",
    ];
    let mut state = 0x2545F4914F6CDD1Du64;
    (0..count)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let line = format!(
                "10.{}.{}.{} - - [01/Dec/2026:15:{:02}:{:02} +0000] \"GET {} HTTP/1.1\" {} {} \"-\" \"{}\" rt={}.{:03}",
                state % 256,
                (state >> 8) % 256,
                (state >> 16) % 256,
                (i / 60) % 60,
                i % 60,
                paths[(state >> 24) as usize % paths.len()],
                [200, 200, 200, 304, 404, 500][(state >> 32) as usize % 6],
                (state >> 40) % 100_000,
                agents[(state >> 48) as usize % agents.len()],
                (state >> 52) % 3,
                (state >> 20) % 1000
            );
            Record {
                offset: i as i64,
                timestamp: Some(1_796_000_000_000 + i as i64),
                key: None,
                headers: vec![],
                value: Some(line.into_bytes()),
            }
        })
        .collect()
}

/// (raw MB/s, records/s, compression ratio) for `count` records with `codec`, encrypted to one
/// fresh age recipient when `encrypt`.
pub fn pipeline(dir: &std::path::Path, count: usize, codec: Codec, encrypt: bool) -> (f64, f64, f64) {
    let recipients: Vec<age::x25519::Recipient> =
        if encrypt { vec![age::x25519::Identity::generate().to_public()] } else { Vec::new() };
    let input = records(count);
    let dest = FileDest::from_url(&format!("file://{}", dir.display())).unwrap();
    dest.prepare("bench", &[0]).unwrap();
    let limits = Limits { max_bytes: 64 << 20, max_records: u64::MAX, max_age_ms: None };
    let started = Instant::now();
    let (mut raw, mut written) = (0u64, 0u64);
    let mut batch = Batch::default();
    let mut start = 0;
    let mut publish = |records: Vec<Record>, next: i64, start: &mut i64| {
        let encoded = encode_file("bench", 0, *start, &records, next, codec, &recipients);
        written += encoded.bytes.len() as u64;
        dest.publish(&encoded).unwrap();
        *start = next;
    };
    for record in input {
        raw += record.raw_len() as u64;
        if !batch.fits(&record, &limits) {
            publish(batch.take(), record.offset, &mut start);
        }
        batch.push(record);
    }
    let next = count as i64;
    publish(batch.take(), next, &mut start);
    let seconds = started.elapsed().as_secs_f64();
    (raw as f64 / seconds / 1e6, count as f64 / seconds, raw as f64 / written as f64)
}
