//! A small line chart as hand-written SVG: IOPS against queue depth, one line per driver
//! and completion mode, or any other rate against a positive quantity ([`Axes`]). The x
//! axis is logarithmic (queue depths are powers of two).

use std::fmt::Write as _;

/// One line of the chart.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    /// CSS colour.
    pub color: &'static str,
    /// Dashed line (used for polled completion).
    pub dashed: bool,
    /// (queue depth, IOPS), in any order; depths must be positive.
    pub points: Vec<(u32, f64)>,
}

/// What the axes show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Axes<'a> {
    /// Under the x axis.
    pub x_label: &'a str,
    /// Beside the y axis.
    pub y_label: &'a str,
    /// Before an x value in a point's tooltip (`QD`), and after a y value (`IOPS`).
    pub x_prefix: &'a str,
    pub y_unit: &'a str,
}

/// The NVMe chart's axes.
const QUEUE_DEPTH_AXES: Axes<'static> = Axes {
    x_label: "queue depth (log scale)",
    y_label: "IOPS",
    x_prefix: "QD",
    y_unit: "IOPS",
};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 460.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 56.0;
const BOTTOM: f64 = 64.0;

/// A "nice" axis maximum and step (1, 2 or 5 times a power of ten) with about five ticks.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let rough = max / 5.0;
    let magnitude = 10f64.powf(rough.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= rough)
        .unwrap_or(10.0 * magnitude);
    ((max / step).ceil() * step, step)
}

