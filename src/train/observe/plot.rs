//! `curves.png`: training loss and held-out perplexity against the step, drawn
//! from the metrics file (so a resumed job's plot covers the whole run).
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Once;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// A font for the labels: DejaVu Sans from Debian's fonts-dejavu-core.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Redraws `png` from the JSON-lines metrics at `metrics`. The latest record of
/// a step wins (a resumed job logs again the steps after its checkpoint).
pub fn write(metrics: &Path, png: &Path) -> Result<()> {
    register_font()?;
    let text = std::fs::read_to_string(metrics).with_context(|| format!("cannot read {}", metrics.display()))?;
    let mut train = BTreeMap::new();
    let mut eval = BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let step = v["step"].as_u64().unwrap_or(0);
        match v["kind"].as_str() {
            Some("train") => v["loss"].as_f64().map(|l| train.insert(step, l)),
            Some("eval") => v["perplexity"].as_f64().map(|p| eval.insert(step, p)),
            _ => None,
        };
    }
    // The image encoder picks the format from the extension: keep ".png".
    // It opens the file itself (following links): a stale one goes first.
    let tmp = png.with_extension("tmp.png");
    crate::durable::refuse_link(png)?;
    crate::durable::remove_tree(&tmp).with_context(|| format!("cannot remove {}", tmp.display()))?;
    draw(&tmp, &train, &eval)?;
    std::fs::rename(&tmp, png).with_context(|| format!("cannot write {}", png.display()))
}

fn draw(path: &Path, train: &BTreeMap<u64, f64>, eval: &BTreeMap<u64, f64>) -> Result<()> {
    let root = BitMapBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let last_step = train.keys().chain(eval.keys()).max().copied().unwrap_or(1).max(1);
    panel(&left, "training loss (masked-token cross-entropy)", train, last_step, false, &BLUE)?;
    panel(&right, "held-out perplexity (log scale)", eval, last_step, true, &RED)?;
    root.present()?;
    Ok(())
}

fn panel(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    points: &BTreeMap<u64, f64>,
    last_step: u64,
    log: bool,
    color: &RGBColor,
) -> Result<()> {
    let finite: Vec<(u64, f64)> =
        points.iter().map(|(&s, &v)| (s, v)).filter(|(_, v)| v.is_finite() && *v > 0.0).collect();
    let (lo, hi) = finite.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
    let (lo, hi) = if finite.is_empty() { (0.1, 1.0) } else { (lo * 0.9, hi * 1.1) };
    let mut chart = ChartBuilder::on(area);
    chart.caption(title, ("sans-serif", 16)).margin(10).x_label_area_size(30).y_label_area_size(55);
    let series = finite.iter().map(|&(s, v)| (s, v));
    if log {
        let mut c = chart.build_cartesian_2d(0u64..last_step, (lo..hi).log_scale())?;
        c.configure_mesh().x_desc("step").draw()?;
        c.draw_series(LineSeries::new(series.clone(), color))?;
        c.draw_series(series.map(|p| Circle::new(p, 3, color.filled())))?;
    } else {
        let mut c = chart.build_cartesian_2d(0u64..last_step, lo..hi)?;
        c.configure_mesh().x_desc("step").draw()?;
        c.draw_series(LineSeries::new(series, color))?;
    }
    Ok(())
}

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = std::fs::read(FONT)
            .with_context(|| format!("font {FONT} missing (Debian package fonts-dejavu-core)"))
            .and_then(|bytes| {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))
            });
    });
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plot_is_drawn_from_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let m = dir.path().join("metrics.jsonl");
        std::fs::write(
            &m,
            "{\"kind\":\"eval\",\"step\":0,\"perplexity\":3000.0}\n{\"kind\":\"train\",\"step\":10,\"loss\":7.0}\n\
             {\"kind\":\"train\",\"step\":20,\"loss\":5.0}\n{\"kind\":\"eval\",\"step\":20,\"perplexity\":150.0}\n",
        )
        .unwrap();
        let png = dir.path().join("curves.png");
        write(&m, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
