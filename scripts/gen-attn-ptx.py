#!/usr/bin/env python3
"""Writes ptx/kernels/attn_fwd.ptx: the flash-attention forward for one
(q chunk, kv chunk) pair, hand-written PTX whose register-level unrolling
(fragments of mma.m16n8k16 cannot be indexed) is expanded by this script.

Design (per CTA: one q head, 64 query rows; 4 warps of 16 rows each):
- Q tile staged through shared memory with cp.async, then held in registers
  as mma A fragments (ldmatrix.x4).
- K and V tiles of 32 keys, double-buffered in shared memory with cp.async
  (the next tile's copy overlaps this tile's math); 16-byte chunks XOR
  swizzled by (row % 8) so ldmatrix reads are conflict-free.
- S = Q K^T with mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, K
  fragments by ldmatrix (non-transposed); online softmax in base 2 (running
  max and sum per row, quad shuffles); P converted to bf16 A fragments in
  registers; O += P V with V fragments by ldmatrix.trans.
- Tails: rows past q_tokens and keys past kv_tokens are zero-filled by
  cp.async (src-size 0) and masked; causal masks key > query (local
  indices, the diagonal pair).
- Writes the normalized partial O (f32) and LSE (f32, natural log).

Parameters: q, k, v (bf16), o, lse (f32) pointers; q_tokens, kv_tokens,
heads, kv_heads, causal (u32); scale (f32). Grid (ceil(q_tokens/64), heads),
block 128, dynamic shared memory 2 * 2 * 32 * D * 2 bytes.
"""
import sys

BQ, BK, WARPS = 64, 32, 4


