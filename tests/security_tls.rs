//! TLS: a cottontail app reaches a broker over `amqps://` whose certificate comes from a
//! private CA (trusted through `Config::tls_ca_file`), handles a request end to end and
//! replies; without the CA the connection fails fast with a certificate error.
//!
//! Uses a PRIVATE broker node (scripts/rabbit-node.sh --tls) with a throwaway CA and server
//! certificate made by `openssl` here; the node is stopped by a Drop guard.
use cottontail_test_support as common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use cottontail::connection::Connector;
use cottontail::lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use cottontail::lapin::types::FieldTable;
use cottontail::{App, Config, HandlerError, Json, Queue};
use futures::StreamExt;
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct Ping {
    n: u64,
}

#[derive(Serialize)]
struct Pong {
    n: u64,
    over: &'static str,
}

async fn pong(Json(ping): Json<Ping>) -> Result<Json<Pong>, HandlerError> {
    Ok(Json(Pong {
        n: ping.n + 1,
        over: "tls",
    }))
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A local CA (`ca.pem`) and a server certificate for localhost/127.0.0.1 signed by it.
fn make_certs(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=cottontail test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_a_private_ca_handles_and_replies_and_rejects_unknown_ca() {
    let certs = TempDir::new("tls-certs");
    make_certs(certs.path());
    let node = PrivateNode::start("tls", Some(certs.path()));
    let ca = certs.path().join("ca.pem");
    let amqps = format!("amqps://guest:guest@localhost:{}/%2f", node.tls_port());

    bounded(Duration::from_secs(120), async {
        // The app speaks TLS only.
        let queue = "tls.ping";
        let config = Config::new(amqps.clone())
            .tls_ca_file(&ca)
            .connection_name(unique("tls-app"))
            .shutdown_timeout(Duration::from_secs(10));
        let running = start_with(
            App::new(()).handler(Queue::new(queue).concurrency(2), pong),
            config,
        )
        .await;

        // The caller too: over TLS with the same CA, through cottontail's Connector.
        let pem = std::fs::read_to_string(&ca).unwrap();
        let conn = Connector::new(&amqps, unique("tls-client"))
            .unwrap()
            .with_tls_ca(pem)
            .connect_once()
            .await
            .expect("amqps connection with the private CA");
        let ch = conn.create_channel().await.unwrap();
        let reply_q = ch
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .name()
            .to_string();
        let mut replies = ch
            .basic_consume(
                reply_q.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap();
        let pub_ch = confirm_channel(&conn).await;
        let props = json_props()
            .with_reply_to(reply_q.as_str().into())
            .with_correlation_id("tls-1".into());
        let confirm = pub_ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                br#"{"n":41}"#,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
        let reply = tokio::time::timeout(Duration::from_secs(20), replies.next())
            .await
            .expect("a reply within 20 s")
            .expect("reply stream open")
            .expect("reply delivery");
        let reply = Received::from(reply);
        assert_eq!(header_str(&reply, "x-status").as_deref(), Some("ok"));
        assert_eq!(
            reply
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str()),
            Some("tls-1")
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.data).unwrap();
        assert_eq!(body, serde_json::json!({"n": 42, "over": "tls"}));
        let _ = conn.close(200, "bye".into()).await;
        running.stop().await.unwrap();

        // Without the CA: a certificate error, promptly (not a hang, not a retry loop).
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(
            Duration::from_secs(15),
            Config::new(amqps.clone())
                .connection_name(unique("tls-untrusted"))
                .connector()
                .unwrap()
                .connect_once(),
        )
        .await
        .expect("connecting without the CA must fail fast, not hang")
        .expect_err("a broker certificate from an unknown CA must be rejected");
        let text = format!("{err} {err:?}").to_lowercase();
        assert!(
            text.contains("certificate") || text.contains("unknownissuer"),
            "expected a certificate error, got: {err:?}"
        );
        eprintln!(
            "tls: untrusted CA rejected in {:?}: {err}",
            started.elapsed()
        );
    })
    .await;
    drop(node);
}
