//! Signing commands with the operator's SSH key (ed25519), from a key file or an ssh-agent, as
//! `git commit -S` does with SSH keys: `--sign-key` names a private key file, or a public key
//! (`.pub`) whose private half the agent at `SSH_AUTH_SOCK` holds. See `shiva_proto::auth`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use shiva_proto::Envelope;
use shiva_proto::auth;
use shiva_proto::records::Body;
use ssh_key::{HashAlg, PrivateKey, PublicKey, SshSig};

use crate::{CtlError, invalid};

/// Where signatures come from.
enum Source {
    /// A private key file.
    File(Box<PrivateKey>),
    /// An ssh-agent holding the private half of this key.
    Agent { public: PublicKey, socket: PathBuf },
}

/// Signs every command of this run (none without `--sign-key`).
pub struct CommandSigner {
    cluster: String,
    source: Option<Source>,
}

static SIGNER: OnceLock<CommandSigner> = OnceLock::new();

impl CommandSigner {
    /// Reads `--sign-key` (a private key file, or a public key the agent holds).
    pub fn install(cluster: &str, key: Option<&Path>) -> Result<(), CtlError> {
        let source = key.map(read_key).transpose()?;
        let _ = SIGNER.set(CommandSigner { cluster: cluster.to_owned(), source });
        Ok(())
    }

    /// The record of a command on `key`: its envelope, signed when a key was given.
    pub fn record(key: &str, body: Body) -> Result<Vec<u8>, CtlError> {
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let bytes = Envelope::now(format!("ctl:{user}"), None, body).encode();
        let Some(signer) = SIGNER.get() else { return Ok(bytes) };
        let Some(source) = &signer.source else { return Ok(bytes) };
        let parts =
            auth::SignedParts::decode(&bytes).map_err(|err| CtlError::Failed(anyhow::anyhow!(err)))?;
        let at_ms = u64::try_from(shiva_proto::wall::now_ms()).unwrap_or(0);
        let message = auth::message(&signer.cluster, key, &parts, at_ms);
        let (public, sshsig) = match source {
            Source::File(private) => {
                let sshsig = private
                    .sign(auth::NAMESPACE, HashAlg::Sha512, &message)
                    .map_err(|err| CtlError::Failed(anyhow::anyhow!("cannot sign: {err}")))?;
                (private.public_key().clone(), sshsig)
            }
            Source::Agent { public, socket } => {
                let failed = |err: &dyn std::fmt::Display| {
                    CtlError::Failed(anyhow::anyhow!(
                        "the ssh-agent at {} cannot sign: {err}",
                        socket.display()
                    ))
                };
                let mut agent = ssh_agent_client_rs::Client::connect(socket).map_err(|err| failed(&err))?;
                let data = auth::agent_data(&message).map_err(|err| failed(&err))?;
                let signature = agent.sign(public.clone(), &data).map_err(|err| failed(&err))?;
                let sshsig =
                    SshSig::new(public.key_data().clone(), auth::NAMESPACE, HashAlg::Sha512, signature)
                        .map_err(|err| failed(&err))?;
                (public.clone(), sshsig)
            }
        };
        let sig =
            auth::signature(&public, at_ms, &sshsig).map_err(|err| CtlError::Failed(anyhow::anyhow!(err)))?;
        Ok(auth::attach(&bytes, &sig))
    }
}

/// A private key file, or a public key whose private half an ssh-agent holds.
fn read_key(path: &Path) -> Result<Source, CtlError> {
    let bad = |why: String| invalid(format!("--sign-key {}: {why}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|err| bad(err.to_string()))?;
    if let Ok(public) = PublicKey::from_openssh(text.trim()) {
        check_algorithm(public.algorithm()).map_err(bad)?;
        let socket = std::env::var_os("SSH_AUTH_SOCK").map(PathBuf::from).ok_or_else(|| {
            bad("a public key: its private half must be in an ssh-agent, and SSH_AUTH_SOCK is not set".into())
        })?;
        return Ok(Source::Agent { public, socket });
    }
    let private = PrivateKey::from_openssh(&text).map_err(|err| bad(format!("not an OpenSSH key: {err}")))?;
    check_algorithm(private.algorithm()).map_err(bad)?;
    if private.is_encrypted() {
        return Err(bad(
            "the key has a passphrase: add it to ssh-agent (ssh-add) and pass its .pub file instead".into(),
        ));
    }
    Ok(Source::File(Box::new(private)))
}

fn check_algorithm(algorithm: ssh_key::Algorithm) -> Result<(), String> {
    if algorithm == ssh_key::Algorithm::Ed25519 {
        Ok(())
    } else {
        Err(format!("a {algorithm} key: Shiva signs with ed25519 keys (ssh-keygen -t ed25519)"))
    }
}
