//! The agent reaches its broker over TLS (rustls, ring) with a client certificate: a real
//! Mosquitto with a TLS listener that requires one, certificates from the test PKI (a CA and
//! leaves: rustls refuses a CA used as a server certificate).

use std::time::Duration;

use anyhow::Result;
use countersign_e2e::broker::Mosquitto;
use countersign_e2e::fleet::{Faults, Fleet};
use countersign_e2e::publisher::Publisher;
use countersign_e2e::stack::{publish_all, AgentSetup, Cloud};
use countersign_testkit::free_port;
use countersign_testkit::pki::TestPki;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_over_tls_with_a_client_certificate() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let pki = TestPki::create(&dir.join("pki"))?;
    let plain = free_port()?;
    let tls = free_port()?;
    let extra = format!(
        "listener {tls} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
        pki.ca_file().display(),
        pki.server_cert_file().display(),
        pki.server_key_file().display()
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
            "[mqtt]\nport = {tls}\nhost = \"localhost\"\nca_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            pki.ca_file().display(),
            pki.client_cert_file().display(),
            pki.client_key_file().display()
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
