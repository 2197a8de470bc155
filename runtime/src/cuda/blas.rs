//! The GEMM of the cuda device: cuBLASLt (bf16 in, fp32 accumulate, an
//! optional fused bias) over views, enqueued on a stream like any kernel
//! (traced, its memory held until it completed), with its workspace carved
//! from the device's slab. The arguments are row-major, as everywhere else
//! in fpdt; the mapping to cuBLASLt's column-major view happens here.

use std::sync::Arc;

use crate::cublaslt::{Bias, CublasLt, Handle, MatmulBf16, OutDType};
use crate::device::{Device, DeviceKind};
use crate::error::{Result, RuntimeError};
use crate::memory::{DeviceBuffer, View};
use crate::stream::{Stream, Work};

/// Workspace handed to cuBLASLt (its heuristics pick faster algorithms
/// with one; 32 MiB is what it recommends for Hopper).
pub const WORKSPACE_BYTES: usize = 32 << 20;

/// One row-major GEMM: `D[m, n] = op(A) op(B) (+ bias[n])`, where op(A)
/// is `[m, k]` (A stored `[k, m]` when `trans_a`) and op(B) is `[k, n]`
/// (B stored `[n, k]` when `trans_b`); A and B bf16, D of `out`'s type.
#[derive(Debug, Clone, Copy)]
pub struct Gemm<'a> {
    /// Rows of D.
    pub m: usize,
    /// Columns of D.
    pub n: usize,
    /// The contracted dimension.
    pub k: usize,
    /// A is stored transposed.
    pub trans_a: bool,
    /// B is stored transposed.
    pub trans_b: bool,
    /// A, bf16.
    pub a: View<'a>,
    /// B, bf16.
    pub b: View<'a>,
    /// D, written.
    pub d: View<'a>,
    /// D's element type.
    pub out: OutDType,
    /// A bias over D's columns, in D's element type.
    pub bias: Option<View<'a>>,
    /// Add into D instead of overwriting it (cuBLASLt's beta = 1).
    pub accumulate: bool,
}

/// Checks the views hold the matrices the shapes describe (dense, row
/// major): the rule and the sizes in the error.
#[allow(clippy::too_many_arguments)]
pub fn check_gemm_views(
    m: usize,
    n: usize,
    k: usize,
    out: OutDType,
    a_bytes: usize,
    b_bytes: usize,
    d_bytes: usize,
    bias_bytes: Option<usize>,
) -> Result<()> {
    if m == 0 || n == 0 || k == 0 {
        return Err(RuntimeError::Invalid(format!(
            "gemm: m {m}, n {n}, k {k}: every dimension must be at least 1"
        )));
    }
    let need = |what: &str, have: usize, elems: usize, size: usize| {
        let want = elems.checked_mul(size).ok_or_else(|| {
            RuntimeError::Invalid(format!("gemm: {what} of {elems} elements overflows"))
        })?;
        if have < want {
            return Err(RuntimeError::Invalid(format!(
                "gemm: {what} has {have} bytes, the shapes (m {m}, n {n}, k {k}) need {want}"
            )));
        }
        Ok(())
    };
    need("A", a_bytes, m * k, 2)?;
    need("B", b_bytes, k * n, 2)?;
    need("D", d_bytes, m * n, out.size())?;
    if let Some(bb) = bias_bytes {
        need("bias", bb, n, out.size())?;
    }
    Ok(())
}

/// The column-major cuBLASLt call computing the row-major product: a
/// row-major `[r, c]` matrix is a column-major `[c, r]` one, so
/// `D^T = op(B)^T op(A)^T`.
pub fn column_major(g: &Gemm<'_>, workspace: u64, workspace_bytes: usize) -> MatmulBf16 {
    MatmulBf16 {
        m: g.n,
        n: g.m,
        k: g.k,
        trans_a: g.trans_b,
        lda: if g.trans_b { g.k } else { g.n },
        a: g.b.addr() as u64,
        trans_b: g.trans_a,
        ldb: if g.trans_a { g.m } else { g.k },
        b: g.a.addr() as u64,
        d: g.d.addr() as u64,
        ldd: g.n,
        out: g.out,
        bias: g.bias.map(|v| Bias {
            ptr: v.addr() as u64,
            len: g.n,
        }),
        workspace,
        workspace_bytes,
        alpha: 1.0,
        beta: if g.accumulate { 1.0 } else { 0.0 },
    }
}

