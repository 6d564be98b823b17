//! The agent's HTTPS trust settings against a real TLS server (`openssl s_server`, serving a
//! certificate of the test PKI): a private CA is accepted and replaces the public roots; a
//! pinned certificate is accepted by its SHA-256 and nothing else is.

// Test helpers may unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use countersign_agent::AgentConfig;
use countersign_testkit::pki::TestPki;
use countersign_testkit::procs::{which, Exe, Proc};
use countersign_testkit::{free_port, wait_for_port};
use sha2::{Digest, Sha256};

/// A test PKI in `dir`; returns it and its server certificate's DER SHA-256.
fn make_pki(dir: &Path) -> (TestPki, String) {
    let pki = TestPki::create(dir).unwrap();
    let pin = hex::encode(Sha256::digest(pki.server_der()));
    (pki, pin)
}

/// `openssl s_server` with the PKI's server certificate on a free port.
async fn serve(pki: &TestPki, log: &Path) -> (Proc, u16) {
    let port = free_port().unwrap();
    let openssl = Exe::with_runner(&[], which("openssl").expect("openssl is installed")).unwrap();
    let (cert, key) = (pki.server_cert_file(), pki.server_key_file());
    let args = [
        "s_server",
        "-quiet",
        "-www",
        "-accept",
        &port.to_string(),
        "-cert",
        path(&cert),
        "-key",
        path(&key),
    ];
    // Owned at once, so a failure below still kills and reaps it.
    let server = Proc::spawn_exe(&openssl, &args, log).expect("openssl s_server starts");
    assert!(wait_for_port(port, Duration::from_secs(5)).await, "s_server did not listen");
    (server, port)
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn config(http: &str) -> AgentConfig {
    AgentConfig::from_toml_str(&format!(
        "gateway_id = 1\ngateway_key_file = \"/k\"\ndata_dir = \"/d\"\nendpoint_url = \"https://127.0.0.1\"\n[http]\n{http}"
    ))
    .unwrap()
}

async fn get(config: &AgentConfig, port: u16) -> Result<u16, String> {
    let client = countersign_agent::tls::http_client(config).map_err(|e| e.to_string())?;
    let r = client.get(format!("https://127.0.0.1:{port}/")).send().await.map_err(|e| format!("{e:?}"))?;
    Ok(r.status().as_u16())
}

#[tokio::test]
async fn private_ca_and_pinned_certificates() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (pki, pin) = make_pki(dir);
    let other = tempfile::tempdir().unwrap();
    let (other_pki, other_pin) = make_pki(other.path());
    let (_server, port) = serve(&pki, &dir.join("s_server.log")).await;

    let ca = config(&format!("ca_file = \"{}\"\n", pki.ca_file().display()));
    assert_eq!(get(&ca, port).await, Ok(200), "the private CA vouches for the endpoint");
    let wrong_ca = config(&format!("ca_file = \"{}\"\n", other_pki.ca_file().display()));
    assert!(get(&wrong_ca, port).await.is_err(), "another CA must not be trusted");
    assert!(get(&config(""), port).await.is_err(), "public roots do not know a private CA");

    let pinned = config(&format!("pin_sha256 = [\"{pin}\"]\n"));
    assert_eq!(get(&pinned, port).await, Ok(200), "the pinned certificate is accepted");
    let wrong_pin = config(&format!("pin_sha256 = [\"{other_pin}\"]\n"));
    let e = get(&wrong_pin, port).await.unwrap_err();
    assert!(e.contains("not pinned"), "{e}");
}
