//! Harness for skymesh's end-to-end tests: starts the real `coordinator`
//! binary (and runs `skyctl`) the way a user would, each in its own temporary
//! data directory, and always cleans up (processes are killed on drop, also
//! when a test panics).
//!
//! The binaries come from the same target directory as the test executable;
//! build them first with `cargo build --workspace` (the README's test command
//! does).
//!
//! # Layout
//! - [`bin_path`]: where the workspace's binaries are.
//! - [`Coordinator`]: a running coordinator with its data dir, URL and token.
//! - [`skyctl`]: run the skyctl binary against a coordinator.
//! - [`etcd`]: a real multi-member etcd cluster on loopback, and
//!   coordinators sharing it.
//! - [`netns`]: network-namespace clusters (SPEC §9) for the end-to-end
//!   tests of meshd; needs root.
//! - [`replica`]: a service replica (TCP and UDP) for those tests.
//! - [`http`]: GET `/metrics` and `/healthz`; `promtool check metrics`.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod etcd;
pub mod http;
pub mod mesh;
pub mod netns;
pub mod replica;

/// Path of a workspace binary (`coordinator`, `skyctl`, `meshd`) next to the
/// running test executable.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    // target/debug/deps/<test> -> target/debug/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executables live in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace`",
        path.display()
    );
    path
}

/// A coordinator process with its own data directory.
pub struct Coordinator {
    child: Option<Child>,
    data: tempfile::TempDir,
    args: Vec<String>,
    addr: String,
}

impl Coordinator {
    /// Starts a coordinator on a free loopback port with default CIDRs.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// Starts a coordinator listening on `listen` (e.g. the address another
    /// one just left) with extra arguments.
    pub fn start_at(listen: &str, extra: &[&str]) -> Result<Self> {
        Self::launch(Some(listen.to_string()), extra)
    }

    /// Starts a coordinator with extra arguments (e.g. `--service-cidr`).
    pub fn start_with(extra: &[&str]) -> Result<Self> {
        Self::launch(None, extra)
    }

    fn launch(listen: Option<String>, extra: &[&str]) -> Result<Self> {
        let data = tempfile::Builder::new()
            .prefix("skymesh-coord-")
            .tempdir()?;
        let mut c = Coordinator {
            child: None,
            data,
            args: extra.iter().map(|s| s.to_string()).collect(),
            addr: String::new(),
        };
        c.spawn(listen)?;
        Ok(c)
    }

