//! The agent's HTTPS trust settings against a real TLS server (`openssl s_server`): a private
//! CA is accepted and replaces the public roots; a pinned certificate is accepted by its
//! SHA-256 and nothing else is.

// Test helpers may unwrap: a panic is how they fail.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use countersign_agent::AgentConfig;
use sha2::{Digest, Sha256};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("openssl runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA and a v3 server leaf for 127.0.0.1; returns the leaf's DER SHA-256.
fn pki(dir: &Path, ca: &str) -> String {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{ca}.key"),
            "-out",
            &format!("{ca}.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=test ca",
        ],
    );
    std::fs::write(dir.join("leaf.ext"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    openssl(
        dir,
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "leaf.key", "-out", "leaf.csr", "-subj",
            "/CN=leaf",
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "leaf.pem",
            "-extfile",
            "leaf.ext",
        ],
    );
    openssl(dir, &["x509", "-in", "leaf.pem", "-outform", "DER", "-out", "leaf.der"]);
    std::fs::set_permissions(dir.join("leaf.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
    hex::encode(Sha256::digest(std::fs::read(dir.join("leaf.der")).unwrap()))
}

struct Server(Child);
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn serve(dir: &Path) -> (Server, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("openssl")
        .args([
            "s_server",
            "-quiet",
            "-www",
            "-accept",
            &port.to_string(),
            "-cert",
            "leaf.pem",
            "-key",
            "leaf.key",
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server starts");
    // Owned at once, so a failure below still kills and reaps it.
    let server = Server(child);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return (server, port);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("s_server did not listen");
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
    let pin = pki(dir, "ca");
    let other = tempfile::tempdir().unwrap();
    let other_pin = pki(other.path(), "ca");
    let (_server, port) = serve(dir);

    let ca = config(&format!("ca_file = \"{}/ca.pem\"\n", dir.display()));
    assert_eq!(get(&ca, port).await, Ok(200), "the private CA vouches for the endpoint");
    let wrong_ca = config(&format!("ca_file = \"{}/ca.pem\"\n", other.path().display()));
    assert!(get(&wrong_ca, port).await.is_err(), "another CA must not be trusted");
    assert!(get(&config(""), port).await.is_err(), "public roots do not know a private CA");

    let pinned = config(&format!("pin_sha256 = [\"{pin}\"]\n"));
    assert_eq!(get(&pinned, port).await, Ok(200), "the pinned certificate is accepted");
    let wrong_pin = config(&format!("pin_sha256 = [\"{other_pin}\"]\n"));
    let e = get(&wrong_pin, port).await.unwrap_err();
    assert!(e.contains("not pinned"), "{e}");
}
