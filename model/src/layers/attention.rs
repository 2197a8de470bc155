//! The FPDT attention layer (DESIGN.md section 5), with its pre-norm, QKV
//! and output projections and residual, over all `u` chunks of one rank.
//!
//! Forward, per chunk i: norm and QKV projection of the local `x_i`
//! (`[c, hidden]`), with RoPE fused into the q and k projections at the
//! local tokens' global positions (RoPE is per token, so applying it before
//! the all-to-all is the same map as after it, and q and k are rounded to
//! the activation dtype once); head-parallel all-to-all (scatter heads,
//! gather sequence) of q, k, v to `[C, H/P, d]`, global positions
//! `iC..(i+1)C`; q_i against kv chunks `0..=i` (causal only on the
//! diagonal) with the online softmax and the stable LSE merge into an f32
//! accumulator, earlier kv chunks prefetched from the host arena through a
//! double buffer one ahead; then the reverse all-to-all of o_i, the output
//! projection fused with the residual add. q, kv, o, lse (and the gathered o) of every
//! chunk are stashed (offloaded when the schedule offloads).
//!
//! Backward: first per chunk the output projection's backward, the
//! all-to-all of dO and `delta = rowsum(dO * O)`; then the outer loop over
//! kv chunks i with the inner loop over query chunks `q = i..u` (causal
//! only when `q == i`), the query bundle (q, lse, dO, delta) prefetched one
//! ahead, dk/dv accumulated on the device in f32, the f32 dq accumulator of
//! chunk q fetched and sent back to the host; dq_i is final at `q == i`.
//! Then RoPE backward, reverse all-to-all, and the QKV projection's and
//! norm's backward with x_i fetched from the host.

use fpdt_comm::ulysses::Heads;
use fpdt_comm::{Communicator, UlyssesAllToAll, UlyssesConfig};
use fpdt_ptx::cpu::{
    attn_bwd_chunk, attn_delta, attn_fwd_chunk, lse_merge, matmul, rope_bwd, rope_fwd, AttnShape,
    DType,
};
use fpdt_ptx::kernels::{self, AttnBwdPtrs, AttnPtrs};
use fpdt_runtime::DoubleBuffer;

use super::{
    kernel, linear_bwd, linear_dgrad_sum, linear_fwd, linear_residual_fwd, missing, norm, Buf, Ctx,
    Held, Incoming, Stash, Tv,
};
use crate::config::LayerParams;
use crate::error::Result;

/// What the forward keeps for the backward, per chunk.
pub(crate) struct Saved {
    /// Roped queries `[C, H/P, d]`.
    pub q: Vec<Stash>,
    /// Roped keys then values `[2, C, KV/P, d]`.
    pub kv: Vec<Stash>,
    /// Final attention output `[C, H/P, d]` (the activation dtype; merged
    /// in an f32 accumulator).
    pub o: Vec<Stash>,
    /// Its log-sum-exp `[C, H/P]` (f32).
    pub lse: Vec<Stash>,
    /// The output gathered back to this rank's tokens `[c, H*d]`.
    pub o_local: Vec<Stash>,
    /// The MLP block's input `[c, hidden]` (filled by the block).
    pub x_mid: Vec<Stash>,
}

struct Dims {
    u: usize,
    c: usize,
    big_c: usize,
    hl: usize,
    kvl: usize,
    d: usize,
    h: usize,
    qd: usize,
    kvd: usize,
    theta: f32,
    scale: f32,
    ranks: usize,
    rank: usize,
}

impl Dims {
    fn new(ctx: &Ctx<'_>) -> Dims {
        let (cfg, s) = (ctx.cfg, ctx.sched);
        Dims {
            u: s.chunks,
            c: s.local_chunk_tokens(),
            big_c: s.chunk_tokens(),
            hl: cfg.heads / s.ranks,
            kvl: cfg.kv_heads / s.ranks,
            d: cfg.head_dim,
            h: cfg.hidden,
            qd: cfg.q_dim(),
            kvd: cfg.kv_dim(),
            theta: cfg.rope_theta as f32,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
            ranks: s.ranks,
            rank: ctx.comm.rank(),
        }
    }

