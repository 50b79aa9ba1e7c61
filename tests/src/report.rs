//! Report tables, written as aligned text for a terminal and as Markdown for `docs/`: the
//! benchmark binaries (`src/bin/bench_*.rs`, through `bench_util`) and the benchmark suite's
//! report (`loadgen suite`) are built from them.

/// How a table's Markdown columns are aligned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Align {
    /// The first column left, the others (figures) right: `|---|---:|`.
    #[default]
    Figures,
    /// Every column as Markdown's default (left): `|---|---|`; an empty header cell (the
    /// unnamed value column of a key–value table) is written `| |`.
    Plain,
}

/// A table: a title, a header and rows of cells.
pub struct Table {
    pub title: String,
    pub header: Vec<String>,
    pub rows: Vec<Vec<String>>,
    pub align: Align,
}

impl Table {
    /// A titled table of figures (the benchmark binaries' tables).
    pub fn new(title: &str, header: &[&str]) -> Table {
        Table {
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
            align: Align::Figures,
        }
    }

    /// An untitled table with plain columns (the suite's report, where a heading names it).
    pub fn plain(header: &[&str]) -> Table {
        Table {
            align: Align::Plain,
            ..Table::new("", header)
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The title, then the columns padded to their widest cell (the first left-aligned, the
    /// others right-aligned) under a rule.
    pub fn text(&self) -> String {
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                if i < widths.len() {
                    widths[i] = widths[i].max(cell.chars().count());
                }
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from(" ");
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                if i == 0 {
                    out.push_str(cell);
                    out.push_str(&" ".repeat(pad));
                } else {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(cell);
                }
                out.push_str("  ");
            }
            out.trim_end().to_string()
        };
        let mut out = format!("{}\n", self.title);
        out.push_str(&line(&self.header));
        out.push('\n');
        let total: usize = widths.iter().sum::<usize>() + 2 * widths.len();
        out.push_str(&format!(" {}\n", "-".repeat(total.saturating_sub(1))));
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// The table in Markdown: the title in bold (when there is one), the header, the
    /// alignment row and the rows.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        if !self.title.is_empty() {
            out.push_str(&format!("**{}**\n\n", self.title));
        }
        out.push_str(&self.markdown_row(&self.header, true));
        let aligns: Vec<&str> = (0..self.header.len())
            .map(|i| match self.align {
                Align::Figures if i > 0 => "---:",
                _ => "---",
            })
            .collect();
        out.push_str(&format!("|{}|\n", aligns.join("|")));
        for row in &self.rows {
            out.push_str(&self.markdown_row(row, false));
        }
        out
    }

    fn markdown_row(&self, cells: &[String], header: bool) -> String {
        let mut out = String::from("|");
        for cell in cells {
            if cell.is_empty() && header && self.align == Align::Plain {
                out.push_str(" |");
            } else {
                out.push_str(&format!(" {cell} |"));
            }
        }
        out.push('\n');
        out
    }
}

/// A titled part of a report: lines (bullets in Markdown), then tables.
#[derive(Default)]
pub struct Section {
    pub title: String,
    pub lines: Vec<String>,
    pub tables: Vec<Table>,
}

impl Section {
    pub fn text(&self) -> String {
        let mut out = format!("== {} ==\n", self.title);
        for l in &self.lines {
            out.push_str(&format!("{l}\n"));
        }
        for t in &self.tables {
            out.push('\n');
            out.push_str(&t.text());
        }
        out
    }

    pub fn markdown(&self) -> String {
        let mut out = format!("### {}\n\n", self.title);
        for l in &self.lines {
            out.push_str(&format!("- {l}\n"));
        }
        for t in &self.tables {
            out.push('\n');
            out.push_str(&t.markdown());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_are_right_aligned_in_markdown() {
        let mut t = Table::new("T", &["what", "n"]);
        t.row(vec!["a".into(), String::new()]);
        assert_eq!(
            t.markdown(),
            "**T**\n\n| what | n |\n|---|---:|\n| a |  |\n"
        );
    }

    #[test]
    fn plain_tables_have_no_title_and_a_compact_unnamed_column() {
        let mut t = Table::plain(&["machine", ""]);
        t.row(vec!["commit".into(), "`abc`".into()]);
        t.row(vec!["redis".into(), String::new()]);
        assert_eq!(
            t.markdown(),
            "| machine | |\n|---|---|\n| commit | `abc` |\n| redis |  |\n"
        );
    }

    #[test]
    fn text_pads_columns() {
        let mut t = Table::new("T", &["what", "n"]);
        t.row(vec!["long name".into(), "1".into()]);
        assert_eq!(
            t.text(),
            "T\n what       n\n -------------\n long name  1\n"
        );
    }
}
