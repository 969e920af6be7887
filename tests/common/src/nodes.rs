//! Broker-side control for disruptive tests: `rabbitmqctl`, private virtual hosts, private
//! nodes and clusters, closing this test's own connections.

use super::*;

/// Runs `rabbitmqctl ARGS…` on the shared node, asserts success and returns its stdout.
pub fn rabbitmqctl(args: &[&str]) -> String {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A private virtual host for tests that change permissions: nothing they do reaches other
/// tests, and deleting it removes all its queues.
pub struct PrivateVhost {
    pub name: String,
}

impl PrivateVhost {
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        rabbitmqctl(&["add_vhost", &name]);
        let me = Self { name };
        me.allow();
        me
    }
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:5672/{}", self.name)
    }
    pub fn allow(&self) {
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &self.name,
            "guest",
            ".*",
            ".*",
            ".*",
        ]);
    }
    pub fn deny(&self) {
        rabbitmqctl(&["clear_permissions", "-p", &self.name, "guest"]);
    }
}

impl Drop for PrivateVhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Closes this test's own broker connection(s) by connection name.
pub fn close_connection(name: &str) -> usize {
    let out = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(&needle)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        let status = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "test: simulated connection loss"])
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmqctl");
        if status.success() {
            closed += 1;
        }
    }
    closed
}

// ---------------------------------------------------------------------------------------
// Private broker nodes (scripts/rabbit-node.sh, scripts/cluster.sh) for disruptive tests:
// their own node names, ports and data, stopped by a Drop guard even when the test fails.
// ---------------------------------------------------------------------------------------

/// The workspace root (where `scripts/` lives).
pub fn repo_root() -> std::path::PathBuf {
    // This crate lives in tests/common.
    let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    here.join("../..")
        .canonicalize()
        .unwrap_or_else(|_| here.join("../.."))
}

fn port_free(port: u32) -> bool {
    u16::try_from(port)
        .ok()
        .is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

/// A base port `p` such that `p..p+span` (AMQP, TLS) and `p+20000..p+20000+span` (Erlang
/// distribution) are free; random in 20000..29000 so parallel runs rarely meet.
pub fn free_node_port(span: u16) -> u16 {
    for _ in 0..200 {
        let base = fastrand::u16(20_000..29_000);
        let ok = (0..u32::from(span))
            .all(|i| port_free(u32::from(base) + i) && port_free(u32::from(base) + 20_000 + i));
        if ok {
            return base;
        }
    }
    panic!("no free port range for a private broker node");
}

/// A node name no other test run uses: `ct-<prefix>-<pid>-<n>`.
pub fn node_name(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "ct-{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn run_script(script: &str, args: &[&str]) -> std::process::Output {
    Command::new(repo_root().join("scripts").join(script))
        .args(args)
        .env("RABBIT_NODE_OWNER_PID", std::process::id().to_string())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"))
}

/// `rabbitmqctl -n NODE ARGS…` (bounded to 60 s); returns (success, stdout+stderr).
pub fn rabbitmqctl_on(node: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("timeout")
        .arg("60")
        .arg("rabbitmqctl")
        .args(["-n", node])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("rabbitmqctl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Closes connections named `name` on `node` (`None` = the shared node); returns how many.
pub fn close_connection_on(node: Option<&str>, name: &str) -> usize {
    let Some(node) = node else {
        return close_connection(name);
    };
    let (_, text) = rabbitmqctl_on(
        node,
        &[
            "list_connections",
            "pid",
            "client_properties",
            "-q",
            "--no-table-headers",
        ],
    );
    let needle = format!("{{\"connection_name\",\"{name}\"}}");
    text.lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|pid| {
            rabbitmqctl_on(
                node,
                &["close_connection", pid, "test: simulated connection loss"],
            )
            .0
        })
        .count()
}

/// A private single RabbitMQ node (see `scripts/rabbit-node.sh`), stopped and deleted on drop.
pub struct PrivateNode {
    /// Short name (`ct-…`), as given to the script.
    pub name: String,
    /// Erlang node name for `rabbitmqctl -n`.
    pub node: String,
    pub port: u16,
    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub url: String,
}

impl PrivateNode {
    /// Starts a node (retrying on another port if the chosen one was taken meanwhile); with
    /// `tls`, an amqps listener on `port + 1` with `tls/{ca.pem,server.pem,server.key}`.
    pub fn start(prefix: &str, tls: Option<&std::path::Path>) -> Self {
        let name = node_name(prefix);
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_node_port(2);
            let port_arg = port.to_string();
            let mut args = vec!["start", name.as_str(), port_arg.as_str()];
            let tls_dir;
            if let Some(dir) = tls {
                tls_dir = dir.to_string_lossy().into_owned();
                args.extend(["--tls", tls_dir.as_str()]);
            }
            let out = run_script("rabbit-node.sh", &args);
            if out.status.success() {
                let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                return Self {
                    node: format!("{name}@localhost"),
                    name,
                    port,
                    url,
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = run_script("rabbit-node.sh", &["stop", &name]);
        }
        panic!("private node {name} did not start: {last}");
    }

    pub fn tls_port(&self) -> u16 {
        self.port + 1
    }

    /// `rabbitmqctl -n <node> ARGS…`, asserting success.
    pub fn ctl(&self, args: &[&str]) -> String {
        let (ok, text) = rabbitmqctl_on(&self.node, args);
        assert!(ok, "rabbitmqctl -n {} {args:?}: {text}", self.node);
        text
    }
}

impl Drop for PrivateNode {
    fn drop(&mut self) {
        let _ = run_script("rabbit-node.sh", &["stop", &self.name]);
    }
}

/// A private 3-node cluster (see `scripts/cluster.sh`), stopped and deleted on drop.
pub struct PrivateCluster {
    pub prefix: String,
    /// Erlang node names, node 1..3.
    pub nodes: Vec<String>,
    /// AMQP URL of each node.
    pub urls: Vec<String>,
}

impl PrivateCluster {
    pub fn start(prefix: &str) -> Self {
        let prefix = node_name(prefix);
        let mut last = String::new();
        for _ in 0..2 {
            let base = free_node_port(3);
            let out = run_script("cluster.sh", &["start", &prefix, &base.to_string()]);
            if out.status.success() {
                let urls: Vec<String> = String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                assert_eq!(urls.len(), 3, "cluster.sh printed {urls:?}");
                return Self {
                    nodes: (1..=3).map(|i| format!("{prefix}{i}@localhost")).collect(),
                    prefix,
                    urls,
                };
            }
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = run_script("cluster.sh", &["stop", &prefix]);
        }
        panic!("cluster {prefix} did not start: {last}");
    }

    /// `rabbitmqctl -n <node i (0-based)> ARGS…`, asserting success.
    pub fn ctl(&self, i: usize, args: &[&str]) -> String {
        let (ok, text) = rabbitmqctl_on(&self.nodes[i], args);
        assert!(ok, "rabbitmqctl -n {} {args:?}: {text}", self.nodes[i]);
        text
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let _ = run_script("cluster.sh", &["stop", &self.prefix]);
    }
}
