//! Sections 1 and 2: tunnel throughput (iperf3 TCP ×1, TCP ×4, UDP) and
//! latency (ping RTT p50/p99) between two gateway namespaces on the
//! harness's WAN bridge, through
//!
//! - meshd (a 2-cluster [`Mesh`]: gateway overlay IP to gateway overlay IP),
//! - pairs of the userspace WireGuards people run: wireguard-go 0.0.20231211
//!   (Debian trixie's, with TUN TSO/GRO, UDP GSO/GRO and per-core crypto:
//!   the first peer, whose ratios come first), the system's wireguard-go
//!   0.0.20220316 (bookworm), boringtun-cli and gotatun-cli (Mullvad's
//!   boringtun fork), each configured with `wg set` through its UAPI socket
//!   (keys from `wg genkey`, a pair PSK from `wg genpsk`, MTU 1420 like
//!   meshd),
//! - the bare veth/bridge WAN (no tunnel) as the ceiling.
//!
//! All labs are up at once and measured in turns (run 1 of every lab, then
//! run 2, ...), so slow drifts of the machine's load hit every peer alike.
//! During each throughput run [`cpu`] reads the CPU time of
//! every thread of both tunnel ends, of iperf3 and of the machine. A peer
//! that is not installed (`--quick`, `--no-install`) gets `n/a` cells and
//! a sentence in the table's note.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, NsProcess, Topology, wait_until};

use crate::Cfg;
use crate::cpu::{self, Probe, Usage};
use crate::install::{self, which};
use crate::report::{Better, Cell, Row, Table, Unit, percentile};
use crate::tools::{self, Iperf};

/// Which tunnel a lab runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Meshd,
    /// Debian trixie's wireguard-go (0.0.20231211), unpacked under
    /// [`install::TRIXIE_ROOT`].
    WireguardGo2023,
    /// The system's wireguard-go (Debian bookworm's, 0.0.20220316).
    WireguardGo2022,
    Boringtun,
    /// gotatun-cli (binary `gotatun`).
    Gotatun,
    /// Another meshd build (`--baseline-meshd`), e.g. an older commit's,
    /// measured in the same run for a before/after comparison.
    Baseline(&'static Baseline),
    Veth,
}

/// A meshd binary to compare with, and its column's label.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Baseline {
    pub bin: PathBuf,
    pub label: String,
}

impl Kind {
    /// meshd and the peers, each a tunnel between the two gateways.
    const TUNNELS: [Kind; 5] = [
        Kind::Meshd,
        Kind::WireguardGo2023,
        Kind::WireguardGo2022,
        Kind::Boringtun,
        Kind::Gotatun,
    ];

    /// The labs of this run, meshd first (the others are its peers).
    fn all(cfg: &Cfg) -> Vec<Kind> {
        let mut v = Kind::TUNNELS.to_vec();
        v.extend(cfg.baseline.map(Kind::Baseline));
        v.push(Kind::Veth);
        v
    }

    /// Its column header.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Meshd => "meshd",
            Kind::WireguardGo2023 => "wireguard-go 2023 (trixie)",
            Kind::WireguardGo2022 => "wireguard-go 2022 (bookworm)",
            Kind::Boringtun => "boringtun-cli",
            Kind::Gotatun => "gotatun-cli",
            Kind::Baseline(b) => &b.label,
            Kind::Veth => "raw veth (no tunnel)",
        }
    }

    /// A file-name-safe form of the label, for logs.
    fn slug(self) -> &'static str {
        match self {
            Kind::WireguardGo2023 => "wireguard-go-trixie",
            Kind::WireguardGo2022 => "wireguard-go-bookworm",
            Kind::Boringtun => "boringtun-cli",
            Kind::Gotatun => "gotatun",
            Kind::Meshd | Kind::Baseline(_) => "meshd",
            Kind::Veth => "veth",
        }
    }

    /// The peer's program (`None`: not installed); `Ok(None)` for labs
    /// that run no peer binary.
    fn peer_binary(self) -> Result<Option<PathBuf>, ()> {
        let bin = match self {
            Kind::WireguardGo2023 => install::wireguard_go_trixie(),
            Kind::WireguardGo2022 => which(install::SYSTEM_WIREGUARD_GO),
            Kind::Boringtun => which("boringtun-cli"),
            Kind::Gotatun => which("gotatun"),
            Kind::Meshd | Kind::Baseline(_) | Kind::Veth => return Ok(None),
        };
        bin.map(Some).ok_or(())
    }
}

