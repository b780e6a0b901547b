//! `extract`: the records of an offset or time range, read back from the archive, to stdout.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use crate::dest::FileDest;
use crate::format::{Record, decode_file};

/// What to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One raw value per line.
    Values,
    /// One JSON envelope per line (topic, partition, offset, timestamp, key, headers, value).
    Jsonl,
}

/// Which records.
#[derive(Debug, Clone, Default)]
pub struct Range {
    /// Partitions (all when empty).
    pub partitions: Vec<i32>,
    /// From this offset.
    pub from_offset: Option<i64>,
    /// Before this offset.
    pub to_offset: Option<i64>,
    /// From this time (ms).
    pub from_time: Option<i64>,
    /// Before this time (ms).
    pub to_time: Option<i64>,
}

impl Range {
    fn wants(&self, record: &Record) -> bool {
        let time = record.timestamp;
        self.from_offset.is_none_or(|from| record.offset >= from)
            && self.to_offset.is_none_or(|to| record.offset < to)
            && self.from_time.is_none_or(|from| time.is_some_and(|t| t >= from))
            && self.to_time.is_none_or(|to| time.is_some_and(|t| t < to))
    }
}

/// Streams the records of `range` to `out`; returns how many.
pub fn extract(
    dest: &FileDest,
    topic: &str,
    range: &Range,
    output: Output,
    identities: &[Box<dyn age::Identity>],
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let partitions =
        if range.partitions.is_empty() { dest.partitions(topic)? } else { range.partitions.clone() };
    let mut written = 0;
    for partition in partitions {
        for entry in dest.list(topic, partition)? {
            let footer = &entry.footer;
            let outside = range.from_offset.is_some_and(|from| footer.next_offset <= from)
                || range.to_offset.is_some_and(|to| footer.first_offset >= to)
                || range.from_time.is_some_and(|from| footer.max_time.is_some_and(|max| max < from))
                || range.to_time.is_some_and(|to| footer.min_time.is_some_and(|min| min >= to));
            if outside {
                continue;
            }
            let bytes = std::fs::read(&entry.path)?;
            let (_, records) = decode_file(&bytes, identities)
                .map_err(|err| anyhow::anyhow!("{}: {err}", entry.path.display()))?;
            for record in records.iter().filter(|record| range.wants(record)) {
                match output {
                    Output::Values => {
                        out.write_all(record.value.as_deref().unwrap_or_default())?;
                        out.write_all(b"\n")?;
                    }
                    Output::Jsonl => {
                        let text = |bytes: &Option<Vec<u8>>| -> serde_json::Value {
                            match bytes {
                                None => serde_json::Value::Null,
                                Some(b) => match std::str::from_utf8(b) {
                                    Ok(text) => json!(text),
                                    Err(_) => json!({ "base64": B64.encode(b) }),
                                },
                            }
                        };
                        let headers: Vec<serde_json::Value> =
                            record.headers.iter().map(|(k, v)| json!([k, text(v)])).collect();
                        let line = json!({
                            "topic": topic, "partition": partition, "offset": record.offset,
                            "timestamp": record.timestamp, "key": text(&record.key),
                            "headers": headers, "value": text(&record.value),
                        });
                        serde_json::to_writer(&mut *out, &line)?;
                        out.write_all(b"\n")?;
                    }
                }
                written += 1;
            }
        }
    }
    out.flush()?;
    Ok(written)
}
