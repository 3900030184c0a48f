//! Results and their presentation: one [`Table`] per section, each row a
//! metric with skymesh's value and the peers' values measured in the same
//! run, rendered as plain text for the terminal and as markdown for
//! `BENCHMARKS.md` (with the machine it ran on and the peers' versions).

use std::fmt::Write as _;

/// Median of `v` (mean of the middle two for an even count); `None` if empty.
pub fn median(v: &[f64]) -> Option<f64> {
    percentile(v, 50.0)
}

/// The `p`-th percentile of `v` by linear interpolation between the closest
/// ranks; `None` if empty.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let rank = (p / 100.0).clamp(0.0, 1.0) * (s.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    let frac = rank - lo as f64;
    Some(s[lo] + (s[hi] - s[lo]) * frac)
}

/// Unit of a metric: how its values are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Gigabits per second.
    Gbps,
    /// Milliseconds.
    Ms,
    /// Seconds.
    Secs,
    /// Percent.
    Pct,
    /// Operations per second.
    PerSec,
    /// Bytes (printed as KiB/MiB).
    Bytes,
    /// A plain count.
    Count,
}

impl Unit {
    fn fmt(self, v: f64) -> String {
        match self {
            Unit::Gbps => format!("{v:.2} Gbit/s"),
            Unit::Ms => {
                if v < 10.0 {
                    format!("{v:.3} ms")
                } else {
                    format!("{v:.0} ms")
                }
            }
            Unit::Secs => format!("{v:.2} s"),
            Unit::Pct => format!("{v:.1} %"),
            Unit::PerSec => format!("{v:.0} /s"),
            Unit::Bytes => {
                if v >= 1024.0 * 1024.0 {
                    format!("{:.2} MiB", v / (1024.0 * 1024.0))
                } else {
                    format!("{:.1} KiB", v / 1024.0)
                }
            }
            Unit::Count => format!("{v:.0}"),
        }
    }
}

/// Which direction of a metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One measured value: the median of several runs, not applicable, or a
/// failure (which makes the command exit non-zero).
#[derive(Debug, Clone)]
pub enum Cell {
    Value { median: f64, runs: usize },
    Na(String),
    Failed(String),
}

impl Cell {
    /// The median of `samples`, or a failure if there are none.
    pub fn from_samples(samples: &[f64]) -> Cell {
        match median(samples) {
            Some(m) => Cell::Value {
                median: m,
                runs: samples.len(),
            },
            None => Cell::Failed("no successful run".into()),
        }
    }

    /// The value, or the error, of a fallible measurement.
    pub fn from_result(r: anyhow::Result<Vec<f64>>) -> Cell {
        match r {
            Ok(s) => Cell::from_samples(&s),
            Err(e) => Cell::Failed(format!("{e:#}")),
        }
    }

    fn value(&self) -> Option<f64> {
        match self {
            Cell::Value { median, .. } => Some(*median),
            _ => None,
        }
    }

    fn show(&self, unit: Unit) -> String {
        match self {
            Cell::Value { median, .. } => unit.fmt(*median),
            Cell::Na(why) => format!("n/a ({why})"),
            Cell::Failed(_) => "FAILED".into(),
        }
    }
}

/// One metric: skymesh's value and each peer's.
#[derive(Debug, Clone)]
pub struct Row {
    pub metric: String,
    pub unit: Unit,
    pub better: Better,
    pub skymesh: Cell,
    /// One per [`Table::peers`] column (missing cells print as blank).
    pub peers: Vec<Cell>,
}

impl Row {
    /// A row without peers.
    pub fn solo(metric: &str, unit: Unit, better: Better, skymesh: Cell) -> Row {
        Row {
            metric: metric.into(),
            unit,
            better,
            skymesh,
            peers: Vec::new(),
        }
    }
}

/// One section's results.
#[derive(Debug, Clone)]
pub struct Table {
    pub title: String,
    /// How it was measured (one paragraph).
    pub note: String,
    /// Column header of skymesh's values (e.g. `meshd`).
    pub skymesh: String,
    /// Column headers of the peers.
    pub peers: Vec<String>,
    pub rows: Vec<Row>,
    /// Further tables printed after this one (e.g. CPU per thread).
    pub appendix: Vec<Grid>,
}

/// A plain table of text cells under a subheading: for figures that are
/// not skymesh-vs-peer comparisons.
#[derive(Debug, Clone)]
pub struct Grid {
    pub title: String,
    /// How it was measured (one paragraph).
    pub note: String,
    pub header: Vec<String>,
    /// How many leading columns are labels (left-aligned in markdown).
    pub labels: usize,
    pub rows: Vec<Vec<String>>,
}

impl Grid {
    /// Fixed-width text for the terminal.
    pub fn text(&self) -> String {
        format!(
            "-- {} --\n{}",
            self.title,
            fixed_width(&self.header, &self.rows)
        )
    }

