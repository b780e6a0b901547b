//! The archive file format, pure: records in, bytes out, and back.
//!
//! A file holds the records of one partition, in offset order, as zstd frames; stock `zstdcat`
//! prints its body. The body is one of two encodings, chosen per file:
//!
//! * `jsonl` when every key and value is UTF-8 text: one JSON object per record and line,
//!   `{"offset":…,"timestamp":…,"key":…,"headers":[[k,v]…],"value":…}`;
//! * `frames` otherwise: per record a 4-byte big-endian length, then that many bytes of the same
//!   JSON object with `key` and `value` (and header values) in base64 (`"key_b64"`,
//!   `"value_b64"`).
//!
//! After the body, a zstd *skippable frame* (magic `0x184D2A5E`) holds the footer as JSON: topic,
//! partition, first/last/next offset, count, min/max record time, the SHA-256 of the body, the
//! encoding and the format version. zstd's decoders skip it; [`read_footer`] finds it.

use std::io::Write;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format version written in every footer.
pub const FORMAT_VERSION: u32 = 1;
/// The skippable frame magic used for the footer.
const FOOTER_MAGIC: u32 = 0x184D_2A5E;

/// One Kafka record, as archived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Its offset.
    pub offset: i64,
    /// Its timestamp (ms since the Unix epoch), when it has one.
    pub timestamp: Option<i64>,
    /// Its key.
    pub key: Option<Vec<u8>>,
    /// Its headers, in order.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    /// Its value (`None`: a tombstone).
    pub value: Option<Vec<u8>>,
}

impl Record {
    /// Bytes the record counts for in size cuts: key, value and headers.
    pub fn raw_len(&self) -> usize {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
        self.key.as_ref().map_or(0, Vec::len) + self.value.as_ref().map_or(0, Vec::len) + headers
    }

    fn is_text(&self) -> bool {
        let text = |bytes: &Option<Vec<u8>>| bytes.as_ref().is_none_or(|b| std::str::from_utf8(b).is_ok());
        text(&self.key) && text(&self.value) && self.headers.iter().all(|(_, v)| text(v))
    }
}

/// A file's body encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// JSON lines, text payloads.
    Jsonl,
    /// Length-prefixed JSON with base64 payloads.
    Frames,
}

/// What a file says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Footer {
    /// Format version.
    pub version: u32,
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Where the file's range starts: the previous file's `next_offset` (its first record's
    /// offset, or earlier when the log has a gap there). The file's name.
    pub first_offset: i64,
    /// Offset of the last record.
    pub last_offset: i64,
    /// Where reading resumes after this file (the fetch position after its last record; later
    /// than `last_offset + 1` when the log has a gap there).
    pub next_offset: i64,
    /// Records in the file.
    pub count: u64,
    /// Smallest record timestamp.
    pub min_time: Option<i64>,
    /// Largest record timestamp.
    pub max_time: Option<i64>,
    /// SHA-256 of the uncompressed body, hex.
    pub sha256: String,
    /// Body encoding.
    pub encoding: Encoding,
    /// Compression of the file (`zstd`).
    pub compression: String,
    /// Whether the file is encrypted (age, around the compressed stream).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
}

