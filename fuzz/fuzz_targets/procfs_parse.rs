//! `/proc/<pid>/stat` and `/proc/<pid>/status` parsers: any text, never a panic; what `stat`
//! returns agrees with the text (comm is what lies between the first `(` and the last `)`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use secretd::procfs::{parse_stat, parse_status};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(stat) = parse_stat(text) {
        let t = text.trim_end_matches('\n');
        let (open, close) = (t.find('(').unwrap(), t.rfind(')').unwrap());
        assert_eq!(stat.comm, t[open + 1..close]);
    }
    if let Ok(status) = parse_status(text) {
        assert!(text.contains("Uid:") && text.contains("Gid:") && text.contains("Groups:"));
        assert!(status.groups.len() <= text.len());
    }
});
