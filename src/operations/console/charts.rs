//! The console's charts: small inline SVG drawn on the server, so a page needs no script and no
//! chart library, and reads the same in every browser. Two kinds: stacked bars (counts per slot,
//! e.g. deliveries and failures per minute) and lines (e.g. latency percentiles per minute).
//!
//! Each chart is a `<figure>`: a caption, the SVG (`role="img"` with a `<title>` and a `<desc>` that
//! says in words what it shows, for screen readers), a legend. Every slot has an invisible hover
//! area with its own `<title>`, so pointing at a minute shows its figures. Colours come from the
//! series' CSS classes (`console.css`), so the chart follows the stylesheet.

use maud::{Markup, html};

/// The drawing's coordinate system (the SVG scales to its container's width).
const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 200.0;
/// Room for the y labels on the left and the x labels below.
const LEFT: f64 = 46.0;
const RIGHT: f64 = 8.0;
const TOP: f64 = 10.0;
const BOTTOM: f64 = 24.0;
/// Horizontal grid lines (and y labels) above zero.
const Y_TICKS: usize = 4;

/// One series: a value per slot (`None`: nothing measured there).
#[derive(Debug, Clone)]
pub(super) struct Series {
    /// Its name in the legend and the hover titles.
    pub label: String,
    /// Its CSS class (colour), e.g. `ok`, `bad`, `p50`, `p99`.
    pub class: &'static str,
    /// One value per slot.
    pub values: Vec<Option<f64>>,
}

/// What a chart shows.
#[derive(Debug, Clone)]
pub(super) struct Chart {
    /// Unique on the page: the SVG's `<title>` and `<desc>` are referenced by id.
    pub id: &'static str,
    /// The caption and the SVG's accessible title.
    pub title: String,
    /// What it shows, in words (the SVG's `<desc>`): totals, peaks.
    pub description: String,
    /// The unit of the values (`ms`), shown in the caption and the hover titles; empty for counts.
    pub unit: &'static str,
    /// One label per slot; empty ones are not drawn (label every tenth minute, say).
    pub x_labels: Vec<String>,
    /// What each slot is called in its hover title (`10:42 UTC`).
    pub slot_names: Vec<String>,
    /// The series, drawn in order (bars: bottom up).
    pub series: Vec<Series>,
}

impl Chart {
    fn slots(&self) -> usize {
        self.x_labels.len()
    }

    fn slot_width(&self) -> f64 {
        (WIDTH - LEFT - RIGHT) / self.slots().max(1) as f64
    }

    fn x(&self, slot: usize) -> f64 {
        LEFT + self.slot_width() * slot as f64
    }
}

/// A stacked bar chart: each slot's bar is the sum of the series, each series its own colour.
pub(super) fn stacked_bars(chart: &Chart) -> Markup {
    let totals: Vec<f64> = (0..chart.slots())
        .map(|slot| chart.series.iter().map(|s| value(s, slot)).sum())
        .collect();
    let top = nice_ceiling(totals.iter().copied().fold(0.0, f64::max));
    let scale = YScale { top };
    let bar_width = chart.slot_width() * 0.8;
    // Each series' segment starts where the one below it ended.
    let mut segments = Vec::new();
    for slot in 0..chart.slots() {
        let mut base = 0.0;
        for series in &chart.series {
            let v = value(series, slot);
            if v > 0.0 {
                let (bottom, top) = (scale.y(base), scale.y(base + v));
                segments.push((
                    series.class,
                    chart.x(slot) + chart.slot_width() * 0.1,
                    top,
                    bottom - top,
                ));
                base += v;
            }
        }
    }
    let bars = html! {
        @for (class, x, y, height) in segments {
            rect class=(class) x=(coordinate(x)) y=(coordinate(y))
                width=(coordinate(bar_width)) height=(coordinate(height)) {}
        }
    };
    frame(chart, &scale, bars)
}

/// A line chart: one line per series, broken where a slot has no value (a lone value is a dot).
pub(super) fn lines(chart: &Chart) -> Markup {
    let highest = chart
        .series
        .iter()
        .flat_map(|series| series.values.iter().flatten().copied())
        .fold(0.0, f64::max);
    let scale = YScale {
        top: nice_ceiling(highest),
    };
    let paths = html! {
        @for series in &chart.series {
            path class=(series.class) d=(line_path(chart, series, &scale)) {}
        }
    };
    frame(chart, &scale, paths)
}

