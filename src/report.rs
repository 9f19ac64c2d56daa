//! `edpo report RUN`: plots of a training run (plotters, PNG) and one self-contained HTML page.
//!
//! Reads `metrics.parquet` and `pairs.parquet`; writes `RUN/report/*.png` and
//! `RUN/report/index.html` (images embedded, so the page can be mailed or archived alone).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use base64::Engine;
use plotters::prelude::*;

use crate::output::Printable;
use crate::table;
use crate::train::metrics;

static FONT: Once = Once::new();
const FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("`{0}` has no metrics.parquet; is it a run folder written by `edpo train`?")]
    NoMetrics(PathBuf),
    #[error("cannot draw `{path}`: {message}")]
    Draw { path: PathBuf, message: String },
}

/// One line of a chart.
struct Series<'a> {
    label: &'a str,
    values: &'a [f64],
    color: RGBColor,
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05)
        .max(hi.abs().max(lo.abs()) * 1e-3)
        .max(1e-12);
    (lo - pad, hi + pad)
}

fn draw_err(path: &Path) -> impl Fn(String) -> ReportError + '_ {
    move |m| ReportError::Draw {
        path: path.to_path_buf(),
        message: m,
    }
}

fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    steps: &[f64],
    series: &[Series],
) -> Result<(), ReportError> {
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (x0, x1) = range(steps.iter().copied());
    let (y0, y1) = range(series.iter().flat_map(|s| s.values.iter().copied()));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(x0.max(0.0)..x1, y0..y1)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("optimiser step")
        .y_desc(y_label)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .y_label_formatter(&|v| format_tick(*v))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for s in series {
        let color = s.color;
        chart
            .draw_series(LineSeries::new(
                steps
                    .iter()
                    .zip(s.values)
                    .filter(|(_, v)| v.is_finite())
                    .map(|(x, y)| (*x, *y)),
                color.stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label(s.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(3))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-10 {
        return "0".into();
    }
    if a != 0.0 && !(1e-3..1e4).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn histogram(
    path: &Path,
    title: &str,
    x_label: &str,
    values: &[f64],
    bins: usize,
) -> Result<(), ReportError> {
    let err = draw_err(path);
    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let (lo, hi) = range(values.iter().copied());
    let width = (hi - lo) / bins as f64;
    let mut counts = vec![0u64; bins];
    for v in values.iter().filter(|v| v.is_finite()) {
        let b = (((v - lo) / width) as usize).min(bins - 1);
        counts[b] += 1;
    }
    let max = counts.iter().copied().max().unwrap_or(1).max(1) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(90)
        .build_cartesian_2d(lo..hi, 0.0..max * 1.08)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc("pair-steps")
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 18))
        .x_label_formatter(&|v| format_tick(*v))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    chart
        .draw_series(counts.iter().enumerate().map(|(i, c)| {
            let x0 = lo + i as f64 * width;
            Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.92, *c as f64)],
                RGBColor(49, 104, 178).filled(),
            )
        }))
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))
}

/// What `edpo report` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub pngs: Vec<PathBuf>,
}

impl Printable for ReportFiles {
    fn to_table(&self) -> String {
        format!(
            "report: {} plots and {}\n",
            self.pngs.len(),
            self.html.display()
        )
    }
}

const BLUE_: RGBColor = RGBColor(49, 104, 178);
const ORANGE: RGBColor = RGBColor(230, 120, 20);
const GREEN_: RGBColor = RGBColor(40, 150, 70);
const RED_: RGBColor = RGBColor(200, 40, 40);

/// One line chart of `metrics.parquet` columns against the step.
struct Chart {
    file: &'static str,
    title: &'static str,
    y_label: &'static str,
    /// (legend, column, colour) of each line.
    lines: &'static [(&'static str, &'static str, RGBColor)],
}