enum Holder {
    Mesh(Box<Mesh>),
    Topo(Topology),
}

/// Two namespaces joined by one kind of tunnel, with an iperf3 server on
/// the far side. Field order matters: processes die before namespaces.
struct Lab {
    _procs: Vec<NsProcess>,
    holder: Holder,
    target: Ipv4Addr,
    /// The tunnel process on each side (sender, receiver), for [`cpu`].
    tunnel_pids: [Option<u32>; 2],
    iperf_pid: Option<u32>,
}

const IPERF_PORT: u16 = 5201;

impl Lab {
    fn topo(&self) -> &Topology {
        match &self.holder {
            Holder::Mesh(m) => &m.topo,
            Holder::Topo(t) => t,
        }
    }

    fn a(&self) -> &Netns {
        self.topo().gateway(1)
    }

    fn b(&self) -> &Netns {
        self.topo().gateway(2)
    }

    fn probe(&self) -> Probe {
        Probe {
            sides: self.tunnel_pids,
            iperf_server: self.iperf_pid,
        }
    }

    fn start(kind: Kind, bin: Option<PathBuf>) -> Result<Lab> {
        let mut lab = match kind {
            Kind::Meshd | Kind::Baseline(_) => {
                let mesh = match kind {
                    Kind::Baseline(b) => Mesh::start_with_meshd(2, 0, b.bin.clone())?,
                    _ => Mesh::start(2, 0)?,
                };
                crate::cleanup::register(&mesh.topo);
                ensure!(
                    mesh.wait_for_tunnels(Duration::from_secs(30)),
                    "meshd tunnels did not come up within 30 s"
                );
                let target = tools::iface_ip(mesh.topo.gateway(2), &mesh.topo.iface(2))?;
                let tunnel_pids = [mesh.meshd_pid(1), mesh.meshd_pid(2)];
                Lab {
                    _procs: Vec::new(),
                    holder: Holder::Mesh(Box::new(mesh)),
                    target,
                    tunnel_pids,
                    iperf_pid: None,
                }
            }
            Kind::Veth => {
                let topo = Topology::new(2, 0)?;
                crate::cleanup::register(&topo);
                let target = topo.gateway_wan_ip(2);
                Lab {
                    _procs: Vec::new(),
                    holder: Holder::Topo(topo),
                    target,
                    tunnel_pids: [None, None],
                    iperf_pid: None,
                }
            }
            Kind::WireguardGo2023 | Kind::WireguardGo2022 | Kind::Boringtun | Kind::Gotatun => {
                let bin = bin.with_context(|| format!("{} is not installed", kind.label()))?;
                wg_pair(kind, &bin)?
            }
        };
        ensure!(
            wait_until(Duration::from_secs(15), || lab.a().ping(lab.target)),
            "{} lab: {} does not answer pings",
            kind.label(),
            lab.target
        );
        let log = lab.topo().dir().join("iperf3-server.log");
        let server = tools::iperf_server(lab.b(), lab.target, IPERF_PORT, &log)?;
        lab.iperf_pid = Some(server.pid());
        lab._procs.push(server);
        Ok(lab)
    }
}

