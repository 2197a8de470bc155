//! The Ulysses head-parallel all-to-all of one chunk.
//!
//! Forward ("scatter heads, gather sequence"): local `[c, H, d]` on each of
//! P ranks becomes `[P*c, H/P, d]`: rank `r` ends with heads
//! `r*H/P .. (r+1)*H/P` of the chunk's `P*c` tokens, in source rank order,
//! which with the FPDT token layout is token order. Backward ("gather
//! heads, scatter sequence") is the inverse.
//!
//! The permutes follow `ptx/CONVENTIONS.md`: [`pack_heads`] turns
//! `[c, H, d]` into the per-destination head groups `[P][c, H/P, d]`; an
//! equal-split all-to-all delivers `[P][c, H/P, d]` ordered by source
//! rank, which in memory already *is* `[P*c, H/P, d]` (the token-side unpack
//! of the convention moves no byte). The reverse direction sends
//! `[P*c, H/P, d]` as is (block `r` = tokens of rank `r`) and
//! [`unpack_heads`] turns the received `[P][c, H/P, d]` back into
//! `[c, H, d]`. These are the plain Rust versions, which run as host
//! kernels on the cpu device; on cuda the same permutes run as
//! `ptx/kernels/ulysses.ptx` (the layout is the same, checked against
//! `fpdt_ptx::cpu::ulysses_pack` and these).
//!
//! GQA: queries (and o, do, dq) have `heads` heads, keys and values (and
//! dk, dv) `kv_heads`; both must divide by P.

use fpdt_ptx::cpu::DType;
use fpdt_runtime::{Device, DeviceKind, Stream, View, Work};

use crate::communicator::Communicator;
use crate::error::{CommError, Result};

/// The shape of one head permute: `tokens` (c) of `heads` heads of
/// `head_dim` elements, split in `ranks` head groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSplit {
    /// c: tokens on this rank.
    pub tokens: usize,
    /// H: heads before the split.
    pub heads: usize,
    /// d: elements per head.
    pub head_dim: usize,
    /// P: head groups (ranks).
    pub ranks: usize,
}

impl HeadSplit {
    /// Checks the shape: `heads` divisible by `ranks`, nothing zero.
    pub fn new(tokens: usize, heads: usize, head_dim: usize, ranks: usize) -> Result<HeadSplit> {
        if ranks == 0 || heads == 0 || head_dim == 0 {
            return Err(CommError::Invalid(format!(
                "head split: heads ({heads}), head_dim ({head_dim}) and ranks ({ranks}) must be positive"
            )));
        }
        if heads % ranks != 0 {
            return Err(CommError::NotDivisible {
                what: "heads".into(),
                value: heads,
                by_what: "the sequence-parallel degree P".into(),
                by: ranks,
            });
        }
        Ok(HeadSplit {
            tokens,
            heads,
            head_dim,
            ranks,
        })
    }

    /// Elements of the whole tensor, `c * H * d`.
    pub fn elements(&self) -> usize {
        self.tokens * self.heads * self.head_dim
    }

    /// Heads per group, `H / P`.
    pub fn group_heads(&self) -> usize {
        self.heads / self.ranks
    }

    fn check(&self, what: &str, src: usize, dst: usize) -> Result<()> {
        if self.heads % self.ranks != 0 || self.ranks == 0 {
            return Err(CommError::NotDivisible {
                what: "heads".into(),
                value: self.heads,
                by_what: "the sequence-parallel degree P".into(),
                by: self.ranks,
            });
        }
        let n = self.elements();
        if src != n || dst != n {
            return Err(CommError::Invalid(format!(
                "{what}: source has {src} and destination {dst} elements, the shape {self:?} has {n}"
            )));
        }
        Ok(())
    }
}

