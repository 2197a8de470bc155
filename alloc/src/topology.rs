//! NUMA topology: which memory nodes the machine has, their cpus and memory,
//! and which node a PCI device (the GPU) hangs off.
//!
//! The host arena is bound to the node nearest the GPU, because a pinned
//! copy from a remote socket runs at about two thirds of the local rate
//! (see REFERENCE-NUMBERS.md). Discovery reads Linux sysfs under a root
//! directory, so tests point it at a fake tree; the `hwloc` feature asks
//! hwloc (through `hwlocality`) instead.

use std::path::{Path, PathBuf};

use crate::error::AllocError;

/// One NUMA memory node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    /// The node's number (as in `/sys/devices/system/node/nodeN`).
    pub id: usize,
    /// Logical cpus local to the node.
    pub cpus: Vec<usize>,
    /// Memory of the node, bytes (0 when unknown).
    pub memory_bytes: u64,
}

/// The NUMA nodes of a machine, and the means to find a PCI device's node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    nodes: Vec<NumaNode>,
    /// Where PCI devices are listed (`<root>/bus/pci/devices`), for sysfs
    /// topologies; None for synthetic ones.
    pci_root: Option<PathBuf>,
    /// Where the topology came from, for reports.
    source: String,
}

fn io_err(what: String, e: std::io::Error) -> AllocError {
    AllocError::Topology(format!("{what}: {e}"))
}

