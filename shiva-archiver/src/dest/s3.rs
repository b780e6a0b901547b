//! The archive in an S3-compatible object store: `s3://bucket/prefix`.
//!
//! Publishing is one `PutObject` with `If-None-Match: *`: the store creates the key only if it
//! does not exist, atomically, and answers 412 otherwise ("another writer got there": its footer
//! is adopted). Files are finished in memory before they are published, so a single request
//! carries each (S3 takes up to 5 GiB in one `PutObject`): no multipart upload is ever started,
//! so none can be left behind by a crash, and nothing is visible under the final key before it
//! is complete. The public footer rides on the object as user metadata
//! (`x-amz-meta-shiva-footer`), so resuming and a structural `fsck` read it with a `HEAD`.
//!
//! Endpoint, region and credentials come from the flags or the usual AWS environment variables
//! (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`), so any S3-compatible store works.

use std::time::Duration;

use anyhow::{Context, bail};
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{
    Attribute, Attributes, ClientOptions, GetOptions, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, RetryConfig,
};

use super::{Entry, Published, compression_of, file_name};
use crate::format::{Encoded, Footer, read_footer};

/// The largest object one `PutObject` may carry.
pub const MAX_OBJECT_BYTES: u64 = 5 << 30;

/// The user-metadata key holding a file's public footer.
const META_KEY: &str = "shiva-footer";

/// How many `HEAD` requests a listing keeps in flight.
const HEADS_IN_FLIGHT: usize = 16;

/// Connection settings (flags; unset ones come from the AWS environment variables).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// Endpoint URL (http://127.0.0.1:5000 for a local store).
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
}

/// An S3 archive.
#[derive(Debug)]
pub struct S3Dest {
    store: AmazonS3,
    bucket: String,
    /// The key prefix, without a trailing slash (may be empty).
    prefix: String,
    runtime: tokio::runtime::Runtime,
}

impl S3Dest {
    /// Parses `s3://bucket[/prefix]` and connects (lazily: nothing is sent yet).
    pub fn from_url(url: &str, options: &S3Options) -> anyhow::Result<S3Dest> {
        let rest = url.strip_prefix("s3://").unwrap_or(url);
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            bail!("--dest '{url}': expected s3://bucket/prefix (no bucket named)");
        }
        let prefix = prefix.trim_matches('/').to_owned();
        if prefix.split('/').any(|part| part == "." || part == "..") {
            bail!("--dest '{url}': the prefix may not contain '.' or '..' parts");
        }
        // Client options first: they hold allow_http, which a later with_client_options would reset.
        let client = ClientOptions::new()
            .with_connect_timeout(Duration::from_secs(10))
            .with_timeout(Duration::from_secs(300));
        let mut builder = AmazonS3Builder::from_env().with_client_options(client).with_bucket_name(bucket);
        let endpoint = options.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if let Some(endpoint) = endpoint {
            if !endpoint.starts_with("http://") && !endpoint.starts_with("https://") {
                bail!("--s3-endpoint '{endpoint}': expected an http:// or https:// URL");
            }
            builder = builder.with_allow_http(endpoint.starts_with("http://")).with_endpoint(endpoint);
        }
        // Unset, the region comes from AWS_REGION or AWS_DEFAULT_REGION (read by from_env), else
        // us-east-1 (the builder's default).
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        if let Some(id) = &options.access_key_id {
            builder = builder.with_access_key_id(id);
        }
        if let Some(secret) = &options.secret_access_key {
            builder = builder.with_secret_access_key(secret);
        }
        let retry =
            RetryConfig { max_retries: 4, retry_timeout: Duration::from_secs(60), ..RetryConfig::default() };
        let store =
            builder.with_retry(retry).build().map_err(flat).with_context(|| format!("--dest '{url}'"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the S3 client's runtime")?;
        Ok(S3Dest { store, bucket: bucket.to_owned(), prefix, runtime })
    }

    fn key(&self, relative: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(relative)
        } else {
            Path::from(format!("{}/{relative}", self.prefix))
        }
    }

    fn partition_prefix(&self, topic: &str, partition: i32) -> Path {
        self.key(&format!("{topic}/{partition}"))
    }

    fn url(&self, key: &Path) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn key_of(&self, entry: &Entry) -> anyhow::Result<Path> {
        let key = entry
            .name
            .strip_prefix(&format!("s3://{}/", self.bucket))
            .with_context(|| format!("{} is not in bucket {}", entry.name, self.bucket))?;
        Ok(Path::from(key))
    }

    /// Checks that the bucket answers (a clear error before any record is read).
    pub fn prepare(&self, topic: &str) -> anyhow::Result<()> {
        let prefix = self.key(topic);
        self.runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(flat)
            .with_context(|| format!("cannot list {}", self.url(&prefix)))?;
        Ok(())
    }

