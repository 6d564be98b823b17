//! CMSDK APB UART (UART0 of the MPS2 boards at 0x4000_4000) as an `embedded-io` 0.7 port.

use core::convert::Infallible;
use core::ptr::{read_volatile, write_volatile};

/// UART0 base address on MPS2-AN386.
pub const UART0_BASE: usize = 0x4000_4000;
const DATA: usize = 0x00;
const STATE: usize = 0x04;
const CTRL: usize = 0x08;
const BAUDDIV: usize = 0x10;
const STATE_TX_FULL: u32 = 1 << 0;
const STATE_RX_FULL: u32 = 1 << 1;
const CTRL_TX_RX_ENABLE: u32 = 0b11;
/// Smallest divider the CMSDK UART accepts; QEMU ignores the rate, hardware runs 25 MHz / 16.
const BAUDDIV_MIN: u32 = 16;

/// The UART; one instance owns the registers.
pub struct Uart {
    base: usize,
}

impl Uart {
    /// Enables TX and RX of the UART at `base`.
    ///
    /// # Safety
    /// `base` must be a CMSDK UART's register block, owned by nobody else.
    pub unsafe fn new(base: usize) -> Self {
        let u = Self { base };
        u.write_reg(BAUDDIV, BAUDDIV_MIN);
        u.write_reg(CTRL, CTRL_TX_RX_ENABLE);
        u
    }

    fn read_reg(&self, off: usize) -> u32 {
        // SAFETY: the constructor's contract: `base` is this UART's register block.
        unsafe { read_volatile((self.base + off) as *const u32) }
    }

    fn write_reg(&self, off: usize, v: u32) {
        // SAFETY: as above.
        unsafe { write_volatile((self.base + off) as *mut u32, v) }
    }

    fn rx_ready(&self) -> bool {
        self.read_reg(STATE) & STATE_RX_FULL != 0
    }
}

impl embedded_io::ErrorType for Uart {
    type Error = Infallible;
}

impl embedded_io::ReadReady for Uart {
    fn read_ready(&mut self) -> Result<bool, Infallible> {
        Ok(self.rx_ready())
    }
}

impl embedded_io::Read for Uart {
    /// Blocks until at least one byte arrived (the `embedded-io` contract); callers that need
    /// a timeout ask [`embedded_io::ReadReady`] first.
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        if buf.is_empty() {
            return Ok(0);
        }
        while !self.rx_ready() {}
        let mut n = 0;
        for slot in buf.iter_mut() {
            if !self.rx_ready() {
                break;
            }
            *slot = (self.read_reg(DATA) & 0xff) as u8;
            n += 1;
        }
        Ok(n)
    }
}

impl embedded_io::Write for Uart {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        for &b in buf {
            // The TX holding register drains at the line rate: this wait is bounded by it.
            while self.read_reg(STATE) & STATE_TX_FULL != 0 {}
            self.write_reg(DATA, u32::from(b));
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        while self.read_reg(STATE) & STATE_TX_FULL != 0 {}
        Ok(())
    }
}
