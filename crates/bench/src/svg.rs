//! The failover picture: throughput and p99 per 100 ms, coordinator and
//! nginx, through a SIGKILL and a SIGSTOP of one server. Plain SVG written
//! here: a plotting crate would need a font backend (and with it system
//! libraries) only to measure label text.

use std::fmt::Write as _;

use crate::lab::Route;
use crate::{Fault, Timeline};

const PANEL_WIDTH: f64 = 460.0;
const PANEL_HEIGHT: f64 = 230.0;
const MARGIN_LEFT: f64 = 62.0;
const MARGIN_TOP: f64 = 34.0;
const MARGIN_BOTTOM: f64 = 36.0;
const MARGIN_RIGHT: f64 = 14.0;

fn color(route: Route) -> &'static str {
    match route {
        Route::Coordinator => "#1f6feb",
        Route::Nginx => "#d9730d",
        Route::Direct => "#57606a",
    }
}

/// A round, readable axis maximum at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 0.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|step| step * magnitude)
        .find(|&ceiling| ceiling >= value)
        .unwrap_or(10.0 * magnitude)
}

/// One route's line; a point without a value (a p99 where no call
/// succeeded) breaks the line there rather than drop it to zero.
struct Series {
    route: Route,
    points: Vec<(f64, Option<f64>)>,
    fault_at: f64,
}

fn panel(svg: &mut String, left: f64, top: f64, title: &str, unit: &str, series: &[Series]) {
    let plot_left = left + MARGIN_LEFT;
    let plot_top = top + MARGIN_TOP;
    let width = PANEL_WIDTH - MARGIN_LEFT - MARGIN_RIGHT;
    let height = PANEL_HEIGHT - MARGIN_TOP - MARGIN_BOTTOM;
    let x_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|point| point.0))
        .fold(0.0, f64::max)
        .max(0.1);
    let y_max = nice_ceiling(
        series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|point| point.1))
            .fold(0.0, f64::max)
            * 1.05,
    );
    let x = |value: f64| plot_left + value / x_max * width;
    let y = |value: f64| plot_top + height - value.min(y_max) / y_max * height;
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="14" font-weight="600">{title}</text>"##,
        left + 8.0,
        top + 20.0
    );
    // Grid and labels: five steps on each axis.
    for step in 0..=4 {
        let value = y_max * f64::from(step) / 4.0;
        let at = y(value);
        let _ = write!(
            svg,
            r##"<line x1="{plot_left}" y1="{at}" x2="{}" y2="{at}" stroke="#eaeef2"/><text x="{}" y="{}" font-size="11" text-anchor="end" fill="#57606a">{}</text>"##,
            plot_left + width,
            plot_left - 6.0,
            at + 4.0,
            format_value(value)
        );
        let seconds = x_max * f64::from(step) / 4.0;
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="11" text-anchor="middle" fill="#57606a">{seconds:.1} s</text>"##,
            x(seconds),
            plot_top + height + 16.0
        );
    }
    let _ = write!(
        svg,
        r##"<text x="{}" y="{}" font-size="11" fill="#57606a" transform="rotate(-90 {} {})" text-anchor="middle">{unit}</text>"##,
        left + 14.0,
        plot_top + height / 2.0,
        left + 14.0,
        plot_top + height / 2.0
    );
    let _ = write!(
        svg,
        r##"<rect x="{plot_left}" y="{plot_top}" width="{width}" height="{height}" fill="none" stroke="#d0d7de"/>"##
    );
    if let Some(first) = series.first() {
        let at = x(first.fault_at);
        let _ = write!(
            svg,
            r##"<line x1="{at}" y1="{plot_top}" x2="{at}" y2="{}" stroke="#cf222e" stroke-dasharray="4 3"/><text x="{}" y="{}" font-size="11" fill="#cf222e">fault</text>"##,
            plot_top + height,
            at + 4.0,
            plot_top + 12.0
        );
    }
    for (index, line) in series.iter().enumerate() {
        for stretch in line.points.split(|point| point.1.is_none()) {
            let points: Vec<String> = stretch
                .iter()
                .filter_map(|&(px, py)| Some(format!("{:.1},{:.1}", x(px), y(py?))))
                .collect();
            if points.is_empty() {
                continue;
            }
            if let [point] = &points[..] {
                // A polyline of one point draws nothing.
                if let Some((cx, cy)) = point.split_once(',') {
                    let _ = write!(
                        svg,
                        r##"<circle cx="{cx}" cy="{cy}" r="2" fill="{}"/>"##,
                        color(line.route)
                    );
                }
                continue;
            }
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{}" stroke-width="1.8" points="{}"/>"##,
                color(line.route),
                points.join(" ")
            );
        }
        let legend_x = plot_left + width - 190.0 + index as f64 * 100.0;
        let _ = write!(
            svg,
            r##"<line x1="{legend_x}" y1="{}" x2="{}" y2="{}" stroke="{}" stroke-width="3"/><text x="{}" y="{}" font-size="12">{}</text>"##,
            top + 16.0,
            legend_x + 18.0,
            top + 16.0,
            color(line.route),
            legend_x + 22.0,
            top + 20.0,
            line.route.name()
        );
    }
}

