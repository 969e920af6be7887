use super::wire::*;
use super::*;
use amq_protocol::frame::{parse_frame, AMQPFrame};

/// Every frame as lapin's own parser reads it; panics on a frame it rejects.
fn parse(mut bytes: &[u8]) -> Vec<AMQPFrame> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let (rest, frame) = parse_frame(bytes).expect("lapin parses every frame");
        out.push(frame);
        bytes = rest;
    }
    out
}

/// Runs `bytes` through a guard in chunks of `chunk` bytes, the way the stream does.
fn through(bytes: &[u8], chunk: usize) -> Vec<u8> {
    let mut guard = FrameGuard::default();
    let mut held: Vec<u8> = Vec::new();
    let mut ready = 0;
    let mut out = Vec::new();
    for piece in bytes.chunks(chunk) {
        held.extend_from_slice(piece);
        loop {
            ready += guard.scan(&held[ready..]);
            if ready == held.len() {
                break;
            }
            match guard.fix_at(&mut held, ready) {
                Some(n) => ready += n,
                None => break,
            }
        }
        out.extend(held.drain(..ready));
        ready = 0;
    }
    assert!(held.is_empty(), "bytes held back at the end");
    out
}

fn headers_of(bytes: &[u8]) -> Vec<lapin::BasicProperties> {
    parse(bytes)
        .into_iter()
        .filter_map(|frame| match frame {
            AMQPFrame::Header(_, header) => Some(header.properties),
            _ => None,
        })
        .collect()
}

#[test]
fn valid_frames_pass_unchanged_in_any_chunking() {
    let mut stream = deliver(1, 1, b"jobs");
    stream.extend(header(1, 3, b"id-1", Some(b"x-key")));
    stream.extend(body(1, b"abc"));
    stream.extend(frame(FRAME_HEARTBEAT, 0, &[]));
    for chunk in [1, 2, 7, 11, 64, 4096] {
        assert_eq!(through(&stream, chunk), stream, "chunk {chunk}");
    }
    assert_eq!(parse(&stream).len(), 4);
}

#[test]
fn an_invalid_message_id_is_replaced_and_named() {
    let mut stream = deliver(1, 1, b"jobs");
    stream.extend(header(1, 3, b"id-\xff\xfe", None));
    stream.extend(body(1, b"abc"));
    // What lapin does today: the connection dies on this frame.
    let header_at = deliver(1, 1, b"jobs").len();
    assert!(parse_frame(&stream[header_at..]).is_err());
    for chunk in [1, 5, 4096] {
        let out = through(&stream, chunk);
        let props = &headers_of(&out)[0];
        assert_eq!(props.message_id().as_ref().unwrap().as_str(), "id-??");
        let headers = props.headers().as_ref().unwrap();
        assert_eq!(
            crate::headers::get_str(Some(headers), INVALID_UTF8),
            Some("message_id")
        );
    }
}

#[test]
fn an_invalid_header_name_is_replaced_and_named_in_the_same_table() {
    let mut stream = header(2, 0, b"ok", Some(b"k\xc3"));
    stream.extend(header(2, 0, b"ok", Some(b"fine")));
    let out = through(&stream, 3);
    let all = headers_of(&out);
    let first = all[0].headers().as_ref().unwrap();
    assert!(first.inner().contains_key("k?"), "{first:?}");
    assert_eq!(
        crate::headers::get_str(Some(first), INVALID_UTF8),
        Some("header name")
    );
    // The next message on the channel is untouched.
    assert!(all[1]
        .headers()
        .as_ref()
        .unwrap()
        .inner()
        .contains_key("fine"));
    assert_eq!(all[1].headers().as_ref().unwrap().inner().len(), 1);
}

#[test]
fn an_invalid_routing_key_marks_the_content_header_that_follows() {
    let mut stream = deliver(3, 9, b"rk-\x80");
    stream.extend(header(3, 0, b"id", None));
    let out = through(&stream, 4096);
    assert_eq!(parse(&out).len(), 2);
    let props = &headers_of(&out)[0];
    assert_eq!(
        crate::headers::get_str(props.headers().as_ref(), INVALID_UTF8),
        Some("routing_key")
    );
}

#[test]
fn valid_multibyte_text_is_kept_and_only_bad_bytes_replaced() {
    let mut bytes = "añ€".as_bytes().to_vec();
    bytes.push(0xff);
    bytes.extend_from_slice("z".as_bytes());
    bytes.extend_from_slice(&[0xe2, 0x82]); // truncated at the end
    assert!(sanitize(&mut bytes));
    assert_eq!(std::str::from_utf8(&bytes).unwrap(), "añ€?z??");
    assert!(!sanitize(&mut "fine".as_bytes().to_vec()));
}

#[test]
fn a_stream_that_is_not_frames_passes_through() {
    let stream = b"AMQP\x00\x00\x09\x01 and then anything".to_vec();
    assert_eq!(through(&stream, 3), stream);
}

#[test]
fn body_bytes_are_never_read_as_frames() {
    // A body that looks like an invalid content header must not be touched.
    let fake = header(1, 0, b"\xff", None);
    let mut stream = deliver(1, 1, b"q");
    stream.extend(header(1, fake.len() as u64, b"id", None));
    stream.extend(body(1, &fake));
    assert_eq!(through(&stream, 5), stream);
}

proptest::proptest! {
    /// Any mix of valid and invalid strings, in any chunking: lapin parses every frame
    /// that comes out, bodies are untouched, and exactly the messages with an invalid
    /// string carry the mark.
    #[test]
    fn every_frame_parses_after_the_guard(
        messages in proptest::collection::vec(
            (
                proptest::collection::vec(proptest::num::u8::ANY, 0..12),
                proptest::option::of(proptest::collection::vec(proptest::num::u8::ANY, 0..12)),
                proptest::collection::vec(proptest::num::u8::ANY, 0..8),
                proptest::collection::vec(proptest::num::u8::ANY, 0..300),
            ),
            1..12,
        ),
        chunk in 1usize..300,
    ) {
        let mut stream = Vec::new();
        let mut expected = Vec::new();
        for (i, (id, key, routing_key, data)) in messages.iter().enumerate() {
            let channel = 1 + (i % 3) as u16;
            stream.extend(deliver(channel, i as u64, routing_key));
            stream.extend(header(channel, data.len() as u64, id, key.as_deref()));
            stream.extend(body(channel, data));
            let bad = invalid(id) || invalid(routing_key) || key.as_deref().is_some_and(invalid);
            expected.push((bad, data.clone()));
        }
        let out = through(&stream, chunk);
        let frames = parse(&out);
        let mut marks = Vec::new();
        let mut bodies = Vec::new();
        for frame in frames {
            match frame {
                AMQPFrame::Header(_, h) => marks.push(
                    crate::headers::get_str(h.properties.headers().as_ref(), INVALID_UTF8).is_some(),
                ),
                AMQPFrame::Body(_, data) => bodies.push(data),
                _ => {}
            }
        }
        let want: Vec<bool> = expected.iter().map(|(bad, _)| *bad).collect();
        proptest::prop_assert_eq!(marks, want);
        let want: Vec<Vec<u8>> = expected.into_iter().map(|(_, data)| data).collect();
        proptest::prop_assert_eq!(bodies, want);
    }
}
