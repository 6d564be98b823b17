//! The meter: epochs, sequence numbers, counters and the decision when to report.
//!
//! Life of a meter:
//!
//! 1. [`Meter::boot`] loads the last [`Checkpoint`], starts epoch `checkpoint.epoch + 1` with
//!    the checkpointed totals as its base, and persists the new epoch **before** it is used,
//!    so no two boots can share an epoch.
//! 2. The application feeds raw modem readings to [`Meter::observe`]; the meter adds only
//!    forward movement (see [`crate::counter`]).
//! 3. [`Meter::report_due`] applies the [`ReportPolicy`]; [`Meter::write_report`] encodes the
//!    next report (seq strictly increasing) with its tag.
//! 4. [`Meter::checkpoint`] persists the lifetime totals. After a power loss the next epoch
//!    starts from the last checkpoint: what was counted after it and never reported is the
//!    bounded loss the design accepts.

use crate::counter::{Accumulator, CounterWidth};
use crate::report::{DeviceTime, Report, ReportError, Totals, METER_KEY_BYTES};

/// What survives a reboot: the epoch last started and the lifetime totals at the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// The epoch in use when the checkpoint was written.
    pub epoch: u32,
    /// Lifetime byte totals (base of that epoch plus what it counted so far).
    pub totals: Totals,
}

/// Persistent storage for the checkpoint. The flash-backed implementation lives with the
/// board support; [`MemoryStore`] keeps it in RAM for simulations and tests.
pub trait CheckpointStore {
    /// The storage's own error.
    type Error: core::fmt::Debug;
    /// The last saved checkpoint, `None` on a never-used meter.
    fn load(&mut self) -> Result<Option<Checkpoint>, Self::Error>;
    /// Persists `cp`; when this returns `Ok`, a power loss must not lose it.
    fn save(&mut self, cp: &Checkpoint) -> Result<(), Self::Error>;
}

/// A checkpoint store in RAM: survives [`Meter`] restarts in a simulation, not a power cut.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    saved: Option<Checkpoint>,
    saves: u32,
}

impl MemoryStore {
    /// Number of successful saves, to account for flash wear in simulations.
    pub fn saves(&self) -> u32 {
        self.saves
    }
}

impl CheckpointStore for MemoryStore {
    type Error = core::convert::Infallible;
    fn load(&mut self) -> Result<Option<Checkpoint>, Self::Error> {
        Ok(self.saved)
    }
    fn save(&mut self, cp: &Checkpoint) -> Result<(), Self::Error> {
        self.saved = Some(*cp);
        self.saves = self.saves.saturating_add(1);
        Ok(())
    }
}

/// When to report: when usage moved enough, or a maximum interval elapsed; never on a fast
/// fixed tick. Pure: it sees only elapsed seconds and unreported bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportPolicy {
    /// Report once this many bytes were used since the last report...
    pub delta_bytes_min: u64,
    /// ...but not more often than every this many seconds.
    pub interval_s_min: u32,
    /// Report at least this often, even without usage.
    pub interval_s_max: u32,
}

impl ReportPolicy {
    /// Default: at most hourly on usage of 128 KiB, at least every 12 h. At 140 KiB/day
    /// (a 500 MB / 10-year plan) that is about three reports a day.
    pub const DEFAULT: ReportPolicy =
        ReportPolicy { delta_bytes_min: 128 * 1024, interval_s_min: 3600, interval_s_max: 12 * 3600 };

    /// Whether a report is due `since_last_s` seconds after the last one, with
    /// `unreported_bytes` used since.
    pub fn due(&self, since_last_s: u32, unreported_bytes: u64) -> bool {
        since_last_s >= self.interval_s_max
            || (unreported_bytes >= self.delta_bytes_min && since_last_s >= self.interval_s_min)
    }
}

impl Default for ReportPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Default for [`MeterConfig::checkpoint_delta_bytes`]: 64 KiB. A power cut loses at most
/// this much (plus one reading's movement) from the device's lifetime totals, at a flash
/// cost of about two records a day on a 140 KiB/day plan.
pub const CHECKPOINT_DELTA_BYTES_DEFAULT: u64 = 64 * 1024;

/// Static configuration of one meter, provisioned with its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeterConfig {
    /// The meter's id.
    pub meter_id: u64,
    /// Width of the modem's byte counters.
    pub width: CounterWidth,
    /// When to report.
    pub policy: ReportPolicy,
    /// Checkpoint once this many bytes were counted since the last checkpoint
    /// ([`Meter::checkpoint_due`]); bounds what a power cut can take from lifetime totals.
    pub checkpoint_delta_bytes: u64,
}

impl MeterConfig {
    /// A configuration with the default report and checkpoint policies.
    pub const fn new(meter_id: u64, width: CounterWidth) -> Self {
        Self {
            meter_id,
            width,
            policy: ReportPolicy::DEFAULT,
            checkpoint_delta_bytes: CHECKPOINT_DELTA_BYTES_DEFAULT,
        }
    }
}

