//! `Admin.Scan`: which processes hold a brokered value in `/proc/<pid>/environ` or `cmdline`.
//!
//! The point is to find leaks the broker exists to prevent: a secret still passed through the
//! environment or on a command line (where every uid can read it). The report names processes
//! and secrets, never a value or an offset into one.
//!
//! Trust and limits: this reads other processes' memory images through `/proc`, so it sees
//! only what the broker's own credentials allow (as root: everything but processes hidden by
//! a stricter `hidepid`). A process that exits or cannot be read mid-scan is counted in
//! `skipped`. Values shorter than [`MIN_SCAN_LEN`] bytes are not searched (they would match by
//! chance) and are listed by name in `not_searched`. The bytes read from other processes are
//! zeroized after the search.

use std::collections::{BTreeMap, BTreeSet};

use aho_corasick::{AhoCorasick, MatchKind};
use zeroize::Zeroizing;

use crate::procfs::ProcFs;

/// Shortest value that is searched for.
pub const MIN_SCAN_LEN: usize = 8;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Processes holding at least one value, sorted by pid.
    pub hits: Vec<ScanHit>,
    /// Processes whose environ and cmdline were searched.
    pub scanned: u32,
    /// Processes that vanished or could not be read.
    pub skipped: u32,
    /// Names of secrets too short to search, sorted.
    pub not_searched: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanHit {
    pub pid: u32,
    /// Effective uid (the one `/proc` access checks use).
    pub uid: u32,
    /// `/proc/<pid>/exe`, or empty when it cannot be read (kernel threads, races).
    pub exe: String,
    /// Names whose value appears in `/proc/<pid>/environ`, sorted, without duplicates.
    pub environ: Vec<String>,
    /// Names whose value appears in `/proc/<pid>/cmdline`, sorted, without duplicates.
    pub cmdline: Vec<String>,
}

/// Search every process under `proc` for the given values: `Scanner::new(secrets).run(proc)`.
///
/// `secrets`: (name, value) pairs. Values shorter than [`MIN_SCAN_LEN`] are not searched and
/// are listed (by name) in `not_searched`. All values are searched at once (Aho-Corasick), and
/// a value found inside another is reported too. Two names with the same value are both
/// reported. When no value is long enough, no process is read at all.
pub fn scan<'n, 'v>(
    proc: &ProcFs,
    secrets: impl IntoIterator<Item = (&'n str, &'v [u8])>,
) -> ScanReport {
    Scanner::new(secrets).run(proc)
}

/// The values, compiled for searching and detached from whoever lent them: build it while
/// holding the store's lock, release the lock, then [`Scanner::run`] (which reads all of
/// `/proc` and can take a while).
///
/// It holds copies of the values inside the automaton: drop it as soon as the scan is done.
/// Its `Debug` shows counts only.
pub struct Scanner {
    searcher: Option<AhoCorasick>,
    /// For each pattern of `searcher`, the names holding that value.
    names: Vec<Vec<String>>,
    not_searched: Vec<String>,
}

impl std::fmt::Debug for Scanner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scanner")
            .field("values", &self.names.len())
            .field("not_searched", &self.not_searched)
            .finish_non_exhaustive()
    }
}

impl Scanner {
    /// Compile `secrets` (see [`scan`]).
    pub fn new<'n, 'v>(secrets: impl IntoIterator<Item = (&'n str, &'v [u8])>) -> Scanner {
        let mut not_searched = Vec::new();
        // Unique values, each with the names that hold it.
        let mut by_value: BTreeMap<&[u8], Vec<String>> = BTreeMap::new();
        for (name, value) in secrets {
            if value.len() < MIN_SCAN_LEN {
                not_searched.push(name.to_owned());
            } else {
                by_value.entry(value).or_default().push(name.to_owned());
            }
        }
        let (values, mut names): (Vec<&[u8]>, Vec<Vec<String>>) = by_value.into_iter().unzip();
        let searcher = if values.is_empty() {
            None
        } else {
            match AhoCorasick::builder()
                .match_kind(MatchKind::Standard)
                .build(&values)
            {
                Ok(searcher) => Some(searcher),
                Err(_) => {
                    // Only possible with absurdly many or long values: say so rather than guess.
                    not_searched.extend(names.drain(..).flatten());
                    None
                }
            }
        };
        not_searched.sort();
        not_searched.dedup();
        Scanner {
            searcher,
            names,
            not_searched,
        }
    }