/// `12k`, `1.5k`, `800`, `2.5M`.
fn short_number(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = if scaled.fract().abs() < 1e-9 {
        format!("{scaled:.0}")
    } else {
        format!("{scaled:.1}")
    };
    format!("{text}{suffix}")
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The IOPS-against-queue-depth chart as a standalone SVG document.
pub fn iops_vs_queue_depth(title: &str, subtitle: &str, series: &[Series]) -> String {
    line_chart(title, subtitle, &QUEUE_DEPTH_AXES, series)
}

/// A chart of `series` on `axes` as a standalone SVG document.
pub fn line_chart(title: &str, subtitle: &str, axes: &Axes<'_>, series: &[Series]) -> String {
    let mut depths: Vec<u32> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(qd, _)| qd))
        .filter(|&qd| qd > 0)
        .collect();
    depths.sort_unstable();
    depths.dedup();
    let max_iops = series
        .iter()
        .flat_map(|s| s.points.iter().map(|&(_, iops)| iops))
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (y_max, y_step) = nice_axis(max_iops * 1.05);

    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let (lo, hi) = match (depths.first(), depths.last()) {
        (Some(&lo), Some(&hi)) if hi > lo => (f64::from(lo).log2(), f64::from(hi).log2()),
        (Some(&only), _) => (f64::from(only).log2() - 1.0, f64::from(only).log2() + 1.0),
        _ => (0.0, 5.0),
    };
    let x = |qd: u32| LEFT + (f64::from(qd).log2() - lo) / (hi - lo) * plot_w;
    let y = |iops: f64| TOP + plot_h - (iops / y_max).clamp(0.0, 1.0) * plot_h;

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="16" font-weight="bold">{}</text>"#,
        WIDTH / 2.0,
        escape(title)
    );
    let _ = writeln!(
        svg,
        r##"<text x="{}" y="40" text-anchor="middle" fill="#555">{}</text>"##,
        WIDTH / 2.0,
        escape(subtitle)
    );

    // Grid and y ticks.
    let ticks = (y_max / y_step).round() as u32;
    for i in 0..=ticks {
        let value = f64::from(i) * y_step;
        let ty = y(value);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{ty:.1}" x2="{:.1}" y2="{ty:.1}" stroke="#ddd"/>"##,
            LEFT + plot_w
        );
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 8.0,
            ty + 4.0,
            short_number(value)
        );
    }
    // X ticks at each queue depth measured.
    for &qd in &depths {
        let tx = x(qd);
        let _ = writeln!(
            svg,
            r##"<line x1="{tx:.1}" y1="{TOP}" x2="{tx:.1}" y2="{:.1}" stroke="#eee"/>"##,
            TOP + plot_h
        );
        let _ = writeln!(
            svg,
            r#"<text x="{tx:.1}" y="{:.1}" text-anchor="middle">{qd}</text>"#,
            TOP + plot_h + 20.0
        );
    }
    // Axes and their labels.
    let _ = writeln!(
        svg,
        r#"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="black"/>"#,
        TOP + plot_h,
        LEFT + plot_w
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0,
        escape(axes.x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + plot_h / 2.0,
        escape(axes.y_label)
    );

    // The lines, with a marker on each point.
    for s in series {
        let mut points: Vec<(u32, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|&(qd, iops)| qd > 0 && iops.is_finite())
            .collect();
        points.sort_by_key(|&(qd, _)| qd);
        if points.is_empty() {
            continue;
        }
        let path = points
            .iter()
            .map(|&(qd, iops)| format!("{:.1},{:.1}", x(qd), y(iops)))
            .collect::<Vec<_>>()
            .join(" ");
        let dash = if s.dashed {
            r#" stroke-dasharray="7,4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<polyline points="{path}" fill="none" stroke="{}" stroke-width="2.5"{dash}/>"#,
            s.color
        );
        for &(qd, iops) in &points {
            let _ = writeln!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"><title>{}: {}{qd}, {:.0} {}</title></circle>"#,
                x(qd),
                y(iops),
                s.color,
                escape(&s.label),
                escape(axes.x_prefix),
                iops,
                escape(axes.y_unit)
            );
        }
    }

    // Legend, top left inside the plot.
    let shown: Vec<&Series> = series.iter().filter(|s| !s.points.is_empty()).collect();
    if !shown.is_empty() {
        let legend_w = 12.0
            + 40.0
            + shown
                .iter()
                .map(|s| s.label.chars().count() as f64 * 7.2)
                .fold(0.0, f64::max);
        let legend_h = 10.0 + 20.0 * shown.len() as f64;
        let (lx, ly) = (LEFT + 12.0, TOP + 10.0);
        let _ = writeln!(
            svg,
            r##"<rect x="{lx}" y="{ly}" width="{legend_w:.1}" height="{legend_h}" fill="white" fill-opacity="0.9" stroke="#999"/>"##
        );
        for (i, s) in shown.iter().enumerate() {
            let row = ly + 18.0 + 20.0 * i as f64;
            let dash = if s.dashed {
                r#" stroke-dasharray="7,4""#
            } else {
                ""
            };
            let _ = writeln!(
                svg,
                r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="2.5"{dash}/>"#,
                lx + 8.0,
                row - 4.0,
                lx + 38.0,
                row - 4.0,
                s.color
            );
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{row:.1}">{}</text>"#,
                lx + 46.0,
                escape(&s.label)
            );
        }
    }
    if shown.is_empty() {
        let _ = writeln!(
            svg,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#a00">no measurements</text>"##,
            LEFT + plot_w / 2.0,
            TOP + plot_h / 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_steps_are_round() {
        assert_eq!(nice_axis(12_345.0), (15_000.0, 5_000.0));
        assert_eq!(nice_axis(9_000.0), (10_000.0, 2_000.0));
        assert_eq!(nice_axis(100.0), (100.0, 20.0));
        assert_eq!(nice_axis(0.0), (1.0, 0.2));
        assert_eq!(nice_axis(f64::NAN), (1.0, 0.2));
        let (max, step) = nice_axis(987_654.0);
        assert!(max >= 987_654.0 && (max / step) <= 10.0);
    }

    #[test]
    fn numbers_are_short() {
        assert_eq!(short_number(0.0), "0");
        assert_eq!(short_number(800.0), "800");
        assert_eq!(short_number(12_000.0), "12k");
        assert_eq!(short_number(1_500.0), "1.5k");
        assert_eq!(short_number(2_500_000.0), "2.5M");
    }

    #[test]
    fn chart_has_axes_legend_and_lines() {
        let series = [
            Series {
                label: "kernel (interrupts)".into(),
                color: "#1f77b4",
                dashed: false,
                points: vec![(1, 3_000.0), (32, 12_000.0), (4, 7_000.0)],
            },
            Series {
                label: "ring3 <poll>".into(),
                color: "#d62728",
                dashed: true,
                points: vec![(1, 5_000.0), (32, 20_000.0)],
            },
            Series {
                label: "not measured".into(),
                color: "#000",
                dashed: false,
                points: vec![],
            },
        ];
        let svg = iops_vs_queue_depth("IOPS & QD", "TCG", &series);
        assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("IOPS &amp; QD"));
        assert!(svg.contains("ring3 &lt;poll&gt;"));
        assert!(!svg.contains("not measured"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 5);
        assert!(svg.contains("queue depth"));
        assert!(svg.contains(">32</text>"));
        assert!(svg.contains(">20k</text>"));
        // Points lie inside the plot area.
        for number in svg
            .split("cx=\"")
            .skip(1)
            .filter_map(|rest| rest.split('"').next())
            .filter_map(|n| n.parse::<f64>().ok())
        {
            assert!((LEFT..=WIDTH - RIGHT).contains(&number), "{number}");
        }
    }

    #[test]
    fn empty_chart_says_so() {
        let svg = iops_vs_queue_depth("t", "s", &[]);
        assert!(svg.contains("no measurements"));
    }
}
