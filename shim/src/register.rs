//! `Admin.RegisterWorker(pid 0, function)`: the one gRPC call the shim makes, over the broker's
//! Unix socket, on a current-thread tokio runtime that exists only for this call (bounded by
//! [`TIMEOUT`]) and is dropped before the privileged sequence continues, so no thread and no
//! connection outlives it. pid 0 asks the broker to bind the calling process (by its pidfd);
//! execve keeps the pid, so the binding passes to PROGRAM.

use std::{io::Write, time::Duration};

use secretd_proto::v1::{RegisterWorkerRequest, admin_client::AdminClient};
use tonic::transport::Endpoint;

/// Upper bound for connecting and getting the answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Register the calling process as `function`. The error is a one-line reason.
pub fn register_worker(socket: &str, function: &str, timeout: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;
    let call = async {
        let endpoint = Endpoint::from_shared(format!("unix://{socket}"))
            .map_err(|e| chain(&e))?
            .connect_timeout(timeout);
        let channel = endpoint.connect().await.map_err(|e| {
            format!(
                "{}; is the broker running, and does --socket or SECRETD_SOCKET name its socket?",
                chain(&e)
            )
        })?;
        let response = AdminClient::new(channel)
            .register_worker(RegisterWorkerRequest {
                pid: 0,
                function: function.to_owned(),
            })
            .await
            .map_err(|status| {
                format!(
                    "{}: {}",
                    secretd_proto::code_name(status.code()),
                    status.message()
                )
            })?
            .into_inner();
        // Registered, but the broker has a word for the operator (a function name that no
        // scope mentions): one line on stderr, where the worker's own output goes.
        if !response.warning.is_empty() {
            let line = response.warning.replace(['\n', '\r'], " ");
            let _ = writeln!(std::io::stderr(), "secretd-shim: warning: {line}");
        }
        Ok(())
    };
    let result = runtime.block_on(async {
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} s", timeout.as_secs())))
    });
    // Drops the channel's background task and closes the connection.
    drop(runtime);
    result.map_err(|reason| reason.replace(['\n', '\r'], " "))
}

/// An error and its sources on one line ("transport error: No such file or directory").
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}
