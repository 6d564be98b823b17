//! NOR flash emulated in a host file through Arm semihosting.
//!
//! QEMU's MPS2-AN386 has no persistent flash device (its "flash" is RAM loaded from the ELF
//! at each start, and the board does not take a `-drive if=pflash`), so the board keeps its
//! checkpoint log in a host file it opens with semihosting (`SYS_OPEN`, relative to QEMU's
//! working directory). RAM holds the image; every program or erase applies NOR rules to RAM
//! (erase to 0xFF, programming only clears bits) and is written through to the file before
//! it returns, so a killed QEMU (a power cut) leaves exactly what was programmed.

use cortex_m_semihosting::nr;
use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};

/// Erase sector size of the emulated part, in bytes (a common SPI NOR sector).
pub const SECTOR_BYTES: usize = 4096;
/// Sectors emulated: the two pages of the checkpoint log.
pub const SECTORS: usize = 2;
/// Emulated capacity, in bytes.
pub const FLASH_BYTES: usize = SECTOR_BYTES * SECTORS;
/// NOR program granularity, in bytes.
const WORD_BYTES: usize = 4;
/// The image file, NUL-terminated for `SYS_OPEN`.
const IMAGE_PATH: &[u8] = b"countersign-flash.bin\0";

/// The file-backed flash.
pub struct SemihostedFlash {
    fd: usize,
    image: [u8; FLASH_BYTES],
}

fn syscall(op: usize, args: &[usize]) -> usize {
    // SAFETY: semihosting calls with argument blocks that live across the call; QEMU runs
    // with `-semihosting-config enable=on`, otherwise the BKPT would fault.
    unsafe { cortex_m_semihosting::syscall(op, &args[0]) }
}

impl SemihostedFlash {
    /// Opens the image file, creating an erased one on first boot.
    pub fn open() -> Result<Self, NorFlashErrorKind> {
        let len = IMAGE_PATH.len() - 1;
        let mut fd = syscall(nr::OPEN, &[IMAGE_PATH.as_ptr() as usize, nr::open::RW_BINARY, len]);
        let mut image = [0xffu8; FLASH_BYTES];
        if fd == usize::MAX {
            fd = syscall(nr::OPEN, &[IMAGE_PATH.as_ptr() as usize, nr::open::RW_TRUNC_BINARY, len]);
            if fd == usize::MAX {
                return Err(NorFlashErrorKind::Other);
            }
            let f = Self { fd, image };
            f.persist(0, FLASH_BYTES)?;
            return Ok(f);
        }
        // SYS_READ returns the number of bytes NOT read; a short image stays erased beyond.
        let _not_read = syscall(nr::READ, &[fd, image.as_mut_ptr() as usize, FLASH_BYTES]);
        Ok(Self { fd, image })
    }

    fn persist(&self, from: usize, len: usize) -> Result<(), NorFlashErrorKind> {
        let bytes = self.image.get(from..from + len).ok_or(NorFlashErrorKind::OutOfBounds)?;
        if syscall(nr::SEEK, &[self.fd, from]) != 0 {
            return Err(NorFlashErrorKind::Other);
        }
        match syscall(nr::WRITE, &[self.fd, bytes.as_ptr() as usize, len]) {
            0 => Ok(()),
            _ => Err(NorFlashErrorKind::Other),
        }
    }
}

impl ErrorType for SemihostedFlash {
    type Error = NorFlashErrorKind;
}

impl ReadNorFlash for SemihostedFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        let start = offset as usize;
        let src = self.image.get(start..start + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn capacity(&self) -> usize {
        FLASH_BYTES
    }
}

impl NorFlash for SemihostedFlash {
    const WRITE_SIZE: usize = WORD_BYTES;
    const ERASE_SIZE: usize = SECTOR_BYTES;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        let (from, to) = (from as usize, to as usize);
        if from % SECTOR_BYTES != 0 || to % SECTOR_BYTES != 0 || to < from {
            return Err(NorFlashErrorKind::NotAligned);
        }
        self.image.get_mut(from..to).ok_or(NorFlashErrorKind::OutOfBounds)?.fill(0xff);
        self.persist(from, to - from)
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        let start = offset as usize;
        if start % WORD_BYTES != 0 || bytes.len() % WORD_BYTES != 0 {
            return Err(NorFlashErrorKind::NotAligned);
        }
        let dst = self.image.get_mut(start..start + bytes.len()).ok_or(NorFlashErrorKind::OutOfBounds)?;
        for (d, s) in dst.iter_mut().zip(bytes) {
            // NOR programming clears bits only.
            *d &= *s;
        }
        self.persist(start, bytes.len())
    }
}
