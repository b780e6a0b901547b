//! `housekeep`: deletes whole files whose newest record is older than a retention, but always
//! keeps the newest file of each partition (resuming starts from it). Meant to run as a periodic
//! Shiva task (see `docs/archiver.md`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::dest::Dest;
use crate::extract::{Range, select};

/// What housekeeping did (or would do, with `dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Swept {
    /// Files deleted.
    pub files: usize,
    /// Records in them.
    pub records: u64,
    /// Their paths.
    pub paths: Vec<String>,
}

/// Deletes the files of `topic` whose records are all older than `older_than` before `now`.
pub fn housekeep(
    dest: &Dest,
    topic: &str,
    older_than: Duration,
    now: SystemTime,
    dry_run: bool,
) -> anyhow::Result<Swept> {
    let cutoff =
        now.duration_since(UNIX_EPOCH).unwrap_or_default().saturating_sub(older_than).as_millis() as i64;
    let mut swept = Swept::default();
    for (_, entries) in select(dest, topic, &Range::default())? {
        // The newest file always stays.
        for entry in entries.iter().rev().skip(1) {
            let newest_record = entry
                .footer
                .max_time
                .or_else(|| Some(entry.modified?.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64));
            if newest_record.is_none_or(|at| at >= cutoff) {
                continue;
            }
            if !dry_run {
                dest.remove(entry)?;
            }
            swept.files += 1;
            swept.records += entry.footer.count;
            swept.paths.push(entry.name.clone());
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Record, encode_file};

    #[test]
    fn old_files_go_the_newest_of_each_partition_stays() {
        let root = std::env::temp_dir().join(format!("shiva-archiver-housekeep-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dest = Dest::from_url(&format!("file://{}", root.display()), &Default::default()).unwrap();
        dest.prepare("t", &[0, 1]).unwrap();
        let day = 86_400_000i64;
        let file = |partition, start: i64, time: i64| {
            let records: Vec<Record> = (start..start + 10)
                .map(|o| Record {
                    offset: o,
                    timestamp: Some(time),
                    key: None,
                    headers: vec![],
                    value: Some(b"v".to_vec()),
                })
                .collect();
            dest.publish(&encode_file(
                "t",
                partition,
                start,
                &records,
                start + 10,
                crate::format::Codec::Zstd(1),
                &[],
            ))
            .unwrap();
        };
        let now = UNIX_EPOCH + Duration::from_millis(100 * day as u64);
        file(0, 0, 10 * day);
        file(0, 10, 20 * day);
        file(0, 20, 99 * day);
        // Partition 1 holds only old files: its newest stays anyway.
        file(1, 0, 10 * day);
        file(1, 10, 11 * day);
        let thirty_days = Duration::from_millis(30 * day as u64);
        let dry = housekeep(&dest, "t", thirty_days, now, true).unwrap();
        assert_eq!((dry.files, dry.records), (3, 30));
        assert_eq!(dest.list("t", 0).unwrap().len(), 3, "a dry run deletes nothing");
        let swept = housekeep(&dest, "t", thirty_days, now, false).unwrap();
        assert_eq!(swept.files, 3);
        let left = |p| dest.list("t", p).unwrap().iter().map(|e| e.footer.first_offset).collect::<Vec<_>>();
        assert_eq!((left(0), left(1)), (vec![20], vec![10]));
        assert_eq!(dest.newest("t", 0).unwrap().unwrap().next_offset, 30, "resuming is unaffected");
        let _ = std::fs::remove_dir_all(&root);
    }
}
