//! End-to-end harness for Countersign: real brokers, real processes, simulated devices.
//!
//! - [`fleet`]: devices running the real meter code over random traffic.
//! - [`broker`]: an embedded rumqttd for the one-command demo, a private Mosquitto for tests.
//! - [`publisher`]: device-side MQTT publishing that waits for every PUBACK.
//! - [`modem_sim`]: a Quectel-style modem on the serial port of the QEMU-emulated board.
//! - [`stack`]: an endpoint and agents as real processes, keys registered by real commands.
//! - [`faultproxy`]: an HTTP proxy that makes the endpoint refuse, fail or hang on demand.
//!
//! Free ports, child processes and the endpoint process itself come from
//! `countersign-testkit`, which the unit and integration tests of every crate share.

pub mod broker;
pub mod faultproxy;
pub mod fleet;
pub mod modem_sim;
pub mod publisher;
pub mod stack;
