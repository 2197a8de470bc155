//! NUMA discovery against fake sysfs trees, and the arena's choice of node.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use fpdt_alloc::{ArenaConfig, HostArena, NoPinner, NumaBinding, Topology};

/// A fresh directory under the system's temp dir, removed on drop.
struct TempTree(PathBuf);

impl TempTree {
    fn new() -> TempTree {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "fpdt-sysfs-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempTree(p)
    }

    fn file(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two nodes of 4 cpus and 64/32 GiB; a GPU on node 1, a NIC that does not
/// say, and one whose node is not listed.
fn two_node_machine() -> TempTree {
    let t = TempTree::new();
    t.file("devices/system/node/node0/cpulist", "0-3\n");
    t.file(
        "devices/system/node/node0/meminfo",
        "Node 0 MemTotal:       67108864 kB\nNode 0 MemFree: 1 kB\n",
    );
    t.file("devices/system/node/node1/cpulist", "4-5,6-7\n");
    t.file(
        "devices/system/node/node1/meminfo",
        "Node 1 MemTotal:       33554432 kB\n",
    );
    // Entries that are not nodes are skipped, as in real sysfs.
    t.file("devices/system/node/online", "0-1\n");
    t.file("bus/pci/devices/0000:17:00.0/numa_node", "1\n");
    t.file("bus/pci/devices/0000:03:00.0/numa_node", "-1\n");
    t.file("bus/pci/devices/0000:04:00.0/numa_node", "7\n");
    t
}

#[test]
fn sysfs_nodes_cpus_and_memory() {
    let t = two_node_machine();
    let topo = Topology::from_sysfs(t.path()).unwrap();
    let nodes = topo.nodes();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0].id, 0);
    assert_eq!(nodes[0].cpus, vec![0, 1, 2, 3]);
    assert_eq!(nodes[0].memory_bytes, 64 << 30);
    assert_eq!(nodes[1].cpus, vec![4, 5, 6, 7]);
    assert_eq!(nodes[1].memory_bytes, 32 << 30);
}

#[test]
fn a_gpu_on_node_1_puts_the_arena_on_node_1() {
    let t = two_node_machine();
    let topo = Topology::from_sysfs(t.path()).unwrap();
    assert_eq!(topo.pci_node("0000:17:00.0").unwrap(), Some(1));
    // CUDA spells bus ids with an eight-digit domain and upper case.
    assert_eq!(topo.pci_node("00000000:17:00.0").unwrap(), Some(1));
    let mut cfg = ArenaConfig::near_device(1 << 16, &topo, Some("0000:17:00.0")).unwrap();
    assert_eq!(cfg.numa_node, Some(1));
    cfg.pinner = Arc::new(NoPinner);
    let arena = HostArena::new(cfg).unwrap();
    // This machine may have one node only: then the bind fails, and says so.
    match arena.numa_binding() {
        NumaBinding::Bound { node } => assert_eq!(*node, 1),
        NumaBinding::Unbound { reason } => assert!(reason.contains("node 1"), "{reason}"),
    }
}

#[test]
fn devices_without_a_known_node_fall_back_to_the_first() {
    let t = two_node_machine();
    let topo = Topology::from_sysfs(t.path()).unwrap();
    assert_eq!(topo.pci_node("0000:03:00.0").unwrap(), None);
    assert_eq!(
        topo.pci_node("0000:04:00.0").unwrap(),
        None,
        "node 7 is not listed"
    );
    assert_eq!(topo.nearest_node(Some("0000:03:00.0")).unwrap(), 0);
    assert_eq!(topo.nearest_node(None).unwrap(), 0);
}

#[test]
fn a_missing_pci_device_is_an_error_naming_it() {
    let t = two_node_machine();
    let topo = Topology::from_sysfs(t.path()).unwrap();
    let e = topo.pci_node("0000:99:00.0").unwrap_err().to_string();
    assert!(e.contains("0000:99:00.0"), "{e}");
}

#[test]
fn garbled_sysfs_files_are_errors_not_guesses() {
    let t = two_node_machine();
    t.file("bus/pci/devices/0000:05:00.0/numa_node", "banana\n");
    let topo = Topology::from_sysfs(t.path()).unwrap();
    let e = topo.pci_node("0000:05:00.0").unwrap_err().to_string();
    assert!(e.contains("banana"), "{e}");
    t.file("devices/system/node/node2/cpulist", "9-8\n");
    let e = Topology::from_sysfs(t.path()).unwrap_err().to_string();
    assert!(e.contains("9-8"), "{e}");
}

#[test]
fn no_numa_listing_means_one_node() {
    let t = TempTree::new();
    let topo = Topology::from_sysfs(t.path()).unwrap();
    assert_eq!(topo.nodes().len(), 1);
    assert_eq!(topo.nodes()[0].id, 0);
    assert!(!topo.nodes()[0].cpus.is_empty());
}

#[test]
fn this_machine_has_at_least_one_node() {
    let topo = Topology::detect().unwrap();
    assert!(!topo.nodes().is_empty());
    assert!(topo.nodes().iter().any(|n| !n.cpus.is_empty()));
}

#[cfg(feature = "hwloc")]
#[test]
fn hwloc_synthetic_topology_has_two_numa_nodes() {
    let topo = Topology::from_hwloc_synthetic("package:2 numa:1 core:2 pu:1").unwrap();
    let nodes = topo.nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_eq!(nodes[0].cpus, vec![0, 1]);
    assert_eq!(nodes[1].cpus, vec![2, 3]);
    // A synthetic topology lists no PCI devices: asking is an error.
    assert!(topo.pci_node("0000:17:00.0").is_err());
}

#[cfg(feature = "hwloc")]
#[test]
fn hwloc_agrees_with_sysfs_on_this_machine() {
    let hw = Topology::from_hwloc().unwrap();
    let fs = Topology::from_sysfs(Path::new("/sys")).unwrap();
    let ids = |t: &Topology| t.nodes().iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(ids(&hw), ids(&fs));
}

#[cfg(feature = "hwloc")]
#[test]
fn a_bad_synthetic_description_is_an_error() {
    let e = Topology::from_hwloc_synthetic("package:banana").unwrap_err();
    assert!(e.to_string().contains("package:banana"), "{e}");
}
