//! Test helper for SPIRE's regression case (used by `tests/broker.rs`).
//!
//! `grandchild SOCKET direct`: connect, then call WhoAmI from this process.
//! `grandchild SOCKET grandchild`: connect, fork a child that forks a grandchild, let the
//! connecting process and the child exit, then call WhoAmI from the grandchild over the
//! inherited connection. Prints the gRPC outcome ("Ok" or the status code) on stdout.
#![allow(unsafe_code)]

use std::{os::unix::net::UnixStream, time::Duration};

use secretd_proto::v1::{WhoAmIRequest, secrets_client::SecretsClient};

fn call_over(stream: UnixStream) -> String {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        stream.set_nonblocking(true).unwrap();
        let stream = tokio::net::UnixStream::from_std(stream).unwrap();
        let mut slot = Some(stream);
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_| {
                let s = slot.take();
                async move {
                    s.map(hyper_util::rt::TokioIo::new).ok_or_else(|| {
                        std::io::Error::other("the inherited connection was already used")
                    })
                }
            }))
            .await
            .unwrap();
        match SecretsClient::new(channel).who_am_i(WhoAmIRequest {}).await {
            Ok(_) => "Ok".to_owned(),
            Err(s) => {
                eprintln!("{s:?}");
                format!("{:?}", s.code())
            }
        }
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let stream = UnixStream::connect(&args[1]).unwrap();
    if args[2] == "direct" {
        println!("{}", call_over(stream));
        return;
    }
    // A pidfd on the connecting process, inherited by the grandchild: readable once it exits
    // (whether or not it has been reaped yet).
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let pidfd = unsafe {
        libc::syscall(
            libc::SYS_pidfd_open,
            std::process::id() as libc::pid_t,
            0u32,
        )
    } as i32;
    assert!(pidfd >= 0, "pidfd_open failed");
    // Give the broker time to accept and attest the connecting process while it is alive, so the
    // denial below comes from the per-call check (it is denied either way).
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: single-threaded at this point (no runtime yet), so fork is sound.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
        nix::unistd::ForkResult::Child => {}
    }
    // SAFETY: as above; this is the child, still single-threaded.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Parent { .. } => std::process::exit(0),
        nix::unistd::ForkResult::Child => {}
    }
    // Grandchild: wait until the process that connected is gone.
    let mut fds = [libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: `fds` is a valid array of one pollfd for the duration of the call.
    while unsafe { libc::poll(fds.as_mut_ptr(), 1, 10_000) } == 0 {}
    println!("{}", call_over(stream));
}
