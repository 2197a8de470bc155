//! Measurements behind `fpdt bench` and the `overlap` and `memory` bench
//! binaries (issue #9): each returns rows of numbers and renders them as the
//! table the bench binaries print, so the command and `cargo bench` show the
//! same thing. Criterion cannot express these: a row is one configuration
//! run side by side with its baseline, not a timed closure.

pub mod memory;
pub mod overlap;

/// Median of `v` (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
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

/// A table as the benchmarks print it: a `## title` line, a header row,
/// a separator and rows, in Markdown with the columns padded.
pub fn render_table(title: &str, header: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let cells: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:<w$}", c, w = width.get(i).copied().unwrap_or(0)))
            .collect();
        format!("| {} |\n", cells.join(" | "))
    };
    let mut out = format!("\n## {title}\n\n");
    out.push_str(&line(
        &header.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    ));
    out.push_str(&line(
        &width.iter().map(|n| "-".repeat(*n)).collect::<Vec<_>>(),
    ));
    for r in rows {
        out.push_str(&line(r));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_of_odd_even_and_empty() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(Vec::new()).is_nan());
    }

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = render_table(
            "t",
            &["a", "bb"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(
            t,
            "\n## t\n\n| a   | bb |\n| --- | -- |\n| xyz | 1  |\n| q   | 22 |\n\n"
        );
    }

    #[test]
    fn times_pick_their_unit() {
        assert_eq!(fmt_time(2.5e-9), "2.5 ns");
        assert_eq!(fmt_time(1.5e-5), "15.00 us");
        assert_eq!(fmt_time(0.25), "250.00 ms");
        assert_eq!(fmt_time(3.0), "3.000 s");
    }
}