    /// A markdown subsection: heading, note, table.
    pub fn markdown(&self) -> String {
        let mut s = format!("### {}\n\n{}\n\n", self.title, self.note);
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(
            s,
            "|{}",
            (0..self.header.len())
                .map(|i| if i < self.labels { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in &self.rows {
            let _ = writeln!(s, "| {} |", r.join(" | ").replace('\n', " "));
        }
        s
    }
}

/// Columns padded to their widest cell, two spaces apart.
fn fixed_width(header: &[String], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (c, w) in cells.iter().zip(&width) {
            let pad = w.saturating_sub(c.chars().count());
            let _ = write!(s, "{c}{}  ", " ".repeat(pad));
        }
        s.trim_end().to_string()
    };
    let mut s = line(header);
    s.push('\n');
    for r in rows {
        s.push_str(&line(r));
        s.push('\n');
    }
    s
}

impl Table {
    /// An empty table.
    pub fn new(title: &str, skymesh: &str, peers: &[&str], note: String) -> Table {
        Table {
            title: title.into(),
            note,
            skymesh: skymesh.into(),
            peers: peers.iter().map(|p| p.to_string()).collect(),
            rows: Vec::new(),
            appendix: Vec::new(),
        }
    }

    /// Every failure in the table, as `metric: column: error`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for r in &self.rows {
            let cols = std::iter::once((&self.skymesh, &r.skymesh))
                .chain(self.peers.iter().zip(r.peers.iter()));
            for (col, c) in cols {
                if let Cell::Failed(e) = c {
                    out.push(format!("{} / {}: {col}: {e}", self.title, r.metric));
                }
            }
        }
        out
    }

    fn header(&self) -> Vec<String> {
        let mut h = vec!["metric".to_string(), self.skymesh.clone()];
        for p in &self.peers {
            h.push(p.clone());
            h.push(format!("{} ÷ {p}", self.skymesh));
        }
        h
    }

    fn cells(&self) -> Vec<Vec<String>> {
        self.rows
            .iter()
            .map(|r| {
                let arrow = match r.better {
                    Better::Higher => "↑",
                    Better::Lower => "↓",
                };
                let mut v = vec![format!("{} {arrow}", r.metric), r.skymesh.show(r.unit)];
                for i in 0..self.peers.len() {
                    match r.peers.get(i) {
                        Some(c) => {
                            v.push(c.show(r.unit));
                            v.push(ratio(&r.skymesh, c));
                        }
                        None => {
                            v.push(String::new());
                            v.push(String::new());
                        }
                    }
                }
                v
            })
            .collect()
    }

    /// Fixed-width text for the terminal.
    pub fn text(&self) -> String {
        let mut s = format!(
            "== {} ==\n{}",
            self.title,
            fixed_width(&self.header(), &self.cells())
        );
        for f in self.failures() {
            let _ = writeln!(s, "  FAILED: {f}");
        }
        for g in &self.appendix {
            s.push_str(&g.text());
        }
        s
    }

    /// A markdown section: heading, note, table, failures.
    pub fn markdown(&self) -> String {
        let header = self.header();
        let mut s = format!("## {}\n\n{}\n\n", self.title, self.note);
        let _ = writeln!(s, "| {} |", header.join(" | "));
        let _ = writeln!(
            s,
            "|{}",
            header
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---|" } else { "---:|" })
                .collect::<String>()
        );
        for r in self.cells() {
            let _ = writeln!(s, "| {} |", r.join(" | ").replace('\n', " "));
        }
        let failures = self.failures();
        if !failures.is_empty() {
            s.push('\n');
            for f in failures {
                let _ = writeln!(s, "- FAILED: {}", f.replace('\n', " "));
            }
        }
        for g in &self.appendix {
            s.push('\n');
            s.push_str(&g.markdown());
        }
        s
    }
}

/// `skymesh ÷ peer` as `0.42×`, blank when either side has no value.
fn ratio(skymesh: &Cell, peer: &Cell) -> String {
    match (skymesh.value(), peer.value()) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}×", a / b),
        _ => String::new(),
    }
}

/// The whole report as markdown.
pub fn markdown(
    machine: &[(String, String)],
    versions: &[(String, String)],
    tables: &[Table],
    mode: &str,
) -> String {
    let mut s = String::from(
        "# skymesh benchmarks\n\n\
         Generated by `cargo run --release -p skymesh-bench -- [--quick] --out BENCHMARKS.md`; \
         do not edit by hand. Every figure is the median of several runs; every peer was \
         measured in the same run on the same machine, so the ratios (skymesh ÷ peer) are \
         what to compare across machines, not the absolute numbers. ↑ = higher is better, \
         ↓ = lower is better. Other processes on the machine make the numbers noisy.\n\n",
    );
    let _ = writeln!(s, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in machine {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    let _ = writeln!(s, "| mode | {mode} |");
    let _ = writeln!(s, "\n## Peers\n\n| peer | version |\n|---|---|");
    for (k, v) in versions {
        let _ = writeln!(s, "| {k} | {v} |");
    }
    s.push('\n');
    for t in tables {
        s.push_str(&t.markdown());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_percentiles() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(100.0));
    }

    #[test]
    fn table_renders_ratios_and_failures() {
        let mut t = Table::new("T", "meshd", &["wg"], "note".into());
        t.rows.push(Row {
            metric: "tput".into(),
            unit: Unit::Gbps,
            better: Better::Higher,
            skymesh: Cell::from_samples(&[1.0, 2.0, 3.0]),
            peers: vec![Cell::from_samples(&[4.0])],
        });
        t.rows.push(Row::solo(
            "x",
            Unit::Ms,
            Better::Lower,
            Cell::Failed("boom".into()),
        ));
        let md = t.markdown();
        assert!(
            md.contains("| tput ↑ | 2.00 Gbit/s | 4.00 Gbit/s | 0.50× |"),
            "{md}"
        );
        assert_eq!(t.failures().len(), 1);
        assert!(t.text().contains("FAILED: T / x: meshd: boom"));
    }
}
