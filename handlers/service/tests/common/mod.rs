//! Shared helpers for the demo service's tests: start/stop the real binary.
#![allow(dead_code)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL")
        .unwrap_or_else(|_| cottontail::connection::DEFAULT_AMQP_URL.to_owned())
}

pub struct Demo {
    pub child: Child,
    pub http: String,
}

impl Demo {
    /// Starts the demo binary (HTTP on a port derived from this test process and `slot`) and
    /// waits until it is ready.
    pub fn start() -> Demo {
        Self::start_with(0, &[])
    }

    pub fn start_with(slot: u16, env: &[(&str, &str)]) -> Demo {
        let port = 20000 + (std::process::id() % 15000) as u16 + slot * 5;
        let http = format!("127.0.0.1:{port}");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cottontail-demo"));
        cmd.env("COTTONTAIL_HTTP_ADDR", &http)
            .env("AMQP_URL", amqp_url())
            .env("RUST_LOG", "warn")
            .env(
                "COTTONTAIL_CONNECTION_NAME",
                format!("demo-test-{}-{slot}", std::process::id()),
            )
            .stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start cottontail-demo");
        let demo = Demo { child, http };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !demo.ready() {
            assert!(Instant::now() < deadline, "demo never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
        demo
    }

    pub fn ready(&self) -> bool {
        self.get("/health/ready").starts_with("HTTP/1.1 200")
    }

    /// The raw HTTP response to `GET path` (empty when the service does not answer).
    pub fn get(&self, path: &str) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.http) else {
            return String::new();
        };
        let _ = write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "demo exited with {status:?} after SIGTERM"
                );
                return;
            }
            assert!(Instant::now() < deadline, "demo did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
