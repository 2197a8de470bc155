//! Property tests of the slab allocator: random alloc/free sequences never
//! hand out overlapping or misaligned blocks, the statistics stay exact
//! against a model kept beside it, and freeing everything returns the
//! allocator to one empty block.

use std::collections::BTreeMap;

use fpdt_alloc::{SlabAllocator, SlabBlock, ALIGN};
use proptest::prelude::*;

const TAGS: [&str; 3] = ["q", "kv", "x"];

#[derive(Debug, Clone)]
enum Op {
    Alloc { bytes: usize, tag: usize },
    Free { pick: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (1usize..40_000, 0..TAGS.len()).prop_map(|(bytes, tag)| Op::Alloc { bytes, tag }),
        // Occasionally a large one, to hit the budget.
        1 => (100_000usize..400_000, 0..TAGS.len()).prop_map(|(bytes, tag)| Op::Alloc { bytes, tag }),
        3 => any::<usize>().prop_map(|pick| Op::Free { pick }),
    ]
}

fn rounded(b: usize) -> usize {
    b.div_ceil(ALIGN).max(1) * ALIGN
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_sequences_keep_blocks_disjoint_and_stats_exact(
        ops in proptest::collection::vec(op(), 1..200),
        capacity_kib in 256usize..2048,
        budget_pct in 50usize..=100,
    ) {
        let capacity = capacity_kib * 1024;
        let budget = capacity * budget_pct / 100;
        let a = SlabAllocator::new(fpdt_alloc::VirtualRegion::new(capacity), budget, "device").unwrap();
        let mut live: Vec<SlabBlock> = Vec::new();
        let mut peak = 0usize;
        let mut tag_peak: BTreeMap<&str, usize> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Alloc { bytes, tag } => {
                    let in_use: usize = live.iter().map(|b| b.reserved()).sum();
                    match a.alloc(bytes, TAGS[tag]) {
                        Ok(b) => {
                            prop_assert_eq!(b.offset() % ALIGN, 0);
                            prop_assert_eq!(b.reserved(), rounded(bytes));
                            prop_assert!(b.offset() + b.reserved() <= capacity);
                            for o in &live {
                                prop_assert!(
                                    b.offset() + b.reserved() <= o.offset()
                                        || o.offset() + o.reserved() <= b.offset(),
                                    "block {}..{} overlaps {}..{}",
                                    b.offset(), b.offset() + b.reserved(),
                                    o.offset(), o.offset() + o.reserved()
                                );
                            }
                            live.push(b);
                        }
                        Err(e) => {
                            // Refused only when over budget or no free block
                            // is large enough (TLSF may skip a block within
                            // one class step of the request).
                            let s = a.stats();
                            let over_budget = in_use + rounded(bytes) > budget;
                            prop_assert!(
                                over_budget || s.largest_free < rounded(bytes) * 17 / 16 + ALIGN,
                                "refused {} with {} in use of {} and largest free {}: {}",
                                bytes, in_use, budget, s.largest_free, e
                            );
                        }
                    }
                }
                Op::Free { pick } => {
                    if !live.is_empty() {
                        let i = pick % live.len();
                        live.swap_remove(i);
                    }
                }
            }
            let s = a.stats();
            let in_use: usize = live.iter().map(|b| b.reserved()).sum();
            let requested: usize = live.iter().map(|b| b.len()).sum();
            peak = peak.max(in_use);
            prop_assert_eq!(s.in_use, in_use);
            prop_assert_eq!(s.requested, requested);
            prop_assert_eq!(s.live_blocks, live.len());
            prop_assert_eq!(s.peak, peak);
            prop_assert!(s.in_use <= budget);
            for (i, tag) in TAGS.iter().enumerate() {
                let t_in_use: usize = live.iter().filter(|b| b.tag() == TAGS[i]).map(|b| b.reserved()).sum();
                let p = tag_peak.entry(tag).or_default();
                *p = (*p).max(t_in_use);
                let got = s.tags.get(tag).copied().unwrap_or_default();
                prop_assert_eq!(got.in_use, t_in_use);
                prop_assert_eq!(got.peak, *p);
            }
            prop_assert!((0.0..=1.0).contains(&s.fragmentation));
        }
        drop(live);
        let s = a.stats();
        prop_assert_eq!(s.in_use, 0);
        prop_assert_eq!(s.live_blocks, 0);
        prop_assert_eq!(s.largest_free, capacity / ALIGN * ALIGN);
        prop_assert_eq!(s.fragmentation, 0.0);
        prop_assert_eq!(s.allocs, s.frees);
    }
}
