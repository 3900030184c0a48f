//! kubectl-style tables: left-aligned columns separated by three spaces,
//! upper-case headers, no trailing blanks. Watch lines reuse the column
//! widths of the table printed before them, behind an event-type column.
//! Pure: text in, text out.

/// Spaces between columns.
const GAP: usize = 3;
/// Width of the event column of watch lines (`MODIFIED`).
const EVENT_WIDTH: usize = 8;

/// Column widths of a printed table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    widths: Vec<usize>,
}

impl Layout {
    /// Widths that fit the headers and every row.
    pub(crate) fn fit(headers: &[&str], rows: &[Vec<String>]) -> Self {
        let mut layout = Layout::default();
        layout.widen(headers);
        for row in rows {
            layout.widen(row);
        }
        layout
    }

    /// Widens the columns to fit `cells`, so that later lines stay aligned
    /// with this one.
    pub(crate) fn widen<S: AsRef<str>>(&mut self, cells: &[S]) {
        for (i, cell) in cells.iter().enumerate() {
            let w = cell.as_ref().chars().count();
            match self.widths.get_mut(i) {
                Some(old) => *old = (*old).max(w),
                None => self.widths.push(w),
            }
        }
    }

    /// One line: each cell but the last padded to its column's width (or
    /// its own, if longer) plus the gap.
    pub(crate) fn line<S: AsRef<str>>(&self, cells: &[S]) -> String {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let cell = cell.as_ref();
            out.push_str(cell);
            if i + 1 < cells.len() {
                let width = self.widths.get(i).copied().unwrap_or(0);
                let pad = width.saturating_sub(cell.chars().count()) + GAP;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.truncate(out.trim_end().len());
        out
    }

    /// A watch line: the event type, then the row in this layout.
    pub(crate) fn event_line<S: AsRef<str>>(&self, event: &str, cells: &[S]) -> String {
        let pad = EVENT_WIDTH.saturating_sub(event.len()) + GAP;
        let mut out = String::from(event);
        out.extend(std::iter::repeat_n(' ', pad));
        out.push_str(&self.line(cells));
        out
    }
}

/// Renders a whole table (header and rows), each line ending in `\n`, and
/// returns it with its layout.
pub(crate) fn render(headers: &[&str], rows: &[Vec<String>]) -> (String, Layout) {
    let layout = Layout::fit(headers, rows);
    let mut out = layout.line(headers);
    out.push('\n');
    for row in rows {
        out.push_str(&layout.line(row));
        out.push('\n');
    }
    (out, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cells: &[&str]) -> Vec<String> {
        cells.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn columns_are_aligned_with_three_spaces() {
        let (text, _) = render(
            &["NAME", "TYPE", "AGE"],
            &[
                row(&["web", "ClusterIP", "3m"]),
                row(&["database", "Headless", "45s"]),
            ],
        );
        assert_eq!(
            text,
            "NAME       TYPE        AGE\n\
             web        ClusterIP   3m\n\
             database   Headless    45s\n"
        );
    }

    #[test]
    fn empty_table_is_its_header() {
        let (text, _) = render(&["NAME", "AGE"], &[]);
        assert_eq!(text, "NAME   AGE\n");
    }

    #[test]
    fn no_trailing_blanks() {
        let (text, _) = render(&["NAME", "X"], &[row(&["a", ""])]);
        assert_eq!(text, "NAME   X\na\n");
    }

    #[test]
    fn event_lines_keep_the_layout() {
        let (_, layout) = render(
            &["NAME", "TYPE", "AGE"],
            &[row(&["web", "ClusterIP", "3m"])],
        );
        assert_eq!(
            layout.event_line("MODIFIED", &row(&["web", "Headless", "4m"])),
            "MODIFIED   web    Headless    4m"
        );
        assert_eq!(
            layout.event_line("ADDED", &row(&["a-much-longer-name", "ClusterIP", "0s"])),
            "ADDED      a-much-longer-name   ClusterIP   0s"
        );
        let mut layout = layout;
        layout.widen(&row(&["a-much-longer-name", "ClusterIP", "0s"]));
        assert_eq!(
            layout.event_line("DELETED", &row(&["web", "ClusterIP", "5s"])),
            "DELETED    web                  ClusterIP   5s"
        );
    }
}
