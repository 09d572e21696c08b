//! The transport floor: a bare tonic server on a Unix socket answering `secretd.v1.Secrets`
//! `GetSecret` with a fixed value of the broker's size and no other work — same messages, same
//! HTTP/2 stack, same runtime shape as the broker (multi-threaded tokio, default workers), so
//! the difference between the two is exactly what the broker does per call.

use std::{os::fd::OwnedFd, path::Path, pin::Pin};

use secretd_proto::v1::{
    self as pb,
    secrets_server::{Secrets, SecretsServer},
};
use tokio_stream::{Stream, wrappers::UnixListenerStream};
use tonic::{Request, Response, Status};

#[derive(Debug)]
struct Echo {
    value: Vec<u8>,
}

type Never = Pin<Box<dyn Stream<Item = Result<pb::Secret, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Secrets for Echo {
    async fn get_secret(
        &self,
        req: Request<pb::GetSecretRequest>,
    ) -> Result<Response<pb::Secret>, Status> {
        Ok(Response::new(pb::Secret {
            name: req.into_inner().name,
            value: self.value.clone(),
            version: 1,
        }))
    }

    async fn get_secrets(
        &self,
        _: Request<pb::GetSecretsRequest>,
    ) -> Result<Response<pb::GetSecretsResponse>, Status> {
        Err(Status::unimplemented("echo floor"))
    }

    async fn list_secrets(
        &self,
        _: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        Err(Status::unimplemented("echo floor"))
    }

    async fn who_am_i(
        &self,
        _: Request<pb::WhoAmIRequest>,
    ) -> Result<Response<pb::WhoAmIResponse>, Status> {
        Err(Status::unimplemented("echo floor"))
    }

    type WatchSecretStream = Never;

    async fn watch_secret(
        &self,
        _: Request<pb::WatchSecretRequest>,
    ) -> Result<Response<Never>, Status> {
        Err(Status::unimplemented("echo floor"))
    }
}

/// Serve until killed; write `READY\n` to `ready` once listening.
pub fn run(socket: &Path, value_len: usize, ready: Option<OwnedFd>) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(socket);
    let listener = std::os::unix::net::UnixListener::bind(socket)?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("echo")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::UnixListener::from_std(listener)?;
        if let Some(fd) = ready {
            use std::io::Write;
            std::fs::File::from(fd).write_all(b"READY\n")?;
        }
        tonic::transport::Server::builder()
            .add_service(SecretsServer::new(Echo {
                value: vec![b'x'; value_len],
            }))
            .serve_with_incoming(UnixListenerStream::new(listener))
            .await?;
        Ok(())
    })
}