    fn shape(&self) -> AttnShape {
        AttnShape {
            q_tokens: self.big_c,
            kv_tokens: self.big_c,
            heads: self.hl,
            kv_heads: self.kvl,
            head_dim: self.d,
        }
    }

    /// Elements of one q / o chunk after the all-to-all.
    fn qn(&self) -> usize {
        self.big_c * self.hl * self.d
    }

    /// Elements of one k (or v) chunk after the all-to-all.
    fn kn(&self) -> usize {
        self.big_c * self.kvl * self.d
    }

    /// Global positions of this rank's local tokens of chunk i: local
    /// chunk i is global small chunk `i*P + rank` (the FPDT token layout).
    fn local_positions(&self, i: usize) -> Vec<u32> {
        let first = (i * self.ranks + self.rank) * self.c;
        (first..first + self.c).map(|p| p as u32).collect()
    }

    fn positions(&self, i: usize) -> Vec<u32> {
        (i * self.big_c..(i + 1) * self.big_c)
            .map(|p| p as u32)
            .collect()
    }
}

fn bias<'a>(
    ctx: &'a Ctx<'_>,
    r: &Option<std::ops::Range<usize>>,
    grad: bool,
) -> Result<Option<Tv<'a>>> {
    Ok(match r {
        Some(r) if grad => Some(ctx.g(r)?),
        Some(r) => Some(ctx.p(r)?),
        None => None,
    })
}

/// `y = rope^T(x)`: the backward of RoPE (the inverse rotation) at `pos`.
fn rope_backward(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    y: Tv<'_>,
    pos: Vec<u32>,
    heads: usize,
    dims: &Dims,
) -> Result<()> {
    let (d, theta) = (dims.d, dims.theta);
    let n = x.len() as f64;
    if ctx.gpu && (x.dt == y.dt || x.dt == DType::F32) {
        // In x's dtype; an f32 x (the dq accumulator) into an f32 scratch,
        // then one rounding to y's dtype.
        let p = positions_on_device(ctx, &pos)?;
        let tmp = match x.dt == y.dt {
            true => None,
            false => Some(ctx.alloc(x.len(), "rope grad")?),
        };
        let out = tmp.as_ref().map_or(y, |t| t.view());
        let l = kernels::rope(
            pos.len(),
            heads,
            d,
            theta,
            true,
            x.dt,
            out.addr(),
            x.addr(),
            p.view().addr() as u64,
        )?;
        super::ptx_launch(ctx.s(), &l, 6.0 * n, &[x.v, p.view()], &[out.v])?;
        if tmp.is_some() {
            super::cast_on_gpu(ctx.s(), out, y)?;
        }
        return Ok(());
    }
    kernel(ctx.s(), "rope_bwd", 6.0 * n, &[x], &[y], move |i, o| {
        rope_bwd(i[0], &pos, heads, d, theta, o[0])
    })
}

