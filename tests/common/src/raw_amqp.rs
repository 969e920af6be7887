//! A minimal AMQP 0-9-1 publisher writing frames by hand: it can publish what no client
//! library lets through, such as short strings that are not valid UTF-8 (RabbitMQ stores
//! them as they are).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const METHOD: u8 = 1;
const HEADER: u8 = 2;
const BODY: u8 = 3;
const END: u8 = 0xCE;

/// Raw property bytes of a message; `None` leaves the property out.
#[derive(Clone, Debug, Default)]
pub struct RawProps {
    pub message_id: Option<Vec<u8>>,
    pub correlation_id: Option<Vec<u8>>,
    /// One header `name = 1` (a long int).
    pub header_name: Option<Vec<u8>>,
}

pub struct RawPublisher {
    socket: TcpStream,
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(u8::try_from(s.len()).expect("short string"));
    out.extend_from_slice(s);
}

fn long(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn method(class: u16, id: u16, args: &[u8]) -> Vec<u8> {
    let mut p = class.to_be_bytes().to_vec();
    p.extend_from_slice(&id.to_be_bytes());
    p.extend_from_slice(args);
    p
}

impl RawPublisher {
    /// Connects (guest/guest, vhost `/`) to the host and port of `url` and opens channel 1 in
    /// confirm mode.
    pub fn connect(url: &str) -> Self {
        let authority = url
            .split('@')
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .expect("amqp://user:pass@host:port/vhost");
        let socket = TcpStream::connect(authority).expect("connect to the broker");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut me = Self { socket };
        me.socket.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
        me.expect(10, 10); // connection.start
        let mut args = Vec::new();
        long(&mut args, b""); // client properties: an empty table
        short(&mut args, b"PLAIN");
        long(&mut args, b"\0guest\0guest");
        short(&mut args, b"en_US");
        me.send(METHOD, 0, &method(10, 11, &args));
        let tune = me.expect(10, 30);
        let mut args = tune[..6].to_vec(); // channel max, frame max
        args.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
        me.send(METHOD, 0, &method(10, 31, &args));
        let mut args = Vec::new();
        short(&mut args, b"/");
        short(&mut args, b"");
        args.push(0);
        me.send(METHOD, 0, &method(10, 40, &args));
        me.expect(10, 41);
        me.send(METHOD, 1, &method(20, 10, &[0]));
        me.expect(20, 11);
        me.send(METHOD, 1, &method(85, 10, &[0]));
        me.expect(85, 11);
        me
    }

    /// Publishes `body` to `queue` through the default exchange and waits for the confirm.
    pub fn publish(&mut self, queue: &str, props: &RawProps, body: &[u8]) {
        let mut args = 0u16.to_be_bytes().to_vec();
        short(&mut args, b"");
        short(&mut args, queue.as_bytes());
        args.push(0);
        self.send(METHOD, 1, &method(60, 40, &args));

        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        let mut flags: u16 = 0x8000 | 0x1000; // content type, delivery mode
        let mut fields = Vec::new();
        short(&mut fields, b"application/json");
        if let Some(name) = &props.header_name {
            flags |= 0x2000;
            let mut table = Vec::new();
            short(&mut table, name);
            table.push(b'I');
            table.extend_from_slice(&1i32.to_be_bytes());
            long(&mut fields, &table);
        }
        fields.push(2); // persistent
        if let Some(id) = &props.correlation_id {
            flags |= 0x0400;
            short(&mut fields, id);
        }
        if let Some(id) = &props.message_id {
            flags |= 0x0080;
            short(&mut fields, id);
        }
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend_from_slice(&fields);
        self.send(HEADER, 1, &header);
        self.send(BODY, 1, body);
        self.expect(60, 80); // basic.ack
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(END);
        self.socket.write_all(&frame).unwrap();
    }

    /// Reads frames until the method `class.id`; returns its arguments.
    fn expect(&mut self, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            self.socket
                .read_exact(&mut head)
                .expect("a frame from the broker");
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.socket.read_exact(&mut payload).unwrap();
            if head[0] != METHOD {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            assert_ne!(
                got,
                (10, 50),
                "the broker closed the connection: {}",
                String::from_utf8_lossy(&payload[4..])
            );
            assert_ne!(
                got,
                (20, 40),
                "the broker closed the channel: {}",
                String::from_utf8_lossy(&payload[4..])
            );
            if got == (class, id) {
                return payload[4..size].to_vec();
            }
        }
    }
}
