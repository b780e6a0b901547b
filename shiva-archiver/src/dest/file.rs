//! The archive on a local (or mounted) filesystem: `file:///dir`.
//!
//! Layout: `<dir>/<topic>/<partition>/<first offset, 20 digits>.zst` (`.gz` with gzip), and beside each file its
//! non-secret footer fields as `<same name>.meta.json` (so `run` and `fsck` need not decompress).
//!
//! Publishing is create-if-absent: the file is written and fsynced under `<dir>/.staging/`, then
//! hard-linked to its final name (a link never replaces an existing name), then the directory is
//! fsynced. "Already exists" means another writer published that range first: its footer is
//! adopted. The sidecar is published the same way, after the file, so a sidecar always
//! describes the file beside it; a file without one (a crash in between) is read instead.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};

use super::{Entry, Published, compression_of, file_name};
use crate::format::{Encoded, Footer, read_footer};

/// The extended attribute holding a file's public footer.
pub const META_XATTR: &str = "user.shiva.footer";

/// Staging files older than this belong to a writer that died: removed at start.
const STALE_STAGING: Duration = Duration::from_secs(600);

/// A filesystem archive.
#[derive(Debug, Clone)]
pub struct FileDest {
    root: PathBuf,
}

impl FileDest {
    /// Parses `file:///dir`.
    pub fn from_url(url: &str) -> anyhow::Result<FileDest> {
        let Some(path) = url.strip_prefix("file://") else {
            bail!("--dest '{url}': expected file:///absolute/dir or s3://bucket/prefix");
        };
        if !path.starts_with('/') {
            bail!("--dest '{url}': the directory must be absolute (file:///dir)");
        }
        Ok(FileDest { root: PathBuf::from(path) })
    }

    fn partition_dir(&self, topic: &str, partition: i32) -> PathBuf {
        self.root.join(topic).join(partition.to_string())
    }

    /// The final path of the file starting at `first`, compressed with `compression`.
    pub fn path(&self, topic: &str, partition: i32, first: i64, compression: &str) -> PathBuf {
        self.partition_dir(topic, partition).join(file_name(first, compression))
    }

    /// Whether `path` names an archive file.
    fn is_archive(path: &Path) -> bool {
        path.file_name().and_then(|name| name.to_str()).and_then(compression_of).is_some()
    }

