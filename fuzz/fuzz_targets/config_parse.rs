//! The broker config: parse + validate any text. Never panics; an error is one line naming
//! the file; a config that loads can be summarised.
#![no_main]

use std::{path::Path, sync::LazyLock};

use libfuzzer_sys::fuzz_target;
use secretd::config::Config;

/// A passwd/group pair for `user`/`group` keys (written once per process).
static ETC: LazyLock<std::path::PathBuf> = LazyLock::new(|| {
    let dir = std::env::temp_dir().join(format!("secretd-fuzz-etc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\norders:x:1001:1001::/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("group"), "root:x:0:\norders:x:1001:\nops:x:500:orders\n").unwrap();
    dir
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/secretd/config.toml");
    match Config::parse(text, path, &ETC) {
        Ok(config) => {
            let _ = config.summary();
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("/etc/secretd/config.toml"), "{msg}");
            assert!(!msg.contains('\n'), "more than one line: {msg:?}");
        }
    }
});
