//! A simulated NOR flash for tests: erased bytes read 0xFF, programming only clears bits,
//! writes and erases proceed one 4-byte word at a time, and power can be cut before any
//! word step. Clones share the same chip, so a "rebooted" device sees what survived.

extern crate std;
use std::cell::RefCell;
use std::rc::Rc;
use std::vec;
use std::vec::Vec;

use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};

/// Word size: programming and erasing advance by this much per step.
pub const WORD_BYTES: usize = 4;

#[derive(Debug)]
struct Chip {
    mem: Vec<u8>,
    /// Word steps (programmed or erased words) so far.
    steps: u64,
    /// The step at which power goes away (that step does not complete).
    cut_at: Option<u64>,
    dead: bool,
    erases_per_page: Vec<u64>,
    /// Writes to words that were not erased: the log must never do that.
    reprograms: u64,
}

/// A simulated NOR chip of `PAGE` byte erase pages.
#[derive(Clone, Debug)]
pub struct SimNor<const PAGE: usize> {
    chip: Rc<RefCell<Chip>>,
}

impl<const PAGE: usize> SimNor<PAGE> {
    /// An erased chip of `pages` pages.
    pub fn new(pages: usize) -> Self {
        let chip = Chip {
            mem: vec![0xff; PAGE * pages],
            steps: 0,
            cut_at: None,
            dead: false,
            erases_per_page: vec![0; pages],
            reprograms: 0,
        };
        Self { chip: Rc::new(RefCell::new(chip)) }
    }

    /// Cuts power when the step counter reaches `step`.
    pub fn cut_at(&self, step: Option<u64>) {
        self.chip.borrow_mut().cut_at = step;
    }

    /// Power comes back; the cut that took it is spent.
    pub fn revive(&self) {
        let mut chip = self.chip.borrow_mut();
        chip.dead = false;
        chip.cut_at = None;
    }

    /// Whether power was cut.
    pub fn is_dead(&self) -> bool {
        self.chip.borrow().dead
    }

    /// Word steps so far.
    pub fn steps(&self) -> u64 {
        self.chip.borrow().steps
    }

    /// Erase count of every page.
    pub fn erases_per_page(&self) -> Vec<u64> {
        self.chip.borrow().erases_per_page.clone()
    }

    /// Writes that targeted non-erased words.
    pub fn reprograms(&self) -> u64 {
        self.chip.borrow().reprograms
    }
}

impl Chip {
    /// Advances one step; false when power is gone before it completes.
    fn step(&mut self) -> bool {
        if self.dead {
            return false;
        }
        if self.cut_at == Some(self.steps) {
            self.dead = true;
            return false;
        }
        self.steps += 1;
        true
    }
}

impl<const PAGE: usize> ErrorType for SimNor<PAGE> {
    type Error = NorFlashErrorKind;
}

impl<const PAGE: usize> ReadNorFlash for SimNor<PAGE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let chip = self.chip.borrow();
        let start = offset as usize;
        let src = chip.mem.get(start..start + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.chip.borrow().mem.len()
    }
}

impl<const PAGE: usize> NorFlash for SimNor<PAGE> {
    const WRITE_SIZE: usize = WORD_BYTES;
    const ERASE_SIZE: usize = PAGE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let (from, to) = (from as usize, to as usize);
        let mut chip = self.chip.borrow_mut();
        if from % PAGE != 0 || to % PAGE != 0 || to < from {
            return Err(NorFlashErrorKind::NotAligned);
        }
        if to > chip.mem.len() {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        for page in from / PAGE..to / PAGE {
            chip.erases_per_page[page] += 1;
            for w in (page * PAGE..(page + 1) * PAGE).step_by(WORD_BYTES) {
                if !chip.step() {
                    return Err(NorFlashErrorKind::Other);
                }
                chip.mem[w..w + WORD_BYTES].fill(0xff);
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let start = offset as usize;
        let mut chip = self.chip.borrow_mut();
        if start % WORD_BYTES != 0 || bytes.len() % WORD_BYTES != 0 {
            return Err(NorFlashErrorKind::NotAligned);
        }
        if start + bytes.len() > chip.mem.len() {
            return Err(NorFlashErrorKind::OutOfBounds);
        }
        for (i, word) in bytes.chunks(WORD_BYTES).enumerate() {
            let at = start + i * WORD_BYTES;
            let was_dead = chip.dead;
            if !chip.step() {
                // The word being programmed when power went: half its bits made it.
                if !was_dead {
                    for (k, b) in word.iter().enumerate().take(WORD_BYTES / 2) {
                        chip.mem[at + k] &= *b;
                    }
                }
                return Err(NorFlashErrorKind::Other);
            }
            if chip.mem[at..at + WORD_BYTES].iter().any(|&b| b != 0xff) {
                chip.reprograms += 1;
            }
            for (k, b) in word.iter().enumerate() {
                // NOR programming clears bits only.
                chip.mem[at + k] &= *b;
            }
        }
        Ok(())
    }
}
