//! A small SVG bar chart of ratios (no plotting dependency needed for one chart per suite).

/// One bar: a ratio, and optionally the goal it is held to (drawn as a green tick).
pub struct Bar<'a> {
    pub label: &'a str,
    pub value: f64,
    pub goal: Option<f64>,
}

/// A bar per ratio, with its goal's bound.
pub fn ratio_bars(ratios: &[crate::common::Ratio]) -> Vec<Bar<'_>> {
    ratios.iter().map(|r| Bar { label: &r.name, value: r.value, goal: r.bound }).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Horizontal bars, one per ratio, with a reference line at 1.0.
pub fn bars(title: &str, items: &[Bar]) -> String {
    let label_w = items.iter().map(|b| b.label.len()).max().unwrap_or(10).max(20) as f64 * 7.8 + 20.0;
    let (bar_w, row_h, top) = (420.0, 30.0, 40.0);
    let max =
        items.iter().flat_map(|b| [b.value, b.goal.unwrap_or(0.0)]).filter(|r| r.is_finite()).fold(1.5f64, f64::max)
            * 1.1;
    let height = top + row_h * items.len() as f64 + 30.0;
    let width = label_w + bar_w + 90.0;
    let x = |r: f64| label_w + r / max * bar_w;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">{}</text>\n",
        esc(title)
    );
    for (i, b) in items.iter().enumerate() {
        let y = top + row_h * i as f64;
        let r = if b.value.is_finite() { b.value } else { 0.0 };
        let color = match b.goal {
            Some(_) => "#4a7fb5",
            None => "#8aa9c8",
        };
        svg += &format!(
            "<text x=\"10\" y=\"{:.1}\">{}</text>\n<rect x=\"{label_w:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"20\" fill=\"{color}\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{r:.3}</text>\n",
            y + 15.0,
            esc(b.label),
            y + 1.0,
            x(r) - label_w,
            x(r) + 6.0,
            y + 15.0
        );
        if let Some(g) = b.goal {
            svg += &format!(
                "<line x1=\"{0:.1}\" y1=\"{1:.1}\" x2=\"{0:.1}\" y2=\"{2:.1}\" stroke=\"#2a2\" stroke-width=\"3\"/>\n",
                x(g),
                y - 2.0,
                y + 23.0
            );
        }
    }
    let one = x(1.0);
    svg += &format!(
        "<line x1=\"{one:.1}\" y1=\"{:.1}\" x2=\"{one:.1}\" y2=\"{:.1}\" stroke=\"#c33\" stroke-dasharray=\"4 3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#c33\">1.0</text>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#2a2\">green tick: goal</text>\n</svg>\n",
        top - 6.0,
        height - 24.0,
        one - 8.0,
        height - 10.0,
        label_w + bar_w - 60.0,
        height - 10.0
    );
    svg
}
