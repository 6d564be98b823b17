//! Footprint probe: the meter core alone on the board — counter, report policy, report
//! encoding with its HMAC tag, and one modem driver (Quectel over the UART) — with no flash
//! log, no MQTT publishing and no semihosting. `tests/footprint.sh` measures this image
//! against the budget (≤ 12 KiB flash, ≤ 1 KiB static RAM). It is not meant to be run.
#![no_std]
#![no_main]

#[path = "../uart.rs"]
mod uart;

use cortex_m_rt::entry;
use countersign_meter::modem::{AtModem, CounterSource, ModemProfile};
use countersign_meter::report::{DeviceTime, REPORT_BYTES_MAX};
use countersign_meter::{MemoryStore, Meter, MeterConfig};
use embedded_io::Write;

#[allow(dead_code)] // the probe uses the id and key only
mod provision {
    include!(concat!(env!("OUT_DIR"), "/provision.rs"));
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    stop()
}

/// Stops the core; the probe only exists to be measured.
fn stop() -> ! {
    cortex_m::asm::udf()
}

#[entry]
fn main() -> ! {
    let Some(cp) = cortex_m::Peripherals::take() else { stop() };
    let mut delay = cortex_m::delay::Delay::new(cp.SYST, 25_000_000);
    // SAFETY: UART0's registers, used by nothing else in this image.
    let mut modem = AtModem::new(unsafe { uart::Uart::new(uart::UART0_BASE) }, ModemProfile::QUECTEL);
    // SAFETY: UART1's registers (0x4000_5000), used by nothing else; reports go out here so
    // the encoder and tag are not optimised away.
    let mut out = unsafe { uart::Uart::new(uart::UART0_BASE + 0x1000) };
    let config = MeterConfig::new(provision::METER_ID, modem.profile().width);
    let Ok(mut meter) = Meter::boot(config, provision::METER_KEY, MemoryStore::default()) else { stop() };
    let mut now_s = 0u32;
    loop {
        if let Ok(c) = modem.read_counters(&mut delay) {
            meter.observe(c.sent, c.received);
        }
        now_s = now_s.wrapping_add(60);
        if meter.report_due(now_s) {
            let mut buf = [0u8; REPORT_BYTES_MAX];
            if let Ok(time) = DeviceTime::uptime(now_s & 0x3fff_ffff) {
                if let Ok(n) = meter.write_report(0, time, now_s, &mut buf) {
                    // Hand the bytes to the UART so the encoder is not optimised away.
                    let _ = out.write_all(buf.get(..n).unwrap_or_default());
                }
            }
        }
    }
}
