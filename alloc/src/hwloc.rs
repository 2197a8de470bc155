//! Topology discovery through hwloc (`hwloc` feature), with the
//! `hwlocality` crate over the system's libhwloc (Debian: `libhwloc-dev`).
//!
//! In hwloc 2.x NUMA nodes are memory children of the objects above them,
//! not a level of the tree: `objects_with_type(NUMANode)` walks the virtual
//! depth that holds them, which is what older bindings got wrong.

use hwlocality::object::types::ObjectType;
use hwlocality::Topology as Hwloc;

use crate::error::AllocError;
use crate::topology::{NumaNode, Topology};

fn err(what: &str, e: impl std::fmt::Display) -> AllocError {
    AllocError::Topology(format!("hwloc: {what}: {e}"))
}

fn nodes_of(topo: &Hwloc) -> Vec<NumaNode> {
    let mut nodes: Vec<NumaNode> = topo
        .objects_with_type(ObjectType::NUMANode)
        .enumerate()
        .map(|(i, obj)| NumaNode {
            id: obj.os_index().unwrap_or(i),
            cpus: obj
                .cpuset()
                .map(|set| set.iter_set().map(usize::from).collect())
                .unwrap_or_default(),
            memory_bytes: obj.total_memory(),
        })
        .collect();
    nodes.sort_by_key(|n| n.id);
    nodes
}

impl Topology {
    /// The machine's topology as hwloc sees it; PCI devices are still looked
    /// up in sysfs.
    pub fn from_hwloc() -> Result<Topology, AllocError> {
        let topo = Hwloc::new().map_err(|e| err("discovering the machine", e))?;
        let sysfs = Topology::from_sysfs(std::path::Path::new("/sys"))?;
        Ok(sysfs.with_nodes(nodes_of(&topo), "hwloc"))
    }

    /// A topology from an hwloc synthetic description, such as
    /// `"package:2 numa:1 core:2 pu:1"` (two NUMA nodes of two cpus each).
    pub fn from_hwloc_synthetic(description: &str) -> Result<Topology, AllocError> {
        let topo = Hwloc::builder()
            .from_synthetic(description)
            .map_err(|e| err(&format!("synthetic description `{description}`"), e))?
            .build()
            .map_err(|e| err(&format!("building `{description}`"), e))?;
        Ok(Topology::from_nodes(
            nodes_of(&topo),
            format!("hwloc synthetic `{description}`"),
        ))
    }
}
