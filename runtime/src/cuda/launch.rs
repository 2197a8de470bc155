//! What a PTX kernel launch carries, and the checks made before one: the
//! arguments against the `.entry`'s parameter list, every pointer against
//! the views the launch declares, the shapes against the device's limits.
//! All of it is plain Rust over the PTX text, so it is tested without a GPU.

use crate::error::{Result, RuntimeError};

/// One kernel argument, in the order of the `.entry`'s parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device (or mapped host) address: must lie inside a declared view.
    Ptr(u64),
    /// A 64-bit integer.
    U64(u64),
    /// A 32-bit unsigned integer.
    U32(u32),
    /// A 32-bit signed integer.
    I32(i32),
    /// A 32-bit float.
    F32(f32),
}

impl KernelArg {
    /// Size in bytes, as the kernel's parameter space holds it.
    pub fn size(&self) -> usize {
        match self {
            KernelArg::Ptr(_) | KernelArg::U64(_) => 8,
            KernelArg::U32(_) | KernelArg::I32(_) | KernelArg::F32(_) => 4,
        }
    }

    /// The little-endian bytes `cuLaunchKernel` reads through the pointer
    /// it is given for this parameter.
    pub fn to_le_bytes(&self) -> [u8; 8] {
        let mut b = [0u8; 8];
        match *self {
            KernelArg::Ptr(v) | KernelArg::U64(v) => b.copy_from_slice(&v.to_le_bytes()),
            KernelArg::U32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
            KernelArg::I32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
            KernelArg::F32(v) => b[..4].copy_from_slice(&v.to_le_bytes()),
        }
        b
    }

    fn type_name(&self) -> &'static str {
        match self {
            KernelArg::Ptr(_) => "pointer",
            KernelArg::U64(_) => "u64",
            KernelArg::U32(_) => "u32",
            KernelArg::I32(_) => "i32",
            KernelArg::F32(_) => "f32",
        }
    }
}

/// A PTX kernel to launch: the module's text (loaded once per context and
/// cached by its address), the entry, the shapes and the arguments.
#[derive(Debug, Clone)]
pub struct PtxKernel<'a> {
    /// The PTX module's text, usually `include_str!` of a `.ptx` file.
    pub ptx: &'static str,
    /// Name of the `.entry`.
    pub entry: &'a str,
    /// Blocks of the grid (x, y, z).
    pub grid: [u32; 3],
    /// Threads of a block (x, y, z).
    pub block: [u32; 3],
    /// Dynamic shared memory per block, bytes (above 48 KiB the function's
    /// attribute is raised first, up to the device's opt-in limit).
    pub shared_bytes: u32,
    /// Arguments in `.entry` order.
    pub args: &'a [KernelArg],
}

/// One `.param` of an entry: its PTX type and size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryParam {
    /// Name in the PTX source.
    pub name: String,
    /// The type as written (`u64`, `f32`, `b8` for byte arrays).
    pub ty: String,
    /// Size in bytes.
    pub size: usize,
}

fn scalar_size(ty: &str) -> Option<usize> {
    let bits: usize = ty.get(1..)?.parse().ok()?;
    match ty.as_bytes().first()? {
        b'u' | b's' | b'b' | b'f' if matches!(bits, 8 | 16 | 32 | 64) => Some(bits / 8),
        _ => None,
    }
}

/// The parameter list of `.entry <entry>` in `ptx`.
pub fn entry_params(ptx: &str, entry: &str) -> Result<Vec<EntryParam>> {
    let mut rest = ptx;
    let body = loop {
        let Some(at) = rest.find(".entry") else {
            return Err(RuntimeError::Invalid(format!(
                "kernel `{entry}`: the PTX module has no `.entry {entry}`"
            )));
        };
        let after = rest[at + ".entry".len()..].trim_start();
        let name_len = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
            .unwrap_or(after.len());
        if &after[..name_len] == entry {
            let tail = after[name_len..].trim_start();
            let Some(list) = tail.strip_prefix('(') else {
                return Ok(Vec::new());
            };
            let Some(close) = list.find(')') else {
                return Err(RuntimeError::Invalid(format!(
                    "kernel `{entry}`: its parameter list is not closed"
                )));
            };
            break &list[..close];
        }
        rest = &after[name_len..];
    };
    let mut params = Vec::new();
    for decl in body.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        // `.param .u64 name`, `.param .align 8 .b8 name[16]`,
        // `.param .u64 .ptr .global .align 16 name`.
        let words: Vec<&str> = decl.split_whitespace().collect();
        let bad = || {
            RuntimeError::Invalid(format!(
                "kernel `{entry}`: cannot read the parameter declaration `{decl}`"
            ))
        };
        if words.first() != Some(&".param") {
            return Err(bad());
        }
        let ty = words
            .iter()
            .skip(1)
            .filter_map(|w| w.strip_prefix('.'))
            .find(|w| scalar_size(w).is_some())
            .ok_or_else(bad)?;
        let last = *words.last().ok_or_else(bad)?;
        let (name, count) = match last.split_once('[') {
            Some((n, c)) => {
                let c: usize = c.trim_end_matches(']').parse().map_err(|_| bad())?;
                (n, c)
            }
            None => (last, 1),
        };
        let size = scalar_size(ty).ok_or_else(bad)? * count;
        params.push(EntryParam {
            name: name.to_string(),
            ty: ty.to_string(),
            size,
        });
    }
    Ok(params)
}