/// `[c, H, d]` -> `[P][c, H/P, d]`: block `g` holds heads
/// `g*H/P .. (g+1)*H/P` of every token, for destination rank `g`.
pub fn pack_heads<T: Copy>(src: &[T], dst: &mut [T], s: &HeadSplit) -> Result<()> {
    s.check("pack_heads", src.len(), dst.len())?;
    let row = s.group_heads() * s.head_dim;
    let token = s.heads * s.head_dim;
    for g in 0..s.ranks {
        for t in 0..s.tokens {
            let from = t * token + g * row;
            let to = (g * s.tokens + t) * row;
            dst[to..to + row].copy_from_slice(&src[from..from + row]);
        }
    }
    Ok(())
}

/// `[P][c, H/P, d]` -> `[c, H, d]`, the inverse of [`pack_heads`]: block `g`
/// (from rank `g`) provides heads `g*H/P .. (g+1)*H/P`.
pub fn unpack_heads<T: Copy>(src: &[T], dst: &mut [T], s: &HeadSplit) -> Result<()> {
    s.check("unpack_heads", src.len(), dst.len())?;
    let row = s.group_heads() * s.head_dim;
    let token = s.heads * s.head_dim;
    for g in 0..s.ranks {
        for t in 0..s.tokens {
            let from = (g * s.tokens + t) * row;
            let to = t * token + g * row;
            dst[to..to + row].copy_from_slice(&src[from..from + row]);
        }
    }
    Ok(())
}

/// Head counts of the attention of one layer, split over P ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UlyssesConfig {
    /// Query heads H.
    pub heads: usize,
    /// Key/value heads (GQA; `heads` for plain multi-head attention).
    pub kv_heads: usize,
    /// Elements per head, d.
    pub head_dim: usize,
    /// Sequence-parallel degree P.
    pub ranks: usize,
}

impl UlyssesConfig {
    /// Checks the rules: P > 0, heads and kv_heads divisible by P, heads
    /// divisible by kv_heads. Errors name both numbers.
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize, ranks: usize) -> Result<Self> {
        if ranks == 0 || heads == 0 || kv_heads == 0 || head_dim == 0 {
            return Err(CommError::Invalid(format!(
                "ulysses: heads ({heads}), kv_heads ({kv_heads}), head_dim ({head_dim}) and \
                 the sequence-parallel degree P ({ranks}) must all be positive"
            )));
        }
        for (name, v) in [("heads", heads), ("kv_heads", kv_heads)] {
            if v % ranks != 0 {
                return Err(CommError::NotDivisible {
                    what: name.into(),
                    value: v,
                    by_what: "the sequence-parallel degree P".into(),
                    by: ranks,
                });
            }
        }
        if heads % kv_heads != 0 {
            return Err(CommError::NotDivisible {
                what: "heads".into(),
                value: heads,
                by_what: "kv_heads".into(),
                by: kv_heads,
            });
        }
        Ok(UlyssesConfig {
            heads,
            kv_heads,
            head_dim,
            ranks,
        })
    }

    /// Query heads per rank after the all-to-all, H/P.
    pub fn local_heads(&self) -> usize {
        self.heads / self.ranks
    }

    /// Key/value heads per rank after the all-to-all.
    pub fn local_kv_heads(&self) -> usize {
        self.kv_heads / self.ranks
    }

    /// The head count of a tensor kind.
    pub fn heads_of(&self, kind: Heads) -> usize {
        match kind {
            Heads::Query => self.heads,
            Heads::KeyValue => self.kv_heads,
        }
    }
}

/// Which head count a tensor has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heads {
    /// q, o, do, dq: `heads` heads.
    Query,
    /// k, v, dk, dv: `kv_heads` heads.
    KeyValue,
}

/// The head-parallel all-to-all of one chunk on one rank, over a
/// communicator. Staging buffers come from `device` (tag
/// `"ulysses staging"`) and are released when the enqueued work is done.
pub struct UlyssesAllToAll<'a, C: Communicator + ?Sized> {
    comm: &'a C,
    device: Device,
    cfg: UlyssesConfig,
}

