//! Sections 3, 5 and 6 on one mesh of 3 clusters (a 4th gateway namespace
//! is kept for the join test):
//!
//! - Control plane (section 5): `skyctl create service` → the name resolves in the
//!   DNS of every one of the 3 clusters (p50/p99); a new cluster (`skyctl
//!   create cluster` + a fresh meshd with the join token) → handshakes with
//!   all 3 peers.
//! - Failover (section 6): a replica's health-checked listener closes → it leaves
//!   DNS in every cluster (and, if VIPs work, no new connection reaches
//!   it); a gateway's meshd is killed → both peers mark it down (probes).
//! - VIP overhead (section 3, [`crate::vip`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use skymesh_tests::mesh::{DNS_PORT, Mesh};
use skymesh_tests::netns::wait_until;

use crate::Cfg;
use crate::report::{Better, Cell, Row, Table, Unit, percentile};
use crate::tools::{self, DnsProbe};
use crate::vip;

/// The clusters that stay up; cluster 4 joins and leaves.
const CLUSTERS: [usize; 3] = [1, 2, 3];
/// The failover replicas' port.
const FO_PORT: u16 = 7200;
/// How long a failover may take before the run counts as failed.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs the selected sections on one mesh.
pub fn run(cfg: &Cfg, want_vip: bool, want_ctl: bool, want_fo: bool) -> Result<Vec<Table>> {
    eprintln!("[mesh] starting a 4-cluster mesh");
    let mut mesh = Mesh::start(4, 2)?;
    crate::cleanup::register(&mesh.topo);
    ensure!(
        mesh.wait_for_tunnels(Duration::from_secs(30)),
        "the 4-cluster mesh's tunnels did not come up within 30 s"
    );
    retire_c4(&mut mesh)?;
    let mut probes = Vec::new();
    for i in CLUSTERS {
        let server = SocketAddr::from((mesh.topo.gateway_lan_ip(i), DNS_PORT));
        probes.push(DnsProbe::new(mesh.topo.app(i, 1), server)?);
    }
    let mut tables = Vec::new();
    let vip_setup = vip::available(&mesh)?;
    let vip_works = vip_setup.works;
    if want_vip {
        tables.push(crate::guarded_one("3. Service VIP overhead", || {
            vip::run(cfg, &mesh, &vip_setup)
        }));
        if vip_works {
            tables.push(crate::guarded_one("3b. Service policy", || {
                vip::policy(cfg, &mesh)
            }));
        }
    }
    if want_ctl {
        tables.push(crate::guarded_one("5. Control plane", || {
            control_plane(cfg, &mut mesh, &mut probes)
        }));
    }
    if want_fo {
        tables.push(crate::guarded_one("6. Failover", || {
            failover(cfg, &mut mesh, &mut probes, vip_works)
        }));
    }
    Ok(tables)
}

/// Stops cluster 4's meshd and deletes the cluster; waits until the other
/// gateways dropped it.
fn retire_c4(mesh: &mut Mesh) -> Result<()> {
    mesh.stop_meshd(4);
    mesh.sky(&["delete", "cluster", "c4"])?;
    ensure!(
        wait_until(Duration::from_secs(10), || CLUSTERS.iter().all(|&i| mesh
            .wg(i, &["peers"])
            .is_ok_and(|p| p.lines().count() == 2))),
        "the gateways did not drop c4 within 10 s"
    );
    Ok(())
}

