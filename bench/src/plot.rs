//! Plots of the results as SVG and PNG (plotters; the PNG text is drawn with `ab_glyph` from a
//! TrueType font found on the system, `DejaVu Sans` from Debian's fonts-dejavu-core, so no
//! fontconfig or freetype is needed). Each plot is grouped bars with min-max error bars.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow};
use plotters::{
    coord::{Shift, combinators::BindKeyPoints as _},
    prelude::*,
    style::{FontStyle, register_font},
};

use crate::{
    model::{Results, StreamRun, summary},
    report::{DROP_ARMS, RELAY_ARMS},
    stats::Summary,
};

/// Fonts tried for the PNG text, in order.
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One grouped bar chart.
pub struct Bars {
    pub file: &'static str,
    pub title: String,
    pub y_label: String,
    pub groups: Vec<String>,
    /// Series name and one value per group.
    pub series: Vec<(String, Vec<Option<Summary>>)>,
}

fn register_fonts() -> Result<()> {
    let path = FONTS
        .iter()
        .find(|path| Path::new(path).exists())
        .context("no TrueType font found (install fonts-dejavu-core: `cargo xtask setup`)")?;
    let bytes: &'static [u8] = Box::leak(std::fs::read(path)?.into_boxed_slice());
    register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{path} is not a usable font"))?;
    Ok(())
}

/// Draws every plot the results allow; returns the files written.
pub fn all(results: &Results, out: &Path) -> Result<Vec<PathBuf>> {
    register_fonts()?;
    let mut written = Vec::new();
    for bars in charts(results) {
        if bars
            .series
            .iter()
            .all(|(_, values)| values.iter().all(Option::is_none))
        {
            continue;
        }
        let svg = out.join(format!("{}.svg", bars.file));
        draw(
            &SVGBackend::new(&svg, (960, 540)).into_drawing_area(),
            &bars,
        )
        .with_context(|| format!("draw {}", svg.display()))?;
        written.push(svg);
        let png = out.join(format!("{}.png", bars.file));
        {
            let area = BitMapBackend::new(&png, (960, 540)).into_drawing_area();
            draw(&area, &bars).with_context(|| format!("draw {}", png.display()))?;
            area.present()
                .map_err(|e| anyhow!("write {}: {e:?}", png.display()))?;
        }
        written.push(png);
    }
    Ok(written)
}

fn relay_series(
    results: &Results,
    f: &dyn Fn(&StreamRun, f64) -> f64,
) -> Vec<(String, Vec<Option<Summary>>)> {
    RELAY_ARMS
        .iter()
        .map(|(key, label)| {
            let values = results
                .relay
                .values()
                .map(|arms| {
                    let base = arms.get("local_sink").map_or(f64::NAN, |runs| {
                        crate::model::median_of(runs, |r| r.cpu_ns_per_delivered)
                    });
                    arms.get(*key)
                        .and_then(|runs| summary(runs, |r| f(r, base)))
                })
                .collect();
            ((*label).to_owned(), values)
        })
        .collect()
}

#[expect(clippy::too_many_lines, reason = "one chart after the other")]
fn charts(results: &Results) -> Vec<Bars> {
    let mut charts = Vec::new();
    let sizes: Vec<String> = results
        .relay
        .keys()
        .map(|s| format!("{s}-octet payloads"))
        .collect();
    charts.push(Bars {
        file: "relay_pps",
        title: "Inbound media relay: delivered packets per second".to_owned(),
        y_label: "delivered pps".to_owned(),
        groups: sizes.clone(),
        series: relay_series(results, &|r, _| r.delivered_pps),
    });
    charts.push(Bars {
        file: "relay_cpu",
        title: "Inbound media relay: CPU per delivered packet, net of the sender".to_owned(),
        y_label: "ns of CPU (all cores) per packet".to_owned(),
        groups: sizes,
        series: relay_series(results, &|r, base| r.cpu_ns_per_delivered - base),
    });
    let null = results.drop.get("null_device").map_or(f64::NAN, |runs| {
        crate::model::median_of(runs, |r| r.cpu_ns_per_offered)
    });
    let drop_arms: Vec<(&str, &str)> = DROP_ARMS
        .iter()
        .copied()
        .filter(|(k, _)| *k != "null_device")
        .collect();
    charts.push(Bars {
        file: "drop_cpu",
        title: "Unsolicited drop: CPU per dropped packet".to_owned(),
        y_label: "ns of CPU per packet".to_owned(),
        groups: drop_arms
            .iter()
            .map(|(_, label)| (*label).to_owned())
            .collect(),
        series: vec![
            (
                "raw".to_owned(),
                drop_arms
                    .iter()
                    .map(|(key, _)| {
                        results
                            .drop
                            .get(*key)
                            .and_then(|runs| summary(runs, |r| r.cpu_ns_per_offered))
                    })
                    .collect(),
            ),
            (
                "net of the sender".to_owned(),
                drop_arms
                    .iter()
                    .map(|(key, _)| {
                        results
                            .drop
                            .get(*key)
                            .and_then(|runs| summary(runs, |r| r.cpu_ns_per_offered - null))
                    })
                    .collect(),
            ),
        ],
    });
    for (rate, file) in [("low", "latency_low"), ("half", "latency_half")] {
        let arms: Vec<(&str, &str)> = RELAY_ARMS
            .iter()
            .copied()
            .filter(|(k, _)| results.latency.contains_key(*k))
            .collect();
        let pick = |f: fn(&crate::model::PingRun) -> u64| -> Vec<Option<Summary>> {
            arms.iter()
                .map(|(key, _)| {
                    results
                        .latency
                        .get(*key)
                        .and_then(|rates| rates.get(rate))
                        .and_then(|runs| {
                            #[expect(clippy::cast_precision_loss, reason = "ns to us")]
                            summary(runs, |r| f(r) as f64 / 1000.0)
                        })
                })
                .collect()
        };
        charts.push(Bars {
            file,
            title: format!(
                "UDP echo round-trip time, {} rate",
                if rate == "low" {
                    "low"
                } else {
                    "half of each arm's maximum"
                }
            ),
            y_label: "RTT (us)".to_owned(),
            groups: arms.iter().map(|(_, label)| (*label).to_owned()).collect(),
            series: vec![
                ("p50".to_owned(), pick(|r| r.p50_ns)),
                ("p99".to_owned(), pick(|r| r.p99_ns)),
                ("p99.9".to_owned(), pick(|r| r.p999_ns)),
            ],
        });
    }
    charts.push(Bars {
        file: "scale",
        title: "In-kernel relay with N installed entries".to_owned(),
        y_label: "delivered pps (200-octet payloads)".to_owned(),
        groups: results
            .scale
            .keys()
            .map(|n| format!("{n} entries"))
            .collect(),
        series: vec![(
            "in-kernel relay".to_owned(),
            results
                .scale
                .values()
                .map(|runs| summary(runs, |r| r.delivered_pps))
                .collect(),
        )],
    });
    let loads = [
        ("enhanced", "two-step binding"),
        ("enhanced_pipelined", "two-step, pipelined"),
        ("gateway_associate", "gateway UDP ASSOCIATE"),
        ("dante_associate", "Dante UDP ASSOCIATE"),
    ];
    charts.push(Bars {
        file: "control",
        title: "Control plane: setups per second".to_owned(),
        y_label: "setups per second".to_owned(),
        groups: loads.iter().map(|(_, label)| (*label).to_owned()).collect(),
        series: vec![(
            "setups/s".to_owned(),
            loads
                .iter()
                .map(|(key, _)| {
                    results
                        .control
                        .get(*key)
                        .and_then(|runs| summary(runs, |r| r.per_second))
                })
                .collect(),
        )],
    });
    charts
}

