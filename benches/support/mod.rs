//! Shared by every benchmark binary of the workspace (included with
//! `#[path]`): records the per-iteration times criterion measures, so a
//! benchmark can print the medians and ratios it claims as a table at the end.

#![allow(dead_code)]

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::Duration;

thread_local! {
    static SAMPLES: RefCell<BTreeMap<String, Vec<f64>>> = const { RefCell::new(BTreeMap::new()) };
}

/// Records one sample of `name`: `total` spent on `iters` iterations.
pub fn record(name: &str, total: Duration, iters: u64) {
    let per = total.as_secs_f64() / iters.max(1) as f64;
    SAMPLES.with(|s| {
        s.borrow_mut()
            .entry(name.to_string())
            .or_default()
            .push(per)
    });
}

/// Median seconds per iteration of `name`, or NaN when nothing was recorded.
pub fn median(name: &str) -> f64 {
    SAMPLES.with(|s| {
        let s = s.borrow();
        let Some(v) = s.get(name) else {
            return f64::NAN;
        };
        let mut v = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        if v.is_empty() {
            f64::NAN
        } else if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        }
    })
}

/// Formats seconds with a unit that suits them.
pub fn fmt_time(s: f64) -> String {
    if s < 1e-6 {
        format!("{:.1} ns", s * 1e9)
    } else if s < 1e-3 {
        format!("{:.2} us", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.3} s")
    }
}

/// Prints a table: a title, a header row and rows, columns padded.
pub fn print_table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < w.len() {
                w[i] = w[i].max(c.len());
            }
        }
    }
    println!("\n## {title}\n");
    let line = |cells: Vec<String>| {
        let cells: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<width$}", c, width = w.get(i).copied().unwrap_or(0)))
            .collect();
        println!("| {} |", cells.join(" | "));
    };
    line(header.iter().map(|s| s.to_string()).collect());
    line(w.iter().map(|n| "-".repeat(*n)).collect());
    for r in rows {
        line(r.clone());
    }
    println!();
}
