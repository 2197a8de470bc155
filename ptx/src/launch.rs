//! What a launcher hands to whoever runs a kernel: the cuda backend (a real
//! `cuLaunchKernel`) or the PTX interpreter (tests on any machine).

/// A grid or block shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Dim3 {
    /// Extent along x.
    pub x: u32,
    /// Extent along y.
    pub y: u32,
    /// Extent along z.
    pub z: u32,
}

impl Dim3 {
    /// A shape of `x` by `y` by `z`.
    pub const fn new(x: u32, y: u32, z: u32) -> Dim3 {
        Dim3 { x, y, z }
    }

    /// Number of elements (threads of a block, blocks of a grid).
    pub fn count(&self) -> u64 {
        u64::from(self.x) * u64::from(self.y) * u64::from(self.z)
    }
}

impl From<u32> for Dim3 {
    fn from(x: u32) -> Dim3 {
        Dim3::new(x, 1, 1)
    }
}

impl From<(u32, u32)> for Dim3 {
    fn from((x, y): (u32, u32)) -> Dim3 {
        Dim3::new(x, y, 1)
    }
}

impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Dim3 {
        Dim3::new(x, y, z)
    }
}

/// One kernel parameter, in the order of the `.entry`'s parameter list.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A `.u64` device address.
    Ptr(u64),
    /// A `.u64` integer.
    U64(u64),
    /// A `.u32` integer.
    U32(u32),
    /// A `.s32` integer.
    I32(i32),
    /// A `.f32` scalar.
    F32(f32),
}

impl Arg {
    /// Size of the parameter in bytes.
    pub fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) | Arg::U64(_) => 8,
            Arg::U32(_) | Arg::I32(_) | Arg::F32(_) => 4,
        }
    }

    /// Little-endian bytes of the parameter, as `cuLaunchKernel` reads them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        match *self {
            Arg::Ptr(v) | Arg::U64(v) => v.to_le_bytes().to_vec(),
            Arg::U32(v) => v.to_le_bytes().to_vec(),
            Arg::I32(v) => v.to_le_bytes().to_vec(),
            Arg::F32(v) => v.to_le_bytes().to_vec(),
        }
    }
}

/// A validated launch: which module and entry, the shapes, the dynamic
/// shared memory and the arguments. Launchers build these only after every
/// argument passed its checks, so nothing is launched on bad input.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelLaunch {
    /// The PTX module's text (embedded in the binary with `include_str!`).
    pub module: &'static str,
    /// Name of the `.entry`.
    pub entry: String,
    /// Blocks of the grid.
    pub grid: Dim3,
    /// Threads of a block.
    pub block: Dim3,
    /// Dynamic shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Parameters in `.entry` order.
    pub args: Vec<Arg>,
}