/// Units of x per group of bars.
const UNIT: i32 = 1000;

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, bars: &Bars) -> Result<()> {
    let fail = |e: &dyn std::fmt::Debug| anyhow!("{e:?}");
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let groups = bars.groups.len().max(1);
    let top = bars
        .series
        .iter()
        .flat_map(|(_, values)| values.iter().flatten().map(|s| s.max.max(s.median)))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.2 } else { 1.0 };
    // Integer x (1000 units per group): plotters formats integer axes with custom key points.
    let width = i32::try_from(groups).unwrap_or(1) * UNIT;
    let keys: Vec<i32> = (0..groups)
        .map(|i| i32::try_from(i).unwrap_or(0) * UNIT + UNIT / 2)
        .collect();
    let names = bars.groups.clone();
    let mut chart = ChartBuilder::on(root)
        .caption(&bars.title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d((0..width).with_key_points(keys), 0.0..top)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&|x| {
            usize::try_from(*x / UNIT)
                .ok()
                .and_then(|i| names.get(i).cloned())
                .unwrap_or_default()
        })
        .y_desc(&bars.y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| fail(&e))?;
    let n = i32::try_from(bars.series.len().max(1)).unwrap_or(1);
    let slot = UNIT * 8 / 10 / n;
    for (s, (name, values)) in bars.series.iter().enumerate() {
        let color = COLORS[s % COLORS.len()];
        let offset = UNIT / 10 + slot * i32::try_from(s).unwrap_or(0);
        let rects: Vec<_> = values
            .iter()
            .enumerate()
            .filter_map(|(g, v)| v.filter(|v| v.median.is_finite()).map(|v| (g, v)))
            .map(|(g, v)| {
                let x0 = i32::try_from(g).unwrap_or(0) * UNIT + offset;
                Rectangle::new(
                    [(x0, 0.0), (x0 + slot * 9 / 10, v.median.max(0.0))],
                    color.filled(),
                )
            })
            .collect();
        chart
            .draw_series(rects)
            .map_err(|e| fail(&e))?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        let whiskers: Vec<_> = values
            .iter()
            .enumerate()
            .filter_map(|(g, v)| {
                v.filter(|v| v.min.is_finite() && v.max.is_finite() && v.runs > 1)
                    .map(|v| (g, v))
            })
            .map(|(g, v)| {
                let x = i32::try_from(g).unwrap_or(0) * UNIT + offset + slot * 45 / 100;
                PathElement::new(
                    vec![(x, v.min.max(0.0)), (x, v.max.max(0.0))],
                    BLACK.stroke_width(2),
                )
            })
            .collect();
        chart.draw_series(whiskers).map_err(|e| fail(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_draws_to_svg_and_png() {
        if register_fonts().is_err() {
            eprintln!("no font on this machine: skipping the PNG check");
            return;
        }
        let dir = std::env::temp_dir().join(format!("bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bars = Bars {
            file: "t",
            title: "test".into(),
            y_label: "pps".into(),
            groups: vec!["a".into(), "b".into()],
            series: vec![
                ("x".into(), vec![Summary::of(&[1.0, 2.0, 3.0]), None]),
                (
                    "y".into(),
                    vec![Summary::of(&[4.0]), Summary::of(&[5.0, 6.0])],
                ),
            ],
        };
        let svg = dir.join("t.svg");
        draw(
            &SVGBackend::new(&svg, (640, 360)).into_drawing_area(),
            &bars,
        )
        .unwrap();
        assert!(std::fs::read_to_string(&svg).unwrap().contains("<svg"));
        let png = dir.join("t.png");
        draw(
            &BitMapBackend::new(&png, (640, 360)).into_drawing_area(),
            &bars,
        )
        .unwrap();
        assert_eq!(&std::fs::read(&png).unwrap()[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
