//! The host arena: one large anonymous mapping, bound to the NUMA node
//! nearest the GPU and pinned, sub-allocated into RAII [`HostBlock`]s.
//!
//! Offloaded chunks live here. Pinned memory is what lets a copy engine move
//! a chunk while the SMs compute (a pageable copy is staged through a driver
//! buffer and serializes); binding to the GPU's node keeps the copy on the
//! local memory controller. Both can fail for reasons outside the program
//! (a memlock limit, a container without `mbind`): the arena then still
//! works, and says what it could not do in [`HostArena::pin_state`] and
//! [`HostArena::numa_binding`], never silently.
//!
//! Sub-allocation is the [`SlabAllocator`] over the mapping, so the arena
//! has the same O(1) alloc/free, 256-byte alignment, budget and statistics
//! as device memory.

use std::sync::Arc;

use memmap2::MmapMut;

use crate::error::AllocError;
use crate::fmt_bytes;
use crate::slab::{Region, SlabAllocator, SlabBlock, SlabStats};

/// Pins and unpins host memory: `mlock` on the cpu backend,
/// `cuMemHostRegister` on the cuda backend.
pub trait Pinner: Send + Sync {
    /// What pins ("mlock", "cuMemHostRegister"), for reports.
    fn name(&self) -> &'static str;
    /// Pins `len` bytes at address `addr`; `Err` says why it could not.
    fn pin(&self, addr: usize, len: usize) -> Result<(), String>;
    /// Undoes a successful [`Pinner::pin`] of the same range.
    fn unpin(&self, addr: usize, len: usize);
}

/// Leaves memory pageable.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPinner;

impl Pinner for NoPinner {
    fn name(&self) -> &'static str {
        "none"
    }
    fn pin(&self, _addr: usize, _len: usize) -> Result<(), String> {
        Err("pinning was not asked for".into())
    }
    fn unpin(&self, _addr: usize, _len: usize) {}
}

/// Locks pages in memory with `mlock2(MLOCK_ONFAULT)`: a page is locked
/// when first touched, so a large arena costs nothing until used.
#[derive(Debug, Clone, Copy, Default)]
pub struct MlockPinner;

const MLOCK_ONFAULT: libc::c_long = 1;

/// The soft `RLIMIT_MEMLOCK` in bytes (None when unlimited or unknown).
pub fn memlock_limit() -> Option<u64> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the valid, owned `r`.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut r) };
    (rc == 0 && r.rlim_cur != libc::RLIM_INFINITY).then_some(r.rlim_cur)
}

impl Pinner for MlockPinner {
    fn name(&self) -> &'static str {
        "mlock"
    }

    fn pin(&self, addr: usize, len: usize) -> Result<(), String> {
        // SAFETY: mlock2 only changes the locking of pages of the calling
        // process's own mapping [addr, addr+len), which the arena owns; it
        // reads or writes no memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mlock2,
                addr as *const libc::c_void,
                len,
                MLOCK_ONFAULT,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        let limit = match memlock_limit() {
            Some(l) => format!("RLIMIT_MEMLOCK is {}", fmt_bytes(l as usize)),
            None => "RLIMIT_MEMLOCK is unlimited".into(),
        };
        Err(format!(
            "mlock of {} failed ({e}); {limit}: raise it (`ulimit -l`, or memlock in \
             /etc/security/limits.conf) to pin the arena",
            fmt_bytes(len)
        ))
    }

    fn unpin(&self, addr: usize, len: usize) {
        // SAFETY: as in `pin`: munlock changes only page locking of our own
        // mapping.
        unsafe { libc::munlock(addr as *const libc::c_void, len) };
    }
}

/// Whether the arena is pinned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinState {
    /// Pinned by the named pinner.
    Pinned {
        /// The pinner ("mlock", "cuMemHostRegister").
        by: &'static str,
    },
    /// Pageable; why.
    Unpinned {
        /// What went wrong, or that pinning was not asked for.
        reason: String,
    },
}

/// Whether the arena's pages are bound to a NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NumaBinding {
    /// Every page comes from `node`.
    Bound {
        /// The node.
        node: usize,
    },
    /// Pages come from wherever the kernel places them; why.
    Unbound {
        /// What went wrong, or that no node was asked for.
        reason: String,
    },
}

/// How to make a host arena.
#[derive(Clone)]
pub struct ArenaConfig {
    /// Size of the mapping and budget of the arena, bytes.
    pub bytes: usize,
    /// The NUMA node to bind to (None: leave placement to the kernel).
    pub numa_node: Option<usize>,
    /// What pins the mapping.
    pub pinner: Arc<dyn Pinner>,
    /// Fill returned blocks with 0xFF, so a use after free shows (tests).
    pub poison_freed: bool,
}

impl std::fmt::Debug for ArenaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaConfig")
            .field("bytes", &self.bytes)
            .field("numa_node", &self.numa_node)
            .field("pinner", &self.pinner.name())
            .field("poison_freed", &self.poison_freed)
            .finish()
    }
}