/// Why a meter operation failed. Small and `Copy` for `no_std` callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeterError {
    /// The checkpoint store failed; the operation may be retried.
    Storage,
    /// The epoch counter is exhausted (4 billion boots): the meter must be re-provisioned.
    EpochExhausted,
    /// The sequence is exhausted within this epoch: reboot to start a new epoch.
    SeqExhausted,
    /// Lifetime totals overflowed u64.
    Overflow,
    /// The report could not be encoded.
    Report(ReportError),
}

impl core::fmt::Display for MeterError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            MeterError::Storage => f.write_str("checkpoint storage failed"),
            MeterError::EpochExhausted => f.write_str("epoch counter exhausted"),
            MeterError::SeqExhausted => f.write_str("report sequence exhausted in this epoch"),
            MeterError::Overflow => f.write_str("lifetime totals overflow"),
            MeterError::Report(e) => e.fmt(f),
        }
    }
}

impl From<ReportError> for MeterError {
    fn from(e: ReportError) -> Self {
        MeterError::Report(e)
    }
}

/// One device's usage meter.
pub struct Meter<S: CheckpointStore> {
    config: MeterConfig,
    key: [u8; METER_KEY_BYTES],
    store: S,
    epoch: u32,
    base: Totals,
    up: Accumulator,
    down: Accumulator,
    next_seq: u32,
    reported: Totals,
    checkpointed: Totals,
    last_report_s: Option<u32>,
}

impl<S: CheckpointStore> Meter<S> {
    /// Starts a new epoch from the stored checkpoint and persists it before returning.
    pub fn boot(config: MeterConfig, key: [u8; METER_KEY_BYTES], mut store: S) -> Result<Self, MeterError> {
        let last = store.load().map_err(|_| MeterError::Storage)?;
        let (epoch, base) = match last {
            None => (0, Totals::default()),
            Some(cp) => (cp.epoch.checked_add(1).ok_or(MeterError::EpochExhausted)?, cp.totals),
        };
        store.save(&Checkpoint { epoch, totals: base }).map_err(|_| MeterError::Storage)?;
        Ok(Self {
            config,
            key,
            store,
            epoch,
            base,
            up: Accumulator::new(config.width),
            down: Accumulator::new(config.width),
            next_seq: 0,
            reported: Totals::default(),
            checkpointed: Totals::default(),
            last_report_s: None,
        })
    }

    /// The current epoch.
    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The lifetime totals this epoch started from.
    pub fn base(&self) -> Totals {
        self.base
    }

    /// Bytes counted in this epoch so far.
    pub fn used(&self) -> Totals {
        Totals { up: self.up.total(), down: self.down.total() }
    }

    /// The checkpoint store, e.g. to read wear statistics.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Consumes the meter and returns its store (a simulated reboot keeps the store).
    pub fn into_store(self) -> S {
        self.store
    }

    /// Feeds one raw reading of the modem's sent and received byte counters.
    pub fn observe(&mut self, raw_sent: u64, raw_received: u64) {
        self.up.observe(raw_sent);
        self.down.observe(raw_received);
    }

    /// Tells the meter the modem restarted (`RDY`) and its counters were reloaded from NVM
    /// at some older value: the next reading only sets the reference. Without this, the
    /// fall-back would look like a reset to zero and the whole reloaded counter would be
    /// counted again. Call it only for modems whose counters survive power loss
    /// ([`crate::modem::ModemProfile::counters_survive_power_loss`]).
    pub fn modem_restarted(&mut self) {
        self.up.rebase();
        self.down.rebase();
    }

    /// Bytes counted but not yet in a report.
    pub fn unreported_bytes(&self) -> u64 {
        let used = self.used();
        used.up.saturating_sub(self.reported.up).saturating_add(used.down.saturating_sub(self.reported.down))
    }

    /// Whether the policy wants a report at `now_s` (any monotonic seconds clock).
    /// The first report of an epoch is always due: it tells the endpoint the epoch began.
    pub fn report_due(&self, now_s: u32) -> bool {
        match self.last_report_s {
            None => true,
            Some(t) => self.config.policy.due(now_s.saturating_sub(t), self.unreported_bytes()),
        }
    }

    /// The report the meter would send now, without consuming a sequence number.
    pub fn peek_report(&self, iccid: u64, time: DeviceTime) -> Report {
        Report {
            meter_id: self.config.meter_id,
            epoch: self.epoch,
            seq: self.next_seq,
            iccid,
            time,
            base: self.base,
            used: self.used(),
            extras: heapless::Vec::new(),
        }
    }

    /// Encodes the next report into `out` and returns its length. `now_s` is the monotonic
    /// clock the policy uses; `time` is what the report says about when it was made.
    pub fn write_report(
        &mut self,
        iccid: u64,
        time: DeviceTime,
        now_s: u32,
        out: &mut [u8],
    ) -> Result<usize, MeterError> {
        let report = self.peek_report(iccid, time);
        let next = self.next_seq.checked_add(1).ok_or(MeterError::SeqExhausted)?;
        let n = report.encode(&self.key, out)?;
        self.next_seq = next;
        self.reported = report.used;
        self.last_report_s = Some(now_s);
        Ok(n)
    }

