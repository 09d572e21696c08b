//! Secret-name parsing against a naive restatement of the rules (differential).
#![no_main]

use libfuzzer_sys::fuzz_target;
use secretd::name::SecretName;

/// The rules of `name.rs`, written as plainly as possible.
fn oracle(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-/".contains(&b))
        && s.split('/').all(|seg| !seg.is_empty() && seg != "..")
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    match SecretName::parse(s) {
        Ok(name) => {
            assert!(oracle(s), "accepted {s:?}");
            assert_eq!(name.as_str(), s);
        }
        Err(e) => {
            assert!(!oracle(s), "refused {s:?}: {e}");
            // Errors never quote the rejected text.
            let msg = e.to_string();
            assert!(s.len() < 4 || !msg.contains(s), "{msg}");
        }
    }
});