impl ArenaConfig {
    /// An arena of `bytes`, unbound, pinned with `mlock`.
    pub fn new(bytes: usize) -> ArenaConfig {
        ArenaConfig {
            bytes,
            numa_node: None,
            pinner: Arc::new(MlockPinner),
            poison_freed: false,
        }
    }
}

impl ArenaConfig {
    /// An arena of `bytes` on the NUMA node nearest the PCI device `bus_id`
    /// (the GPU) in `topology`; the first node when the platform does not
    /// say where the device is.
    pub fn near_device(
        bytes: usize,
        topology: &crate::Topology,
        bus_id: Option<&str>,
    ) -> Result<ArenaConfig, AllocError> {
        Ok(ArenaConfig {
            numa_node: Some(topology.nearest_node(bus_id)?),
            ..ArenaConfig::new(bytes)
        })
    }
}

const MPOL_BIND: libc::c_long = 2;

/// Binds `[addr, addr+len)` to `node` with `mbind(MPOL_BIND)`. Must run
/// before the pages are touched.
fn mbind(addr: usize, len: usize, node: usize) -> Result<(), String> {
    let bits = libc::c_ulong::BITS as usize;
    let mut mask = vec![0 as libc::c_ulong; node / bits + 1];
    mask[node / bits] |= 1 << (node % bits);
    // The kernel reads maxnode - 1 bits of the mask.
    let maxnode = mask.len() * bits + 1;
    // SAFETY: mbind reads `mask.len()` words of the live `mask` and changes
    // only the memory policy of our own, untouched mapping.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr as *mut libc::c_void,
            len,
            MPOL_BIND,
            mask.as_ptr(),
            maxnode,
            0u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "mbind to NUMA node {node} failed: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// The arena's mapping, as the slab's region. Unpinned when the last block
/// and the arena are gone.
struct ArenaMapping {
    _map: MmapMut,
    base: usize,
    len: usize,
    pinner: Arc<dyn Pinner>,
    pinned: bool,
    poison: bool,
}

impl Region for ArenaMapping {
    fn base_addr(&self) -> usize {
        self.base
    }
    fn len(&self) -> usize {
        self.len
    }
    fn on_free(&self, offset: usize, len: usize) {
        if self.poison && offset + len <= self.len {
            // SAFETY: the range lies inside the mapping, alive as long as
            // `self`; the slab calls this for a block with no user left,
            // before it can be handed out again.
            unsafe { std::ptr::write_bytes((self.base + offset) as *mut u8, 0xFF, len) };
        }
    }
}

impl Drop for ArenaMapping {
    fn drop(&mut self) {
        if self.pinned {
            self.pinner.unpin(self.base, self.len);
        }
    }
}

/// The pinned, NUMA-bound host arena. Cheap to clone (a handle); blocks keep
/// the mapping alive.
#[derive(Clone)]
pub struct HostArena {
    slab: SlabAllocator,
    pin: PinState,
    numa: NumaBinding,
}

impl std::fmt::Debug for HostArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostArena")
            .field("bytes", &self.slab.capacity())
            .field("pin", &self.pin)
            .field("numa", &self.numa)
            .finish()
    }
}

impl HostArena {
    /// Maps, binds and pins an arena. Binding and pinning failures are
    /// reported in the arena, not returned: the arena works without them.
    pub fn new(cfg: ArenaConfig) -> Result<HostArena, AllocError> {
        if cfg.bytes == 0 {
            return Err(AllocError::InvalidConfig(
                "host arena: bytes must be non-zero".into(),
            ));
        }
        let mut map = MmapMut::map_anon(cfg.bytes).map_err(|e| {
            AllocError::InvalidConfig(format!(
                "host arena: mapping {} failed: {e}",
                fmt_bytes(cfg.bytes)
            ))
        })?;
        let base = map.as_mut_ptr() as usize;
        let numa = match cfg.numa_node {
            None => NumaBinding::Unbound {
                reason: "no NUMA node was asked for".into(),
            },
            Some(node) => match mbind(base, cfg.bytes, node) {
                Ok(()) => NumaBinding::Bound { node },
                Err(reason) => NumaBinding::Unbound { reason },
            },
        };
        let pin = match cfg.pinner.pin(base, cfg.bytes) {
            Ok(()) => PinState::Pinned {
                by: cfg.pinner.name(),
            },
            Err(reason) => PinState::Unpinned { reason },
        };
        let region = ArenaMapping {
            _map: map,
            base,
            len: cfg.bytes,
            pinned: matches!(pin, PinState::Pinned { .. }),
            pinner: cfg.pinner,
            poison: cfg.poison_freed,
        };
        let slab = SlabAllocator::new(region, cfg.bytes, "host")?;
        Ok(HostArena { slab, pin, numa })
    }

    /// Allocates `bytes` (rounded up to 256) for `tag`.
    pub fn alloc(&self, bytes: usize, tag: &'static str) -> Result<HostBlock, AllocError> {
        Ok(HostBlock(self.slab.alloc(bytes, tag)?))
    }

