//! How values leave the broker, so that no copy outlives the response that carried it.
//!
//! Together with the padded codec (`secretd_proto::codec`), this layer in front of tonic's
//! router:
//! - ends `GetSecret` and `GetSecrets` responses too long for one HTTP/2 frame with the padding
//!   trailer ([`trailer_padding`]), which covers what h2 copied of their later frames;
//! - answers `WatchSecret` itself. tonic encodes the messages of a server stream one after
//!   another into a single buffer that lives as long as the stream, so every value a watch has
//!   carried would stay there, after rotation too, until the stream ends. Here the request is
//!   decoded as tonic does and the call is decided by the same handler
//!   (`SecretsService::watch_secret`: attestation, scope, audit, revocation); only the
//!   response body is ours: each message goes out as its own padded allocation, freed — and
//!   cleared by the allocator — once h2 has written it, and the stream's trailers are padded.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::BodyExt;
use secretd_proto::{
    codec::{SecretdCodec, encode_padded, padded_len, trailer_padding},
    v1::{self as pb, secrets_server::Secrets},
};
use tonic::{
    Status,
    body::Body,
    codec::{Codec, Streaming},
    codegen::{BoxFuture, Service, StdError, http},
};

use crate::service::{SecretsService, WatchStream};

/// The route this layer serves itself.
pub const WATCH: &str = "/secretd.v1.Secrets/WatchSecret";

/// The unary routes whose responses carry values.
const UNARY_VALUES: [&str; 2] = [
    "/secretd.v1.Secrets/GetSecret",
    "/secretd.v1.Secrets/GetSecrets",
];

/// The smallest frame size an HTTP/2 peer may set (RFC 9113 §6.5.2). A response no longer
/// than this goes out in one DATA frame unless flow control splits it, so only longer ones
/// need the padding trailer; it costs a few microseconds a call (HPACK Huffman-codes it).
const MIN_MAX_FRAME_SIZE: usize = 16_384;

/// gRPC's message header: a compression flag and a big-endian length.
const HEADER_LEN: usize = 5;

/// `tower::Layer` adding [`Egress`].
#[derive(Debug, Clone)]
pub struct EgressLayer {
    service: SecretsService,
    max_request_bytes: usize,
}

impl EgressLayer {
    /// `max_request_bytes` as `SecretsServer::max_decoding_message_size` is given it.
    pub fn new(service: SecretsService, max_request_bytes: usize) -> EgressLayer {
        EgressLayer {
            service,
            max_request_bytes,
        }
    }
}

impl<S> tower::Layer<S> for EgressLayer {
    type Service = Egress<S>;

    fn layer(&self, inner: S) -> Egress<S> {
        Egress {
            inner,
            service: self.service.clone(),
            max_request_bytes: self.max_request_bytes,
        }
    }
}

/// Serves [`WATCH`], pads the trailers of the unary value routes, passes everything else on.
#[derive(Debug, Clone)]
pub struct Egress<S> {
    inner: S,
    service: SecretsService,
    max_request_bytes: usize,
}

impl<S, B> Service<http::Request<B>> for Egress<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<http::Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        if UNARY_VALUES.contains(&path) {
            let response = self.inner.call(req);
            return Box::pin(async move {
                Ok(response.await?.map(|body| {
                    let mut sent = 0;
                    Body::new(body.map_frame(move |mut frame| {
                        if let Some(data) = frame.data_ref() {
                            sent += data.len();
                        } else if let Some(trailers) = frame.trailers_mut()
                            && sent > MIN_MAX_FRAME_SIZE
                        {
                            let (name, value) = trailer_padding();
                            trailers.insert(name, value);
                        }
                        frame
                    }))
                }))
            });
        }
        if path != WATCH {
            return Box::pin(self.inner.call(req));
        }
        let service = self.service.clone();
        let max = self.max_request_bytes;
        Box::pin(async move {
            Ok(watch(&service, max, req)
                .await
                .unwrap_or_else(Status::into_http))
        })
    }
}

/// What `tonic::server::Grpc::server_streaming` does for this route, with our body.
async fn watch<B>(
    service: &SecretsService,
    max_request_bytes: usize,
    req: http::Request<B>,
) -> Result<http::Response<Body>, Status>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    // We accept no compression (the generated server enables none either).
    if let Some(encoding) = req.headers().get("grpc-encoding")
        && encoding.as_bytes() != b"identity"
    {
        return Err(Status::unimplemented(format!(
            "Content is compressed with `{}` which isn't supported",
            String::from_utf8_lossy(encoding.as_bytes())
        )));
    }
    let (parts, body) = req.into_parts();
    let decoder = SecretdCodec::<pb::Secret, pb::WatchSecretRequest>::default().decoder();
    let mut messages = Streaming::new_request(decoder, body, None, Some(max_request_bytes));
    let message = messages
        .message()
        .await?
        .ok_or_else(|| Status::internal("Missing request message."))?;
    let request = tonic::Request::from_http(http::Request::from_parts(parts, message));

    let (metadata, stream, _) = service.watch_secret(request).await?.into_parts();
    let mut response = http::Response::new(Body::new(WatchBody {
        stream,
        ended: false,
    }));
    *response.headers_mut() = metadata.into_headers();
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    Ok(response)
}

/// The response body: one DATA frame per message, each in its own allocation, then the
/// status and the padding as trailers.
struct WatchBody {
    stream: WatchStream,
    ended: bool,
}

impl http_body::Body for WatchBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let status = match ready!(self.stream.as_mut().poll_next(cx)) {
            Some(Ok(secret)) => match frame(&secret) {
                Ok(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Err(status) => status,
            },
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.ended = true;
        let mut trailers = http::HeaderMap::new();
        status.add_header(&mut trailers)?;
        let (name, value) = trailer_padding();
        trailers.insert(name, value);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

/// One gRPC message: header and padded `Secret`, in an allocation of exactly its size.
fn frame(secret: &pb::Secret) -> Result<Bytes, Status> {
    let len = padded_len(secret);
    let header_len = u32::try_from(len)
        .map_err(|_| Status::resource_exhausted("message too large for one gRPC frame"))?;
    let mut buf = Vec::with_capacity(HEADER_LEN + len);
    buf.push(0);
    buf.extend_from_slice(&header_len.to_be_bytes());
    encode_padded(secret, &mut buf);
    debug_assert_eq!(buf.len(), buf.capacity());
    Ok(Bytes::from(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn a_frame_is_one_exact_allocation_holding_a_padded_message() {
        let secret = pb::Secret {
            name: "ORDERS_DB".into(),
            value: b"postgres://u:pw@db/orders".to_vec(),
            version: 3,
        };
        let data = frame(&secret).unwrap();
        assert_eq!(data[0], 0, "not compressed");
        let len = u32::from_be_bytes(data[1..HEADER_LEN].try_into().unwrap()) as usize;
        assert_eq!(data.len(), HEADER_LEN + len);
        // Everything h2 may copy into its connection buffer (256 bytes less its 9-byte frame
        // head) is header and padding.
        assert!(
            data[HEADER_LEN + 4..256].iter().all(|&b| b == 0),
            "padding first"
        );
        assert_eq!(pb::Secret::decode(&data[HEADER_LEN..]).unwrap(), secret);
    }
}
