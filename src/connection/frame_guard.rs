//! Keeps frames lapin cannot parse away from it.
//!
//! lapin's parser reads AMQP short strings (`message_id`, `correlation_id`, header names,
//! routing keys…) as Rust `String`s and treats invalid UTF-8 as a fatal framing error: it
//! closes the whole connection, and the broker redelivers the same message to the next
//! connection, forever. RabbitMQ does not validate these strings, so any client can publish
//! such a message. [`FrameGuard`] watches the bytes the broker sends, below lapin: it replaces
//! the invalid bytes of a short string with `?` (same length, so no frame moves) and adds the
//! header [`INVALID_UTF8`] naming the fields, so the pipeline dead-letters the message with
//! its reason instead of handling a rewritten message.
//!
//! Only frames that can carry a client's short strings are read: content headers and the
//! `basic.deliver`, `basic.get-ok` and `basic.return` methods. Body frames, which carry nearly
//! all the bytes, are skipped by their length without being looked at.

pub(crate) use crate::headers::INVALID_UTF8;

const FRAME_METHOD: u8 = 1;
const FRAME_HEADER: u8 = 2;
const FRAME_BODY: u8 = 3;
const FRAME_HEARTBEAT: u8 = 8;
#[cfg(test)]
const FRAME_END: u8 = 0xCE;
/// The largest frame held back to be checked whole (RabbitMQ's `frame_max` is 128 KiB by
/// default), so memory stays bounded whatever a frame's size field says.
const MAX_CHECKED: usize = 4 << 20;
/// type (1), channel (2), size (4).
const FRAME_HEAD: usize = 7;
const CLASS_BASIC: u16 = 60;
const BASIC_RETURN: u16 = 50;
const BASIC_DELIVER: u16 = 60;
const BASIC_GET_OK: u16 = 71;

/// The state of one connection's incoming byte stream.
#[derive(Debug, Default)]
pub(crate) struct FrameGuard {
    /// Bytes of the current frame still to pass unread.
    skip: usize,
    /// Channels whose last delivery method had invalid strings, with the fields, to be named
    /// on the content header that follows it.
    flagged: Vec<(u16, Vec<&'static str>)>,
    /// The stream is not (or no longer) AMQP frames, e.g. a protocol header sent back on a
    /// version mismatch: everything passes, lapin reports it.
    off: bool,
}

impl FrameGuard {
    /// Advances over the leading bytes of `data` that need no change and returns how many.
    /// Stops before a frame that must be whole to be checked (see [`FrameGuard::fix_at`]) or
    /// that needs rewriting.
    pub(crate) fn scan(&mut self, data: &[u8]) -> usize {
        let mut pos = 0;
        loop {
            if self.off {
                return data.len();
            }
            if self.skip > 0 {
                let n = self.skip.min(data.len() - pos);
                pos += n;
                self.skip -= n;
                if self.skip > 0 {
                    return pos;
                }
                continue;
            }
            let rest = &data[pos..];
            let Some(frame) = Frame::peek(rest) else {
                return pos;
            };
            match frame.kind {
                FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT => {}
                _ => {
                    self.off = true;
                    continue;
                }
            }
            match frame.inspected(rest) {
                Some(false) => {
                    self.skip = frame.total;
                    continue;
                }
                // Not enough bytes yet to tell the method.
                None => return pos,
                Some(true) if frame.total > MAX_CHECKED => {
                    // Far beyond any negotiated frame size: not held in memory, lapin decides.
                    self.skip = frame.total;
                    continue;
                }
                Some(true) => {}
            }
            if rest.len() < frame.total {
                return pos;
            }
            let payload = &rest[FRAME_HEAD..frame.total - 1];
            if self.needs_fix(frame, payload) {
                return pos;
            }
            pos += frame.total;
        }
    }

    /// Checks (and fixes) the frame that starts at `at` when it is all in `buf`; returns its
    /// length after the fix, or `None` while it is incomplete.
    pub(crate) fn fix_at(&mut self, buf: &mut Vec<u8>, at: usize) -> Option<usize> {
        let frame = Frame::peek(&buf[at..])?;
        if buf.len() - at < frame.total {
            return None;
        }
        let start = at + FRAME_HEAD;
        let end = at + frame.total - 1;
        if frame.kind == FRAME_METHOD {
            let mut bad = Vec::new();
            if let Some(fields) = method_strings(&buf[start..end]) {
                for (field, range) in fields {
                    if sanitize(&mut buf[start + range.start..start + range.end]) {
                        push_unique(&mut bad, field);
                    }
                }
            }
            self.flagged.retain(|(c, _)| *c != frame.channel);
            if !bad.is_empty() {
                self.flagged.push((frame.channel, bad));
            }
            return Some(frame.total);
        }
        let mut bad = self.take_flagged(frame.channel);
        let Some(layout) = HeaderLayout::read(&buf[start..end]) else {
            return Some(frame.total);
        };
        for (field, range) in &layout.strings {
            if sanitize(&mut buf[start + range.start..start + range.end]) {
                push_unique(&mut bad, field);
            }
        }
        if bad.is_empty() {
            return Some(frame.total);
        }
        let entry = header_entry(&bad.join(", "));
        let insert = start + layout.headers_end;
        let added = if layout.has_headers {
            // Lengthen the existing table.
            let table = start + layout.headers_start;
            let len = read_u32(&buf[table..]).unwrap_or(0) as usize + entry.len();
            buf[table..table + 4].copy_from_slice(&(len as u32).to_be_bytes());
            buf.splice(insert..insert, entry.iter().copied());
            entry.len()
        } else {
            // Add a table (and its property flag) where the headers belong.
            let flags = start + 12;
            buf[flags] |= 0x20;
            let mut table = (entry.len() as u32).to_be_bytes().to_vec();
            table.extend_from_slice(&entry);
            buf.splice(insert..insert, table.iter().copied());
            table.len()
        };
        let size = (frame.total - FRAME_HEAD - 1 + added) as u32;
        buf[at + 3..at + 7].copy_from_slice(&size.to_be_bytes());
        Some(frame.total + added)
    }

