//! Shared by the interpreter's test files: the module header and a check
//! that test kernels are real PTX (assembled with `ptxas` when one is found:
//! `$PTXAS`, or `ptxas` on `PATH`, e.g. from the `nvidia-cuda-nvcc` wheel).

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// `.version 8.0`, `.target sm_80`, `.address_size 64`, then `body`.
pub fn module(body: &str) -> String {
    format!(".version 8.0\n.target sm_80\n.address_size 64\n\n{body}")
}

fn ptxas() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("PTXAS") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("sh")
        .arg("-c")
        .arg("command -v ptxas")
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Assembles each `(name, text)` for sm_80 with ptxas; skips (with a
/// printed reason) when no ptxas is found.
pub fn assemble_all(mods: &[(&str, String)]) {
    let Some(ptxas) = ptxas() else {
        println!("skipped: no ptxas (set PTXAS or put ptxas on PATH)");
        return;
    };
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fpdt-interp-ptxas-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in mods {
        let src = dir.join(format!("{name}.ptx"));
        std::fs::write(&src, text).unwrap();
        let out = Command::new(&ptxas)
            .arg("-arch=sm_80")
            .arg("-o")
            .arg(dir.join(format!("{name}.cubin")))
            .arg(&src)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ptxas rejects test kernel {name}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small deterministic generator (xorshift), so tests need no seeds.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 16) as u32
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u32() as f64 / 2f64.powi(31) - 1.0) as f32
    }
}
