use super::*;

pub fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(FRAME_END);
    f
}

pub fn short(s: &[u8]) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s);
    v
}

pub fn deliver(channel: u16, tag: u64, routing_key: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    p.extend_from_slice(&BASIC_DELIVER.to_be_bytes());
    p.extend(short(b"ctag"));
    p.extend_from_slice(&tag.to_be_bytes());
    p.push(0);
    p.extend(short(b""));
    p.extend(short(routing_key));
    frame(FRAME_METHOD, channel, &p)
}

/// A content header with a message id and, if given, a headers table with one key.
pub fn header(channel: u16, body: u64, message_id: &[u8], key: Option<&[u8]>) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes());
    p.extend_from_slice(&body.to_be_bytes());
    let mut flags: u16 = 0x8000 | 0x0080; // content type, message id
    if key.is_some() {
        flags |= 0x2000;
    }
    p.extend_from_slice(&flags.to_be_bytes());
    p.extend(short(b"application/json"));
    if let Some(key) = key {
        let mut table = short(key);
        table.push(b'I');
        table.extend_from_slice(&7i32.to_be_bytes());
        p.extend_from_slice(&(table.len() as u32).to_be_bytes());
        p.extend(table);
    }
    p.extend(short(message_id));
    frame(FRAME_HEADER, channel, &p)
}

pub fn body(channel: u16, data: &[u8]) -> Vec<u8> {
    frame(FRAME_BODY, channel, data)
}