fn control_plane(cfg: &Cfg, mesh: &mut Mesh, probes: &mut [DnsProbe]) -> Result<Table> {
    let mut prop = Vec::new();
    let mut skyctl_ms = Vec::new();
    for k in 0..cfg.propagation {
        let name = format!("cp-{k}");
        let fqdn = format!("{name}.default.svc");
        let t0 = Instant::now();
        mesh.sky(&["create", "service", &name, "-p", "80:8080"])?;
        skyctl_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        let mut pending: Vec<usize> = (0..probes.len()).collect();
        while !pending.is_empty() {
            ensure!(
                t0.elapsed() < Duration::from_secs(10),
                "{fqdn} did not resolve in clusters {pending:?} within 10 s"
            );
            pending.retain(|&i| !probes[i].resolves(&fqdn));
        }
        prop.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    eprintln!(
        "[control] create → resolvable in 3 clusters: p50 {:.0} ms, p99 {:.0} ms",
        percentile(&prop, 50.0).unwrap_or(f64::NAN),
        percentile(&prop, 99.0).unwrap_or(f64::NAN)
    );
    let joins = (0..cfg.runs)
        .map(|run| {
            let t = join_c4(mesh)?;
            eprintln!("[control] join {}/{}: {t:.2} s", run + 1, cfg.runs);
            Ok(t)
        })
        .collect::<Result<Vec<f64>>>();
    let mut t = Table::new(
        "5. Control plane",
        "skymesh",
        &[],
        format!(
            "3 clusters. Propagation: {} services made one after another with `skyctl create \
             service` (a fresh skyctl process each, in the coordinator's namespace); the clock \
             runs from starting skyctl until the name answers with its VIP from every \
             cluster's meshd DNS (polled every few ms). Join: `skyctl create cluster`, then a \
             fresh meshd (new key) with the join token; the clock runs from starting meshd \
             until `wg show` on it lists a handshake with all 3 peers (median of {} joins).",
            cfg.propagation, cfg.runs
        ),
    );
    let n = prop.len();
    t.rows.push(Row::solo(
        &format!("create → resolvable in all 3 clusters, p50 ({n} services)"),
        Unit::Ms,
        Better::Lower,
        Cell::from_samples(&[percentile(&prop, 50.0).unwrap_or(f64::NAN)]),
    ));
    t.rows.push(Row::solo(
        &format!("create → resolvable in all 3 clusters, p99 ({n} services)"),
        Unit::Ms,
        Better::Lower,
        Cell::from_samples(&[percentile(&prop, 99.0).unwrap_or(f64::NAN)]),
    ));
    t.rows.push(Row::solo(
        "of which the skyctl process (p50)",
        Unit::Ms,
        Better::Lower,
        Cell::from_samples(&[percentile(&skyctl_ms, 50.0).unwrap_or(f64::NAN)]),
    ));
    t.rows.push(Row::solo(
        "new cluster: meshd start → handshakes with all 3 peers",
        Unit::Secs,
        Better::Lower,
        Cell::from_result(joins),
    ));
    Ok(t)
}

/// Creates cluster c4, starts a fresh meshd with its join token, times
/// until it has handshakes with every peer, then retires it again.
fn join_c4(mesh: &mut Mesh) -> Result<f64> {
    let out = mesh.sky(&[
        "create",
        "cluster",
        "c4",
        "--workload-cidr",
        &mesh.topo.workload_cidr(4),
    ])?;
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("skyjoin_"))
        .with_context(|| format!("no join token in: {out}"))?
        .to_string();
    let state = mesh.state_dir(4);
    if state.exists() {
        std::fs::remove_dir_all(&state)?;
    }
    let t0 = Instant::now();
    mesh.start_meshd(4, Some(&token))?;
    let up = wait_until(Duration::from_secs(30), || {
        let h = mesh.handshakes(4);
        h.len() == 3 && h.iter().all(|(_, t)| *t > 0)
    });
    let took = t0.elapsed().as_secs_f64();
    ensure!(
        up,
        "c4 had no handshakes with all peers after 30 s: {:?}",
        mesh.handshakes(4)
    );
    retire_c4(mesh)?;
    Ok(took)
}

/// The A records of `name` in every cluster (empty on no answer).
fn answers(probes: &mut [DnsProbe], name: &str) -> Vec<Vec<Ipv4Addr>> {
    probes
        .iter_mut()
        .map(|p| p.ask(name).map(|a| a.a).unwrap_or_default())
        .collect()
}

/// A replica of the failover service in app host 1 of cluster `i`.
fn replica(mesh: &Mesh, i: usize) -> Result<Arc<AtomicBool>> {
    let ip = mesh.topo.app_ip(i, 1);
    // The previous listener may take a moment to close.
    let mut last = None;
    for _ in 0..40 {
        match tools::tcp_reply_server(mesh.topo.app(i, 1), ip, FO_PORT, format!("fo-c{i}")) {
            Ok(f) => return Ok(f),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("could not listen on {ip}:{FO_PORT}")))
}

