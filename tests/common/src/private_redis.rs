//! A private redis-server child process on its own port (never the shared Redis), for tests
//! that stop, hang or kill their store.

use super::*;

/// The shared Redis: `REDIS_URL`, by default `redis://127.0.0.1:6379`. Tests use their own key
/// prefixes on it.
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A private `redis-server` child process (never the shared one), killed on drop.
pub struct PrivateRedis {
    port: u16,
    /// Append-only file with an fsync per write: a `kill -9` loses nothing acknowledged.
    durable: Option<TempDir>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Keeps nothing across a restart.
    pub fn start() -> Self {
        Self::launch(None)
    }

    /// Keeps every acknowledged write across a `kill -9` and restart (`appendfsync always`),
    /// like a store whose process crashes and comes back with its data.
    pub fn durable() -> Self {
        Self::launch(Some(TempDir::new("private-redis")))
    }

    fn launch(durable: Option<TempDir>) -> Self {
        let mut me = Self {
            port: free_port(),
            durable,
            child: None,
        };
        me.restart();
        me
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1", "--save", ""]);
        match &self.durable {
            Some(dir) => cmd
                .args(["--appendonly", "yes", "--appendfsync", "always"])
                .args(["--dir", &dir.path().to_string_lossy()]),
            None => cmd
                .args(["--appendonly", "no"])
                .args(["--dir", &std::env::temp_dir().to_string_lossy()]),
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.answers() {
            assert!(
                Instant::now() < deadline,
                "private redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it answers PING (a durable one answers once it has loaded its data).
    pub fn answers(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut buf = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut buf).is_ok()
            && &buf == b"+PONG\r\n"
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal (`STOP`, `CONT`) to this test's own redis-server.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args([format!("-{name}"), pid.to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.kill();
    }
}
