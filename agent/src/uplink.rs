//! Metering the gateway's own cellular uplink as a local meter.
//!
//! The gateway's SIM is metered like any device: a [`Meter`] from the firmware crate, with
//! its own meter id and key, reads the kernel's interface counters
//! (`/sys/class/net/<if>/statistics/{tx,rx}_bytes`), and its reports enter the same durable
//! buffer as the devices' (written and flushed, then uploaded in signed batches). The
//! endpoint verifies them with the meter's key like any other, so the gateway's usage is
//! reconciled like any device's.
//!
//! Each interface has its own [`Accumulator`]: a counter that falls back (the interface was
//! restarted, the modem re-attached) starts a new segment, and an interface that disappears
//! is skipped until it comes back. Their sum is a monotone counter the meter observes. The
//! meter's epoch and lifetime totals live in a small state file (written atomically); each
//! agent start is a new epoch, persisted before first use.

use std::path::{Path, PathBuf};

use countersign_meter::counter::{Accumulator, CounterWidth};
use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_meter::{
    Checkpoint, CheckpointStore, DeviceTime, Meter, MeterConfig, ReportPolicy, TimeQuality, Totals,
};
use serde::{Deserialize, Serialize};

/// Most interfaces one uplink meter sums.
pub const INTERFACES_MAX: usize = 8;
/// Largest counter file read (a decimal u64 and a newline).
const COUNTER_FILE_BYTES_MAX: u64 = 64;

/// Kernel counters of a 32-bit kernel are `unsigned long`: they wrap at 2^32.
const KERNEL_COUNTER_WIDTH: CounterWidth =
    if cfg!(target_pointer_width = "32") { CounterWidth::Bits32 } else { CounterWidth::Bits64 };

/// Why the uplink meter failed.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// The state file could not be read or written; the meter cannot keep its epoch.
    /// Recoverable once the file system is writable again.
    #[error("uplink meter state {path}: {source}")]
    State {
        /// The state file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The state file is not what this agent writes. Not recoverable without removing it.
    #[error("uplink meter state {0} is corrupt")]
    StateCorrupt(PathBuf),
    /// The meter refused (epoch or sequence exhausted, report encoding). Not recoverable.
    #[error("uplink meter: {0}")]
    Meter(countersign_meter::MeterError),
}

/// The meter's persistent state: epoch and lifetime totals, as JSON.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    epoch: u32,
    up: u64,
    down: u64,
}

impl FileStore {
    /// A store in `path` (created on first save).
    pub fn new(path: PathBuf) -> Self {
        Self { path }
    }

    fn io(&self) -> impl Fn(std::io::Error) -> UplinkError + '_ {
        |source| UplinkError::State { path: self.path.clone(), source }
    }
}

impl CheckpointStore for FileStore {
    type Error = UplinkError;

    fn load(&mut self) -> Result<Option<Checkpoint>, UplinkError> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.io()(e)),
        };
        let s: StateJson =
            serde_json::from_str(&text).map_err(|_| UplinkError::StateCorrupt(self.path.clone()))?;
        Ok(Some(Checkpoint { epoch: s.epoch, totals: Totals { up: s.up, down: s.down } }))
    }

    fn save(&mut self, cp: &Checkpoint) -> Result<(), UplinkError> {
        let json = serde_json::to_vec(&StateJson { epoch: cp.epoch, up: cp.totals.up, down: cp.totals.down })
            .map_err(|_| UplinkError::StateCorrupt(self.path.clone()))?;
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // Only the agent may rewrite the meter's epoch and totals (checked at start).
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(self.io())?;
            f.write_all(&json).map_err(self.io())?;
            f.sync_all().map_err(self.io())?;
        }
        std::fs::rename(&tmp, &self.path).map_err(self.io())?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(self.io())?;
        }
        Ok(())
    }
}