    /// The compressions of a partition's files (an archive keeps one).
    pub fn compressions(&self, topic: &str, partition: i32) -> Vec<String> {
        let Ok(listing) = fs::read_dir(self.partition_dir(topic, partition)) else { return Vec::new() };
        let mut found: Vec<String> = listing
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(compression_of).map(str::to_owned))
            .collect();
        found.sort();
        found.dedup();
        found
    }

    fn sidecar(path: &Path) -> PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".meta.json");
        PathBuf::from(name)
    }

    /// Creates the directories and removes staging files left by dead writers.
    pub fn prepare(&self, topic: &str, partitions: &[i32]) -> anyhow::Result<()> {
        let staging = self.root.join(".staging");
        fs::create_dir_all(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        for partition in partitions {
            let dir = self.partition_dir(topic, *partition);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        for entry in fs::read_dir(&staging)?.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|at| SystemTime::now().duration_since(at).unwrap_or_default() > STALE_STAGING);
            if old {
                tracing::info!(file = %entry.path().display(), "removing an abandoned staging file");
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Publishes `file` under its first offset, create-if-absent.
    pub fn publish(&self, encoded: &Encoded) -> anyhow::Result<Published> {
        let footer = &encoded.footer;
        let path = self.path(&footer.topic, footer.partition, footer.first_offset, &footer.compression);
        let dir = path.parent().expect("a partition directory");
        // The non-secret footer fields ride on the file itself (an extended attribute set before
        // the link), so they appear with it atomically; the sidecar follows.
        let meta = serde_json::to_vec_pretty(&footer.public())?;
        let created = self.link_new(&encoded.bytes, &path, Some(&meta))?;
        sync_dir(dir)?;
        if !created {
            let existing = self.footer(&path)?;
            return Ok(Published::Adopted(existing));
        }
        self.link_new(&meta, &Self::sidecar(&path), None)?;
        sync_dir(dir)?;
        Ok(Published::Written(footer.clone()))
    }

    /// Writes `bytes` to a staging file (with `meta` as its [`META_XATTR`] where the filesystem
    /// allows), fsyncs it, links it to `path` unless `path` exists. True when this call created
    /// `path`.
    fn link_new(&self, bytes: &[u8], path: &Path, meta: Option<&[u8]>) -> anyhow::Result<bool> {
        let staging =
            self.root.join(".staging").join(format!("{}-{}", std::process::id(), uuid::Uuid::new_v4()));
        let mut file =
            File::create(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
        file.write_all(bytes).with_context(|| format!("cannot write {}", staging.display()))?;
        if let Some(meta) = meta {
            // Optional: a filesystem without user xattrs keeps the sidecar only.
            let _ = xattr::set(&staging, META_XATTR, meta);
        }
        file.sync_all().with_context(|| format!("cannot fsync {}", staging.display()))?;
        drop(file);
        let linked = fs::hard_link(&staging, path);
        let _ = fs::remove_file(&staging);
        match linked {
            Ok(()) => Ok(true),
            Err(err) if err.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(err) => Err(err).with_context(|| format!("cannot publish {}", path.display())),
        }
    }

    /// The (public) footer of an archived file: its sidecar, else its extended attribute, else
    /// read from the file (unencrypted files only), and the sidecar written again.
    pub fn footer(&self, path: &Path) -> anyhow::Result<Footer> {
        let sidecar = Self::sidecar(path);
        if let Ok(bytes) = fs::read(&sidecar)
            && let Ok(footer) = serde_json::from_slice::<Footer>(&bytes)
        {
            return Ok(footer);
        }
        let footer = match xattr::get(path, META_XATTR)
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<Footer>(&b).ok())
        {
            Some(footer) => footer,
            None => {
                let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
                read_footer(&bytes, &[]).with_context(|| format!("{}", path.display()))?.public()
            }
        };
        if let Ok(meta) = serde_json::to_vec_pretty(&footer) {
            let _ = self.link_new(&meta, &sidecar, None);
        }
        Ok(footer)
    }

    /// The files of a partition, by first offset.
    pub fn list(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<Entry>> {
        let dir = self.partition_dir(topic, partition);
        let mut entries = Vec::new();
        let Ok(listing) = fs::read_dir(&dir) else { return Ok(entries) };
        let mut paths: Vec<PathBuf> =
            listing.flatten().map(|e| e.path()).filter(|p| Self::is_archive(p)).collect();
        paths.sort();
        for path in paths {
            let footer = self.footer(&path)?;
            let modified = fs::metadata(&path).and_then(|m| m.modified()).ok();
            entries.push(Entry { name: path.display().to_string(), footer, modified });
        }
        Ok(entries)
    }

    /// Partitions with a directory under `topic`.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let dir = self.root.join(topic);
        let listing = fs::read_dir(&dir)
            .with_context(|| format!("no archive of '{topic}' in {}", self.root.display()))?;
        let mut partitions: Vec<i32> =
            listing.flatten().filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok())).collect();
        partitions.sort();
        Ok(partitions)
    }

    /// The bytes of an archived file.
    pub fn read(&self, entry: &Entry) -> anyhow::Result<Vec<u8>> {
        fs::read(&entry.name).with_context(|| format!("cannot read {}", entry.name))
    }

    /// Deletes an archived file, then its sidecar, and syncs the directory.
    pub fn remove(&self, entry: &Entry) -> anyhow::Result<()> {
        let path = Path::new(&entry.name);
        fs::remove_file(path).with_context(|| format!("cannot delete {}", path.display()))?;
        let _ = fs::remove_file(Self::sidecar(path));
        if let Some(dir) = path.parent() {
            sync_dir(dir)?;
        }
        Ok(())
    }

    /// The newest file's footer of a partition (where resuming starts).
    pub fn newest(&self, topic: &str, partition: i32) -> anyhow::Result<Option<Footer>> {
        let dir = self.partition_dir(topic, partition);
        let Ok(listing) = fs::read_dir(&dir) else { return Ok(None) };
        let newest = listing.flatten().map(|e| e.path()).filter(|p| Self::is_archive(p)).max();
        newest.map(|path| self.footer(&path)).transpose()
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{Codec, Record, encode_file};

    fn records(from: i64, to: i64) -> Vec<Record> {
        (from..to)
            .map(|o| Record {
                offset: o,
                timestamp: Some(o),
                key: None,
                headers: vec![],
                value: Some(b"v".to_vec()),
            })
            .collect()
    }

    #[test]
    fn publish_is_create_if_absent_and_the_loser_adopts_the_winner() {
        let root = std::env::temp_dir().join(format!("shiva-archiver-dest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let dest = FileDest::from_url(&format!("file://{}", root.display())).unwrap();
        dest.prepare("t", &[0]).unwrap();
        let a = encode_file("t", 0, 0, &records(0, 10), 10, Codec::Zstd(1), &[]);
        let b = encode_file("t", 0, 0, &records(0, 5), 5, Codec::Zstd(1), &[]);
        assert_eq!(dest.publish(&a).unwrap(), Published::Written(a.footer.clone()));
        assert_eq!(dest.publish(&b).unwrap(), Published::Adopted(a.footer.clone()), "a zombie adopts");
        let c = encode_file("t", 0, 10, &records(10, 20), 20, Codec::Zstd(1), &[]);
        dest.publish(&c).unwrap();
        let listed = dest.list("t", 0).unwrap();
        assert_eq!(listed.iter().map(|e| e.footer.first_offset).collect::<Vec<_>>(), [0, 10]);
        assert_eq!(dest.newest("t", 0).unwrap().unwrap().next_offset, 20);
        // A missing sidecar is rebuilt (from the extended attribute, else from the file).
        fs::remove_file(FileDest::sidecar(Path::new(&listed[1].name))).unwrap();
        assert_eq!(dest.footer(Path::new(&listed[1].name)).unwrap(), c.footer);
        fs::remove_file(FileDest::sidecar(Path::new(&listed[1].name))).unwrap();
        let _ = xattr::remove(&listed[1].name, META_XATTR);
        assert_eq!(dest.footer(Path::new(&listed[1].name)).unwrap(), c.footer);
        // An encrypted file's footer is known without the key.
        let key = age::x25519::Identity::generate();
        let d = encode_file("t", 0, 20, &records(20, 30), 30, Codec::Zstd(1), &[key.to_public()]);
        dest.publish(&d).unwrap();
        let path = dest.path("t", 0, 20, "zstd");
        fs::remove_file(FileDest::sidecar(&path)).unwrap();
        assert_eq!(dest.footer(&path).unwrap(), d.footer.public());
        assert!(FileDest::from_url("file://relative").is_err());
        let _ = fs::remove_dir_all(&root);
    }
}
