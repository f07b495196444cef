//! A small SVG bar chart of ftvm/QEMU ratios (no plotting dependency needed for one chart).

/// Horizontal bars, one per scenario, with a reference line at ratio 1.0.
pub fn bars(items: &[(&str, f64)]) -> String {
    let (label_w, bar_w, row_h, top) = (180.0, 420.0, 34.0, 40.0);
    let max = items.iter().map(|(_, r)| *r).filter(|r| r.is_finite()).fold(1.5f64, f64::max) * 1.1;
    let height = top + row_h * items.len() as f64 + 30.0;
    let width = label_w + bar_w + 90.0;
    let x = |r: f64| label_w + r / max * bar_w;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"13\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"22\" font-size=\"15\">ftvm / QEMU microvm (median, lower is faster for times)</text>\n"
    );
    for (i, (name, ratio)) in items.iter().enumerate() {
        let y = top + row_h * i as f64;
        let r = if ratio.is_finite() { *ratio } else { 0.0 };
        svg += &format!(
            "<text x=\"10\" y=\"{:.1}\">{name}</text>\n<rect x=\"{label_w}\" y=\"{:.1}\" width=\"{:.1}\" height=\"20\" fill=\"#4a7fb5\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{r:.3}</text>\n",
            y + 15.0,
            y + 1.0,
            x(r) - label_w,
            x(r) + 6.0,
            y + 15.0
        );
    }
    let one = x(1.0);
    svg += &format!(
        "<line x1=\"{one:.1}\" y1=\"{:.1}\" x2=\"{one:.1}\" y2=\"{:.1}\" stroke=\"#c33\" stroke-dasharray=\"4 3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#c33\">1.0</text>\n</svg>\n",
        top - 6.0,
        height - 24.0,
        one - 8.0,
        height - 10.0
    );
    svg
}