/// Checks the arguments against the entry's parameters: the same count,
/// and each argument of the parameter's size (a pointer for a 64-bit
/// parameter, a 32-bit value for a 32-bit one; floats only for `.f32`).
pub fn check_args(entry: &str, params: &[EntryParam], args: &[KernelArg]) -> Result<()> {
    if params.len() != args.len() {
        return Err(RuntimeError::Invalid(format!(
            "kernel `{entry}`: {} arguments given, the entry takes {} ({})",
            args.len(),
            params.len(),
            params
                .iter()
                .map(|p| format!("{}: .{}", p.name, p.ty))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (i, (p, a)) in params.iter().zip(args).enumerate() {
        let float_mismatch = matches!(a, KernelArg::F32(_)) != (p.ty == "f32");
        if p.size != a.size() || (a.size() == 4 && float_mismatch) {
            return Err(RuntimeError::Invalid(format!(
                "kernel `{entry}`: argument {i} (`{}`, .{}, {} bytes) was given a {} of {} bytes",
                p.name,
                p.ty,
                p.size,
                a.type_name(),
                a.size()
            )));
        }
    }
    Ok(())
}

/// Checks that every pointer argument lies inside one of `ranges` (the
/// start and length of each declared view): the views are what keeps the
/// memory alive while the kernel runs, so a pointer outside them is a bug.
pub fn check_pointers(entry: &str, args: &[KernelArg], ranges: &[(u64, u64)]) -> Result<()> {
    for (i, a) in args.iter().enumerate() {
        if let KernelArg::Ptr(p) = *a {
            let inside = ranges
                .iter()
                .any(|&(start, len)| p >= start && p < start.saturating_add(len.max(1)));
            if !inside {
                return Err(RuntimeError::Invalid(format!(
                    "kernel `{entry}`: pointer argument {i} (0x{p:x}) lies in none of the {} \
                     views the launch declares as read or written",
                    ranges.len()
                )));
            }
        }
    }
    Ok(())
}

/// Device limits a launch is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchLimits {
    /// Most threads in a block.
    pub max_threads_per_block: u32,
    /// Most blocks along x, y and z.
    pub max_grid: [u32; 3],
    /// Most dynamic shared memory one block may opt in to, bytes.
    pub max_shared_optin: u32,
}

/// Checks a launch's shapes against the device's limits.
pub fn check_shape(k: &PtxKernel<'_>, lim: &LaunchLimits) -> Result<()> {
    let threads = k.block.iter().map(|&b| u64::from(b)).product::<u64>();
    if k.block.contains(&0) || k.grid.contains(&0) {
        return Err(RuntimeError::Invalid(format!(
            "kernel `{}`: grid {:?} and block {:?} must have no zero extent",
            k.entry, k.grid, k.block
        )));
    }
    if threads > u64::from(lim.max_threads_per_block) {
        return Err(RuntimeError::Invalid(format!(
            "kernel `{}`: block {:?} has {threads} threads, the device allows {}",
            k.entry, k.block, lim.max_threads_per_block
        )));
    }
    for (axis, (&g, &m)) in ["x", "y", "z"].iter().zip(k.grid.iter().zip(&lim.max_grid)) {
        if g > m {
            return Err(RuntimeError::Invalid(format!(
                "kernel `{}`: grid extent {axis} = {g} exceeds the device's {m}",
                k.entry
            )));
        }
    }
    if k.shared_bytes > lim.max_shared_optin {
        return Err(RuntimeError::Invalid(format!(
            "kernel `{}`: {} bytes of dynamic shared memory asked, the device allows {} per block",
            k.entry, k.shared_bytes, lim.max_shared_optin
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX: &str = "
.version 8.0
.target sm_80
.address_size 64
.visible .entry add_one_f32(.param .u64 p_out, .param .u64 p_in, .param .u32 p_n)
{ ret; }
.visible .entry scaled(
    .param .u64 .ptr .global .align 16 p_x, .param .f32 p_scale,
    .param .align 8 .b8 p_blob[24], .param .s32 p_off)
{ ret; }
.visible .entry no_params
{ ret; }
";

    #[test]
    fn params_are_read_from_the_entry() {
        let p = entry_params(PTX, "add_one_f32").unwrap();
        let got: Vec<(&str, &str, usize)> = p
            .iter()
            .map(|p| (p.name.as_str(), p.ty.as_str(), p.size))
            .collect();
        assert_eq!(
            got,
            [("p_out", "u64", 8), ("p_in", "u64", 8), ("p_n", "u32", 4)]
        );
        let p = entry_params(PTX, "scaled").unwrap();
        let sizes: Vec<usize> = p.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [8, 4, 24, 4]);
        assert_eq!(p[2].name, "p_blob");
        assert!(entry_params(PTX, "no_params").unwrap().is_empty());
    }

    #[test]
    fn a_missing_entry_is_named() {
        let e = entry_params(PTX, "add_one").unwrap_err().to_string();
        assert!(e.contains("no `.entry add_one`"), "{e}");
    }

    #[test]
    fn the_repository_kernels_parse() {
        let attn = include_str!("../../../ptx/kernels/attn_fwd.ptx");
        let p = entry_params(attn, "attn_fwd_d64").unwrap();
        assert_eq!(p.len(), 11);
        assert_eq!(p[10].ty, "f32");
        assert_eq!(p.iter().map(|p| p.size).sum::<usize>(), 5 * 8 + 6 * 4);
    }

    #[test]
    fn arguments_must_match_count_and_sizes() {
        let p = entry_params(PTX, "add_one_f32").unwrap();
        let good = [KernelArg::Ptr(16), KernelArg::Ptr(32), KernelArg::U32(4)];
        check_args("add_one_f32", &p, &good).unwrap();
        let e = check_args("add_one_f32", &p, &good[..2])
            .unwrap_err()
            .to_string();
        assert!(e.contains("2 arguments given, the entry takes 3"), "{e}");
        let bad = [KernelArg::Ptr(16), KernelArg::U32(1), KernelArg::U32(4)];
        let e = check_args("add_one_f32", &p, &bad).unwrap_err().to_string();
        assert!(e.contains("argument 1 (`p_in`"), "{e}");
        let p = entry_params(PTX, "scaled").unwrap();
        let wrong_float = [
            KernelArg::Ptr(0),
            KernelArg::U32(1),
            KernelArg::Ptr(0),
            KernelArg::I32(0),
        ];
        let e = check_args("scaled", &p, &wrong_float)
            .unwrap_err()
            .to_string();
        assert!(e.contains("argument 1 (`p_scale`, .f32"), "{e}");
    }

    #[test]
    fn pointers_must_lie_in_declared_views() {
        let ranges = [(0x1000, 256), (0x4000, 64)];
        let ok = [
            KernelArg::Ptr(0x1000),
            KernelArg::Ptr(0x40ff - 0xc0),
            KernelArg::U64(7),
        ];
        check_pointers("k", &ok, &ranges).unwrap();
        let e = check_pointers("k", &[KernelArg::U32(1), KernelArg::Ptr(0x1100)], &ranges)
            .unwrap_err()
            .to_string();
        assert!(e.contains("pointer argument 1 (0x1100)"), "{e}");
    }

    #[test]
    fn shapes_are_checked_against_the_limits() {
        let lim = LaunchLimits {
            max_threads_per_block: 1024,
            max_grid: [u32::MAX, 65535, 65535],
            max_shared_optin: 227 * 1024,
        };
        let mut k = PtxKernel {
            ptx: PTX,
            entry: "add_one_f32",
            grid: [4, 1, 1],
            block: [256, 1, 1],
            shared_bytes: 100 * 1024,
            args: &[],
        };
        check_shape(&k, &lim).unwrap();
        k.block = [64, 32, 1];
        assert!(check_shape(&k, &lim)
            .unwrap_err()
            .to_string()
            .contains("2048 threads"));
        k.block = [128, 1, 1];
        k.grid = [1, 70000, 1];
        assert!(check_shape(&k, &lim)
            .unwrap_err()
            .to_string()
            .contains("grid extent y = 70000"));
        k.grid = [1, 1, 1];
        k.shared_bytes = 228 * 1024;
        assert!(check_shape(&k, &lim)
            .unwrap_err()
            .to_string()
            .contains("dynamic shared memory"));
        k.shared_bytes = 0;
        k.grid = [0, 1, 1];
        assert!(check_shape(&k, &lim)
            .unwrap_err()
            .to_string()
            .contains("no zero extent"));
    }
}
