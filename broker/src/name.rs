//! Secret names: the only form in which a name from a request enters the broker.
//!
//! A name is 1–256 bytes of `A-Z a-z 0-9 _ . - /`, with no leading `/`, no empty segment
//! (so no trailing `/` and no `//`) and no `..` segment; a single `.` segment is allowed.
//! `/` separates segments so names can be grouped (`apps/orders/db`) and scope patterns can
//! grant a subtree (`apps/orders/**`).
//!
//! Names are compared byte for byte: nothing is normalised, so `a/./b` and `a/b` are two
//! different names. Errors say what is wrong and where, never the rejected text itself: a
//! confused caller may have sent a value where a name belongs.

use std::fmt;

/// Longest accepted name, in bytes.
pub const MAX_NAME_LEN: usize = 256;

/// A validated secret name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct SecretName(String);

/// Why a string is not a valid secret name. Positions are 1-based byte offsets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("invalid secret name: empty")]
    Empty,
    #[error("invalid secret name: {len} bytes long, at most {MAX_NAME_LEN} are allowed")]
    TooLong { len: usize },
    #[error("invalid secret name: byte {pos} is not one of A-Z a-z 0-9 _ . - /")]
    BadByte { pos: usize },
    #[error("invalid secret name: it starts with /")]
    LeadingSlash,
    #[error("invalid secret name: empty segment at byte {pos} (a trailing / or //)")]
    EmptySegment { pos: usize },
    #[error("invalid secret name: .. segment at byte {pos}")]
    DotDotSegment { pos: usize },
}

impl SecretName {
    /// Validate `s` as a secret name.
    pub fn parse(s: &str) -> Result<SecretName, NameError> {
        let bytes = s.as_bytes();
        if bytes.is_empty() {
            return Err(NameError::Empty);
        }
        if bytes.len() > MAX_NAME_LEN {
            return Err(NameError::TooLong { len: bytes.len() });
        }
        if let Some(i) = bytes.iter().position(|&b| !is_name_byte(b)) {
            return Err(NameError::BadByte { pos: i + 1 });
        }
        if bytes[0] == b'/' {
            return Err(NameError::LeadingSlash);
        }
        let mut start = 0;
        for segment in s.split('/') {
            match segment {
                "" => return Err(NameError::EmptySegment { pos: start + 1 }),
                ".." => return Err(NameError::DotDotSegment { pos: start + 1 }),
                _ => {}
            }
            start += segment.len() + 1;
        }
        Ok(SecretName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

/// Whether `b` may appear in a secret name.
pub fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'/')
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::borrow::Borrow<str> for SecretName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SecretName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for SecretName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SecretName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules() {
        let long_ok = "a".repeat(256);
        let too_long = "a".repeat(257);
        let cases: &[(&str, Result<(), NameError>)] = &[
            ("A", Ok(())),
            ("ORDERS_DB", Ok(())),
            ("orders-db.v2", Ok(())),
            ("apps/orders/db", Ok(())),
            ("a/./b", Ok(())),
            (".", Ok(())),
            (".hidden", Ok(())),
            ("a..b", Ok(())),
            ("...", Ok(())),
            ("0123456789", Ok(())),
            (&long_ok, Ok(())),
            ("", Err(NameError::Empty)),
            (&too_long, Err(NameError::TooLong { len: 257 })),
            ("ab c", Err(NameError::BadByte { pos: 3 })),
            ("a=b", Err(NameError::BadByte { pos: 2 })),
            ("a\0", Err(NameError::BadByte { pos: 2 })),
            ("é", Err(NameError::BadByte { pos: 1 })),
            ("a\nb", Err(NameError::BadByte { pos: 2 })),
            ("a*", Err(NameError::BadByte { pos: 2 })),
            ("/a", Err(NameError::LeadingSlash)),
            ("/", Err(NameError::LeadingSlash)),
            ("a/", Err(NameError::EmptySegment { pos: 3 })),
            ("a//b", Err(NameError::EmptySegment { pos: 3 })),
            ("..", Err(NameError::DotDotSegment { pos: 1 })),
            ("a/..", Err(NameError::DotDotSegment { pos: 3 })),
            ("a/../b", Err(NameError::DotDotSegment { pos: 3 })),
        ];
        for (input, want) in cases {
            let got = SecretName::parse(input).map(|n| assert_eq!(n.as_str(), *input));
            assert_eq!(&got, want, "input {input:?}");
        }
    }

    #[test]
    fn every_single_byte() {
        for b in 0..=255u8 {
            let Ok(s) = std::str::from_utf8(std::slice::from_ref(&b)) else {
                continue;
            };
            let want = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
            assert_eq!(SecretName::parse(s).is_ok(), want, "byte {b}");
            assert_eq!(is_name_byte(b), want || b == b'/', "byte {b}");
        }
    }

    #[test]
    fn messages_never_echo_the_input() {
        let cases = [
            ("", "invalid secret name: empty"),
            (
                "hunter2 secret value",
                "invalid secret name: byte 8 is not one of A-Z a-z 0-9 _ . - /",
            ),
            ("/etc/shadow", "invalid secret name: it starts with /"),
            (
                "x//y",
                "invalid secret name: empty segment at byte 3 (a trailing / or //)",
            ),
            ("x/../y", "invalid secret name: .. segment at byte 3"),
        ];
        for (input, want) in cases {
            assert_eq!(SecretName::parse(input).unwrap_err().to_string(), want);
        }
        let long = "s3cr3tvalue".repeat(30);
        let msg = SecretName::parse(&long).unwrap_err().to_string();
        assert_eq!(
            msg,
            "invalid secret name: 330 bytes long, at most 256 are allowed"
        );
    }

    #[test]
    fn display_borrow_and_order() {
        let a = SecretName::parse("a/b").unwrap();
        assert_eq!(a.to_string(), "a/b");
        let set: std::collections::BTreeSet<SecretName> = ["b", "a"]
            .into_iter()
            .map(|s| SecretName::parse(s).unwrap())
            .collect();
        assert!(set.contains("a"));
        assert_eq!(
            set.iter().map(SecretName::as_str).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }
}
