//! Where archives live: a filesystem (`file:///dir`) or an S3-compatible object store
//! (`s3://bucket/prefix`). Both publish create-if-absent and keep each file's public footer
//! where `run` and a structural `fsck` read it without decompressing or decrypting.
//!
//! Layout (both): `<root>/<topic>/<partition>/<first offset, 20 digits>.zst` (`.gz` with gzip).

mod file;
mod s3;

use std::time::SystemTime;

pub use file::{FileDest, META_XATTR};
pub use s3::{S3Dest, S3Options};

use crate::format::{Codec, Encoded, Footer};

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// This writer's file is now the archive's.
    Written(Footer),
    /// Another writer had published a file with the same first offset: its footer.
    Adopted(Footer),
}

/// One archived file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its path, or its `s3://bucket/key` URL.
    pub name: String,
    /// Its (public) footer.
    pub footer: Footer,
    /// When it was written, where the store says.
    pub modified: Option<SystemTime>,
}

/// An archive destination.
#[derive(Debug)]
pub enum Dest {
    /// A directory.
    File(FileDest),
    /// A bucket and prefix.
    S3(S3Dest),
}

/// The file name of the file starting at `first` (the last part of its path or key).
pub fn file_name(first: i64, compression: &str) -> String {
    format!("{first:020}.{}", Codec::extension(compression))
}

/// The compression a file name says, if it names an archive file.
pub fn compression_of(name: &str) -> Option<&'static str> {
    if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    }
}

impl Dest {
    /// Parses `--dest`: `file:///dir` or `s3://bucket[/prefix]`.
    pub fn from_url(url: &str, s3: &S3Options) -> anyhow::Result<Dest> {
        if url.starts_with("s3://") {
            Ok(Dest::S3(S3Dest::from_url(url, s3)?))
        } else if url.starts_with("file://") {
            Ok(Dest::File(FileDest::from_url(url)?))
        } else {
            anyhow::bail!("--dest '{url}': expected file:///absolute/dir or s3://bucket/prefix")
        }
    }

    /// The largest file the destination takes in one piece, if it has a limit.
    pub fn max_file_bytes(&self) -> Option<u64> {
        match self {
            Dest::File(_) => None,
            Dest::S3(_) => Some(s3::MAX_OBJECT_BYTES),
        }
    }

    /// Creates what is needed (directories) and removes what dead writers left (staging files).
    pub fn prepare(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<()> {
        match self {
            Dest::File(d) => d.prepare(topic, partitions),
            Dest::S3(d) => d.prepare(topic),
        }
    }

    /// The compressions of a partition's files (an archive keeps one).
    pub fn compressions(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<String>> {
        match self {
            Dest::File(d) => Ok(d.compressions(topic, partition)),
            Dest::S3(d) => d.compressions(topic, partition),
        }
    }

    /// Publishes a finished file under its first offset, create-if-absent.
    pub fn publish(&self, encoded: &Encoded) -> anyhow::Result<Published> {
        match self {
            Dest::File(d) => d.publish(encoded),
            Dest::S3(d) => d.publish(encoded),
        }
    }

    /// The files of a partition, by first offset.
    pub fn list(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<Entry>> {
        match self {
            Dest::File(d) => d.list(topic, partition),
            Dest::S3(d) => d.list(topic, partition),
        }
    }

    /// The partitions archived under `topic`.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        match self {
            Dest::File(d) => d.partitions(topic),
            Dest::S3(d) => d.partitions(topic),
        }
    }

    /// The bytes of an archived file.
    pub fn read(&self, entry: &Entry) -> anyhow::Result<Vec<u8>> {
        match self {
            Dest::File(d) => d.read(entry),
            Dest::S3(d) => d.read(entry),
        }
    }

    /// Deletes an archived file.
    pub fn remove(&self, entry: &Entry) -> anyhow::Result<()> {
        match self {
            Dest::File(d) => d.remove(entry),
            Dest::S3(d) => d.remove(entry),
        }
    }

    /// The newest file's footer of a partition (where resuming starts).
    pub fn newest(&self, topic: &str, partition: i32) -> anyhow::Result<Option<Footer>> {
        match self {
            Dest::File(d) => d.newest(topic, partition),
            Dest::S3(d) => d.newest(topic, partition),
        }
    }
}
