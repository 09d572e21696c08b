//! Reading `/proc/<pid>/…`, with the root as a parameter so tests can pass a fake tree.
//!
//! Everything here is a snapshot: a pid may exit (and even be reused) between two reads, so
//! callers that need "the same process" must check it with a pidfd or the start time. A
//! process that is gone shows as a read error for which [`ProcError::is_gone`] is true.
//!
//! `environ` and `cmdline` may hold secret values: callers own the returned bytes and must
//! zeroize them; this module never logs or formats their contents.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("failed to read {}: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    /// The file was read but is not in the expected format. For [`parse_stat`] and
    /// [`parse_status`] called directly, `path` is just the file name (`stat`, `status`).
    #[error("failed to parse {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
}

impl ProcError {
    /// True when the process (or the whole entry) no longer exists.
    pub fn is_gone(&self) -> bool {
        match self {
            ProcError::Read { error, .. } => {
                error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
            }
            ProcError::Parse { .. } => false,
        }
    }

    fn with_path(self, path: &Path) -> ProcError {
        match self {
            ProcError::Parse { reason, .. } => ProcError::Parse {
                path: path.to_owned(),
                reason,
            },
            e => e,
        }
    }
}

impl ProcFs {
    pub fn new(root: impl Into<PathBuf>) -> ProcFs {
        ProcFs { root: root.into() }
    }

    /// The real `/proc`.
    pub fn system() -> ProcFs {
        ProcFs::new("/proc")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `<root>/<pid>/<file>`.
    pub fn path(&self, pid: u32, file: &str) -> PathBuf {
        self.root.join(pid.to_string()).join(file)
    }

    fn read(&self, pid: u32, file: &str) -> Result<(PathBuf, Vec<u8>), ProcError> {
        let path = self.path(pid, file);
        match fs::read(&path) {
            Ok(bytes) => Ok((path, bytes)),
            Err(error) => Err(ProcError::Read { path, error }),
        }
    }

    pub fn stat(&self, pid: u32) -> Result<Stat, ProcError> {
        let (path, bytes) = self.read(pid, "stat")?;
        // comm is whatever the process named itself: not necessarily UTF-8.
        parse_stat(&String::from_utf8_lossy(&bytes)).map_err(|e| e.with_path(&path))
    }

    pub fn status(&self, pid: u32) -> Result<Status, ProcError> {
        let (path, bytes) = self.read(pid, "status")?;
        parse_status(&String::from_utf8_lossy(&bytes)).map_err(|e| e.with_path(&path))
    }

    /// The resolved path of the executable (`readlink /proc/<pid>/exe`). A binary deleted
    /// since it started reads as `"<path> (deleted)"`, exactly as the kernel says.
    pub fn exe(&self, pid: u32) -> Result<PathBuf, ProcError> {
        let path = self.path(pid, "exe");
        fs::read_link(&path).map_err(|error| ProcError::Read { path, error })
    }

    /// The initial environment block (NUL-separated `NAME=value`). May hold secrets.
    pub fn environ(&self, pid: u32) -> Result<Vec<u8>, ProcError> {
        self.read(pid, "environ").map(|(_, bytes)| bytes)
    }

    /// The argument block (NUL-separated). Readable by every uid; may hold secrets.
    pub fn cmdline(&self, pid: u32) -> Result<Vec<u8>, ProcError> {
        self.read(pid, "cmdline").map(|(_, bytes)| bytes)
    }

    /// The numeric entries of the root, sorted.
    pub fn pids(&self) -> Result<Vec<u32>, ProcError> {
        let read_err = |error| ProcError::Read {
            path: self.root.clone(),
            error,
        };
        let mut pids = Vec::new();
        for entry in fs::read_dir(&self.root).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            if let Some(pid) = entry.file_name().to_str().and_then(parse_pid) {
                pids.push(pid);
            }
        }
        pids.sort_unstable();
        Ok(pids)
    }
}

fn parse_pid(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// The fields of `/proc/<pid>/stat` the broker uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub pid: u32,
    pub comm: String,
    pub state: char,
    pub ppid: u32,
    /// Clock ticks after boot (field 22): with the pid, it identifies a process across time.
    pub starttime: u64,
    /// Address range of the initial environment block (fields 50 and 51; 0 when the reader
    /// may not see them).
    pub env_start: u64,
    pub env_end: u64,
}

