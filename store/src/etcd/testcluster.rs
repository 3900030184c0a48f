//! A real etcd cluster on loopback for tests: `n` members of the `etcd`
//! binary (Debian: `etcd-server`), each with its own client and peer port
//! on 127.0.0.1 and its own data directory (on `/dev/shm` when there is one,
//! so fsyncs are cheap), killed when the [`EtcdCluster`] is dropped (also
//! when a test panics).
//!
//! A missing `etcd` binary is an error with an install hint, never a skip.
//! `SKYMESH_ETCD_BIN` overrides the binary.

use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a cluster (or a restarted member) may take to become healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The `etcd` binary: `$SKYMESH_ETCD_BIN`, else `etcd` on `PATH`.
pub fn etcd_binary() -> io::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SKYMESH_ETCD_BIN") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(io::Error::other(format!(
                "SKYMESH_ETCD_BIN={} is not a file",
                p.display()
            )))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            io::Error::other(
                "the etcd binary was not found on PATH: install it with \
                 `apt-get install etcd-server etcd-client` (Debian; .ci/run does) \
                 or point SKYMESH_ETCD_BIN at it",
            )
        })
}

/// Certificates for a cluster that speaks only TLS, clients and peers alike,
/// and requires client certificates (`--client-cert-auth`).
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The CA that signed the members' and the clients' certificates.
    pub ca: PathBuf,
    /// The members' certificate (server and client auth, for 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    /// A plaintext port serving only `/health` and `/metrics` (TLS clusters).
    metrics: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn scheme(&self) -> &'static str {
        if self.metrics.is_some() {
            "https"
        } else {
            "http"
        }
    }
    fn client_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.client)
    }
    fn peer_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.peer)
    }
    /// The port `/health` answers on in plain HTTP.
    fn health_port(&self) -> u16 {
        self.metrics.unwrap_or(self.client)
    }
    fn log_path(&self) -> PathBuf {
        self.dir.with_extension("log")
    }
}

/// A running etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
    binary: PathBuf,
    initial_cluster: String,
    token: String,
    tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts an `n`-member cluster and waits until every member is healthy.
    pub fn start(n: usize) -> io::Result<Self> {
        Self::start_inner(n, None)
    }

    /// Starts an `n`-member cluster that speaks only TLS (client and peer
    /// URLs are `https://`) and requires client certificates signed by
    /// `tls.ca`.
    pub fn start_tls(n: usize, tls: TlsFiles) -> io::Result<Self> {
        Self::start_inner(n, Some(tls))
    }

    fn start_inner(n: usize, tls: Option<TlsFiles>) -> io::Result<Self> {
        let binary = etcd_binary()?;
        let mut last = None;
        // A port picked as free may be taken before etcd binds it: retry
        // with fresh ports.
        for _ in 0..3 {
            match Self::try_start(&binary, n, tls.clone()) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("etcd cluster did not start")))
    }

    fn try_start(binary: &Path, n: usize, tls: Option<TlsFiles>) -> io::Result<Self> {
        let base = Path::new("/dev/shm");
        let builder = {
            let mut b = tempfile::Builder::new();
            b.prefix("skymesh-etcd-");
            b
        };
        let dir = if base.is_dir() {
            builder.tempdir_in(base).or_else(|_| builder.tempdir())?
        } else {
            builder.tempdir()?
        };
        let ports = free_ports(3 * n)?;
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: ports[3 * i],
                peer: ports[3 * i + 1],
                metrics: tls.as_ref().map(|_| ports[3 * i + 2]),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "skymesh-test-{}-{}",
            std::process::id(),
            dir.path()
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let mut cluster = EtcdCluster {
            members,
            binary: binary.to_owned(),
            initial_cluster,
            token,
            tls,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        cluster.wait_healthy(START_TIMEOUT)?;
        Ok(cluster)
    }

    fn spawn(&mut self, i: usize) -> io::Result<()> {
        let m = &self.members[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.log_path())?;
        let mut cmd = Command::new(&self.binary);
        if let (Some(t), Some(metrics)) = (&self.tls, m.metrics) {
            cmd.arg("--cert-file")
                .arg(&t.cert)
                .arg("--key-file")
                .arg(&t.key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth")
                .arg("--peer-cert-file")
                .arg(&t.cert)
                .arg("--peer-key-file")
                .arg(&t.key)
                .arg("--peer-trusted-ca-file")
                .arg(&t.ca)
                .arg("--peer-client-cert-auth")
                .arg("--listen-metrics-urls")
                .arg(format!("http://127.0.0.1:{metrics}"));
        }
        let child = cmd
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&m.dir)
            .arg("--listen-client-urls")
            .arg(m.client_url())
            .arg("--advertise-client-urls")
            .arg(m.client_url())
            .arg("--listen-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-advertise-peer-urls")
            .arg(m.peer_url())
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg(&self.token)
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .env_remove("ETCDCTL_API")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| {
                io::Error::other(format!("failed to start {}: {e}", self.binary.display()))
            })?;
        self.members[i].child = Some(child);
        Ok(())
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether the cluster has no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Client URLs of every member (`http://127.0.0.1:PORT`), killed or not.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(Member::client_url).collect()
    }

    /// The endpoints as one comma-separated flag value.
    pub fn endpoints_arg(&self) -> String {
        self.endpoints().join(",")
    }

    /// Client URL of member `i`.
    pub fn endpoint(&self, i: usize) -> String {
        self.members[i].client_url()
    }

    /// Whether member `i` is running.
    pub fn is_running(&mut self, i: usize) -> bool {
        self.members[i]
            .child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs member `i` and waits for it to end.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data directory and waits until the
    /// whole cluster is healthy.
    pub fn restart(&mut self, i: usize) -> io::Result<()> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_healthy(START_TIMEOUT)
    }

    /// Everything member `i` logged.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].log_path()).unwrap_or_default()
    }

    /// Waits until every running member reports itself healthy (it has a
    /// leader and serves requests).
    pub fn wait_healthy(&mut self, timeout: Duration) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut unhealthy = Vec::new();
            for i in 0..self.members.len() {
                let Some(child) = self.members[i].child.as_mut() else {
                    continue;
                };
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(io::Error::other(format!(
                        "etcd member {} exited with {status}; log:\n{}",
                        self.members[i].name,
                        tail(&self.log(i), 40)
                    )));
                }
                if !healthy(self.members[i].health_port()) {
                    unhealthy.push(i);
                }
            }
            if unhealthy.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let i = unhealthy[0];
                return Err(io::Error::other(format!(
                    "etcd member {} not healthy within {} s; log:\n{}",
                    self.members[i].name,
                    timeout.as_secs(),
                    tail(&self.log(i), 40)
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// `n` distinct ports that were free a moment ago.
fn free_ports(n: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

/// GET /health on a member's client port.
fn healthy(port: u16) -> bool {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
