//! The project's own kernels (`ptx/kernels/*.ptx`) are accepted by the
//! interpreter: every module parses and decodes.

use fpdt_ptx::interp::Interpreter;

#[test]
fn every_project_kernel_module_decodes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let mut n = 0;
    let mut failures = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "ptx") {
            let text = std::fs::read_to_string(&p).unwrap();
            match Interpreter::new(&text) {
                Ok(it) => assert!(!it.entries().is_empty(), "{}", p.display()),
                Err(e) => failures.push(format!("{}: {e}", p.display())),
            }
            n += 1;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {n} modules rejected:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Malformed modules are errors, never panics: every prefix (at a few
/// hundred cut points) of the project's modules, and some hostile cases.
#[test]
fn malformed_modules_are_errors_not_panics() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "ptx") {
            continue;
        }
        let text = std::fs::read_to_string(&p).unwrap();
        let step = (text.len() / 150).max(1);
        for cut in (0..text.len()).step_by(step) {
            if text.is_char_boundary(cut) {
                let _ = Interpreter::new(&text[..cut]);
                // a token dropped in the middle
                let mut t = text[..cut].to_string();
                if let Some(rest) = text.get(cut + 1..) {
                    t.push_str(rest);
                }
                let _ = Interpreter::new(&t);
            }
        }
    }
    let head = ".version 8.0\n.target sm_80\n.address_size 64\n";
    for body in [
        ".visible .entry k() { .reg .b32 %r<99999999999>; ret; }",
        ".visible .entry k() { .reg .b32 %r<4294967295>; ret; }",
        ".visible .entry k() { .shared .align 8 .b8 s[18446744073709551615]; ret; }",
        ".visible .entry k(.param .align 2147483648 .b8 p[4294967295]) { ret; }",
        ".visible .entry k() { mov.b32 %r1, {{{{{{1}}}}}}; }",
        ".visible .entry k() { .reg .b32 %r<2>; ld.global.v4.u32 {%r0, %r1}, [%r0]; }",
        ".visible .entry k() { .reg .b32 %r<2>; add.u8 %r0, %r1, 1; }",
        ".visible .entry k() { .reg .b32 %r<2>; mov.b32 %r0, 1e999999; }",
        ".visible .entry k() { /* unterminated",
        ".visible .entry k() { bra.uni L; L: L: ret; }",
        ".visible .entry k() { .reg .pred %p; @%p @%p ret; }",
        ".visible .entry k() { cp.async.ca.shared.global [0], [0], 3; }",
        ".visible .entry k() { mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {}, {}, {}, {}; }",
        ".visible .entry k() { \u{00e9} }",
    ] {
        let r = Interpreter::new(&format!("{head}{body}"));
        assert!(r.is_err(), "{body} was accepted");
    }
}