/// Parse `/proc/<pid>/stat`. `comm` may hold spaces, `(` and `)`, so the fixed fields are
/// split after the LAST `)`.
pub fn parse_stat(text: &str) -> Result<Stat, ProcError> {
    let bad = |reason: &str| ProcError::Parse {
        path: PathBuf::from("stat"),
        reason: reason.to_owned(),
    };
    let text = text.trim_end_matches('\n');
    let open = text
        .find('(')
        .ok_or_else(|| bad("no `(` before the command name"))?;
    let close = text
        .rfind(')')
        .ok_or_else(|| bad("no `)` after the command name"))?;
    if close < open {
        return Err(bad("no `)` after the command name"));
    }
    let pid = parse_pid(text[..open].trim()).ok_or_else(|| bad("the pid is not a number"))?;
    let comm = text[open + 1..close].to_owned();
    // Fields from 3 (state) on; index i here is field i + 3.
    let rest: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    let field = |n: usize| -> Result<&str, ProcError> {
        rest.get(n - 3).copied().ok_or_else(|| {
            bad(&format!(
                "only {} fields, field {n} is missing",
                rest.len() + 2
            ))
        })
    };
    let number = |n: usize| -> Result<u64, ProcError> {
        field(n)?
            .parse::<u64>()
            .map_err(|_| bad(&format!("field {n} is not a number")))
    };
    let mut state = field(3)?.chars();
    let (Some(state), None) = (state.next(), state.next()) else {
        return Err(bad("field 3 (state) is not one character"));
    };
    let ppid = u32::try_from(number(4)?).map_err(|_| bad("field 4 (ppid) is out of range"))?;
    Ok(Stat {
        pid,
        comm,
        state,
        ppid,
        starttime: number(22)?,
        env_start: number(50)?,
        env_end: number(51)?,
    })
}

