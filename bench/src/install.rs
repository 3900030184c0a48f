//! The peers and tools the benchmarks run: installed when missing (Debian
//! packages with apt-get, `boringtun-cli` with `cargo install --locked`,
//! never vendored), and their exact versions for the report.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

/// `(program, Debian package)`. dnsmasq comes from `dnsmasq-base`: the same
/// binary as the `dnsmasq` package without its system service, which would
/// start a resolver on the machine's own port 53.
const DEBIAN: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("wireguard-go", "wireguard-go"),
    ("wg", "wireguard-tools"),
    ("dnsperf", "dnsperf"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("ping", "iputils-ping"),
    ("nc", "netcat-openbsd"),
    ("ss", "iproute2"),
];

/// Where a program is on `PATH` (or in `~/.cargo/bin`, `/usr/sbin`).
pub fn which(prog: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

fn apt_get(args: &[&str]) -> Result<()> {
    eprintln!("+ apt-get {}", args.join(" "));
    let st = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .status()
        .context("failed to run apt-get (is this a Debian machine?)")?;
    if !st.success() {
        bail!("apt-get {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Installs whatever is missing; fails with a message naming what could not
/// be installed.
pub fn ensure_peers() -> Result<()> {
    let mut missing: Vec<&str> = DEBIAN
        .iter()
        .filter(|(prog, _)| which(prog).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if !missing.is_empty() {
        eprintln!("installing missing Debian packages: {}", missing.join(" "));
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        if apt_get(&args).is_err() {
            apt_get(&["update"]).context("apt-get update failed")?;
            apt_get(&args).with_context(|| {
                format!(
                    "could not install the benchmark peers {}",
                    missing.join(" ")
                )
            })?;
        }
        for (prog, pkg) in DEBIAN {
            if which(prog).is_none() {
                bail!("{prog} is still missing after installing {pkg}");
            }
        }
    }
    if which("boringtun-cli").is_none() {
        eprintln!(
            "installing boringtun-cli with `cargo install boringtun-cli --locked` \
             (takes a few minutes on 2 cores; cargo's progress follows)"
        );
        let st = Command::new("cargo")
            .args(["install", "boringtun-cli", "--locked"])
            .stdin(Stdio::null())
            .status()
            .context("failed to run cargo install")?;
        if !st.success() {
            bail!("`cargo install boringtun-cli --locked` failed ({st})");
        }
        if which("boringtun-cli").is_none() {
            bail!("boringtun-cli was installed but is not on PATH nor in ~/.cargo/bin");
        }
    }
    Ok(())
}

/// The first line of `prog ARGS` (stdout, else stderr) that matches `pick`.
fn version_of(prog: &str, args: &[&str], pick: impl Fn(&str) -> bool) -> String {
    let Some(path) = which(prog) else {
        return "not installed".into();
    };
    let Ok(out) = Command::new(path).args(args).stdin(Stdio::null()).output() else {
        return "unknown".into();
    };
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(str::trim)
        .find(|l| pick(l))
        .unwrap_or("unknown")
        .to_string()
}

fn deb_version(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", pkg])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

/// `(peer, version)` of every peer and load generator.
pub fn versions() -> Vec<(String, String)> {
    let any = |l: &str| !l.is_empty();
    let mut v = vec![
        (
            "wireguard-go".to_string(),
            format!(
                "{} (Debian {})",
                version_of("wireguard-go", &["--version"], any),
                deb_version("wireguard-go")
            ),
        ),
        (
            "boringtun-cli".to_string(),
            format!(
                "{} (crates.io, `cargo install --locked`, default options: 4 threads)",
                version_of("boringtun-cli", &["--version"], any)
            ),
        ),
        (
            "wireguard-tools (wg)".to_string(),
            version_of("wg", &["--version"], any),
        ),
        (
            "iperf3".to_string(),
            version_of("iperf3", &["--version"], |l| l.starts_with("iperf")),
        ),
        (
            "dnsperf".to_string(),
            format!("Debian {}", deb_version("dnsperf")),
        ),
        (
            "dnsmasq".to_string(),
            version_of("dnsmasq", &["--version"], |l| l.starts_with("Dnsmasq")),
        ),
        (
            "ping".to_string(),
            format!("iputils-ping {}", deb_version("iputils-ping")),
        ),
    ];
    for (_, s) in &mut v {
        if s.len() > 120 {
            s.truncate(120);
        }
    }
    v
}

/// `(key, value)` describing the machine and the checkout.
pub fn machine(repo: &std::path::Path) -> Vec<(String, String)> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            let kb: f64 = m.lines().next()?.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", kb / 1024.0 / 1024.0))
        })
        .unwrap_or_else(|| "unknown".into());
    let cmd = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .current_dir(repo)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into())
    };
    let commit = cmd(&["git", "rev-parse", "--short=12", "HEAD"]);
    let dirty = cmd(&["git", "status", "--porcelain", "--untracked-files=no"]);
    let commit = if dirty.is_empty() || dirty == "unknown" {
        commit
    } else {
        format!("{commit} (with uncommitted changes)")
    };
    vec![
        ("CPU".into(), cpu),
        ("cores".into(), cores.to_string()),
        ("memory".into(), mem),
        ("kernel".into(), kernel),
        ("date".into(), cmd(&["date", "-u", "+%Y-%m-%d %H:%M UTC"])),
        ("git commit".into(), commit),
        ("rustc".into(), cmd(&["rustc", "--version"])),
    ]
}
