//! The codec of every generated `secretd.v1` service and client: prost, with two changes.
//!
//! **Padding.** HTTP/2 (the `h2` crate under tonic) writes each DATA frame through a
//! per-connection write buffer that lives as long as the connection. A frame shorter than its
//! chain threshold (256 bytes when the socket takes vectored writes) is copied into that buffer
//! whole; a longer one has its first bytes copied (up to the threshold) and the rest written
//! straight from the message. The buffer is only ever overwritten, never cleared, so on a
//! long-lived connection the bytes of a value sent there survive after the value has been
//! rotated away, until later frames happen to cover them. So a value-carrying message starts
//! with field [`PAD_FIELD`], a length-delimited field of [`PAD_LEN`] zero bytes. It is reserved
//! in the proto and unknown to every decoder, which skips it (protobuf's rule for unknown
//! fields), so the fields clients know are unchanged on the wire. What h2 copies is then the
//! gRPC header and zeros. Which messages are padded is decided per type by [`Padding`]:
//! responses that carry `Secret.value`.
//!
//! A message longer than the peer's frame size (16 KiB by default) goes out in several DATA
//! frames, and each frame after the first begins inside the value; h2 copies those first
//! bytes too. Every copy lands in the first 256 bytes of the buffer, since h2 copies only
//! while less than that is queued, and each flush starts the buffer over. So the broker ends
//! each value-carrying response longer than one frame (and every watch) with a trailer,
//! [`trailer_padding`], that h2 encodes to more than 256 bytes: written after the last DATA
//! frame has been flushed, it covers them.
//!
//! **Malformed messages.** A message that is not a valid protobuf encoding of its type is
//! `INVALID_ARGUMENT` (the contract's status for a malformed request; tonic's own codec says
//! `INTERNAL`), with a fixed message beginning [`MALFORMED`] that never quotes the input. The
//! same decoder reads responses in our clients, where a malformed response is equally an
//! error.

use std::marker::PhantomData;

use prost::{
    Message,
    bytes::BufMut,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::http,
};

use crate::v1;

/// The reserved field number that carries the padding (see `secretd.proto`).
pub const PAD_FIELD: u32 = 2047;

/// Zero bytes of padding: more than h2 ever copies of a frame's payload (its chain threshold,
/// 256, less the 9-byte frame head) once the 5-byte gRPC header and the field key and length
/// are counted.
pub const PAD_LEN: usize = 256;

/// Whether a message type carries secret values and is sent padded.
pub trait Padding {
    const PADDED: bool;
}

/// Every message of `secretd.v1` says whether it is padded, so adding a message without
/// deciding is a compile error in the generated services.
macro_rules! padding {
    (padded: $($p:ident),* ; plain: $($n:ident),* $(,)?) => {
        $(impl Padding for v1::$p { const PADDED: bool = true; })*
        $(impl Padding for v1::$n { const PADDED: bool = false; })*
    };
}

padding! {
    padded: Secret, GetSecretsResponse;
    plain: GetSecretRequest, GetSecretsRequest, ListSecretsRequest, ListSecretsResponse,
    WhoAmIRequest, WhoAmIResponse, WatchSecretRequest, RegisterWorkerRequest,
    RegisterWorkerResponse, ReloadRequest, ReloadResponse, StatusRequest, StatusResponse,
    ScanRequest, ScanResponse, RefreshRequest, RefreshResponse, SetSecretRequest,
    SetSecretResponse, DeleteSecretRequest, DeleteSecretResponse,
}

/// Length of `msg` encoded by [`encode_padded`].
pub fn padded_len<M: Message + Padding>(msg: &M) -> usize {
    let pad = if M::PADDED {
        key_len(PAD_FIELD) + encoded_len_varint(PAD_LEN as u64) + PAD_LEN
    } else {
        0
    };
    pad + msg.encoded_len()
}

/// Encode `msg`, preceded by the padding field when `M` is padded.
pub fn encode_padded<M: Message + Padding>(msg: &M, buf: &mut impl BufMut) {
    if M::PADDED {
        encode_key(PAD_FIELD, WireType::LengthDelimited, buf);
        encode_varint(PAD_LEN as u64, buf);
        buf.put_bytes(0, PAD_LEN);
    }
    msg.encode_raw(buf);
}

/// The trailer that closes a long value-carrying response: `secretd-pad` and a value whose HPACK
/// encoding is over 256 bytes (h2 Huffman-codes every value; `~` takes 13 bits). Marked
/// sensitive, so HPACK never indexes it and every response carries it in full.
pub fn trailer_padding() -> (http::HeaderName, http::HeaderValue) {
    const VALUE: &str = concat!(
        "~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
        "~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
        "~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~",
    );
    let mut value = http::HeaderValue::from_static(VALUE);
    value.set_sensitive(true);
    (http::HeaderName::from_static("secretd-pad"), value)
}