/// `y = rope(x W^T + b)` at positions `pos` over `heads` heads of `[t,
/// heads*d]`: the projection with RoPE fused into its epilogue, so q and k
/// are rounded to the activation dtype once (RoPE is per token, so it runs
/// on the local tokens before the all-to-all, at their global positions).
#[allow(clippy::too_many_arguments)]
fn linear_rope_fwd(
    ctx: &Ctx<'_>,
    x: Tv<'_>,
    w: Tv<'_>,
    b: Option<Tv<'_>>,
    y: Tv<'_>,
    pos: Vec<u32>,
    heads: usize,
    dims: &Dims,
) -> Result<()> {
    let (t, inp, d, theta) = (pos.len(), dims.h, dims.d, dims.theta);
    let out = heads * d;
    let spec = super::linear_spec(t, inp, out, false);
    let flops = 2.0 * (t * inp * out) as f64 + 6.0 * (t * out) as f64;
    // On the GPU: the GEMM into f32, RoPE in f32 in place (each thread
    // reads its pair before writing it), one rounding to y's dtype.
    if y.dt == DType::BF16 {
        let b32 = b.map(|b| Tv {
            dt: DType::F32,
            ..b
        });
        if let Some(blas) = super::gemm_blas(ctx, &[x, w], Tv::f32(y.v), b32.as_ref()) {
            let s = ctx.s();
            // The bias in f32, the type cuBLASLt's epilogue reads it in.
            let widened = super::f32_bias(ctx, b)?;
            let b = widened.as_ref().map(|w| w.view()).or(b);
            let z = ctx.alloc(t * out, "qk projection")?;
            let zv = z.view();
            super::gemm(s, blas, &spec, x, w, b, zv)?;
            let p = positions_on_device(ctx, &pos)?;
            let l = kernels::rope(
                t,
                heads,
                d,
                theta,
                false,
                DType::F32,
                zv.addr(),
                zv.addr(),
                p.view().addr() as u64,
            )?;
            super::ptx_launch(s, &l, 6.0 * (t * out) as f64, &[zv.v, p.view()], &[zv.v])?;
            return super::cast_on_gpu(s, zv, y);
        }
    }
    let mut reads = vec![x, w];
    let has_b = b.is_some();
    reads.extend(b);
    kernel(
        ctx.s(),
        "linear_rope_fwd",
        flops,
        &reads,
        &[y],
        move |i, o| {
            let mut z = vec![0.0f32; t * out];
            matmul(&spec, i[0], i[1], has_b.then(|| i[2]), &mut z)?;
            rope_fwd(&z, &pos, heads, d, theta, o[0])
        },
    )
}

/// `pos` on the device: a slice of the rank's positions buffer when `pos`
/// is a run of consecutive positions inside it (every chunk's are), else a
/// copy on the compute stream from the host arena (ordered with the
/// kernels, no host wait).
fn positions_on_device<'a>(ctx: &Ctx<'a>, pos: &[u32]) -> Result<Positions<'a>> {
    let first = pos.first().map_or(0, |&p| p as usize);
    let consecutive = pos
        .iter()
        .enumerate()
        .all(|(k, &p)| p as usize == first + k);
    if let Some(all) = ctx
        .positions
        .filter(|b| consecutive && (first + pos.len()) * 4 <= b.len())
    {
        return Ok(Positions::Slice(
            all.bytes(first * 4..(first + pos.len()) * 4)?,
        ));
    }
    let mut h = ctx.dev.alloc_host(pos.len() * 4, "rope positions")?;
    h.write(|x: &mut [u32]| x.copy_from_slice(pos))?;
    let d = ctx.dev.alloc(pos.len() * 4, "rope positions")?;
    ctx.s().copy(h.view(), d.view())?;
    Ok(Positions::Copy(d))
}

/// Token positions on the device (u32).
enum Positions<'a> {
    /// A slice of the rank's positions buffer.
    Slice(fpdt_runtime::View<'a>),
    /// A copy made for this call.
    Copy(fpdt_runtime::DeviceBuffer),
}

impl Positions<'_> {
    fn view(&self) -> fpdt_runtime::View<'_> {
        match self {
            Positions::Slice(v) => *v,
            Positions::Copy(b) => b.view(),
        }
    }
}

/// Whether an attention kernel runs as PTX: on the GPU (not forced to host
/// kernels), at a head dim the kernels have (64, 128), with the bf16
/// operands `bf16` and the f32 accumulators `f32` they take. Otherwise the
/// CPU twin runs as a host kernel (f32 runs, the tiny presets' head dims).
fn attn_on_gpu(ctx: &Ctx<'_>, dims: &Dims, bf16: &[Tv<'_>], f32s: &[Tv<'_>]) -> bool {
    ctx.gpu
        && matches!(dims.d, 64 | 128)
        && bf16.iter().all(|t| t.dt == DType::BF16)
        && f32s.iter().all(|t| t.dt == DType::F32)
}

