//! Network-namespace harness: clusters built out of namespaces, veth pairs
//! and bridges (SPEC §9), with commands, long-running processes and Rust
//! closures run inside them.
//!
//! Everything here is created by the harness and removed on drop, also when
//! a test panics: processes are killed (their whole process group, then
//! anything still inside the namespace), namespaces are deleted, and stale
//! WireGuard API sockets of the run's interface names are removed. Nothing is
//! ever added to the machine's own network namespace: veth pairs are created
//! inside a harness namespace with their peer moved straight into another one.
//!
//! # Naming
//! Every run (a [`Topology`] or a standalone [`Netns`]) gets an id of 9 hex
//! digits: the process id (6 digits) and a per-process counter (3 digits),
//! e.g. `00a1f3002`. Namespaces are `sk<id>-<role>` (`sk00a1f3002-wan`,
//! `sk00a1f3002-gw1`, `sk00a1f3002-c1a1`), so tests running in parallel,
//! in one process or in several, never collide; an id whose names are
//! already taken (leftovers of a killed run) is skipped, never reused.
//! Interface names inside the namespaces are short fixed names (`br0`,
//! `wan0`, `lan0`, `eth0`, `gw<i>`, `app<k>`) because each namespace has its
//! own; only TUN names are global (`/var/run/wireguard/<name>.sock` is shared
//! by all namespaces), so [`Topology::iface`] gives `sk<id><i>` (at most 15
//! characters).
//!
//! # Needs root
//! Every constructor fails with "network-namespace tests need root" when the
//! effective user is not root, so such tests fail loudly instead of passing.
//!
//! # Layout
//! - [`Netns`]: one named namespace; [`Netns::exec`], [`Netns::sh`],
//!   [`Netns::spawn`], [`Netns::run_in`], [`Netns::run_async`].
//! - [`NsProcess`]: a long-running process in a namespace, killed on drop.
//! - [`Topology`]: the multi-cluster lab of SPEC §9.
//! - [`wait_until`]: polling helper.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The WAN joining the gateways (a documentation range).
pub const WAN_CIDR: &str = "198.51.100.0/24";
/// The coordinator's address in the WAN namespace.
pub const COORDINATOR_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// The port the coordinator listens on in a topology.
pub const COORDINATOR_PORT: u16 = 7400;
/// Where `ip netns add` mounts named namespaces.
const NETNS_DIR: &str = "/run/netns";
/// The WireGuard userspace API socket directory, shared by all namespaces.
const WG_SOCK_DIR: &str = "/var/run/wireguard";
/// Most clusters (and apps per cluster) a topology can address.
const MAX_CLUSTERS: usize = 200;

/// Fails unless the effective user is root.
pub fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "network-namespace tests need root (they create namespaces, veth pairs and bridges); \
             run them as root"
        );
    }
    Ok(())
}

/// Polls `f` every 50 ms until it returns true (→ true) or `timeout`
/// passes (→ false). `f` is always called at least once.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Picks a fresh run id: `{pid:06x}{counter:03x}`, skipping ids whose
/// namespaces or WireGuard sockets already exist.
fn new_run_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let pid = std::process::id() & 0xff_ffff;
    loop {
        let ctr = COUNTER.fetch_add(1, Ordering::Relaxed) & 0xfff;
        let id = format!("{pid:06x}{ctr:03x}");
        let prefix = format!("sk{id}");
        let taken = |dir: &str| {
            std::fs::read_dir(dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            })
        };
        if !taken(NETNS_DIR) && !taken(WG_SOCK_DIR) {
            return id;
        }
    }
}