/// The ids in `/proc/<pid>/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Real, effective, saved, filesystem.
    pub uids: [u32; 4],
    /// Real, effective, saved, filesystem.
    pub gids: [u32; 4],
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Parse `/proc/<pid>/status`: `Uid:`, `Gid:` and `Groups:` are required.
pub fn parse_status(text: &str) -> Result<Status, ProcError> {
    let bad = |reason: String| ProcError::Parse {
        path: PathBuf::from("status"),
        reason,
    };
    let ids = |key: &str, value: &str| -> Result<Vec<u32>, ProcError> {
        value
            .split_ascii_whitespace()
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| bad(format!("`{key}` holds a non-number")))
            })
            .collect()
    };
    let four = |key: &str, value: &str| -> Result<[u32; 4], ProcError> {
        <[u32; 4]>::try_from(ids(key, value)?)
            .map_err(|_| bad(format!("`{key}` does not hold 4 ids")))
    };
    let (mut uids, mut gids, mut groups) = (None, None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Uid" => uids = Some(four(key, value)?),
            "Gid" => gids = Some(four(key, value)?),
            "Groups" => groups = Some(ids(key, value)?),
            _ => {}
        }
    }
    let missing = |key: &str| bad(format!("no `{key}:` line"));
    Ok(Status {
        uids: uids.ok_or_else(|| missing("Uid"))?,
        gids: gids.ok_or_else(|| missing("Gid"))?,
        groups: groups.ok_or_else(|| missing("Groups"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stat line with fields 1 to `last`: field n (from 4 on) is n * 10 and state is `S`.
    fn stat_line(pid: &str, comm: &str, last: usize) -> String {
        let mut line = format!("{pid} ({comm}) S");
        for n in 4..=last {
            line.push_str(&format!(" {}", n * 10));
        }
        line.push('\n');
        line
    }

    fn stat(pid: u32, comm: &str) -> Stat {
        Stat {
            pid,
            comm: comm.to_owned(),
            state: 'S',
            ppid: 40,
            starttime: 220,
            env_start: 500,
            env_end: 510,
        }
    }

    #[test]
    fn parse_stat_table() {
        #[rustfmt::skip]
        let rows: Vec<(String, Result<Stat, &str>)> = vec![
            (stat_line("7", "sh", 52), Ok(stat(7, "sh"))),
            (stat_line("7", "my worker", 52), Ok(stat(7, "my worker"))),
            (stat_line("7", "a) S 1 2 (b", 52), Ok(stat(7, "a) S 1 2 (b"))),
            (stat_line("7", "(", 52), Ok(stat(7, "("))),
            (stat_line("7", ")", 52), Ok(stat(7, ")"))),
            (stat_line("7", "", 52), Ok(stat(7, ""))),
            (stat_line("7", "x", 51), Ok(stat(7, "x"))),
            (stat_line("7", "x", 52).replace('\n', ""), Ok(stat(7, "x"))),
            (stat_line("7", "x", 50), Err("failed to parse stat: only 50 fields, field 51 is missing")),
            (stat_line("7", "x", 21), Err("failed to parse stat: only 21 fields, field 22 is missing")),
            ("7 (x) S".into(), Err("failed to parse stat: only 3 fields, field 4 is missing")),
            ("7 (x".into(), Err("failed to parse stat: no `)` after the command name")),
            ("7 x) S 1".into(), Err("failed to parse stat: no `(` before the command name")),
            (") 7 (x".into(), Err("failed to parse stat: no `)` after the command name")),
            ("".into(), Err("failed to parse stat: no `(` before the command name")),
            (stat_line("x7", "x", 52), Err("failed to parse stat: the pid is not a number")),
            (stat_line("7", "x", 52).replace(" 40 ", " -1 "), Err("failed to parse stat: field 4 is not a number")),
            (stat_line("7", "x", 52).replace(") S ", ") SS "), Err("failed to parse stat: field 3 (state) is not one character")),
        ];
        for (line, want) in rows {
            let got = parse_stat(&line).map_err(|e| e.to_string());
            assert_eq!(got, want.map_err(str::to_owned), "line {line:?}");
        }
    }

    #[test]
    fn real_self_stat() {
        let proc = ProcFs::system();
        let me = std::process::id();
        let stat = proc.stat(me).unwrap();
        assert_eq!(stat.pid, me);
        assert_eq!(stat.ppid, std::os::unix::process::parent_id());
        assert!(stat.starttime > 0);
        assert!(stat.env_start > 0 && stat.env_end >= stat.env_start);
        // The environment block is exactly as long as /proc/self/environ.
        let environ = proc.environ(me).unwrap();
        assert_eq!((stat.env_end - stat.env_start) as usize, environ.len());

        let status = proc.status(me).unwrap();
        assert_eq!(status.uids[0], nix::unistd::getuid().as_raw());
        assert_eq!(status.uids[1], nix::unistd::geteuid().as_raw());
        assert_eq!(status.gids[0], nix::unistd::getgid().as_raw());
        let groups: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .into_iter()
            .map(|g| g.as_raw())
            .collect();
        assert_eq!(status.groups, groups);

        assert_eq!(proc.exe(me).unwrap(), std::env::current_exe().unwrap());
        assert!(!proc.cmdline(me).unwrap().is_empty());
        assert!(proc.pids().unwrap().contains(&me));
    }

    #[test]
    fn parse_status_table() {
        let ok = "Name:\tbash\nUmask:\t0022\nUid:\t1000\t1001\t1002\t1003\n\
                  Gid:\t100\t101\t102\t103\nFDSize:\t256\nGroups:\t4 24 27 \nNgid:\t0\n";
        assert_eq!(
            parse_status(ok).unwrap(),
            Status {
                uids: [1000, 1001, 1002, 1003],
                gids: [100, 101, 102, 103],
                groups: vec![4, 24, 27],
            }
        );
        let no_groups = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(parse_status(no_groups).unwrap().groups, Vec::<u32>::new());

        #[rustfmt::skip]
        let errors = [
            ("Gid:\t0\t0\t0\t0\nGroups:\n", "failed to parse status: no `Uid:` line"),
            ("Uid:\t0\t0\t0\t0\nGroups:\n", "failed to parse status: no `Gid:` line"),
            ("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n", "failed to parse status: no `Groups:` line"),
            ("Uid:\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\n", "failed to parse status: `Uid` does not hold 4 ids"),
            ("Uid:\t0\t0\t0\t0\nGid:\t0\tx\t0\t0\nGroups:\n", "failed to parse status: `Gid` holds a non-number"),
            ("Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t1 -2\n", "failed to parse status: `Groups` holds a non-number"),
        ];
        for (text, want) in errors {
            assert_eq!(
                parse_status(text).unwrap_err().to_string(),
                want,
                "{text:?}"
            );
        }
    }

    #[test]
    fn fake_root_and_errors_name_pid_and_file() {
        let root = tempfile::tempdir().unwrap();
        let proc = ProcFs::new(root.path());
        assert_eq!(proc.root(), root.path());
        for dir in ["12", "3", "self", "1x", "007"] {
            fs::create_dir(root.path().join(dir)).unwrap();
        }
        fs::write(root.path().join("45"), "").unwrap();
        assert_eq!(proc.pids().unwrap(), [3, 7, 12, 45]);

        fs::write(root.path().join("12/stat"), "12 (x) S 1\n").unwrap();
        assert_eq!(
            proc.stat(12).unwrap_err().to_string(),
            format!(
                "failed to parse {}/12/stat: only 4 fields, field 22 is missing",
                root.path().display()
            )
        );
        fs::write(root.path().join("12/status"), "Uid: 0 0 0 0\n").unwrap();
        assert_eq!(
            proc.status(12).unwrap_err().to_string(),
            format!(
                "failed to parse {}/12/status: no `Gid:` line",
                root.path().display()
            )
        );
        fs::write(root.path().join("12/environ"), b"A=1\0B=2\0").unwrap();
        assert_eq!(proc.environ(12).unwrap(), b"A=1\0B=2\0");

        let err = proc.cmdline(99).unwrap_err();
        assert!(err.is_gone());
        assert_eq!(
            err.to_string(),
            format!(
                "failed to read {}/99/cmdline: No such file or directory (os error 2)",
                root.path().display()
            )
        );
        assert!(proc.exe(3).unwrap_err().is_gone());
        assert!(!proc.stat(12).unwrap_err().is_gone());
        assert!(
            ProcFs::new(root.path().join("none"))
                .pids()
                .unwrap_err()
                .is_gone()
        );
    }
}
