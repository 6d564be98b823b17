//! Countersign meter firmware for MPS2-AN386 (Cortex-M4, QEMU `-machine mps2-an386`).
//!
//! A Quectel-style modem sits on UART0. Every `POLL_INTERVAL_MS` the firmware reads the
//! modem's data counters (`AT+QGDCNT?`) and network time (`AT+CCLK?`), feeds the meter, and
//! publishes a report through the modem's MQTT client (`AT+QMTPUB`, QoS 1) when the report
//! policy wants one, or on demand when the modem announces that the data context goes down
//! (`+QIURC: "pdpdeact"`). The checkpoint log lives in emulated NOR flash (a host file via
//! semihosting): a checkpoint follows every delivered report, and every
//! `checkpoint_delta_bytes` of use.
#![no_std]
#![no_main]

mod semihosted_flash;
mod uart;

use core::fmt::Write as _;

use cortex_m_rt::entry;
use countersign_meter::at::{parse_u64, trim, AtClient, AtError, Fields, RESPONSE_TIMEOUT_MS};
use countersign_meter::modem::{AtModem, CounterSource, ModemProfile};
use countersign_meter::report::{DeviceTime, TimeQuality, REPORT_BYTES_MAX};
use countersign_meter::{FlashLog, Meter, MeterConfig};
use embedded_io::{Read, ReadReady, Write};
use panic_semihosting as _;

/// Writes one line to the semihosting console (`SYS_WRITE0`), which QEMU sends to the
/// `-semihosting-config chardev`, away from the UART. Lines longer than the buffer are cut.
macro_rules! log {
    ($($arg:tt)*) => {{
        let mut line: heapless::String<LOG_LINE_BYTES_MAX> = heapless::String::new();
        let _ = write!(line, $($arg)*);
        log_line(&line);
    }};
}

/// Longest log line, in bytes.
const LOG_LINE_BYTES_MAX: usize = 160;

fn log_line(text: &str) {
    let mut buf = [0u8; LOG_LINE_BYTES_MAX + 2];
    let n = text.len().min(LOG_LINE_BYTES_MAX);
    if let (Some(dst), Some(src)) = (buf.get_mut(..n), text.as_bytes().get(..n)) {
        dst.copy_from_slice(src);
    }
    if let Some(b) = buf.get_mut(n) {
        *b = b'\n';
    }
    // SAFETY: a NUL-terminated buffer (the last byte stays 0) that outlives the call.
    unsafe { cortex_m_semihosting::syscall(cortex_m_semihosting::nr::WRITE0, &buf[0]) };
}

mod provision {
    include!(concat!(env!("OUT_DIR"), "/provision.rs"));
}

/// Core clock of the MPS2 FPGA images (and of QEMU's model), for the SysTick delay.
const SYSCLK_HZ: u32 = 25_000_000;
/// The modem's MQTT client slot used for reports.
const MQTT_CLIENT_IDX: u8 = 0;
/// Attempts to get `OK` to `AT` after power-on (one per second).
const MODEM_WAKE_ATTEMPTS_MAX: u32 = 30;
/// How long the modem may take to open the TCP connection / the MQTT session, in ms.
const MQTT_OPEN_TIMEOUT_MS: u32 = 75_000;
/// Digits of an ICCID without the Luhn check digit: what a report carries.
const ICCID_DIGITS: usize = 19;

type Modem = AtModem<uart::Uart>;