/// A stock WireGuard pair (wireguard-go, boringtun-cli, gotatun-cli: `bin`)
/// between the two gateways of a fresh topology, configured with `wg`.
fn wg_pair(kind: Kind, bin: &std::path::Path) -> Result<Lab> {
    let topo = Topology::new(2, 0)?;
    crate::cleanup::register(&topo);
    let dir = topo.dir().to_path_buf();
    let psk = topo.gateway(1).run(&["wg", "genpsk"])?;
    let psk_file = dir.join("pair.psk");
    std::fs::write(&psk_file, psk)?;
    let mut keys = Vec::new();
    for i in 1..=2 {
        let gw = topo.gateway(i);
        let private = gw.run(&["wg", "genkey"])?;
        let file = dir.join(format!("gw{i}.key"));
        std::fs::write(&file, &private)?;
        let public = gw.sh(&format!("wg pubkey < {}", file.display()));
        ensure!(public.status.success(), "wg pubkey failed");
        keys.push((
            file,
            String::from_utf8_lossy(&public.stdout).trim().to_string(),
        ));
    }
    let mut procs = Vec::new();
    for i in 1..=2 {
        let gw = topo.gateway(i);
        let iface = topo.iface_named(&format!("w{i}"));
        let log = dir.join(format!("{}-{i}.log", kind.slug()));
        let mut cmd = Command::new(bin);
        match kind {
            Kind::WireguardGo2023 | Kind::WireguardGo2022 => {
                cmd.args(["-f", &iface])
                    .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
                    .env("LOG_LEVEL", "error");
            }
            Kind::Gotatun => {
                // A boringtun-cli fork: the same flags, minus `-l` (in the
                // foreground it logs to stderr).
                cmd.args(["-f", "--disable-drop-privileges", "-v", "error"])
                    .arg(&iface);
            }
            _ => {
                let bt_log = dir.join(format!("boringtun-{i}.out"));
                cmd.args(["-f", "--disable-drop-privileges", "-l"])
                    .arg(bt_log)
                    .arg(&iface)
                    .env("LOG_LEVEL", "error");
            }
        }
        procs.push(gw.spawn_command(&cmd, &log)?);
        ensure!(
            wait_until(Duration::from_secs(10), || gw
                .exec(&["wg", "show", &iface])
                .status
                .success()),
            "{} did not open its UAPI socket: {}",
            kind.label(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let j = 3 - i;
        let (key, _) = &keys[i - 1];
        let (_, peer_pub) = &keys[j - 1];
        gw.run(&[
            "wg",
            "set",
            &iface,
            "private-key",
            &key.to_string_lossy(),
            "listen-port",
            "51820",
            "peer",
            peer_pub,
            "preshared-key",
            &psk_file.to_string_lossy(),
            "endpoint",
            &format!("{}:51820", topo.gateway_wan_ip(j)),
            "allowed-ips",
            &format!("10.200.0.{j}/32"),
        ])?;
        gw.ip(&["addr", "add", &format!("10.200.0.{i}/24"), "dev", &iface])?;
        gw.ip(&["link", "set", &iface, "mtu", "1420", "up"])?;
    }
    let tunnel_pids = [Some(procs[0].pid()), Some(procs[1].pid())];
    Ok(Lab {
        _procs: procs,
        holder: Holder::Topo(topo),
        target: Ipv4Addr::new(10, 200, 0, 2),
        tunnel_pids,
        iperf_pid: None,
    })
}

/// The tests of section 1, in the order they run.
const TESTS: [(&str, Iperf); 3] = [
    ("TCP, 1 stream", Iperf::Tcp(1)),
    ("TCP, 4 streams (-P 4)", Iperf::Tcp(4)),
    ("UDP received (10 Gbit/s offered)", Iperf::Udp),
];

#[derive(Default)]
struct Samples {
    tput: HashMap<(Kind, usize), Vec<f64>>,
    loss: HashMap<Kind, Vec<f64>>,
    p50: HashMap<Kind, Vec<f64>>,
    p99: HashMap<Kind, Vec<f64>>,
    errors: HashMap<Kind, String>,
    /// Peers not installed, not measured.
    skipped: Vec<Kind>,
    /// CPU of each throughput run, per lab and test.
    cpu: HashMap<(Kind, usize), Vec<Usage>>,
}

/// `--hold LAB`: one lab (by its log name, [`Kind::slug`]), up until Enter
/// (a signal tears it down through [`crate::cleanup`]).
pub fn hold(name: &str) -> Result<()> {
    let Some(&kind) = Kind::TUNNELS.iter().find(|k| k.slug() == name) else {
        let names: Vec<&str> = Kind::TUNNELS.iter().map(|k| k.slug()).collect();
        anyhow::bail!(
            "invalid --hold: {name:?}: the lab must be one of {}",
            names.join(", ")
        );
    };
    let bin = kind
        .peer_binary()
        .map_err(|()| anyhow::anyhow!("--hold {name}: {} is not installed", kind.label()))?;
    let lab = Lab::start(kind, bin)?;
    let pids = lab
        .tunnel_pids
        .map(|p| p.map_or("?".into(), |p| p.to_string()));
    println!(
        "{} lab up: sender gateway netns {} (tunnel pid {}), receiver {} (tunnel pid {})\n\
         iperf3 server: {}:{IPERF_PORT}; e.g. ip netns exec {} iperf3 -c {} -t 10\n\
         press Enter to tear it down",
        kind.label(),
        lab.a().name(),
        pids[0],
        lab.b().name(),
        pids[1],
        lab.target,
        lab.a().name(),
        lab.target,
    );
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    drop(lab);
    Ok(())
}

/// Runs sections 1 and 2; returns their tables.
pub fn run(cfg: &Cfg) -> Vec<Table> {
    let mut labs: Vec<(Kind, Lab)> = Vec::new();
    let mut s = Samples::default();
    let tick = cpu::clock_ticks();
    for kind in Kind::all(cfg) {
        let Ok(bin) = kind.peer_binary() else {
            eprintln!(
                "[tunnel] {} is not installed: skipping it (a full run installs it)",
                kind.label()
            );
            s.skipped.push(kind);
            continue;
        };
        eprintln!("[tunnel] starting the {} lab", kind.label());
        match Lab::start(kind, bin) {
            Ok(l) => labs.push((kind, l)),
            Err(e) => {
                eprintln!("[tunnel] {} lab failed: {e:#}", kind.label());
                s.errors.insert(kind, format!("setup: {e:#}"));
            }
        }
    }
    for run in 0..cfg.runs {
        for (kind, lab) in &labs {
            if s.errors.contains_key(kind) {
                continue;
            }
            let probe = lab.probe();
            for (t, (name, mode)) in TESTS.iter().enumerate() {
                let before = probe.sample();
                let result = tools::iperf(lab.a(), lab.target, IPERF_PORT, *mode, cfg.iperf_secs);
                let usage = before.until(&probe.sample(), tick);
                match result {
                    Ok(r) => {
                        s.cpu.entry((*kind, t)).or_default().push(usage);
                        eprintln!(
                            "[tunnel] run {}/{} {:<28} {name}: {:.2} Gbit/s{}",
                            run + 1,
                            cfg.runs,
                            kind.label(),
                            r.gbps,
                            if *mode == Iperf::Udp {
                                format!(", loss {:.1} %", r.loss_pct)
                            } else {
                                String::new()
                            }
                        );
                        s.tput.entry((*kind, t)).or_default().push(r.gbps);
                        if *mode == Iperf::Udp {
                            s.loss.entry(*kind).or_default().push(r.loss_pct);
                            // Let the flood's queues drain before the next test.
                            std::thread::sleep(Duration::from_millis(300));
                        }
                    }
                    Err(e) => {
                        eprintln!("[tunnel] {} {name}: {e:#}", kind.label());
                        s.errors.insert(*kind, format!("{name}: {e:#}"));
                        break;
                    }
                }
            }
            if s.errors.contains_key(kind) {
                continue;
            }
            match tools::ping_rtts(lab.a(), lab.target, cfg.pings, 10) {
                Ok(rtts) => {
                    let (p50, p99) = (
                        percentile(&rtts, 50.0).unwrap_or(f64::NAN),
                        percentile(&rtts, 99.0).unwrap_or(f64::NAN),
                    );
                    eprintln!(
                        "[tunnel] run {}/{} {:<28} ping p50 {p50:.3} ms, p99 {p99:.3} ms",
                        run + 1,
                        cfg.runs,
                        kind.label()
                    );
                    s.p50.entry(*kind).or_default().push(p50);
                    s.p99.entry(*kind).or_default().push(p99);
                }
                Err(e) => {
                    s.errors.insert(*kind, format!("ping: {e:#}"));
                }
            }
        }
    }
    drop(labs);
    tables(cfg, &s)
}

fn tables(cfg: &Cfg, s: &Samples) -> Vec<Table> {
    let kinds = Kind::all(cfg);
    let peers: Vec<&str> = kinds[1..].iter().map(|k| k.label()).collect();
    let cell = |k: Kind, v: Option<&Vec<f64>>| match (s.errors.get(&k), v) {
        _ if s.skipped.contains(&k) => Cell::Na("not installed".into()),
        (_, Some(v)) if v.len() == cfg.runs => Cell::from_samples(v),
        (Some(e), _) => Cell::Failed(e.clone()),
        (None, Some(v)) => Cell::from_samples(v),
        (None, None) => Cell::Failed("not measured".into()),
    };
    let row = |metric: &str, unit, better, get: &dyn Fn(Kind) -> Option<Vec<f64>>| Row {
        metric: metric.into(),
        unit,
        better,
        skymesh: cell(Kind::Meshd, get(Kind::Meshd).as_ref()),
        peers: kinds[1..]
            .iter()
            .map(|k| cell(*k, get(*k).as_ref()))
            .collect(),
    };
    let mut tput = Table::new(
        "1. Tunnel throughput",
        "meshd",
        &peers,
        format!(
            "iperf3 between two gateway namespaces on a veth/bridge WAN, {} s per run, \
             median of {} runs, tunnels measured in turns. meshd: a 2-cluster mesh, \
             gateway overlay IP to gateway overlay IP. The peers, each a pair configured \
             with `wg set` (keys and PSK from `wg genkey`/`wg genpsk`, MTU 1420): \
             wireguard-go 2023, Debian trixie's 0.0.20231211 (TUN TSO/GRO, UDP GSO/GRO, \
             per-core crypto), unpacked beside the system package; wireguard-go 2022, \
             the system's (Debian bookworm, 0.0.20220316); boringtun-cli; gotatun-cli \
             (Mullvad's fork of boringtun); exact versions under Peers. raw veth: the same \
             WAN without a tunnel (the ceiling). UDP: `-u -b 10G -l {}` (datagrams fit the \
             tunnel MTU); the received rate counts only what arrived. Client, server and \
             both tunnel ends share the machine's cores.{}{}",
            cfg.iperf_secs,
            cfg.runs,
            tools::UDP_PAYLOAD,
            baseline_note(cfg),
            skipped_note(s)
        ),
    );
    for (t, (name, _)) in TESTS.iter().enumerate() {
        tput.rows.push(row(name, Unit::Gbps, Better::Higher, &|k| {
            s.tput.get(&(k, t)).cloned()
        }));
    }
    tput.rows
        .push(row("UDP loss", Unit::Pct, Better::Lower, &|k| {
            s.loss.get(&k).cloned()
        }));
    let mut lat = Table::new(
        "2. Tunnel latency",
        "meshd",
        &peers,
        format!(
            "{} pings at 10 ms intervals per run through each tunnel (same labs as \
             section 1, idle), p50 and p99 of each run, median of {} runs.{}",
            cfg.pings,
            cfg.runs,
            baseline_note(cfg)
        ),
    );
    lat.rows
        .push(row("ping RTT p50", Unit::Ms, Better::Lower, &|k| {
            s.p50.get(&k).cloned()
        }));
    lat.rows
        .push(row("ping RTT p99", Unit::Ms, Better::Lower, &|k| {
            s.p99.get(&k).cloned()
        }));
    tput.appendix.push(cpu_table(cfg, s, &kinds));
    vec![tput, lat]
}

/// The CPU per thread of every measured lab, one column per test.
fn cpu_table(cfg: &Cfg, s: &Samples, kinds: &[Kind]) -> crate::report::Grid {
    let tests: Vec<&str> = ["TCP ×1", "TCP ×4", "UDP"].to_vec();
    let labs: Vec<(&str, Vec<Vec<Usage>>)> = kinds
        .iter()
        .filter(|k| !s.skipped.contains(k))
        .map(|k| {
            let per_test = (0..TESTS.len())
                .map(|t| s.cpu.get(&(*k, t)).cloned().unwrap_or_default())
                .collect();
            (k.label(), per_test)
        })
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let mut g = cpu::table(&tests, &labs, cores);
    g.note = format!(
        "CPU time during the throughput runs above, in % of one core (the machine has \
         {cores}, so {} % is all of it), median of {} runs. Every thread of both tunnel \
         processes is read from `/proc/<pid>/task/<tid>/{{comm,stat}}` (utime + stime) just \
         before the iperf3 client starts and just after it ends; threads with the same \
         name are summed (wireguard-go's threads are all `wireguard-go`, tokio's workers \
         `tokio-rt-worker`), threads under {:.0} % in every column are summed as other \
         threads, and the whole process's figure also counts threads that ended within \
         the interval. sender: the tunnel end beside the iperf3 client (it encrypts the \
         data; for UDP everything the client sends, even what is lost later), receiver: \
         the one beside the server. iperf3: client and server together. machine: softirq \
         (the kernel's network receive and transmit work, where veth, bridge, UDP and TUN \
         packets are processed) and idle time of all cores from `/proc/stat`; idle near 0 \
         means the cores were saturated; everything else: the cores' busy time minus the \
         processes above (softirq, kernel threads and whatever else ran on the machine).",
        cores * 100,
        cfg.runs,
        cpu::MINOR_PCT
    );
    g
}

/// Which peers were not measured (not installed), for the table's note.
fn skipped_note(s: &Samples) -> String {
    if s.skipped.is_empty() {
        return String::new();
    }
    let names: Vec<&str> = s.skipped.iter().map(|k| k.label()).collect();
    format!(
        " Not measured in this run: {} (not installed: `--quick` compiles no peer and \
         `--no-install` installs none; a full run installs them).",
        names.join(", ")
    )
}

/// What the baseline column is, for the tables' notes.
fn baseline_note(cfg: &Cfg) -> String {
    cfg.baseline.map_or(String::new(), |b| {
        format!(
            " {}: the meshd lab again with another meshd build (`--baseline-meshd`), \
             for a before/after comparison in one run.",
            b.label
        )
    })
}