    /// The archive files under a partition, sorted by key (by first offset).
    fn objects(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<ObjectMeta>> {
        let prefix = self.partition_prefix(topic, partition);
        let listed: Vec<_> = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(flat)
            .with_context(|| format!("cannot list {}", self.url(&prefix)))?
            .objects;
        let mut objects: Vec<ObjectMeta> = listed
            .into_iter()
            .filter(|meta| meta.location.filename().and_then(compression_of).is_some())
            .collect();
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The compressions of a partition's files.
    pub fn compressions(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<String>> {
        let mut found: Vec<String> = self
            .objects(topic, partition)?
            .iter()
            .filter_map(|meta| meta.location.filename().and_then(compression_of))
            .map(str::to_owned)
            .collect();
        found.sort();
        found.dedup();
        Ok(found)
    }

    /// Publishes with one conditional `PutObject`.
    pub fn publish(&self, encoded: &Encoded) -> anyhow::Result<Published> {
        let footer = &encoded.footer;
        if encoded.bytes.len() as u64 > MAX_OBJECT_BYTES {
            bail!(
                "the file at {}/{} offset {} is {} bytes, above the {MAX_OBJECT_BYTES} one PutObject takes: lower --max-bytes",
                footer.topic,
                footer.partition,
                footer.first_offset,
                encoded.bytes.len()
            );
        }
        let key = self.key(&format!(
            "{}/{}/{}",
            footer.topic,
            footer.partition,
            file_name(footer.first_offset, &footer.compression)
        ));
        let mut attributes = Attributes::new();
        attributes
            .insert(Attribute::Metadata(META_KEY.into()), serde_json::to_string(&footer.public())?.into());
        let options = PutOptions { mode: PutMode::Create, attributes, ..PutOptions::default() };
        let payload = PutPayload::from(encoded.bytes.clone());
        match self.runtime.block_on(self.store.put_opts(&key, payload, options)) {
            Ok(_) => Ok(Published::Written(footer.clone())),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Published::Adopted(self.footer(&key)?)),
            Err(err) => Err(flat(err)).with_context(|| format!("cannot publish {}", self.url(&key))),
        }
    }

    /// The public footer of an object: its metadata, else read from the object (unencrypted
    /// files only).
    fn footer(&self, key: &Path) -> anyhow::Result<Footer> {
        self.runtime.block_on(footer_of(&self.store, key, &self.url(key)))
    }

    /// The files of a partition, by first offset (their footers fetched a few at a time).
    pub fn list(&self, topic: &str, partition: i32) -> anyhow::Result<Vec<Entry>> {
        let objects = self.objects(topic, partition)?;
        let store = &self.store;
        self.runtime.block_on(
            futures::stream::iter(objects)
                .map(|meta| async move {
                    let url = self.url(&meta.location);
                    let footer = footer_of(store, &meta.location, &url).await?;
                    Ok::<_, anyhow::Error>(Entry {
                        name: url,
                        footer,
                        modified: Some(meta.last_modified.into()),
                    })
                })
                .buffered(HEADS_IN_FLIGHT)
                .try_collect(),
        )
    }

    /// The partitions with files under `topic`.
    pub fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let prefix = self.key(topic);
        let listed = self
            .runtime
            .block_on(self.store.list_with_delimiter(Some(&prefix)))
            .map_err(flat)
            .with_context(|| format!("cannot list {}", self.url(&prefix)))?;
        let mut partitions: Vec<i32> =
            listed.common_prefixes.iter().filter_map(|p| p.filename().and_then(|n| n.parse().ok())).collect();
        if partitions.is_empty() {
            bail!("no archive of '{topic}' in {}", self.url(&prefix));
        }
        partitions.sort();
        Ok(partitions)
    }

    /// The bytes of an object.
    pub fn read(&self, entry: &Entry) -> anyhow::Result<Vec<u8>> {
        let key = self.key_of(entry)?;
        self.runtime
            .block_on(async { self.store.get(&key).await?.bytes().await })
            .map(|bytes| bytes.to_vec())
            .map_err(flat)
            .with_context(|| format!("cannot read {}", entry.name))
    }

    /// Deletes an object.
    pub fn remove(&self, entry: &Entry) -> anyhow::Result<()> {
        let key = self.key_of(entry)?;
        self.runtime
            .block_on(self.store.delete(&key))
            .map_err(flat)
            .with_context(|| format!("cannot delete {}", entry.name))
    }

    /// The newest file's footer of a partition.
    pub fn newest(&self, topic: &str, partition: i32) -> anyhow::Result<Option<Footer>> {
        self.objects(topic, partition)?.last().map(|meta| self.footer(&meta.location)).transpose()
    }
}

async fn footer_of(store: &AmazonS3, key: &Path, url: &str) -> anyhow::Result<Footer> {
    let head = store
        .get_opts(key, GetOptions { head: true, ..GetOptions::default() })
        .await
        .map_err(flat)
        .with_context(|| format!("cannot read {url}"))?;
    if let Some(meta) = head.attributes.get(&Attribute::Metadata(META_KEY.into()))
        && let Ok(footer) = serde_json::from_str::<Footer>(meta.as_ref())
    {
        return Ok(footer);
    }
    // Not written by this archiver's `run` (copied in by hand?): the footer inside the file.
    let bytes = async { store.get(key).await?.bytes().await }
        .await
        .map_err(flat)
        .with_context(|| format!("cannot read {url}"))?;
    Ok(read_footer(&bytes, &[]).with_context(|| url.to_owned())?.public())
}

/// An object store error as one message: its text already includes its causes, which a chain
/// would repeat.
fn flat(err: object_store::Error) -> anyhow::Error {
    anyhow::anyhow!("{err}")
}
