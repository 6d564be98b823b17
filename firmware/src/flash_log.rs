//! A power-fail-safe checkpoint log on NOR flash, through `embedded-storage`'s
//! [`NorFlash`] trait. Synchronous and small: two erase pages used alternately, fixed-size
//! records appended one after another, each with its own CRC.
//!
//! # Layout
//!
//! ```text
//! region = page A (ERASE_SIZE bytes) ‖ page B (ERASE_SIZE bytes)
//! page   = slot*   (ERASE_SIZE / RECORD_BYTES slots, erased = all 0xFF)
//! record = magic:u32 seq:u32 epoch:u32 up:u64 down:u64 crc32:u32   (32 bytes, little-endian)
//! ```
//!
//! # Why it survives a power cut at any instant
//!
//! - A record is programmed into an erased slot in one `write`, CRC last. A cut mid-write
//!   leaves a slot whose CRC does not match (or is still erased): it is skipped on recovery
//!   and never written again (appends go after the highest non-blank slot).
//! - The newest record is the valid one with the highest `seq`, in either page.
//! - When the active page is full, the *other* page is erased and the next record goes to its
//!   slot 0. The page holding the newest record is never erased, so a cut during the erase or
//!   the first write leaves the newest durable record where it was.
//! - `save` returns `Ok` only after `write` returned: from then on, [`FlashLog::load`] finds it.
//!
//! # Wear
//!
//! Each page is erased once every `2 × slots` records. With 4 KiB pages (128 slots) and the
//! default policies (a checkpoint per delivered report and per [`crate::meter::CHECKPOINT_DELTA_BYTES_DEFAULT`]
//! of use), a device using 140 KiB a day writes about 6 records a day: one erase per page
//! every ~40 days. See `tests::flash_life_at_default_policy` and INTEGRATION.md.

use embedded_storage::nor_flash::{NorFlash, NorFlashError, NorFlashErrorKind};

use crate::meter::{Checkpoint, CheckpointStore};
use crate::report::Totals;

/// Size of one record on flash, in bytes: a multiple of every common NOR write size (1–32).
pub const RECORD_BYTES: usize = 32;
/// Marks a slot written by this log (ASCII "CSL1", version 1 of the layout).
const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"CSL1");
/// Pages the log alternates between.
const PAGES: u32 = 2;

/// Why the log failed. Small and `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashLogError {
    /// The flash driver failed (or power is going away).
    Flash(NorFlashErrorKind),
    /// The region is not two aligned erase pages, or records do not fit the write size.
    Geometry,
    /// The record sequence (u32) is exhausted: 4 billion checkpoints.
    SeqExhausted,
}

impl core::fmt::Display for FlashLogError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FlashLogError::Flash(k) => write!(f, "flash error: {k:?}"),
            FlashLogError::Geometry => f.write_str("flash region does not fit the checkpoint log"),
            FlashLogError::SeqExhausted => f.write_str("checkpoint log sequence exhausted"),
        }
    }
}

fn flash_err<E: NorFlashError>(e: E) -> FlashLogError {
    FlashLogError::Flash(e.kind())
}

/// Where the log stands: its newest record and where the next one goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Head {
    newest: Option<(u32, Checkpoint)>,
    /// Page and slot for the next record; `slot == slots` means the page is full.
    page: u32,
    slot: u32,
}

/// The checkpoint log on two pages of `F` starting at `base`.
pub struct FlashLog<F> {
    flash: F,
    base: u32,
    head: Head,
}

impl<F: NorFlash> FlashLog<F> {
    /// Opens the log: checks the geometry and scans both pages for the newest record.
    /// Call it at every boot; it never writes.
    pub fn open(flash: F, base: u32) -> Result<Self, FlashLogError> {
        let page_bytes = u32::try_from(F::ERASE_SIZE).map_err(|_| FlashLogError::Geometry)?;
        let fits = F::ERASE_SIZE >= RECORD_BYTES
            && F::ERASE_SIZE % RECORD_BYTES == 0
            && RECORD_BYTES % F::WRITE_SIZE == 0
            && RECORD_BYTES % F::READ_SIZE == 0
            && base % page_bytes == 0
            && page_bytes
                .checked_mul(PAGES)
                .and_then(|n| n.checked_add(base))
                .is_some_and(|end| end as usize <= flash.capacity());
        if !fits {
            return Err(FlashLogError::Geometry);
        }
        let mut log = Self { flash, base, head: Head { newest: None, page: 0, slot: 0 } };
        log.head = log.scan()?;
        Ok(log)
    }

    /// The flash back, e.g. to simulate a reboot on the same chip.
    pub fn release(self) -> F {
        self.flash
    }

