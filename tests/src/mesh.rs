//! A running mesh in a [`Topology`]: the real coordinator in the WAN
//! namespace, clusters created with the real `skyctl`, and one real `meshd`
//! per gateway namespace, joined with the printed join tokens — the way an
//! operator brings one up.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Output};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use crate::bin_path;
use crate::netns::{NsProcess, Topology, wait_until};

/// Port of each gateway's metrics endpoint (on the gateway's loopback).
pub const METRICS_PORT: u16 = 9108;
/// Port of each gateway's DNS server.
pub const DNS_PORT: u16 = 53;

/// A running mesh.
pub struct Mesh {
    /// Processes first: they must die before the namespaces go.
    coordinator: Option<NsProcess>,
    /// etcd and further coordinator replicas (etcd mode).
    others: Vec<NsProcess>,
    meshd: Vec<Option<NsProcess>>,
    token: String,
    /// What meshd and skyctl get as `--coordinator`.
    urls: String,
    /// Extra coordinator flags (etcd mode).
    store_args: Vec<String>,
    /// The meshd binary gateways run.
    meshd_bin: PathBuf,
    /// Extra meshd flags per cluster (from the next start on).
    meshd_args: Vec<Vec<String>>,
    /// WireGuard UDP port per cluster (`--listen-port`, `--endpoint`).
    meshd_ports: Vec<u16>,
    /// `--endpoint` per cluster in place of the gateway's WAN address and
    /// port (e.g. a host name).
    meshd_endpoints: Vec<Option<String>>,
    pub topo: Topology,
}

impl Mesh {
    /// Builds `n` clusters with `apps` app hosts each, starts the
    /// coordinator, creates the clusters with skyctl and joins a meshd in
    /// each gateway.
    pub fn start(n: usize, apps: usize) -> Result<Self> {
        Self::start_inner(Topology::new(n, apps)?, false, bin_path("meshd"))
    }

    /// Like [`Mesh::start`], in a topology the caller built (e.g. to start
    /// a packet capture on the WAN before anything joins).
    pub fn start_in(topo: Topology) -> Result<Self> {
        Self::start_inner(topo, false, bin_path("meshd"))
    }

    /// Like [`Mesh::start`], with another meshd binary in the gateways
    /// (the benchmark compares a build of an older commit with this one).
    pub fn start_with_meshd(n: usize, apps: usize, meshd: PathBuf) -> Result<Self> {
        Self::start_inner(Topology::new(n, apps)?, false, meshd)
    }

    /// Like [`Mesh::start`], but with two coordinator replicas
    /// (198.51.100.1:7400 and :7401) sharing one etcd that runs in the WAN
    /// namespace; meshd and skyctl are given both.
    pub fn start_on_etcd(n: usize, apps: usize) -> Result<Self> {
        Self::start_inner(Topology::new(n, apps)?, true, bin_path("meshd"))
    }