impl<'a, C: Communicator + ?Sized> UlyssesAllToAll<'a, C> {
    /// The all-to-all for `cfg` over `comm` (whose world size must be
    /// `cfg.ranks`), staging on `device` (the rank's device).
    pub fn new(comm: &'a C, device: Device, cfg: UlyssesConfig) -> Result<Self> {
        if comm.world_size() != cfg.ranks {
            return Err(CommError::Invalid(format!(
                "ulysses: the config's sequence-parallel degree P ({}) differs from the \
                 communicator's world size ({})",
                cfg.ranks,
                comm.world_size()
            )));
        }
        Ok(UlyssesAllToAll { comm, device, cfg })
    }

    /// The configuration.
    pub fn config(&self) -> &UlyssesConfig {
        &self.cfg
    }

    fn split(&self, kind: Heads, elem_bytes: usize, bytes: usize, what: &str) -> Result<HeadSplit> {
        let heads = self.cfg.heads_of(kind);
        if elem_bytes == 0 {
            return Err(CommError::Invalid(format!(
                "{what}: elem_bytes must be positive"
            )));
        }
        let token = heads * self.cfg.head_dim * elem_bytes;
        if bytes % token != 0 {
            return Err(CommError::Invalid(format!(
                "{what}: {bytes} bytes is not a whole number of tokens of {heads} heads x \
                 {} x {elem_bytes} bytes",
                self.cfg.head_dim
            )));
        }
        // The permute moves whole heads, so it runs on bytes.
        HeadSplit::new(
            bytes / token,
            heads,
            self.cfg.head_dim * elem_bytes,
            self.cfg.ranks,
        )
    }

    /// On cuda, runs the pack (or the unpack) `src` -> `dst` as
    /// ulysses.ptx, moving `elem_bytes`-byte elements unchanged (as bf16 for
    /// 2 bytes, f32 for 4), and says so; false elsewhere (the host permute
    /// runs).
    fn permute_on_gpu(
        &self,
        stream: &Stream,
        pack: bool,
        s: &HeadSplit,
        elem_bytes: usize,
        src: View<'_>,
        dst: View<'_>,
    ) -> Result<bool> {
        if stream.device_kind() != DeviceKind::Cuda {
            return Ok(false);
        }
        let dt = match elem_bytes {
            2 => DType::BF16,
            4 => DType::F32,
            _ => return Ok(false),
        };
        let launcher = match pack {
            true => fpdt_ptx::kernels::ulysses_pack,
            false => fpdt_ptx::kernels::ulysses_unpack,
        };
        let ptx = |e: fpdt_ptx::PtxError| CommError::Invalid(e.to_string());
        let (d, x) = (dst.addr() as u64, src.addr() as u64);
        let l = launcher(s.tokens, s.heads, self.cfg.head_dim, s.ranks, dt, d, x).map_err(ptx)?;
        let work = Work::kernel(0.0, 2 * src.len() as u64);
        l.enqueue(stream, work, &[src], &[dst]).map_err(ptx)?;
        Ok(true)
    }

