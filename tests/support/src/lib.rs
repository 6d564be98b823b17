//! What the tests of every Countersign crate share: meter reports and signed batches made the
//! way a meter and a gateway make them, a throwaway PKI, free ports, and the project's
//! binaries as child processes.
//!
//! - [`report`]: meter reports built field by field and encoded under a meter key; times.
//! - [`batch`]: gateway keys and signed batches of encoded reports.
//! - [`pki`]: a CA with a server and a client certificate, as PEM files (rcgen, ring).
//! - [`net`]: free ports and waiting for a listener.
//! - [`procs`]: the project's binaries (and other programs) as children that die with the
//!   test; whether the test runs as root.
//! - [`endpoint`]: a `countersign-cloud serve` process on a free port.
//! - [`disk`]: a small tmpfs of a test's own, to fill up.
//!
//! This crate knows the meter's report format and the batch protocol, the endpoint's command
//! line and its `listen` setting, and nothing of the agent's or the endpoint's code: both
//! take it as a dev-dependency, so it must not depend on them.

pub mod batch;
pub mod disk;
pub mod endpoint;
pub mod net;
pub mod pki;
pub mod procs;
pub mod report;

pub use batch::{gateway_key, signed_batch, signed_batch_at, signing_key};
pub use net::{free_port, wait_for_port};
pub use report::{network_time, now_s, unix_s, ReportBuilder};
