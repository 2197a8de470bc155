//! The cpu backend's memory: anonymous mappings standing in for device
//! memory and the host arena.

use fpdt_alloc::Region;
use memmap2::MmapMut;

use crate::error::{Result, RuntimeError};

/// An anonymous mapping used as a slab region. Pages cost nothing until
/// touched, so a generous budget is cheap.
pub(crate) struct MappedRegion {
    _map: MmapMut,
    base: usize,
    len: usize,
    poison: bool,
}

impl MappedRegion {
    pub(crate) fn new(len: usize, poison: bool, what: &str) -> Result<Self> {
        let mut map = MmapMut::map_anon(len).map_err(|source| RuntimeError::Io {
            what: format!("mapping {} bytes of {what}", len),
            source,
        })?;
        let base = map.as_mut_ptr() as usize;
        Ok(MappedRegion {
            _map: map,
            base,
            len,
            poison,
        })
    }
}

impl Region for MappedRegion {
    fn base_addr(&self) -> usize {
        self.base
    }

    fn len(&self) -> usize {
        self.len
    }

    fn on_free(&self, offset: usize, len: usize) {
        if self.poison && offset + len <= self.len {
            // SAFETY: the range lies inside the mapping, which lives as long
            // as `self`; the slab calls this for a block whose last user is
            // gone and before the block can be handed out again, so no one
            // else touches these bytes now.
            unsafe { std::ptr::write_bytes((self.base + offset) as *mut u8, 0xFF, len) };
        }
    }
}