/// `(o, lse) = merge((o, lse), (o_j, lse_j))` over `rows` rows (all f32).
fn merge_partial(
    ctx: &Ctx<'_>,
    dims: &Dims,
    oj: Tv<'_>,
    lj: Tv<'_>,
    o: Tv<'_>,
    lse: Tv<'_>,
) -> Result<()> {
    let hd = dims.d;
    let flops = 4.0 * o.len() as f64;
    if ctx.gpu && [oj, lj, o, lse].iter().all(|t| t.dt == DType::F32) {
        let l = kernels::lse_merge(lse.len(), hd, o.addr(), lse.addr(), oj.addr(), lj.addr())?;
        super::ptx_launch(ctx.s(), &l, flops, &[oj.v, lj.v], &[o.v, lse.v])?;
        return Ok(());
    }
    kernel(
        ctx.s(),
        "lse_merge",
        flops,
        &[oj, lj],
        &[o, lse],
        move |i, out| {
            let (o, l) = out.split_at_mut(1);
            lse_merge(o[0], l[0], i[0], i[1], hd)
        },
    )
}

fn attn_pair(
    ctx: &Ctx<'_>,
    dims: &Dims,
    q: Tv<'_>,
    kv: Tv<'_>,
    causal: bool,
    o: Tv<'_>,
    lse: Tv<'_>,
) -> Result<()> {
    let shape = dims.shape();
    let half = dims.kn();
    let (k, v) = (kv.elems(0..half)?, kv.elems(half..2 * half)?);
    let flops = shape.fwd_flops() * if causal { 0.5 } else { 1.0 };
    let scale = dims.scale;
    if attn_on_gpu(ctx, dims, &[q, k, v], &[o, lse]) {
        let l = kernels::attn_fwd_chunk(
            &shape,
            causal,
            scale,
            DType::BF16,
            &AttnPtrs {
                q: q.addr(),
                k: k.addr(),
                v: v.addr(),
                o: o.addr(),
                lse: lse.addr(),
            },
        )?;
        super::ptx_launch(ctx.s(), &l, flops, &[q.v, k.v, v.v], &[o.v, lse.v])?;
        return Ok(());
    }
    kernel(
        ctx.s(),
        "attn_fwd",
        flops,
        &[q, k, v],
        &[o, lse],
        move |i, out| {
            let (o, l) = out.split_at_mut(1);
            attn_fwd_chunk(i[0], i[1], i[2], &shape, causal, scale, o[0], l[0])
        },
    )
}