impl Footer {
    /// The fields that may be stored in the clear beside the file: all of them, but the body's
    /// checksum of an encrypted file.
    pub fn public(&self) -> Footer {
        let sha256 = if self.encrypted { String::new() } else { self.sha256.clone() };
        Footer { sha256, ..self.clone() }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    offset: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key_b64: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    headers: Vec<(String, Option<String>)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    value_b64: Option<String>,
}

fn envelope(record: &Record, encoding: Encoding) -> Envelope {
    let split = |bytes: &Option<Vec<u8>>| match (bytes, encoding) {
        (None, _) => (None, None),
        (Some(b), Encoding::Jsonl) => (Some(String::from_utf8_lossy(b).into_owned()), None),
        (Some(b), Encoding::Frames) => (None, Some(B64.encode(b))),
    };
    let (key, key_b64) = split(&record.key);
    let (value, value_b64) = split(&record.value);
    let headers = record
        .headers
        .iter()
        .map(|(name, value)| {
            let value = value.as_ref().map(|v| match encoding {
                Encoding::Jsonl => String::from_utf8_lossy(v).into_owned(),
                Encoding::Frames => B64.encode(v),
            });
            (name.clone(), value)
        })
        .collect();
    Envelope { offset: record.offset, timestamp: record.timestamp, key, key_b64, headers, value, value_b64 }
}

/// Encodes a file's body; returns it with its encoding.
pub fn encode_body(records: &[Record]) -> (Vec<u8>, Encoding) {
    let encoding = if records.iter().all(Record::is_text) { Encoding::Jsonl } else { Encoding::Frames };
    let mut body = Vec::new();
    for record in records {
        let json = serde_json::to_vec(&envelope(record, encoding)).expect("records serialize");
        match encoding {
            Encoding::Jsonl => {
                body.extend_from_slice(&json);
                body.push(b'\n');
            }
            Encoding::Frames => {
                body.extend_from_slice(&(json.len() as u32).to_be_bytes());
                body.extend_from_slice(&json);
            }
        }
    }
    (body, encoding)
}

/// Why a file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Not a zstd stream, or a damaged one.
    #[error("not a readable zstd stream: {0}")]
    Compression(String),
    /// No footer at the end (truncated, or not an archive file).
    #[error("no footer at the end of the file (truncated, or not a Shiva archive)")]
    NoFooter,
    /// A footer that does not parse.
    #[error("unreadable footer: {0}")]
    BadFooter(String),
    /// A body that does not parse.
    #[error("damaged body at byte {at}: {why}")]
    BadBody {
        /// Where.
        at: usize,
        /// What.
        why: String,
    },
    /// The body's checksum or count does not match the footer.
    #[error("the body does not match its footer: {0}")]
    Mismatch(String),
    /// An encrypted file that cannot be opened.
    #[error("{0}")]
    Encrypted(String),
}

/// Decodes a body.
pub fn decode_body(body: &[u8], encoding: Encoding) -> Result<Vec<Record>, FormatError> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < body.len() {
        let (json, next) = match encoding {
            Encoding::Jsonl => {
                let end = body[at..]
                    .iter()
                    .position(|b| *b == b'\n')
                    .map(|end| at + end)
                    .ok_or_else(|| FormatError::BadBody { at, why: "last line has no newline".into() })?;
                (&body[at..end], end + 1)
            }
            Encoding::Frames => {
                let len_bytes: [u8; 4] = body
                    .get(at..at + 4)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| FormatError::BadBody { at, why: "truncated frame length".into() })?;
                let len = u32::from_be_bytes(len_bytes) as usize;
                let json = body
                    .get(at + 4..at + 4 + len)
                    .ok_or_else(|| FormatError::BadBody { at, why: "truncated frame".into() })?;
                (json, at + 4 + len)
            }
        };
        let envelope: Envelope =
            serde_json::from_slice(json).map_err(|err| FormatError::BadBody { at, why: err.to_string() })?;
        let bytes = |text: Option<String>, b64: Option<String>| -> Result<Option<Vec<u8>>, FormatError> {
            match (text, b64) {
                (Some(text), _) => Ok(Some(text.into_bytes())),
                (None, Some(b64)) => {
                    B64.decode(b64).map(Some).map_err(|err| FormatError::BadBody { at, why: err.to_string() })
                }
                (None, None) => Ok(None),
            }
        };
        let headers = envelope
            .headers
            .into_iter()
            .map(|(name, value)| {
                let value = match (value, encoding) {
                    (None, _) => None,
                    (Some(v), Encoding::Jsonl) => Some(v.into_bytes()),
                    (Some(v), Encoding::Frames) => {
                        Some(B64.decode(v).map_err(|err| FormatError::BadBody { at, why: err.to_string() })?)
                    }
                };
                Ok((name, value))
            })
            .collect::<Result<Vec<_>, FormatError>>()?;
        records.push(Record {
            offset: envelope.offset,
            timestamp: envelope.timestamp,
            key: bytes(envelope.key, envelope.key_b64)?,
            headers,
            value: bytes(envelope.value, envelope.value_b64)?,
        });
        at = next;
    }
    Ok(records)
}

/// How a file is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// zstd at a level (1–22); the footer is a skippable frame.
    Zstd(i32),
    /// gzip at a level (0–9); the footer is a final gzip member (comment `shiva-footer`).
    Gzip(u32),
}