    /// Names of the values that are not searched for (too short).
    pub fn not_searched(&self) -> &[String] {
        &self.not_searched
    }

    /// Read every process under `proc` and report which hold a value.
    pub fn run(&self, proc: &ProcFs) -> ScanReport {
        let mut report = ScanReport {
            not_searched: self.not_searched.clone(),
            ..ScanReport::default()
        };
        let Some(searcher) = &self.searcher else {
            return report;
        };
        let found_in = |haystack: &[u8]| -> Vec<String> {
            let mut found = BTreeSet::new();
            for m in searcher.find_overlapping_iter(haystack) {
                found.extend(&self.names[m.pattern().as_usize()]);
            }
            found.into_iter().cloned().collect()
        };

        let Ok(pids) = proc.pids() else {
            return report;
        };
        for pid in pids {
            let read = || -> Result<_, crate::procfs::ProcError> {
                let status = proc.status(pid)?;
                let cmdline = Zeroizing::new(proc.cmdline(pid)?);
                // Kernel threads and zombies have no user memory: an empty cmdline and an
                // environ that cannot be read. There is nothing in them to leak.
                let environ = match proc.environ(pid) {
                    Ok(e) => Some(Zeroizing::new(e)),
                    Err(_) if cmdline.is_empty() => None,
                    Err(e) => return Err(e),
                };
                Ok((status, environ, cmdline))
            };
            let Ok((status, environ, cmdline)) = read() else {
                report.skipped += 1;
                continue;
            };
            let Some(environ) = environ else { continue };
            report.scanned += 1;
            let environ = found_in(&environ);
            let cmdline = found_in(&cmdline);
            if environ.is_empty() && cmdline.is_empty() {
                continue;
            }
            let exe = proc
                .exe(pid)
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            report.hits.push(ScanHit {
                pid,
                uid: status.uids[1],
                exe,
                environ,
                cmdline,
            });
        }
        report
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::Path;

    const STATUS: &str = "Name:\tx\nUid:\t1000\t1001\t1000\t1000\nGid:\t5\t5\t5\t5\nGroups:\t\n";

    fn process(root: &Path, pid: u32, environ: &[u8], cmdline: &[u8]) {
        let dir = root.join(pid.to_string());
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("status"), STATUS).unwrap();
        fs::write(dir.join("environ"), environ).unwrap();
        fs::write(dir.join("cmdline"), cmdline).unwrap();
    }

    #[test]
    fn fake_proc() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        process(
            r,
            30,
            b"A=1\0DB=postgres://u:hunter2hunter2@db\0",
            b"app\0--token\0tok-0123456789\0",
        );
        process(r, 10, b"X=tok-0123456789\0", b"app\0");
        process(r, 20, b"PATH=/bin\0", b"sleep\x0030\0");
        process(r, 40, b"LONG=xx-prefix-hunter2hunter2-suffix-xx\0", b"");
        // 50 has no status (vanished between listing and reading), 60 no environ (unreadable),
        // 70 looks like a kernel thread (empty cmdline, no environ): not even counted.
        fs::create_dir(r.join("50")).unwrap();
        process(r, 60, b"", b"app\0");
        fs::remove_file(r.join("60/environ")).unwrap();
        process(r, 70, b"", b"");
        fs::remove_file(r.join("70/environ")).unwrap();
        std::os::unix::fs::symlink("/usr/bin/app", r.join("30/exe")).unwrap();
        fs::create_dir(r.join("not-a-pid")).unwrap();

