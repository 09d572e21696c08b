//! Requests through the broker's strict decoder (`secretd_proto::codec::decode_strict`, what
//! every RPC's `StrictDecoder` runs): any bytes, for each of the 12 request types. Never a
//! panic; a refusal is INVALID_ARGUMENT with the fixed MALFORMED text (never quoting input);
//! what decodes re-encodes and decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use secretd_proto::{
    codec::{MALFORMED, decode_strict},
    v1 as pb,
};

fn check<M: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    match decode_strict::<M>(bytes) {
        Ok(msg) => {
            let again = decode_strict::<M>(msg.encode_to_vec().as_slice()).unwrap();
            assert_eq!(again, msg);
        }
        Err(status) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().starts_with(MALFORMED), "{}", status.message());
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    match which % 12 {
        0 => check::<pb::GetSecretRequest>(bytes),
        1 => check::<pb::GetSecretsRequest>(bytes),
        2 => check::<pb::ListSecretsRequest>(bytes),
        3 => check::<pb::WhoAmIRequest>(bytes),
        4 => check::<pb::WatchSecretRequest>(bytes),
        5 => check::<pb::RegisterWorkerRequest>(bytes),
        6 => check::<pb::ReloadRequest>(bytes),
        7 => check::<pb::StatusRequest>(bytes),
        8 => check::<pb::ScanRequest>(bytes),
        9 => check::<pb::RefreshRequest>(bytes),
        10 => check::<pb::SetSecretRequest>(bytes),
        _ => check::<pb::DeleteSecretRequest>(bytes),
    }
});
