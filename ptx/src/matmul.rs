//! The one `matmul` every device runs: on cpu the `gemm` crate (the CPU
//! twin, [`crate::cpu::matmul`]) as a host kernel, on cuda cuBLASLt
//! ([`fpdt_runtime::cuda::Blas`]), on meta only its cost. Same arguments
//! everywhere: row-major views, transposes, an optional fused bias, f32
//! accumulation, accumulate-into-C.

use fpdt_runtime::cublaslt::OutDType;
use fpdt_runtime::cuda::{Blas, Gemm};
use fpdt_runtime::{DeviceKind, Stream, View, Work};
use half::bf16;

use crate::cpu::{DType, MatmulSpec, Transpose};
use crate::{PtxError, Result};

const K: &str = "matmul";

/// The operands of one product (see [`MatmulSpec`] for the shapes).
#[derive(Debug, Clone, Copy)]
pub struct MatmulViews<'a> {
    /// A, of `input`'s type.
    pub a: View<'a>,
    /// B, of `input`'s type.
    pub b: View<'a>,
    /// The bias over C's columns (`n` elements of `input`'s type on cpu,
    /// of `output`'s type on cuda, where cuBLASLt's epilogue reads it).
    pub bias: Option<View<'a>>,
    /// C, of `output`'s type (read too when accumulating).
    pub c: View<'a>,
    /// Element type of A, B.
    pub input: DType,
    /// Element type of C.
    pub output: DType,
}

fn bad(arg: &'static str, message: impl Into<String>) -> PtxError {
    PtxError::BadArgument {
        kernel: K,
        arg,
        message: message.into(),
    }
}

fn cast<'b, E: bytemuck::Pod>(b: &'b [u8], what: &'static str) -> Result<&'b [E]> {
    bytemuck::try_cast_slice(b).map_err(|e| bad(what, format!("cannot be read as elements: {e}")))
}

/// Enqueues `C = op(A) op(B) (+ bias) (+ C)` on `stream`. `blas` is the
/// device's cuBLASLt on cuda (ignored elsewhere). On cuda A and B must be
/// bf16 (the binding's only input type).
pub fn matmul(
    stream: &Stream,
    blas: Option<&Blas>,
    spec: &MatmulSpec,
    v: &MatmulViews<'_>,
) -> Result<()> {
    let flops = 2.0 * spec.m as f64 * spec.n as f64 * spec.k as f64;
    let bytes = (v.a.len() + v.b.len() + v.c.len()) as u64;
    let work = Work::kernel(flops, bytes);
    let dev = |e: fpdt_runtime::RuntimeError| PtxError::Device(e.to_string());
    match stream.device_kind() {
        DeviceKind::Cuda => {
            let Some(blas) = blas else {
                return Err(bad(
                    "blas",
                    "is None: a cuda stream needs the device's cuBLASLt",
                ));
            };
            if v.input != DType::BF16 {
                return Err(bad(
                    "input",
                    format!("is {:?}: on cuda the operands must be bf16", v.input),
                ));
            }
            let out = match v.output {
                DType::BF16 => OutDType::Bf16,
                DType::F32 => OutDType::F32,
            };
            blas.gemm(
                stream,
                &Gemm {
                    m: spec.m,
                    n: spec.n,
                    k: spec.k,
                    trans_a: spec.trans_a == Transpose::Yes,
                    trans_b: spec.trans_b == Transpose::Yes,
                    a: v.a,
                    b: v.b,
                    d: v.c,
                    out,
                    bias: v.bias,
                    accumulate: spec.accumulate,
                },
            )
            .map_err(dev)
        }
        DeviceKind::Cpu | DeviceKind::Meta => {
            let spec = *spec;
            let (input, output) = (v.input, v.output);
            let mut reads = vec![v.a, v.b];
            reads.extend(v.bias);
            let has_bias = v.bias.is_some();
            stream
                .launch_host(
                    K,
                    work,
                    &reads,
                    &[v.c],
                    Box::new(move |i, o| {
                        let bias = has_bias.then(|| i[2]);
                        let r = match (input, output) {
                            (DType::F32, DType::F32) => run::<f32, f32>(&spec, i[0], i[1], bias, o),
                            (DType::F32, DType::BF16) => {
                                run::<f32, bf16>(&spec, i[0], i[1], bias, o)
                            }
                            (DType::BF16, DType::F32) => {
                                run::<bf16, f32>(&spec, i[0], i[1], bias, o)
                            }
                            (DType::BF16, DType::BF16) => {
                                run::<bf16, bf16>(&spec, i[0], i[1], bias, o)
                            }
                        };
                        r.map_err(|e| e.to_string())
                    }),
                )
                .map_err(dev)
        }
    }
}