    /// Persists the current lifetime totals, bounding what a power loss can lose.
    pub fn checkpoint(&mut self) -> Result<(), MeterError> {
        let used = self.used();
        let totals = self.base.checked_add(&used).ok_or(MeterError::Overflow)?;
        self.store.save(&Checkpoint { epoch: self.epoch, totals }).map_err(|_| MeterError::Storage)?;
        self.checkpointed = used;
        Ok(())
    }

    /// Bytes counted since the last checkpoint of this epoch (what a power cut now would
    /// take from the lifetime totals).
    pub fn uncheckpointed_bytes(&self) -> u64 {
        let used = self.used();
        // Saturating: `checkpointed` is an earlier value of the monotone `used`.
        used.up
            .saturating_sub(self.checkpointed.up)
            .saturating_add(used.down.saturating_sub(self.checkpointed.down))
    }

    /// Whether [`MeterConfig::checkpoint_delta_bytes`] were counted since the last checkpoint.
    /// Also checkpoint after each delivered report and before sleep.
    pub fn checkpoint_due(&self) -> bool {
        self.uncheckpointed_bytes() >= self.config.checkpoint_delta_bytes
    }

    /// Whether an on-demand report is worth its air time now (before sleep or PDP teardown):
    /// only if something was counted since the last report.
    pub fn report_wanted_before_sleep(&self) -> bool {
        self.unreported_bytes() > 0 || self.last_report_s.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{verify, REPORT_BYTES_MAX};

    const KEY: [u8; 32] = [3u8; 32];
    const ICCID: u64 = 8_988_280_666_000_000_001;

    fn config() -> MeterConfig {
        MeterConfig::new(9, CounterWidth::Bits64)
    }

    fn report(m: &mut Meter<MemoryStore>, now: u32) -> Report {
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = m.write_report(ICCID, DeviceTime::uptime(now).unwrap(), now, &mut buf).unwrap();
        verify(&buf[..n], &KEY).unwrap()
    }

    #[test]
    fn boot_persists_epoch_before_use_and_reboots_advance_it() {
        let m = Meter::boot(config(), KEY, MemoryStore::default()).unwrap();
        assert_eq!(m.epoch(), 0);
        assert_eq!(m.store().saves(), 1);
        let m = Meter::boot(config(), KEY, m.into_store()).unwrap();
        assert_eq!(m.epoch(), 1);
        let m = Meter::boot(config(), KEY, m.into_store()).unwrap();
        assert_eq!(m.epoch(), 2);
    }

    #[test]
    fn seq_strictly_increases_and_used_is_cumulative() {
        let mut m = Meter::boot(config(), KEY, MemoryStore::default()).unwrap();
        m.observe(1000, 2000);
        let r0 = report(&mut m, 0);
        m.observe(1500, 2100);
        let r1 = report(&mut m, 10);
        assert_eq!((r0.seq, r1.seq), (0, 1));
        assert_eq!(r0.used, Totals { up: 0, down: 0 });
        assert_eq!(r1.used, Totals { up: 500, down: 100 });
    }

    #[test]
    fn base_comes_from_last_checkpoint() {
        let mut m = Meter::boot(config(), KEY, MemoryStore::default()).unwrap();
        m.observe(0, 0);
        m.observe(300, 700);
        m.checkpoint().unwrap();
        m.observe(400, 800); // counted after the checkpoint, lost in a power cut
        let mut m = Meter::boot(config(), KEY, m.into_store()).unwrap();
        assert_eq!(m.base(), Totals { up: 300, down: 700 });
        m.observe(5, 5);
        m.observe(10, 20);
        let r = report(&mut m, 0);
        assert_eq!(r.epoch, 1);
        assert_eq!(r.cumulative().unwrap(), Totals { up: 305, down: 715 });
    }

    #[test]
    fn policy_reports_on_delta_or_interval() {
        let p = ReportPolicy::DEFAULT;
        assert!(!p.due(60, 1 << 20), "too soon after the last report");
        assert!(p.due(3600, 128 * 1024));
        assert!(!p.due(3600, 128 * 1024 - 1));
        assert!(p.due(12 * 3600, 0));
    }

    #[test]
    fn modem_restart_with_nvm_counters_is_not_counted_twice() {
        let mut m = Meter::boot(config(), KEY, MemoryStore::default()).unwrap();
        m.observe(10_000, 20_000);
        m.observe(15_000, 26_000);
        // Modem rebooted and reloaded an NVM save taken at 12_000 / 22_000.
        m.modem_restarted();
        m.observe(12_000, 22_000);
        m.observe(12_500, 22_100);
        assert_eq!(m.used(), Totals { up: 5_500, down: 6_100 });
    }

    #[test]
    fn first_report_of_epoch_is_due() {
        let mut m = Meter::boot(config(), KEY, MemoryStore::default()).unwrap();
        assert!(m.report_due(0));
        report(&mut m, 0);
        assert!(!m.report_due(1));
    }
}