    /// The `127.0.0.1:PORT` it listens on.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn spawn(&mut self, listen: Option<String>) -> Result<()> {
        let addr_file = self.data.path().join("listen.addr");
        let _ = std::fs::remove_file(&addr_file);
        let listen = listen.unwrap_or_else(|| "127.0.0.1:0".to_string());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.path().join("coordinator.log"))?;
        let child = Command::new(bin_path("coordinator"))
            .arg("--listen")
            .arg(&listen)
            .arg("--data-dir")
            .arg(self.data.path())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("failed to start coordinator")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && !a.trim().is_empty()
            {
                self.addr = a.trim().to_string();
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("coordinator exited with {status}; log:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "coordinator did not start within 20 s; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where `--metrics-listen` ended up (`<data-dir>/metrics.addr`).
    pub fn metrics_addr(&self) -> Result<std::net::SocketAddr> {
        let f = self.data.path().join("metrics.addr");
        std::fs::read_to_string(&f)
            .with_context(|| format!("reading {}", f.display()))?
            .trim()
            .parse()
            .context("metrics.addr holds no address")
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate the coordinator wrote (`<data-dir>/ca.crt`).
    pub fn ca_file(&self) -> PathBuf {
        self.data.path().join(skymesh_proto::tls::CA_FILE)
    }

    /// TLS that trusts this coordinator's CA, as skyctl on its host does.
    pub fn tls(&self) -> Result<skymesh_proto::tls::ClientTls> {
        let trust =
            skymesh_proto::tls::Trust::from_ca_file(&self.ca_file()).map_err(anyhow::Error::msg)?;
        Ok(skymesh_proto::tls::ClientTls::new(Some(trust)))
    }

    /// The admin token the coordinator wrote on first start.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.data.path().join("admin.token"))
            .expect("the coordinator writes admin.token before it listens")
            .trim()
            .to_string()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// Everything the coordinator logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.path().join("coordinator.log")).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `grace` for the process to exit (then
    /// SIGKILLs it). Returns its exit status (`None` if it had to be killed
    /// or was not running) and how long it took to exit.
    pub fn terminate(&mut self, grace: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let Some(mut c) = self.child.take() else {
            return (None, Duration::ZERO);
        };
        let t0 = Instant::now();
        if let Ok(pid) = i32::try_from(c.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return (Some(st), t0.elapsed());
            }
            if t0.elapsed() > grace {
                let _ = c.kill();
                let _ = c.wait();
                return (None, t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGKILL and waits for the process to end.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the coordinator again on the same address and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.kill9();
        let addr = self.addr.clone();
        // The port was just released; retry briefly if it is still in TIME_WAIT.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.spawn(Some(addr.clone())) {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Runs `skyctl` against this coordinator with its admin token.
    pub fn skyctl(&self, args: &[&str]) -> Output {
        skyctl(&self.url(), &self.token(), &self.ca_file(), args)
    }

    /// A gRPC client of the object API, authenticated as admin.
    pub async fn api(&self) -> Result<ApiClient> {
        self.api_with_token(Some(&self.token())).await
    }
}

impl Coordinator {
    /// Starts a long-running skyctl (e.g. `get ns --watch`) against this
    /// coordinator; it is killed when the handle is dropped.
    pub fn skyctl_spawn(&self, args: &[&str]) -> Running {
        let child = Command::new(bin_path("skyctl"))
            .args(args)
            .env("SKYCTL_COORDINATOR", self.url())
            .env("SKYCTL_TOKEN", self.token())
            .env("SKYCTL_CA", self.ca_file())
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("skyctl runs");
        Running(child)
    }

    /// A gRPC client of the object API with an arbitrary bearer token
    /// (`None`: no token at all).
    pub async fn api_with_token(&self, token: Option<&str>) -> Result<ApiClient> {
        let channel = self
            .tls()?
            .endpoint(&self.url())
            .map_err(anyhow::Error::msg)?
            .connect()
            .await?;
        Ok(skymesh_proto::v1::api_client::ApiClient::with_interceptor(
            channel,
            Bearer::new(token)?,
        ))
    }

    /// A gRPC client of the gateway API presenting `token` (a join token or
    /// a cluster credential).
    pub async fn gateway(&self, token: &str) -> Result<GatewayClient> {
        let channel = self
            .tls()?
            .endpoint(&self.url())
            .map_err(anyhow::Error::msg)?
            .connect()
            .await?;
        Ok(
            skymesh_proto::v1::gateway_client::GatewayClient::with_interceptor(
                channel,
                Bearer::new(Some(token))?,
            ),
        )
    }
}

/// An authenticated gateway-API client.
pub type GatewayClient = skymesh_proto::v1::gateway_client::GatewayClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

pub use skymesh_proto::Bearer;

/// An authenticated object-API client.
pub type ApiClient = skymesh_proto::v1::api_client::ApiClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

impl Drop for Coordinator {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A process that is killed (and reaped) when dropped.
pub struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the `skyctl` binary with a coordinator URL, token and CA file.
pub fn skyctl(url: &str, token: &str, ca: &Path, args: &[&str]) -> Output {
    Command::new(bin_path("skyctl"))
        .args(args)
        .env("SKYCTL_COORDINATOR", url)
        .env("SKYCTL_TOKEN", token)
        .env("SKYCTL_CA", ca)
        .env_remove("RUST_LOG")
        .output()
        .expect("skyctl runs")
}