/// cuBLASLt bound to one cuda device: the library, a handle and the
/// workspace.
pub struct Blas {
    lt: Arc<CublasLt>,
    handle: Handle,
    /// None for a workspace of 0 bytes.
    workspace: Option<DeviceBuffer>,
}

impl Blas {
    /// Loads cuBLASLt (see [`crate::libs`] for where it is looked for) and
    /// takes the workspace from `dev`'s slab. Only on cuda.
    pub fn new(dev: &Device) -> Result<Blas> {
        Blas::with_workspace(dev, WORKSPACE_BYTES)
    }

    /// [`Blas::new`] with a workspace of `bytes` (0: none; cuBLASLt then
    /// picks among the algorithms that need none), for devices whose
    /// budget is too small to give 32 MiB away.
    pub fn with_workspace(dev: &Device, bytes: usize) -> Result<Blas> {
        if dev.kind() != DeviceKind::Cuda {
            return Err(RuntimeError::Unsupported {
                device: dev.kind().as_str(),
                what: "cuBLASLt (the cpu device multiplies with the gemm crate)".into(),
            });
        }
        let lt = CublasLt::load()?;
        let handle = lt.handle()?;
        let workspace = if bytes == 0 {
            None
        } else {
            Some(dev.alloc(bytes, "cublaslt workspace")?)
        };
        Ok(Blas {
            lt,
            handle,
            workspace,
        })
    }

    /// The library in use.
    pub fn library(&self) -> &CublasLt {
        &self.lt
    }

