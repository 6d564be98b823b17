//! The agent reaches its broker over TLS (rustls, ring) with a client certificate: a real
//! Mosquitto with a TLS listener that requires one, certificates made by openssl as a CA and
//! leaves (rustls refuses a CA used as a server certificate).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::free_port;
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").args(args).current_dir(dir).output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// A CA, a server leaf for localhost / 127.0.0.1, and a client leaf.
fn make_pki(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
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
            "/CN=countersign test ca",
        ],
    )?;
    // Leaves must be X.509 v3 (webpki refuses v1): give both an extension file.
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )?;
    std::fs::write(dir.join("client.ext"), "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")?;
    for name in ["server", "client"] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        )?;
        let (csr, pem) = (format!("{name}.csr"), format!("{name}.pem"));
        let mut args = vec!["x509", "-req", "-in", &csr, "-CA", "ca.pem", "-CAkey", "ca.key"];
        args.extend(["-CAcreateserial", "-days", "2", "-out", &pem]);
        let ext = format!("{name}.ext");
        args.extend(["-extfile", &ext]);
        openssl(dir, &args)?;
        std::fs::set_permissions(dir.join(format!("{name}.key")), std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_tls_with_a_client_certificate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = dir.join("pki");
    make_pki(&pki)?;
    let plain = free_port()?;
    let tls = free_port()?;
    let extra = format!(
        "listener {tls} 127.0.0.1\ncafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nrequire_certificate true\n",
        p = pki.display()
    );
    let _mqtt = Mosquitto::start_with(plain, &dir.join("mosquitto"), &extra).await?;
    let cloud = Cloud::start(dir).await?;
    let mut fleet = Fleet::new(4, 700, 5, 1_790_000_000, Faults::default());
    cloud.register(dir, &dir.join("gateway.key"), &fleet.meters())?;
    let setup =
        AgentSetup::write(dir, &dir.join("agent-data"), tls, &cloud.url, "[batch]\nlinger_ms = 50\n")?;
    // The broker's name must match its certificate: connect as localhost, with the CA and
    // the client certificate.
    let config = std::fs::read_to_string(&setup.config)?.replace(
        &format!("[mqtt]\nport = {tls}\n"),
        &format!(
            "[mqtt]\nport = {tls}\nhost = \"localhost\"\nca_file = \"{p}/ca.pem\"\nclient_cert_file = \"{p}/client.pem\"\nclient_key_file = \"{p}/client.key\"\n",
            p = pki.display()
        ),
    );
    std::fs::write(&setup.config, config)?;
    let mut agent = setup.start().await?;
    let mut devices = Publisher::connect("tls-devices", plain);
    for _ in 0..30 {
        let out = fleet.step();
        publish_all(&mut devices, &out).await?;
    }
    let out = fleet.finish();
    publish_all(&mut devices, &out).await?;
    let (sims, _) = cloud.wait_for_total(fleet.truth_total_bytes(), Duration::from_secs(60)).await?;
    assert_eq!(sims, fleet.truth_per_iccid());
    assert!(agent.terminate());
    devices.close().await;
    Ok(())
}
