//! The index: one SQLite file per topic, with an FTS5 full-text table over each record's key
//! and value, and each partition's next offset.
//!
//! Invariant: the records of a batch and the partitions' next offsets are written in one
//! transaction, so the file always says exactly which records it holds; a record is stored at
//! most once (its partition and offset are the primary key, and the full-text row is added only
//! when the record's row was). A restart resumes at the stored offsets: nothing is lost and
//! nothing is indexed twice, whatever moment the indexer was killed at.
//!
//! Tables (readable with the stock `sqlite3` command, see pipelines/index/README.md):
//! * `records(id, partition, offset, timestamp_ms, key, value)`: key and value as text (bytes that
//!   are not UTF-8 replaced by U+FFFD), the value NULL for a tombstone;
//! * `search`: FTS5 over `records` (columns `key`, `value`; its rowid is the record's `id`, an
//!   `INTEGER PRIMARY KEY`, which `VACUUM` never renumbers);
//! * `positions(partition, next_offset)`;
//! * `meta(key, value)`: the topic (`topic`). `PRAGMA user_version` is the format (1).

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

/// The file format this build reads and writes.
pub const FORMAT: i64 = 1;

/// A record to index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Doc {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record time (ms since the Unix epoch), when it has one.
    pub timestamp_ms: Option<i64>,
    /// Key, as text.
    pub key: Option<String>,
    /// Value, as text (`None`: a tombstone).
    pub value: Option<String>,
}

impl Doc {
    /// From a record's bytes: text as it is, other bytes replaced by U+FFFD.
    pub fn new(
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
    ) -> Doc {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        Doc { partition, offset, timestamp_ms, key: key.map(text), value: value.map(text) }
    }
}

/// One search hit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Record time.
    pub timestamp_ms: Option<i64>,
    /// Key.
    pub key: Option<String>,
    /// The value around the matched terms (matches in `[` `]`).
    pub snippet: String,
    /// FTS5's bm25 rank (lower is better).
    pub rank: f64,
}

/// What an index holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Topic.
    pub topic: String,
    /// Records held.
    pub records: u64,
    /// Each partition's next offset.
    pub positions: BTreeMap<i32, i64>,
}

/// Why an index cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The file is another topic's.
    #[error("{path} indexes topic '{found}', not '{wanted}': one index file per topic")]
    OtherTopic { path: String, found: String, wanted: String },
    /// The file has a format this build does not know.
    #[error(
        "{path} has index format {found}; this shiva-indexer reads format {FORMAT} (a newer version wrote it?)"
    )]
    Format { path: String, found: i64 },
    /// The file is not an index.
    #[error("{path} is not a Shiva index (not an SQLite file, or one holding other tables)")]
    NotAnIndex { path: String },
    /// A query FTS5 refuses.
    #[error(
        "invalid query {query:?}: {message} (FTS5 syntax: words, \"a phrase\", AND, OR, NOT, prefix*, column:word)"
    )]
    Query { query: String, message: String },
    /// The file system does not take SQLite's write-ahead log (a network file system?).
    #[error(
        "{path}: SQLite cannot keep a write-ahead log there (journal mode stays {mode}): put the index on a local file system"
    )]
    NoWal { path: String, mode: String },
    /// The file's directory.
    #[error("cannot create {path}: {source}")]
    Directory {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// SQLite.
    #[error("{context}: {source}")]
    Sqlite {
        context: String,
        #[source]
        source: rusqlite::Error,
    },
}

