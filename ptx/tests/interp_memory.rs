//! The interpreter's global memory at addresses of the caller's choosing
//! (what the fake driver's executor maps): kernels read and write it there,
//! overlaps are refused, later allocations do not collide.

use fpdt_ptx::interp::Interpreter;
use fpdt_ptx::Arg;

const COPY: &str = r#"
.version 8.0
.target sm_80
.address_size 64
.visible .entry copy_u32(.param .u64 p_out, .param .u64 p_in, .param .u32 p_n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<6>;
    ld.param.u64 %rd1, [p_out];
    ld.param.u64 %rd2, [p_in];
    ld.param.u32 %r1, [p_n];
    mov.u32 %r2, %tid.x;
    setp.ge.u32 %p1, %r2, %r1;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd1, %rd1;
    cvta.to.global.u64 %rd2, %rd2;
    mul.wide.u32 %rd3, %r2, 4;
    add.s64 %rd4, %rd2, %rd3;
    add.s64 %rd5, %rd1, %rd3;
    ld.global.u32 %r3, [%rd4];
    add.u32 %r3, %r3, 1;
    st.global.u32 [%rd5], %r3;
DONE:
    ret;
}
"#;

#[test]
fn kernels_run_over_memory_mapped_at_chosen_addresses() {
    let mut it = Interpreter::new(COPY).unwrap();
    let base = 0x7f00_0000_1000u64;
    let input: Vec<u8> = (0u32..8).flat_map(|x| x.to_le_bytes()).collect();
    it.map_at(base, &input).unwrap();
    it.map_at(base + 4096, &[0u8; 32]).unwrap();
    // Overlapping either mapping is refused.
    assert!(it.map_at(base + 16, &[0u8; 8]).is_err());
    assert!(it.map_at(base - 8, &[0u8; 16]).is_err());
    // A plain allocation lands clear of the mappings.
    let extra = it.alloc_zeroed(64);
    assert!(extra >= base + 4096 + 32 || extra + 64 <= base);
    it.launch(
        "copy_u32",
        (1, 1, 1),
        (8, 1, 1),
        0,
        &[Arg::U64(base + 4096), Arg::U64(base), Arg::U32(8)],
    )
    .unwrap();
    let out: Vec<u32> = it.read_vec(base + 4096, 8).unwrap();
    assert_eq!(out, (1u32..=8).collect::<Vec<_>>());
    // Reading past a mapping's end is an error, not another mapping's bytes.
    assert!(it.read(base + 28, 8).is_err());
    it.clear_memory();
    assert!(it.read(base, 4).is_err());
}