impl Codec {
    /// The name in footers, and the file extension.
    pub fn name(self) -> &'static str {
        match self {
            Codec::Zstd(_) => "zstd",
            Codec::Gzip(_) => "gzip",
        }
    }

    /// The file extension of a compression name.
    pub fn extension(name: &str) -> &'static str {
        if name == "gzip" { "gz" } else { "zst" }
    }
}

/// The comment of the gzip member holding the footer.
const GZIP_FOOTER: &str = "shiva-footer";

/// A finished file: the compressed bytes and their footer.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The file's bytes.
    pub bytes: Vec<u8>,
    /// Its footer.
    pub footer: Footer,
}

/// Encodes `records` (non-empty, in offset order) of `topic`/`partition` into a file covering the
/// offsets from `start` (where reading began: the previous file's `next_offset`) to
/// `next_offset` (where reading resumes after them).
pub fn encode_file(
    topic: &str,
    partition: i32,
    start: i64,
    records: &[Record],
    next_offset: i64,
    codec: Codec,
    recipients: &[age::x25519::Recipient],
) -> Encoded {
    let (body, encoding) = encode_body(records);
    let footer = Footer {
        version: FORMAT_VERSION,
        topic: topic.to_owned(),
        partition,
        first_offset: start,
        last_offset: records.last().map_or(next_offset - 1, |r| r.offset),
        next_offset,
        count: records.len() as u64,
        min_time: records.iter().filter_map(|r| r.timestamp).min(),
        max_time: records.iter().filter_map(|r| r.timestamp).max(),
        sha256: hex::encode(Sha256::digest(&body)),
        encoding,
        compression: codec.name().into(),
        encrypted: !recipients.is_empty(),
    };
    let json = serde_json::to_vec(&footer).expect("footers serialize");
    let mut bytes = match codec {
        Codec::Zstd(level) => {
            let mut bytes = zstd::stream::encode_all(body.as_slice(), level).expect("compressing in memory");
            bytes.write_all(&FOOTER_MAGIC.to_le_bytes()).expect("in memory");
            bytes.write_all(&(json.len() as u32).to_le_bytes()).expect("in memory");
            bytes.write_all(&json).expect("in memory");
            bytes
        }
        Codec::Gzip(level) => {
            let level = flate2::Compression::new(level);
            let mut body_member = flate2::write::GzEncoder::new(Vec::new(), level);
            body_member.write_all(&body).expect("in memory");
            let mut bytes = body_member.finish().expect("in memory");
            let mut footer_member = flate2::GzBuilder::new().comment(GZIP_FOOTER).write(Vec::new(), level);
            footer_member.write_all(&json).expect("in memory");
            bytes.extend(footer_member.finish().expect("in memory"));
            bytes
        }
    };
    if !recipients.is_empty() {
        bytes = crate::crypt::encrypt(&bytes, recipients).expect("encrypting in memory to parsed recipients");
    }
    Encoded { bytes, footer }
}

/// The plain (compressed) bytes of a file: decrypted when it is encrypted.
fn plain<'a>(
    file: &'a [u8],
    identities: &[Box<dyn age::Identity>],
) -> Result<std::borrow::Cow<'a, [u8]>, FormatError> {
    if crate::crypt::is_encrypted(file) {
        let plain = crate::crypt::decrypt(file, identities)
            .map_err(|err| FormatError::Encrypted(format!("{err:#}")))?;
        Ok(std::borrow::Cow::Owned(plain))
    } else {
        Ok(std::borrow::Cow::Borrowed(file))
    }
}

