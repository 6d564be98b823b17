use super::*;
use crate::counter::CounterWidth;
use crate::meter::{Meter, MeterConfig};
use crate::sim_flash::SimNor;

extern crate std;

/// Small pages so a short run rotates pages often.
const PAGE: usize = 256;
type Nor = SimNor<PAGE>;

const KEY: [u8; 32] = [7; 32];
const TICKS: u32 = 240;
/// Largest traffic between two readings in the simulated run, in bytes.
const STEP_BYTES_MAX: u64 = 6_000;
const CHECKPOINT_DELTA_BYTES: u64 = 8 * 1024;
/// A checkpoint after every this many ticks stands for "checkpoint after a delivered report".
const REPORT_EVERY_TICKS: u32 = 7;

fn cp(epoch: u32, up: u64, down: u64) -> Checkpoint {
    Checkpoint { epoch, totals: Totals { up, down } }
}

#[test]
fn record_layout_is_pinned() {
    let raw = encode(5, &cp(3, 0x0102, 0x0304));
    let golden = "43534c31050000000300000002010000000000000403000000000000ae63349a";
    let hex: std::string::String = raw.iter().map(|b| std::format!("{b:02x}")).collect();
    assert_eq!(hex, golden);
    assert_eq!(decode(&raw), Some((5, cp(3, 0x0102, 0x0304))));
    let mut torn = raw;
    torn[12] ^= 1;
    assert_eq!(decode(&torn), None);
}

#[test]
fn fresh_flash_has_no_checkpoint_and_saves_survive_reopen() {
    let nor = Nor::new(2);
    let mut log = FlashLog::open(nor.clone(), 0).unwrap();
    assert_eq!(log.load().unwrap(), None);
    for i in 0..50u64 {
        log.save(&cp(i as u32, i * 10, i * 20)).unwrap();
        let mut again = FlashLog::open(nor.clone(), 0).unwrap();
        assert_eq!(again.load().unwrap(), Some(cp(i as u32, i * 10, i * 20)));
    }
    assert_eq!(nor.reprograms(), 0, "a word was programmed twice without an erase");
    // 50 records on 8-slot pages: the pages took turns.
    let erases = nor.erases_per_page();
    assert!(erases[0] >= 3 && erases[1] >= 3, "{erases:?}");
}

#[test]
fn geometry_is_checked() {
    assert_eq!(FlashLog::open(Nor::new(1), 0).err(), Some(FlashLogError::Geometry));
    assert_eq!(FlashLog::open(Nor::new(3), 100).err(), Some(FlashLogError::Geometry));
    assert!(FlashLog::open(Nor::new(3), PAGE as u32).is_ok());
}

#[test]
fn garbage_in_a_fresh_region_is_erased_before_use() {
    let nor = Nor::new(2);
    nor.clone().write(0, &[0x12, 0x34, 0x56, 0x78]).unwrap();
    let mut log = FlashLog::open(nor.clone(), 0).unwrap();
    assert_eq!(log.load().unwrap(), None);
    log.save(&cp(0, 1, 2)).unwrap();
    assert_eq!(FlashLog::open(nor.clone(), 0).unwrap().load().unwrap(), Some(cp(0, 1, 2)));
    assert_eq!(nor.reprograms(), 0);
}

/// Deterministic traffic: xorshift, so every run with the same cut sees the same bytes.
struct Traffic(u64);
impl Traffic {
    fn next(&mut self) -> (u64, u64) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % (STEP_BYTES_MAX / 3), (self.0 >> 20) % (STEP_BYTES_MAX * 2 / 3))
    }
}

#[derive(Debug, Default)]
struct RunStats {
    recoveries: u32,
    final_epoch: u32,
    worst_loss: u64,
}

