//! CPU per stage during the tunnel throughput runs: every thread of both
//! tunnel processes (the sender's and the receiver's gateway), read from
//! `/proc/<pid>/task/<tid>/{comm,stat}` (utime + stime) just before an
//! iperf3 client starts and just after it ends; the iperf3 processes
//! (the server from `/proc/<pid>/stat`, the client, a reaped child of this
//! process, from this process's cutime + cstime); and the machine's
//! softirq and idle time from `/proc/stat`. Everything is in % of one core
//! over the interval, so a reader sees which stage of which implementation
//! used the cores and whether they were saturated.
//!
//! Must not: read `/proc` during the measured interval (two snapshots per
//! interval only), or guess: a thread that exits within the interval is
//! only in its process's total.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use crate::report::{Grid, median};

/// Clock ticks per second of `/proc`'s times (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> f64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(t)) if t > 0 => t as f64,
        _ => 100.0,
    }
}

/// utime + stime (clock ticks) of a `/proc/.../stat` line, and cutime +
/// cstime. The command name in parentheses may hold spaces and `)`, so
/// fields are counted from the last `)`.
fn stat_ticks(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After `)`: field 3 (state) is f[0]; utime, stime, cutime, cstime are
    // fields 14-17.
    let n = |i: usize| f.get(i)?.parse::<u64>().ok();
    Some((n(11)? + n(12)?, n(13)? + n(14)?))
}

/// The machine's `cpu` line of `/proc/stat`: (softirq, idle, busy) ticks,
/// summed over every core; busy is everything but idle and iowait.
fn system_ticks(stat: &str) -> Option<(u64, u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal guest guest_nice
    // (guest time is also in user).
    let (idle, iowait) = (*v.get(3)?, *v.get(4)?);
    let busy = v.iter().take(8).sum::<u64>().saturating_sub(idle + iowait);
    Some((*v.get(6)?, idle, busy))
}

fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_ticks(&s).map(|(own, _)| own)
}

/// Every thread of `pid`: tid → (name, utime + stime).
fn threads(pid: u32) -> HashMap<u32, (String, u64)> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
            continue;
        };
        let dir = e.path();
        let (Ok(comm), Ok(stat)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("stat")),
        ) else {
            continue;
        };
        if let Some((t, _)) = stat_ticks(&stat) {
            out.insert(tid, (comm.trim().to_string(), t));
        }
    }
    out
}

/// What to sample: the tunnel process of each side (none for the bare
/// veth) and the iperf3 server.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Sender side (gateway 1, the iperf3 client's), receiver side
    /// (gateway 2, the server's).
    pub sides: [Option<u32>; 2],
    pub iperf_server: Option<u32>,
}

/// One reading of a [`Probe`].
#[derive(Debug, Clone)]
pub struct Snapshot {
    at: Instant,
    threads: [HashMap<u32, (String, u64)>; 2],
    totals: [Option<u64>; 2],
    iperf_server: Option<u64>,
    children: Option<u64>,
    system: Option<(u64, u64, u64)>,
}

impl Probe {
    pub fn sample(&self) -> Snapshot {
        let side = |i: usize| self.sides[i].map(threads).unwrap_or_default();
        let children = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| stat_ticks(&s))
            .map(|(_, c)| c);
        Snapshot {
            at: Instant::now(),
            threads: [side(0), side(1)],
            totals: self.sides.map(|p| p.and_then(proc_ticks)),
            iperf_server: self.iperf_server.and_then(proc_ticks),
            children,
            system: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|s| system_ticks(&s)),
        }
    }
}

/// CPU over one interval, % of one core.
#[derive(Debug, Clone, Default)]
pub struct Usage {
    /// Per side: thread name → % (threads of the same name summed).
    pub threads: [BTreeMap<String, f64>; 2],
    /// Per side: the whole process (also threads that exited).
    pub totals: [Option<f64>; 2],
    /// The iperf3 client and server together.
    pub iperf: Option<f64>,
    /// The machine, all cores together (at most cores × 100 %).
    pub softirq: Option<f64>,
    pub idle: Option<f64>,
    /// The machine's busy time outside the tunnel and iperf3 processes
    /// (softirq, kernel threads, other processes).
    pub rest: Option<f64>,
}

