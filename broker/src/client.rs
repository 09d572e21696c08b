//! A gRPC channel to a broker socket, for the CLI subcommands, tests and benchmarks.

use std::path::{Path, PathBuf};

use tonic::transport::{Channel, Endpoint};

use crate::config::DEFAULT_SOCKET_PATH;

/// `--socket`, else `SECRETD_SOCKET`, else the default socket.
pub fn socket_path(arg: Option<PathBuf>) -> PathBuf {
    arg.or_else(|| std::env::var_os("SECRETD_SOCKET").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET_PATH))
}

/// Connect to the broker listening on `socket`.
pub async fn connect(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    Endpoint::from_shared(format!("unix://{}", socket.display()))?
        .connect()
        .await
}