/// Finds the footer: the last frame of the file, a skippable one (decrypting first when the file
/// is encrypted). Reads frame headers only.
pub fn read_footer(file: &[u8], identities: &[Box<dyn age::Identity>]) -> Result<Footer, FormatError> {
    let file = plain(file, identities)?;
    let file: &[u8] = &file;
    if is_gzip(file) {
        return gzip_members(file)?.1.ok_or(FormatError::NoFooter);
    }
    let mut at = 0usize;
    let mut last = None;
    while at < file.len() {
        let size = zstd::zstd_safe::find_frame_compressed_size(&file[at..])
            .map_err(|code| FormatError::Compression(zstd::zstd_safe::get_error_name(code).to_owned()))?;
        last = Some((at, size));
        at += size;
    }
    let (start, size) = last.ok_or(FormatError::NoFooter)?;
    let frame = &file[start..start + size];
    let magic = u32::from_le_bytes(frame[..4].try_into().map_err(|_| FormatError::NoFooter)?);
    if magic != FOOTER_MAGIC || frame.len() < 8 {
        return Err(FormatError::NoFooter);
    }
    serde_json::from_slice(&frame[8..]).map_err(|err| FormatError::BadFooter(err.to_string()))
}

fn is_gzip(file: &[u8]) -> bool {
    file.starts_with(&[0x1f, 0x8b])
}

/// A gzip file's body (every member but the footer's) and its footer (the member with the
/// footer comment, which must be the last).
fn gzip_members(file: &[u8]) -> Result<(Vec<u8>, Option<Footer>), FormatError> {
    use std::io::Read;
    let mut rest = file;
    let mut body = Vec::new();
    let mut footer = None;
    while !rest.is_empty() {
        if footer.is_some() {
            return Err(FormatError::BadFooter("data after the footer member".into()));
        }
        let mut member = flate2::bufread::GzDecoder::new(rest);
        let mut content = Vec::new();
        member.read_to_end(&mut content).map_err(|err| FormatError::Compression(format!("gzip: {err}")))?;
        let is_footer = member.header().and_then(|h| h.comment()) == Some(GZIP_FOOTER.as_bytes());
        if is_footer {
            footer = Some(
                serde_json::from_slice(&content).map_err(|err| FormatError::BadFooter(err.to_string()))?,
            );
        } else {
            body.extend(content);
        }
        rest = member.into_inner();
    }
    Ok((body, footer))
}

