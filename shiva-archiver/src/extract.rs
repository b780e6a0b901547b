//! `extract`: the records of an offset or time range, read back from the archive: to a writer
//! (raw values or JSON envelopes, one per line) or, through [`crate::kafka::Sink`], to a topic.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;

use crate::dest::{Dest, Entry};
use crate::format::{Record, decode_file};
use crate::progress;

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

    /// Whether a file may hold records of the range (by its footer).
    fn may_hold(&self, entry: &Entry) -> bool {
        let footer = &entry.footer;
        !(self.from_offset.is_some_and(|from| footer.next_offset <= from)
            || self.to_offset.is_some_and(|to| footer.first_offset >= to)
            || self.from_time.is_some_and(|from| footer.max_time.is_some_and(|max| max < from))
            || self.to_time.is_some_and(|to| footer.min_time.is_some_and(|min| min >= to)))
    }
}

/// The files of `range`, per partition, in offset order (a default range: the whole archive),
/// with a spinner while the archive is listed.
pub fn select(dest: &Dest, topic: &str, range: &Range) -> anyhow::Result<Vec<(i32, Vec<Entry>)>> {
    let partitions =
        if range.partitions.is_empty() { dest.partitions(topic)? } else { range.partitions.clone() };
    let listing = progress::spinner("listing the archive");
    let mut selected = Vec::new();
    for partition in partitions {
        listing.set_message(format!("listing partition {partition}"));
        let entries: Vec<Entry> =
            dest.list(topic, partition)?.into_iter().filter(|entry| range.may_hold(entry)).collect();
        selected.push((partition, entries));
    }
    listing.finish_and_clear();
    Ok(selected)
}

/// Calls `each` with every record of `range` in the `selected` files (from [`select`]),
/// partition by partition, in offset order; returns how many.
pub fn extract(
    dest: &Dest,
    selected: Vec<(i32, Vec<Entry>)>,
    range: &Range,
    identities: &[Box<dyn age::Identity>],
    each: &mut dyn FnMut(i32, &Record) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    let total: u64 = selected.iter().flat_map(|(_, entries)| entries).map(|e| e.footer.count).sum();
    let bar = progress::bar(total, "records");
    let mut written = 0;
    for (partition, entries) in selected {
        for entry in entries {
            bar.set_message(format!("partition {partition}"));
            let bytes = dest.read(&entry)?;
            let (_, records) =
                decode_file(&bytes, identities).map_err(|err| anyhow::anyhow!("{}: {err}", entry.name))?;
            for record in records.iter().filter(|record| range.wants(record)) {
                each(partition, record)?;
                written += 1;
            }
            bar.inc(entry.footer.count);
        }
    }
    bar.finish_and_clear();
    Ok(written)
}

/// Writes a record's raw value and a newline.
pub fn write_value(out: &mut dyn Write, record: &Record) -> std::io::Result<()> {
    out.write_all(record.value.as_deref().unwrap_or_default())?;
    out.write_all(b"\n")
}

/// Writes a record's JSON envelope (topic, partition, offset, timestamp, key, headers, value;
/// bytes that are not UTF-8 as `{"base64": …}`) and a newline.
pub fn write_jsonl(out: &mut dyn Write, topic: &str, partition: i32, record: &Record) -> std::io::Result<()> {
    let text = |bytes: &Option<Vec<u8>>| -> serde_json::Value {
        match bytes {
            None => serde_json::Value::Null,
            Some(b) => match std::str::from_utf8(b) {
                Ok(text) => json!(text),
                Err(_) => json!({ "base64": B64.encode(b) }),
            },
        }
    };
    let headers: Vec<serde_json::Value> = record.headers.iter().map(|(k, v)| json!([k, text(v)])).collect();
    let line = json!({
        "topic": topic, "partition": partition, "offset": record.offset,
        "timestamp": record.timestamp, "key": text(&record.key),
        "headers": headers, "value": text(&record.value),
    });
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}