#[entry]
fn main() -> ! {
    let Some(cp) = cortex_m::Peripherals::take() else { halt("peripherals taken") };
    let mut delay = cortex_m::delay::Delay::new(cp.SYST, SYSCLK_HZ);
    // SAFETY: UART0's registers, used by nothing else in this firmware.
    let uart = unsafe { uart::Uart::new(uart::UART0_BASE) };
    let mut modem = Modem::new(uart, ModemProfile::QUECTEL);

    let flash = match semihosted_flash::SemihostedFlash::open() {
        Ok(f) => f,
        Err(_) => halt("cannot open the flash image"),
    };
    let log = match FlashLog::open(flash, 0) {
        Ok(l) => l,
        Err(_) => halt("flash geometry"),
    };
    let config = MeterConfig::new(provision::METER_ID, modem.profile().width);
    // The epoch is persisted here, before anything uses it.
    let mut meter = match Meter::boot(config, provision::METER_KEY, log) {
        Ok(m) => m,
        Err(_) => halt("meter boot: checkpoint store failed"),
    };
    log!("countersign: meter {} epoch {} base {:?}", provision::METER_ID, meter.epoch(), meter.base());

    wake_modem(&mut modem, &mut delay);
    let iccid = retry(&mut delay, |d| read_iccid(modem.at(), d));
    retry(&mut delay, |d| mqtt_connect(modem.at(), d));

    let mut topic: heapless::String<64> = heapless::String::new();
    if write!(topic, "countersign/v1/reports/{}", provision::METER_ID).is_err() {
        halt("topic too long");
    }
    let mut msg_id: u16 = 0;
    let mut boot_unix: Option<u64> = None;
    let mut pdp_down = false;
    loop {
        let counters = modem.read_counters(&mut delay);
        let ev = modem.take_events();
        if ev.restarted && modem.profile().counters_survive_power_loss {
            meter.modem_restarted();
        }
        pdp_down |= ev.pdp_deactivated;
        let now = network_time(modem.at(), &mut delay);
        match (counters, now) {
            (Ok(c), Ok(unix)) => {
                meter.observe(c.sent, c.received);
                let boot = *boot_unix.get_or_insert(unix);
                // Saturating: network time can step back; the policy then waits longer.
                let now_s = u32::try_from(unix.saturating_sub(boot)).unwrap_or(u32::MAX);
                let on_demand = pdp_down && meter.report_wanted_before_sleep();
                if meter.report_due(now_s) || on_demand {
                    let time = DeviceTime::wall_clock(TimeQuality::Network, unix).or_else(|_| {
                        DeviceTime::uptime(now_s.min(countersign_meter::report::DEVICE_TIME_SECS_MAX))
                    });
                    if let Ok(time) = time {
                        // QoS 1 message ids are 1..=65535.
                        msg_id = if msg_id == u16::MAX { 1 } else { msg_id + 1 };
                        publish(&mut meter, modem.at(), &mut delay, iccid, time, now_s, msg_id, &topic);
                        if on_demand {
                            pdp_down = false;
                        }
                    }
                } else if meter.checkpoint_due() && meter.checkpoint().is_err() {
                    log!("countersign: checkpoint failed");
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                log!("countersign: modem: {}", e);
            }
        }
        embedded_hal::delay::DelayNs::delay_ms(&mut delay, provision::POLL_INTERVAL_MS);
    }
}

/// Encodes and publishes the next report; checkpoints once the modem reports it delivered.
#[allow(clippy::too_many_arguments)]
fn publish(
    meter: &mut Meter<FlashLog<semihosted_flash::SemihostedFlash>>,
    at: &mut AtClient<uart::Uart>,
    delay: &mut cortex_m::delay::Delay,
    iccid: u64,
    time: DeviceTime,
    now_s: u32,
    msg_id: u16,
    topic: &str,
) {
    let mut buf = [0u8; REPORT_BYTES_MAX];
    let n = match meter.write_report(iccid, time, now_s, &mut buf) {
        Ok(n) => n,
        Err(e) => {
            log!("countersign: report: {}", e);
            return;
        }
    };
    match at.qmtpub(delay, MQTT_CLIENT_IDX, msg_id, topic, buf.get(..n).unwrap_or_default()) {
        Ok(_retransmitted) => {
            if meter.checkpoint().is_err() {
                log!("countersign: checkpoint failed");
            }
        }
        // The report is cumulative: the next one carries its figures, nothing is lost.
        Err(e) => {
            log!("countersign: publish: {}", e);
        }
    }
}

fn wake_modem(modem: &mut Modem, delay: &mut cortex_m::delay::Delay) {
    for _ in 0..MODEM_WAKE_ATTEMPTS_MAX {
        if modem.at().command(delay, b"AT", b"", 1_000, |_| Ok(())).is_ok() {
            return;
        }
    }
    halt("modem does not answer");
}

/// `AT+QCCID` → `+QCCID: 89882280666000010421` (20 digits with the Luhn digit, sometimes a
/// trailing `F`); the report carries the first 19.
fn read_iccid<U: Read + ReadReady + Write>(
    at: &mut AtClient<U>,
    delay: &mut cortex_m::delay::Delay,
) -> Result<u64, AtError> {
    let mut iccid = None;
    at.command(delay, b"AT+QCCID", b"+QCCID:", RESPONSE_TIMEOUT_MS, |p| {
        let digits = trim(p);
        let head = digits.get(..ICCID_DIGITS).ok_or(AtError::Malformed)?;
        iccid = Some(parse_u64(head)?);
        Ok(())
    })?;
    iccid.ok_or(AtError::Missing)
}

/// Opens the modem's MQTT connection and session: `AT+QMTOPEN` then `AT+QMTCONN`, each
/// answered `OK` and then by a result URC.
fn mqtt_connect<U: Read + ReadReady + Write>(
    at: &mut AtClient<U>,
    delay: &mut cortex_m::delay::Delay,
) -> Result<(), AtError> {
    let mut cmd: heapless::String<96> = heapless::String::new();
    write!(cmd, "AT+QMTOPEN={MQTT_CLIENT_IDX},\"{}\",{}", provision::BROKER_HOST, provision::BROKER_PORT)
        .map_err(|_| AtError::CommandTooLong)?;
    at.command(delay, cmd.as_bytes(), b"", RESPONSE_TIMEOUT_MS, |_| Ok(()))?;
    wait_result(at, delay, b"+QMTOPEN:")?;
    cmd.clear();
    write!(cmd, "AT+QMTCONN={MQTT_CLIENT_IDX},\"countersign-{}\"", provision::METER_ID)
        .map_err(|_| AtError::CommandTooLong)?;
    at.command(delay, cmd.as_bytes(), b"", RESPONSE_TIMEOUT_MS, |_| Ok(()))?;
    wait_result(at, delay, b"+QMTCONN:")
}

/// Waits for a `<prefix> <idx>,<result>…` URC and checks that the result is 0 (success).
fn wait_result<U: Read + ReadReady + Write>(
    at: &mut AtClient<U>,
    delay: &mut cortex_m::delay::Delay,
    prefix: &'static [u8],
) -> Result<(), AtError> {
    let result = at.wait_line(delay, prefix, MQTT_OPEN_TIMEOUT_MS, |p| {
        let mut f = Fields::new(p);
        let _client_idx = f.next_field();
        f.next_u64().ok_or(AtError::Malformed)
    })?;
    if result == 0 {
        Ok(())
    } else {
        Err(AtError::Error)
    }
}

/// `AT+CCLK?` → `+CCLK: "26/11/24,12:00:00+00"` (local time, zone in quarter hours) → Unix seconds.
fn network_time<U: Read + ReadReady + Write>(
    at: &mut AtClient<U>,
    delay: &mut cortex_m::delay::Delay,
) -> Result<u64, AtError> {
    let mut t = None;
    at.command(delay, b"AT+CCLK?", b"+CCLK:", RESPONSE_TIMEOUT_MS, |p| {
        t = Some(parse_cclk(p)?);
        Ok(())
    })?;
    t.ok_or(AtError::Missing)
}

fn parse_cclk(p: &[u8]) -> Result<u64, AtError> {
    let s = trim(p);
    let s = s.strip_prefix(b"\"").and_then(|s| s.strip_suffix(b"\"")).ok_or(AtError::Malformed)?;
    // yy/MM/dd,hh:mm:ss±zz
    if s.len() != 20 {
        return Err(AtError::Malformed);
    }
    let num = |a: usize| parse_u64(s.get(a..a + 2).unwrap_or_default());
    let (yy, mo, dd, hh, mi, ss, zz) = (num(0)?, num(3)?, num(6)?, num(9)?, num(12)?, num(15)?, num(18)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&dd) || hh > 23 || mi > 59 || ss > 60 {
        return Err(AtError::Malformed);
    }
    let days = days_from_civil(2000 + yy, mo, dd);
    let local = days * 86_400 + hh * 3600 + mi * 60 + ss;
    let zone_s = zz * 15 * 60;
    match s.get(17) {
        Some(b'+') => local.checked_sub(zone_s).ok_or(AtError::Malformed),
        Some(b'-') => local.checked_add(zone_s).ok_or(AtError::Malformed),
        _ => Err(AtError::Malformed),
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm), for
/// years 2000..2099 as `AT+CCLK` gives them.
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Retries `f` once a second until it succeeds (bounded: then the board halts).
fn retry<T>(
    delay: &mut cortex_m::delay::Delay,
    mut f: impl FnMut(&mut cortex_m::delay::Delay) -> Result<T, AtError>,
) -> T {
    const ATTEMPTS_MAX: u32 = 60;
    for _ in 0..ATTEMPTS_MAX {
        match f(delay) {
            Ok(v) => return v,
            Err(e) => {
                log!("countersign: modem setup: {}", e);
                embedded_hal::delay::DelayNs::delay_ms(delay, 1_000);
            }
        }
    }
    halt("modem setup failed")
}

fn halt(why: &str) -> ! {
    log!("countersign: halted: {}", why);
    cortex_m_semihosting::debug::exit(cortex_m_semihosting::debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::wfi();
    }
}