/// The SVG path of a series: `M` starts a run of values, `L` continues it; a run of one value is a
/// zero-length segment, which the round line cap draws as a dot.
fn line_path(chart: &Chart, series: &Series, scale: &YScale) -> String {
    let mut path = String::new();
    let mut in_run = false;
    for slot in 0..chart.slots() {
        match series.values.get(slot).copied().flatten() {
            Some(v) => {
                let (x, y) = (chart.x(slot) + chart.slot_width() / 2.0, scale.y(v));
                let command = if in_run { 'L' } else { 'M' };
                path.push_str(&format!("{command}{} {} ", coordinate(x), coordinate(y)));
                if !in_run {
                    // A second point at the same place: a lone value still shows.
                    path.push_str(&format!("L{} {} ", coordinate(x), coordinate(y)));
                }
                in_run = true;
            }
            None => in_run = false,
        }
    }
    path.trim_end().to_owned()
}

/// The y axis: zero at the bottom of the plot, `top` at its top.
struct YScale {
    top: f64,
}

impl YScale {
    fn y(&self, value: f64) -> f64 {
        let plot = HEIGHT - TOP - BOTTOM;
        HEIGHT - BOTTOM - plot * (value / self.top).clamp(0.0, 1.0)
    }
}

/// What every chart has around its marks: the grid and y labels, the x labels, the hover areas,
/// the accessible title and description, the legend.
fn frame(chart: &Chart, scale: &YScale, marks: Markup) -> Markup {
    let title_id = format!("{}-title", chart.id);
    let desc_id = format!("{}-desc", chart.id);
    let step = scale.top / Y_TICKS as f64;
    html! {
        figure.chart id=(chart.id) {
            figcaption {
                (chart.title)
                @if !chart.unit.is_empty() { span.muted { " · " (chart.unit) } }
            }
            svg xmlns="http://www.w3.org/2000/svg" viewBox=(format!("0 0 {WIDTH} {HEIGHT}"))
                role="img" aria-labelledby=(format!("{title_id} {desc_id}")) {
                title id=(title_id) { (chart.title) }
                desc id=(desc_id) { (chart.description) }
                g.grid {
                    @for tick in 0..=Y_TICKS {
                        @let v = step * tick as f64;
                        @let y = coordinate(scale.y(v));
                        line x1=(coordinate(LEFT)) x2=(coordinate(WIDTH - RIGHT)) y1=(y) y2=(y) {}
                        text.y-label x=(coordinate(LEFT - 4.0)) y=(y) text-anchor="end"
                            dominant-baseline="middle" { (axis_number(v)) }
                    }
                }
                (marks)
                g.x-labels {
                    @for (slot, label) in chart.x_labels.iter().enumerate() {
                        @if !label.is_empty() {
                            text x=(coordinate(chart.x(slot) + chart.slot_width() / 2.0))
                                y=(coordinate(HEIGHT - 6.0)) text-anchor="middle" { (label) }
                        }
                    }
                }
                g.hover {
                    @for slot in 0..chart.slots() {
                        rect x=(coordinate(chart.x(slot))) y=(coordinate(TOP))
                            width=(coordinate(chart.slot_width())) height=(coordinate(HEIGHT - TOP - BOTTOM)) {
                            title { (slot_title(chart, slot)) }
                        }
                    }
                }
            }
            ul.legend {
                @for series in &chart.series {
                    li { span class=(format!("swatch {}", series.class)) {} (series.label) }
                }
            }
        }
    }
}

/// `10:42 UTC: 12 succeeded, 3 failed` (values as the legend names them).
fn slot_title(chart: &Chart, slot: usize) -> String {
    let name = chart
        .slot_names
        .get(slot)
        .or(chart.x_labels.get(slot))
        .cloned()
        .unwrap_or_default();
    let figures: Vec<String> = chart
        .series
        .iter()
        .map(|series| match series.values.get(slot).copied().flatten() {
            Some(v) => format!(
                "{} {}{}",
                series.label,
                axis_number(v),
                unit_suffix(chart.unit)
            ),
            None => format!("{} –", series.label),
        })
        .collect();
    format!("{name}: {}", figures.join(", "))
}

fn unit_suffix(unit: &str) -> String {
    if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    }
}

fn value(series: &Series, slot: usize) -> f64 {
    series.values.get(slot).copied().flatten().unwrap_or(0.0)
}

/// The smallest "round" number (1, 2 or 5 times a power of ten, times [`Y_TICKS`]) at or above
/// `highest`, so the grid lines fall on numbers people read at a glance. At least 1 (an empty chart
/// still has an axis).
pub(super) fn nice_ceiling(highest: f64) -> f64 {
    if !highest.is_finite() || highest <= 0.0 {
        return Y_TICKS as f64;
    }
    let rough_step = highest / Y_TICKS as f64;
    let magnitude = 10f64.powf(rough_step.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|factor| factor * magnitude)
        .find(|step| step * Y_TICKS as f64 >= highest)
        .unwrap_or(10.0 * magnitude);
    // Counts never need a step below one.
    let step = if highest >= 1.0 { step.max(1.0) } else { step };
    step * Y_TICKS as f64
}