impl Snapshot {
    /// The CPU used from `self` to `end`; `tick` from [`clock_ticks`].
    pub fn until(&self, end: &Snapshot, tick: f64) -> Usage {
        let secs = end.at.duration_since(self.at).as_secs_f64().max(1e-3);
        let pct = |ticks: u64| ticks as f64 / tick / secs * 100.0;
        let delta = |a: Option<u64>, b: Option<u64>| Some(pct(b?.saturating_sub(a?)));
        let mut u = Usage::default();
        for side in 0..2 {
            for (tid, (name, t)) in &end.threads[side] {
                // A thread born within the interval used all its time in it.
                let t0 = self.threads[side].get(tid).map_or(0, |(_, t0)| *t0);
                *u.threads[side].entry(name.clone()).or_default() += pct(t.saturating_sub(t0));
            }
            u.totals[side] = delta(self.totals[side], end.totals[side]);
        }
        u.iperf = match (
            delta(self.iperf_server, end.iperf_server),
            delta(self.children, end.children),
        ) {
            (Some(s), Some(c)) => Some(s + c),
            _ => None,
        };
        if let (Some((s0, i0, b0)), Some((s1, i1, b1))) = (self.system, end.system) {
            // The same clock ticks, over the same wall time as the
            // processes' figures.
            u.softirq = Some(pct(s1.saturating_sub(s0)));
            u.idle = Some(pct(i1.saturating_sub(i0)));
            let ours = u.totals.iter().flatten().sum::<f64>() + u.iperf.unwrap_or(0.0);
            u.rest = Some((pct(b1.saturating_sub(b0)) - ours).max(0.0));
        }
        u
    }
}

/// Threads under this share (% of one core) in every column are summed
/// into one "other threads" row.
pub const MINOR_PCT: f64 = 1.0;

fn pct(v: f64) -> String {
    if v < 9.95 {
        format!("{v:.1} %")
    } else {
        format!("{v:.0} %")
    }
}