/// The answers of `n` parallel new connections from cluster 1 to `vip`
/// (500 ms timeout each): a replica's name, or the error.
fn vip_answers(mesh: &Mesh, vip: Ipv4Addr, n: usize) -> Vec<Result<String, String>> {
    let dst = SocketAddr::from((vip, FO_PORT));
    mesh.topo
        .app(1, 1)
        .run_in(|| {
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..n)
                    .map(|_| s.spawn(move || tools::tcp_fetch(dst, Duration::from_millis(500))))
                    .collect();
                hs.into_iter()
                    .map(|h| match h.join() {
                        Ok(Ok(name)) => Ok(name),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("panicked".into()),
                    })
                    .collect()
            })
        })
        .unwrap_or_else(|e| vec![Err(e.to_string())])
}

/// Whether `n` new connections from cluster 1 to `vip` all reach a live
/// replica other than `dead`.
fn vip_clean(mesh: &Mesh, vip: Ipv4Addr, dead: &str, n: usize) -> bool {
    vip_answers(mesh, vip, n).iter().all(|r| {
        r.as_ref()
            .is_ok_and(|name| name.starts_with("fo-") && name != dead)
    })
}

/// Waits until new connections to `vip` reach `replica` (so that its
/// failure is something the balancer must steer around).
fn vip_reaches(mesh: &Mesh, vip: Ipv4Addr, replica: &str) -> Result<()> {
    let mut seen = Vec::new();
    let ok = wait_until(Duration::from_secs(15), || {
        seen = vip_answers(mesh, vip, 12);
        seen.iter().any(|r| r.as_ref().is_ok_and(|n| n == replica))
    });
    ensure!(
        ok,
        "new connections to the VIP never reach {replica}: {seen:?}"
    );
    Ok(())
}

