//! The one table printer of the suites: columns with a header, an alignment and a least
//! width, rows of cells the suite has already formatted, and lines of their own between rows
//! (notes). A column is as wide as its least width, its header and its longest cell, so
//! that a long figure moves the whole column instead of breaking the row; columns are one
//! space apart unless [`Table::gap`] asks for more, and no line ends in blanks. Widths count characters, as `format!` pads (`µs`, `→`).
//!
//! ```ignore
//! let mut t = Table::new().left("test", 4).right("c", 3).gap(2).left("engine", 13).right("req/s", 10);
//! t.row(["SET".to_string(), "50".into(), "ftvm run".into(), format!("{:.0}", 81234.5)]);
//! t.print();
//! ```

use std::fmt::Write as _;

use crate::common::Ratio;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

#[derive(Debug, Clone)]
struct Column {
    header: String,
    align: Align,
    width: usize,
    /// Spaces before this column (none before the first).
    gap: usize,
}

#[derive(Debug, Clone)]
enum Row {
    Cells(Vec<String>),
    /// A line of its own (after the row it explains); it does not widen any column.
    Line(String),
}

/// A table, built column by column, then row by row; [`Table::print`] writes it.
#[derive(Debug, Clone, Default)]
pub struct Table {
    indent: String,
    columns: Vec<Column>,
    /// The gap before the next column added.
    next_gap: Option<usize>,
    header: bool,
    rows: Vec<Row>,
}

impl Table {
    /// A table with a header line.
    pub fn new() -> Table {
        Table { header: true, ..Table::default() }
    }

    /// A table without a header line (the headers only name the columns in code).
    pub fn headless() -> Table {
        Table { header: false, ..Table::default() }
    }

    /// Text before every line (header, rows and lines).
    pub fn indent(mut self, indent: &str) -> Table {
        self.indent = indent.to_string();
        self
    }

    /// A left-aligned column at least `width` characters wide.
    pub fn left(self, header: &str, width: usize) -> Table {
        self.column(header, Align::Left, width)
    }

    /// A right-aligned column at least `width` characters wide.
    pub fn right(self, header: &str, width: usize) -> Table {
        self.column(header, Align::Right, width)
    }

    /// `spaces` blanks before the next column (instead of one).
    pub fn gap(mut self, spaces: usize) -> Table {
        self.next_gap = Some(spaces);
        self
    }

    fn column(mut self, header: &str, align: Align, width: usize) -> Table {
        let gap = if self.columns.is_empty() { 0 } else { self.next_gap.take().unwrap_or(1) };
        self.columns.push(Column { header: header.to_string(), align, width, gap });
        self
    }