fn run<E: crate::cpu::Element, C: crate::cpu::Element>(
    spec: &MatmulSpec,
    a: &[u8],
    b: &[u8],
    bias: Option<&[u8]>,
    out: &mut [&mut [u8]],
) -> Result<()> {
    let c: &mut [C] = bytemuck::try_cast_slice_mut(&mut *out[0])
        .map_err(|e| bad("c", format!("cannot be written as elements: {e}")))?;
    let bias = match bias {
        Some(b) => Some(cast::<E>(b, "bias")?),
        None => None,
    };
    crate::cpu::matmul(spec, cast::<E>(a, "a")?, cast::<E>(b, "b")?, bias, c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fpdt_runtime::{CpuConfig, Device};

    fn cpu() -> Device {
        Device::cpu(CpuConfig {
            device_memory: 1 << 22,
            host_memory: 1 << 22,
            ..CpuConfig::default()
        })
        .unwrap()
    }

    #[test]
    fn on_cpu_it_is_the_twin_with_bias_and_accumulation() {
        let dev = cpu();
        let (m, n, k) = (5, 3, 4);
        let a: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        // B stored [n, k] (trans_b), as a linear layer's weight.
        let b: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 - 1.0).collect();
        let bias = [0.25f32, -1.0, 2.0];
        let c0: Vec<f32> = (0..m * n).map(|i| i as f32).collect();
        let (ad, bd, biasd) = (
            dev.upload(&a, "a").unwrap(),
            dev.upload(&b, "b").unwrap(),
            dev.upload(&bias, "bias").unwrap(),
        );
        let cd = dev.upload(&c0, "c").unwrap();
        let spec = MatmulSpec {
            m,
            n,
            k,
            trans_a: Transpose::No,
            trans_b: Transpose::Yes,
            accumulate: true,
        };
        matmul(
            dev.compute(),
            None,
            &spec,
            &MatmulViews {
                a: ad.view(),
                b: bd.view(),
                bias: Some(biasd.view()),
                c: cd.view(),
                input: DType::F32,
                output: DType::F32,
            },
        )
        .unwrap();
        let c = dev.download::<f32>(cd.view()).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want = c0[i * n + j]
                    + bias[j]
                    + (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum::<f32>();
                assert!((c[i * n + j] - want).abs() < 1e-5, "({i}, {j})");
            }
        }
        assert!(dev.trace().events().iter().any(|e| e.name == "matmul"));
    }

    #[test]
    fn a_bad_view_size_is_an_error_from_the_stream() {
        let dev = cpu();
        let x = dev.alloc(64, "x").unwrap();
        let y = dev.alloc(64, "y").unwrap();
        let spec = MatmulSpec {
            m: 8,
            n: 8,
            k: 8,
            trans_a: Transpose::No,
            trans_b: Transpose::No,
            accumulate: false,
        };
        matmul(
            dev.compute(),
            None,
            &spec,
            &MatmulViews {
                a: x.view(),
                b: x.view(),
                bias: None,
                c: y.view(),
                input: DType::F32,
                output: DType::F32,
            },
        )
        .unwrap();
        let e = dev.synchronize().unwrap_err().to_string();
        assert!(e.contains("matmul"), "{e}");
    }
}
