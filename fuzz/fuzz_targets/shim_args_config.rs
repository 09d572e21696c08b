//! The shim's command line and config (its modules, compiled here from `shim/src`: the shim is
//! a binary). Any argv (NUL-separated), any `SECRETD_SHIM_CONFIG`, any config text: never a
//! panic; every error is one line; whatever parses goes through the pure plan checks.
#![no_main]
#![allow(dead_code)]

#[path = "../../shim/src/args.rs"]
mod args;
#[path = "../../shim/src/config.rs"]
mod config;
#[path = "../../shim/src/error.rs"]
mod error;
#[path = "../../shim/src/plan.rs"]
mod plan;

use std::{ffi::OsString, os::unix::ffi::OsStringExt, path::Path};

use libfuzzer_sys::fuzz_target;

fn one_line(e: &error::ShimError) {
    // What the shim prints (main.rs); the Display text may quote argv[0] or a path verbatim.
    let msg = e.line();
    assert!(!msg.contains(['\n', '\r']), "more than one line: {msg:?}");
}

fn plan(launch: &plan::Launch) {
    let ctx = plan::Context {
        etc: Path::new("/etc"),
        uids: [0, 0, 0],
        gids: [0, 0, 0],
        getenv: &|_| None,
    };
    if let Err(e) = plan::build(launch, &ctx) {
        one_line(&e);
    }
}

fuzz_target!(|data: &[u8]| {
    // Layout: config text, 0xFF, argv joined by NUL (argv[0] first), 0xFF, the env value.
    let mut parts = data.splitn(3, |&b| b == 0xFF);
    let text = parts.next().unwrap_or_default();
    let argv: Vec<OsString> = parts
        .next()
        .unwrap_or_default()
        .split(|&b| b == 0)
        .map(|a| OsString::from_vec(a.to_vec()))
        .collect();
    let env = parts.next().map(|e| OsString::from_vec(e.to_vec()));
    match args::parse(argv.clone(), env) {
        Ok(args::Invocation::Launch(launch)) => plan(&launch),
        Ok(args::Invocation::FromConfig { path, name, args }) => {
            if let Ok(text) = std::str::from_utf8(text) {
                match config::parse(text, &path, &name, args) {
                    Ok(launch) => plan(&launch),
                    Err(e) => one_line(&e),
                }
            }
        }
        Ok(_) => {}
        Err(e) => one_line(&e),
    }
});