/// Polls until `dns_gone` (and, with a VIP, [`vip_clean`]) hold; returns
/// the seconds each took.
fn time_failover(
    mesh: &Mesh,
    probes: &mut [DnsProbe],
    mut dns_gone: impl FnMut(&mut [DnsProbe]) -> bool,
    vip: Option<(Ipv4Addr, &str)>,
) -> Result<(f64, Option<f64>)> {
    let t0 = Instant::now();
    let (mut dns_t, mut vip_t) = (None, None);
    while dns_t.is_none() || (vip.is_some() && vip_t.is_none()) {
        if t0.elapsed() > FAILOVER_TIMEOUT {
            bail!("no failover after {FAILOVER_TIMEOUT:?} (dns {dns_t:?}, vip {vip_t:?})");
        }
        if dns_t.is_none() && dns_gone(probes) {
            dns_t = Some(t0.elapsed().as_secs_f64());
        }
        if let Some((addr, dead)) = vip
            && vip_t.is_none()
            && vip_clean(mesh, addr, dead, 10)
        {
            vip_t = Some(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((dns_t.unwrap_or(f64::NAN), vip_t))
}

/// `skymesh_peer_up{peer="<peer>"}` on gateway `i`.
fn peer_up(mesh: &Mesh, i: usize, peer: &str) -> Option<f64> {
    let page = mesh.metrics(i).ok()?;
    let prefix = format!("skymesh_peer_up{{peer=\"{peer}\"}}");
    page.lines()
        .find(|l| l.starts_with(&prefix))?
        .rsplit(' ')
        .next()?
        .parse()
        .ok()
}

fn failover(cfg: &Cfg, mesh: &mut Mesh, probes: &mut [DnsProbe], vip_works: bool) -> Result<Table> {
    let mut flags = Vec::new();
    for i in CLUSTERS {
        flags.push(replica(mesh, i)?);
        let ip = mesh.topo.app_ip(i, 1).to_string();
        let (job, cluster) = (format!("fo-c{i}"), format!("c{i}"));
        let port = format!("fo:{FO_PORT}");
        mesh.sky(&[
            "create",
            "job",
            &job,
            "--cluster",
            &cluster,
            "--ip",
            &ip,
            "--port",
            &port,
            "-l",
            "app=fo",
        ])?;
    }
    let ports = format!("fo:{FO_PORT}:{FO_PORT}");
    mesh.sky(&[
        "create", "service", "fo", "-t", "Headless", "-s", "app=fo", "-p", &ports,
    ])?;
    mesh.sky(&["create", "service", "fov", "-s", "app=fo", "-p", &ports])?;
    let vip = if vip_works {
        Some(vip::vip_of(mesh, "fov")?)
    } else {
        None
    };
    let ips: Vec<Ipv4Addr> = CLUSTERS.iter().map(|&i| mesh.topo.app_ip(i, 1)).collect();
    let all_ready = |probes: &mut [DnsProbe]| {
        answers(probes, "fo.default.svc")
            .iter()
            .all(|a| ips.iter().all(|ip| a.contains(ip)))
    };
    ensure!(
        wait_until(Duration::from_secs(20), || all_ready(probes)),
        "the failover replicas never all resolved: {:?}",
        answers(probes, "fo.default.svc")
    );
    let (mut r_dns, mut r_vip, mut g_down, mut g_vip) = (vec![], vec![], vec![], vec![]);
    let dead_ip = mesh.topo.app_ip(2, 1);
    for run in 0..cfg.runs {
        // A replica dies: its listener closes, its health check fails.
        if let Some(vip) = vip {
            vip_reaches(mesh, vip, "fo-c2")?;
        }
        flags[1].store(true, Ordering::Relaxed);
        let (d, v) = time_failover(
            mesh,
            probes,
            |p| {
                answers(p, "fo.default.svc")
                    .iter()
                    .all(|a| !a.contains(&dead_ip))
            },
            vip.map(|a| (a, "fo-c2")),
        )?;
        eprintln!(
            "[failover] replica {}/{}: DNS {d:.2} s, VIP {v:?}",
            run + 1,
            cfg.runs
        );
        r_dns.push(d);
        r_vip.extend(v);
        flags[1] = replica(mesh, 2)?;
        ensure!(
            wait_until(Duration::from_secs(20), || all_ready(probes)),
            "the replica did not come back"
        );

        // A gateway dies: meshd of cluster 3 is killed.
        if let Some(vip) = vip {
            vip_reaches(mesh, vip, "fo-c3")?;
        }
        mesh.stop_meshd(3);
        let (d, v) = time_failover(
            mesh,
            probes,
            |_| [1, 2].iter().all(|&i| peer_up(mesh, i, "c3") == Some(0.0)),
            vip.map(|a| (a, "fo-c3")),
        )?;
        eprintln!(
            "[failover] gateway {}/{}: peers mark it down {d:.2} s, VIP {v:?}",
            run + 1,
            cfg.runs
        );
        g_down.push(d);
        g_vip.extend(v);
        mesh.start_meshd(3, None)?;
        ensure!(
            wait_until(Duration::from_secs(30), || [1, 2]
                .iter()
                .all(|&i| peer_up(mesh, i, "c3") == Some(1.0))
                && all_ready(probes)),
            "gateway c3 did not come back"
        );
    }
    for f in &flags {
        f.store(true, Ordering::Relaxed);
    }
    let vip_cell = |v: &[f64]| {
        if vip_works {
            Cell::from_samples(v)
        } else {
            Cell::Na(vip::NA.into())
        }
    };
    let mut t = Table::new(
        "6. Failover",
        "skymesh",
        &[],
        format!(
            "3 clusters, one replica of service `fo` in each (a TCP listener that meshd \
             health-checks every second). Replica: its listener closes; the clock stops when \
             the headless name no longer lists it in any cluster's DNS, and (VIPs) when 10 \
             parallel new connections from cluster 1 to the ClusterIP all reach live replicas. \
             Gateway: cluster 3's meshd is SIGKILLed; the clock stops when both other gateways \
             report `skymesh_peer_up{{peer=\"c3\"}} 0`, and (VIPs) when 10 new connections \
             all avoid cluster 3's replica. Before each kill, new VIP connections are seen \
             reaching the replica about to die. Median of {} runs.",
            cfg.runs
        ),
    );
    for (metric, cell) in [
        (
            "replica dies → gone from DNS in all 3 clusters",
            Cell::from_samples(&r_dns),
        ),
        (
            "replica dies → no new VIP connection reaches it",
            vip_cell(&r_vip),
        ),
        (
            "gateway dies → both peers mark it down (probes)",
            Cell::from_samples(&g_down),
        ),
        (
            "gateway dies → no new VIP connection goes to its replica",
            vip_cell(&g_vip),
        ),
    ] {
        t.rows
            .push(Row::solo(metric, Unit::Secs, Better::Lower, cell));
    }
    Ok(t)
}