    /// One row: a cell per column (missing cells are blank, extra ones are an error in the
    /// suite: they panic, in debug builds and tests).
    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) -> &mut Table {
        let cells: Vec<String> = cells.into_iter().map(Into::into).collect();
        debug_assert!(cells.len() <= self.columns.len(), "{} cells for {} columns", cells.len(), self.columns.len());
        self.rows.push(Row::Cells(cells));
        self
    }

    /// A line of its own between rows, e.g. a note on the row above (indented as the table).
    pub fn line(&mut self, text: impl Into<String>) -> &mut Table {
        self.rows.push(Row::Line(text.into()));
        self
    }

    fn widths(&self) -> Vec<usize> {
        self.columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let header = if self.header { c.header.chars().count() } else { 0 };
                let cells = self.rows.iter().filter_map(|r| match r {
                    Row::Cells(cells) => cells.get(i).map(|s| s.chars().count()),
                    Row::Line(_) => None,
                });
                cells.chain([header]).fold(c.width, usize::max)
            })
            .collect()
    }

    fn render_cells<'a>(&self, out: &mut String, widths: &[usize], cells: impl Iterator<Item = &'a str>) {
        let mut line = self.indent.clone();
        let mut cells = cells.fuse();
        for (c, &w) in self.columns.iter().zip(widths) {
            let cell = cells.next().unwrap_or("");
            line.extend(std::iter::repeat_n(' ', c.gap));
            let _ = match c.align {
                Align::Right => write!(line, "{cell:>w$}"),
                Align::Left => write!(line, "{cell:<w$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }

    /// The table as text, a line each ending in a newline.
    pub fn render(&self) -> String {
        let widths = self.widths();
        let mut out = String::new();
        if self.header {
            self.render_cells(&mut out, &widths, self.columns.iter().map(|c| c.header.as_str()));
        }
        for row in &self.rows {
            match row {
                Row::Cells(cells) => self.render_cells(&mut out, &widths, cells.iter().map(String::as_str)),
                Row::Line(text) => {
                    out.push_str(&self.indent);
                    out.push_str(text);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Writes the table to standard output.
    pub fn print(&self) {
        print!("{}", self.render());
    }
}

/// The ratios of a report, one a line: name, value (`precision` decimals), the goal and
/// whether it was met (a column only if some ratio has a goal), the note; every suite prints
/// its ratios this way.
pub fn ratios(indent: &str, ratios: &[Ratio], precision: usize) -> Table {
    let goals = ratios.iter().any(|r| r.goal.is_some());
    let mut t = Table::headless().indent(indent).left("ratio", 0).right("value", 8);
    if goals {
        t = t.gap(2).left("goal", 0);
    }
    t = t.gap(2).left("note", 0);
    for r in ratios {
        let mut cells = vec![r.name.clone(), format!("{:.*}", precision, r.value)];
        if goals {
            cells.push(r.goal_text());
        }
        cells.push(r.note.clone().unwrap_or_default());
        t.row(cells);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pads_as_format_does_and_keeps_gaps() {
        let mut t = Table::new().left("test", 4).right("c", 3).gap(2).left("engine", 13).right("req/s", 10);
        t.row(["SET", "50", "ftvm run", "81234"]);
        t.row(["GET", "1", "QEMU microvm", "9"]);
        let want = format!(
            "{:<4} {:>3}  {:<13} {:>10}\n{:<4} {:>3}  {:<13} {:>10}\n{:<4} {:>3}  {:<13} {:>10}\n",
            "test", "c", "engine", "req/s", "SET", 50, "ftvm run", 81234, "GET", 1, "QEMU microvm", 9
        );
        assert_eq!(t.render(), want);
    }

    #[test]
    fn a_long_cell_widens_its_column_for_every_row() {
        let mut t = Table::new().left("a", 2).right("b", 3);
        t.row(["x", "1"]);
        t.row(["longer", "22"]);
        assert_eq!(t.render(), "a        b\nx        1\nlonger  22\n");
    }

    #[test]
    fn a_header_wider_than_its_column_widens_it() {
        let mut t = Table::new().right("pages r0/resent/paused", 5).right("x", 1);
        t.row(["1/2/3", "7"]);
        assert_eq!(t.render(), "pages r0/resent/paused x\n                 1/2/3 7\n");
    }

    #[test]
    fn widths_count_characters_not_bytes() {
        let mut t = Table::new().right("hold µs", 7).right("stop→run", 9);
        t.row(["12", "3.0"]);
        assert_eq!(t.render(), format!("{:>7} {:>9}\n{:>7} {:>9}\n", "hold µs", "stop→run", "12", "3.0"));
    }

    #[test]
    fn no_trailing_blanks_and_lines_stand_alone() {
        let mut t = Table::new().indent("  ").left("mode", 6).right("median", 8).gap(2).left("samples", 0);
        t.row(["run", "1.000s", "1.0 1.1"]);
        t.line("a note that is much longer than any column");
        t.row(["replay", "2.000s"]);
        assert_eq!(
            t.render(),
            "  mode     median  samples\n  run      1.000s  1.0 1.1\n  a note that is much longer than any column\n  replay   2.000s\n"
        );
    }

    #[test]
    fn headless_tables_have_no_header_line() {
        let mut t = Table::headless().left("name", 3).right("v", 2);
        t.row(["a", "1"]);
        assert_eq!(t.render(), "a    1\n");
        assert_eq!(Table::headless().left("x", 1).render(), "");
    }

    #[test]
    fn ratios_are_one_line_each_with_goal_and_note() {
        let rs = vec![
            Ratio::new("SET c=50 record/run", 0.98765).at_least(0.95),
            Ratio::new("replay/record time", 0.5).note("replay wall time / session wall time"),
            Ratio::new("x", 2.0),
        ];
        let text = ratios("", &rs, 3).render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "SET c=50 record/run    0.988  goal >= 0.95: met");
        assert_eq!(lines[1], "replay/record time     0.500                     replay wall time / session wall time");
        assert_eq!(lines[2], "x                      2.000");
        // Without goals, no goal column: the note follows the value.
        let rs = vec![Ratio::new("total", 0.5).note("ftvm / QEMU")];
        assert_eq!(ratios("  ", &rs, 3).render(), "  total    0.500  ftvm / QEMU\n");
    }
}
