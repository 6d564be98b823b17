//! What metering costs on the air, MQTT and TCP/IP framing included.
//!
//! The meter must not eat the plan it meters: on a 500 MB / 10-year plan (≈140 KiB a day)
//! metering traffic must stay under 1 %, ≈1.4 KiB a day. Sizes are the carrier-billed
//! overheads of REFERENCE.md; a report's cost is counted as if the device had to open its own
//! TCP connection and MQTT session for it (the worst case: a device that piggybacks on an
//! application session pays only [`report_air_bytes`] without [`SESSION_SETUP_BYTES`]).

/// A 500 MB / 10-year plan per day, in bytes: 500 × 2^20 / 3652.5 days.
pub const PLAN_BYTES_PER_DAY: u64 = 500 * 1024 * 1024 * 10_000 / 36_525_000;
/// The share of the plan metering may use, in per mille (1 %).
pub const METERING_SHARE_PER_MILLE: u64 = 10;
/// Metering bytes allowed per day.
pub const METERING_BYTES_PER_DAY_MAX: u64 = PLAN_BYTES_PER_DAY * METERING_SHARE_PER_MILLE / 1000;

/// MQTT PUBLISH fixed header, topic length field and packet id, without the topic.
pub const PUBLISH_HEADER_BYTES: u64 = 15;
/// MQTT PUBACK.
pub const PUBACK_BYTES: u64 = 4;
/// One TCP exchange (segment plus its ACK, IP and TCP headers).
pub const TCP_EXCHANGE_BYTES: u64 = 64;
/// TCP open (SYN, SYN-ACK, ACK) and MQTT CONNECT/CONNACK, plus the close exchange.
pub const SESSION_SETUP_BYTES: u64 = 96 + 86 + 4 + TCP_EXCHANGE_BYTES;

/// Billed bytes of one report published at QoS 1 on an open session: the PUBLISH with its
/// topic and payload, the PUBACK, and a TCP exchange for each.
pub const fn report_air_bytes(report_bytes: u64, topic_bytes: u64) -> u64 {
    report_bytes + PUBLISH_HEADER_BYTES + topic_bytes + PUBACK_BYTES + 2 * TCP_EXCHANGE_BYTES
}

/// Billed bytes of one report when the device opens a session just for it.
pub const fn report_air_bytes_own_session(report_bytes: u64, topic_bytes: u64) -> u64 {
    report_air_bytes(report_bytes, topic_bytes) + SESSION_SETUP_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counter::CounterWidth;
    use crate::meter::{Meter, MeterConfig};
    use crate::report::{DeviceTime, REPORT_BYTES_MAX};
    use crate::sim_flash::SimNor;
    use crate::FlashLog;

    extern crate std;

    /// A common NOR sector: 4 KiB.
    const SECTOR_BYTES: usize = 4096;
    /// Endurance of common NOR flash (W25Q, MX25 data sheets): 100k erase cycles per sector.
    const ERASE_CYCLES_MAX: u64 = 100_000;
    const TICK_S: u32 = 15 * 60;
    const TICKS_PER_DAY: u32 = 86_400 / TICK_S;

    /// A realistic device: telemetry every 15 minutes (≈1.2 KiB with TCP/TLS records), a
    /// config poll twice a day (≈10 KiB), a reboot once a week; plus its own metering
    /// traffic, which the modem counts too. Returns (reports, metering bytes, sector erases
    /// of the busier page, days, app bytes).
    fn simulate(days: u32, app_scale: u64) -> (u64, u64, u64, u64) {
        let nor: SimNor<SECTOR_BYTES> = SimNor::new(2);
        let key = [1u8; 32];
        let topic_bytes = "countersign/v1/reports/4242".len() as u64;
        let config = MeterConfig::new(4242, CounterWidth::Bits64);
        let mut meter = Meter::boot(config, key, FlashLog::open(nor.clone(), 0).unwrap()).unwrap();
        let (mut sent, mut recv) = (0u64, 0u64);
        let (mut reports, mut metering, mut app) = (0u64, 0u64, 0u64);
        let mut boot_s = 0u32;
        meter.observe(sent, recv);
        for tick in 0..days * TICKS_PER_DAY {
            let now = tick * TICK_S;
            if tick > 0 && tick % (7 * TICKS_PER_DAY) == 0 {
                // Orderly reboot: a report and a checkpoint before going down.
                meter = Meter::boot(config, key, meter.into_store()).unwrap();
                boot_s = now;
                meter.observe(sent, recv);
            }
            let (up, down) = if tick % (TICKS_PER_DAY / 2) == 7 { (1_024, 9_216) } else { (700, 500) };
            let (up, down) = (up * app_scale, down * app_scale);
            app += up + down;
            sent += up;
            recv += down;
            meter.observe(sent, recv);
            if meter.report_due(now - boot_s) {
                let mut buf = [0u8; REPORT_BYTES_MAX];
                let n = meter
                    .write_report(1, DeviceTime::uptime(now - boot_s).unwrap(), now - boot_s, &mut buf)
                    .unwrap() as u64;
                let cost = report_air_bytes_own_session(n, topic_bytes);
                reports += 1;
                metering += cost;
                // The modem counts the metering traffic as well (uplink-heavy).
                sent += cost - PUBACK_BYTES - TCP_EXCHANGE_BYTES;
                recv += PUBACK_BYTES + TCP_EXCHANGE_BYTES;
                meter.checkpoint().unwrap();
            } else if meter.checkpoint_due() {
                meter.checkpoint().unwrap();
            }
        }
        let erases = nor.erases_per_page().into_iter().max().unwrap_or(0);
        (reports, metering, erases, app)
    }

    #[test]
    fn default_policy_stays_under_one_percent_of_the_plan() {
        let days = 60;
        let (reports, metering, _, app) = simulate(days, 1);
        let per_day = metering / u64::from(days);
        let app_per_day = app / u64::from(days);
        std::println!(
            "default policy, {app_per_day} B/day of application traffic: {:.2} reports/day, {per_day} metering B/day \
             (budget {METERING_BYTES_PER_DAY_MAX} B/day = 1% of {PLAN_BYTES_PER_DAY} B/day)",
            reports as f64 / f64::from(days)
        );
        // The profile really is a 140 KiB/day device, else the test proves nothing.
        assert!((120 * 1024..=160 * 1024).contains(&app_per_day), "{app_per_day}");
        assert!(per_day <= METERING_BYTES_PER_DAY_MAX, "{per_day} B/day over budget");
        // And the policy does report: at least twice a day (max interval 12 h).
        assert!(reports >= 2 * u64::from(days));
    }

    #[test]
    fn flash_life_at_default_policy() {
        // A year at the plan's rate and at 20× the plan's rate.
        for (scale, label) in [(1u64, "140 KiB/day"), (20, "2.8 MiB/day")] {
            let days = 365;
            let (_, _, erases, _) = simulate(days, scale);
            let erases_per_day = erases as f64 / f64::from(days);
            let life_years =
                if erases == 0 { f64::INFINITY } else { ERASE_CYCLES_MAX as f64 / erases_per_day / 365.0 };
            std::println!("{label}: {erases} erases of the busier 4 KiB sector in {days} days ({erases_per_day:.3}/day), flash life {life_years:.0} years at {ERASE_CYCLES_MAX} cycles");
            assert!(life_years >= 20.0, "{label}: flash life {life_years} years");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(PLAN_BYTES_PER_DAY, 143_542);
        assert_eq!(METERING_BYTES_PER_DAY_MAX, 1_435);
        assert_eq!(report_air_bytes(48, 27), 48 + 15 + 27 + 4 + 128);
    }
}
