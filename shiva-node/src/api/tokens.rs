//! `--api-tokens FILE`: the bearer tokens the HTTP API accepts.
//!
//! One token per line, `SCOPE NAME TOKEN`: SCOPE is `read` (every GET) or `write` (reads and
//! commands); NAME names its holder in the node's log and in the `sender` of the commands it
//! writes (`api:NAME@NODE`); TOKEN is at least 16 and at most 512 printable ASCII characters.
//! Blank lines and lines starting with `#` are skipped. Tokens are kept and compared as SHA-256
//! digests, in constant time.

use subtle::ConstantTimeEq;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// GET requests.
    Read,
    /// Everything.
    Write,
}

impl Scope {
    /// Whether a token of this scope may make a request that needs `needs`.
    pub fn allows(self, needs: Scope) -> bool {
        self == Scope::Write || needs == Scope::Read
    }
}

/// One token.
#[derive(Debug, Clone)]
pub struct Token {
    /// Its holder.
    pub name: String,
    /// What it may do.
    pub scope: Scope,
    /// The token's SHA-256: compared instead of the token, so that the time a comparison takes
    /// does not depend on the presented token's length either.
    digest: [u8; 32],
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).into()
}

/// The tokens of a file.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Token>);

/// Shortest token accepted.
pub const MIN_TOKEN: usize = 16;
const MAX_TOKEN: usize = 512;

impl Tokens {
    /// Parses a tokens file; an error names the line and what is wrong with it.
    pub fn parse(text: &str) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = line.split_whitespace().collect();
            let [scope, name, secret] = words[..] else {
                return Err(format!(
                    "line {number}: expected SCOPE NAME TOKEN, found {} word(s)",
                    words.len()
                ));
            };
            let scope = match scope {
                "read" => Scope::Read,
                "write" => Scope::Write,
                other => return Err(format!("line {number}: scope '{other}': expected read or write")),
            };
            if name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
                return Err(format!("line {number}: name '{name}': at most 64 of A-Z a-z 0-9 - _ . @"));
            }
            if !(MIN_TOKEN..=MAX_TOKEN).contains(&secret.len())
                || !secret.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(format!(
                    "line {number}: the token of '{name}' must be {MIN_TOKEN} to {MAX_TOKEN} printable ASCII characters"
                ));
            }
            if tokens.iter().any(|token: &Token| token.name == name) {
                return Err(format!("line {number}: name '{name}' is given twice"));
            }
            let hashed = digest(secret);
            if tokens.iter().any(|token: &Token| token.digest == hashed) {
                return Err(format!("line {number}: the token of '{name}' is given twice"));
            }
            tokens.push(Token { name: name.to_owned(), scope, digest: hashed });
        }
        if tokens.is_empty() {
            return Err("no token in the file".into());
        }
        Ok(Tokens(tokens))
    }

    /// The token `presented`, if it is one of these. Every token is compared, each in constant
    /// time, so the answer's timing tells nothing of which one matched or how closely.
    pub fn find(&self, presented: &str) -> Option<&Token> {
        let presented = digest(presented);
        let mut found = None;
        for token in &self.0 {
            if bool::from(token.digest.ct_eq(&presented)) {
                found = Some(token);
            }
        }
        found
    }

    /// Whether any token may write.
    pub fn any_writer(&self) -> bool {
        self.0.iter().any(|token| token.scope == Scope::Write)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_found_by_secret_with_their_scope() {
        let tokens =
            Tokens::parse("# ops\nwrite alice aaaaaaaaaaaaaaaaaaaa\n\nread grafana bbbbbbbbbbbbbbbbbbbb\n")
                .unwrap();
        assert_eq!(tokens.find("aaaaaaaaaaaaaaaaaaaa").unwrap().name, "alice");
        assert_eq!(tokens.find("bbbbbbbbbbbbbbbbbbbb").unwrap().scope, Scope::Read);
        assert!(tokens.find("aaaaaaaaaaaaaaaaaaa").is_none());
        assert!(tokens.find("").is_none());
        assert!(Scope::Write.allows(Scope::Write) && !Scope::Read.allows(Scope::Write));
    }

    #[test]
    fn a_bad_file_names_the_line_and_the_fault() {
        let err = |text: &str| Tokens::parse(text).unwrap_err();
        assert!(err("write alice short").contains("line 1: the token of 'alice' must be 16"));
        assert!(err("\nadmin alice aaaaaaaaaaaaaaaaaaaa").contains("line 2: scope 'admin'"));
        assert!(err("write alice").contains("line 1: expected SCOPE NAME TOKEN"));
        assert!(err("write a aaaaaaaaaaaaaaaaaaaa\nread b aaaaaaaaaaaaaaaaaaaa").contains("given twice"));
        assert!(err("# nothing\n").contains("no token"));
    }
}
