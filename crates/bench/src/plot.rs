//! `natter-bench plot`: draws latency against offered load, for every server in a side-by-side run's
//! `runs.txt` (lines `<server> <summary line of pairs>`), as a PNG: p50 and p99 (median of the runs at
//! each offered rate), both axes logarithmic.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

/// Where Debian's `fonts-dejavu-core` puts its sans-serif font; the labels are drawn with it.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// One server's medians: offered rate → (p50 ms, p99 ms).
type Curve = BTreeMap<u64, (f64, f64)>;

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Reads `runs.txt` into a curve per server. Lines without an open-loop rate or latencies (a failed
/// run) are skipped; a file with no usable line is an error.
pub fn parse_runs(text: &str) -> Result<BTreeMap<String, Curve>> {
    let mut samples: BTreeMap<(String, u64), (Vec<f64>, Vec<f64>)> = BTreeMap::new();
    for line in text.lines() {
        let Some(server) = line.split_whitespace().next() else {
            continue;
        };
        // The Natter adapter writes `load=open-loop@R/s`, the XMPP one `offered_per_s=R`.
        let rate = field(line, "load")
            .and_then(|l| l.strip_prefix("open-loop@"))
            .and_then(|r| r.strip_suffix("/s"))
            .or_else(|| field(line, "offered_per_s"))
            .and_then(|r| r.parse::<f64>().ok());
        let p50 = field(line, "p50_ms").and_then(|v| v.parse::<f64>().ok());
        let p99 = field(line, "p99_ms").and_then(|v| v.parse::<f64>().ok());
        let (Some(rate), Some(p50), Some(p99)) = (rate, p50, p99) else {
            continue;
        };
        if !(rate.is_finite() && rate >= 1.0 && p50.is_finite() && p99.is_finite()) {
            continue;
        }
        let e = samples
            .entry((server.to_owned(), rate.round() as u64))
            .or_default();
        e.0.push(p50);
        e.1.push(p99);
    }
    if samples.is_empty() {
        bail!(
            "no open-loop run with latencies in the input (expected `<server> scenario=pairs … load=open-loop@R/s … p50_ms=… p99_ms=…` lines)"
        );
    }
    let mut curves: BTreeMap<String, Curve> = BTreeMap::new();
    for ((server, rate), (mut p50, mut p99)) in samples {
        curves
            .entry(server)
            .or_default()
            .insert(rate, (median(&mut p50), median(&mut p99)));
    }
    Ok(curves)
}

/// Draws `curves` into a 1000×600 PNG at `out`, labels in the TrueType font at `font`.
pub fn draw(curves: &BTreeMap<String, Curve>, out: &Path, font: &Path) -> Result<()> {
    let bytes = std::fs::read(font).with_context(|| {
        format!(
            "reading the label font {} (Debian: apt-get install fonts-dejavu-core, or pass --font)",
            font.display()
        )
    })?;
    // plotters keeps registered fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow::anyhow!("{} is not a usable TrueType font", font.display()))?;

    let points = curves.values().flat_map(|c| c.iter());
    let (mut x_max, mut y_min, mut y_max) = (1.0f64, f64::MAX, 0.0f64);
    for (&rate, &(p50, p99)) in points {
        x_max = x_max.max(rate as f64);
        y_min = y_min.min(p50.min(p99));
        y_max = y_max.max(p50.max(p99));
    }
    let x_min = curves
        .values()
        .flat_map(|c| c.keys())
        .min()
        .map_or(1.0, |&r| r as f64);
    let y_min = (y_min * 0.5).max(0.001);
    let y_max = (y_max * 2.0).max(y_min * 10.0);

    // Drawn into memory, then written with the `image` crate the workspace already uses for PNG.
    const SIZE: (u32, u32) = (1000, 600);
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "One-way latency vs offered load (pairs, median of runs)",
                ("sans-serif", 22),
            )
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(64)
            .build_cartesian_2d(
                ((x_min * 0.8)..(x_max * 1.25)).log_scale(),
                (y_min..y_max).log_scale(),
            )?;
        chart
            .configure_mesh()
            .x_desc("offered messages/s")
            .y_desc("latency, ms (log)")
            .label_style(("sans-serif", 14))
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_label_formatter(&|y| format!("{y}"))
            .draw()?;
        let colours = [
            RGBColor(0x1f, 0x77, 0xb4),
            RGBColor(0xd6, 0x27, 0x28),
            GREEN,
            MAGENTA,
        ];
        for (i, (server, curve)) in curves.iter().enumerate() {
            let colour = colours[i % colours.len()];
            let p99: Vec<(f64, f64)> = curve.iter().map(|(&r, &(_, p))| (r as f64, p)).collect();
            let p50: Vec<(f64, f64)> = curve.iter().map(|(&r, &(p, _))| (r as f64, p)).collect();
            chart
                .draw_series(LineSeries::new(p99.clone(), colour.stroke_width(3)))?
                .label(format!("{server} p99"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(3))
                });
            chart.draw_series(p99.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
            chart
                .draw_series(LineSeries::new(p50, colour.stroke_width(1)))?
                .label(format!("{server} p50"))
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 20, y)], colour.stroke_width(1))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()?;
        root.present()?;
    }
    image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels)
        .context("plot buffer of the wrong size")?
        .save_with_format(out, image::ImageFormat::Png)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_per_server_and_rate() {
        let runs = "natterd scenario=pairs load=open-loop@1000/s p50_ms=1.0 p99_ms=3.0\n\
                    natterd scenario=pairs load=open-loop@1000/s p50_ms=2.0 p99_ms=9.0\n\
                    natterd scenario=pairs load=open-loop@1000/s p50_ms=1.5 p99_ms=4.0\n\
                    ejabberd natter-bench scenario=pairs protocol=xmpp offered_per_s=1000 p50_ms=0.5 p99_ms=6.5\n\
                    ejabberd \n\
                    natterd scenario=pairs load=closed-loop p50_ms=1 p99_ms=2\n";
        let c = parse_runs(runs).unwrap();
        assert_eq!(c["natterd"][&1000], (1.5, 4.0));
        assert_eq!(c["ejabberd"][&1000], (0.5, 6.5));
        assert_eq!(c["natterd"].len(), 1);
        assert!(parse_runs("ejabberd \n").is_err());
    }

    #[test]
    fn draws_a_png() {
        // scripts/test.sh and .ci/run install fonts-dejavu-core.
        let font = Path::new(DEFAULT_FONT);
        let runs = "a load=open-loop@1000/s p50_ms=1 p99_ms=3\na load=open-loop@3000/s p50_ms=2 p99_ms=8\n\
                    b load=open-loop@1000/s p50_ms=0.5 p99_ms=6\n";
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("plot.png");
        draw(&parse_runs(runs).unwrap(), &out, font).unwrap();
        let png = std::fs::read(&out).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(png.len() > 10_000);
    }
}
