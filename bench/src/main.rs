//! `skymesh-bench`: measures skymesh against its peers in one run and
//! prints (and writes as markdown) a table of medians and ratios.
//!
//! ```text
//! cargo build --release -p meshd -p coordinator -p skyctl -p skymesh-bench
//! cargo run --release -p skymesh-bench -- [--quick] [--out BENCHMARKS.md]
//! ```
//!
//! Needs root (network namespaces). Installs missing peers first (Debian
//! packages with apt-get, Debian trixie's wireguard-go as a `.deb` unpacked
//! beside the system one, `boringtun-cli` and `gotatun-cli` with `cargo
//! install --locked`); `--quick` compiles no peer and `--no-install`
//! installs nothing, and peers left missing are reported as not measured.
//! Exits non-zero when a measurement fails outright; rows that cannot be
//! measured yet say `n/a (why)`.
//!
//! # Sections
//! - [`tunnel`]: throughput (1, with CPU per thread from [`cpu`]) and
//!   latency (2) against wireguard-go (trixie's 2023 build and the system's
//!   2022 one), boringtun-cli, gotatun-cli and raw veth.
//! - [`vip`]: service VIP overhead (3); [`control`]: control plane (5)
//!   and failover (6) (all three share one 4-cluster mesh).
//! - [`dns`]: DNS against dnsmasq (4) and scale (7) of the coordinator.
//!
//! Everything runs in the test harness's namespaces (`skymesh-tests`),
//! dropped at the end, also on error or panic; [`cleanup`] covers signals.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, ValueEnum};

mod cleanup;
mod control;
mod cpu;
mod dns;
mod install;
mod report;
mod tools;
mod tunnel;
mod vip;

use report::{Cell, Row, Table};

/// A section of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Section {
    /// 1-2: tunnel throughput and latency.
    Tunnel,
    /// 3: service VIP overhead.
    Vip,
    /// 4: DNS (and 7: scale, which reuses its 10,000 services).
    Dns,
    /// 5: control plane propagation and join.
    Control,
    /// 6: failover.
    Failover,
    /// 7: scale (needs the DNS section's services; runs it if needed).
    Scale,
}

/// skymesh benchmarks: meshd against wireguard-go, boringtun-cli,
/// gotatun-cli, dnsmasq and a raw veth, measured in the same run.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Short runs (3 of each, shorter durations): under 3 minutes. Compiles
    /// no missing peer (boringtun-cli, gotatun-cli): those are skipped.
    #[arg(long)]
    quick: bool,
    /// Where to write the markdown report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Runs per measurement (default: 3 with --quick, else 5).
    #[arg(long)]
    runs: Option<usize>,
    /// Only these sections (comma-separated); default all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Section>,
    /// Services held by the DNS servers and the coordinator (default 10000).
    #[arg(long)]
    services: Option<usize>,
    /// Install nothing: missing tools fail the run, missing peers are
    /// skipped (reported as not measured).
    #[arg(long)]
    no_install: bool,
    /// Another meshd binary (e.g. built from an older commit) to measure
    /// beside this one in the tunnel sections, for before/after figures.
    #[arg(long, value_name = "PATH")]
    baseline_meshd: Option<PathBuf>,
    /// Column label of --baseline-meshd.
    #[arg(long, value_name = "TEXT", default_value = "meshd before")]
    baseline_label: String,
    /// Measure nothing: start one tunnel lab (two gateways, an iperf3
    /// server on the second; meshd by default, or a peer: wireguard-go-trixie,
    /// wireguard-go-bookworm, boringtun-cli, gotatun), print how to reach it,
    /// and keep it up until Enter or Ctrl-C, for profiling by hand (`perf`,
    /// `ss`, `top -H`).
    #[arg(long, value_name = "LAB", num_args = 0..=1, default_missing_value = "meshd",
          conflicts_with_all = ["quick", "runs", "only", "baseline_meshd"])]
    hold: Option<String>,
}

/// Sizes and durations of the measurements.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub quick: bool,
    pub runs: usize,
    /// iperf3 `-t`.
    pub iperf_secs: u32,
    /// Pings per latency run (10 ms apart).
    pub pings: u32,
    /// dnsperf `-l`.
    pub dnsperf_secs: u32,
    /// Services held by the DNS servers and the coordinator at scale.
    pub services: usize,
    /// Clusters at scale (one real, the rest simulated).
    pub clusters: usize,
    /// Services timed from create to resolvable.
    pub propagation: usize,
    /// Seconds per connection-rate run.
    pub conn_secs: f64,
    /// Another meshd build measured beside this one (tunnel sections).
    pub baseline: Option<&'static tunnel::Baseline>,
}

impl Cfg {
    fn new(args: &Args) -> Cfg {
        let runs = args.runs.unwrap_or(if args.quick { 3 } else { 5 }).max(1);
        let mut cfg = Cfg::preset(args.quick, runs);
        if let Some(n) = args.services {
            cfg.services = n.max(1);
        }
        cfg.baseline = args.baseline_meshd.as_ref().map(|bin| {
            // One per run, needed for the whole run: labels are &'static.
            &*Box::leak(Box::new(tunnel::Baseline {
                bin: bin.clone(),
                label: args.baseline_label.clone(),
            }))
        });
        cfg
    }

