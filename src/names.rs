//! Names of images, pools and users: one rule everywhere, checked at the edge.
//!
//! Names become file names, domain names and XML text, so the alphabet is small on purpose:
//! no path separators, no quotes, nothing a shell or an XML parser would read as syntax.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum NameError {
    #[error(
        "{kind} name '{name}' is not allowed: use 1 to 63 characters from a-z, 0-9, '.', '_' and '-', starting with a letter or digit"
    )]
    Invalid { kind: &'static str, name: String },
}

/// Check `name` against `[a-z0-9][a-z0-9._-]{0,62}`; `kind` ("image", "pool", ...) names it in errors.
pub fn validate(kind: &'static str, name: &str) -> Result<(), NameError> {
    let bytes = name.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 63
        && (bytes[0].is_ascii_lowercase() || bytes[0].is_ascii_digit())
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid {
            kind,
            // Keep the message one printable line even for hostile input.
            name: name.escape_default().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for n in ["a", "win11-office", "w.10_x-2", "0abc", &"a".repeat(63)] {
            assert_eq!(validate("image", n), Ok(()), "{n}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        for n in ["", "-a", ".a", "_a", "A", "a/b", "../x", "a b", "a'b", "a<b", "ä", "a\n", &"a".repeat(64)] {
            assert!(validate("image", n).is_err(), "{n:?} must be refused");
        }
    }

    #[test]
    fn error_names_the_kind_and_the_name() {
        let e = validate("pool", "Bad/Name").unwrap_err().to_string();
        assert!(e.contains("pool name 'Bad/Name'"), "{e}");
    }
}