/// Reads a whole file: its records, checked against its footer.
pub fn decode_file(
    file: &[u8],
    identities: &[Box<dyn age::Identity>],
) -> Result<(Footer, Vec<Record>), FormatError> {
    let file = plain(file, identities)?;
    let file: &[u8] = &file;
    let (body, footer) = if is_gzip(file) {
        let (body, footer) = gzip_members(file)?;
        (body, footer.ok_or(FormatError::NoFooter)?)
    } else {
        let footer = read_footer(file, &[])?;
        (zstd::stream::decode_all(file).map_err(|err| FormatError::Compression(err.to_string()))?, footer)
    };
    let sha = hex::encode(Sha256::digest(&body));
    if sha != footer.sha256 {
        return Err(FormatError::Mismatch(format!("sha256 {sha}, footer says {}", footer.sha256)));
    }
    let records = decode_body(&body, footer.encoding)?;
    let first = records.first().map(|r| r.offset);
    let last = records.last().map(|r| r.offset);
    let inside =
        first.is_some_and(|first| first >= footer.first_offset) && footer.last_offset < footer.next_offset;
    let ordered = records.windows(2).all(|pair| pair[0].offset < pair[1].offset);
    if records.len() as u64 != footer.count || !inside || !ordered || last != Some(footer.last_offset) {
        return Err(FormatError::Mismatch(format!(
            "{} records from {first:?} to {last:?}, footer says {} from {} to {}",
            records.len(),
            footer.count,
            footer.first_offset,
            footer.last_offset
        )));
    }
    Ok((footer, records))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(offset: i64, value: &[u8]) -> Record {
        Record {
            offset,
            timestamp: Some(1_700_000_000_000 + offset),
            key: Some(format!("k{offset}").into_bytes()),
            headers: vec![("h".into(), Some(b"v".to_vec())), ("empty".into(), None)],
            value: Some(value.to_vec()),
        }
    }

    #[test]
    fn text_and_binary_files_round_trip_and_zstd_skips_the_footer() {
        let text: Vec<Record> = (10..20).map(|o| record(o, format!("line {o} é").as_bytes())).collect();
        let file = encode_file("t", 3, 10, &text, 25, Codec::Zstd(1), &[]);
        assert_eq!(file.footer.encoding, Encoding::Jsonl);
        assert_eq!(
            (file.footer.first_offset, file.footer.last_offset, file.footer.next_offset),
            (10, 19, 25)
        );
        let (footer, back) = decode_file(&file.bytes, &[]).unwrap();
        assert_eq!((footer, back), (file.footer.clone(), text.clone()));
        // What `zstdcat` prints: the JSON lines, nothing of the footer.
        let plain = zstd::stream::decode_all(file.bytes.as_slice()).unwrap();
        assert!(plain.starts_with(b"{\"offset\":10,"));
        assert_eq!(plain.iter().filter(|b| **b == b'\n').count(), 10);

        let mut binary = text.clone();
        binary[4].value = Some(vec![0xff, 0x00, 0xfe, b'\n']);
        binary[5].value = None;
        let file = encode_file("t", 3, 8, &binary, 20, Codec::Zstd(3), &[]);
        assert_eq!(file.footer.encoding, Encoding::Frames);
        assert_eq!(decode_file(&file.bytes, &[]).unwrap().1, binary);
    }

    #[test]
    fn damage_is_reported_not_ignored() {
        let records: Vec<Record> = (0..50).map(|o| record(o, b"payload payload payload")).collect();
        let file = encode_file("t", 0, 0, &records, 50, Codec::Zstd(1), &[]).bytes;
        assert!(read_footer(&file[..file.len() - 3], &[]).is_err(), "a truncated footer");
        let cut = &file[..file.len() / 2];
        assert!(decode_file(cut, &[]).is_err(), "a truncated file");
        let mut flipped = file.clone();
        flipped[20] ^= 0x55;
        assert!(decode_file(&flipped, &[]).is_err(), "a damaged body");
        assert!(matches!(read_footer(b"not zstd at all", &[]), Err(FormatError::Compression(_))));
    }

    #[test]
    fn gzip_files_round_trip_and_gunzip_prints_the_body_then_the_footer() {
        use std::io::Read;
        let records: Vec<Record> = (5..25).map(|o| record(o, b"gz")).collect();
        let file = encode_file("t", 2, 5, &records, 25, Codec::Gzip(6), &[]);
        assert_eq!(file.footer.compression, "gzip");
        assert_eq!(read_footer(&file.bytes, &[]).unwrap(), file.footer);
        assert_eq!(decode_file(&file.bytes, &[]).unwrap().1, records);
        let mut all = Vec::new();
        flate2::read::MultiGzDecoder::new(file.bytes.as_slice()).read_to_end(&mut all).unwrap();
        assert!(all.starts_with(b"{\"offset\":5,"));
        assert!(all.ends_with(b"}"), "the footer member comes last");
        let cut = &file.bytes[..file.bytes.len() - 10];
        assert!(decode_file(cut, &[]).is_err(), "a truncated gzip file");
    }

    #[test]
    fn an_encrypted_file_opens_with_its_key_only_and_holds_the_same_records() {
        let key = age::x25519::Identity::generate();
        let records: Vec<Record> = (0..20).map(|o| record(o, b"secret")).collect();
        let file = encode_file("t", 0, 0, &records, 20, Codec::Zstd(1), &[key.to_public()]);
        assert!(file.footer.encrypted && crate::crypt::is_encrypted(&file.bytes));
        assert!(!file.bytes.windows(6).any(|w| w == b"secret"), "no plaintext in the file");
        assert!(matches!(decode_file(&file.bytes, &[]), Err(FormatError::Encrypted(_))));
        let identities: Vec<Box<dyn age::Identity>> = vec![Box::new(key)];
        let (footer, back) = decode_file(&file.bytes, &identities).unwrap();
        assert_eq!((footer, back), (file.footer.clone(), records));
        assert!(file.footer.public().sha256.is_empty(), "the checksum stays inside the encryption");
    }

    proptest! {
        #[test]
        fn any_records_round_trip(values in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..40), 1..30)) {
            let records: Vec<Record> = values.iter().enumerate().map(|(i, v)| record(i as i64 * 2, v)).collect();
            let next = records.len() as i64 * 2;
            let file = encode_file("topic", 1, 0, &records, next, Codec::Zstd(1), &[]);
            let (footer, back) = decode_file(&file.bytes, &[]).unwrap();
            prop_assert_eq!(back, records);
            prop_assert_eq!(footer.next_offset, next);
        }
    }
}
