//! A fleet of simulated devices running the real meter code over random traffic.
//!
//! Each device has a modem whose raw byte counters move with its traffic and sometimes reset
//! (PDP re-activation), a [`Meter`] with a checkpoint store that survives reboots, and a SIM.
//! The simulation keeps the ground truth: every byte of traffic generated. Reports can be
//! dropped or duplicated on their way to the broker; a device's last report before a reboot
//! and its final report are never dropped, because bytes after a device's last delivered
//! report are the documented bound of what the design can lose.

use std::collections::BTreeMap;

use countersign_meter::counter::CounterWidth;
use countersign_meter::report::REPORT_BYTES_MAX;
use countersign_meter::{DeviceTime, MemoryStore, Meter, MeterConfig, ReportPolicy, TimeQuality, Totals};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// First ICCID handed out (19 digits, 1NCE-like prefix, no Luhn digit).
pub const ICCID_BASE: u64 = 8_988_228_066_600_000_000;
/// Simulated seconds per step.
pub const STEP_S: u64 = 3600;

/// How hostile the path from device to broker is, per report and per step.
#[derive(Clone, Copy, Debug)]
pub struct Faults {
    /// Probability that a report is not published at all.
    pub drop: f64,
    /// Probability that a report is published twice.
    pub duplicate: f64,
    /// Probability per step that a device reboots (new epoch).
    pub reboot: f64,
    /// Probability per step that the modem's counters reset.
    pub modem_reset: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Self { drop: 0.05, duplicate: 0.05, reboot: 0.03, modem_reset: 0.02 }
    }
}

/// A report on its way to the broker.
#[derive(Clone, Debug)]
pub struct Outgoing {
    /// MQTT topic (names the meter).
    pub topic: String,
    /// The report bytes.
    pub payload: Vec<u8>,
}

/// What happened in the simulation so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct FleetStats {
    /// Reports made by meters.
    pub reports: u64,
    /// Reports deliberately not published.
    pub dropped: u64,
    /// Reports deliberately published twice.
    pub duplicated: u64,
    /// Device reboots (new epochs).
    pub reboots: u64,
    /// Of those, reboots without a checkpoint after the last report (power cuts).
    pub power_cuts: u64,
    /// Modem counter resets.
    pub modem_resets: u64,
}

struct Device {
    meter_id: u64,
    iccid: u64,
    key: [u8; 32],
    meter: Option<Meter<MemoryStore>>,
    raw: Totals,
    truth: Totals,
}

/// The fleet.
pub struct Fleet {
    devices: Vec<Device>,
    rng: StdRng,
    clock_unix_s: u64,
    faults: Faults,
    stats: FleetStats,
}

fn config(meter_id: u64) -> MeterConfig {
    // Reports more often than the field default so a short simulation exercises many.
    let policy = ReportPolicy { delta_bytes_min: 32 * 1024, interval_s_min: 3600, interval_s_max: 3 * 3600 };
    MeterConfig { policy, ..MeterConfig::new(meter_id, CounterWidth::Bits64) }
}