/// How the status message of an undecodable message begins.
pub const MALFORMED: &str = "malformed request message";

/// The source ([`Status::source`](std::error::Error::source)) of every status
/// [`StrictDecoder`] returns: how a layer tells "the codec refused this message" from anything a
/// handler said, by type rather than by message text. tonic keeps the `Status` it turns into a
/// response in that response's extensions (`Status::into_http`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(MALFORMED)
    }
}

impl std::error::Error for Malformed {}

/// Whether `status` was made by [`StrictDecoder`] for a message it could not decode.
pub fn is_malformed(status: &Status) -> bool {
    std::error::Error::source(status).is_some_and(|e| e.is::<Malformed>())
}

/// The codec named by `build.rs` for every generated service and client.
#[derive(Debug, Clone)]
pub struct SecretdCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for SecretdCodec<T, U> {
    fn default() -> Self {
        SecretdCodec(PhantomData)
    }
}

impl<T, U> Codec for SecretdCodec<T, U>
where
    T: Message + Padding + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = PaddedEncoder<T>;
    type Decoder = StrictDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        PaddedEncoder(PhantomData)
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictDecoder(PhantomData)
    }
}

/// The decoder of [`SecretdCodec`]: prost's, with [`MALFORMED`] errors.
#[derive(Debug, Clone)]
pub struct StrictDecoder<U>(PhantomData<U>);

impl<U: Message + Default> Decoder for StrictDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        decode_strict(buf).map(Some)
    }
}

/// What [`StrictDecoder`] does with a message's bytes, for any buffer (the fuzz target
/// `codec_decode` calls it directly): prost's decoding, with a [`MALFORMED`] error.
pub fn decode_strict<U: Message + Default>(buf: impl prost::bytes::Buf) -> Result<U, Status> {
    // prost's error can quote numbers read from the input: leave it out.
    U::decode(buf).map_err(|_| {
        let name = std::any::type_name::<U>();
        let name = name.rsplit("::").next().unwrap_or(name);
        let mut status = Status::invalid_argument(format!("{MALFORMED}: not a valid {name}"));
        status.set_source(std::sync::Arc::new(Malformed));
        status
    })
}

/// The encoder of [`SecretdCodec`].
#[derive(Debug, Clone)]
pub struct PaddedEncoder<T>(PhantomData<T>);

impl<T: Message + Padding> Encoder for PaddedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_padded(&item, buf);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> v1::Secret {
        v1::Secret {
            name: "ORDERS_DB".into(),
            value: b"postgres://u:pw@db/orders".to_vec(),
            version: 7,
        }
    }

    #[test]
    fn padded_messages_start_with_zeros_and_decode_unchanged() {
        let s = secret();
        let mut buf = Vec::new();
        encode_padded(&s, &mut buf);
        assert_eq!(buf.len(), padded_len(&s));
        // key (2047 << 3 | 2) and length 256, both two-byte varints, then the zeros.
        assert_eq!(&buf[..4], &[0xfa, 0x7f, 0x80, 0x02]);
        assert!(buf[4..4 + PAD_LEN].iter().all(|&b| b == 0));
        assert_eq!(v1::Secret::decode(buf.as_slice()).unwrap(), s);

        let many = v1::GetSecretsResponse {
            secrets: vec![s.clone(), s],
        };
        let mut buf = Vec::new();
        encode_padded(&many, &mut buf);
        assert_eq!(buf.len(), padded_len(&many));
        assert_eq!(
            v1::GetSecretsResponse::decode(buf.as_slice()).unwrap(),
            many
        );
    }

    #[test]
    fn undecodable_messages_are_invalid_argument_without_quoting_the_input() {
        use tonic::codec::{Codec, Streaming};
        // A gRPC-framed body: header, then bytes that are no GetSecretRequest (key 0).
        let body = [0u8, 0, 0, 0, 3, 0x00, 0x31, 0x32];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let status = rt.block_on(async {
            let decoder = SecretdCodec::<v1::Secret, v1::GetSecretRequest>::default().decoder();
            let body = http_body_util::Full::new(prost::bytes::Bytes::copy_from_slice(&body));
            let mut stream = Streaming::new_request(decoder, body, None, None);
            stream.message().await.unwrap_err()
        });
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "malformed request message: not a valid GetSecretRequest"
        );
    }

    #[test]
    fn plain_messages_are_encoded_as_prost_does() {
        let r = v1::GetSecretRequest {
            name: "ORDERS_DB".into(),
        };
        let mut buf = Vec::new();
        encode_padded(&r, &mut buf);
        assert_eq!(buf, r.encode_to_vec());
        assert_eq!(padded_len(&r), r.encoded_len());
    }
}
