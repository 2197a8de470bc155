//! `fpdt info`: what this machine offers the runtime.

use std::fmt::Write;

use fpdt_alloc::Topology;
use fpdt_runtime::cublaslt::CublasLt;
use fpdt_runtime::{fmt_bytes, libs, CpuConfig, Device};

fn host_memory() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    s.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

fn cpu_list(cpus: &[usize]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let start = cpus[i];
        let mut end = start;
        while i + 1 < cpus.len() && cpus[i + 1] == end + 1 {
            i += 1;
            end = cpus[i];
        }
        out.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    out.join(",")
}

/// The report, several lines.
pub fn report(arena_bytes: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "fpdt {}", env!("CARGO_PKG_VERSION"));
    let _ = writeln!(s, "devices:");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = host_memory().map_or("memory unknown".to_string(), |m| {
        format!("{} memory", fmt_bytes(m as usize))
    });
    let _ = writeln!(s, "  cpu: {cpus} logical cpus, {mem}");
    match fpdt_runtime::cuda::probe() {
        Ok(gpus) if gpus.is_empty() => {
            let _ = writeln!(s, "  cuda: the driver is loaded but sees no GPU");
        }
        Ok(gpus) => {
            if let Ok((major, minor)) = fpdt_runtime::cuda::driver_version() {
                let _ = writeln!(s, "  cuda driver: supports CUDA {major}.{minor}");
            }
            for g in gpus {
                let _ = writeln!(
                    s,
                    "  cuda{}: {}, sm_{}{}, {} SMs, {} copy engines, {}, PCI {}",
                    g.ordinal,
                    g.name,
                    g.compute_capability.0,
                    g.compute_capability.1,
                    g.multiprocessors,
                    g.async_engines,
                    fmt_bytes(g.total_memory),
                    g.pci_bus_id
                );
            }
        }
        Err(e) => {
            let e = e.to_string();
            let why = e.strip_prefix("cuda: ").unwrap_or(&e);
            let _ = writeln!(s, "  cuda: unavailable: {why}");
        }
    }

    let _ = writeln!(s, "numa:");
    let mut arena_node = None;
    match Topology::detect() {
        Ok(t) => {
            let _ = writeln!(s, "  source: {}", t.source());
            for n in t.nodes() {
                let m = if n.memory_bytes == 0 {
                    "memory unknown".to_string()
                } else {
                    fmt_bytes(n.memory_bytes as usize)
                };
                let _ = writeln!(
                    s,
                    "  node {}: cpus {} ({}), {m}",
                    n.id,
                    cpu_list(&n.cpus),
                    n.cpus.len()
                );
            }
            match t.nearest_node(None) {
                Ok(n) => {
                    arena_node = Some(n);
                    let _ = writeln!(
                        s,
                        "  the host arena would use node {n} (no GPU to be near: the first node)"
                    );
                }
                Err(e) => {
                    let _ = writeln!(s, "  arena node: unknown ({e})");
                }
            }
        }
        Err(e) => {
            let _ = writeln!(s, "  topology unavailable: {e}");
        }
    }

    let _ = writeln!(s, "host arena:");
    let cfg = CpuConfig {
        name: "info".into(),
        device_memory: 1 << 20,
        host_memory: arena_bytes.max(1 << 20),
        pin_host_memory: true,
        numa_node: arena_node,
        ..CpuConfig::default()
    };
    match Device::cpu(cfg) {
        Ok(d) => {
            let _ = writeln!(s, "  {} (a probe of this size)", d.host_arena_report());
        }
        Err(e) => {
            let _ = writeln!(s, "  cannot create a probe arena: {e}");
        }
    }

    let _ = writeln!(s, "nccl:");
    match fpdt_comm::nccl::Nccl::load() {
        Ok(n) => {
            let _ = writeln!(s, "  loaded `{}`, version {}", n.path(), n.version_string());
        }
        Err(e) => {
            // The search's full list of places is under `libraries:`.
            let e = e.to_string();
            if e.len() <= 200 {
                let _ = writeln!(s, "  not available: {e}");
            } else {
                let _ = writeln!(
                    s,
                    "  not available: not found (the places tried are listed under libraries:)"
                );
            }
        }
    }

    let _ = writeln!(s, "libraries:");
    for spec in [&libs::CUBLASLT, &libs::NCCL] {
        match libs::find_library(spec) {
            Ok(found) => {
                let (path, place) = (found.path.display().to_string(), found.place);
                let version = if spec.name == libs::CUBLASLT.name {
                    match CublasLt::from_found(found) {
                        Ok(lt) => format!(", version {}", lt.version_string()),
                        Err(e) => format!(", but unusable: {e}"),
                    }
                } else {
                    String::new()
                };
                let _ = writeln!(s, "  {}: `{path}` (from {place}){version}", spec.name);
            }
            Err(e @ libs::LibError::Override { .. }) => {
                // The message starts with the library's name.
                let _ = writeln!(s, "  {e}");
            }
            Err(e) => {
                let _ = writeln!(
                    s,
                    "  {}: not found (looked for {}; set {} to its file); tried:",
                    spec.name,
                    spec.sonames.join(", "),
                    spec.env_var
                );
                for a in e.tried() {
                    let _ = writeln!(s, "    {a}");
                }
            }
        }
    }
    let loaded = libs::loaded_libraries();
    if loaded.is_empty() {
        let _ = writeln!(s, "  loaded: none");
    }
    for (name, path) in loaded {
        let _ = writeln!(s, "  loaded {name}: {}", path.display());
    }
    s
}