fn sql(context: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> IndexError {
    let context = context.into();
    move |source| IndexError::Sqlite { context, source }
}

/// An open index.
#[derive(Debug)]
pub struct Index {
    conn: Connection,
    path: String,
}

impl Index {
    /// Opens (creating it if needed) the index of `topic` at `path`, for writing.
    pub fn open(path: &Path, topic: &str) -> Result<Index, IndexError> {
        let shown = path.display().to_string();
        if let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|source| IndexError::Directory { path: parent.display().to_string(), source })?;
        }
        let conn = Connection::open(path).map_err(sql(format!("cannot open {shown}")))?;
        let mut index = Index { conn, path: shown };
        index.setup()?;
        let path = index.path.clone();
        let not_index = |_| IndexError::NotAnIndex { path: path.clone() };
        // Immediate: two copies creating the file at once take turns (within the busy timeout)
        // instead of one failing on the upgrade from a read to a write.
        let tx = index
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql(format!("cannot begin on {}", index.path)))?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(not_index)?;
        if version == 0 {
            // A new file, or an SQLite file of something else: that one is left untouched.
            let tables: i64 = tx
                .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
                .map_err(not_index)?;
            if tables > 0 {
                return Err(IndexError::NotAnIndex { path: index.path.clone() });
            }
            tx.execute_batch(
                "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
                 CREATE TABLE IF NOT EXISTS positions(partition INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
                 CREATE TABLE IF NOT EXISTS records(
                     id INTEGER PRIMARY KEY, partition INTEGER NOT NULL, offset INTEGER NOT NULL,
                     timestamp_ms INTEGER, key TEXT, value TEXT, UNIQUE(partition, offset));
                 CREATE VIRTUAL TABLE IF NOT EXISTS search
                     USING fts5(key, value, content='records', content_rowid='id');
                 PRAGMA user_version = 1;",
            )
            .map_err(sql(format!("cannot create the index in {}", index.path)))?;
            tx.execute("INSERT OR IGNORE INTO meta(key, value) VALUES('topic', ?1)", [topic])
                .map_err(sql("cannot write the topic"))?;
        } else if version != FORMAT {
            return Err(IndexError::Format { path: index.path.clone(), found: version });
        }
        tx.commit().map_err(sql("cannot commit"))?;
        let found = index.topic()?;
        if found != topic {
            return Err(IndexError::OtherTopic { path: index.path.clone(), found, wanted: topic.to_owned() });
        }
        Ok(index)
    }

    /// Opens an existing index for reading (searches run beside a running indexer).
    pub fn open_read(path: &Path) -> Result<Index, IndexError> {
        let shown = path.display().to_string();
        let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(sql(format!("cannot open {shown}")))?;
        let index = Index { conn, path: shown };
        index.conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql("busy_timeout"))?;
        let path = index.path.clone();
        let version: i64 = index
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|_| IndexError::NotAnIndex { path: path.clone() })?;
        if version != FORMAT {
            return Err(if version == 0 {
                IndexError::NotAnIndex { path: index.path.clone() }
            } else {
                IndexError::Format { path: index.path.clone(), found: version }
            });
        }
        index.topic()?;
        Ok(index)
    }

    fn setup(&self) -> Result<(), IndexError> {
        self.conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(sql("busy_timeout"))?;
        // WAL: searches read while the indexer writes. FULL: a commit is on disk before the
        // next batch is read (a power cut loses nothing Kafka would not give again).
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
            .map_err(|_| IndexError::NotAnIndex { path: self.path.clone() })?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(IndexError::NoWal { path: self.path.clone(), mode });
        }
        self.conn
            .execute_batch("PRAGMA synchronous = FULL;")
            .map_err(sql(format!("cannot set up {}", self.path)))
    }

    /// The topic this index holds.
    pub fn topic(&self) -> Result<String, IndexError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = 'topic'", [], |row| row.get(0))
            .optional()
            .map_err(|_| IndexError::NotAnIndex { path: self.path.clone() })?
            .ok_or_else(|| IndexError::NotAnIndex { path: self.path.clone() })
    }

    /// Each partition's next offset.
    pub fn positions(&self) -> Result<BTreeMap<i32, i64>, IndexError> {
        let mut statement =
            self.conn.prepare("SELECT partition, next_offset FROM positions").map_err(sql("positions"))?;
        let rows = statement
            .query_map([], |row| Ok((row.get::<_, i32>(0)?, row.get::<_, i64>(1)?)))
            .map_err(sql("positions"))?;
        rows.collect::<Result<_, _>>().map_err(sql("positions"))
    }

    /// Adds `docs` and sets `positions`, in one transaction; returns how many records were new
    /// (a record already held is left as it is).
    pub fn commit(&mut self, docs: &[Doc], positions: &BTreeMap<i32, i64>) -> Result<u64, IndexError> {
        let tx = self.conn.transaction().map_err(sql("cannot begin a batch"))?;
        let mut added = 0u64;
        {
            let mut record = tx
                .prepare_cached(
                    "INSERT INTO records(partition, offset, timestamp_ms, key, value) VALUES(?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(partition, offset) DO NOTHING",
                )
                .map_err(sql("insert"))?;
            let mut text = tx
                .prepare_cached("INSERT INTO search(rowid, key, value) VALUES(?1, ?2, ?3)")
                .map_err(sql("insert"))?;
            for doc in docs {
                let changed = record
                    .execute(params![doc.partition, doc.offset, doc.timestamp_ms, doc.key, doc.value])
                    .map_err(sql(format!("cannot index {}/{}", doc.partition, doc.offset)))?;
                if changed == 1 {
                    text.execute(params![tx.last_insert_rowid(), doc.key, doc.value])
                        .map_err(sql(format!("cannot index {}/{}", doc.partition, doc.offset)))?;
                    added += 1;
                }
            }
            let mut position = tx
                .prepare_cached(
                    "INSERT INTO positions(partition, next_offset) VALUES(?1, ?2)
                     ON CONFLICT(partition) DO UPDATE SET next_offset = max(next_offset, excluded.next_offset)",
                )
                .map_err(sql("positions"))?;
            for (partition, next) in positions {
                position.execute(params![partition, next]).map_err(sql("positions"))?;
            }
        }
        tx.commit().map_err(sql(format!("cannot commit a batch to {}", self.path)))?;
        Ok(added)
    }

    /// The best `limit` records matching `query` (FTS5 syntax), and how many match in all.
    pub fn search(&self, query: &str, limit: u32) -> Result<(u64, Vec<Hit>), IndexError> {
        let refused = |err: rusqlite::Error| match &err {
            // SQLITE_ERROR from a statement that compiled: what FTS5 says of the query
            // (a syntax error, an unterminated string, an unknown column).
            rusqlite::Error::SqliteFailure(failure, Some(message))
                if failure.code == rusqlite::ErrorCode::Unknown =>
            {
                IndexError::Query { query: query.to_owned(), message: message.clone() }
            }
            _ => IndexError::Sqlite { context: format!("cannot search {}", self.path), source: err },
        };
        // One read transaction: the total and the hits see the same commit.
        let tx = self.conn.unchecked_transaction().map_err(sql("cannot begin a read"))?;
        let total: u64 = tx
            .query_row("SELECT count(*) FROM search WHERE search MATCH ?1", [query], |row| row.get(0))
            .map_err(refused)?;
        let mut statement = tx
            .prepare(
                "SELECT r.partition, r.offset, r.timestamp_ms, r.key,
                        snippet(search, 1, '[', ']', '…', 16), bm25(search)
                 FROM search JOIN records r ON r.id = search.rowid
                 WHERE search MATCH ?1 ORDER BY bm25(search), r.partition, r.offset LIMIT ?2",
            )
            .map_err(refused)?;
        let hits = statement
            .query_map(params![query, limit], |row| {
                Ok(Hit {
                    partition: row.get(0)?,
                    offset: row.get(1)?,
                    timestamp_ms: row.get(2)?,
                    key: row.get(3)?,
                    snippet: row.get::<_, Option<String>>(4)?.unwrap_or_default(),
                    rank: row.get(5)?,
                })
            })
            .map_err(refused)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(refused)?;
        Ok((total, hits))
    }

    /// What the index holds.
    pub fn stats(&self) -> Result<Stats, IndexError> {
        let records = self
            .conn
            .query_row("SELECT count(*) FROM records", [], |row| row.get(0))
            .map_err(sql("count"))?;
        Ok(Stats { topic: self.topic()?, records, positions: self.positions()? })
    }

    /// Every record's partition and offset, in order (for checks).
    pub fn offsets(&self) -> Result<Vec<(i32, i64)>, IndexError> {
        let mut statement = self
            .conn
            .prepare("SELECT partition, offset FROM records ORDER BY partition, offset")
            .map_err(sql("offsets"))?;
        let rows = statement.query_map([], |row| Ok((row.get(0)?, row.get(1)?))).map_err(sql("offsets"))?;
        rows.collect::<Result<_, _>>().map_err(sql("offsets"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(partition: i32, offset: i64, value: &str) -> Doc {
        Doc::new(
            partition,
            offset,
            Some(1000 + offset),
            Some(format!("k{offset}").as_bytes()),
            Some(value.as_bytes()),
        )
    }

    fn dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("shiva-index-{}-{}", std::process::id(), unique()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn unique() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    }

    #[test]
    fn a_batch_is_searchable_and_its_positions_stored_with_it() {
        let path = dir().join("events.db");
        let mut index = Index::open(&path, "events").unwrap();
        let docs =
            vec![doc(0, 0, "disk full on host alpha"), doc(0, 1, "all good"), doc(1, 0, "disk replaced")];
        let positions = BTreeMap::from([(0, 2), (1, 1)]);
        assert_eq!(index.commit(&docs, &positions).unwrap(), 3);
        let (total, hits) = index.search("disk", 10).unwrap();
        assert_eq!(total, 2);
        assert!(
            hits.iter().any(|hit| hit.partition == 0 && hit.offset == 0 && hit.snippet.contains("[disk]"))
        );
        assert_eq!(index.search("alpha AND disk", 10).unwrap().0, 1);
        assert_eq!(index.search("key:k1", 10).unwrap().0, 1, "keys are indexed too");
        drop(index);
        let again = Index::open(&path, "events").unwrap();
        assert_eq!(again.positions().unwrap(), positions);
    }

    #[test]
    fn a_record_given_twice_is_held_once_and_positions_never_go_back() {
        let path = dir().join("t.db");
        let mut index = Index::open(&path, "t").unwrap();
        index.commit(&[doc(0, 0, "one"), doc(0, 1, "two")], &BTreeMap::from([(0, 2)])).unwrap();
        assert_eq!(
            index.commit(&[doc(0, 1, "two"), doc(0, 2, "three")], &BTreeMap::from([(0, 1)])).unwrap(),
            1
        );
        assert_eq!(index.search("two", 10).unwrap().0, 1);
        assert_eq!(index.offsets().unwrap(), vec![(0, 0), (0, 1), (0, 2)]);
        assert_eq!(index.positions().unwrap(), BTreeMap::from([(0, 2)]), "max of the stored and the given");
    }

    #[test]
    fn another_topics_file_a_bad_query_and_a_newer_format_are_refused_by_name() {
        let dir = dir();
        let path = dir.join("a.db");
        Index::open(&path, "a").unwrap();
        let err = Index::open(&path, "b").unwrap_err().to_string();
        assert!(err.contains("indexes topic 'a', not 'b'"), "{err}");
        let index = Index::open_read(&path).unwrap();
        let err = index.search("\"unclosed", 10).unwrap_err().to_string();
        assert!(err.starts_with("invalid query"), "{err}");
        Connection::open(&path).unwrap().execute_batch("PRAGMA user_version = 7").unwrap();
        let err = Index::open(&path, "a").unwrap_err().to_string();
        assert!(err.contains("index format 7"), "{err}");
        let other = dir.join("plain.db");
        Connection::open(&other).unwrap().execute_batch("CREATE TABLE x(y)").unwrap();
        assert!(Index::open_read(&other).unwrap_err().to_string().contains("not a Shiva index"));
        assert!(Index::open(&other, "x").unwrap_err().to_string().contains("not a Shiva index"));
        let untouched: i64 =
            Connection::open(&other).unwrap().query_row("PRAGMA user_version", [], |row| row.get(0)).unwrap();
        let tables: i64 = Connection::open(&other)
            .unwrap()
            .query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0))
            .unwrap();
        assert_eq!((untouched, tables), (0, 1), "another program's SQLite file is left as it was");
        let text = dir.join("text.db");
        std::fs::write(&text, "not a database at all, just some text that is long enough").unwrap();
        assert!(Index::open(&text, "x").unwrap_err().to_string().contains("not a Shiva index"));
    }

    #[test]
    fn bytes_that_are_not_text_and_tombstones_are_held() {
        let path = dir().join("b.db");
        let mut index = Index::open(&path, "b").unwrap();
        let binary = Doc::new(0, 0, None, None, Some(b"\xff\x00 word"));
        let tombstone = Doc::new(0, 1, None, Some(b"gone"), None);
        index.commit(&[binary, tombstone], &BTreeMap::from([(0, 2)])).unwrap();
        assert_eq!(index.search("word", 10).unwrap().0, 1);
        assert_eq!(index.stats().unwrap().records, 2);
    }
}
