//! Encryption of archive files to age recipients (X25519): compress first, then encrypt, so the
//! stock `age -d -i key.txt FILE | zstdcat` reads a file. The footer is inside the encryption;
//! its non-secret fields travel beside the file (sidecar and extended attribute), so resuming and
//! a structural `fsck` need no private key.

use std::path::Path;
use std::str::FromStr;

use anyhow::{Context, bail};
use shiva_proto::secret::DecryptError;

/// The first line of every age file.
const AGE_MAGIC: &[u8] = b"age-encryption.org/v1\n";

/// Whether `bytes` are an age file.
pub fn is_encrypted(bytes: &[u8]) -> bool {
    bytes.starts_with(AGE_MAGIC)
}

/// Encrypts `plain` to `recipients` (at least one).
pub fn encrypt(plain: &[u8], recipients: &[age::x25519::Recipient]) -> anyhow::Result<Vec<u8>> {
    shiva_proto::secret::encrypt(plain, recipients).map_err(|err| anyhow::anyhow!("cannot encrypt: {err}"))
}

/// Decrypts an age file with any of `identities`.
pub fn decrypt(bytes: &[u8], identities: &[Box<dyn age::Identity>]) -> anyhow::Result<Vec<u8>> {
    if identities.is_empty() {
        bail!("the file is encrypted: pass --identity with a key of one of its recipients");
    }
    let identities: Vec<&dyn age::Identity> = identities.iter().map(|i| i.as_ref()).collect();
    shiva_proto::secret::decrypt(bytes, &identities).map_err(|err| match err {
        DecryptError::Unreadable(why) => anyhow::anyhow!("not a readable age file: {why}"),
        DecryptError::NoIdentity => anyhow::anyhow!("none of the --identity keys opens this file"),
        DecryptError::Damaged(why) => anyhow::anyhow!("the encrypted file is damaged or truncated: {why}"),
    })
}

/// Recipients from `--recipient` values and `--recipients-file` files (one per line, `#`
/// comments).
pub fn recipients(
    values: &[String],
    files: &[std::path::PathBuf],
) -> anyhow::Result<Vec<age::x25519::Recipient>> {
    let mut found = Vec::new();
    for value in values {
        found.push(
            age::x25519::Recipient::from_str(value.trim()).map_err(|err| {
                anyhow::anyhow!("--recipient '{value}': not an age recipient (age1…): {err}")
            })?,
        );
    }
    for file in files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("--recipients-file {}: cannot read it", file.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            found.push(age::x25519::Recipient::from_str(line).map_err(|err| {
                anyhow::anyhow!(
                    "--recipients-file {} line {}: not an age recipient: {err}",
                    file.display(),
                    number + 1
                )
            })?);
        }
    }
    Ok(found)
}

/// Identities from `--identity` files (age identity files, as `age-keygen` writes them).
pub fn identities(files: &[std::path::PathBuf]) -> anyhow::Result<Vec<Box<dyn age::Identity>>> {
    let mut found = Vec::new();
    for file in files {
        found.extend(load(file)?);
    }
    Ok(found)
}

fn load(file: &Path) -> anyhow::Result<Vec<Box<dyn age::Identity>>> {
    let name = file.display().to_string();
    let parsed = age::IdentityFile::from_file(name.clone())
        .with_context(|| format!("--identity {name}: cannot read it"))?;
    let identities = parsed
        .into_identities()
        .map_err(|err| anyhow::anyhow!("--identity {name}: not an age identity file: {err}"))?;
    if identities.is_empty() {
        bail!("--identity {name}: holds no identity");
    }
    Ok(identities)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_the_wrong_key_is_refused() {
        let key = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let sealed = encrypt(b"secret records", &[key.to_public(), other.to_public()]).unwrap();
        assert!(is_encrypted(&sealed));
        let mine: Vec<Box<dyn age::Identity>> = vec![Box::new(key)];
        assert_eq!(decrypt(&sealed, &mine).unwrap(), b"secret records");
        let stranger: Vec<Box<dyn age::Identity>> = vec![Box::new(age::x25519::Identity::generate())];
        assert!(decrypt(&sealed, &stranger).is_err());
        assert!(decrypt(&sealed, &[]).unwrap_err().to_string().contains("--identity"));
        assert!(recipients(&["nope".into()], &[]).unwrap_err().to_string().contains("--recipient 'nope'"));
    }
}
