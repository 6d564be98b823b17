//! Provisioning at build time: the meter id, its HMAC key and the board settings come from
//! the environment and are written to `$OUT_DIR/provision.rs`. There is no default key: a
//! build without one fails, so no image ships with a shared or test key by accident.
//!
//! - `COUNTERSIGN_METER_ID`: the meter id (u64), as registered with the endpoint.
//! - `COUNTERSIGN_METER_KEY_FILE`: the key file from `countersign-cloud keygen-meter` (one
//!   line of 64 hex digits), or `COUNTERSIGN_METER_KEY`: the 64 hex digits themselves.
//! - `COUNTERSIGN_POLL_INTERVAL_MS` (default 60000): how often the modem counters are read.
//! - `COUNTERSIGN_BROKER_HOST` (default `gateway.local`), `COUNTERSIGN_BROKER_PORT` (1883).

use std::env;
use std::fmt::Write as _;
use std::path::PathBuf;

fn var(name: &str) -> Option<String> {
    println!("cargo:rerun-if-env-changed={name}");
    env::var(name).ok().filter(|v| !v.is_empty())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    std::process::exit(1);
}

fn main() {
    let out = PathBuf::from(env::var("OUT_DIR").unwrap_or_else(|_| fail("OUT_DIR not set")));
    // memory.x in the crate root is found by the linker through this search path.
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| fail("no manifest dir")));
    println!("cargo:rustc-link-search={}", root.display());
    println!("cargo:rerun-if-changed=memory.x");

    let meter_id: u64 = var("COUNTERSIGN_METER_ID")
        .unwrap_or_else(|| fail("set COUNTERSIGN_METER_ID (the meter id registered with the endpoint)"))
        .parse()
        .unwrap_or_else(|_| fail("COUNTERSIGN_METER_ID is not a u64"));
    let key_hex = match (var("COUNTERSIGN_METER_KEY_FILE"), var("COUNTERSIGN_METER_KEY")) {
        (Some(path), _) => {
            println!("cargo:rerun-if-changed={path}");
            std::fs::read_to_string(&path).unwrap_or_else(|e| fail(&format!("cannot read {path}: {e}")))
        }
        (None, Some(hex)) => hex,
        (None, None) => fail(
            "set COUNTERSIGN_METER_KEY_FILE (from countersign-cloud keygen-meter) or COUNTERSIGN_METER_KEY",
        ),
    };
    let key_hex = key_hex.trim();
    if key_hex.len() != 64 || !key_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        fail("the meter key must be 64 hex digits (32 bytes)");
    }
    let mut key = String::new();
    for i in 0..32 {
        let byte = u8::from_str_radix(&key_hex[2 * i..2 * i + 2], 16).unwrap_or_else(|_| fail("bad hex"));
        let _ = write!(key, "{byte:#04x}, ");
    }
    let poll_ms: u32 = var("COUNTERSIGN_POLL_INTERVAL_MS")
        .map(|v| v.parse().unwrap_or_else(|_| fail("COUNTERSIGN_POLL_INTERVAL_MS is not a u32")))
        .unwrap_or(60_000);
    let host = var("COUNTERSIGN_BROKER_HOST").unwrap_or_else(|| "gateway.local".into());
    if !host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-') {
        fail("COUNTERSIGN_BROKER_HOST must be a plain host name");
    }
    let port: u16 = var("COUNTERSIGN_BROKER_PORT")
        .map(|v| v.parse().unwrap_or_else(|_| fail("COUNTERSIGN_BROKER_PORT is not a u16")))
        .unwrap_or(1883);
    let text = format!(
        "/// Meter id, provisioned at build time.\npub const METER_ID: u64 = {meter_id};\n\
         /// HMAC key, provisioned at build time.\npub const METER_KEY: [u8; 32] = [{key}];\n\
         /// Counter poll interval in milliseconds.\npub const POLL_INTERVAL_MS: u32 = {poll_ms};\n\
         /// MQTT broker the modem connects to.\npub const BROKER_HOST: &str = \"{host}\";\n\
         /// MQTT broker port.\npub const BROKER_PORT: u16 = {port};\n"
    );
    std::fs::write(out.join("provision.rs"), text)
        .unwrap_or_else(|e| fail(&format!("cannot write provision.rs: {e}")));
}
