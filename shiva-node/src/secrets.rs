//! The node's side of secrets (see `shiva_proto::secret`): its age identity, the secrets it
//! knows of, and their values at launch.
//!
//! Invariants: a value exists only while a run is being launched (in the spawn request on its
//! way to the shim, over a pipe) and in the task's environment or its 0600 file; it is never
//! logged, written to a record, or kept. The identity file is the node's only key.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Mutex;

use anyhow::Context;
use shiva_proto::LogView;
use shiva_proto::TaskId;
use shiva_proto::secret::{self, Secret};
use shiva_proto::spec::SecretRefs;

/// The versions of one secret a node knows: the operator's (with its revision) and the
/// leader's re-encrypted copy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Versions {
    /// `secret/<name>` on `commands`: revision and record.
    pub command: Option<(i64, Secret)>,
    /// `secret/<name>` on `assignments`.
    pub copy: Option<Secret>,
}

impl Versions {
    /// The versions of `name` in `view`.
    pub fn of(view: &LogView, name: &TaskId) -> Versions {
        Versions { command: view.secrets.get(name).cloned(), copy: view.secret_copies.get(name).cloned() }
    }

    /// The record `recipient` can open: the operator's, else the copy of the same revision.
    pub fn for_recipient(&self, name: &TaskId, recipient: &str) -> Result<&Secret, String> {
        let Some((revision, command)) = &self.command else {
            return Err(format!("secret '{name}' is not set (shiva-ctl secret set {name})"));
        };
        if command.recipients.iter().any(|r| r == recipient) {
            return Ok(command);
        }
        match &self.copy {
            Some(copy)
                if copy.source == Some(*revision) && copy.recipients.iter().any(|r| r == recipient) =>
            {
                Ok(copy)
            }
            _ => Err(format!(
                "secret '{name}' is not encrypted to this node yet: the leader re-encrypts it to nodes that \
                 joined after it was set (it must be live and hold it)"
            )),
        }
    }
}

/// This node's identity and the secrets it knows.
pub struct SecretStore {
    identity: age::x25519::Identity,
    recipient: String,
    known: Mutex<BTreeMap<TaskId, Versions>>,
}

impl std::fmt::Debug for SecretStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretStore").field("recipient", &self.recipient).finish_non_exhaustive()
    }
}

impl SecretStore {
    /// Reads `<workspace>/identity.age`, or makes it (mode 0600) on the node's first start.
    pub fn open(workspace: &Path) -> anyhow::Result<SecretStore> {
        let path = workspace.join("identity.age");
        let identity = match std::fs::read_to_string(&path) {
            Ok(text) => {
                secret::parse_identity(&text).map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?
            }
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                let identity = age::x25519::Identity::generate();
                let temporary = workspace.join("identity.age.new");
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&temporary)
                    .with_context(|| format!("cannot write {}", temporary.display()))?;
                use age::secrecy::ExposeSecret;
                writeln!(file, "{}", identity.to_string().expose_secret())?;
                file.sync_all()?;
                std::fs::rename(&temporary, &path)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                identity
            }
            Err(err) => return Err(err).with_context(|| format!("cannot read {}", path.display())),
        };
        let recipient = secret::recipient_of(&identity);
        Ok(SecretStore { identity, recipient, known: Mutex::new(BTreeMap::new()) })
    }

    /// This node's recipient (`age1…`), for its heartbeats.
    pub fn recipient(&self) -> &str {
        &self.recipient
    }

    /// What the view now says of `name`.
    pub fn update(&self, view: &LogView, name: &TaskId) {
        let versions = Versions::of(view, name);
        let mut known = self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if versions == Versions::default() {
            known.remove(name);
        } else {
            known.insert(name.clone(), versions);
        }
    }

    /// The value of `secret`, opened with this node's identity.
    pub fn open_value(&self, secret: &Secret) -> Result<Vec<u8>, String> {
        secret::open(secret, &self.identity)
    }

    /// The values `refs` names, for a launch: environment variables and files (path, text).
    #[allow(clippy::type_complexity)]
    pub fn resolve(
        &self,
        refs: &SecretRefs,
    ) -> Result<(Vec<(String, String)>, Vec<(String, String)>), String> {
        let known = self.known.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
        let value = |name: &str| -> Result<String, String> {
            let name = TaskId::new(name).map_err(|err| format!("secret '{name}': {err}"))?;
            let versions = known.get(&name).cloned().unwrap_or_default();
            let sealed = versions.for_recipient(&name, &self.recipient)?;
            let bytes = self.open_value(sealed)?;
            String::from_utf8(bytes).map_err(|_| format!("secret '{name}' is not UTF-8 text"))
        };
        let env = refs
            .env
            .iter()
            .map(|(var, name)| Ok((var.clone(), value(name)?)))
            .collect::<Result<_, String>>()?;
        let files = refs
            .files
            .iter()
            .map(|(path, name)| Ok((path.clone(), value(name)?)))
            .collect::<Result<_, String>>()?;
        Ok((env, files))
    }
}

/// Leader: the secrets some live node cannot open yet, re-encrypted to every live node (the
/// leader opens them with its own identity): `(name, copy)` to write on `assignments`. A secret
/// the leader cannot open itself is reported in `stuck`.
pub fn reencrypt(
    view: &LogView,
    live: &[String],
    store: &SecretStore,
    stuck: &mut Vec<String>,
) -> Vec<Secret> {
    let mut copies = Vec::new();
    for (name, (revision, _)) in &view.secrets {
        let versions = Versions::of(view, name);
        if live.iter().all(|recipient| versions.for_recipient(name, recipient).is_ok()) {
            continue;
        }
        let Ok(sealed) = versions.for_recipient(name, store.recipient()) else {
            stuck.push(format!("secret '{name}' is not encrypted to the leader: set it again"));
            continue;
        };
        let copy =
            store.open_value(sealed).and_then(|value| secret::seal(name, &value, live, Some(*revision)));
        match copy {
            Ok(copy) => copies.push(copy),
            Err(err) => stuck.push(err),
        }
    }
    copies
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_opens_the_operators_record_or_the_leaders_copy_of_the_same_revision() {
        let (a, b) = (age::x25519::Identity::generate(), age::x25519::Identity::generate());
        let (ra, rb) = (secret::recipient_of(&a), secret::recipient_of(&b));
        let name = TaskId::new("db").unwrap();
        let command = secret::seal(&name, b"v", std::slice::from_ref(&ra), None).unwrap();
        let mut versions = Versions { command: Some((7, command)), copy: None };
        assert!(versions.for_recipient(&name, &ra).is_ok());
        assert!(versions.for_recipient(&name, &rb).unwrap_err().contains("not encrypted to this node"));
        versions.copy = Some(secret::seal(&name, b"v", &[ra.clone(), rb.clone()], Some(6)).unwrap());
        assert!(versions.for_recipient(&name, &rb).is_err(), "a copy of an earlier value does not count");
        versions.copy = Some(secret::seal(&name, b"v", &[ra, rb.clone()], Some(7)).unwrap());
        assert_eq!(secret::open(versions.for_recipient(&name, &rb).unwrap(), &b).unwrap(), b"v");
        assert!(Versions::default().for_recipient(&name, &rb).unwrap_err().contains("not set"));
    }
}
