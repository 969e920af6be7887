//! What the client does with a reply: `x-status` header (any AMQP type) → `Status::parse`,
//! and for `error` replies the envelope parser `parse_error` (the real source of
//! `src/client.rs`, extracted by build.rs). Never panics; unreadable envelopes become
//! `malformed_reply` with a bounded preview.
#![no_main]

use cottontail::headers::{self, get_string};
use cottontail::lapin::types::parsing::parse_field_table;
use cottontail::client::reply::Status;
use libfuzzer_sys::fuzz_target;

#[allow(dead_code, clippy::all)]
mod client {
    use cottontail::client::RpcError;
    include!(concat!(env!("OUT_DIR"), "/reply_envelope.rs"));

    pub fn parse(body: &[u8]) -> RpcError {
        parse_error(body)
    }
}

fuzz_target!(|data: &[u8]| {
    // First byte: where the header table ends; the rest is the body.
    let (head, body) = match data.split_first() {
        Some((&n, rest)) => rest.split_at((n as usize).min(rest.len())),
        None => (&[][..], &[][..]),
    };
    if let Ok((_, table)) = parse_field_table(head) {
        let status = get_string(Some(&table), headers::STATUS).and_then(|s| Status::parse(&s));
        if let Some(status) = status {
            assert_eq!(Status::parse(status.as_str()), Some(status));
        }
    }
    if let Ok(text) = std::str::from_utf8(body) {
        if let Some(status) = Status::parse(text) {
            assert_eq!(status.as_str(), text);
        }
    }
    match client::parse(body) {
        cottontail::client::RpcError::Remote { kind, message } => {
            if serde_json::from_slice::<serde_json::Value>(body).is_err() {
                assert_eq!(kind, "malformed_reply");
                // Preview: at most 200 characters of the body (plus an ellipsis).
                assert!(message.chars().count() <= 200 + 1 + 64, "{}", message.len());
            }
            let _ = (kind.len(), message.len());
        }
        other => panic!("parse_error returned {other:?}"),
    }
});