/// Forward over all chunks: returns the residual stream after attention
/// (`x + attn(norm1(x))`, per chunk `[c, hidden]`) and what backward needs.
pub(crate) fn forward(
    ctx: &Ctx<'_>,
    lp: &LayerParams,
    xs: &[Stash],
) -> Result<(Vec<Stash>, Saved)> {
    let dm = Dims::new(ctx);
    let s = ctx.s();
    let comm: &dyn Communicator = ctx.comm;
    let ul = UlyssesAllToAll::new(
        comm,
        ctx.dev.clone(),
        UlyssesConfig::new(ctx.cfg.heads, ctx.cfg.kv_heads, dm.d, ctx.sched.ranks)?,
    )?;
    let mut saved = Saved {
        q: Vec::new(),
        kv: Vec::new(),
        o: Vec::new(),
        lse: Vec::new(),
        o_local: Vec::new(),
        x_mid: Vec::new(),
    };
    let mut outs = Vec::with_capacity(dm.u);
    let kv_bytes = 2 * dm.kn() * ctx.adt.size();
    let ab = ctx.adt.size();
    let dbuf = if ctx.sched.offload && dm.u > 1 {
        Some(DoubleBuffer::new(ctx.mover, kv_bytes, "kv slot")?)
    } else {
        None
    };
    for i in 0..dm.u {
        let x = xs.get(i).ok_or_else(|| missing("x", i))?.fetch(ctx.mover)?;
        let xv = x.view()?;
        // Projections of the local tokens.
        let hn = ctx.alloc_act(dm.c * dm.h, "attn norm")?;
        norm::forward(ctx, xv, &lp.norm1_w, &lp.norm1_b, hn.view(), dm.c)?;
        // q and k roped at their global positions as they are projected.
        let ql = ctx.alloc_act(dm.c * dm.qd, "q local")?;
        let kl = ctx.alloc_act(dm.c * dm.kvd, "k local")?;
        let vl = ctx.alloc_act(dm.c * dm.kvd, "v local")?;
        linear_rope_fwd(
            ctx,
            hn.view(),
            ctx.p(&lp.wq)?,
            bias(ctx, &lp.bq, false)?,
            ql.view(),
            dm.local_positions(i),
            ctx.cfg.heads,
            &dm,
        )?;
        linear_rope_fwd(
            ctx,
            hn.view(),
            ctx.p(&lp.wk)?,
            bias(ctx, &lp.bk, false)?,
            kl.view(),
            dm.local_positions(i),
            ctx.cfg.kv_heads,
            &dm,
        )?;
        linear_fwd(
            ctx,
            hn.view(),
            ctx.p(&lp.wv)?,
            bias(ctx, &lp.bv, false)?,
            vl.view(),
            dm.c,
            dm.h,
            dm.kvd,
        )?;
        drop(hn);
        // Head-parallel all-to-all: this rank's heads of the whole chunk.
        let q = ctx.alloc_act(dm.qn(), "q")?;
        ul.scatter_heads(s, Heads::Query, ab, ql.buf.view(), q.buf.view())?;
        let kv = ctx.alloc_act(2 * dm.kn(), "kv")?;
        let half = dm.kn();
        ul.scatter_heads(s, Heads::KeyValue, ab, kl.buf.view(), kv.elems(0..half)?.v)?;
        ul.scatter_heads(
            s,
            Heads::KeyValue,
            ab,
            vl.buf.view(),
            kv.elems(half..2 * half)?.v,
        )?;
        drop((ql, kl, vl));
        // q_i against kv_0..kv_i, merged online.
        let o = ctx.alloc(dm.qn(), "o acc")?;
        let lse = ctx.alloc(dm.big_c * dm.hl, "lse acc")?;
        if i == 0 {
            attn_pair(ctx, &dm, q.view(), kv.view(), true, o.view(), lse.view())?;
        } else {
            fill_neg_inf(ctx, lse.view())?;
            let oj = ctx.alloc(dm.qn(), "o part")?;
            let lj = ctx.alloc(dm.big_c * dm.hl, "lse part")?;
            let merge = |ctx: &Ctx<'_>| -> Result<()> {
                merge_partial(ctx, &dm, oj.view(), lj.view(), o.view(), lse.view())
            };
            match &dbuf {
                Some(db) => {
                    let host = |j: usize| {
                        saved
                            .kv
                            .get(j)
                            .and_then(Stash::host)
                            .ok_or_else(|| missing("kv (host)", j))
                    };
                    let mut next = Some(db.prefetch(host(0)?)?);
                    for j in 0..i {
                        let cur = next.take().ok_or_else(|| missing("kv prefetch", j))?;
                        let guard = cur.ready()?;
                        if j + 1 < i {
                            next = Some(db.prefetch(host(j + 1)?)?);
                        }
                        attn_pair(
                            ctx,
                            &dm,
                            q.view(),
                            Tv {
                                v: guard.view(),
                                dt: ctx.adt,
                            },
                            false,
                            oj.view(),
                            lj.view(),
                        )?;
                        merge(ctx)?;
                        drop(guard);
                    }
                }
                None => {
                    for j in 0..i {
                        let kvj = saved
                            .kv
                            .get(j)
                            .ok_or_else(|| missing("kv", j))?
                            .fetch(ctx.mover)?;
                        attn_pair(ctx, &dm, q.view(), kvj.view()?, false, oj.view(), lj.view())?;
                        merge(ctx)?;
                    }
                }
            }
            attn_pair(ctx, &dm, q.view(), kv.view(), true, oj.view(), lj.view())?;
            merge(ctx)?;
        }
        // The merged output in the activation dtype (what moves and is kept).
        let o = match ctx.narrowed(o.view(), "o")? {
            Some(narrow) => narrow,
            None => o,
        };
        // Back to this rank's tokens; output projection and residual.
        let ol = ctx.alloc_act(dm.c * dm.qd, "o local")?;
        ul.gather_heads(s, Heads::Query, ab, o.buf.view(), ol.buf.view())?;
        let xm = ctx.alloc_act(dm.c * dm.h, "x mid")?;
        linear_residual_fwd(
            ctx,
            ol.view(),
            ctx.p(&lp.wo)?,
            bias(ctx, &lp.bo, false)?,
            xv,
            xm.view(),
            dm.c,
            dm.qd,
            dm.h,
        )?;
        drop(x);
        saved.kv.push(ctx.stash(kv)?);
        saved.q.push(ctx.stash(q)?);
        saved.o.push(ctx.stash(o)?);
        saved.lse.push(ctx.stash(lse)?);
        saved.o_local.push(ctx.stash(ol)?);
        outs.push(ctx.stash(xm)?);
    }
    Ok((outs, saved))
}