/// Reads one interface's counters; `None` when the interface is absent or unreadable.
pub fn read_interface(sysfs_net: &Path, iface: &str) -> Option<(u64, u64)> {
    let read = |name: &str| -> Option<u64> {
        use std::io::Read;
        let p = sysfs_net.join(iface).join("statistics").join(name);
        // sysfs reports every file as 4096 bytes long: bound the read, not the metadata.
        let mut text = String::new();
        std::fs::File::open(p).ok()?.take(COUNTER_FILE_BYTES_MAX).read_to_string(&mut text).ok()?;
        text.trim().parse().ok()
    };
    Some((read("tx_bytes")?, read("rx_bytes")?))
}

/// Sums the forward movement of several interfaces' counters. Pure apart from its input.
#[derive(Debug)]
pub struct InterfaceSum {
    ifaces: Vec<(String, Accumulator, Accumulator)>,
}

impl InterfaceSum {
    /// Tracks `ifaces` (at most [`INTERFACES_MAX`]).
    pub fn new(ifaces: &[String]) -> Self {
        Self {
            ifaces: ifaces
                .iter()
                .take(INTERFACES_MAX)
                .map(|i| {
                    (
                        i.clone(),
                        Accumulator::new(KERNEL_COUNTER_WIDTH),
                        Accumulator::new(KERNEL_COUNTER_WIDTH),
                    )
                })
                .collect(),
        }
    }

    /// Feeds a reading per interface (`None`: absent now) and returns the summed totals.
    pub fn observe(&mut self, mut reading: impl FnMut(&str) -> Option<(u64, u64)>) -> Totals {
        let mut sum = Totals::default();
        for (name, up, down) in &mut self.ifaces {
            match reading(name) {
                Some((tx, rx)) => {
                    up.observe(tx);
                    down.observe(rx);
                }
                // Gone: when it comes back its counters restart, so its next reading is a
                // reference, not usage.
                None => {
                    up.rebase();
                    down.rebase();
                }
            }
            sum.up = sum.up.saturating_add(up.total());
            sum.down = sum.down.saturating_add(down.total());
        }
        sum
    }
}

/// The gateway's uplink meter.
pub struct UplinkMeter {
    meter: Meter<FileStore>,
    sum: InterfaceSum,
    iccid: u64,
    sysfs_net: PathBuf,
    started: std::time::Instant,
}

impl UplinkMeter {
    /// Boots the meter (a new epoch, persisted before use) and takes the first reading.
    pub fn boot(
        meter_id: u64,
        key: [u8; 32],
        iccid: u64,
        ifaces: &[String],
        sysfs_net: PathBuf,
        state_file: PathBuf,
        policy: ReportPolicy,
    ) -> Result<Self, UplinkError> {
        let mut config = MeterConfig::new(meter_id, CounterWidth::Bits64);
        config.policy = policy;
        let meter = Meter::boot(config, key, FileStore::new(state_file)).map_err(UplinkError::Meter)?;
        let mut m = Self {
            meter,
            sum: InterfaceSum::new(ifaces),
            iccid,
            sysfs_net,
            started: std::time::Instant::now(),
        };
        m.read();
        Ok(m)
    }

    /// The meter's epoch.
    pub fn epoch(&self) -> u32 {
        self.meter.epoch()
    }

    fn read(&mut self) {
        let net = self.sysfs_net.clone();
        let t = self.sum.observe(|i| read_interface(&net, i));
        // The sum only moves forward, so the meter sees a counter that never resets.
        self.meter.observe(t.up, t.down);
    }

