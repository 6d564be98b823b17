//! End-to-end harness for Countersign: real brokers, real processes, simulated devices.
//!
//! - [`fleet`]: devices running the real meter code over random traffic.
//! - [`broker`]: an embedded rumqttd for the one-command demo, a private Mosquitto for tests.
//! - [`publisher`]: device-side MQTT publishing that waits for every PUBACK.
//! - [`modem_sim`]: a Quectel-style modem on the serial port of the QEMU-emulated board.
//! - [`procs`]: the project's binaries as child processes that die with the test.
//! - [`stack`]: an endpoint and agents as real processes, keys registered by real commands.
//! - [`faultproxy`]: an HTTP proxy that makes the endpoint refuse, fail or hang on demand.

pub mod broker;
pub mod faultproxy;
pub mod fleet;
pub mod modem_sim;
pub mod procs;
pub mod publisher;
pub mod stack;

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until something accepts TCP connections on `port`, or the timeout passes.
pub async fn wait_for_port(port: u16, timeout: std::time::Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    false
}
