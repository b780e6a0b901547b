//! Where files are cut, pure: only the records decide (size, count, record-time window), so a
//! rerun over the same records cuts at the same offsets. An idle timeout or a shutdown publishes
//! the partial file; the chain stays consistent because every file starts where the previous
//! one's range ended.

use crate::format::Record;

/// Cut rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Raw bytes (keys, values, headers) per file.
    pub max_bytes: u64,
    /// Records per file.
    pub max_records: u64,
    /// Record-time window per file (ms): a record this much newer than the file's first one
    /// starts a new file.
    pub max_age_ms: Option<i64>,
}

/// The records of the file being filled.
#[derive(Debug, Default)]
pub struct Batch {
    /// Records, in offset order.
    pub records: Vec<Record>,
    bytes: u64,
    first_time: Option<i64>,
}

impl Batch {
    /// Whether `record` belongs to the current file (an empty file takes anything).
    pub fn fits(&self, record: &Record, limits: &Limits) -> bool {
        if self.records.is_empty() {
            return true;
        }
        if self.full(limits) {
            return false;
        }
        let bytes = self.bytes + record.raw_len() as u64;
        let old = match (self.first_time, record.timestamp, limits.max_age_ms) {
            (Some(first), Some(at), Some(window)) => at - first >= window,
            _ => false,
        };
        bytes <= limits.max_bytes && !old
    }

    /// Whether no record at all fits any more (count or size reached): the file can be published
    /// now rather than when the next record arrives, and the cut is the same.
    pub fn full(&self, limits: &Limits) -> bool {
        self.records.len() as u64 >= limits.max_records || self.bytes >= limits.max_bytes
    }

    /// Adds `record`.
    pub fn push(&mut self, record: Record) {
        if self.records.is_empty() {
            self.first_time = record.timestamp;
        }
        self.bytes += record.raw_len() as u64;
        self.records.push(record);
    }

    /// Takes the records out, leaving an empty batch.
    pub fn take(&mut self) -> Vec<Record> {
        self.bytes = 0;
        self.first_time = None;
        std::mem::take(&mut self.records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(offset: i64, len: usize, time: i64) -> Record {
        Record { offset, timestamp: Some(time), key: None, headers: vec![], value: Some(vec![b'x'; len]) }
    }

    /// Cuts a stream; returns the first offsets of the files.
    fn cuts(records: &[Record], limits: &Limits) -> Vec<i64> {
        let mut batch = Batch::default();
        let mut starts = Vec::new();
        for record in records {
            if !batch.fits(record, limits) {
                batch.take();
            }
            if batch.records.is_empty() {
                starts.push(record.offset);
            }
            batch.push(record.clone());
        }
        starts
    }

    #[test]
    fn size_count_and_time_cut_deterministically() {
        let records: Vec<Record> = (0..10).map(|o| record(o, 40, 1000 + o * 100)).collect();
        let by_size = Limits { max_bytes: 100, max_records: 1000, max_age_ms: None };
        assert_eq!(cuts(&records, &by_size), [0, 2, 4, 6, 8]);
        let by_count = Limits { max_bytes: u64::MAX, max_records: 3, max_age_ms: None };
        assert_eq!(cuts(&records, &by_count), [0, 3, 6, 9]);
        let by_time = Limits { max_bytes: u64::MAX, max_records: 1000, max_age_ms: Some(250) };
        assert_eq!(cuts(&records, &by_time), [0, 3, 6, 9]);
        // The same records cut the same way from the same start, whatever came before.
        assert_eq!(cuts(&records[4..], &by_size), [4, 6, 8]);
        // Full by count or size: nothing more fits, whatever comes.
        let mut batch = Batch::default();
        for record in &records[..3] {
            assert!(!batch.full(&by_count));
            batch.push(record.clone());
        }
        assert!(batch.full(&by_count) && !batch.fits(&records[3], &by_count));
        let mut batch = Batch::default();
        batch.push(record(0, 100, 0));
        assert!(batch.full(&by_size) && !batch.fits(&record(1, 0, 0), &by_size));
        // A record larger than the limit gets a file of its own.
        let big = [record(0, 10, 0), record(1, 500, 0), record(2, 10, 0)];
        assert_eq!(cuts(&big, &by_size), [0, 1, 2]);
    }
}