/// A number for an axis or a hover title: integers as such, `1.5k` from ten thousand, one decimal
/// below ten.
pub(super) fn axis_number(value: f64) -> String {
    if value >= 10_000.0 {
        format!("{}k", trim_zero(value / 1000.0))
    } else if value >= 10.0 || value == value.trunc() {
        format!("{value:.0}")
    } else {
        trim_zero(value)
    }
}

fn trim_zero(value: f64) -> String {
    let text = format!("{value:.1}");
    text.strip_suffix(".0").map(str::to_owned).unwrap_or(text)
}

/// A coordinate with one decimal: enough for a 640-unit drawing, and a small page.
fn coordinate(value: f64) -> String {
    trim_zero(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chart(series: Vec<Series>) -> Chart {
        Chart {
            id: "test-chart",
            title: "Deliveries per minute".into(),
            description: "3 succeeded, 1 failed".into(),
            unit: "",
            x_labels: vec!["10:00".into(), String::new(), "10:02".into()],
            slot_names: vec!["10:00".into(), "10:01".into(), "10:02".into()],
            series,
        }
    }

    fn series(label: &str, class: &'static str, values: &[Option<f64>]) -> Series {
        Series {
            label: label.into(),
            class,
            values: values.to_vec(),
        }
    }

    #[test]
    fn the_axis_top_is_a_round_number_at_or_above_the_highest_value() {
        assert_eq!(nice_ceiling(0.0), 4.0);
        assert_eq!(nice_ceiling(3.0), 4.0);
        assert_eq!(nice_ceiling(4.0), 4.0);
        assert_eq!(nice_ceiling(5.0), 8.0);
        assert_eq!(nice_ceiling(37.0), 40.0);
        assert_eq!(nice_ceiling(41.0), 80.0);
        assert_eq!(nice_ceiling(950.0), 2000.0);
        assert_eq!(nice_ceiling(0.3), 0.4);
        assert_eq!(nice_ceiling(f64::NAN), 4.0);
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(axis_number(0.0), "0");
        assert_eq!(axis_number(2.5), "2.5");
        assert_eq!(axis_number(12.34), "12");
        assert_eq!(axis_number(20_000.0), "20k");
        assert_eq!(axis_number(12_500.0), "12.5k");
    }

    #[test]
    fn stacked_bars_draw_each_series_on_the_one_below() {
        let svg = stacked_bars(&chart(vec![
            series("succeeded", "ok", &[Some(3.0), None, Some(1.0)]),
            series("failed", "bad", &[Some(1.0), Some(0.0), None]),
        ]))
        .into_string();
        // Accessible: a title and a description the SVG is labelled by.
        assert!(svg.contains(r#"role="img" aria-labelledby="test-chart-title test-chart-desc""#));
        assert!(svg.contains(r#"<title id="test-chart-title">Deliveries per minute</title>"#));
        assert!(svg.contains(r#"<desc id="test-chart-desc">3 succeeded, 1 failed</desc>"#));
        // Three bars (zero and absent values draw nothing), the failed one on top of the first.
        assert_eq!(svg.matches(r#"<rect class="ok""#).count(), 2);
        assert_eq!(svg.matches(r#"<rect class="bad""#).count(), 1);
        // The axis goes to 4: 3 succeeded fill three quarters of the 166-unit plot, up from y=176.
        assert!(
            svg.contains(r#"<rect class="ok" x="65.5" y="51.5" width="156.3" height="124.5">"#)
        );
        assert!(svg.contains(r#"<rect class="bad" x="65.5" y="10" width="156.3" height="41.5">"#));
        // The labels given, the empty one left out; y labels 0 to 4.
        assert!(svg.contains(">10:00</text>") && svg.contains(">10:02</text>"));
        assert!(!svg.contains(">10:01</text>"));
        assert!(svg.contains(">4</text>"));
        // Every slot names its figures when pointed at.
        assert!(svg.contains("<title>10:01: succeeded –, failed 0</title>"));
        assert!(svg.contains(r#"<span class="swatch bad"></span>failed"#));
    }

    #[test]
    fn lines_break_where_nothing_was_measured() {
        let mut latency = chart(vec![series("p50", "p50", &[Some(10.0), None, Some(30.0)])]);
        latency.unit = "ms";
        let svg = lines(&latency).into_string();
        // Two runs of one value: each a move and a zero-length line (a dot); no line across the gap.
        assert!(svg.contains(
            r#"<path class="p50" d="M143.7 134.5 L143.7 134.5 M534.3 51.5 L534.3 51.5">"#
        ));
        assert!(svg.contains(
            "<figcaption>Deliveries per minute<span class=\"muted\"> · ms</span></figcaption>"
        ));
        assert!(svg.contains("<title>10:02: p50 30 ms</title>"));
    }
}