/// The CPU table: for each lab (label, then per test the usages of its
/// runs), per side each thread name's median % of one core, the process
/// total, the iperf3 processes and the machine's softirq and idle time.
/// `tests` are the column headers.
pub fn table(tests: &[&str], labs: &[(&str, Vec<Vec<Usage>>)], cores: usize) -> Grid {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let med = |runs: &[Usage], f: &dyn Fn(&Usage) -> Option<f64>| {
        let v: Vec<f64> = runs.iter().filter_map(f).collect();
        median(&v)
    };
    let cells = |per_test: &[Vec<Usage>], f: &dyn Fn(&Usage) -> Option<f64>| -> Vec<String> {
        (0..tests.len())
            .map(|t| {
                per_test
                    .get(t)
                    .and_then(|runs| med(runs, f))
                    .map_or_else(String::new, pct)
            })
            .collect()
    };
    for (label, per_test) in labs {
        if per_test.iter().all(Vec::is_empty) {
            continue;
        }
        let mut first = true;
        let mut push = |side: &str, what: String, vals: Vec<String>| {
            let mut r = vec![
                if first {
                    label.to_string()
                } else {
                    String::new()
                },
                side.to_string(),
                what,
            ];
            first = false;
            r.extend(vals);
            rows.push(r);
        };
        for (side, side_label) in ["sender (gw 1)", "receiver (gw 2)"].into_iter().enumerate() {
            let has_process = per_test.iter().flatten().any(|u| u.totals[side].is_some());
            if !has_process {
                continue;
            }
            // Medians per thread name and test; a name absent in a run
            // used nothing in it.
            let mut names: Vec<String> = per_test
                .iter()
                .flatten()
                .flat_map(|u| u.threads[side].keys().cloned())
                .collect();
            names.sort();
            names.dedup();
            let per_name: Vec<(String, Vec<Option<f64>>)> = names
                .into_iter()
                .map(|n| {
                    let v = (0..tests.len())
                        .map(|t| {
                            let runs = per_test.get(t)?;
                            let v: Vec<f64> = runs
                                .iter()
                                .map(|u| u.threads[side].get(&n).copied().unwrap_or(0.0))
                                .collect();
                            median(&v)
                        })
                        .collect();
                    (n, v)
                })
                .collect();
            let peak = |v: &[Option<f64>]| v.iter().flatten().fold(0.0_f64, |a, b| a.max(*b));
            let (mut major, minor): (Vec<_>, Vec<_>) = per_name
                .into_iter()
                .partition(|(_, v)| peak(v) >= MINOR_PCT);
            major.sort_by(|a, b| {
                let sum = |v: &[Option<f64>]| v.iter().flatten().sum::<f64>();
                sum(&b.1).total_cmp(&sum(&a.1))
            });
            let show = |v: &[Option<f64>]| -> Vec<String> {
                v.iter().map(|x| x.map_or_else(String::new, pct)).collect()
            };
            for (n, v) in &major {
                push(side_label, format!("`{n}`"), show(v));
            }
            if !minor.is_empty() {
                let v: Vec<Option<f64>> = (0..tests.len())
                    .map(|t| {
                        let s: Vec<f64> = minor.iter().filter_map(|(_, v)| v[t]).collect();
                        (!s.is_empty()).then(|| s.iter().sum())
                    })
                    .collect();
                let names: Vec<String> = minor.iter().map(|(n, _)| format!("`{n}`")).collect();
                push(
                    side_label,
                    format!("other threads ({})", names.join(", ")),
                    show(&v),
                );
            }
            push(
                side_label,
                "whole process".into(),
                cells(per_test, &|u| u.totals[side]),
            );
        }
        push(
            "",
            "iperf3 client + server".into(),
            cells(per_test, &|u| u.iperf),
        );
        push(
            "machine",
            "softirq (all cores)".into(),
            cells(per_test, &|u| u.softirq),
        );
        push(
            "machine",
            "everything else (softirq, kernel threads, other processes)".into(),
            cells(per_test, &|u| u.rest),
        );
        push(
            "machine",
            format!("idle (of {} %)", cores * 100),
            cells(per_test, &|u| u.idle),
        );
    }
    let mut header = vec!["tunnel".to_string(), "side".into(), "thread".into()];
    header.extend(tests.iter().map(|t| t.to_string()));
    Grid {
        title: "CPU per thread during the throughput runs".into(),
        note: String::new(),
        header,
        labels: 3,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_the_last_paren() {
        // comm with a space and a paren; utime 7, stime 5, cutime 3, cstime 2.
        let s = "123 (we(ird) name) S 1 123 123 0 -1 4194560 100 0 0 0 7 5 3 2 20 0 4 0";
        assert_eq!(stat_ticks(s), Some((12, 5)));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn system_line() {
        let s = "cpu  10 1 20 300 4 5 60 7 0 0\ncpu0 5 0 10 150 2 2 30 3 0 0\n";
        assert_eq!(system_ticks(s), Some((60, 300, 103)));
    }

    #[test]
    fn table_sums_names_and_folds_idle_threads() {
        let mut u = Usage::default();
        u.threads[0].insert("meshd-packets".into(), 80.0);
        u.threads[0].insert("tokio-rt-worker".into(), 0.2);
        u.totals[0] = Some(81.0);
        u.iperf = Some(90.0);
        u.softirq = Some(30.0);
        u.idle = Some(5.0);
        let g = table(&["TCP"], &[("meshd", vec![vec![u.clone(), u]])], 2);
        let text = g.markdown();
        assert!(
            text.contains("| meshd | sender (gw 1) | `meshd-packets` | 80 % |"),
            "{text}"
        );
        assert!(
            text.contains("|  | sender (gw 1) | other threads (`tokio-rt-worker`) | 0.2 % |"),
            "{text}"
        );
        assert!(
            text.contains("| machine | idle (of 200 %) | 5.0 % |"),
            "{text}"
        );
        assert!(!text.contains("receiver"), "{text}");
    }

    #[test]
    fn until_sums_same_named_threads_and_counts_new_ones_fully() {
        let at = Instant::now();
        let snap = |at: Instant, threads: &[(u32, &str, u64)], total: u64| Snapshot {
            at,
            threads: [
                threads
                    .iter()
                    .map(|(tid, n, t)| (*tid, (n.to_string(), *t)))
                    .collect(),
                HashMap::new(),
            ],
            totals: [Some(total), None],
            iperf_server: Some(10),
            children: Some(0),
            system: Some((0, 0, 0)),
        };
        let a = snap(
            at,
            &[(1, "wireguard-go", 100), (2, "wireguard-go", 50)],
            150,
        );
        let b = snap(
            at + std::time::Duration::from_secs(1),
            &[
                (1, "wireguard-go", 130),
                (2, "wireguard-go", 60),
                (3, "wireguard-go", 5),
            ],
            200,
        );
        let u = a.until(&b, 100.0);
        let wg = u.threads[0]["wireguard-go"];
        assert!((wg - 45.0).abs() < 0.5, "{wg}");
        assert!((u.totals[0].unwrap() - 50.0).abs() < 0.5);
        assert_eq!(u.totals[1], None);
        assert!(u.iperf.unwrap().abs() < 0.5);
    }
}
