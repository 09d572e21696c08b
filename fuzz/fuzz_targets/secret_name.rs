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

/// Every error text of `name.rs` with its numbers taken out.
const SHAPES: &[&str] = &[
    "invalid secret name: empty",
    "invalid secret name:  bytes long, at most  are allowed",
    "invalid secret name: byte  is not one of A-Z a-z - _ . - /",
    "invalid secret name: it starts with /",
    "invalid secret name: empty segment at byte  (a trailing / or //)",
    "invalid secret name: .. segment at byte ",
];

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
            // Errors never quote the rejected text: each is a fixed sentence with at most a
            // number in it (a bare "contains the input" check is fooled by inputs like "a-z ",
            // which the fixed text "A-Z a-z 0-9" happens to contain: crash-8b05316c…).
            let msg = e.to_string();
            let shape: String = msg.chars().filter(|c| !c.is_ascii_digit()).collect();
            assert!(SHAPES.contains(&shape.as_str()), "{msg}");
        }
    }
});
