//! Line charts of runs, drawn with plotters' SVG backend: panels side by side, per series a line
//! through its points and, when given, a shaded band; each panel's legend sits inside it.

use crate::{Error, Result};
use plotters::prelude::*;

/// Points (x, y, band low, band high); a band is drawn where low < high.
pub type Curve = Vec<(f64, f64, f64, f64)>;

/// One line of a panel.
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Its points, in x order.
    pub points: Curve,
}

/// One chart: y in [0, 1] against the iteration.
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// Its lines.
    pub series: Vec<Series>,
}

/// Line colours, one per series (the same series has the same colour in every panel).
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x17, 0xbe, 0xcf),
];

fn draw_err(e: impl std::fmt::Display) -> Error {
    Error::invalid("plot", e.to_string())
}

/// The SVG of `panels` side by side, with `note` (if any) under them. Text is XML-escaped.
pub fn svg(panels: &[Panel], note: Option<&str>) -> Result<String> {
    let x_max =
        panels.iter().flat_map(|p| p.series.iter().flat_map(|s| s.points.iter().map(|q| q.0))).fold(1.0, f64::max);
    let (w, h) = (480 * panels.len().max(1) as u32, 400u32);
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_err)?;
        let (charts, foot) = root.split_vertically(h - 22);
        for (area, panel) in charts.split_evenly((1, panels.len().max(1))).iter().zip(panels) {
            let mut chart = ChartBuilder::on(area)
                .caption(&panel.title, ("sans-serif", 15))
                .margin(12)
                .x_label_area_size(36)
                .y_label_area_size(44)
                .build_cartesian_2d(0f64..x_max, 0f64..1f64)
                .map_err(draw_err)?;
            chart
                .configure_mesh()
                .x_desc("iteration")
                .x_label_formatter(&|x| format!("{x:.0}"))
                .y_label_formatter(&|y| format!("{y:.1}"))
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(draw_err)?;
            for (i, s) in panel.series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                if s.points.len() > 1 && s.points.iter().any(|p| p.3 > p.2) {
                    let band: Vec<(f64, f64)> =
                        s.points.iter().map(|p| (p.0, p.3)).chain(s.points.iter().rev().map(|p| (p.0, p.2))).collect();
                    chart
                        .draw_series(std::iter::once(Polygon::new(band, color.mix(0.15).filled())))
                        .map_err(draw_err)?;
                }
                let line = s.points.iter().map(|p| (p.0, p.1.clamp(0.0, 1.0)));
                chart
                    .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                    .map_err(draw_err)?
                    .label(&s.label)
                    .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
                chart.draw_series(line.map(|p| Circle::new(p, 3, color.filled()))).map_err(draw_err)?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(0x88, 0x88, 0x88))
                .label_font(("sans-serif", 12))
                .draw()
                .map_err(draw_err)?;
        }
        if let Some(note) = note {
            let style = TextStyle::from(("sans-serif", 12).into_font()).color(&RGBColor(0x55, 0x55, 0x55));
            foot.draw(&Text::new(note.to_string(), (12, 4), style)).map_err(draw_err)?;
        }
        root.present().map_err(draw_err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped_and_every_series_is_drawn() {
        let series = |label: &str, band: f64| Series {
            label: label.into(),
            points: vec![(0.0, 0.2, 0.2 - band, 0.2 + band), (6.0, 0.4, 0.4 - band, 0.4 + band)],
        };
        let s = svg(
            &[Panel { title: "a <b> & c".into(), series: vec![series("gpo <x>", 0.1), series("grpo", 0.0)] }],
            Some("note & more"),
        )
        .unwrap();
        assert!(s.contains("a &lt;b&gt; &amp; c") && s.contains("gpo &lt;x&gt;") && s.contains("note &amp; more"));
        assert!(!s.contains("<b>") && !s.contains("<x>"));
        assert_eq!(s.matches("<polygon").count(), 1, "one band: only the series with a spread");
        assert!(s.matches("<circle").count() >= 4, "a point per value");
    }
}
