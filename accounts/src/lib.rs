//! Users and groups read straight from `passwd` and `group` files.
//!
//! The shim is a static binary that must work in images with no NSS modules, and the broker
//! resolves `user`/`group` policy keys the same way, so both parse the files themselves instead
//! of calling `getpwnam`. Only the `files` database is consulted: LDAP/SSSD users are not
//! visible (use numeric ids for those). The directory is a parameter (normally `/etc`) so tests
//! and chroots can point elsewhere.
//!
//! A numeric spec that is not in the file is accepted as-is (like `chown 1234`): a worker may
//! run under a uid that has no passwd entry.

use std::{
    fs,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum AccountsError {
    #[error("failed to read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no user named {name:?} in {path}")]
    NoSuchUser { name: String, path: PathBuf },
    #[error("no group named {name:?} in {path}")]
    NoSuchGroup { name: String, path: PathBuf },
    #[error("invalid {what} {spec:?}: a name or a number below 4294967295 is expected")]
    Invalid { what: &'static str, spec: String },
}

/// One user, as `passwd` describes it (or as a bare number when it is not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Empty when the user was given by a number that has no passwd entry.
    pub name: String,
    pub uid: u32,
    /// Primary group from passwd; `None` when the user has no passwd entry.
    pub gid: Option<u32>,
}

/// One group, as `group` describes it (or as a bare number when it is not listed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub gid: u32,
}

/// Resolve `spec` (a user name or a numeric uid) using `<etc>/passwd`.
pub fn lookup_user(etc: &Path, spec: &str) -> Result<User, AccountsError> {
    let path = etc.join("passwd");
    let number = parse_id("user", spec)?;
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        // A numeric uid needs no file (distroless images may have none).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && number.is_some() => String::new(),
        Err(source) => return Err(AccountsError::Read { path, source }),
    };
    for fields in entries(&text) {
        let (Some(name), Some(uid), Some(gid)) = (fields.first(), fields.get(2), fields.get(3))
        else {
            continue;
        };
        let (Ok(uid), Ok(gid)) = (uid.parse::<u32>(), gid.parse::<u32>()) else {
            continue;
        };
        if number.map_or(*name == spec, |n| n == uid) {
            return Ok(User {
                name: (*name).to_owned(),
                uid,
                gid: Some(gid),
            });
        }
    }
    match number {
        Some(uid) => Ok(User {
            name: String::new(),
            uid,
            gid: None,
        }),
        None => Err(AccountsError::NoSuchUser {
            name: spec.to_owned(),
            path,
        }),
    }
}

/// Resolve `spec` (a group name or a numeric gid) using `<etc>/group`.
pub fn lookup_group(etc: &Path, spec: &str) -> Result<Group, AccountsError> {
    let path = etc.join("group");
    let number = parse_id("group", spec)?;
    let text = match fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && number.is_some() => String::new(),
        Err(source) => return Err(AccountsError::Read { path, source }),
    };
    for fields in entries(&text) {
        let (Some(name), Some(gid)) = (fields.first(), fields.get(2)) else {
            continue;
        };
        let Ok(gid) = gid.parse::<u32>() else {
            continue;
        };
        if number.map_or(*name == spec, |n| n == gid) {
            return Ok(Group {
                name: (*name).to_owned(),
                gid,
            });
        }
    }
    match number {
        Some(gid) => Ok(Group {
            name: String::new(),
            gid,
        }),
        None => Err(AccountsError::NoSuchGroup {
            name: spec.to_owned(),
            path,
        }),
    }
}

/// `Some(n)` for an all-digit spec, `None` for a name; an empty spec, an out-of-range number
/// or `u32::MAX` (which means "no change" to setresuid) is an error.
fn parse_id(what: &'static str, spec: &str) -> Result<Option<u32>, AccountsError> {
    let invalid = || AccountsError::Invalid {
        what,
        spec: spec.to_owned(),
    };
    if spec.is_empty() || spec.contains(':') || spec.contains('\n') {
        return Err(invalid());
    }
    if !spec.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(None);
    }
    match spec.parse::<u32>() {
        Ok(n) if n != u32::MAX => Ok(Some(n)),
        _ => Err(invalid()),
    }
}

/// Colon-separated records, skipping blank lines, comments and NIS `+`/`-` entries.
fn entries(text: &str) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('#') && !l.starts_with('+') && !l.starts_with('-')
        })
        .map(|l| l.split(':').collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etc() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\n# comment\n\nnonroot:x:65532:65533::/home/nonroot:/sbin/nologin\nbroken:x:notanumber:1::/:\n+nis::::::\n",
        )
        .unwrap();
        fs::write(
            dir.path().join("group"),
            "root:x:0:\nfunctions:x:2000:a,b\nnonroot:x:65533:\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn users_resolve_by_name_and_number() {
        let d = etc();
        let cases: &[(&str, Result<User, &str>)] = &[
            (
                "root",
                Ok(User {
                    name: "root".into(),
                    uid: 0,
                    gid: Some(0),
                }),
            ),
            (
                "nonroot",
                Ok(User {
                    name: "nonroot".into(),
                    uid: 65532,
                    gid: Some(65533),
                }),
            ),
            (
                "65532",
                Ok(User {
                    name: "nonroot".into(),
                    uid: 65532,
                    gid: Some(65533),
                }),
            ),
            (
                "4242",
                Ok(User {
                    name: String::new(),
                    uid: 4242,
                    gid: None,
                }),
            ),
            ("ghost", Err("no user named \"ghost\" in ")),
            ("broken", Err("no user named \"broken\" in ")),
            ("", Err("invalid user \"\"")),
            ("4294967295", Err("invalid user \"4294967295\"")),
            ("99999999999", Err("invalid user \"99999999999\"")),
            ("a:b", Err("invalid user \"a:b\"")),
        ];
        for (spec, want) in cases {
            let got = lookup_user(d.path(), spec);
            match (got, want) {
                (Ok(u), Ok(w)) => assert_eq!(&u, w, "{spec}"),
                (Err(e), Err(prefix)) => assert!(e.to_string().starts_with(prefix), "{spec}: {e}"),
                (got, want) => panic!("{spec}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        let d = etc();
        assert_eq!(lookup_group(d.path(), "functions").unwrap().gid, 2000);
        assert_eq!(lookup_group(d.path(), "2000").unwrap().name, "functions");
        assert_eq!(
            lookup_group(d.path(), "7").unwrap(),
            Group {
                name: String::new(),
                gid: 7
            }
        );
        assert!(matches!(
            lookup_group(d.path(), "nope"),
            Err(AccountsError::NoSuchGroup { .. })
        ));
    }

    #[test]
    fn missing_files_allow_numbers_only() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(lookup_user(d.path(), "1000").unwrap().uid, 1000);
        assert_eq!(lookup_group(d.path(), "1000").unwrap().gid, 1000);
        let e = lookup_user(d.path(), "alice").unwrap_err().to_string();
        assert!(
            e.starts_with("failed to read ") && e.contains("passwd"),
            "{e}"
        );
    }
}
