//! Section 3: what a service VIP costs over talking to the replica
//! directly, both through the tunnel (client in cluster 1, replica in
//! cluster 2): iperf3 TCP throughput and new TCP connections per second.
//!
//! Measured only if meshd balances VIPs: [`available`] makes a service with
//! one replica that answers with its name and tries to reach it through the
//! VIP; if that fails the VIP column says `n/a (VIP balancing not
//! available)` and only the direct path is measured.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::{Netns, NsProcess, wait_until};

use crate::Cfg;
use crate::report::{Better, Cell, Row, Table, Unit};
use crate::tools::{self, Iperf};

/// Why the VIP column is empty when VIPs do not work.
pub const NA: &str = "VIP balancing not available";

const ECHO_PORT: u16 = 7100;
const IPERF_PORT: u16 = 5201;
/// Parallel connectors in the connection-rate test.
const WORKERS: usize = 4;

/// The VIP of service `name` (from `skyctl get service NAME -o json`).
pub fn vip_of(mesh: &Mesh, name: &str) -> Result<Ipv4Addr> {
    let json = mesh.sky(&["get", "service", name, "-o", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&json)?;
    v.pointer("/status/cluster_ip")
        .and_then(|i| i.as_str())
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no VIP in {json}"))
}

/// Service `vb`: one replica in cluster 2.
pub struct VipSetup {
    /// The service's VIP.
    pub vip: Ipv4Addr,
    /// Whether a connection from cluster 1 to the VIP reaches the replica.
    pub works: bool,
    _iperf: NsProcess,
}

/// Sets up service `vb` with one replica in cluster 2 (a name server on
/// [`ECHO_PORT`], an iperf3 server on [`IPERF_PORT`]: both ports are
/// health-checked) and checks whether its VIP works.
pub fn available(mesh: &Mesh) -> Result<VipSetup> {
    let ip = mesh.topo.app_ip(2, 1);
    // Runs as long as the mesh's namespaces exist.
    tools::tcp_reply_server(mesh.topo.app(2, 1), ip, ECHO_PORT, "vb-c2".into())?;
    let log = mesh.topo.dir().join("vip-iperf3.log");
    let iperf = tools::iperf_server(mesh.topo.app(2, 1), ip, IPERF_PORT, &log)?;
    mesh.sky(&[
        "create",
        "job",
        "vb-c2",
        "--cluster",
        "c2",
        "--ip",
        &ip.to_string(),
        "--port",
        &format!("echo:{ECHO_PORT}"),
        "--port",
        &format!("iperf:{IPERF_PORT}"),
        "-l",
        "app=vb",
    ])?;
    mesh.sky(&[
        "create",
        "service",
        "vb",
        "-s",
        "app=vb",
        "-p",
        &format!("echo:{ECHO_PORT}:{ECHO_PORT}"),
        "-p",
        &format!("iperf:{IPERF_PORT}:{IPERF_PORT}"),
    ])?;
    let vip = vip_of(mesh, "vb")?;
    let dst = SocketAddr::from((vip, ECHO_PORT));
    let mut last = String::new();
    let works = wait_until(Duration::from_secs(8), || {
        let r = mesh
            .topo
            .app(1, 1)
            .run_in(|| tools::tcp_fetch(dst, Duration::from_millis(500)));
        last = match r {
            Ok(Ok(s)) if s == "vb-c2" => return true,
            Ok(Ok(s)) => format!("answered {s:?}"),
            Ok(Err(e)) => e.to_string(),
            Err(e) => e.to_string(),
        };
        false
    });
    eprintln!(
        "[vip] service VIP {vip}: {}",
        if works {
            "balanced by meshd".to_string()
        } else {
            format!("{NA} (last try: {last})")
        }
    );
    Ok(VipSetup {
        vip,
        works,
        _iperf: iperf,
    })
}

/// Runs section 3 on a mesh where [`available`] has run.
pub fn run(cfg: &Cfg, mesh: &Mesh, setup: &VipSetup) -> Result<Table> {
    let (vip, works) = (setup.vip, setup.works);
    let replica = mesh.topo.app_ip(2, 1);
    // Two client hosts: meshd keeps reverse-translating replies of closed
    // VIP flows, so a direct connection that reuses the source port of an
    // earlier VIP connection (certain after thousands of them) would get its
    // SYN-ACK rewritten to the VIP and hang.
    let clients = [mesh.topo.app(1, 1), mesh.topo.app(1, 2)];
    ensure!(
        wait_until(Duration::from_secs(10), || clients[1].ping(replica)),
        "app c1 cannot reach the replica {replica} through the tunnel"
    );
    let targets: Vec<(usize, Ipv4Addr)> = if works {
        vec![(0, vip), (1, replica)]
    } else {
        vec![(1, replica)]
    };
    let mut tput: [Result<Vec<f64>>; 2] = [Ok(Vec::new()), Ok(Vec::new())];
    let mut rate: [Result<Vec<f64>>; 2] = [Ok(Vec::new()), Ok(Vec::new())];
    for run in 0..cfg.runs {
        for &(i, dst) in &targets {
            let client = clients[i];
            if let Ok(v) = &mut tput[i] {
                match tools::iperf(client, dst, IPERF_PORT, Iperf::Tcp(1), cfg.iperf_secs) {
                    Ok(r) => v.push(r.gbps),
                    Err(e) => tput[i] = Err(e),
                }
            }
            if let Ok(v) = &mut rate[i] {
                let d = SocketAddr::from((dst, ECHO_PORT));
                match tools::conn_rate(client, d, cfg.conn_secs, WORKERS) {
                    Ok(r) => v.push(r),
                    Err(e) => rate[i] = Err(e),
                }
            }
            let last = |r: &Result<Vec<f64>>| {
                r.as_ref()
                    .ok()
                    .and_then(|v| v.last())
                    .map_or_else(|| "failed".to_string(), |x| format!("{x:.2}"))
            };
            eprintln!(
                "[vip] run {}/{} {:<7}: {} Gbit/s, {} new connections/s",
                run + 1,
                cfg.runs,
                if i == 0 { "via VIP" } else { "direct" },
                last(&tput[i]),
                last(&rate[i]),
            );
        }
    }
    let [t_vip, t_direct] = tput;
    let [r_vip, r_direct] = rate;
    let vip_cell = |r: Result<Vec<f64>>| {
        if works {
            Cell::from_result(r)
        } else {
            Cell::Na(NA.into())
        }
    };
    let mut t = Table::new(
        "3. Service VIP overhead",
        "via VIP",
        &["direct to replica"],
        format!(
            "Clients in cluster 1 (one app host for the VIP, another for the direct path), \
             one replica in cluster 2, both paths through the tunnel; \
             iperf3 TCP 1 stream ({} s) and new TCP connections per second ({WORKERS} \
             connectors, each connection: connect, read the replica's name, close; {} s), \
             median of {} runs.",
            cfg.iperf_secs, cfg.conn_secs, cfg.runs
        ),
    );
    t.rows.push(Row {
        metric: "TCP throughput, 1 stream".into(),
        unit: Unit::Gbps,
        better: Better::Higher,
        skymesh: vip_cell(t_vip),
        peers: vec![Cell::from_result(t_direct)],
    });
    t.rows.push(Row {
        metric: "new TCP connections".into(),
        unit: Unit::PerSec,
        better: Better::Higher,
        skymesh: vip_cell(r_vip),
        peers: vec![Cell::from_result(r_direct)],
    });
    Ok(t)
}

/// Entries in the benchmark's whitelist (issue #18: "a policy of 100
/// whitelist entries").
const POLICY_ENTRIES: usize = 100;

/// `vb` as a skymesh document, with `whitelists` (none: no policy).
fn vb_doc(whitelists: &[String]) -> String {
    let mut doc = format!(
        "kind: Service\nmetadata:\n  name: vb\nspec:\n  selector:\n    app: vb\n  ports:\n    - name: echo\n      port: {ECHO_PORT}\n      target_port: {ECHO_PORT}\n    - name: iperf\n      port: {IPERF_PORT}\n      target_port: {IPERF_PORT}\n"
    );
    if !whitelists.is_empty() {
        doc.push_str(&format!("  whitelists: [{}]\n", whitelists.join(", ")));
    }
    doc
}

/// Section 3b: new connections per second to `vb`'s VIP from cluster 1
/// with a whitelist of [`POLICY_ENTRIES`] entries that admits the client
/// (its own service, `vclient`, is the last entry, after 80 exact names and
/// 19 patterns with `*`), beside the same VIP without a policy; the two
/// alternate in every run.
pub fn policy(cfg: &Cfg, mesh: &Mesh) -> Result<Table> {
    let client_ip = mesh.topo.app_ip(1, 1);
    mesh.sky(&[
        "create",
        "job",
        "vclient",
        "--cluster",
        "c1",
        "--ip",
        &client_ip.to_string(),
        "--probe",
        "none",
        "-l",
        "app=vclient",
    ])?;
    mesh.sky(&[
        "create",
        "service",
        "vclient",
        "-s",
        "app=vclient",
        "-p",
        "1",
    ])?;
    ensure!(
        mesh.wait_for_ready("vclient", 1, Duration::from_secs(15)),
        "the benchmark client's job did not become ready"
    );
    let mut entries: Vec<String> = (0..80).map(|i| format!("team-{i}/svc-{i}")).collect();
    entries.extend((0..19).map(|i| format!("team-{i}-*/api-*")));
    entries.push("default/vclient".into());
    ensure!(
        entries.len() == POLICY_ENTRIES,
        "the whitelist has {} entries",
        entries.len()
    );
    let set = |lists: &[String]| -> Result<()> {
        mesh.apply("vb-policy", &vb_doc(lists))?;
        Ok(())
    };
    let vip = vip_of(mesh, "vb")?;
    let dst = SocketAddr::from((vip, ECHO_PORT));
    let client = mesh.topo.app(1, 1);
    let reaches_from = |ns: &Netns| {
        ns.run_in(|| tools::tcp_fetch(dst, Duration::from_millis(500)))
            .is_ok_and(|r| r.is_ok_and(|s| s == "vb-c2"))
    };
    // The client reaches the VIP either way; the other app host, which is
    // no job of vclient, is refused once the whitelist is in force at the
    // client's gateway (and let in again once it is gone): measure then.
    let marker = mesh.topo.app(1, 2);
    let in_force = |policed: bool| {
        wait_until(Duration::from_secs(5), || {
            reaches_from(client) && reaches_from(marker) != policed
        })
    };
    let replica = mesh.topo.app_ip(2, 1);
    let mut with: Result<Vec<f64>> = Ok(Vec::new());
    let mut without: Result<Vec<f64>> = Ok(Vec::new());
    let mut tput_with: Result<Vec<f64>> = Ok(Vec::new());
    let mut tput_without: Result<Vec<f64>> = Ok(Vec::new());
    for run in 0..cfg.runs {
        for (policed, out, tput) in [
            (true, &mut with, &mut tput_with),
            (false, &mut without, &mut tput_without),
        ] {
            set(if policed { &entries } else { &[] })?;
            ensure!(
                in_force(policed),
                "the client does not reach vb's VIP, or the whitelist is not (or still) in \
                 force (policy {policed})"
            );
            // Straight to the replica's job IP: while a policy exists both
            // gateways track the call, a lookup per packet.
            if let Ok(v) = tput {
                match tools::iperf(client, replica, IPERF_PORT, Iperf::Tcp(1), cfg.iperf_secs) {
                    Ok(r) => {
                        eprintln!(
                            "[policy] run {}/{} policy {policed}: {:.2} Gbit/s to the job IP",
                            run + 1,
                            cfg.runs,
                            r.gbps
                        );
                        v.push(r.gbps);
                    }
                    Err(e) => *tput = Err(e),
                }
            }
            if let Ok(v) = out {
                match tools::conn_rate(client, dst, cfg.conn_secs, WORKERS) {
                    Ok(r) => {
                        eprintln!(
                            "[policy] run {}/{} {}: {r:.0} new connections/s",
                            run + 1,
                            cfg.runs,
                            if policed {
                                "100-entry whitelist"
                            } else {
                                "no policy"
                            }
                        );
                        v.push(r);
                    }
                    Err(e) => *out = Err(e),
                }
            }
        }
    }
    set(&[])?;
    let mut t = Table::new(
        "3b. Service policy at flow setup",
        "100-entry whitelist",
        &["no policy"],
        format!(
            "Section 3's client and VIP; the service whitelists {POLICY_ENTRIES} entries (80 exact \
             names, 19 patterns with `*`, then the client's own service), which meshd judges once \
             per new flow at the client's gateway. New TCP connections per second ({WORKERS} \
             connectors, {} s) to the VIP, and iperf3 TCP 1 stream ({} s) straight to the \
             replica's job IP (a call both gateways judge once and then track, one table lookup \
             per packet), the two cases alternating, median of {} runs.",
            cfg.conn_secs, cfg.iperf_secs, cfg.runs
        ),
    );
    t.rows.push(Row {
        metric: "new TCP connections".into(),
        unit: Unit::PerSec,
        better: Better::Higher,
        skymesh: Cell::from_result(with),
        peers: vec![Cell::from_result(without)],
    });
    t.rows.push(Row {
        metric: "TCP throughput to the job IP, 1 stream".into(),
        unit: Unit::Gbps,
        better: Better::Higher,
        skymesh: Cell::from_result(tput_with),
        peers: vec![Cell::from_result(tput_without)],
    });
    Ok(t)
}