const CHARTS: [Chart; 7] = [
    Chart {
        file: "loss.png",
        title: "ε-DPO loss (mean over the step's pairs)",
        y_label: "loss",
        lines: &[("loss", metrics::LOSS, BLUE_)],
    },
    Chart {
        file: "beta.png",
        title: "Global β (used by each step; objective.md §5)",
        y_label: "β",
        lines: &[("β", metrics::BETA, BLUE_)],
    },
    Chart {
        file: "steps.png",
        title: "Per-pair steps: fraction of pairs with k = +1 / k = −1",
        y_label: "fraction of pairs",
        lines: &[
            ("k = +1 (relax KL)", metrics::P_EPSILON_STEPS, GREEN_),
            ("k = −1 (tighten KL)", metrics::N_EPSILON_STEPS, RED_),
        ],
    },
    Chart {
        file: "rewards.png",
        title: "Implicit rewards β_i (log π − log π_ref), means per step",
        y_label: "reward (nats × β)",
        lines: &[
            ("chosen", metrics::REWARDS_CHOSEN, GREEN_),
            ("rejected", metrics::REWARDS_REJECTED, RED_),
            ("margin", metrics::REWARDS_MARGINS, BLUE_),
        ],
    },
    Chart {
        file: "accuracy.png",
        title: "Reward accuracy (chosen reward > rejected reward)",
        y_label: "fraction of pairs",
        lines: &[("accuracy", metrics::REWARDS_ACCURACIES, BLUE_)],
    },
    Chart {
        file: "learning_rate.png",
        title: "Learning rate",
        y_label: "learning rate",
        lines: &[("lr", metrics::LEARNING_RATE, ORANGE)],
    },
    Chart {
        file: "grad_norm.png",
        title: "Gradient norm (before clipping)",
        y_label: "global L2 norm",
        lines: &[("‖g‖", metrics::GRAD_NORM, ORANGE)],
    },
];

/// The self-contained HTML page: the final values and every plot inline.
fn html_page(
    run: &Path,
    m: &BTreeMap<String, Vec<f64>>,
    pngs: &[PathBuf],
) -> Result<String, ReportError> {
    let mut page = String::new();
    page.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>edpo report</title>");
    page.push_str("<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}img{width:100%;border:1px solid #ddd;margin:.5em 0 1.5em}table{border-collapse:collapse}td,th{padding:.2em .8em;border-bottom:1px solid #eee;text-align:left}</style></head><body>");
    page.push_str(&format!(
        "<h1>edpo run report</h1><p>Run folder: <code>{}</code></p>",
        escape(&run.display().to_string())
    ));
    let last = |name: &str| m[name].last().copied().unwrap_or(f64::NAN);
    page.push_str("<table><tr><th>steps</th><th>final loss</th><th>final β</th><th>final reward accuracy</th><th>final reward margin</th></tr>");
    page.push_str(&format!(
        "<tr><td>{}</td><td>{:.5}</td><td>{:.6}</td><td>{:.3}</td><td>{:.5}</td></tr></table>",
        m[metrics::STEP].len(),
        last(metrics::LOSS),
        last(metrics::BETA),
        last(metrics::REWARDS_ACCURACIES),
        last(metrics::REWARDS_MARGINS)
    ));
    for p in pngs {
        let bytes = std::fs::read(p).map_err(|e| draw_err(p)(e.to_string()))?;
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        page.push_str(&format!(
            "<h2>{}</h2><img alt=\"{name}\" src=\"data:image/png;base64,{}\">",
            name.trim_end_matches(".png").replace('_', " "),
            base64::engine::general_purpose::STANDARD.encode(bytes)
        ));
    }
    page.push_str("</body></html>\n");
    Ok(page)
}

/// Draws every plot of `run` and the HTML page.
pub fn write_report(run: &Path) -> Result<ReportFiles, crate::Error> {
    FONT.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT_BYTES);
    });
    let metrics_path = run.join(metrics::METRICS_FILE);
    if !metrics_path.is_file() {
        return Err(ReportError::NoMetrics(run.to_path_buf()).into());
    }
    let mut names = vec![metrics::STEP];
    names.extend(CHARTS.iter().flat_map(|c| c.lines.iter().map(|l| l.1)));
    let m = table::read_f64_columns(&metrics_path, &names)?;
    let pairs_path = run.join(metrics::PAIRS_FILE);
    let beta_i = if pairs_path.is_file() {
        table::read_f64_columns(&pairs_path, &[metrics::BETA_I])?
            .remove(metrics::BETA_I)
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let dir = run.join("report");
    std::fs::create_dir_all(&dir).map_err(|e| draw_err(&dir)(e.to_string()))?;
    let mut pngs = Vec::new();
    for chart in &CHARTS {
        let series: Vec<Series> = chart
            .lines
            .iter()
            .map(|&(label, column, color)| Series {
                label,
                values: &m[column],
                color,
            })
            .collect();
        let path = dir.join(chart.file);
        line_chart(
            &path,
            chart.title,
            chart.y_label,
            &m[metrics::STEP],
            &series,
        )?;
        pngs.push(path);
    }
    if !beta_i.is_empty() {
        let path = dir.join("beta_i_hist.png");
        histogram(
            &path,
            "Per-pair β_i over all pair-steps",
            "β_i",
            &beta_i,
            40,
        )?;
        pngs.push(path);
    }
    let html = dir.join("index.html");
    let page = html_page(run, &m, &pngs)?;
    std::fs::write(&html, page).map_err(|e| draw_err(&html)(e.to_string()))?;
    Ok(ReportFiles { html, pngs })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