    /// Reads the counters; returns a report to buffer when the policy wants one (`force`
    /// makes one regardless, e.g. at shutdown).
    pub fn tick(&mut self, now_unix_s: u64, force: bool) -> Result<Option<Vec<u8>>, UplinkError> {
        self.read();
        let now = u32::try_from(self.started.elapsed().as_secs()).unwrap_or(u32::MAX);
        if !force && !self.meter.report_due(now) {
            return Ok(None);
        }
        let time = DeviceTime::wall_clock(TimeQuality::Rtc, now_unix_s)
            .or_else(|_| DeviceTime::uptime(now))
            .map_err(|e| UplinkError::Meter(countersign_meter::MeterError::Report(e)))?;
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = self.meter.write_report(self.iccid, time, now, &mut buf).map_err(UplinkError::Meter)?;
        Ok(Some(buf[..n].to_vec()))
    }

    /// Persists the lifetime totals; call after the report that covers them is durable.
    pub fn checkpoint(&mut self) -> Result<(), UplinkError> {
        self.meter.checkpoint().map_err(UplinkError::Meter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::verify;

    fn set(dir: &Path, iface: &str, tx: u64, rx: u64) {
        let s = dir.join(iface).join("statistics");
        std::fs::create_dir_all(&s).unwrap();
        std::fs::write(s.join("tx_bytes"), format!("{tx}\n")).unwrap();
        std::fs::write(s.join("rx_bytes"), format!("{rx}\n")).unwrap();
    }

    #[test]
    fn sums_interfaces_across_resets_and_absence() {
        let dir = tempfile::tempdir().unwrap();
        let mut sum = InterfaceSum::new(&["wwan0".into(), "ppp0".into()]);
        set(dir.path(), "wwan0", 1000, 5000);
        assert_eq!(
            sum.observe(|i| read_interface(dir.path(), i)),
            Totals::default(),
            "first reading is a reference"
        );
        set(dir.path(), "wwan0", 1500, 5600);
        set(dir.path(), "ppp0", 10, 20); // appears: reference only
        assert_eq!(sum.observe(|i| read_interface(dir.path(), i)), Totals { up: 500, down: 600 });
        set(dir.path(), "ppp0", 110, 220);
        set(dir.path(), "wwan0", 30, 40); // interface restarted: counters from zero
        assert_eq!(
            sum.observe(|i| read_interface(dir.path(), i)),
            Totals { up: 500 + 100 + 30, down: 600 + 200 + 40 }
        );
        std::fs::remove_dir_all(dir.path().join("ppp0")).unwrap(); // gone
        assert_eq!(sum.observe(|i| read_interface(dir.path(), i)), Totals { up: 630, down: 840 });
        set(dir.path(), "ppp0", 7, 9); // back, with fresh counters: a reference again
        set(dir.path(), "ppp0", 7, 9);
        assert_eq!(sum.observe(|i| read_interface(dir.path(), i)), Totals { up: 630, down: 840 });
    }

    #[test]
    fn reports_verify_and_epochs_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let key = [4u8; 32];
        let state = dir.path().join("uplink.state");
        let boot = || {
            UplinkMeter::boot(
                9,
                key,
                8_988_228_066_600_009_999,
                &["wwan0".into()],
                dir.path().into(),
                state.clone(),
                ReportPolicy::DEFAULT,
            )
        };
        set(dir.path(), "wwan0", 0, 0);
        let mut m = boot().unwrap();
        assert_eq!(m.epoch(), 0);
        set(dir.path(), "wwan0", 700, 900);
        let r = m.tick(1_795_000_000, true).unwrap().unwrap();
        let r = verify(&r, &key).unwrap();
        assert_eq!((r.meter_id, r.epoch, r.used), (9, 0, Totals { up: 700, down: 900 }));
        m.checkpoint().unwrap();
        drop(m);
        let m = boot().unwrap();
        assert_eq!(m.epoch(), 1, "a restart is a new epoch, persisted");
        assert_eq!(m.meter.base(), Totals { up: 700, down: 900 });
    }

    #[test]
    fn real_loopback_counters_are_readable() {
        // Every Linux machine has `lo`; its counters are the kernel's own.
        assert!(read_interface(Path::new("/sys/class/net"), "lo").is_some());
    }
}