    /// Whether the arena is pinned, and why not.
    pub fn pin_state(&self) -> &PinState {
        &self.pin
    }

    /// Whether the arena is bound to a NUMA node, and why not.
    pub fn numa_binding(&self) -> &NumaBinding {
        &self.numa
    }

    /// One line for people: size, binding, pinning.
    pub fn report(&self) -> String {
        let numa = match &self.numa {
            NumaBinding::Bound { node } => format!("bound to NUMA node {node}"),
            NumaBinding::Unbound { reason } => format!("not NUMA-bound ({reason})"),
        };
        let pin = match &self.pin {
            PinState::Pinned { by } => format!("pinned ({by})"),
            PinState::Unpinned { reason } => format!("NOT pinned: {reason}"),
        };
        format!(
            "host arena of {}: {numa}; {pin}",
            fmt_bytes(self.slab.capacity())
        )
    }

    /// Statistics of the arena's blocks.
    pub fn stats(&self) -> SlabStats {
        self.slab.stats()
    }

    /// The allocator over the arena (a handle), for code that treats host
    /// and device memory alike.
    pub fn allocator(&self) -> &SlabAllocator {
        &self.slab
    }

    /// Address of the mapping's first byte.
    pub fn base_addr(&self) -> usize {
        self.slab.region().base_addr()
    }

    /// Size of the arena, bytes.
    pub fn capacity(&self) -> usize {
        self.slab.capacity()
    }
}

/// A block of the host arena. Dropping it returns it.
#[derive(Debug)]
pub struct HostBlock(SlabBlock);

impl HostBlock {
    /// Address of the block's first byte (256-byte aligned).
    pub fn addr(&self) -> usize {
        self.0.addr()
    }
    /// Bytes asked for.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether zero bytes were asked for.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// What the block is for.
    pub fn tag(&self) -> &'static str {
        self.0.tag()
    }
    /// The underlying slab block.
    pub fn into_slab_block(self) -> SlabBlock {
        self.0
    }
    /// The block's bytes.
    pub fn as_slice(&self) -> &[u8] {
        if self.0.is_empty() {
            return &[];
        }
        // SAFETY: the block is a live, exclusively owned range of the
        // mapping (the slab never hands out overlapping blocks), which stays
        // mapped while the block holds the allocator.
        unsafe { std::slice::from_raw_parts(self.0.addr() as *const u8, self.0.len()) }
    }
    /// The block's bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.0.is_empty() {
            return &mut [];
        }
        // SAFETY: as in `as_slice`; `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.0.addr() as *mut u8, self.0.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_disjoint_and_writable() {
        let arena = HostArena::new(ArenaConfig {
            pinner: Arc::new(NoPinner),
            ..ArenaConfig::new(1 << 20)
        })
        .unwrap();
        let mut a = arena.alloc(1000, "a").unwrap();
        let mut b = arena.alloc(3000, "b").unwrap();
        assert_eq!(a.addr() % 256, 0);
        assert_eq!(b.addr() % 256, 0);
        assert!(a.addr() + 1000 <= b.addr() || b.addr() + 3000 <= a.addr());
        a.as_mut_slice().fill(1);
        b.as_mut_slice().fill(2);
        assert!(a.as_slice().iter().all(|&x| x == 1));
        assert!(b.as_slice().iter().all(|&x| x == 2));
        assert_eq!(arena.stats().in_use, 1024 + 3072);
        drop(a);
        drop(b);
        assert_eq!(arena.stats().in_use, 0);
    }

    #[test]
    fn refused_pinning_is_reported_not_silent() {
        let arena = HostArena::new(ArenaConfig {
            pinner: Arc::new(NoPinner),
            ..ArenaConfig::new(1 << 16)
        })
        .unwrap();
        assert!(matches!(arena.pin_state(), PinState::Unpinned { .. }));
        assert!(arena.report().contains("NOT pinned"), "{}", arena.report());
    }

    #[test]
    fn binding_to_a_missing_node_is_reported() {
        let arena = HostArena::new(ArenaConfig {
            numa_node: Some(1000),
            pinner: Arc::new(NoPinner),
            ..ArenaConfig::new(1 << 16)
        })
        .unwrap();
        match arena.numa_binding() {
            NumaBinding::Unbound { reason } => assert!(reason.contains("node 1000"), "{reason}"),
            b => panic!("bound to a node that does not exist: {b:?}"),
        }
    }

    #[test]
    fn mlock_pins_or_names_the_limit() {
        let arena = HostArena::new(ArenaConfig::new(1 << 20)).unwrap();
        match arena.pin_state() {
            PinState::Pinned { by } => assert_eq!(*by, "mlock"),
            PinState::Unpinned { reason } => {
                assert!(reason.contains("RLIMIT_MEMLOCK"), "{reason}")
            }
        }
    }

    #[test]
    fn zero_bytes_is_a_config_error() {
        let e = HostArena::new(ArenaConfig::new(0)).unwrap_err();
        assert!(e.to_string().contains("non-zero"), "{e}");
    }
}