fn fill_neg_inf(ctx: &Ctx<'_>, v: Tv<'_>) -> Result<()> {
    super::fill(ctx.s(), v, f32::NEG_INFINITY)
}

/// The query bundle of chunk q for the backward.
struct Bundle<'a> {
    q: Incoming<'a>,
    lse: Incoming<'a>,
    do_: Incoming<'a>,
    delta: Incoming<'a>,
}

struct Ready<'a> {
    q: Held<'a>,
    lse: Held<'a>,
    do_: Held<'a>,
    delta: Held<'a>,
}

/// Backward over all chunks. `dxm[i]` is the gradient of the residual
/// stream after attention (what [`forward`] returned); returns the gradient
/// of the layer input per chunk. Parameter gradients are accumulated.
pub(crate) fn backward(
    ctx: &Ctx<'_>,
    lp: &LayerParams,
    xs: &[Stash],
    saved: &Saved,
    dxm: &[Stash],
) -> Result<Vec<Stash>> {
    let dm = Dims::new(ctx);
    let s = ctx.s();
    // Gradients move between ranks in their own dtype.
    let gb = ctx.gdt.size();
    let mv = ctx.mover;
    let comm: &dyn Communicator = ctx.comm;
    let ul = UlyssesAllToAll::new(
        comm,
        ctx.dev.clone(),
        UlyssesConfig::new(ctx.cfg.heads, ctx.cfg.kv_heads, dm.d, ctx.sched.ranks)?,
    )?;
    let get = |v: &'_ [Stash], what: &str, i: usize| -> Result<()> {
        v.get(i).map(|_| ()).ok_or_else(|| missing(what, i))
    };
    // Phase A: output projection backward, dO to head-parallel, delta.
    let mut dos = Vec::with_capacity(dm.u);
    let mut deltas = Vec::with_capacity(dm.u);
    for i in 0..dm.u {
        get(dxm, "dx mid", i)?;
        get(&saved.o_local, "o local", i)?;
        get(&saved.o, "o", i)?;
        let g = dxm[i].fetch(mv)?;
        let ol = saved.o_local[i].fetch(mv)?;
        let dol = ctx.alloc_grad(dm.c * dm.qd, "do local")?;
        linear_bwd(
            ctx,
            g.view()?,
            ol.view()?,
            ctx.p(&lp.wo)?,
            Some((dol.view(), false)),
            ctx.g(&lp.wo)?,
            bias(ctx, &lp.bo, true)?,
            dm.c,
            dm.qd,
            dm.h,
        )?;
        drop((g, ol));
        let doh = ctx.alloc_grad(dm.qn(), "do")?;
        ul.scatter_heads(s, Heads::Query, gb, dol.buf.view(), doh.buf.view())?;
        drop(dol);
        let o = saved.o[i].fetch(mv)?;
        let delta = ctx.alloc(dm.big_c * dm.hl, "delta")?;
        let hd = dm.d;
        let (dov, ov, dlv) = (doh.view(), o.view()?, delta.view());
        let flops = 2.0 * dm.qn() as f64;
        if ctx.gpu && dov.dt == ov.dt && matches!(ov.dt, DType::BF16 | DType::F32) {
            let l = kernels::attn_delta(dlv.len(), hd, ov.dt, dov.addr(), ov.addr(), dlv.addr())?;
            super::ptx_launch(s, &l, flops, &[dov.v, ov.v], &[dlv.v])?;
        } else {
            kernel(s, "attn_delta", flops, &[dov, ov], &[dlv], move |i, out| {
                attn_delta(i[0], i[1], hd, out[0])
            })?;
        }
        drop(o);
        dos.push(ctx.stash(doh)?);
        deltas.push(ctx.stash(delta)?);
    }
    // Phase B: outer loop over kv chunks, inner over query chunks.
    let start = |qq: usize| -> Result<Bundle<'_>> {
        get(&saved.q, "q", qq)?;
        get(&saved.lse, "lse", qq)?;
        Ok(Bundle {
            q: saved.q[qq].start(mv)?,
            lse: saved.lse[qq].start(mv)?,
            do_: dos[qq].start(mv)?,
            delta: deltas[qq].start(mv)?,
        })
    };
    let mut dq: Vec<Option<Stash>> = (0..dm.u).map(|_| None).collect();
    let mut dxs = Vec::with_capacity(dm.u);
    let shape = dm.shape();
    let half = dm.kn();
    get(&saved.kv, "kv", 0)?;
    let mut kv_next = Some(saved.kv[0].start(mv)?);
    for i in 0..dm.u {
        let kv = kv_next.take().ok_or_else(|| missing("kv", i))?.ready(mv)?;
        if i + 1 < dm.u {
            get(&saved.kv, "kv", i + 1)?;
            kv_next = Some(saved.kv[i + 1].start(mv)?);
        }
        let dkv = ctx.zeros(2 * dm.kn(), "dkv")?;
        let mut dq_final: Option<Buf> = None;
        let mut next = Some(start(i)?);
        for qq in i..dm.u {
            let b = next.take().ok_or_else(|| missing("query bundle", qq))?;
            let cur = Ready {
                q: b.q.ready(mv)?,
                lse: b.lse.ready(mv)?,
                do_: b.do_.ready(mv)?,
                delta: b.delta.ready(mv)?,
            };
            if qq + 1 < dm.u {
                next = Some(start(qq + 1)?);
            }
            let dqb = match dq[qq].take() {
                Some(st) => st.take(mv)?,
                None => ctx.zeros(dm.qn(), "dq")?,
            };
            let causal = qq == i;
            let kvv = kv.view()?;
            let (k, v) = (kvv.elems(0..half)?, kvv.elems(half..2 * half)?);
            let (dk, dv) = (dkv.elems(0..half)?, dkv.elems(half..2 * half)?);
            let scale = dm.scale;
            let flops = 2.5 * shape.fwd_flops() * if causal { 0.5 } else { 1.0 };
            let (qv, lv, dov, dlv, dqv) = (
                cur.q.view()?,
                cur.lse.view()?,
                cur.do_.view()?,
                cur.delta.view()?,
                dqb.view(),
            );
            if attn_on_gpu(ctx, &dm, &[qv, k, v, dov], &[lv, dlv, dqv, dk, dv]) {
                let l = kernels::attn_bwd_chunk(
                    &shape,
                    causal,
                    scale,
                    DType::BF16,
                    &AttnBwdPtrs {
                        q: qv.addr(),
                        k: k.addr(),
                        v: v.addr(),
                        do_: dov.addr(),
                        lse: lv.addr(),
                        delta: dlv.addr(),
                        dq: dqv.addr(),
                        dk: dk.addr(),
                        dv: dv.addr(),
                    },
                )?;
                super::ptx_launch(
                    s,
                    &l,
                    flops,
                    &[qv.v, k.v, v.v, dov.v, lv.v, dlv.v],
                    &[dqv.v, dk.v, dv.v],
                )?;
            } else {
                kernel(
                    s,
                    "attn_bwd",
                    flops,
                    &[qv, k, v, lv, dov, dlv],
                    &[dqv, dk, dv],
                    move |a, o| {
                        let (dq, rest) = o.split_at_mut(1);
                        let (dk, dv) = rest.split_at_mut(1);
                        attn_bwd_chunk(
                            a[0], a[1], a[2], a[3], a[4], a[5], &shape, causal, scale, dq[0],
                            dk[0], dv[0],
                        )
                    },
                )?;
            }
            drop(cur);
            if causal {
                dq_final = Some(dqb);
            } else {
                dq[qq] = Some(ctx.stash(dqb)?);
            }
        }
        drop(kv);
        let dqb = dq_final.ok_or_else(|| missing("dq", i))?;
        // RoPE backward and back to this rank's tokens.
        let dqr = ctx.alloc_grad(dm.qn(), "dq roped")?;
        rope_backward(ctx, dqb.view(), dqr.view(), dm.positions(i), dm.hl, &dm)?;
        drop(dqb);
        let dkr = ctx.alloc_grad(dm.kn(), "dk roped")?;
        rope_backward(
            ctx,
            dkv.elems(0..half)?,
            dkr.view(),
            dm.positions(i),
            dm.kvl,
            &dm,
        )?;
        let dql = ctx.alloc_grad(dm.c * dm.qd, "dq local")?;
        ul.gather_heads(s, Heads::Query, gb, dqr.buf.view(), dql.buf.view())?;
        let dkl = ctx.alloc_grad(dm.c * dm.kvd, "dk local")?;
        ul.gather_heads(s, Heads::KeyValue, gb, dkr.buf.view(), dkl.buf.view())?;
        let dvl = ctx.alloc_grad(dm.c * dm.kvd, "dv local")?;
        let dv_act = ctx.narrowed_to(dkv.elems(half..2 * half)?, ctx.gdt, "dv")?;
        let dv = match &dv_act {
            Some(b) => b.view(),
            None => dkv.elems(half..2 * half)?,
        };
        ul.gather_heads(s, Heads::KeyValue, gb, dv.v, dvl.buf.view())?;
        drop((dqr, dkr, dv_act, dkv));
        // QKV projection and norm backward, x_i fetched again.
        get(xs, "x", i)?;
        let x = xs[i].fetch(mv)?;
        let hn = ctx.alloc_act(dm.c * dm.h, "attn norm")?;
        norm::forward(ctx, x.view()?, &lp.norm1_w, &lp.norm1_b, hn.view(), dm.c)?;
        let dhn = ctx.alloc_grad(dm.c * dm.h, "attn norm grad")?;
        let parts = [
            (&dql, &lp.wq, &lp.bq, dm.qd),
            (&dkl, &lp.wk, &lp.bk, dm.kvd),
            (&dvl, &lp.wv, &lp.bv, dm.kvd),
        ];
        for (dy, w, b, out) in parts {
            linear_bwd(
                ctx,
                dy.view(),
                hn.view(),
                ctx.p(w)?,
                None,
                ctx.g(w)?,
                bias(ctx, b, true)?,
                dm.c,
                dm.h,
                out,
            )?;
        }
        // dhn as the fused QKV projection's dgrad: one rounding.
        let dgrad_parts = [
            (dql.view(), ctx.p(&lp.wq)?, dm.qd),
            (dkl.view(), ctx.p(&lp.wk)?, dm.kvd),
            (dvl.view(), ctx.p(&lp.wv)?, dm.kvd),
        ];
        linear_dgrad_sum(ctx, &dgrad_parts, dhn.view(), dm.c, dm.h)?;
        drop((dql, dkl, dvl, hn));
        let g = dxm[i].fetch(mv)?;
        let dx = ctx.alloc_grad(dm.c * dm.h, "dx")?;
        super::copy(s, g.view()?, dx.view())?;
        drop(g);
        norm::backward(
            ctx,
            x.view()?,
            dhn.view(),
            &lp.norm1_w,
            &lp.norm1_b,
            dx.view(),
            true,
            dm.c,
        )?;
        drop(x);
        dxs.push(ctx.stash(dx)?);
    }
    Ok(dxs)
}