def gen(D):
    NT_S = BK // 8          # n-tiles of S per warp
    KS_Q = D // 16          # k-steps over the head dim
    NT_O = D // 8           # n-tiles of O
    KS_P = BK // 16         # k-steps over the keys
    CH = D // 8             # 16-byte chunks per row
    TILE = BK * D * 2       # bytes of one K (or V) tile
    L = []
    e = L.append
    name = f"attn_fwd_d{D}"
    e(f"// {name}: see scripts/gen-attn-ptx.py for the design.")
    e(f".visible .entry {name}(")
    e("    .param .u64 p_q, .param .u64 p_k, .param .u64 p_v, .param .u64 p_o, .param .u64 p_lse,")
    e("    .param .u32 p_qt, .param .u32 p_kt, .param .u32 p_h, .param .u32 p_kvh, .param .u32 p_causal,")
    e("    .param .f32 p_scale)")
    e(".maxntid 128, 1, 1")
    e("{")
    e("    .reg .pred %p<8>;")
    e("    .reg .b32 %r<64>;")
    e("    .reg .b64 %rd<24>;")
    e("    .reg .f32 %f<48>;")
    e(f"    .reg .b32 %qa<{KS_Q * 4}>;")
    e(f"    .reg .f32 %s<{NT_S * 4}>;")
    e(f"    .reg .f32 %o<{NT_O * 4}>;")
    e(f"    .reg .b32 %pa<{KS_P * 4}>;")
    e("    .reg .b32 %kb<4>;")
    e("    .reg .f32 %m<2>;")
    e("    .reg .f32 %l<2>;")
    e("    .reg .f32 %al<2>;")
    e("    .reg .f32 %mu<2>;")
    # Parameters.
    e("    ld.param.u64 %rd1, [p_q];")
    e("    ld.param.u64 %rd2, [p_k];")
    e("    ld.param.u64 %rd3, [p_v];")
    e("    ld.param.u64 %rd4, [p_o];")
    e("    ld.param.u64 %rd5, [p_lse];")
    e("    cvta.to.global.u64 %rd1, %rd1;")
    e("    cvta.to.global.u64 %rd2, %rd2;")
    e("    cvta.to.global.u64 %rd3, %rd3;")
    e("    cvta.to.global.u64 %rd4, %rd4;")
    e("    cvta.to.global.u64 %rd5, %rd5;")
    e("    ld.param.u32 %r1, [p_qt];")
    e("    ld.param.u32 %r2, [p_kt];")
    e("    ld.param.u32 %r3, [p_h];")
    e("    ld.param.u32 %r4, [p_kvh];")
    e("    ld.param.u32 %r5, [p_causal];")
    e("    ld.param.f32 %f1, [p_scale];")
    e("    mul.f32 %f1, %f1, 0f3FB8AA3B;          // scale * log2(e)")
    e("    mov.u32 %r6, %tid.x;")
    e("    shr.u32 %r7, %r6, 5;                   // warp")
    e("    and.b32 %r8, %r6, 31;                  // lane")
    e("    shr.u32 %r9, %r8, 2;                   // groupID")
    e("    and.b32 %r10, %r8, 3;                  // threadID_in_group")
    e("    mov.u32 %r11, %ctaid.x;")
    e(f"    mul.lo.u32 %r11, %r11, {BQ};            // i0")
    e("    mov.u32 %r12, %ctaid.y;                // h")
    e("    div.u32 %r13, %r3, %r4;                // group = heads / kv_heads")
    e("    div.u32 %r13, %r12, %r13;              // g = h / group")
    e("    mov.u32 %r14, smem;                    // shared base")
    # Q row stride (bytes) = heads*D*2; K row stride = kv_heads*D*2.
    e(f"    mul.lo.u32 %r15, %r3, {D * 2};          // q token stride, bytes")
    e(f"    mul.lo.u32 %r16, %r4, {D * 2};          // kv token stride, bytes")
    e(f"    mul.wide.u32 %rd6, %r12, {D * 2};")
    e("    add.u64 %rd6, %rd1, %rd6;              // q + h*D")
    e(f"    mul.wide.u32 %rd7, %r13, {D * 2};")
    e("    add.u64 %rd8, %rd2, %rd7;              // k + g*D")
    e("    add.u64 %rd9, %rd3, %rd7;              // v + g*D")
    # Stage Q: BQ*CH chunks, 128 threads.
    e("    // Stage the Q tile (zero-filled past q_tokens) into shared memory.")
    for it in range(BQ * CH // 128):
        e(f"    add.u32 %r20, %r6, {it * 128};")
        e(f"    shr.u32 %r21, %r20, {CH.bit_length() - 1};   // row")
        e(f"    and.b32 %r22, %r20, {CH - 1};                // chunk")
        e("    add.u32 %r23, %r11, %r21;")
        e("    setp.lt.u32 %p1, %r23, %r1;")
        e("    selp.u32 %r24, 16, 0, %p1;")
        e("    selp.u32 %r23, %r23, 0, %p1;")
        e("    mul.wide.u32 %rd10, %r23, %r15;")
        e("    mul.wide.u32 %rd11, %r22, 16;")
        e("    add.u64 %rd10, %rd10, %rd11;")
        e("    add.u64 %rd10, %rd6, %rd10;")
        e("    and.b32 %r25, %r21, 7;")
        e("    xor.b32 %r25, %r22, %r25;")
        e(f"    mad.lo.u32 %r26, %r21, {D * 2}, %r14;")
        e("    mad.lo.u32 %r26, %r25, 16, %r26;")
        e("    cp.async.cg.shared.global [%r26], [%rd10], 16, %r24;")
    e("    cp.async.commit_group;")
    e("    cp.async.wait_group 0;")
    e("    bar.sync 0;")
    # ldmatrix Q fragments: row = warp*16 + (lane%8) + 8*((lane/8)%2), chunk = 2t + lane/16.
    e("    and.b32 %r27, %r8, 7;")
    e("    shr.u32 %r28, %r8, 3;")
    e("    and.b32 %r28, %r28, 1;")
    e("    mad.lo.u32 %r27, %r28, 8, %r27;")
    e("    mad.lo.u32 %r27, %r7, 16, %r27;        // row of this lane's address")
    e("    shr.u32 %r29, %r8, 4;                  // lane / 16")
    e("    and.b32 %r30, %r27, 7;")
    for t in range(KS_Q):
        e(f"    add.u32 %r31, %r29, {2 * t};")
        e("    xor.b32 %r31, %r31, %r30;")
        e(f"    mad.lo.u32 %r32, %r27, {D * 2}, %r14;")
        e("    mad.lo.u32 %r32, %r31, 16, %r32;")
        q = [f"%qa{4 * t + i}" for i in range(4)]
        e(f"    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{{', '.join(q)}}}, [%r32];")
    e("    bar.sync 0;")
    # Init accumulators.
    for i in range(NT_O * 4):
        e(f"    mov.f32 %o{i}, 0f00000000;")
    e("    mov.f32 %m0, 0fFF800000;")
    e("    mov.f32 %m1, 0fFF800000;")
    e("    mov.f32 %l0, 0f00000000;")
    e("    mov.f32 %l1, 0f00000000;")
    # kv_end and tiles.
    e("    // kv_end = causal ? min(i0 + 64, kv_tokens) : kv_tokens")
    e(f"    add.u32 %r33, %r11, {BQ};")
    e("    min.u32 %r33, %r33, %r2;")
    e("    setp.ne.u32 %p2, %r5, 0;")
    e("    selp.u32 %r33, %r33, %r2, %p2;")
    e(f"    add.u32 %r34, %r33, {BK - 1};")
    e(f"    shr.u32 %r34, %r34, {BK.bit_length() - 1};  // tiles")
    e("    mov.u32 %r35, 0;                       // tile j")
    # Query rows of this thread (for masking): qi0 = i0 + warp*16 + g, qi1 = qi0 + 8.
    e("    mad.lo.u32 %r36, %r7, 16, %r11;")
    e("    add.u32 %r36, %r36, %r9;               // qi0")
    e("    add.u32 %r37, %r36, 8;                 // qi1")

    def load_tile(jreg, bufreg):
        # K and V rows j*BK .. +BK into buffer bufreg (0/1): K at buf*2*TILE, V at +TILE.
        e(f"    mad.lo.u32 %r40, {bufreg}, {2 * TILE}, %r14;")
        for it in range(BK * CH // 128):
            e(f"    add.u32 %r20, %r6, {it * 128};")
            e(f"    shr.u32 %r21, %r20, {CH.bit_length() - 1};")
            e(f"    and.b32 %r22, %r20, {CH - 1};")
            e(f"    mad.lo.u32 %r23, {jreg}, {BK}, %r21;")
            e("    setp.lt.u32 %p1, %r23, %r2;")
            e("    selp.u32 %r24, 16, 0, %p1;")
            e("    selp.u32 %r23, %r23, 0, %p1;")
            e("    mul.wide.u32 %rd10, %r23, %r16;")
            e("    mul.wide.u32 %rd11, %r22, 16;")
            e("    add.u64 %rd10, %rd10, %rd11;")
            e("    add.u64 %rd12, %rd8, %rd10;")
            e("    add.u64 %rd13, %rd9, %rd10;")
            e("    and.b32 %r25, %r21, 7;")
            e("    xor.b32 %r25, %r22, %r25;")
            e(f"    mad.lo.u32 %r26, %r21, {D * 2}, %r40;")
            e("    mad.lo.u32 %r26, %r25, 16, %r26;")
            e("    cp.async.cg.shared.global [%r26], [%rd12], 16, %r24;")
            e(f"    add.u32 %r26, %r26, {TILE};")
            e("    cp.async.cg.shared.global [%r26], [%rd13], 16, %r24;")
        e("    cp.async.commit_group;")

    e("    setp.eq.u32 %p3, %r34, 0;")
    e("    @%p3 bra FINISH;")
    e("    mov.u32 %r41, 0;")
    load_tile("%r35", "%r41")
    e("TILE_LOOP:")
    e("    add.u32 %r42, %r35, 1;")
    e("    setp.lt.u32 %p4, %r42, %r34;")
    e("    @!%p4 bra NO_PREFETCH;")
    e("    and.b32 %r41, %r42, 1;")
    load_tile("%r42", "%r41")
    e("    cp.async.wait_group 1;")
    e("    bra.uni PREFETCHED;")
    e("NO_PREFETCH:")
    e("    cp.async.wait_group 0;")
    e("PREFETCHED:")
    e("    bar.sync 0;")
    e("    and.b32 %r43, %r35, 1;")
    e(f"    mad.lo.u32 %r44, %r43, {2 * TILE}, %r14;   // K tile base")
    e(f"    add.u32 %r45, %r44, {TILE};                  // V tile base")
    # S = Q K^T.
    for i in range(NT_S * 4):
        e(f"    mov.f32 %s{i}, 0f00000000;")
    # K ldmatrix lane address: row = nt*8 + lane%8, chunk = 2t + lane/8 (ksteps t, t+1).
    e("    and.b32 %r46, %r8, 7;                  // lane % 8")
    e("    shr.u32 %r47, %r8, 3;                  // lane / 8")
    for nt in range(NT_S):
        for t in range(0, KS_Q, 2):
            e(f"    add.u32 %r48, %r46, {nt * 8};")
            e(f"    add.u32 %r49, %r47, {2 * t};")
            e("    and.b32 %r50, %r48, 7;")
            e("    xor.b32 %r49, %r49, %r50;")
            e(f"    mad.lo.u32 %r51, %r48, {D * 2}, %r44;")
            e("    mad.lo.u32 %r51, %r49, 16, %r51;")
            e("    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%kb0, %kb1, %kb2, %kb3}, [%r51];")
            for tt, (b0, b1) in ((t, ("%kb0", "%kb1")), (t + 1, ("%kb2", "%kb3"))):
                s = ", ".join(f"%s{nt * 4 + i}" for i in range(4))
                a = ", ".join(f"%qa{tt * 4 + i}" for i in range(4))
                e(f"    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{s}}}, {{{a}}}, {{{b0}, {b1}}}, {{{s}}};")
    # Scale and mask. key = j*BK + nt*8 + tig*2 + c; row0 uses s[4nt+0..1], row1 s[4nt+2..3].
    e(f"    mul.lo.u32 %r52, %r35, {BK};")
    e("    mad.lo.u32 %r52, %r10, 2, %r52;        // key of column 0 of this thread")
    for nt in range(NT_S):
        for c in range(2):
            e(f"    add.u32 %r53, %r52, {nt * 8 + c};")
            e("    setp.ge.u32 %p5, %r53, %r2;        // past kv_tokens")
            for half, q in ((0, "%r36"), (1, "%r37")):
                idx = nt * 4 + half * 2 + c
                e(f"    setp.gt.u32 %p6, %r53, {q};")
                e("    and.pred %p6, %p6, %p2;")
                e("    or.pred %p6, %p6, %p5;")
                e(f"    mul.f32 %s{idx}, %s{idx}, %f1;")
                e(f"    selp.f32 %s{idx}, 0fFF800000, %s{idx}, %p6;")
    # Online softmax per row half.
    for half in range(2):
        vals = [f"%s{nt * 4 + half * 2 + c}" for nt in range(NT_S) for c in range(2)]
        e(f"    mov.f32 %f2, {vals[0]};")
        for v in vals[1:]:
            e(f"    max.f32 %f2, %f2, {v};")
        e("    shfl.sync.bfly.b32 %f3, %f2, 1, 0x1f, 0xffffffff;")
        e("    max.f32 %f2, %f2, %f3;")
        e("    shfl.sync.bfly.b32 %f3, %f2, 2, 0x1f, 0xffffffff;")
        e("    max.f32 %f2, %f2, %f3;")
        e(f"    max.f32 %f2, %f2, %m{half};          // m_new")
        # mu = m_new == -inf ? 0 : m_new (a fully masked row stays all-zero).
        e("    setp.eq.f32 %p7, %f2, 0fFF800000;")
        e(f"    selp.f32 %mu{half}, 0f00000000, %f2, %p7;")
        e(f"    sub.f32 %f4, %m{half}, %mu{half};")
        e(f"    ex2.approx.ftz.f32 %al{half}, %f4;")
        e(f"    mov.f32 %m{half}, %f2;")
        e("    mov.f32 %f5, 0f00000000;")
        for v in vals:
            e(f"    sub.f32 {v}, {v}, %mu{half};")
            e(f"    ex2.approx.ftz.f32 {v}, {v};")
            e(f"    add.f32 %f5, %f5, {v};")
        e(f"    fma.rn.f32 %l{half}, %l{half}, %al{half}, %f5;")
        for dn in range(NT_O):
            for c in range(2):
                i = dn * 4 + half * 2 + c
                e(f"    mul.f32 %o{i}, %o{i}, %al{half};")
    # P -> bf16 A fragments: kstep kt covers n-tiles 2kt, 2kt+1.
    for kt in range(KS_P):
        a, b = 2 * kt, 2 * kt + 1
        pairs = [(a * 4 + 0, a * 4 + 1), (a * 4 + 2, a * 4 + 3), (b * 4 + 0, b * 4 + 1), (b * 4 + 2, b * 4 + 3)]
        for i, (lo, hi) in enumerate(pairs):
            e(f"    cvt.rn.bf16x2.f32 %pa{kt * 4 + i}, %s{hi}, %s{lo};")
    # O += P V: V ldmatrix.trans lane address: row = kt*16 + lane%8 + 8*((lane/8)%2), chunk = dn + lane/16.
    e("    and.b32 %r54, %r47, 1;")
    e("    mad.lo.u32 %r54, %r54, 8, %r46;        // lane%8 + 8*((lane/8)%2)")
    e("    shr.u32 %r55, %r8, 4;                  // lane / 16")
    for kt in range(KS_P):
        for dn in range(0, NT_O, 2):
            e(f"    add.u32 %r56, %r54, {kt * 16};")
            e(f"    add.u32 %r57, %r55, {dn};")
            e("    and.b32 %r58, %r56, 7;")
            e("    xor.b32 %r57, %r57, %r58;")
            e(f"    mad.lo.u32 %r59, %r56, {D * 2}, %r45;")
            e("    mad.lo.u32 %r59, %r57, 16, %r59;")
            e("    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%kb0, %kb1, %kb2, %kb3}, [%r59];")
            a = ", ".join(f"%pa{kt * 4 + i}" for i in range(4))
            for d2, (b0, b1) in ((dn, ("%kb0", "%kb1")), (dn + 1, ("%kb2", "%kb3"))):
                o = ", ".join(f"%o{d2 * 4 + i}" for i in range(4))
                e(f"    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{o}}}, {{{a}}}, {{{b0}, {b1}}}, {{{o}}};")
    e("    bar.sync 0;                            // buffer j%2 is free for tile j+2")
    e("    add.u32 %r35, %r35, 1;")
    e("    setp.lt.u32 %p4, %r35, %r34;")
    e("    @%p4 bra TILE_LOOP;")
    e("FINISH:")
    # Reduce l over the quad, normalize, store.
    for half, q in ((0, "%r36"), (1, "%r37")):
        e(f"    shfl.sync.bfly.b32 %f6, %l{half}, 1, 0x1f, 0xffffffff;")
        e(f"    add.f32 %l{half}, %l{half}, %f6;")
        e(f"    shfl.sync.bfly.b32 %f6, %l{half}, 2, 0x1f, 0xffffffff;")
        e(f"    add.f32 %l{half}, %l{half}, %f6;")
        e(f"    setp.gt.f32 %p5, %l{half}, 0f00000000;")
        e(f"    rcp.rn.f32 %f7, %l{half};")
        e("    selp.f32 %f7, %f7, 0f00000000, %p5;")
        e(f"    lg2.approx.ftz.f32 %f8, %l{half};")
        e(f"    add.f32 %f8, %f8, %m{half};")
        e("    mul.f32 %f8, %f8, 0f3F317218;          // * ln 2")
        e("    selp.f32 %f8, %f8, 0fFF800000, %p5;")
        e(f"    setp.lt.u32 %p6, {q}, %r1;")
        e(f"    @!%p6 bra SKIP_ROW{half};")
        # o row address: o + ((qi*heads + h)*D)*4
        e(f"    mad.lo.u32 %r60, {q}, %r3, %r12;")
        e(f"    mul.wide.u32 %rd14, %r60, {D * 4};")
        e("    add.u64 %rd14, %rd4, %rd14;")
        e("    mul.wide.u32 %rd15, %r10, 8;")
        e("    add.u64 %rd14, %rd14, %rd15;")
        for dn in range(NT_O):
            i = dn * 4 + half * 2
            e(f"    mul.f32 %f9, %o{i}, %f7;")
            e(f"    mul.f32 %f10, %o{i + 1}, %f7;")
            e(f"    st.global.v2.f32 [%rd14+{dn * 32}], {{%f9, %f10}};")
        e("    setp.eq.u32 %p7, %r10, 0;")
        e("    mul.wide.u32 %rd16, %r60, 4;")
        e("    add.u64 %rd16, %rd5, %rd16;")
        e("    @%p7 st.global.f32 [%rd16], %f8;")
        e(f"SKIP_ROW{half}:")
    e("    ret;")
    e("}")
    return "\n".join(L)



def gen_bwd(D, KB=64):
    """Backward of one pair. Per CTA: one q head h and KB keys (KB/16 warps
    of 16 keys; KB = 64 or 128); K and V tiles stay in shared memory; loop over q tiles of BQB
    rows staged (Q, dO) with cp.async. Per warp and q tile:
    S^T = K_w Q^T, P^T = exp2(S^T - lse2), dP^T = V_w dO^T,
    dS^T = P^T (dP^T - delta); dV += P^T dO, dK += dS^T Q (A operands from
    the accumulators in registers, B by ldmatrix.trans); dS^T goes to shared
    memory as bf16 and, after a CTA barrier, comes back transposed
    (ldmatrix.trans) as the A operand of dQ = dS K over all KB keys, each
    warp an equal share of the head dim, added to global memory with red.add. dK (scaled)
    and dV are added with red.add at the end (GQA: q heads share kv heads)."""
    BQB = 32 if D == 64 else 16
    KS = D // 16
    NTQ = BQB // 8          # n-tiles over queries in S^T
    KSQ = BQB // 16         # k-steps over queries (dV, dK) / m-tiles of dQ
    NTD = D // 8
    WARPS = KB // 16
    NTH = 32 * WARPS        # threads per CTA
    NTW = NTD // WARPS      # n-tiles of dQ per warp (each warp owns D/WARPS columns)
    assert NTW >= 2 and NTW % 2 == 0, (D, KB)
    CH = D // 8
    KT = KB * D * 2         # bytes of the K (or V) tile
    QT = BQB * D * 2        # bytes of the Q (or dO) tile
    DS = 16 * BQB * 2       # bytes of one warp's dS^T
    L = []
    e = L.append
    name = f"attn_bwd_d{D}" + ("" if KB == 64 else f"_k{KB}")
    e(f"// {name}: see gen_bwd in scripts/gen-attn-ptx.py for the design.")
    e(f".visible .entry {name}(")
    e("    .param .u64 p_q, .param .u64 p_k, .param .u64 p_v, .param .u64 p_do, .param .u64 p_lse,")
    e("    .param .u64 p_delta, .param .u64 p_dq, .param .u64 p_dk, .param .u64 p_dv,")
    e("    .param .u32 p_qt, .param .u32 p_kt, .param .u32 p_h, .param .u32 p_kvh, .param .u32 p_causal,")
    e("    .param .f32 p_scale)")
    e(f".maxntid {NTH}, 1, 1")
    e("{")
    e("    .reg .pred %p<8>;")
    e("    .reg .b32 %r<80>;")
    e("    .reg .b64 %rd<32>;")
    e("    .reg .f32 %f<32>;")
    e(f"    .reg .f32 %dk<{NTD * 4}>;")
    e(f"    .reg .f32 %dv<{NTD * 4}>;")
    e(f"    .reg .f32 %s<{NTQ * 4}>;")
    e(f"    .reg .f32 %dp<{NTQ * 4}>;")
    e("    .reg .b32 %a<4>;")
    e("    .reg .b32 %b<4>;")
    e(f"    .reg .b32 %pa<{KSQ * 4}>;")
    e(f"    .reg .b32 %sa<{KSQ * 4}>;")
    e(f"    .reg .f32 %c<{NTW * 4}>;")
    e(f"    .reg .f32 %lq<{NTQ * 2}>;")
    e(f"    .reg .f32 %dlt<{NTQ * 2}>;")
    for i, n in enumerate(["q", "k", "v", "do", "lse", "delta", "dq", "dk", "dv"]):
        e(f"    ld.param.u64 %rd{i + 1}, [p_{n}];")
        e(f"    cvta.to.global.u64 %rd{i + 1}, %rd{i + 1};")
    e("    ld.param.u32 %r1, [p_qt];")
    e("    ld.param.u32 %r2, [p_kt];")
    e("    ld.param.u32 %r3, [p_h];")
    e("    ld.param.u32 %r4, [p_kvh];")
    e("    ld.param.u32 %r5, [p_causal];")
    e("    ld.param.f32 %f1, [p_scale];")
    e("    mul.f32 %f2, %f1, 0f3FB8AA3B;          // scale * log2(e)")
    e("    mov.u32 %r6, %tid.x;")
    e("    shr.u32 %r7, %r6, 5;                   // warp")
    e("    and.b32 %r8, %r6, 31;                  // lane")
    e("    shr.u32 %r9, %r8, 2;                   // groupID")
    e("    and.b32 %r10, %r8, 3;                  // threadID_in_group")
    e("    mov.u32 %r11, %ctaid.x;")
    e(f"    shl.b32 %r11, %r11, {KB.bit_length() - 1};                 // j0 (first key of the CTA)")
    e("    mov.u32 %r12, %ctaid.y;                // h")
    e("    div.u32 %r13, %r3, %r4;")
    e("    div.u32 %r13, %r12, %r13;              // g")
    e("    mov.u32 %r14, smem;                    // K tile")
    e(f"    add.u32 %r15, %r14, {KT};             // V tile")
    e(f"    add.u32 %r16, %r15, {KT};             // Q tile")
    e(f"    add.u32 %r17, %r16, {QT};             // dO tile")
    e(f"    add.u32 %r18, %r17, {QT};")
    e(f"    mad.lo.u32 %r18, %r7, {DS}, %r18;      // this warp's dS^T")
    e(f"    mul.lo.u32 %r19, %r3, {D * 2};          // q token stride, bytes")
    e(f"    mul.lo.u32 %r20, %r4, {D * 2};          // kv token stride, bytes")
    e(f"    mul.wide.u32 %rd10, %r12, {D * 2};")
    e("    add.u64 %rd11, %rd1, %rd10;            // q + h*D")
    e("    add.u64 %rd12, %rd4, %rd10;            // do + h*D")
    e(f"    mul.wide.u32 %rd13, %r13, {D * 2};")
    e("    add.u64 %rd14, %rd2, %rd13;            // k + g*D")
    e("    add.u64 %rd15, %rd3, %rd13;            // v + g*D")
    e("    and.b32 %r21, %r8, 7;                  // lane % 8")
    e("    shr.u32 %r22, %r8, 3;                  // lane / 8")
    e("    and.b32 %r23, %r22, 1;")
    e("    mad.lo.u32 %r23, %r23, 8, %r21;        // lane%8 + 8*((lane/8)%2)")
    e("    shr.u32 %r24, %r8, 4;                  // lane / 16")

    def stage(tile_reg, rows, first_row, limit, src_base, stride, tmp_base):
        assert rows * CH % NTH == 0
        for it in range(rows * CH // NTH):
            e(f"    add.u32 %r40, %r6, {it * NTH};")
            e(f"    shr.u32 %r41, %r40, {CH.bit_length() - 1};")
            e(f"    and.b32 %r42, %r40, {CH - 1};")
            e(f"    add.u32 %r43, {first_row}, %r41;")
            e(f"    setp.lt.u32 %p1, %r43, {limit};")
            e("    selp.u32 %r44, 16, 0, %p1;")
            e("    selp.u32 %r43, %r43, 0, %p1;")
            e(f"    mul.wide.u32 %rd16, %r43, {stride};")
            e("    mul.wide.u32 %rd17, %r42, 16;")
            e("    add.u64 %rd16, %rd16, %rd17;")
            e(f"    add.u64 %rd16, {src_base}, %rd16;")
            e("    and.b32 %r45, %r41, 7;")
            e("    xor.b32 %r45, %r42, %r45;")
            e(f"    mad.lo.u32 %r46, %r41, {D * 2}, {tile_reg};")
            e("    mad.lo.u32 %r46, %r45, 16, %r46;")
            e("    cp.async.cg.shared.global [%r46], [%rd16], 16, %r44;")

    def sw_addr(dst, tile_reg, row_reg, chunk_reg):
        e(f"    and.b32 %r47, {row_reg}, 7;")
        e(f"    xor.b32 %r48, {chunk_reg}, %r47;")
        e(f"    mad.lo.u32 {dst}, {row_reg}, {D * 2}, {tile_reg};")
        e(f"    mad.lo.u32 {dst}, %r48, 16, {dst};")

    e(f"    // K and V tiles of the CTA's {KB} keys (zero past kv_tokens).")
    stage("%r14", KB, "%r11", "%r2", "%rd14", "%r20", None)
    stage("%r15", KB, "%r11", "%r2", "%rd15", "%r20", None)
    e("    cp.async.commit_group;")
    for i in range(NTD * 4):
        e(f"    mov.f32 %dk{i}, 0f00000000;")
        e(f"    mov.f32 %dv{i}, 0f00000000;")
    e("    // Keys of this thread's accumulator rows.")
    e("    mad.lo.u32 %r25, %r7, 16, %r11;")
    e("    add.u32 %r25, %r25, %r9;               // key0")
    e("    add.u32 %r26, %r25, 8;                 // key1")
    e("    // First q tile: causal pairs skip queries before j0.")
    e(f"    div.u32 %r27, %r11, {BQB};")
    e(f"    mul.lo.u32 %r27, %r27, {BQB};")
    e("    setp.ne.u32 %p2, %r5, 0;")
    e("    selp.u32 %r27, %r27, 0, %p2;           // i0")
    e("QTILE:")
    e("    setp.ge.u32 %p3, %r27, %r1;")
    e("    @%p3 bra QDONE;")
    stage("%r16", BQB, "%r27", "%r1", "%rd11", "%r19", None)
    stage("%r17", BQB, "%r27", "%r1", "%rd12", "%r19", None)
    e("    cp.async.commit_group;")
    e("    cp.async.wait_group 0;")
    e("    bar.sync 0;")
    # lse2 and delta for this thread's query columns: q = i0 + nt*8 + tig*2 + c
    for nt in range(NTQ):
        for c in range(2):
            i = nt * 2 + c
            e(f"    mad.lo.u32 %r49, %r10, 2, %r27;")
            e(f"    add.u32 %r49, %r49, {nt * 8 + c};")
            e("    setp.lt.u32 %p4, %r49, %r1;")
            e("    selp.u32 %r50, %r49, 0, %p4;")
            e("    mad.lo.u32 %r50, %r50, %r3, %r12;")
            e("    mul.wide.u32 %rd18, %r50, 4;")
            e("    add.u64 %rd19, %rd5, %rd18;")
            e("    add.u64 %rd20, %rd6, %rd18;")
            e(f"    ld.global.f32 %lq{i}, [%rd19];")
            e(f"    mul.f32 %lq{i}, %lq{i}, 0f3FB8AA3B;")
            e(f"    ld.global.f32 %dlt{i}, [%rd20];")
    # S^T = K_w Q^T and dP^T = V_w dO^T.
    for i in range(NTQ * 4):
        e(f"    mov.f32 %s{i}, 0f00000000;")
        e(f"    mov.f32 %dp{i}, 0f00000000;")
    e("    mad.lo.u32 %r51, %r7, 16, %r23;        // A row: warp*16 + lane%8 + 8*((lane/8)%2)")
    for t in range(KS):
        e(f"    add.u32 %r52, %r24, {2 * t};")
        for tile, acc, btile in (("%r14", "%s", "%r16"), ("%r15", "%dp", "%r17")):
            sw_addr("%r53", tile, "%r51", "%r52")
            e("    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%a0, %a1, %a2, %a3}, [%r53];")
            for nt in range(NTQ):
                if t % 2 == 0:
                    pass
                e(f"    add.u32 %r54, %r21, {nt * 8};")
                e(f"    add.u32 %r55, %r22, {2 * (t - t % 2)};")
                sw_addr("%r56", btile, "%r54", "%r55")
                e("    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%b0, %b1, %b2, %b3}, [%r56];")
                bb = "%b0, %b1" if t % 2 == 0 else "%b2, %b3"
                cc = ", ".join(f"{acc}{nt * 4 + i}" for i in range(4))
                e(f"    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{cc}}}, {{%a0, %a1, %a2, %a3}}, {{{bb}}}, {{{cc}}};")
    # P^T and dS^T, masked.
    for nt in range(NTQ):
        for half, key in ((0, "%r25"), (1, "%r26")):
            for c in range(2):
                i = nt * 4 + half * 2 + c
                qi = nt * 2 + c
                e(f"    mad.lo.u32 %r57, %r10, 2, %r27;")
                e(f"    add.u32 %r57, %r57, {nt * 8 + c};     // query")
                e("    setp.ge.u32 %p5, %r57, %r1;")
                e(f"    setp.ge.u32 %p6, {key}, %r2;")
                e("    or.pred %p5, %p5, %p6;")
                e(f"    setp.gt.u32 %p6, {key}, %r57;")
                e("    and.pred %p6, %p6, %p2;")
                e("    or.pred %p5, %p5, %p6;")
                e(f"    mul.f32 %s{i}, %s{i}, %f2;")
                e(f"    sub.f32 %s{i}, %s{i}, %lq{qi};")
                e(f"    ex2.approx.ftz.f32 %s{i}, %s{i};")
                e(f"    selp.f32 %s{i}, 0f00000000, %s{i}, %p5;   // P^T")
                e(f"    sub.f32 %dp{i}, %dp{i}, %dlt{qi};")
                e(f"    mul.f32 %dp{i}, %dp{i}, %s{i};            // dS^T (unscaled)")
    # A fragments of P^T and dS^T over queries.
    for kt in range(KSQ):
        a, b = 2 * kt, 2 * kt + 1
        pairs = [(a * 4 + 0, a * 4 + 1), (a * 4 + 2, a * 4 + 3), (b * 4 + 0, b * 4 + 1), (b * 4 + 2, b * 4 + 3)]
        for i, (lo, hi) in enumerate(pairs):
            e(f"    cvt.rn.bf16x2.f32 %pa{kt * 4 + i}, %s{hi}, %s{lo};")
            e(f"    cvt.rn.bf16x2.f32 %sa{kt * 4 + i}, %dp{hi}, %dp{lo};")
    # dV += P^T dO, dK += dS^T Q; B by ldmatrix.trans of the dO / Q tiles.
    for kt in range(KSQ):
        e(f"    add.u32 %r58, %r23, {kt * 16};")
        for dn in range(0, NTD, 2):
            e(f"    add.u32 %r59, %r24, {dn};")
            for tile, acc, afr in (("%r17", "%dv", "%pa"), ("%r16", "%dk", "%sa")):
                sw_addr("%r60", tile, "%r58", "%r59")
                e("    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%b0, %b1, %b2, %b3}, [%r60];")
                aa = ", ".join(f"{afr}{kt * 4 + i}" for i in range(4))
                for d2, bb in ((dn, "%b0, %b1"), (dn + 1, "%b2, %b3")):
                    cc = ", ".join(f"{acc}{d2 * 4 + i}" for i in range(4))
                    e(f"    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{cc}}}, {{{aa}}}, {{{bb}}}, {{{cc}}};")
    # dS^T (bf16) to this warp's shared region, rows = keys (16), cols = queries.
    for nt in range(NTQ):
        for half in range(2):
            reg = f"%sa{(nt // 2) * 4 + (nt % 2) * 2 + half}"
            e(f"    add.u32 %r61, %r9, {half * 8};")
            e(f"    mad.lo.u32 %r62, %r61, {BQB * 2}, %r18;")
            e(f"    mad.lo.u32 %r62, %r10, 4, %r62;")
            e(f"    st.shared.b32 [%r62+{nt * 16}], {reg};")
    e("    bar.sync 0;                            // every warp's dS^T is in shared memory")
    # dQ += scale * dS K over the CTA's KB keys: warp w owns the head-dim
    # columns [w*D/WARPS, (w+1)*D/WARPS), so each dQ element gets one red.add
    # per CTA and q tile (a warp summing only its own 16 keys made that four,
    # and the backward was bound by those atomics: 40 TFLOP/s on an H200).
    e("    and.b32 %r63, %r22, 1;                 // (lane/8) % 2: query chunk")
    e("    mad.lo.u32 %r64, %r24, 8, %r21;        // key row: lane%8 + 8*(lane/16)")
    e(f"    add.u32 %r65, %r17, {QT};              // warp 0's dS^T")
    e(f"    mad.lo.u32 %r65, %r64, {BQB * 2}, %r65;")
    e(f"    mul.lo.u32 %r73, %r7, {NTW};            // this warp's first n-tile of dQ")
    e("    add.u32 %r74, %r24, %r73;              // its 16-byte chunk of K for ldmatrix")
    e("    mul.wide.u32 %rd27, %r73, 32;          // its byte offset in a dQ row")
    for mt in range(KSQ):
        for i in range(NTW * 4):
            e(f"    mov.f32 %c{i}, 0f00000000;")
        e(f"    add.u32 %r67, %r63, {2 * mt};")
        e("    mad.lo.u32 %r67, %r67, 16, %r65;")
        for ks in range(WARPS):
            e(f"    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {{%a0, %a1, %a2, %a3}}, [%r67+{ks * DS}];")
            e(f"    add.u32 %r66, %r23, {ks * 16};          // K rows of keys ks*16..")
            for dn in range(0, NTW, 2):
                e(f"    add.u32 %r68, %r74, {dn};")
                sw_addr("%r69", "%r14", "%r66", "%r68")
                e("    ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%b0, %b1, %b2, %b3}, [%r69];")
                for d2, bb in ((dn, "%b0, %b1"), (dn + 1, "%b2, %b3")):
                    cc = ", ".join(f"%c{d2 * 4 + i}" for i in range(4))
                    e(f"    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{cc}}}, {{%a0, %a1, %a2, %a3}}, {{{bb}}}, {{{cc}}};")
        for half in range(2):
            e(f"    add.u32 %r70, %r27, {mt * 16 + half * 8};")
            e("    add.u32 %r70, %r70, %r9;           // query")
            e("    setp.lt.u32 %p7, %r70, %r1;")
            e("    mad.lo.u32 %r71, %r70, %r3, %r12;")
            e(f"    mul.wide.u32 %rd21, %r71, {D * 4};")
            e("    add.u64 %rd21, %rd7, %rd21;")
            e("    mul.wide.u32 %rd22, %r10, 8;")
            e("    add.u64 %rd21, %rd21, %rd22;")
            e("    add.u64 %rd21, %rd21, %rd27;")
            for d2 in range(NTW):
                e(f"    mul.f32 %f3, %c{d2 * 4 + half * 2}, %f1;")
                e(f"    mul.f32 %f4, %c{d2 * 4 + half * 2 + 1}, %f1;")
                e(f"    @%p7 red.global.add.f32 [%rd21+{d2 * 32}], %f3;")
                e(f"    @%p7 red.global.add.f32 [%rd21+{d2 * 32 + 4}], %f4;")
    e("    bar.sync 0;                            // Q, dO and dS are free for the next tile")
    e(f"    add.u32 %r27, %r27, {BQB};")
    e("    bra.uni QTILE;")
    e("QDONE:")
    e("    cp.async.wait_group 0;                 // (no q tile at all: the K/V copies)")
    for half, key in ((0, "%r25"), (1, "%r26")):
        e(f"    setp.lt.u32 %p7, {key}, %r2;")
        e(f"    mad.lo.u32 %r72, {key}, %r4, %r13;")
        e(f"    mul.wide.u32 %rd23, %r72, {D * 4};")
        e("    mul.wide.u32 %rd24, %r10, 8;")
        e("    add.u64 %rd23, %rd23, %rd24;")
        e("    add.u64 %rd25, %rd8, %rd23;")
        e("    add.u64 %rd26, %rd9, %rd23;")
        for dn in range(NTD):
            for c in range(2):
                i = dn * 4 + half * 2 + c
                e(f"    mul.f32 %f5, %dk{i}, %f1;")
                e(f"    @%p7 red.global.add.f32 [%rd25+{dn * 32 + c * 4}], %f5;")
                e(f"    @%p7 red.global.add.f32 [%rd26+{dn * 32 + c * 4}], %dv{i};")
    e("    ret;")
    e("}")
    return "\n".join(L)


def main_bwd():
    out = [
        "// Flash attention backward for one (q chunk, kv chunk) pair: bf16 q, k, v, do;",
        "// f32 lse, delta; accumulates f32 dq, dk, dv with red.add.",
        "// Generated by scripts/gen-attn-ptx.py (register unrolling); do not edit by hand.",
        ".version 8.0",
        ".target sm_80",
        ".address_size 64",
        "",
        ".extern .shared .align 128 .b8 smem[];",
        "",
    ]
    # d128 also with 128 keys per CTA (8 warps): half the dQ atomics of 64,
    # one CTA per SM instead of two; the GPU bench times both.
    for d, kb in ((64, 64), (128, 64), (128, 128)):
        out.append(gen_bwd(d, kb))
        out.append("")
    with open("ptx/kernels/attn_bwd.ptx", "w") as f:
        f.write("\n".join(out))


def main():
    out = [
        "// Flash attention forward for one (q chunk, kv chunk) pair, bf16 in, f32 out.",
        "// Generated by scripts/gen-attn-ptx.py (register unrolling); do not edit by hand.",
        ".version 8.0",
        ".target sm_80",
        ".address_size 64",
        "",
        ".extern .shared .align 128 .b8 smem[];",
        "",
    ]
    for d in (64, 128):
        out.append(gen(d))
        out.append("")
    path = sys.argv[1] if len(sys.argv) > 1 else "ptx/kernels/attn_fwd.ptx"
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
    main_bwd()
