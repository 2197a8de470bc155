//! The loss curve of a run, drawn as a PNG with `plotters`.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend takes one from
//! memory, so the first of a few common system fonts is loaded (or the file
//! `FPDT_PLOT_FONT` names). Without one the curve is drawn without labels,
//! and the caller is told.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;

use crate::error::{ModelError, Result};

const FONT_CANDIDATES: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
];

/// Registers a font for plotters once; false when none was found.
fn font_ready() -> bool {
    static READY: OnceLock<bool> = OnceLock::new();
    *READY.get_or_init(|| {
        let env = std::env::var("FPDT_PLOT_FONT").ok();
        let paths = env
            .iter()
            .map(String::as_str)
            .chain(FONT_CANDIDATES.iter().copied());
        for p in paths {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps fonts for the process's life: leak once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

fn fail(path: &Path, e: impl std::fmt::Display) -> ModelError {
    ModelError::Data(format!("drawing the loss curve `{}`: {e}", path.display()))
}

/// Draws training loss per step (and validation loss at its steps) to
/// `path`; returns whether the axes are labelled (a font was found).
pub fn loss_curve(path: &Path, train: &[(u64, f64)], eval: &[(u64, f64, f64)]) -> Result<bool> {
    let pts: Vec<(f64, f64)> = train
        .iter()
        .filter(|(_, l)| l.is_finite())
        .map(|&(s, l)| (s as f64, l))
        .collect();
    let evs: Vec<(f64, f64)> = eval
        .iter()
        .filter(|e| e.1.is_finite())
        .map(|&(s, l, _)| (s as f64, l))
        .collect();
    let all = pts.iter().chain(&evs);
    let (x0, x1) = all
        .clone()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y0, y1) = all.fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if pts.is_empty() || x0 > x1 {
        return Err(fail(path, "no finite losses to draw"));
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let labels = font_ready();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(path, e))?;
    let mut b = ChartBuilder::on(&root);
    b.margin(20);
    if labels {
        b.caption("fpdt train: loss", ("sans-serif", 24))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = b
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| fail(path, e))?;
    let mut mesh = chart.configure_mesh();
    if labels {
        mesh.x_desc("step").y_desc("loss");
    } else {
        mesh.disable_x_axis().disable_y_axis();
    }
    mesh.draw().map_err(|e| fail(path, e))?;
    let s = chart
        .draw_series(LineSeries::new(pts, &BLUE))
        .map_err(|e| fail(path, e))?;
    if labels {
        s.label("training")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    if !evs.is_empty() {
        chart
            .draw_series(evs.iter().map(|&p| Circle::new(p, 4, RED.filled())))
            .map_err(|e| fail(path, e))?;
        let s = chart
            .draw_series(LineSeries::new(evs.clone(), RED.stroke_width(2)))
            .map_err(|e| fail(path, e))?;
        if labels {
            s.label("validation")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
    }
    if labels {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(path, e))?;
    }
    root.present().map_err(|e| fail(path, e))?;
    Ok(labels)
}