/// Parses a sysfs cpu list such as `0-3,8,10-11`.
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, AllocError> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        let bad = || AllocError::Topology(format!("cpu list `{}`: bad entry `{part}`", s.trim()));
        match part.split_once('-') {
            Some((a, b)) => {
                let a: usize = a.trim().parse().map_err(|_| bad())?;
                let b: usize = b.trim().parse().map_err(|_| bad())?;
                if b < a {
                    return Err(bad());
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.trim().parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

/// Reads `MemTotal` from a node's `meminfo` (`Node 0 MemTotal: 5203704 kB`).
fn parse_meminfo_total(s: &str) -> Option<u64> {
    s.lines().find_map(|l| {
        let rest = &l[l.find("MemTotal:")? + "MemTotal:".len()..];
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

impl Topology {
    /// The machine's topology from `/sys` (or, with the `hwloc` feature and
    /// `FPDT_TOPOLOGY=hwloc`, from hwloc). A machine without NUMA
    /// information in sysfs is one node holding every cpu.
    pub fn detect() -> Result<Topology, AllocError> {
        #[cfg(feature = "hwloc")]
        if std::env::var("FPDT_TOPOLOGY").as_deref() == Ok("hwloc") {
            return Topology::from_hwloc();
        }
        Self::from_sysfs(Path::new("/sys"))
    }

    /// Reads `<root>/devices/system/node/node*/{cpulist,meminfo}`; PCI devices
    /// are then looked up under `<root>/bus/pci/devices`.
    pub fn from_sysfs(root: &Path) -> Result<Topology, AllocError> {
        let node_dir = root.join("devices/system/node");
        let mut nodes = Vec::new();
        match std::fs::read_dir(&node_dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry =
                        entry.map_err(|e| io_err(format!("listing {}", node_dir.display()), e))?;
                    let name = entry.file_name();
                    let Some(id) = name
                        .to_str()
                        .and_then(|n| n.strip_prefix("node"))
                        .and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let dir = entry.path();
                    let cpulist = std::fs::read_to_string(dir.join("cpulist"))
                        .map_err(|e| io_err(format!("reading {}/cpulist", dir.display()), e))?;
                    let memory_bytes = std::fs::read_to_string(dir.join("meminfo"))
                        .ok()
                        .and_then(|m| parse_meminfo_total(&m))
                        .unwrap_or(0);
                    nodes.push(NumaNode {
                        id,
                        cpus: parse_cpu_list(&cpulist)?,
                        memory_bytes,
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(format!("listing {}", node_dir.display()), e)),
        }
        nodes.sort_by_key(|n| n.id);
        let source = if nodes.is_empty() {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            nodes.push(NumaNode {
                id: 0,
                cpus: (0..cpus).collect(),
                memory_bytes: 0,
            });
            format!(
                "{} (no NUMA nodes listed: one node assumed)",
                root.display()
            )
        } else {
            format!("sysfs at {}", root.display())
        };
        Ok(Topology {
            nodes,
            pci_root: Some(root.join("bus/pci/devices")),
            source,
        })
    }

    /// A topology from a list of nodes (synthetic; no PCI devices).
    pub fn from_nodes(nodes: Vec<NumaNode>, source: impl Into<String>) -> Topology {
        Topology {
            nodes,
            pci_root: None,
            source: source.into(),
        }
    }

    /// The same topology with other nodes (PCI lookups unchanged).
    #[cfg_attr(not(feature = "hwloc"), allow(dead_code))]
    pub(crate) fn with_nodes(self, nodes: Vec<NumaNode>, source: &str) -> Topology {
        Topology {
            nodes,
            source: source.to_string(),
            ..self
        }
    }

    /// The NUMA nodes, by id.
    pub fn nodes(&self) -> &[NumaNode] {
        &self.nodes
    }

    /// The node of `id`, if present.
    pub fn node(&self, id: usize) -> Option<&NumaNode> {
        self.nodes.iter().find(|n| n.id == id)
    }

    /// Where this topology was read from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The NUMA node a PCI device (bus id such as `0000:17:00.0`) is attached
    /// to; `None` when the platform does not say (`numa_node` is -1, as on
    /// single-socket machines and most VMs).
    pub fn pci_node(&self, bus_id: &str) -> Result<Option<usize>, AllocError> {
        let Some(root) = &self.pci_root else {
            return Err(AllocError::Topology(format!(
                "PCI device {bus_id}: the topology ({}) lists no PCI devices",
                self.source
            )));
        };
        let bus_id = normalize_bus_id(bus_id);
        let path = root.join(&bus_id).join("numa_node");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            io_err(
                format!("PCI device {bus_id}: reading {}", path.display()),
                e,
            )
        })?;
        let v: i64 = text.trim().parse().map_err(|_| {
            AllocError::Topology(format!(
                "PCI device {bus_id}: {} holds `{}`, not a node number",
                path.display(),
                text.trim()
            ))
        })?;
        Ok(usize::try_from(v).ok().filter(|n| self.node(*n).is_some()))
    }

    /// The node the host arena should live on for a GPU at `bus_id`: the
    /// GPU's node when the platform knows it, else the first node.
    pub fn nearest_node(&self, bus_id: Option<&str>) -> Result<usize, AllocError> {
        if let Some(bus) = bus_id {
            if let Some(n) = self.pci_node(bus)? {
                return Ok(n);
            }
        }
        Ok(self.nodes.first().map_or(0, |n| n.id))
    }
}

/// CUDA reports bus ids as `00000000:17:00.0`; sysfs names them
/// `0000:17:00.0` (lower case, four-digit domain).
fn normalize_bus_id(bus_id: &str) -> String {
    let lower = bus_id.trim().to_ascii_lowercase();
    match lower.split_once(':') {
        Some((domain, rest)) if domain.len() > 4 => {
            let d = domain.trim_start_matches('0');
            format!("{:0>4}:{rest}", d)
        }
        _ => lower,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n").unwrap(),
            vec![0, 1, 2, 3, 8, 10, 11]
        );
        assert_eq!(parse_cpu_list("").unwrap(), Vec::<usize>::new());
        assert!(parse_cpu_list("3-1").is_err());
        assert!(parse_cpu_list("a").is_err());
    }

    #[test]
    fn meminfo_total_parses() {
        let m = "Node 1 MemTotal:       65536 kB\nNode 1 MemFree: 1 kB\n";
        assert_eq!(parse_meminfo_total(m), Some(65536 * 1024));
        assert_eq!(parse_meminfo_total("nothing"), None);
    }

    #[test]
    fn cuda_bus_ids_normalize_to_sysfs_names() {
        assert_eq!(normalize_bus_id("00000000:17:00.0"), "0000:17:00.0");
        assert_eq!(normalize_bus_id("0000:AB:00.0"), "0000:ab:00.0");
    }
}