        let secrets: Vec<(&str, &[u8])> = vec![
            ("DB_PASSWORD", b"hunter2hunter2"),
            ("DB_PASSWORD_COPY", b"hunter2hunter2"),
            ("DB_WRAPPED", b"prefix-hunter2hunter2-suffix"),
            ("TOKEN", b"tok-0123456789"),
            ("PIN", b"1234"),
            ("EMPTY", b""),
            ("PIN", b"1234"),
            ("UNUSED", b"nowhere-to-be-found"),
        ];
        let report = scan(&ProcFs::new(r), secrets);
        let s = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(
            report,
            ScanReport {
                hits: vec![
                    ScanHit {
                        pid: 10,
                        uid: 1001,
                        exe: String::new(),
                        environ: s(&["TOKEN"]),
                        cmdline: vec![],
                    },
                    ScanHit {
                        pid: 30,
                        uid: 1001,
                        exe: "/usr/bin/app".into(),
                        environ: s(&["DB_PASSWORD", "DB_PASSWORD_COPY"]),
                        cmdline: s(&["TOKEN"]),
                    },
                    ScanHit {
                        pid: 40,
                        uid: 1001,
                        exe: String::new(),
                        environ: s(&["DB_PASSWORD", "DB_PASSWORD_COPY", "DB_WRAPPED"]),
                        cmdline: vec![],
                    },
                ],
                scanned: 4,
                skipped: 2,
                not_searched: s(&["EMPTY", "PIN"]),
            }
        );
        // No value ever reaches the report.
        let debug = format!("{report:?}");
        for value in ["hunter2", "tok-0123", "1234"] {
            assert!(!debug.contains(value), "{value} leaked");
        }
    }

    #[test]
    fn nothing_long_enough_reads_nothing() {
        let root = tempfile::tempdir().unwrap();
        process(root.path(), 1, b"PIN=1234\0", b"");
        let report = scan(&ProcFs::new(root.path()), [("PIN", &b"1234"[..])]);
        assert_eq!(
            report,
            ScanReport {
                not_searched: vec!["PIN".into()],
                ..ScanReport::default()
            }
        );
        let report = scan(
            &ProcFs::new(root.path().join("gone")),
            [("K", &b"0123456789"[..])],
        );
        assert_eq!(report, ScanReport::default());
    }

    /// The store hands its entries over as `&mut dyn Iterator` under its read lock, where the
    /// name and value lifetimes are unrelated.
    #[test]
    fn accepts_the_stores_iterator() {
        fn with_all<R>(f: impl FnOnce(&mut dyn Iterator<Item = (&str, &[u8])>) -> R) -> R {
            let entries = [("K".to_owned(), b"0123456789".to_vec())];
            let mut it = entries.iter().map(|(n, v)| (n.as_str(), v.as_slice()));
            f(&mut it)
        }
        let root = tempfile::tempdir().unwrap();
        process(root.path(), 5, b"K=0123456789\0", b"");
        let report = with_all(|all| scan(&ProcFs::new(root.path()), all));
        assert_eq!(report.hits.len(), 1);
        assert_eq!(report.hits[0].environ, ["K"]);

        // Or compile under the lock and walk /proc after releasing it.
        let scanner = with_all(|all| Scanner::new(all));
        assert_eq!(
            format!("{scanner:?}"),
            "Scanner { values: 1, not_searched: [], .. }"
        );
        assert_eq!(scanner.run(&ProcFs::new(root.path())), report);
    }

    #[test]
    fn real_child_process() {
        // Unique values, so no other process on the machine can hold them.
        let nonce = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        );
        let env_value = format!("scan-env-{nonce}");
        let arg_value = format!("scan-arg-{nonce}");
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "read line", "sh", &arg_value])
            .env("SCAN_TEST_SECRET", &env_value)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        // `spawn` returns once the child's exec has switched memory maps, which is before the
        // kernel records where argv and envp live: wait until /proc shows the new command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .windows(arg_value.len())
            .any(|w| w == arg_value.as_bytes())
        {
            assert!(
                std::time::Instant::now() < deadline,
                "child never showed its argv"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }

        let secrets = [
            ("ENV_SECRET", env_value.as_bytes()),
            ("ARG_SECRET", arg_value.as_bytes()),
        ];
        let report = scan(&ProcFs::system(), secrets);
        child.kill().unwrap();
        child.wait().unwrap();

        assert!(report.scanned > 1);
        let hits: Vec<&ScanHit> = report.hits.iter().filter(|h| h.pid == pid).collect();
        assert_eq!(hits.len(), 1, "{report:?}");
        assert_eq!(hits[0].environ, ["ENV_SECRET"]);
        assert_eq!(hits[0].cmdline, ["ARG_SECRET"]);
        assert_eq!(hits[0].uid, nix::unistd::geteuid().as_raw());
        assert_eq!(
            Path::new(&hits[0].exe),
            fs::canonicalize("/bin/sh").unwrap()
        );
        // Nothing else (this test process included) holds them.
        assert_eq!(report.hits.len(), 1, "{report:?}");
    }
}