    /// Enqueues `g` on `stream` (of the same device). `work` is what the
    /// trace reports (2 m n k FLOPs is the usual count).
    pub fn gemm(&self, stream: &Stream, g: &Gemm<'_>) -> Result<()> {
        check_gemm_views(
            g.m,
            g.n,
            g.k,
            g.out,
            g.a.len(),
            g.b.len(),
            g.d.len(),
            g.bias.map(|b| b.len()),
        )?;
        for (what, v) in [("A", g.a), ("B", g.b)]
            .into_iter()
            .chain(g.bias.map(|b| ("bias", b)))
        {
            if v.overlaps(&g.d) {
                return Err(RuntimeError::Invalid(format!(
                    "gemm: D overlaps {what} in `{}`",
                    v.tag()
                )));
            }
        }
        let (ws_addr, ws_bytes) = match &self.workspace {
            Some(w) => (w.view().addr() as u64, w.len()),
            None => (0, 0),
        };
        let args = column_major(g, ws_addr, ws_bytes);
        args.validate()?;
        let mut reads = vec![g.a, g.b];
        reads.extend(g.bias);
        // Accumulating reads D too; it is declared written, which the
        // stream treats as read and write.
        let flops = 2.0 * g.m as f64 * g.n as f64 * g.k as f64;
        let bytes = (g.a.len() + g.b.len() + g.d.len()) as u64;
        let mut writes = vec![g.d];
        writes.extend(self.workspace.as_ref().map(|w| w.view()));
        stream.enqueue_cuda(
            format!("gemm {}x{}x{}", g.m, g.n, g.k),
            Work::kernel(flops, bytes),
            &reads,
            &writes,
            |raw| {
                // SAFETY: every pointer lies in a view checked above to
                // hold the extents the arguments describe, of this
                // stream's device; the stream keeps the views alive until
                // the GEMM completed; D overlaps no input.
                unsafe { self.lt.matmul_bf16(&self.handle, raw, &args) }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CpuConfig, Device};

    #[test]
    fn views_too_small_for_the_shapes_are_named() {
        let ok = check_gemm_views(4, 8, 16, OutDType::F32, 128, 256, 128, Some(32));
        ok.unwrap();
        let e = check_gemm_views(4, 8, 16, OutDType::F32, 127, 256, 128, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("A has 127 bytes") && e.contains("need 128"),
            "{e}"
        );
        let e = check_gemm_views(4, 8, 16, OutDType::F32, 128, 256, 64, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("D has 64 bytes"), "{e}");
        let e = check_gemm_views(4, 8, 16, OutDType::Bf16, 128, 256, 64, Some(8))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bias has 8 bytes"), "{e}");
        let e = check_gemm_views(0, 8, 16, OutDType::F32, 128, 256, 128, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least 1"), "{e}");
    }

    /// The column-major arguments, multiplied on the host the way
    /// cuBLASLt defines them, give the row-major product for every
    /// combination of transposes.
    #[test]
    fn the_column_major_call_computes_the_row_major_product() {
        let dev = Device::cpu(CpuConfig {
            device_memory: 1 << 20,
            host_memory: 1 << 20,
            ..CpuConfig::default()
        })
        .unwrap();
        let (m, n, k) = (3usize, 5usize, 4usize);
        let a_buf = dev.alloc(m * k * 2, "a").unwrap();
        let b_buf = dev.alloc(k * n * 2, "b").unwrap();
        let d_buf = dev.alloc(m * n * 4, "d").unwrap();
        let a_val = |i: usize, j: usize| (i * 7 + j * 3) as f64 % 5.0 - 2.0; // op(A)[i, j]
        let b_val = |i: usize, j: usize| (i * 2 + j * 5) as f64 % 7.0 - 3.0; // op(B)[i, j]
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // Row-major storage of A and B as the flags describe.
            let a: Vec<f64> = if ta {
                (0..k * m).map(|x| a_val(x % m, x / m)).collect() // stored [k, m]
            } else {
                (0..m * k).map(|x| a_val(x / k, x % k)).collect()
            };
            let b: Vec<f64> = if tb {
                (0..n * k).map(|x| b_val(x % k, x / k)).collect() // stored [n, k]
            } else {
                (0..k * n).map(|x| b_val(x / n, x % n)).collect()
            };
            let g = Gemm {
                m,
                n,
                k,
                trans_a: ta,
                trans_b: tb,
                a: a_buf.view(),
                b: b_buf.view(),
                d: d_buf.view(),
                out: OutDType::F32,
                bias: None,
                accumulate: false,
            };
            let c = column_major(&g, 0, 0);
            assert_eq!(c.beta, 0.0);
            assert_eq!(
                column_major(
                    &Gemm {
                        accumulate: true,
                        ..g
                    },
                    0,
                    0
                )
                .beta,
                1.0
            );
            // cuBLASLt: D (cm, rows c.m, ld c.ldd) = op(A') op(B'), A' at
            // `b` stored cm with ld c.lda, B' at `a` with ld c.ldb.
            let (ap, bp) = (&b, &a);
            let at = |i: usize, l: usize| {
                if c.trans_a {
                    ap[i * c.lda + l]
                } else {
                    ap[l * c.lda + i]
                }
            };
            let bt = |l: usize, j: usize| {
                if c.trans_b {
                    bp[l * c.ldb + j]
                } else {
                    bp[j * c.ldb + l]
                }
            };
            let mut d = vec![0.0f64; m * n];
            for j in 0..c.n {
                for i in 0..c.m {
                    d[j * c.ldd + i] = (0..c.k).map(|l| at(i, l) * bt(l, j)).sum();
                }
            }
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a_val(i, l) * b_val(l, j)).sum();
                    assert_eq!(d[i * n + j], want, "ta {ta} tb {tb} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn blas_is_refused_off_cuda() {
        let dev = Device::cpu(CpuConfig {
            device_memory: 1 << 20,
            host_memory: 1 << 20,
            ..CpuConfig::default()
        })
        .unwrap();
        let e = Blas::new(&dev)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("cuBLASLt"), "{e}");
    }
}