    fn slots() -> u32 {
        // Fits: checked in `open` that ERASE_SIZE fits u32.
        (F::ERASE_SIZE / RECORD_BYTES) as u32
    }

    fn slot_offset(&self, page: u32, slot: u32) -> u32 {
        // No overflow: `open` checked base + 2 pages fits u32 and the capacity.
        self.base + page * F::ERASE_SIZE as u32 + slot * RECORD_BYTES as u32
    }

    fn scan(&mut self) -> Result<Head, FlashLogError> {
        let mut newest: Option<(u32, u32, Checkpoint)> = None; // (seq, page, cp)
        let mut last_used = [None::<u32>; PAGES as usize];
        for page in 0..PAGES {
            for slot in 0..Self::slots() {
                let mut raw = [0u8; RECORD_BYTES];
                self.flash.read(self.slot_offset(page, slot), &mut raw).map_err(flash_err)?;
                if raw.iter().all(|&b| b == 0xff) {
                    continue;
                }
                if let Some(v) = last_used.get_mut(page as usize) {
                    *v = Some(slot);
                }
                if let Some((seq, cp)) = decode(&raw) {
                    if newest.is_none_or(|(s, _, _)| seq > s) {
                        newest = Some((seq, page, cp));
                    }
                }
            }
        }
        let page = newest.map_or(0, |(_, p, _)| p);
        let slot = match last_used.get(page as usize).copied().flatten() {
            Some(s) => s + 1,
            // A fresh page 0 that holds garbage but no record is erased before first use.
            None => 0,
        };
        let slot = if newest.is_none() && last_used[0].is_some() { Self::slots() } else { slot };
        Ok(Head { newest: newest.map(|(s, _, cp)| (s, cp)), page, slot })
    }

    fn append(&mut self, cp: &Checkpoint) -> Result<(), FlashLogError> {
        let seq = match self.head.newest {
            None => 0,
            Some((s, _)) => s.checked_add(1).ok_or(FlashLogError::SeqExhausted)?,
        };
        let (mut page, mut slot) = (self.head.page, self.head.slot);
        if slot >= Self::slots() {
            // Full (or unusable): move to the other page, which never holds the newest record.
            page = if self.head.newest.is_none() { 0 } else { (page + 1) % PAGES };
            let from = self.slot_offset(page, 0);
            let to = from + F::ERASE_SIZE as u32;
            self.flash.erase(from, to).map_err(flash_err)?;
            slot = 0;
        }
        let raw = encode(seq, cp);
        // Whatever happens next, this slot is no longer blank: never reuse it.
        self.head.page = page;
        self.head.slot = slot + 1;
        self.flash.write(self.slot_offset(page, slot), &raw).map_err(flash_err)?;
        self.head.newest = Some((seq, *cp));
        Ok(())
    }
}

impl<F: NorFlash> CheckpointStore for FlashLog<F> {
    type Error = FlashLogError;

    fn load(&mut self) -> Result<Option<Checkpoint>, FlashLogError> {
        Ok(self.head.newest.map(|(_, cp)| cp))
    }

    fn save(&mut self, cp: &Checkpoint) -> Result<(), FlashLogError> {
        self.append(cp)
    }
}

fn encode(seq: u32, cp: &Checkpoint) -> [u8; RECORD_BYTES] {
    let mut r = [0u8; RECORD_BYTES];
    r[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    r[4..8].copy_from_slice(&seq.to_le_bytes());
    r[8..12].copy_from_slice(&cp.epoch.to_le_bytes());
    r[12..20].copy_from_slice(&cp.totals.up.to_le_bytes());
    r[20..28].copy_from_slice(&cp.totals.down.to_le_bytes());
    let crc = crc32(&r[..28]);
    r[28..32].copy_from_slice(&crc.to_le_bytes());
    r
}

fn decode(r: &[u8; RECORD_BYTES]) -> Option<(u32, Checkpoint)> {
    let u32_at = |i: usize| -> Option<u32> { Some(u32::from_le_bytes(r.get(i..i + 4)?.try_into().ok()?)) };
    let u64_at = |i: usize| -> Option<u64> { Some(u64::from_le_bytes(r.get(i..i + 8)?.try_into().ok()?)) };
    if u32_at(0)? != RECORD_MAGIC || u32_at(28)? != crc32(r.get(..28)?) {
        return None;
    }
    Some((
        u32_at(4)?,
        Checkpoint { epoch: u32_at(8)?, totals: Totals { up: u64_at(12)?, down: u64_at(20)? } },
    ))
}

/// CRC-32 (IEEE 802.3, reflected), bitwise: 28 bytes per checkpoint do not justify a table.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

#[cfg(test)]
mod tests;
