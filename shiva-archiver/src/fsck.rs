//! `fsck`: proves each partition's files tile (every file starts where the previous one's range
//! ends: no gap, no overlap) and, with `--deep`, that every file decodes and matches its footer
//! (checksum, count, offsets inside its range). Reads footers from the sidecars, so the
//! structural check needs no decompression (and no key, once files are encrypted).

use crate::dest::Dest;
use crate::extract::{Range, select};
use crate::format::decode_file;
use crate::progress;

/// A problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Partition.
    pub partition: i32,
    /// What.
    pub what: String,
}

/// Per partition: files, records, first and next offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Partition.
    pub partition: i32,
    /// Files.
    pub files: usize,
    /// Records.
    pub records: u64,
    /// Range covered.
    pub range: Option<(i64, i64)>,
}

/// Checks `topic` in `dest`.
pub fn fsck(
    dest: &Dest,
    topic: &str,
    deep: bool,
    identities: &[Box<dyn age::Identity>],
) -> anyhow::Result<(Vec<Summary>, Vec<Problem>)> {
    let mut summaries = Vec::new();
    let mut problems = Vec::new();
    let partitions = select(dest, topic, &Range::default())?;
    let files = partitions.iter().map(|(_, entries)| entries.len() as u64).sum();
    let bar = progress::bar(files, "files");
    for (partition, entries) in partitions {
        let mut summary = Summary { partition, files: entries.len(), records: 0, range: None };
        let mut expected: Option<i64> = None;
        for entry in &entries {
            let footer = &entry.footer;
            let name = &entry.name;
            if footer.topic != topic || footer.partition != partition {
                problems.push(Problem {
                    partition,
                    what: format!("{name}: its footer says {}/{}", footer.topic, footer.partition),
                });
            }
            if footer.next_offset <= footer.first_offset || footer.last_offset >= footer.next_offset {
                problems.push(Problem { partition, what: format!("{name}: inconsistent footer {footer:?}") });
            }
            match expected {
                Some(next) if footer.first_offset > next => problems.push(Problem {
                    partition,
                    what: format!(
                        "gap: offsets {next}..{} are in no file (before {name})",
                        footer.first_offset - 1
                    ),
                }),
                Some(next) if footer.first_offset < next => problems.push(Problem {
                    partition,
                    what: format!(
                        "overlap: {name} starts at {} but the previous file ends at {next}",
                        footer.first_offset
                    ),
                }),
                _ => {}
            }
            if deep {
                match dest
                    .read(entry)
                    .and_then(|bytes| decode_file(&bytes, identities).map_err(anyhow::Error::from))
                {
                    Ok((inner, _)) if inner.public() != *footer => problems.push(Problem {
                        partition,
                        what: format!("{name}: its sidecar differs from its footer"),
                    }),
                    Ok(_) => {}
                    Err(err) => problems.push(Problem { partition, what: format!("{name}: {err:#}") }),
                }
            }
            bar.inc(1);
            summary.records += footer.count;
            summary.range = Some((summary.range.map_or(footer.first_offset, |r| r.0), footer.next_offset));
            expected = Some(footer.next_offset);
        }
        summaries.push(summary);
    }
    bar.finish_and_clear();
    Ok((summaries, problems))
}