/// Runs a device for `ticks` readings over the simulated chip; `rearm` is asked before every
/// boot for the next step at which power goes (None: no more cuts). Checks after each
/// recovery: the epoch advanced past every epoch that was used, lifetime totals did not go
/// backwards from any durable checkpoint, and the loss is within the documented bound.
fn run(nor: &Nor, ticks: u32, mut rearm: impl FnMut(u64) -> Option<u64>) -> RunStats {
    let config = MeterConfig {
        checkpoint_delta_bytes: CHECKPOINT_DELTA_BYTES,
        ..MeterConfig::new(1, CounterWidth::Bits64)
    };
    let mut traffic = Traffic(0x9e37_79b9_7f4a_7c15);
    let mut raw = (0u64, 0u64);
    let mut tick = 0u32;
    let mut last_epoch: Option<u32> = None;
    let mut durable = Totals::default();
    let mut counted = Totals::default();
    let mut stats = RunStats::default();
    // Bounded: every pass either finishes the run or recovers from one cut, and the cuts
    // the callers arm are finite.
    'boot: for _ in 0..100_000 {
        nor.revive();
        nor.cut_at(rearm(nor.steps()));
        let log = FlashLog::open(nor.clone(), 0).expect("open only reads");
        let mut meter = match Meter::boot(config, KEY, log) {
            Ok(m) => m,
            Err(_) => {
                assert!(nor.is_dead(), "boot failed without a power cut");
                stats.recoveries += 1;
                continue 'boot;
            }
        };
        let base = meter.base();
        if let Some(e) = last_epoch {
            assert!(meter.epoch() > e, "epoch {} did not advance past {e}", meter.epoch());
        }
        assert!(
            base.up >= durable.up && base.down >= durable.down,
            "totals went back: {base:?} < {durable:?}"
        );
        let loss = (counted.up - base.up) + (counted.down - base.down);
        assert!(loss < CHECKPOINT_DELTA_BYTES + STEP_BYTES_MAX, "lost {loss} bytes");
        stats.worst_loss = stats.worst_loss.max(loss);
        last_epoch = Some(meter.epoch());
        durable = base;
        meter.observe(raw.0, raw.1);
        while tick < ticks {
            tick += 1;
            let (up, down) = traffic.next();
            raw = (raw.0 + up, raw.1 + down);
            meter.observe(raw.0, raw.1);
            counted = base.checked_add(&meter.used()).expect("no overflow");
            if meter.checkpoint_due() || tick % REPORT_EVERY_TICKS == 0 {
                match meter.checkpoint() {
                    Ok(()) => durable = counted,
                    Err(_) => {
                        assert!(nor.is_dead(), "checkpoint failed without a power cut");
                        stats.recoveries += 1;
                        continue 'boot;
                    }
                }
            }
        }
        stats.final_epoch = meter.epoch();
        break;
    }
    assert_eq!(tick, ticks, "run did not finish");
    assert_eq!(nor.reprograms(), 0, "a word was programmed twice without an erase");
    stats
}

/// Power is cut at every single word step (program or erase) of a reference run, one run
/// per step, and the device recovers each time.
#[test]
fn power_cut_at_every_flash_step() {
    let reference = Nor::new(2);
    let clean = run(&reference, TICKS, |_| None);
    assert_eq!(clean.recoveries, 0);
    let total_steps = reference.steps();
    assert!(reference.erases_per_page().iter().all(|&e| e >= 5), "run too short to rotate pages");
    let mut recovered = 0u32;
    let mut worst = 0;
    for cut in 0..total_steps {
        let nor = Nor::new(2);
        let mut armed = false;
        let stats = run(&nor, TICKS, |_| {
            // Only the first boot arms the cut: one power loss per run, at step `cut`.
            let first = !armed;
            armed = true;
            first.then_some(cut)
        });
        assert_eq!(stats.recoveries, 1, "cut at step {cut} was not hit");
        recovered += stats.recoveries;
        worst = worst.max(stats.worst_loss);
    }
    assert_eq!(u64::from(recovered), total_steps);
    std::println!("power cut at each of {total_steps} flash steps: all recovered, worst loss {worst} B");
}

/// One long life with a power cut every few steps, hundreds of recoveries in a row.
#[test]
fn many_cuts_in_one_long_run() {
    let nor = Nor::new(2);
    let mut rng = Traffic(12345);
    let stats = run(&nor, 20_000, |now| Some(now + 1 + rng.next().0 % 400));
    std::println!("long run: {} power cuts recovered, worst loss {} B", stats.recoveries, stats.worst_loss);
    assert!(stats.recoveries > 500, "only {} recoveries", stats.recoveries);
}

#[test]
fn crc_matches_the_ieee_check_value() {
    assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
}