    /// Runs the checks and allocations before a collective; where they fail,
    /// the group is aborted so the other ranks do not wait for this one.
    fn aborting<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        f().inspect_err(|e| self.comm.abort(&e.to_string()))
    }

    /// Forward: `input` `[c, H, d]` (this rank's tokens, all heads) to
    /// `output` `[P*c, H/P, d]` (the chunk's tokens, this rank's heads).
    pub fn scatter_heads(
        &self,
        stream: &Stream,
        kind: Heads,
        elem_bytes: usize,
        input: View<'_>,
        output: View<'_>,
    ) -> Result<()> {
        let staging = self.aborting(|| {
            let s = self.split(kind, elem_bytes, input.len(), "ulysses scatter_heads")?;
            same_len("ulysses scatter_heads", &input, &output)?;
            let staging = self.device.alloc(input.len(), "ulysses staging")?;
            if self.permute_on_gpu(stream, true, &s, elem_bytes, input, staging.view())? {
                return Ok(staging);
            }
            stream.launch_host(
                "ulysses pack",
                Work::kernel(0.0, 2 * input.len() as u64),
                &[input],
                &[staging.view()],
                Box::new(move |ins, outs| {
                    pack_heads(ins[0], outs[0], &s).map_err(|e| e.to_string())
                }),
            )?;
            Ok(staging)
        })?;
        self.comm.all_to_all(stream, staging.view(), output)
    }

    /// Backward: `input` `[P*c, H/P, d]` to `output` `[c, H, d]`.
    pub fn gather_heads(
        &self,
        stream: &Stream,
        kind: Heads,
        elem_bytes: usize,
        input: View<'_>,
        output: View<'_>,
    ) -> Result<()> {
        let (s, staging) = self.aborting(|| {
            let s = self.split(kind, elem_bytes, output.len(), "ulysses gather_heads")?;
            same_len("ulysses gather_heads", &input, &output)?;
            Ok((s, self.device.alloc(input.len(), "ulysses staging")?))
        })?;
        self.comm.all_to_all(stream, input, staging.view())?;
        // A failure here is after the collective: the group stays whole.
        if self.permute_on_gpu(stream, false, &s, elem_bytes, staging.view(), output)? {
            return Ok(());
        }
        stream.launch_host(
            "ulysses unpack",
            Work::kernel(0.0, 2 * input.len() as u64),
            &[staging.view()],
            &[output],
            Box::new(move |ins, outs| unpack_heads(ins[0], outs[0], &s).map_err(|e| e.to_string())),
        )?;
        Ok(())
    }
}

fn same_len(what: &str, a: &View<'_>, b: &View<'_>) -> Result<()> {
    if a.len() != b.len() {
        return Err(CommError::Invalid(format!(
            "{what}: input `{}` has {} bytes but output `{}` has {}: they must be equal",
            a.tag(),
            a.len(),
            b.tag(),
            b.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_groups_heads_per_destination_and_unpack_inverts() {
        // c = 2 tokens, H = 4 heads, d = 3, P = 2.
        let s = HeadSplit::new(2, 4, 3, 2).unwrap();
        let src: Vec<u32> = (0..24).collect();
        let mut packed = vec![0; 24];
        pack_heads(&src, &mut packed, &s).unwrap();
        // Element (t, h, e) is t*12 + h*3 + e; group g, token t, local head k
        // sits at ((g*2 + t)*2 + k)*3 + e.
        for g in 0..2 {
            for t in 0..2 {
                for k in 0..2 {
                    for e in 0..3 {
                        let h = g * 2 + k;
                        assert_eq!(
                            packed[((g * 2 + t) * 2 + k) * 3 + e],
                            (t * 12 + h * 3 + e) as u32
                        );
                    }
                }
            }
        }
        let mut back = vec![0; 24];
        unpack_heads(&packed, &mut back, &s).unwrap();
        assert_eq!(back, src);
    }

    #[test]
    fn configs_name_both_numbers() {
        let e = UlyssesConfig::new(8, 2, 64, 4).unwrap_err().to_string();
        assert_eq!(
            e,
            "kv_heads (2) must be divisible by the sequence-parallel degree P (4)"
        );
        let e = UlyssesConfig::new(6, 6, 64, 4).unwrap_err().to_string();
        assert!(e.starts_with("heads (6) must be divisible by"), "{e}");
        let e = UlyssesConfig::new(8, 3, 64, 1).unwrap_err().to_string();
        assert!(e.contains("heads (8)") && e.contains("kv_heads (3)"), "{e}");
        let e = HeadSplit::new(2, 5, 3, 2).unwrap_err().to_string();
        assert!(e.contains("heads (5)") && e.contains("(2)"), "{e}");
        let s = HeadSplit::new(2, 4, 3, 2).unwrap();
        assert!(pack_heads(&[0u8; 23], &mut [0u8; 24], &s).is_err());
    }
}
