//! The privileged sequence, written once and in order. Generic over [`Sys`] so that the order
//! is unit-tested with a recording fake, without root.
//!
//! Trusts: a [`Plan`] that already passed every check that needs no syscall.
//! Guarantees: PROGRAM starts only after every step succeeded; the first failure stops the
//! sequence and is returned. Returns only on failure.

use std::convert::Infallible;

use nix::errno::Errno;

use crate::{
    error::ShimError,
    plan::{Identity, Plan},
    sys::Sys,
};

pub fn launch(sys: &mut impl Sys, plan: &Plan) -> Result<Infallible, ShimError> {
    // 1. Register while still root: the broker authorizes RegisterWorker by uid (admin_uids)
    //    and binds the calling process by pidfd; execve keeps the pid, so PROGRAM inherits it.
    if let Some(reg) = &plan.registration {
        sys.register_worker(&reg.socket, &reg.function)
            .map_err(|reason| ShimError::Register {
                socket: reg.socket.clone(),
                function: reg.function.clone(),
                reason,
            })?;
    }
    // 2. Close every inherited fd above 2: inherited fds are not close-on-exec, and one could
    //    be a socket or file PROGRAM's user must not reach (this also drops the broker channel).
    sys.close_fds_above_stderr().map_err(ShimError::CloseFds)?;
    if let Identity::Switch { uid, gid } = plan.identity {
        // 3. Supplementary groups first: it needs CAP_SETGID, lost with the uid switch.
        sys.clear_groups().map_err(ShimError::SetGroups)?;
        // 4. Then the gid (real, effective and saved), still privileged.
        sys.setresgid(gid)
            .map_err(|errno| ShimError::SetGid { gid, errno })?;
        // 5. The uid last: after it, nothing above can be undone.
        sys.setresuid(uid)
            .map_err(|errno| ShimError::SetUid { uid, errno })?;
        // 6. Read back all three ids of each kind: a partial switch must not run PROGRAM.
        check_ids("uids", sys.getresuid().map_err(ShimError::GetIds)?, uid)?;
        check_ids("gids", sys.getresgid().map_err(ShimError::GetIds)?, gid)?;
        // 7. A switch away from root clears every capability, unless securebits said
        //    otherwise: PROGRAM must not start with any.
        if uid != 0 {
            let caps = sys.capabilities().map_err(ShimError::GetIds)?;
            if caps != 0 {
                return Err(ShimError::CapabilitiesKept { uid, caps });
            }
        }
    }
    // 8. Prove root cannot be regained (a saved uid 0, a kept CAP_SETUID) unless PROGRAM is
    //    meant to be root.
    let uid = plan.identity.uid();
    if uid != 0 && sys.regain_root().is_ok() {
        return Err(ShimError::RootRegainable { uid });
    }
    // 9. no_new_privs: setuid binaries and file capabilities grant PROGRAM nothing more.
    sys.set_no_new_privs().map_err(ShimError::NoNewPrivs)?;
    // 10. An empty signal mask and default SIGPIPE: both survive execve, and neither is the
    //     shim's to pass on (the Rust runtime ignores SIGPIPE).
    sys.reset_signals().map_err(ShimError::Signals)?;
    // 11. execve with the explicit envp, trying candidates the way execvp does.
    exec(sys, plan)
}

fn check_ids(what: &'static str, got: [u32; 3], want: u32) -> Result<(), ShimError> {
    if got == [want; 3] {
        Ok(())
    } else {
        Err(ShimError::IdentityMismatch { what, got, want })
    }
}