    fn start_inner(topo: Topology, etcd: bool, meshd_bin: PathBuf) -> Result<Self> {
        let n = topo.n_clusters();
        let urls = topo.coordinator_url();
        let mut mesh = Mesh {
            coordinator: None,
            others: Vec::new(),
            meshd: (0..n).map(|_| None).collect(),
            token: String::new(),
            urls,
            store_args: Vec::new(),
            meshd_bin,
            meshd_args: vec![Vec::new(); n],
            meshd_ports: vec![51820; n],
            meshd_endpoints: vec![None; n],
            topo,
        };
        if etcd {
            mesh.start_etcd_replicas()?;
        } else {
            mesh.start_coordinator()?;
        }
        for i in 1..=n {
            let cidr = mesh.topo.workload_cidr(i);
            let name = mesh.topo.cluster_name(i);
            let out = mesh.skyctl(&["create", "cluster", &name, "--workload-cidr", &cidr]);
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            if !out.status.success() {
                bail!(
                    "skyctl create cluster {name} failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            let token = text
                .split_whitespace()
                .find(|w| w.starts_with("skyjoin_"))
                .with_context(|| format!("no join token in skyctl output:\n{text}"))?
                .to_string();
            mesh.start_meshd(i, Some(&token))?;
        }
        // Joined once its credential and the pinned CA are on disk: from
        // then on a gateway restarts without a token (tests restart them
        // straight away).
        for i in 1..=n {
            let dir = mesh.state_dir(i);
            if !wait_until(Duration::from_secs(20), || {
                dir.join("credential").exists() && dir.join(skymesh_proto::tls::CA_FILE).exists()
            }) {
                bail!("meshd {i} did not join:\n{}", mesh.meshd_log(i));
            }
        }
        Ok(mesh)
    }

    fn coordinator_dir(&self) -> PathBuf {
        self.topo.dir().join("coordinator")
    }

    /// A gRPC endpoint of the coordinator that verifies it with the CA in
    /// its data dir, as skyctl on its host does (connect from the WAN
    /// namespace).
    pub fn coordinator_endpoint(&self) -> Result<tonic::transport::Endpoint> {
        let ca = self.coordinator_dir().join(skymesh_proto::tls::CA_FILE);
        let trust = skymesh_proto::tls::Trust::from_ca_file(&ca).map_err(anyhow::Error::msg)?;
        skymesh_proto::tls::ClientTls::new(Some(trust))
            .endpoint(&self.topo.coordinator_url())
            .map_err(anyhow::Error::msg)
    }

    /// etcd (one member, on the WAN namespace's loopback) and two
    /// coordinators on it sharing one admin token.
    fn start_etcd_replicas(&mut self) -> Result<()> {
        let data = self.topo.dir().join("etcd");
        let log = self.topo.dir().join("etcd.log");
        let etcd = self.topo.wan().spawn(
            &[
                "etcd",
                "--data-dir",
                data.to_str().context("etcd dir is UTF-8")?,
                "--listen-client-urls",
                "http://127.0.0.1:2379",
                "--advertise-client-urls",
                "http://127.0.0.1:2379",
                "--listen-peer-urls",
                "http://127.0.0.1:2380",
            ],
            &log,
        )?;
        self.others.push(etcd);
        self.store_args = [
            "--store",
            "etcd",
            "--etcd-endpoints",
            "http://127.0.0.1:2379",
        ]
        .map(String::from)
        .to_vec();
        self.start_coordinator()?;
        // The second replica, with the first one's admin token.
        let dir = self.topo.dir().join("coordinator-b");
        let token_file = self.coordinator_dir().join("admin.token");
        let bin = bin_path("coordinator");
        let listen = SocketAddr::from((crate::netns::COORDINATOR_IP, 7401)).to_string();
        let log = self.topo.dir().join("coordinator-b.log");
        let mut args: Vec<&str> = vec![
            bin.to_str().context("binary path is UTF-8")?,
            "--listen",
            &listen,
            "--data-dir",
            dir.to_str().context("data dir is UTF-8")?,
            "--admin-token-file",
            token_file.to_str().context("token path is UTF-8")?,
        ];
        args.extend(self.store_args.iter().map(String::as_str));
        self.others.push(self.topo.wan().spawn(&args, &log)?);
        if !wait_until(Duration::from_secs(20), || dir.join("listen.addr").exists()) {
            bail!(
                "second coordinator did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        self.urls = format!("{},https://{listen}", self.topo.coordinator_url());
        Ok(())
    }

    /// Starts (or restarts) the coordinator on 198.51.100.1:7400 with its
    /// data directory.
    pub fn start_coordinator(&mut self) -> Result<()> {
        let dir = self.coordinator_dir();
        let listen = self.topo.coordinator_addr().to_string();
        let bin = bin_path("coordinator");
        let log = self.topo.dir().join("coordinator.log");
        let args = [
            bin.to_str().context("binary path is UTF-8")?,
            "--listen",
            &listen,
            "--data-dir",
            dir.to_str().context("data dir is UTF-8")?,
        ];
        let _ = std::fs::remove_file(dir.join("listen.addr"));
        let mut args: Vec<&str> = args.to_vec();
        args.extend(self.store_args.iter().map(String::as_str));
        self.coordinator = Some(self.topo.wan().spawn(&args, &log)?);
        if !wait_until(Duration::from_secs(20), || dir.join("listen.addr").exists()) {
            bail!(
                "coordinator did not start:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        self.token = std::fs::read_to_string(dir.join("admin.token"))?
            .trim()
            .to_string();
        Ok(())
    }

    /// Sends the coordinator SIGTERM and waits up to `grace` for it to exit
    /// (then SIGKILLs it). Returns its exit status (`None` if it had to be
    /// killed or was not running) and how long it took to exit.
    pub fn terminate_coordinator(&mut self, grace: Duration) -> (Option<ExitStatus>, Duration) {
        terminate(self.coordinator.take(), grace)
    }

    /// The coordinator's process id (to freeze it with SIGSTOP, say), if
    /// it runs.
    pub fn coordinator_pid(&self) -> Option<u32> {
        self.coordinator.as_ref().map(NsProcess::pid)
    }

    /// Everything the coordinator logged, over all its starts.
    pub fn coordinator_log(&self) -> String {
        std::fs::read_to_string(self.topo.dir().join("coordinator.log")).unwrap_or_default()
    }

    /// Kills the coordinator (SIGKILL).
    pub fn stop_coordinator(&mut self) {
        if let Some(p) = self.coordinator.take() {
            p.kill();
        }
    }

    /// The state directory of cluster `i`'s meshd.
    pub fn state_dir(&self, i: usize) -> PathBuf {
        self.topo.dir().join(format!("meshd-{i}"))
    }

    /// The jobs file of cluster `i`'s meshd (`--jobs`).
    pub fn jobs_file(&self, i: usize) -> PathBuf {
        self.topo.dir().join(format!("jobs-{i}.toml"))
    }

    /// Starts cluster `i`'s meshd (with a join token on first start).
    pub fn start_meshd(&mut self, i: usize, join_token: Option<&str>) -> Result<()> {
        let bin = self.meshd_bin.clone();
        let url = self.urls.clone();
        let name = self.topo.cluster_name(i);
        let port = self.meshd_ports[i - 1];
        let endpoint = self.meshd_endpoints[i - 1]
            .clone()
            .unwrap_or_else(|| SocketAddr::from((self.topo.gateway_wan_ip(i), port)).to_string());
        let port = port.to_string();
        let state = self.state_dir(i);
        let iface = self.topo.iface(i);
        let metrics = format!("127.0.0.1:{METRICS_PORT}");
        let dns = SocketAddr::from((self.topo.gateway_lan_ip(i), DNS_PORT)).to_string();
        let jobs = self.jobs_file(i);
        if !jobs.exists() {
            std::fs::write(&jobs, "")?;
        }
        let mut args: Vec<&str> = vec![
            bin.to_str().context("binary path is UTF-8")?,
            "--coordinator",
            &url,
            "--cluster",
            &name,
            "--endpoint",
            &endpoint,
            "--listen-port",
            &port,
            "--state-dir",
            state.to_str().context("state dir is UTF-8")?,
            "--interface",
            &iface,
            "--metrics-listen",
            &metrics,
            "--dns-listen",
            &dns,
            "--jobs",
            jobs.to_str().context("jobs path is UTF-8")?,
        ];
        // The token goes in a file, as an operator would keep it (never on
        // the command line).
        let token_file = self.topo.dir().join(format!("join-token-{i}"));
        if let Some(t) = join_token {
            write_private(&token_file, t)?;
            args.extend([
                "--join-token-file",
                token_file.to_str().context("token path is UTF-8")?,
            ]);
        }
        args.extend(self.meshd_args[i - 1].iter().map(String::as_str));
        let log = self.topo.dir().join(format!("meshd-{i}.log"));
        let mut cmd = std::process::Command::new(args[0]);
        cmd.args(&args[1..]).env("RUST_LOG", "info,meshd=debug");
        self.meshd[i - 1] = Some(self.topo.gateway(i).spawn_command(&cmd, &log)?);
        Ok(())
    }

    /// Extra flags for cluster `i`'s meshd from its next start on.
    pub fn set_meshd_args(&mut self, i: usize, args: &[&str]) {
        self.meshd_args[i - 1] = args.iter().map(|a| a.to_string()).collect();
    }

    /// The `--endpoint` of cluster `i`'s meshd from its next start on
    /// (`None`: the gateway's WAN address and WireGuard port).
    pub fn set_meshd_endpoint(&mut self, i: usize, endpoint: Option<&str>) {
        self.meshd_endpoints[i - 1] = endpoint.map(str::to_string);
    }

    /// The WireGuard port of cluster `i`'s meshd from its next start on
    /// (`--listen-port`, and `--endpoint` on the gateway's WAN address).
    pub fn set_meshd_port(&mut self, i: usize, port: u16) {
        self.meshd_ports[i - 1] = port;
    }

    /// The VIP (`status.cluster_ip`) of service `name` in `default`, as
    /// `skyctl get service -o json` shows it.
    pub fn service_vip(&self, name: &str) -> Result<Ipv4Addr> {
        let json = self.sky(&["get", "service", name, "-o", "json"])?;
        let v: serde_json::Value =
            serde_json::from_str(&json).context("skyctl -o json printed no JSON")?;
        v.pointer("/status/cluster_ip")
            .and_then(|i| i.as_str())
            .with_context(|| format!("no VIP in {json}"))?
            .parse()
            .with_context(|| format!("the VIP in {json} is no IPv4 address"))
    }

    /// Waits up to `timeout` until service `name`'s endpoints (in
    /// `default`) list at least `n` ready addresses.
    pub fn wait_for_ready(&self, name: &str, n: usize, timeout: Duration) -> bool {
        wait_until(timeout, || {
            let ep = self
                .sky(&["get", "endpoints", name, "-o", "json"])
                .unwrap_or_default();
            ep.matches("\"ready\": true").count() + ep.matches("\"ready\":true").count() >= n
        })
    }

    /// The process id of cluster `i`'s meshd while it runs.
    pub fn meshd_pid(&self, i: usize) -> Option<u32> {
        self.meshd[i - 1].as_ref().map(NsProcess::pid)
    }

    /// Cluster `i`'s meshd's exit status once it has exited by itself.
    pub fn meshd_exited(&self, i: usize) -> Option<ExitStatus> {
        self.meshd[i - 1].as_ref().and_then(NsProcess::try_wait)
    }

    /// Sends cluster `i`'s meshd SIGTERM and waits up to `grace` for it to
    /// exit (then SIGKILLs it). Returns its exit status (`None` if it had to
    /// be killed or was not running) and how long it took to exit.
    pub fn terminate_meshd(&mut self, i: usize, grace: Duration) -> (Option<ExitStatus>, Duration) {
        terminate(self.meshd[i - 1].take(), grace)
    }

    /// Starts a long-running skyctl (e.g. `get service --watch`) in the WAN
    /// namespace with the coordinator's URL and token file; its stdout goes
    /// to `stdout`, its stderr to `stderr`. It is killed when the handle or
    /// the mesh is dropped.
    pub fn spawn_skyctl(&self, args: &[&str], stdout: &Path, stderr: &Path) -> Result<NsProcess> {
        let bin = bin_path("skyctl");
        let token_file = self.coordinator_dir().join("admin.token");
        // The shell only redirects stderr and execs skyctl (same pid, so
        // the handle signals skyctl itself).
        let script = format!(
            "exec \"$@\" 2>>'{}'",
            stderr.to_str().context("stderr path is UTF-8")?
        );
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &script, "sh"])
            .arg(&bin)
            .args(["--coordinator", &self.urls, "--token-file"])
            .arg(&token_file)
            .args(args)
            .env_remove("RUST_LOG");
        self.topo.wan().spawn_command(&cmd, stdout)
    }

    /// Kills cluster `i`'s meshd (SIGKILL).
    pub fn stop_meshd(&mut self, i: usize) {
        if let Some(p) = self.meshd[i - 1].take() {
            p.kill();
        }
    }

    /// Cluster `i`'s meshd log.
    pub fn meshd_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.topo.dir().join(format!("meshd-{i}.log"))).unwrap_or_default()
    }

    /// Runs skyctl (in the WAN namespace, where the coordinator is).
    pub fn skyctl(&self, args: &[&str]) -> Output {
        let bin = bin_path("skyctl");
        let url = self.urls.clone();
        // The token and the CA from the coordinator's data dir, as on the
        // coordinator's host.
        let token_file = self.coordinator_dir().join("admin.token");
        let mut full: Vec<&str> = vec![
            bin.to_str().unwrap_or("skyctl"),
            "--coordinator",
            &url,
            "--token-file",
            token_file.to_str().unwrap_or("admin.token"),
        ];
        full.extend(args);
        self.topo.wan().exec(&full)
    }

    /// Runs skyctl and returns its stdout, failing on a non-zero exit.
    pub fn sky(&self, args: &[&str]) -> Result<String> {
        let out = self.skyctl(args);
        if !out.status.success() {
            bail!(
                "skyctl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).to_string())
    }

    /// Writes `yaml` to `<stem>.yaml` in the topology's directory and runs
    /// `skyctl apply -f` on it; returns what skyctl printed.
    pub fn apply(&self, stem: &str, yaml: &str) -> Result<String> {
        let path = self.topo.dir().join(format!("{stem}.yaml"));
        std::fs::write(&path, yaml)?;
        self.sky(&["apply", "-f", path.to_str().context("temp path is UTF-8")?])
    }

    /// `wg show <iface> DUMP_ARGS...` of cluster `i`'s meshd.
    pub fn wg(&self, i: usize, args: &[&str]) -> Result<String> {
        let iface = self.topo.iface(i);
        let mut full = vec!["wg", "show", iface.as_str()];
        full.extend(args);
        self.topo.gateway(i).run(&full)
    }

    /// Latest handshake (unix seconds) per peer public key of cluster `i`.
    pub fn handshakes(&self, i: usize) -> Vec<(String, u64)> {
        self.wg(i, &["latest-handshakes"])
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace();
                Some((it.next()?.to_string(), it.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Waits until every gateway has a handshake with all `n - 1` peers.
    pub fn wait_for_tunnels(&self, timeout: Duration) -> bool {
        let n = self.topo.n_clusters();
        wait_until(timeout, || {
            (1..=n).all(|i| {
                let h = self.handshakes(i);
                h.len() == n - 1 && h.iter().all(|(_, t)| *t > 0)
            })
        })
    }

    /// Cluster `i`'s metrics page.
    pub fn metrics(&self, i: usize) -> Result<String> {
        self.topo.gateway(i).run_in(|| -> Result<String> {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT)),
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(2)))?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })?
    }

    /// The value of a metric line starting with `prefix` (e.g.
    /// `skymesh_drops_total{reason="source_not_allowed"}`), 0 if absent.
    pub fn metric(&self, i: usize, prefix: &str) -> f64 {
        self.metrics(i)
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for i in 1..=self.meshd.len() {
                eprintln!("---- meshd {i} log ----\n{}", self.meshd_log(i));
            }
            eprintln!(
                "---- coordinator log ----\n{}",
                std::fs::read_to_string(self.topo.dir().join("coordinator.log"))
                    .unwrap_or_default()
            );
        }
        for p in self.meshd.iter_mut().filter_map(Option::take) {
            p.kill();
        }
        self.stop_coordinator();
        for p in self.others.drain(..) {
            p.kill();
        }
    }
}

/// SIGTERM, then the time to exit (SIGKILL after `grace`).
fn terminate(p: Option<NsProcess>, grace: Duration) -> (Option<ExitStatus>, Duration) {
    let Some(p) = p else {
        return (None, Duration::ZERO);
    };
    let t0 = Instant::now();
    let status = p.terminate(grace);
    let took = t0.elapsed();
    // A status after the grace period is the SIGKILL's: report none.
    (status.filter(|_| took < grace), took)
}

/// Writes a secret file with mode 0600.
pub fn write_private(path: &std::path::Path, contents: &str) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}
