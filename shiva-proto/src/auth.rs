//! Signed commands: who may write `task/`, `desired/` and `request/` records on `commands`.
//!
//! `shiva-ctl` signs every command with the operator's SSH key (ed25519, the SSHSIG format of
//! `ssh-keygen -Y sign`, namespace [`NAMESPACE`]). The signed message binds the cluster, the
//! record's key (so the task id, and the request id of a run request), its kind, its sender, the
//! signing time and the body: a signature copied to another cluster, key or body does not verify.
//!
//! A node started with `--authorized-keys FILE` holds a [`Policy`]: OpenSSH `authorized_keys`
//! lines, where the option `shiva-tasks="PREFIX[,PREFIX…]"` restricts a key to task ids under
//! those prefixes (a tenant). The view ([`crate::LogView`]) then accepts a command only when its
//! signature verifies with a listed key allowed for the id, and when it is newer than the newest
//! command it accepted on that key: a replayed older command is refused. Everything else is
//! refused, changes nothing, and is shown with its reason.
//!
//! Invariants: verification is pure (no clock, no I/O), so every reader of the same log
//! accepts the same commands; a refused record never changes the task it names.

use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, LineEnding, PublicKey, SshSig};

/// The SSHSIG namespace of Shiva's commands (`ssh-keygen -Y verify -n shiva-command`).
pub const NAMESPACE: &str = "shiva-command";

/// The option of an `authorized_keys` line that restricts a key to task-id prefixes.
pub const TASKS_OPTION: &str = "shiva-tasks";

/// A command's signature, in its envelope (`sig`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// The signer's public key, OpenSSH format without comment (`ssh-ed25519 AAAA…`).
    pub key: String,
    /// When it was signed (the signer's wall clock, milliseconds since the epoch).
    pub at_ms: u64,
    /// The SSHSIG signature, PEM-armoured as `ssh-keygen -Y sign` writes it.
    pub sshsig: String,
}

/// What is signed: every field of the envelope (a command has no incarnation) and the record's
/// key, cluster and signing time.
pub fn message(cluster: &str, key: &str, parts: &SignedParts, at_ms: u64) -> Vec<u8> {
    let SignedParts { v, kind, sender, sent_at_ms, body, .. } = parts;
    let mut message = format!(
        "shiva-command v1\ncluster={cluster}\nkey={key}\nv={v}\nkind={kind}\nsender={sender}\n\
         sent_at_ms={sent_at_ms}\nat_ms={at_ms}\n\n"
    )
    .into_bytes();
    message.extend_from_slice(&canonical(body));
    message
}

/// A body's bytes as signed: the JSON text of its value, as `serde_json` writes it. A reader
/// recomputes it from the body it parsed, so the signature does not depend on whitespace.
pub fn canonical(body: &serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(body).expect("JSON values serialise")
}

/// Builds a [`Signature`] from an SSHSIG made over [`message`] by a key file or an agent.
pub fn signature(key: &PublicKey, at_ms: u64, sshsig: &SshSig) -> Result<Signature, String> {
    let key = PublicKey::new(key.key_data().clone(), "").to_openssh().map_err(|err| err.to_string())?;
    let sshsig = sshsig.to_pem(LineEnding::LF).map_err(|err| err.to_string())?;
    Ok(Signature { key, at_ms, sshsig })
}

/// The data an SSH agent signs for an SSHSIG over `message` (SHA-512, as ssh-keygen).
pub fn agent_data(message: &[u8]) -> Result<Vec<u8>, String> {
    SshSig::signed_data(NAMESPACE, HashAlg::Sha512, message).map_err(|err| err.to_string())
}

/// One `authorized_keys` line.
#[derive(Debug, Clone)]
struct Authorized {
    key: PublicKey,
    /// Task-id prefixes this key may command (`None`: any).
    prefixes: Option<Vec<String>>,
}

/// Who may command the cluster: the nodes' `--authorized-keys`.
#[derive(Debug, Clone)]
pub struct Policy {
    cluster: String,
    keys: Vec<Authorized>,
    text: String,
}

/// Who signed an accepted command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Signer {
    /// The key's SHA-256 fingerprint (`SHA256:…`, as `ssh-keygen -l` prints it).
    pub fingerprint: String,
    /// The comment of its `authorized_keys` line (often user@host).
    pub comment: String,
    /// When it was signed.
    pub at_ms: u64,
    /// The signature (PEM), to tell the same command written again from another.
    #[serde(skip)]
    pub sshsig: String,
}