    /// Whether a whole method or content-header frame needs [`FrameGuard::fix_at`].
    fn needs_fix(&self, frame: Frame, payload: &[u8]) -> bool {
        if frame.kind == FRAME_METHOD {
            return method_strings(payload)
                .is_some_and(|fields| fields.iter().any(|(_, r)| invalid(&payload[r.clone()])));
        }
        if self.flagged.iter().any(|(c, _)| *c == frame.channel) {
            return true;
        }
        HeaderLayout::read(payload).is_some_and(|layout| {
            layout
                .strings
                .iter()
                .any(|(_, r)| invalid(&payload[r.clone()]))
        })
    }

    fn take_flagged(&mut self, channel: u16) -> Vec<&'static str> {
        match self.flagged.iter().position(|(c, _)| *c == channel) {
            Some(i) => self.flagged.swap_remove(i).1,
            None => Vec::new(),
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Frame {
    kind: u8,
    channel: u16,
    /// Head, payload and frame-end byte.
    total: usize,
}

impl Frame {
    fn peek(data: &[u8]) -> Option<Frame> {
        let head = data.get(..FRAME_HEAD)?;
        let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
        Some(Frame {
            kind: head[0],
            channel: u16::from_be_bytes([head[1], head[2]]),
            total: FRAME_HEAD + size + 1,
        })
    }

    /// Whether the frame is read (`None`: its first bytes have not arrived yet).
    fn inspected(&self, data: &[u8]) -> Option<bool> {
        match self.kind {
            FRAME_HEADER => Some(true),
            FRAME_METHOD => {
                if self.total < FRAME_HEAD + 4 + 1 {
                    return Some(false);
                }
                let ids = data.get(FRAME_HEAD..FRAME_HEAD + 4)?;
                let class = u16::from_be_bytes([ids[0], ids[1]]);
                let method = u16::from_be_bytes([ids[2], ids[3]]);
                Some(
                    class == CLASS_BASIC
                        && matches!(method, BASIC_DELIVER | BASIC_GET_OK | BASIC_RETURN),
                )
            }
            _ => Some(false),
        }
    }
}

type Strings = Vec<(&'static str, std::ops::Range<usize>)>;

/// The short strings of a `basic.deliver`, `basic.get-ok` or `basic.return` payload, as byte
/// ranges of the payload; `None` when it does not parse (lapin then reports it).
fn method_strings(payload: &[u8]) -> Option<Strings> {
    let mut r = Reader::new(payload);
    let _class = r.u16()?;
    let method = r.u16()?;
    let mut out = Vec::new();
    match method {
        BASIC_DELIVER => {
            out.push(("consumer_tag", r.short_string()?));
            r.skip(8 + 1)?;
            out.push(("exchange", r.short_string()?));
            out.push(("routing_key", r.short_string()?));
        }
        BASIC_GET_OK => {
            r.skip(8 + 1)?;
            out.push(("exchange", r.short_string()?));
            out.push(("routing_key", r.short_string()?));
        }
        BASIC_RETURN => {
            r.skip(2)?;
            out.push(("reply_text", r.short_string()?));
            out.push(("exchange", r.short_string()?));
            out.push(("routing_key", r.short_string()?));
        }
        _ => {}
    }
    Some(out)
}

/// Where a content header's short strings and its headers table are.
#[derive(Debug)]
struct HeaderLayout {
    strings: Strings,
    has_headers: bool,
    /// Offset of the table's length (or where the table would go).
    headers_start: usize,
    /// Offset just past the table (or where the table would go).
    headers_end: usize,
}

/// The basic class's properties in flag order (bit 15 down): name, and how to read it.
const PROPERTIES: [(&str, Property); 14] = [
    ("content_type", Property::Short),
    ("content_encoding", Property::Short),
    ("headers", Property::Table),
    ("delivery_mode", Property::Fixed(1)),
    ("priority", Property::Fixed(1)),
    ("correlation_id", Property::Short),
    ("reply_to", Property::Short),
    ("expiration", Property::Short),
    ("message_id", Property::Short),
    ("timestamp", Property::Fixed(8)),
    ("type", Property::Short),
    ("user_id", Property::Short),
    ("app_id", Property::Short),
    ("cluster_id", Property::Short),
];

#[derive(Clone, Copy)]
enum Property {
    Short,
    Table,
    Fixed(usize),
}

impl HeaderLayout {
    /// Reads a content header payload; `None` when it is not a basic one or does not parse.
    fn read(payload: &[u8]) -> Option<HeaderLayout> {
        let mut r = Reader::new(payload);
        if r.u16()? != CLASS_BASIC {
            return None;
        }
        r.skip(2 + 8)?;
        let flags = r.u16()?;
        if flags & 1 != 0 {
            // A second flags word: not a basic header lapin knows.
            return None;
        }
        let mut layout = HeaderLayout {
            strings: Vec::new(),
            has_headers: false,
            headers_start: 0,
            headers_end: 0,
        };
        for (bit, (name, property)) in PROPERTIES.iter().enumerate() {
            let present = flags & (1 << (15 - bit)) != 0;
            if matches!(property, Property::Table) {
                layout.headers_start = r.pos;
                if present {
                    layout.has_headers = true;
                    table_strings(&mut r, &mut layout.strings)?;
                }
                layout.headers_end = r.pos;
                continue;
            }
            if !present {
                continue;
            }
            match property {
                Property::Short => layout.strings.push((name, r.short_string()?)),
                Property::Fixed(n) => r.skip(*n)?,
                Property::Table => {}
            }
        }
        Some(layout)
    }
}

/// Collects the keys of a field table (and of the tables nested in it) at the reader.
fn table_strings(r: &mut Reader, out: &mut Strings) -> Option<()> {
    let len = r.u32()? as usize;
    let end = r.pos.checked_add(len)?;
    while r.pos < end {
        out.push(("header name", r.short_string()?));
        value_strings(r, out)?;
    }
    (r.pos == end).then_some(())
}

/// Skips one typed field value, collecting the keys of nested tables. The type letters are
/// those lapin reads (RabbitMQ's: `s` is a short int).
fn value_strings(r: &mut Reader, out: &mut Strings) -> Option<()> {
    match r.u8()? {
        b't' | b'b' | b'B' => r.skip(1),
        b's' | b'U' | b'u' => r.skip(2),
        b'I' | b'i' | b'f' => r.skip(4),
        b'L' | b'l' | b'd' | b'T' => r.skip(8),
        b'D' => r.skip(5),
        b'V' => Some(()),
        b'S' | b'x' => {
            let n = r.u32()? as usize;
            r.skip(n)
        }
        b'F' => table_strings(r, out),
        b'A' => {
            let len = r.u32()? as usize;
            let end = r.pos.checked_add(len)?;
            while r.pos < end {
                value_strings(r, out)?;
            }
            (r.pos == end).then_some(())
        }
        // Unknown to lapin as well: leave the frame to it.
        _ => None,
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let bytes = self.data.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(bytes)
    }
    fn skip(&mut self, n: usize) -> Option<()> {
        self.take(n).map(|_| ())
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        read_u32(self.take(4)?)
    }
    /// A short string's bytes, as a range of the data.
    fn short_string(&mut self) -> Option<std::ops::Range<usize>> {
        let n = usize::from(self.u8()?);
        let start = self.pos;
        self.skip(n)?;
        Some(start..start + n)
    }
}

fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

fn invalid(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_err()
}

/// Replaces every byte of an invalid UTF-8 sequence with `?`; returns whether any was.
fn sanitize(bytes: &mut [u8]) -> bool {
    let mut changed = false;
    let mut pos = 0;
    while let Err(e) = std::str::from_utf8(&bytes[pos..]) {
        let start = pos + e.valid_up_to();
        let len = e.error_len().unwrap_or(bytes.len() - start);
        bytes[start..start + len].fill(b'?');
        changed = true;
        pos = start + len;
    }
    changed
}

fn push_unique(list: &mut Vec<&'static str>, field: &'static str) {
    if !list.contains(&field) {
        list.push(field);
    }
}

/// A field-table entry `INVALID_UTF8 = fields` (a long string).
fn header_entry(fields: &str) -> Vec<u8> {
    let mut entry = Vec::with_capacity(INVALID_UTF8.len() + fields.len() + 6);
    entry.push(INVALID_UTF8.len() as u8);
    entry.extend_from_slice(INVALID_UTF8.as_bytes());
    entry.push(b'S');
    entry.extend_from_slice(&(fields.len() as u32).to_be_bytes());
    entry.extend_from_slice(fields.as_bytes());
    entry
}

/// Frames for tests and fuzzing: what a broker sends.
#[cfg(test)]
pub(crate) mod wire;

#[cfg(test)]
mod tests;