    fn preset(quick: bool, runs: usize) -> Cfg {
        if quick {
            Cfg {
                quick: true,
                runs,
                iperf_secs: 1,
                pings: 100,
                dnsperf_secs: 2,
                services: 1_000,
                clusters: 100,
                propagation: 20,
                conn_secs: 1.0,
                baseline: None,
            }
        } else {
            Cfg {
                quick: false,
                runs,
                iperf_secs: 5,
                pings: 200,
                dnsperf_secs: 5,
                services: 10_000,
                clusters: 100,
                propagation: 100,
                conn_secs: 3.0,
                baseline: None,
            }
        }
    }
}

/// The harness (`skymesh_tests::bin_path`) looks for the workspace's
/// binaries in the parent of the running executable's directory, as for a
/// test executable in `target/<profile>/deps/`. This binary runs from
/// `target/release/`, so it re-executes itself from a hard link in
/// `target/release/deps/`, where the harness finds `target/release/meshd`.
fn relocate_for_harness() -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("where is this executable?")?;
    let dir = exe.parent().context("the executable has a directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        return Ok(());
    }
    for b in ["meshd", "coordinator", "skyctl"] {
        if !dir.join(b).is_file() {
            bail!(
                "{} not found next to {}: build everything first with \
                 `cargo build --release -p meshd -p coordinator -p skyctl -p skymesh-bench`",
                b,
                exe.display()
            );
        }
    }
    let deps = dir.join("deps");
    std::fs::create_dir_all(&deps)?;
    let link = deps.join("skymesh-bench-harness");
    let _ = std::fs::remove_file(&link);
    if std::fs::hard_link(&exe, &link).is_err() {
        std::fs::copy(&exe, &link).with_context(|| format!("copying to {}", link.display()))?;
    }
    let err = std::process::Command::new(&link)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).with_context(|| format!("re-executing {}", link.display()))
}

/// Runs `f`, turning an error or a panic into a one-row failed table.
fn guarded(title: &str, f: impl FnOnce() -> Result<Vec<Table>>) -> Vec<Table> {
    let failed = |msg: String| {
        eprintln!("[{title}] FAILED: {msg}");
        let mut t = Table::new(title, "skymesh", &[], String::new());
        t.rows.push(Row::solo(
            "section",
            report::Unit::Count,
            report::Better::Higher,
            Cell::Failed(msg),
        ));
        vec![t]
    };
    match std::panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => failed(format!("{e:#}")),
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            failed(format!("panicked: {msg}"))
        }
    }
}

/// [`guarded`] for a section that makes one table.
pub fn guarded_one(title: &str, f: impl FnOnce() -> Result<Table>) -> Table {
    let mut v = guarded(title, || f().map(|t| vec![t]));
    v.swap_remove(0)
}

fn workspace_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn main() {
    if let Err(e) = real_main() {
        eprintln!("skymesh-bench: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let mut args = Args::parse();
    if let Some(bin) = &args.baseline_meshd {
        let abs = std::fs::canonicalize(bin)
            .with_context(|| format!("--baseline-meshd: {} not found", bin.display()))?;
        if !abs.is_file() {
            bail!("--baseline-meshd: {} is not a file", bin.display());
        }
        args.baseline_meshd = Some(abs);
    }
    relocate_for_harness()?;
    cleanup::install()?;
    skymesh_tests::netns::require_root()?;
    if let Some(lab) = &args.hold {
        return tunnel::hold(lab);
    }
    install::ensure_peers(if args.no_install {
        install::Policy::Nothing
    } else if args.quick {
        install::Policy::NoCompile
    } else {
        install::Policy::All
    })?;
    let cfg = Cfg::new(&args);
    let want = |s: Section| args.only.is_empty() || args.only.contains(&s);
    let t0 = Instant::now();
    eprintln!(
        "skymesh-bench: {} mode, {} runs per measurement",
        if cfg.quick { "quick" } else { "full" },
        cfg.runs
    );
    let mut tables: Vec<Table> = Vec::new();
    if want(Section::Tunnel) {
        tables.extend(guarded("1-2. Tunnels", || Ok(tunnel::run(&cfg))));
    }
    let (w_vip, w_ctl, w_fo) = (
        want(Section::Vip),
        want(Section::Control),
        want(Section::Failover),
    );
    if w_vip || w_ctl || w_fo {
        tables.extend(guarded("3, 5, 6. Mesh", || {
            control::run(&cfg, w_vip, w_ctl, w_fo)
        }));
    }
    if want(Section::Dns) || want(Section::Scale) {
        tables.extend(guarded("4, 7. DNS and scale", || dns::run(&cfg)));
    }
    tables.sort_by(|a, b| a.title.cmp(&b.title));
    for t in &tables {
        println!("{}", t.text());
    }
    let mut machine = install::machine(workspace_dir());
    machine.push((
        "benchmark wall time".into(),
        format!("{:.0} s", t0.elapsed().as_secs_f64()),
    ));
    let mode = format!(
        "{} ({} runs per figure){}",
        if cfg.quick { "--quick" } else { "full" },
        cfg.runs,
        if args.only.is_empty() {
            String::new()
        } else {
            format!(", only {:?}", args.only)
        }
    );
    let md = report::markdown(&machine, &install::versions(), &tables, &mode);
    std::fs::write(&args.out, md).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!(
        "skymesh-bench: wrote {} in {:.0} s",
        args.out.display(),
        t0.elapsed().as_secs_f64()
    );
    let failures: Vec<String> = tables.iter().flat_map(Table::failures).collect();
    if !failures.is_empty() {
        for f in &failures {
            eprintln!("FAILED: {f}");
        }
        bail!("{} measurement(s) failed", failures.len());
    }
    Ok(())
}
