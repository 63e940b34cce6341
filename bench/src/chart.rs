//! The PNG chart of the end-to-end comparison in docs/benchmarks.png.

use std::path::Path;

use plotters::prelude::*;

use crate::e2e::{Balancer, E2eResult};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn short(balancer: Balancer) -> &'static str {
    match balancer {
        Balancer::HaLb => "ha-lb",
        Balancer::Haproxy => "haproxy",
        Balancer::Nftables => "nftables",
        Balancer::Direct => "direct",
    }
}

fn color(balancer: Balancer) -> RGBColor {
    match balancer {
        Balancer::HaLb => RGBColor(31, 119, 180),
        Balancer::Haproxy => RGBColor(255, 127, 14),
        Balancer::Nftables => RGBColor(44, 160, 44),
        Balancer::Direct => RGBColor(127, 127, 127),
    }
}

/// A panel: its title, and the value it shows for a result.
type Metric = (&'static str, fn(&E2eResult) -> f64);

/// Four panels of bars, one bar per balancer: new connections/s,
/// keep-alive requests/s, p99 latency, CPU per 100k new-connection requests.
pub fn draw(results: &[E2eResult], path: &Path) -> Result<(), String> {
    let font = std::fs::read(FONT)
        .map_err(|e| format!("reading {FONT} (Debian fonts-dejavu-core): {e}"))?;
    let font: &'static [u8] = Box::leak(font.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| "registering the font".to_string())?;

    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let root = root
        .titled(
            "End to end through the same LB host: ha-lb vs haproxy vs nftables",
            ("sans-serif", 26),
        )
        .map_err(|e| e.to_string())?;
    let panels = root.split_evenly((2, 2));
    let metrics: [Metric; 4] = [
        ("new connections per second (higher is better)", |r| {
            r.connections_per_second
        }),
        ("keep-alive requests per second (higher is better)", |r| {
            r.keepalive_requests_per_second
        }),
        (
            "p99 latency of a new connection, ms (lower is better)",
            |r| r.p99_ms,
        ),
        (
            "machine CPU seconds per 100k new-connection requests (lower is better)",
            |r| r.cpu_seconds_per_100k_close,
        ),
    ];
    for (panel, (title, value)) in panels.iter().zip(metrics) {
        let top = results
            .iter()
            .map(value)
            .fold(0.0f64, f64::max)
            .max(f64::MIN_POSITIVE)
            * 1.2;
        let mut chart = ChartBuilder::on(panel)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(30)
            .y_label_area_size(70)
            // A segmented 0..n has n + 1 segments; 0..n - 1 gives one per balancer.
            .build_cartesian_2d(
                (0..results.len().saturating_sub(1)).into_segmented(),
                0.0..top,
            )
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| match x {
                SegmentValue::CenterOf(i) => results
                    .get(*i)
                    .map_or(String::new(), |r| short(r.balancer).to_string()),
                _ => String::new(),
            })
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(results.iter().enumerate().map(|(i, r)| {
                let mut bar = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), value(r)),
                    ],
                    color(r.balancer).filled(),
                );
                bar.set_margin(0, 0, 25, 25);
                bar
            }))
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(results.iter().enumerate().map(|(i, r)| {
                let v = value(r);
                let label = if v >= 100.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.2}")
                };
                Text::new(
                    label,
                    (SegmentValue::CenterOf(i), v + top * 0.03),
                    ("sans-serif", 14),
                )
            }))
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}
