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