impl Policy {
    /// Parses `authorized_keys` text for `cluster`. Only ed25519 keys are taken; a line that
    /// cannot be read is an error naming the line.
    pub fn parse(cluster: &str, text: &str) -> Result<Policy, String> {
        let mut keys = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let at = |why: String| format!("line {}: {why}", number + 1);
            let entry = ssh_key::authorized_keys::Entry::from_str(line).map_err(|err| at(err.to_string()))?;
            if entry.public_key().algorithm() != ssh_key::Algorithm::Ed25519 {
                return Err(at(format!(
                    "a {} key: Shiva takes ed25519 keys only (ssh-keygen -t ed25519)",
                    entry.public_key().algorithm()
                )));
            }
            let mut prefixes: Option<Vec<String>> = None;
            for option in entry.config_opts().iter() {
                let (name, value) = option.split_once('=').unwrap_or((option, ""));
                if name != TASKS_OPTION {
                    return Err(at(format!(
                        "unknown option '{name}' (Shiva reads only {TASKS_OPTION}=\"PREFIX,…\")"
                    )));
                }
                let value = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(value);
                for prefix in value.split(',').map(str::trim) {
                    let prefix = prefix.trim_end_matches('/');
                    if prefix.is_empty() {
                        return Err(at(format!("{TASKS_OPTION}: an empty prefix")));
                    }
                    prefixes.get_or_insert_with(Vec::new).push(prefix.to_owned());
                }
            }
            keys.push(Authorized { key: entry.public_key().clone(), prefixes });
        }
        if keys.is_empty() {
            return Err(
                "no key: the file lists no ed25519 key (an empty list would refuse every command)".into()
            );
        }
        Ok(Policy { cluster: cluster.to_owned(), keys, text: text.to_owned() })
    }

    /// The `authorized_keys` text it was read from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// Whether `key` (OpenSSH text) is listed with task prefixes (a tenant's key).
    pub fn is_restricted(&self, key: &str) -> bool {
        let Ok(public) = PublicKey::from_openssh(key) else { return false };
        self.keys
            .iter()
            .any(|authorized| authorized.key.key_data() == public.key_data() && authorized.prefixes.is_some())
    }

    /// How many keys it lists.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always false: a policy lists at least one key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks a command read off `key`: its signature, its key, the task id it names. `newest`
    /// is the signing time of the newest command accepted on the same record key, with that
    /// command's signature while it stands (not deleted since).
    pub fn check(
        &self,
        key: &str,
        task: &str,
        parts: &SignedParts,
        newest: Option<(u64, Option<&str>)>,
    ) -> Result<Signer, String> {
        let sig = parts
            .sig
            .as_ref()
            .ok_or("unsigned: this cluster accepts only signed commands (shiva-ctl --sign-key)")?;
        let public =
            PublicKey::from_openssh(&sig.key).map_err(|err| format!("unreadable signing key: {err}"))?;
        let listed =
            self.keys.iter().find(|authorized| authorized.key.key_data() == public.key_data()).ok_or_else(
                || format!("signed by {}, a key not in --authorized-keys", fingerprint(&public)),
            )?;
        let sshsig = SshSig::from_pem(&sig.sshsig).map_err(|err| format!("unreadable signature: {err}"))?;
        if sshsig.public_key() != public.key_data() {
            return Err("the signature was made by another key than the one it names".into());
        }
        if parts.incarnation.is_some() {
            return Err("a command carries no incarnation (it is not a node's record)".into());
        }
        let message = message(&self.cluster, key, parts, sig.at_ms);
        public.verify(NAMESPACE, &message, &sshsig).map_err(|_| {
            "bad signature: it does not match this command (altered, or signed for another cluster or key)".to_owned()
        })?;
        if let Some(prefixes) = &listed.prefixes
            && !prefixes.iter().any(|prefix| {
                task == prefix || task.strip_prefix(prefix.as_str()).is_some_and(|rest| rest.starts_with('/'))
            })
        {
            return Err(format!(
                "key {} may command only tasks under {}",
                fingerprint(&public),
                prefixes.iter().map(|prefix| format!("{prefix}/")).collect::<Vec<_>>().join(", ")
            ));
        }
        // Not newer than the accepted command: a replay, unless it is that very command written
        // again while it stands (the leader does, so that compaction keeps it: see
        // `LogView::command_repairs`).
        if let Some((newest, standing)) = newest
            && (sig.at_ms < newest || (sig.at_ms == newest && standing != Some(sig.sshsig.as_str())))
        {
            return Err(format!(
                "replayed: signed at {} ms, not after the command already accepted on '{key}' (signed at {newest} ms)",
                sig.at_ms
            ));
        }
        Ok(Signer {
            sshsig: sig.sshsig.clone(),
            fingerprint: fingerprint(&public),
            comment: listed.key.comment().to_owned(),
            at_ms: sig.at_ms,
        })
    }
}

/// `SHA256:…` of a key.
pub fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

impl Signer {
    /// Whose key a signature names, without checking it (an open cluster checks none).
    pub fn unverified(sig: &Signature) -> Signer {
        let fingerprint = PublicKey::from_openssh(&sig.key)
            .map(|key| format!("{} (not checked: open cluster)", fingerprint(&key)))
            .unwrap_or_else(|_| "unreadable key".to_owned());
        Signer { fingerprint, comment: String::new(), at_ms: sig.at_ms, sshsig: sig.sshsig.clone() }
    }
}

/// What a command's check reads of its record: header, body as JSON, and signature.
#[derive(Debug, Clone, Deserialize)]
pub struct SignedParts {
    /// Envelope version.
    pub v: u16,
    /// Kind.
    pub kind: String,
    /// A node's incarnation (a command has none).
    #[serde(default)]
    pub incarnation: Option<serde_json::Value>,
    /// Sender.
    pub sender: String,
    /// Sender's clock.
    #[serde(default)]
    pub sent_at_ms: u64,
    /// The body, as JSON.
    pub body: serde_json::Value,
    /// The signature, when signed.
    #[serde(default)]
    pub sig: Option<Signature>,
}

impl SignedParts {
    /// Reads a record's value.
    pub fn decode(value: &[u8]) -> Result<SignedParts, String> {
        if value.len() > crate::records::MAX_RECORD_BYTES {
            return Err("record too large".into());
        }
        serde_json::from_slice(value).map_err(|err| format!("unreadable command: {err}"))
    }
}

/// Adds `sig` to an encoded envelope.
pub fn attach(envelope: &[u8], sig: &Signature) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(envelope).expect("an encoded envelope is JSON");
    value["sig"] = serde_json::to_value(sig).expect("signatures serialise");
    serde_json::to_vec(&value).expect("JSON values serialise")
}

use std::str::FromStr;

#[cfg(test)]
mod tests;