fn output_text(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// Runs a command on the host (only `ip` itself, which then acts inside a
/// harness namespace), failing with its output if it does not succeed.
fn run_host(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("failed to run {args:?} (is iproute2 installed?)"))?;
    ensure!(
        out.status.success(),
        "{args:?} failed ({}): {}",
        out.status,
        output_text(&out).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `ip` command's namespace-pid listing, without our own process (a
/// `run_in` thread never shows there, but be safe).
fn netns_pids(name: &str) -> Vec<i32> {
    let Ok(out) = Command::new("ip")
        .args(["netns", "pids", name])
        .stdin(Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    let me = i32::try_from(std::process::id()).unwrap_or(-1);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&p| p != me && p > 1)
        .collect()
}

/// A long-running process's shared state: the namespace keeps it for its
/// teardown and dump, the [`NsProcess`] handle for the test.
struct ProcInner {
    label: String,
    pid: u32,
    log: PathBuf,
    child: Mutex<Option<Child>>,
    status: Mutex<Option<ExitStatus>>,
}

impl ProcInner {
    fn pgid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.pid).unwrap_or(i32::MAX))
    }

    /// Sends `sig` to the whole process group, if the leader was not reaped.
    fn signal(&self, sig: Signal) {
        let child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if child.is_some() {
            // The leader is not reaped yet, so its pid (= pgid) is still ours.
            let _ = nix::sys::signal::killpg(self.pgid(), sig);
        }
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let mut status = self.status.lock().unwrap_or_else(PoisonError::into_inner);
        if status.is_none()
            && let Some(c) = child.as_mut()
            && let Ok(Some(st)) = c.try_wait()
        {
            *status = Some(st);
            // Reaped: the pid may be recycled, so never signal it again.
            // Anything left of its group is still inside the namespace and
            // dies in the namespace's teardown.
            *child = None;
        }
        *status
    }

    /// SIGKILLs the process group and reaps the leader. Idempotent.
    fn kill(&self) {
        let mut child = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(mut c) = child.take() {
            let _ = nix::sys::signal::killpg(self.pgid(), Signal::SIGKILL);
            let _ = c.kill();
            if let Ok(st) = c.wait() {
                *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(st);
            }
        }
    }

    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// A long-running process started in a namespace by [`Netns::spawn`]. It is
/// the leader of its own process group; dropping the handle (or the
/// namespace) SIGKILLs the whole group. Once the leader has exited and been
/// reaped its pid is never signalled again; whatever it left running inside
/// the namespace is killed when the namespace is torn down.
pub struct NsProcess {
    inner: Arc<ProcInner>,
}

impl NsProcess {
    /// The process id (also its process-group id).
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    /// The label given at spawn (the program's file name).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// Where its stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.inner.log_text()
    }

    /// The exit status if it has ended (reaps it), `None` while it runs.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.inner.try_wait()
    }

    /// Whether it still runs.
    pub fn is_running(&self) -> bool {
        self.try_wait().is_none()
    }

    /// SIGKILLs its process group and reaps it. Idempotent.
    pub fn kill(&self) {
        self.inner.kill();
    }

    /// Sends SIGTERM to its process group and waits up to `grace` for it to
    /// exit, then SIGKILLs it. Returns the exit status.
    pub fn terminate(&self, grace: Duration) -> Option<ExitStatus> {
        self.inner.signal(Signal::SIGTERM);
        if !wait_until(grace, || self.try_wait().is_some()) {
            self.kill();
        }
        self.try_wait().or_else(|| {
            *self
                .inner
                .status
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        })
    }
}

impl Drop for NsProcess {
    fn drop(&mut self) {
        self.inner.kill();
    }
}

/// A named network namespace (`ip netns add`) that this harness created and
/// deletes on drop, with the processes started in it.
pub struct Netns {
    name: String,
    procs: Mutex<Vec<Arc<ProcInner>>>,
    torn_down: bool,
}

impl Netns {
    /// Creates a standalone namespace `sk<id>-<role>` with a fresh run id,
    /// loopback up. `role` is a short label (letters, digits, `-`).
    pub fn new(role: &str) -> Result<Netns> {
        require_root()?;
        Netns::create(&format!("sk{}-{role}", new_run_id()))
    }

    /// Creates the namespace `name` (which must not exist) with loopback up.
    fn create(name: &str) -> Result<Netns> {
        require_root()?;
        ensure!(
            !name.is_empty()
                && name.len() <= 64
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "bad namespace name {name:?}"
        );
        ensure!(
            !Path::new(NETNS_DIR).join(name).exists(),
            "namespace {name} already exists; not touching it"
        );
        run_host(&["ip", "netns", "add", name])?;
        // From here on the namespace is ours: Drop deletes it.
        let ns = Netns {
            name: name.to_string(),
            procs: Mutex::new(Vec::new()),
            torn_down: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name (as `ip netns list` shows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `/run/netns/<name>`.
    pub fn path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.name)
    }

    /// `/etc/netns/<name>`: `ip netns exec` bind-mounts each file in it
    /// over the file of that name in `/etc` for the programs it starts.
    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }

    /// Makes `/etc/<file>` read `contents` for the programs started in this
    /// namespace from now on (e.g. `hosts`, `resolv.conf`; see
    /// `Netns::etc_dir`). Written in place afterwards, so that programs
    /// already running see the new contents too. Removed with the
    /// namespace.
    pub fn set_etc_file(&self, file: &str, contents: &str) -> Result<()> {
        ensure!(
            !file.is_empty() && !file.contains('/') && file != "..",
            "bad /etc file name {file:?}"
        );
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let path = dir.join(file);
        // Truncate and write the same inode: a bind mount of it stays valid.
        std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))
    }

    /// Runs `ip -n <name> ARGS...`, failing with its output on error.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "-n", self.name.as_str()];
        full.extend_from_slice(args);
        run_host(&full)
    }

    fn exec_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.name.as_str()])
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `args` inside the namespace (`ip netns exec`) and waits for it.
    ///
    /// # Panics
    /// If `ip` cannot be started at all (it ran when the namespace was
    /// created, so that means the machine is out of processes).
    pub fn exec(&self, args: &[&str]) -> Output {
        assert!(!args.is_empty(), "exec needs a program");
        self.exec_cmd(args)
            .output()
            .expect("`ip` ran when this namespace was created, so it can be started again")
    }

    /// Runs a `sh -c SCRIPT` inside the namespace and waits for it.
    pub fn sh(&self, script: &str) -> Output {
        self.exec(&["sh", "-c", script])
    }

    /// Runs `args` inside the namespace; fails with its stdout and stderr
    /// unless it exits 0, else returns its stdout.
    pub fn run(&self, args: &[&str]) -> Result<String> {
        ensure!(!args.is_empty(), "run needs a program");
        let out = self
            .exec_cmd(args)
            .output()
            .with_context(|| format!("failed to run {args:?} in {}", self.name))?;
        ensure!(
            out.status.success(),
            "{args:?} in {} failed ({}): {}",
            self.name,
            out.status,
            output_text(&out).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// One ICMP echo to `dst` with a 1 s timeout: whether a reply came.
    /// Needs `ping` (iputils-ping).
    pub fn ping(&self, dst: Ipv4Addr) -> bool {
        self.exec_cmd(&["ping", "-n", "-q", "-c", "1", "-W", "1", &dst.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Starts tcpdump on `interface` (with more tcpdump arguments `extra`,
    /// e.g. a filter) writing every packet whole to `pcap` as it arrives;
    /// returns once it captures. Needs tcpdump.
    pub fn capture(
        &self,
        interface: &str,
        extra: &[&str],
        pcap: &Path,
        log: &Path,
    ) -> Result<NsProcess> {
        let pcap = pcap.to_str().context("pcap path is UTF-8")?;
        let mut args = vec![
            "tcpdump",
            "-i",
            interface,
            "--immediate-mode",
            "-U",
            "-s",
            "0",
            "-w",
            pcap,
        ];
        args.extend(extra);
        let p = self.spawn(&args, log)?;
        // tcpdump says "listening on ..." once it captures.
        ensure!(
            wait_until(Duration::from_secs(10), || p.log().contains("listening on")),
            "tcpdump did not start: {}",
            p.log()
        );
        Ok(p)
    }

    /// Starts `args` inside the namespace as a long-running process with
    /// stdout and stderr appended to `log`. It gets its own process group;
    /// the returned handle (and this namespace's drop) kills the group.
    pub fn spawn(&self, args: &[&str], log: &Path) -> Result<NsProcess> {
        ensure!(!args.is_empty(), "spawn needs a program");
        let mut cmd = Command::new(args[0]);
        cmd.args(&args[1..]);
        self.spawn_command(&cmd, log)
    }

    /// Like [`Netns::spawn`] but takes a prepared [`Command`]: its program,
    /// arguments, environment changes (`env`, `env_remove`; not
    /// `env_clear`) and working directory are used; its stdio is replaced
    /// by the log file.
    pub fn spawn_command(&self, cmd: &Command, log: &Path) -> Result<NsProcess> {
        let program: OsString = cmd.get_program().to_owned();
        let label = Path::new(&program)
            .file_name()
            .map_or_else(|| program.to_string_lossy(), |f| f.to_string_lossy())
            .into_owned();
        if let Some(parent) = log.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening log {}", log.display()))?;
        let err = out.try_clone()?;
        let mut real = Command::new("ip");
        real.args(["netns", "exec", self.name.as_str()])
            .arg(&program)
            .args(cmd.get_args())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        for (k, v) in cmd.get_envs() {
            match v {
                Some(v) => real.env(k, v),
                None => real.env_remove(k),
            };
        }
        if let Some(dir) = cmd.get_current_dir() {
            real.current_dir(dir);
        }
        let child = real
            .spawn()
            .with_context(|| format!("failed to start {label} in {}", self.name))?;
        let inner = Arc::new(ProcInner {
            label,
            pid: child.id(),
            log: log.to_path_buf(),
            child: Mutex::new(Some(child)),
            status: Mutex::new(None),
        });
        self.procs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(inner.clone());
        Ok(NsProcess { inner })
    }

    /// Runs `f` on a fresh thread that first joins this namespace (`setns`
    /// with `CLONE_NEWNET`), and returns its result. Sockets opened in `f`
    /// live in this namespace, also when returned to and used from other
    /// threads. A panic in `f` is propagated.
    pub fn run_in<F, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let file = File::open(self.path())
            .with_context(|| format!("opening {}", self.path().display()))?;
        std::thread::scope(|s| {
            let handle = s.spawn(move || -> Result<R> {
                nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
                    .context("setns into the test namespace")?;
                drop(file);
                Ok(f())
            });
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs the future made by `f` to completion on a current-thread tokio
    /// runtime inside this namespace (see [`Netns::run_in`]); e.g. a gRPC
    /// client talking to a coordinator across the WAN.
    pub fn run_async<F, Fut, R>(&self, f: F) -> Result<R>
    where
        F: FnOnce() -> Fut + Send,
        Fut: std::future::Future<Output = R>,
        R: Send,
    {
        self.run_in(move || -> Result<R> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("building a tokio runtime")?;
            Ok(rt.block_on(f()))
        })?
    }

    /// `ip addr`, `ip route` and the logs of every process started here
    /// (never panics; for failure reports).
    pub fn dump(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "=== namespace {} ===", self.name);
        for args in [["addr", "show"], ["route", "show"]] {
            let out = Command::new("ip")
                .args(["-n", self.name.as_str()])
                .args(args)
                .stdin(Stdio::null())
                .output();
            let _ = writeln!(s, "--- ip {} ---", args.join(" "));
            match out {
                Ok(out) => s.push_str(&output_text(&out)),
                Err(e) => {
                    let _ = writeln!(s, "(ip failed: {e})");
                }
            }
        }
        let procs = self.procs.lock().unwrap_or_else(PoisonError::into_inner);
        for p in procs.iter() {
            let state = match p.try_wait() {
                None => "running".to_string(),
                Some(st) => st.to_string(),
            };
            let log = p.log_text();
            let tail_from = log.len().saturating_sub(16 * 1024);
            let tail_from = (tail_from..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            let _ = writeln!(
                s,
                "--- process {} (pid {}, {state}), log {} ---\n{}",
                p.label,
                p.pid,
                p.log.display(),
                &log[tail_from..]
            );
        }
        s
    }

    /// Kills every process started here (and anything else still inside),
    /// then deletes the namespace. Idempotent; also done on drop.
    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        let procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(PoisonError::into_inner));
        for p in &procs {
            p.kill();
        }
        // Whatever is still inside our namespace was started by us (e.g. a
        // daemon that left its process group): kill it too, or the namespace
        // would outlive its name.
        let gone = wait_until(Duration::from_secs(5), || {
            let pids = netns_pids(&self.name);
            for pid in &pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(*pid), Signal::SIGKILL);
            }
            pids.is_empty()
        });
        if !gone {
            eprintln!(
                "netns harness: processes still inside {} after SIGKILL",
                self.name
            );
        }
        let deleted = wait_until(Duration::from_secs(5), || {
            run_host(&["ip", "netns", "del", &self.name]).is_ok() || !self.path().exists()
        });
        let etc = self.etc_dir();
        if etc.exists() && std::fs::remove_dir_all(&etc).is_err() {
            eprintln!("netns harness: could not remove {}", etc.display());
        }
        if !deleted {
            eprintln!("netns harness: could not delete namespace {}", self.name);
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// One cluster's namespaces.
struct ClusterNs {
    gateway: Netns,
    apps: Vec<Netns>,
}

/// The multi-cluster lab of SPEC §9:
///
/// - a WAN namespace with bridge `br0` at `198.51.100.1/24` (the
///   coordinator's address, [`COORDINATOR_IP`]);
/// - per cluster `i` (1-based): a gateway namespace, `wan0` at
///   `198.51.100.(10+i)/24` on the WAN bridge, LAN bridge `lan0` at
///   `10.i.0.1/16`, IP forwarding on;
/// - per app `k` (1-based) of cluster `i`: an app-host namespace, `eth0` at
///   `10.i.0.(10+k)/16` on the LAN bridge, default route via `10.i.0.1`.
///
/// Drop kills every process and deletes every namespace; when the thread is
/// panicking it first prints [`Topology::dump`] to stderr.
pub struct Topology {
    id: String,
    clusters: Vec<ClusterNs>,
    hosts: Vec<(String, Netns)>,
    wan: Option<Netns>,
    dir: tempfile::TempDir,
}

impl Topology {
    /// Builds `n_clusters` clusters with `apps_per_cluster` app hosts each.
    pub fn new(n_clusters: usize, apps_per_cluster: usize) -> Result<Topology> {
        require_root()?;
        ensure!(
            n_clusters <= MAX_CLUSTERS && apps_per_cluster <= MAX_CLUSTERS,
            "at most {MAX_CLUSTERS} clusters and {MAX_CLUSTERS} apps per cluster"
        );
        let id = new_run_id();
        let dir = tempfile::Builder::new()
            .prefix(&format!("skymesh-topo-{id}-"))
            .tempdir()
            .context("creating the topology's temp dir")?;
        // Build into `topo` at once so a failure half-way tears down what
        // was already made.
        let mut topo = Topology {
            clusters: Vec::with_capacity(n_clusters),
            hosts: Vec::new(),
            wan: None,
            dir,
            id,
        };
        let wan = Netns::create(&topo.ns_name("wan"))?;
        topo.wan = Some(wan);
        let wan = topo.wan();
        wan.ip(&["link", "add", "br0", "type", "bridge"])?;
        wan.ip(&["addr", "add", &format!("{COORDINATOR_IP}/24"), "dev", "br0"])?;
        wan.ip(&["link", "set", "br0", "up"])?;

        for i in 1..=n_clusters {
            let gateway = Netns::create(&topo.ns_name(&format!("gw{i}")))?;
            topo.clusters.push(ClusterNs {
                gateway,
                apps: Vec::with_capacity(apps_per_cluster),
            });
            let wan_port = format!("gw{i}");
            topo.plug_into_wan(topo.gateway(i), &wan_port, topo.gateway_wan_ip(i))?;
            let gw = topo.gateway(i);
            gw.ip(&["link", "add", "lan0", "type", "bridge"])?;
            gw.ip(&[
                "addr",
                "add",
                &format!("{}/16", topo.gateway_lan_ip(i)),
                "dev",
                "lan0",
            ])?;
            gw.ip(&["link", "set", "lan0", "up"])?;
            gw.run(&["sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"])?;
            for k in 1..=apps_per_cluster {
                let app = Netns::create(&topo.ns_name(&format!("c{i}a{k}")))?;
                topo.clusters[i - 1].apps.push(app);
                let app = topo.app(i, k);
                let gw = topo.gateway(i);
                let port = format!("app{k}");
                app.ip(&[
                    "link",
                    "add",
                    "eth0",
                    "type",
                    "veth",
                    "peer",
                    "name",
                    &port,
                    "netns",
                    gw.name(),
                ])?;
                gw.ip(&["link", "set", &port, "master", "lan0", "up"])?;
                app.ip(&[
                    "addr",
                    "add",
                    &format!("{}/16", topo.app_ip(i, k)),
                    "dev",
                    "eth0",
                ])?;
                app.ip(&["link", "set", "eth0", "up"])?;
                app.ip(&[
                    "route",
                    "add",
                    "default",
                    "via",
                    &topo.gateway_lan_ip(i).to_string(),
                ])?;
            }
        }
        Ok(topo)
    }

    /// Connects `ns` to the WAN bridge: `wan0` in `ns` at `ip/24`, its peer
    /// `port` in the WAN namespace enslaved to `br0`.
    fn plug_into_wan(&self, ns: &Netns, port: &str, ip: Ipv4Addr) -> Result<()> {
        let wan = self.wan();
        ns.ip(&[
            "link",
            "add",
            "wan0",
            "type",
            "veth",
            "peer",
            "name",
            port,
            "netns",
            wan.name(),
        ])?;
        wan.ip(&["link", "set", port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "wan0"])?;
        ns.ip(&["link", "set", "wan0", "up"])?;
        Ok(())
    }

    fn ns_name(&self, role: &str) -> String {
        format!("sk{}-{role}", self.id)
    }

    /// Adds an extra host namespace `sk<id>-<name>` on the WAN (e.g. a
    /// stock wireguard-go peer) with `wan0` at `ip/24`; `ip` must be in
    /// [`WAN_CIDR`] and not taken by the coordinator or a gateway.
    pub fn add_wan_host(&mut self, name: &str, ip: Ipv4Addr) -> Result<&Netns> {
        ensure!(
            !name.is_empty() && name.len() <= 16 && name.chars().all(|c| c.is_ascii_alphanumeric()),
            "WAN host name {name:?}: 1-16 letters or digits"
        );
        ensure!(
            !self.hosts.iter().any(|(n, _)| n == name),
            "WAN host {name} already exists"
        );
        let o = ip.octets();
        ensure!(
            o[..3] == [198, 51, 100] && (2..=254).contains(&o[3]),
            "{ip} is not a host address in {WAN_CIDR} other than the coordinator's"
        );
        ensure!(
            !(1..=self.clusters.len()).any(|i| self.gateway_wan_ip(i) == ip)
                && !self.hosts.iter().any(|(_, ns)| {
                    ns.ip(&["-4", "-o", "addr", "show", "dev", "wan0"])
                        .is_ok_and(|a| a.contains(&format!(" {ip}/")))
                }),
            "{ip} is already used on the WAN"
        );
        let ns = Netns::create(&self.ns_name(name))?;
        let port = format!("h{}", self.hosts.len() + 1);
        self.hosts.push((name.to_string(), ns));
        let (_, ns) = self.hosts.last().expect("a host was pushed just above");
        self.plug_into_wan(ns, &port, ip)?;
        Ok(ns)
    }

    /// The WAN host added as `name` by [`Topology::add_wan_host`].
    ///
    /// # Panics
    /// If there is no such host.
    pub fn wan_host(&self, name: &str) -> &Netns {
        self.hosts
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, ns)| ns)
            .unwrap_or_else(|| panic!("no WAN host {name:?} in this topology"))
    }

    /// This run's id (9 hex digits); every name of the run contains it.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Number of clusters.
    pub fn n_clusters(&self) -> usize {
        self.clusters.len()
    }

    /// App hosts in cluster `i`.
    pub fn n_apps(&self, i: usize) -> usize {
        self.cluster(i).apps.len()
    }

    /// The WAN namespace (the coordinator runs here, on [`COORDINATOR_IP`]).
    pub fn wan(&self) -> &Netns {
        self.wan
            .as_ref()
            .expect("the WAN namespace is made first and lives as long as the topology")
    }

    fn cluster(&self, i: usize) -> &ClusterNs {
        assert!(
            (1..=self.clusters.len()).contains(&i),
            "cluster {i} out of range 1..={}",
            self.clusters.len()
        );
        &self.clusters[i - 1]
    }

    /// Cluster `i`'s gateway namespace (1-based).
    pub fn gateway(&self, i: usize) -> &Netns {
        &self.cluster(i).gateway
    }

    /// App host `k` of cluster `i` (both 1-based).
    pub fn app(&self, i: usize, k: usize) -> &Netns {
        let c = self.cluster(i);
        assert!(
            (1..=c.apps.len()).contains(&k),
            "app {k} out of range 1..={} in cluster {i}",
            c.apps.len()
        );
        &c.apps[k - 1]
    }

    /// The coordinator's address and port: `198.51.100.1:7400`.
    pub fn coordinator_addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(COORDINATOR_IP, COORDINATOR_PORT))
    }

    /// `https://198.51.100.1:7400`.
    pub fn coordinator_url(&self) -> String {
        format!("https://{}", self.coordinator_addr())
    }

    /// Gateway `i`'s WAN address: `198.51.100.(10+i)`.
    pub fn gateway_wan_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 51, 100, octet(10 + i))
    }

    /// Gateway `i`'s LAN address: `10.i.0.1`.
    pub fn gateway_lan_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, octet(i), 0, 1)
    }

    /// App `k` of cluster `i`: `10.i.0.(10+k)`.
    pub fn app_ip(&self, i: usize, k: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, octet(i), 0, octet(10 + k))
    }

    /// Cluster `i`'s workload CIDR: `10.i.0.0/16`.
    pub fn workload_cidr(&self, i: usize) -> String {
        format!("10.{}.0.0/16", octet(i))
    }

    /// Cluster `i`'s name: `c<i>`.
    pub fn cluster_name(&self, i: usize) -> String {
        format!("c{i}")
    }

    /// A TUN interface name for cluster `i`'s meshd, unique to this run:
    /// `sk<id><i>` (at most 15 characters).
    pub fn iface(&self, i: usize) -> String {
        self.iface_named(&i.to_string())
    }

    /// A TUN interface name unique to this run, `sk<id><suffix>`, for other
    /// WireGuard devices (e.g. a wireguard-go peer on a WAN host).
    ///
    /// # Panics
    /// If the name would exceed 15 characters (suffix longer than 4).
    pub fn iface_named(&self, suffix: &str) -> String {
        let name = format!("sk{}{suffix}", self.id);
        assert!(
            name.len() <= 15 && suffix.chars().all(|c| c.is_ascii_alphanumeric()),
            "interface name {name:?} must be at most 15 letters or digits"
        );
        name
    }

    /// The topology's temporary directory (state dirs, logs); removed on
    /// drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A subdirectory of [`Topology::dir`], created if missing (e.g.
    /// `topo.subdir("c1")` for cluster 1's meshd state).
    pub fn subdir(&self, name: &str) -> Result<PathBuf> {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(p)
    }

    fn all_ns(&self) -> impl Iterator<Item = &Netns> {
        self.wan.iter().chain(
            self.clusters
                .iter()
                .flat_map(|c| std::iter::once(&c.gateway).chain(c.apps.iter()))
                .chain(self.hosts.iter().map(|(_, ns)| ns)),
        )
    }

    /// Names of every namespace of this topology.
    pub fn namespaces(&self) -> Vec<String> {
        self.all_ns().map(|ns| ns.name().to_string()).collect()
    }

    /// `ip addr`, `ip route` and process logs of every namespace.
    pub fn dump(&self) -> String {
        let mut s = format!(
            "##### topology {} (dir {}) #####\n",
            self.id,
            self.dir.path().display()
        );
        for ns in self.all_ns() {
            s.push_str(&ns.dump());
        }
        s
    }
}

/// `n` as an address octet; indices are bounded by [`MAX_CLUSTERS`].
fn octet(n: usize) -> u8 {
    u8::try_from(n).unwrap_or_else(|_| panic!("{n} does not fit in an address octet"))
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.dump());
        }
        // Apps first, then gateways and WAN hosts, the WAN last.
        for c in &mut self.clusters {
            for app in &mut c.apps {
                app.teardown();
            }
            c.gateway.teardown();
        }
        for (_, ns) in &mut self.hosts {
            ns.teardown();
        }
        if let Some(wan) = &mut self.wan {
            wan.teardown();
        }
        // A SIGKILLed meshd or wireguard-go leaves its API socket behind;
        // names starting with `sk<id>` are this run's alone.
        let prefix = format!("sk{}", self.id);
        if let Ok(entries) = std::fs::read_dir(WG_SOCK_DIR) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name.ends_with(".sock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}