/// Try each candidate path. For a PATH search, like execvp: a missing file or directory moves
/// on, a permission error is remembered and moves on, anything else stops. No `/bin/sh`
/// fallback on ENOEXEC (the image may have no shell).
fn exec(sys: &mut impl Sys, plan: &Plan) -> Result<Infallible, ShimError> {
    let searching = !plan.program.contains('/');
    let mut denied = false;
    for path in &plan.candidates {
        let errno = sys.execve(path, &plan.argv, &plan.envp);
        match errno {
            Errno::ENOENT | Errno::ENOTDIR | Errno::ESTALE | Errno::ENODEV | Errno::ETIMEDOUT
                if searching => {}
            Errno::EACCES if searching => denied = true,
            errno => {
                return Err(ShimError::Exec {
                    program: plan.program.clone(),
                    errno,
                });
            }
        }
    }
    if denied {
        Err(ShimError::Exec {
            program: plan.program.clone(),
            errno: Errno::EACCES,
        })
    } else {
        Err(ShimError::NotInPath {
            program: plan.program.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{CStr, CString};

    use super::*;
    use crate::plan::Registration;

    /// Records every call; fails the calls named in `fail` with the given errno.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Vec<String>,
        fail: Vec<(&'static str, Errno)>,
        /// What the fake `setresuid(0)` does after a switch: `Ok` means root is regainable.
        root_regainable: bool,
        /// ids the fake reports back; `None` = the last ones set.
        ids: Option<[u32; 3]>,
        /// Capabilities the fake reports after the switch.
        caps: u64,
        uid: u32,
        gid: u32,
        exec_errors: Vec<Errno>,
    }

    impl Recorder {
        fn step(&mut self, name: &'static str, detail: String) -> Result<(), Errno> {
            self.calls.push(if detail.is_empty() {
                name.to_owned()
            } else {
                format!("{name} {detail}")
            });
            match self.fail.iter().find(|(n, _)| *n == name) {
                Some((_, e)) => Err(*e),
                None => Ok(()),
            }
        }
    }

    impl Sys for Recorder {
        fn register_worker(&mut self, socket: &str, function: &str) -> Result<(), String> {
            self.step("register", format!("{socket} {function}"))
                .map_err(|e| format!("fake: {}", e.desc()))
        }
        fn close_fds_above_stderr(&mut self) -> Result<(), Errno> {
            self.step("close_range", "3..".into())
        }
        fn clear_groups(&mut self) -> Result<(), Errno> {
            self.step("setgroups", "[]".into())
        }
        fn setresgid(&mut self, gid: u32) -> Result<(), Errno> {
            self.step("setresgid", gid.to_string())?;
            self.gid = gid;
            Ok(())
        }
        fn capabilities(&mut self) -> Result<u64, Errno> {
            self.step("capget", String::new())?;
            Ok(self.caps)
        }
        fn regain_root(&mut self) -> Result<(), Errno> {
            self.calls.push("regain_root".into());
            if self.root_regainable {
                Ok(())
            } else {
                Err(Errno::EPERM)
            }
        }
        fn setresuid(&mut self, uid: u32) -> Result<(), Errno> {
            self.step("setresuid", uid.to_string())?;
            self.uid = uid;
            Ok(())
        }
        fn getresuid(&mut self) -> Result<[u32; 3], Errno> {
            self.step("getresuid", String::new())?;
            Ok(self.ids.unwrap_or([self.uid; 3]))
        }
        fn getresgid(&mut self) -> Result<[u32; 3], Errno> {
            self.step("getresgid", String::new())?;
            Ok([self.gid; 3])
        }
        fn set_no_new_privs(&mut self) -> Result<(), Errno> {
            self.step("no_new_privs", String::new())
        }
        fn reset_signals(&mut self) -> Result<(), Errno> {
            self.step("reset_signals", String::new())
        }
        fn execve(&mut self, path: &CStr, argv: &[CString], envp: &[CString]) -> Errno {
            self.calls.push(format!(
                "execve {} argv={argv:?} envp={envp:?}",
                path.to_str().unwrap()
            ));
            if self.exec_errors.is_empty() {
                Errno::ENOENT
            } else {
                self.exec_errors.remove(0)
            }
        }
    }

    fn plan(registration: bool, identity: Identity) -> Plan {
        Plan {
            registration: registration.then(|| Registration {
                socket: "/run/secretd/secretd.sock".into(),
                function: "orders".into(),
            }),
            identity,
            program: "/app/worker".into(),
            candidates: vec![CString::new("/app/worker").unwrap()],
            argv: vec![CString::new("/app/worker").unwrap()],
            envp: vec![CString::new("SECRETD_SOCKET=/run/secretd/secretd.sock").unwrap()],
        }
    }

    const SWITCH: Identity = Identity::Switch {
        uid: 65534,
        gid: 65533,
    };

    #[test]
    fn the_privileged_sequence_runs_in_order() {
        let mut sys = Recorder::default();
        let err = launch(&mut sys, &plan(true, SWITCH)).unwrap_err();
        assert_eq!(
            sys.calls,
            [
                "register /run/secretd/secretd.sock orders",
                "close_range 3..",
                "setgroups []",
                "setresgid 65533",
                "setresuid 65534",
                "getresuid",
                "getresgid",
                "capget",
                "regain_root",
                "no_new_privs",
                "reset_signals",
                "execve /app/worker argv=[\"/app/worker\"] envp=[\"SECRETD_SOCKET=/run/secretd/secretd.sock\"]",
            ]
        );
        // The fake exec "fails" with ENOENT: exec returns only on failure.
        assert_eq!(
            err.to_string(),
            "cannot execute /app/worker: No such file or directory"
        );
        assert_eq!(err.exit_code(), 127);
    }

    #[test]
    fn without_user_or_function_only_the_unprivileged_steps_run() {
        let mut sys = Recorder::default();
        launch(&mut sys, &plan(false, Identity::Keep { uid: 1000 })).unwrap_err();
        let names: Vec<&str> = sys
            .calls
            .iter()
            .map(|c| c.split(' ').next().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "close_range",
                "regain_root",
                "no_new_privs",
                "reset_signals",
                "execve"
            ]
        );
    }

    #[test]
    fn root_with_allow_root_skips_the_regain_check() {
        let mut sys = Recorder::default();
        launch(&mut sys, &plan(false, Identity::Switch { uid: 0, gid: 0 })).unwrap_err();
        assert!(sys.calls.contains(&"setresuid 0".to_owned()));
        assert!(!sys.calls.contains(&"regain_root".to_owned()));
        assert!(sys.calls.last().unwrap().starts_with("execve"));
    }

    #[test]
    fn the_first_failure_stops_the_sequence() {
        let steps = [
            (
                "register",
                "cannot register as function \"orders\" with the broker at /run/secretd/secretd.sock: fake: Connection refused",
                1,
            ),
            (
                "close_range",
                "cannot close inherited file descriptors: Connection refused",
                2,
            ),
            (
                "setgroups",
                "cannot clear supplementary groups: Connection refused",
                3,
            ),
            (
                "setresgid",
                "cannot switch to gid 65533: Connection refused",
                4,
            ),
            (
                "setresuid",
                "cannot switch to uid 65534: Connection refused",
                5,
            ),
            (
                "getresuid",
                "cannot read back the process identity: Connection refused",
                6,
            ),
            (
                "capget",
                "cannot read back the process identity: Connection refused",
                8,
            ),
            (
                "no_new_privs",
                "cannot set no_new_privs: Connection refused",
                10,
            ),
            (
                "reset_signals",
                "cannot reset the signal mask: Connection refused",
                11,
            ),
        ];
        for (step, message, calls) in steps {
            let mut sys = Recorder {
                fail: vec![(step, Errno::ECONNREFUSED)],
                ..Recorder::default()
            };
            let err = launch(&mut sys, &plan(true, SWITCH)).unwrap_err();
            assert_eq!(err.to_string(), message, "{step}");
            assert_eq!(err.exit_code(), 125, "{step}");
            assert_eq!(sys.calls.len(), calls, "{step}: {:?}", sys.calls);
            assert!(!sys.calls.iter().any(|c| c.starts_with("execve")), "{step}");
        }
    }

    #[test]
    fn regainable_root_or_a_partial_switch_stops_before_exec() {
        let mut sys = Recorder {
            root_regainable: true,
            ..Recorder::default()
        };
        let err = launch(&mut sys, &plan(false, SWITCH)).unwrap_err();
        assert!(
            matches!(err, ShimError::RootRegainable { uid: 65534 }),
            "{err}"
        );
        assert!(!sys.calls.iter().any(|c| c.starts_with("execve")));

        let mut sys = Recorder {
            caps: 1 << 1, // CAP_DAC_OVERRIDE
            ..Recorder::default()
        };
        let err = launch(&mut sys, &plan(false, SWITCH)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "capabilities 0x2 are still held after switching to uid 65534; refusing to continue"
        );
        assert!(!sys.calls.iter().any(|c| c.starts_with("execve")));

        let mut sys = Recorder {
            ids: Some([65534, 65534, 0]),
            ..Recorder::default()
        };
        let err = launch(&mut sys, &plan(false, SWITCH)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "identity check failed after the switch: uids are [65534, 65534, 0], expected all 65534"
        );
        assert!(!sys.calls.iter().any(|c| c.starts_with("execve")));
    }

    #[test]
    fn exec_errors_map_like_execvp() {
        let searched = |errors: Vec<Errno>| {
            let mut p = plan(false, Identity::Keep { uid: 1000 });
            p.program = "worker".into();
            p.candidates = ["/a/worker", "/b/worker", "/c/worker"]
                .iter()
                .map(|s| CString::new(*s).unwrap())
                .collect();
            let mut sys = Recorder {
                exec_errors: errors,
                ..Recorder::default()
            };
            let err = launch(&mut sys, &p).unwrap_err();
            let tried = sys.calls.iter().filter(|c| c.starts_with("execve")).count();
            (err.to_string(), err.exit_code(), tried)
        };
        assert_eq!(
            searched(vec![]),
            ("cannot execute worker: not found in PATH".into(), 127, 3)
        );
        assert_eq!(
            searched(vec![Errno::EACCES]),
            ("cannot execute worker: Permission denied".into(), 126, 3)
        );
        assert_eq!(
            searched(vec![Errno::ENOENT, Errno::ENOEXEC]),
            ("cannot execute worker: Exec format error".into(), 126, 2)
        );

        let mut sys = Recorder {
            exec_errors: vec![Errno::EACCES],
            ..Recorder::default()
        };
        let err = launch(&mut sys, &plan(false, SWITCH)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot execute /app/worker: Permission denied"
        );
        assert_eq!(err.exit_code(), 126);
    }
}
