//! Secrets: values encrypted with age (X25519) to the cluster's nodes, so that no topic ever
//! holds them in clear.
//!
//! * `shiva-ctl secret set NAME` encrypts the value (read from stdin) to the recipients the live
//!   nodes publish in their heartbeats, and writes a [`Secret`] under `secret/<name>` on
//!   `commands` (signed, like every command).
//! * Each node keeps its own age identity in its workspace (`identity.age`, mode 0600).
//! * A spec names secrets in `secrets.env` / `secrets.files`; the runner decrypts them at launch
//!   into the task's environment or a file of its working directory (mode 0600), nowhere else.
//! * A node that joins later gets the value through the leader: when a live node's recipient is
//!   missing from a secret, the leader (itself a recipient) re-encrypts it to every live node and
//!   writes the copy under `secret/<name>` on `assignments`, naming the command's revision
//!   (`source`). A copy counts only for the revision it names.
//!
//! Invariant: no function here logs or returns a value except [`open`], whose caller hands it
//! to the task and drops it.

use std::io::{Read, Write};
use std::str::FromStr;

use base64::Engine;
use serde::{Deserialize, Serialize};

use crate::TaskId;

/// Largest secret value (bytes): it must fit in an environment variable with room to spare.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;

/// The record of a secret (kind `secret`): on `commands` from `shiva-ctl`, on `assignments`
/// from the leader (a re-encrypted copy).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    /// Its name (task-id syntax: 1 to 4 segments).
    pub name: TaskId,
    /// The age file, base64.
    pub ciphertext: String,
    /// The recipients it is encrypted to (`age1…`), as written by its author.
    pub recipients: Vec<String>,
    /// A copy's source: the revision (offset on `commands`) of the secret it re-encrypts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<i64>,
}

/// Whether a task may use a secret: secrets without `/` are shared by every task; a secret
/// `a/b/name` only by the tasks under its directory `a/b/` (so a key allowed `a/b` sets and
/// uses only those, and `a/name` serves every task under `a/`).
pub fn may_use(task: &TaskId, secret: &TaskId) -> bool {
    match secret.as_str().rsplit_once('/') {
        None => true,
        Some((directory, _)) => {
            task.as_str().strip_prefix(directory).is_some_and(|rest| rest.starts_with('/'))
        }
    }
}

/// A node's identity: its recipient goes in its heartbeats.
pub fn recipient_of(identity: &age::x25519::Identity) -> String {
    identity.to_public().to_string()
}

/// Reads an identity as `identity.age` holds it (`AGE-SECRET-KEY-1…`).
pub fn parse_identity(text: &str) -> Result<age::x25519::Identity, String> {
    age::x25519::Identity::from_str(text.trim()).map_err(|err| format!("not an age identity: {err}"))
}

/// The recipients among `texts` that are age recipients (a forged or damaged heartbeat's are
/// left out, so that they cannot stop a secret from reaching the others).
pub fn valid_recipients<'a>(texts: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut valid: Vec<String> = texts
        .into_iter()
        .filter(|text| age::x25519::Recipient::from_str(text).is_ok())
        .map(str::to_owned)
        .collect();
    valid.sort();
    valid.dedup();
    valid
}

/// Encrypts `plain` to `recipients` (at least one).
pub fn encrypt(plain: &[u8], recipients: &[age::x25519::Recipient]) -> Result<Vec<u8>, String> {
    let encryptor = age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
        .map_err(|_| "cannot encrypt: no recipient".to_owned())?;
    let mut out = Vec::with_capacity(plain.len() + 256);
    let mut writer = encryptor.wrap_output(&mut out).map_err(|err| err.to_string())?;
    writer.write_all(plain).map_err(|err| err.to_string())?;
    writer.finish().map_err(|err| err.to_string())?;
    Ok(out)
}

/// Why an age file did not open.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    /// Not an age file.
    #[error("not a readable age file: {0}")]
    Unreadable(String),
    /// None of the identities is a recipient.
    #[error("no identity given opens it")]
    NoIdentity,
    /// The payload does not decrypt whole.
    #[error("damaged or truncated: {0}")]
    Damaged(String),
}

/// Decrypts an age file with any of `identities`.
pub fn decrypt(bytes: &[u8], identities: &[&dyn age::Identity]) -> Result<Vec<u8>, DecryptError> {
    let decryptor = age::Decryptor::new(bytes).map_err(|err| DecryptError::Unreadable(err.to_string()))?;
    let mut reader = decryptor.decrypt(identities.iter().copied()).map_err(|_| DecryptError::NoIdentity)?;
    let mut plain = Vec::new();
    reader.read_to_end(&mut plain).map_err(|err| DecryptError::Damaged(err.to_string()))?;
    Ok(plain)
}

/// A secret record: `value` encrypted to `recipients` (`age1…`).
pub fn seal(
    name: &TaskId,
    value: &[u8],
    recipients: &[String],
    source: Option<i64>,
) -> Result<Secret, String> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("the value is {} bytes; at most {MAX_VALUE_BYTES}", value.len()));
    }
    let parsed = recipients
        .iter()
        .map(|text| {
            age::x25519::Recipient::from_str(text).map_err(|err| format!("recipient '{text}': {err}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let ciphertext = base64::engine::general_purpose::STANDARD.encode(encrypt(value, &parsed)?);
    Ok(Secret { name: name.clone(), ciphertext, recipients: recipients.to_vec(), source })
}

/// The value of `secret`, with this node's identity.
pub fn open(secret: &Secret, identity: &age::x25519::Identity) -> Result<Vec<u8>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&secret.ciphertext)
        .map_err(|err| format!("secret '{}': not base64: {err}", secret.name))?;
    let value = decrypt(&bytes, &[identity as &dyn age::Identity])
        .map_err(|err| format!("secret '{}': {err}", secret.name))?;
    if value.len() > MAX_VALUE_BYTES {
        return Err(format!("secret '{}': {} bytes, above {MAX_VALUE_BYTES}", secret.name, value.len()));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_opens_only_for_its_recipients_and_a_task_uses_only_its_tenants_secrets() {
        let (a, b, outsider) = (
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
            age::x25519::Identity::generate(),
        );
        let name = TaskId::new("tenant-a/db").unwrap();
        let sealed = seal(&name, b"hunter2", &[recipient_of(&a), recipient_of(&b)], None).unwrap();
        assert!(!sealed.ciphertext.contains("hunter2"));
        assert_eq!(open(&sealed, &a).unwrap(), b"hunter2");
        assert_eq!(open(&sealed, &b).unwrap(), b"hunter2");
        assert!(open(&sealed, &outsider).unwrap_err().contains("no identity"));
        assert!(seal(&name, &vec![0; MAX_VALUE_BYTES + 1], &[recipient_of(&a)], None).is_err());
        assert!(seal(&name, b"x", &["age1nope".into()], None).is_err());
        let task = |id| TaskId::new(id).unwrap();
        assert!(may_use(&task("tenant-a/web"), &name));
        assert!(!may_use(&task("tenant-b/web"), &name));
        assert!(!may_use(&task("tenant-ab/web"), &name));
        assert!(may_use(&task("tenant-b/web"), &task("shared")));
        let deep = task("team/a/db");
        assert!(may_use(&task("team/a/web"), &deep));
        assert!(!may_use(&task("team/b/web"), &deep), "a prefix of several segments is a tenant too");
        assert!(may_use(&task("team/b/web"), &task("team/db")), "a team's secret serves its sub-teams");
    }
}