impl Fleet {
    /// `n` devices with meter ids from `first_meter_id`, a clock starting at `start_unix_s`.
    pub fn new(n: usize, first_meter_id: u64, seed: u64, start_unix_s: u64, faults: Faults) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let devices = (0..n as u64)
            .map(|i| {
                let meter_id = first_meter_id + i;
                let mut key = [0u8; 32];
                rng.fill(&mut key);
                let mut meter = match Meter::boot(config(meter_id), key, MemoryStore::default()) {
                    Ok(m) => m,
                    Err(e) => panic!("meter {meter_id} does not boot: {e}"),
                };
                let raw = Totals { up: rng.gen_range(0..1 << 20), down: rng.gen_range(0..1 << 20) };
                meter.observe(raw.up, raw.down);
                Device {
                    meter_id,
                    iccid: ICCID_BASE + meter_id,
                    key,
                    meter: Some(meter),
                    raw,
                    truth: Totals::default(),
                }
            })
            .collect();
        Self { devices, rng, clock_unix_s: start_unix_s, faults, stats: FleetStats::default() }
    }

    /// (meter id, key, ICCID) of every device, for registration.
    pub fn meters(&self) -> Vec<(u64, [u8; 32], u64)> {
        self.devices.iter().map(|d| (d.meter_id, d.key, d.iccid)).collect()
    }

    /// Counters of what the simulation did.
    pub fn stats(&self) -> FleetStats {
        self.stats
    }

    /// Every byte of traffic each SIM generated: the device-side truth.
    pub fn truth_per_iccid(&self) -> BTreeMap<u64, Totals> {
        self.devices.iter().map(|d| (d.iccid, d.truth)).collect()
    }

    /// Sum of [`Fleet::truth_per_iccid`].
    pub fn truth_total_bytes(&self) -> u64 {
        self.devices.iter().map(|d| d.truth.up + d.truth.down).sum()
    }

    /// Advances every device by one simulated hour; returns what they publish.
    pub fn step(&mut self) -> Vec<Outgoing> {
        self.clock_unix_s += STEP_S;
        let mut out = Vec::new();
        for i in 0..self.devices.len() {
            // Bursty IoT traffic: mostly small, now and then a firmware-update-sized day.
            let burst = self.rng.gen_bool(0.05);
            let up = self.rng.gen_range(0..if burst { 400_000 } else { 8_000 });
            let down = self.rng.gen_range(0..if burst { 2_000_000 } else { 24_000 });
            let reset = self.rng.gen_bool(self.faults.modem_reset);
            let reboot = self.rng.gen_bool(self.faults.reboot);
            let now = self.clock_unix_s;
            let d = &mut self.devices[i];
            d.truth.up += up;
            d.truth.down += down;
            if reset {
                // PDP re-activation: the counters restart from zero. The driver sees it (the
                // modem says so) and reads the zero before new traffic accrues.
                self.stats.modem_resets += 1;
                d.raw = Totals::default();
                d.meter.as_mut().expect("meter present between steps").observe(0, 0);
            }
            d.raw.up += up;
            d.raw.down += down;
            let meter = d.meter.as_mut().expect("meter present between steps");
            meter.observe(d.raw.up, d.raw.down);
            if reboot {
                // The report before a reboot always goes out: see the module docs.
                out.push(Self::make(d, now, &mut self.stats));
                self.reboot(i);
                continue;
            }
            let meter = self.devices[i].meter.as_mut().expect("meter present between steps");
            if meter.report_due(now as u32) {
                let o = Self::make(&mut self.devices[i], now, &mut self.stats);
                self.send_lossy(o, &mut out);
            }
            if self.rng.gen_bool(0.2) {
                let m = self.devices[i].meter.as_mut().expect("meter present between steps");
                if let Err(e) = m.checkpoint() {
                    panic!("checkpoint failed: {e}");
                }
            }
        }
        out
    }

    /// A final report from every device, none dropped.
    pub fn finish(&mut self) -> Vec<Outgoing> {
        self.clock_unix_s += 60;
        let now = self.clock_unix_s;
        let mut out = Vec::new();
        for d in &mut self.devices {
            out.push(Self::make(d, now, &mut self.stats));
        }
        out
    }

    fn send_lossy(&mut self, o: Outgoing, out: &mut Vec<Outgoing>) {
        if self.rng.gen_bool(self.faults.drop) {
            self.stats.dropped += 1;
            return;
        }
        if self.rng.gen_bool(self.faults.duplicate) {
            self.stats.duplicated += 1;
            out.push(o.clone());
        }
        out.push(o);
    }

    fn make(d: &mut Device, now: u64, stats: &mut FleetStats) -> Outgoing {
        let meter = d.meter.as_mut().expect("meter present between steps");
        let time = match DeviceTime::wall_clock(TimeQuality::Network, now) {
            Ok(t) => t,
            Err(e) => panic!("simulated clock out of range: {e}"),
        };
        let mut buf = [0u8; REPORT_BYTES_MAX];
        let n = match meter.write_report(d.iccid, time, now as u32, &mut buf) {
            Ok(n) => n,
            Err(e) => panic!("meter {} cannot report: {e}", d.meter_id),
        };
        stats.reports += 1;
        Outgoing {
            topic: format!("{}{}", countersign_protocol::REPORT_TOPIC_PREFIX, d.meter_id),
            payload: buf[..n].to_vec(),
        }
    }

    fn reboot(&mut self, i: usize) {
        self.stats.reboots += 1;
        let power_cut = self.rng.gen_bool(0.5);
        let d = &mut self.devices[i];
        let mut meter = d.meter.take().expect("meter present between steps");
        if power_cut {
            self.stats.power_cuts += 1;
        } else if let Err(e) = meter.checkpoint() {
            panic!("checkpoint failed: {e}");
        }
        let mut meter = match Meter::boot(config(d.meter_id), d.key, meter.into_store()) {
            Ok(m) => m,
            Err(e) => panic!("meter {} does not reboot: {e}", d.meter_id),
        };
        meter.observe(d.raw.up, d.raw.down);
        d.meter = Some(meter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use countersign_meter::verify;
    use std::collections::HashMap;

    /// The derivation rule applied locally to what the fleet publishes must give the truth:
    /// this checks the simulation itself, independent of agent and endpoint.
    #[test]
    fn highest_seq_minus_base_recovers_truth() {
        let mut f = Fleet::new(20, 1, 7, 1_790_000_000, Faults::default());
        let keys: HashMap<u64, [u8; 32]> = f.meters().into_iter().map(|(m, k, _)| (m, k)).collect();
        let mut all = Vec::new();
        for _ in 0..100 {
            all.extend(f.step());
        }
        all.extend(f.finish());
        let mut best: HashMap<(u64, u32), (u32, u64, Totals)> = HashMap::new();
        for o in &all {
            let meter_id: u64 = o.topic.rsplit('/').next().unwrap().parse().unwrap();
            let r = verify(&o.payload, &keys[&meter_id]).unwrap();
            let e = best.entry((r.meter_id, r.epoch)).or_insert((r.seq, r.iccid, r.used));
            if r.seq >= e.0 {
                *e = (r.seq, r.iccid, r.used);
            }
        }
        let mut per_iccid: BTreeMap<u64, Totals> = BTreeMap::new();
        for (_, (_, iccid, used)) in best {
            let t = per_iccid.entry(iccid).or_default();
            t.up += used.up;
            t.down += used.down;
        }
        assert_eq!(per_iccid, f.truth_per_iccid());
        assert!(f.stats().reboots > 0 && f.stats().dropped > 0 && f.stats().duplicated > 0);
    }
}