/// `2500` as `2.5k`, `12.5` as `12.5`, `40` as `40`.
fn format_value(value: f64) -> String {
    let (scaled, suffix) = if value >= 1000.0 {
        (value / 1000.0, "k")
    } else {
        (value, "")
    };
    let text = format!("{scaled:.1}");
    let text = text.strip_suffix(".0").unwrap_or(&text);
    format!("{text}{suffix}")
}

/// The picture of every timeline: a row per fault, throughput on the
/// left and p99 on the right.
pub fn failover_picture(timelines: &[Timeline]) -> String {
    let faults = [Fault::Kill, Fault::Stop];
    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{}" height="{}" font-family="system-ui, sans-serif"><rect width="100%" height="100%" fill="#ffffff"/>"##,
        PANEL_WIDTH * 2.0,
        PANEL_HEIGHT * faults.len() as f64
    );
    for (row, fault) in faults.iter().enumerate() {
        let of_fault: Vec<&Timeline> = timelines
            .iter()
            .filter(|timeline| timeline.fault == *fault)
            .collect();
        let series =
            |value: &dyn Fn(&Timeline, &securemesh_client::load::Bucket) -> Option<f64>| {
                of_fault
                    .iter()
                    .map(|timeline| Series {
                        route: timeline.route,
                        fault_at: timeline.fault_at_s,
                        points: timeline
                            .summary
                            .timeline
                            .iter()
                            .enumerate()
                            .map(|(index, bucket)| {
                                (
                                    (index as f64 + 0.5) * timeline.bucket_s,
                                    value(timeline, bucket),
                                )
                            })
                            .collect(),
                    })
                    .collect::<Vec<_>>()
            };
        let top = row as f64 * PANEL_HEIGHT;
        panel(
            &mut svg,
            0.0,
            top,
            &format!("{}: successful calls/s per 100 ms", fault.name()),
            "calls/s",
            &series(&|timeline, bucket| Some(bucket.ok as f64 / timeline.bucket_s)),
        );
        panel(
            &mut svg,
            PANEL_WIDTH,
            top,
            &format!("{}: p99 per 100 ms (gap: none succeeded)", fault.name()),
            "ms",
            &series(&|_, bucket| (bucket.ok > 0).then_some(bucket.p99_ms)),
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_maxima_are_round() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(7.3), 10.0);
        assert_eq!(nice_ceiling(1234.0), 2000.0);
        assert_eq!(nice_ceiling(2400.0), 2500.0);
    }

    #[test]
    fn tick_labels_are_short_and_exact() {
        assert_eq!(format_value(0.0), "0");
        assert_eq!(format_value(12.5), "12.5");
        assert_eq!(format_value(40.0), "40");
        assert_eq!(format_value(2500.0), "2.5k");
        assert_eq!(format_value(10000.0), "10k");
    }
}
