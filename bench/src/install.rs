//! The peers and tools the benchmarks run: installed when missing (Debian
//! packages with apt-get; Debian trixie's wireguard-go fetched as a `.deb`
//! and unpacked beside the system one; `boringtun-cli` and `gotatun-cli`
//! with `cargo install --locked`; never vendored), and their exact versions
//! for the report.
//!
//! Must not: replace or upgrade a system package. The trixie suite is added
//! as an apt source pinned at priority 1, so apt never installs from it on
//! its own; the package is only downloaded and unpacked under
//! [`TRIXIE_ROOT`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::tunnel::Kind;

/// `(program, Debian package)`: the tools the sections need. dnsmasq comes
/// from `dnsmasq-base`: the same binary as the `dnsmasq` package without
/// its system service, which would start a resolver on the machine's own
/// port 53.
const TOOLS: &[(&str, &str)] = &[
    ("iperf3", "iperf3"),
    ("wg", "wireguard-tools"),
    ("dnsperf", "dnsperf"),
    ("dnsmasq", "dnsmasq-base"),
    ("dig", "bind9-dnsutils"),
    ("ping", "iputils-ping"),
    ("nc", "netcat-openbsd"),
    ("ss", "iproute2"),
];

/// The system's wireguard-go (Debian bookworm's package: 0.0.20220316),
/// named by path so that a newer build earlier on `PATH` is not taken for it.
pub const SYSTEM_WIREGUARD_GO: &str = "/usr/bin/wireguard-go";

/// Where Debian trixie's wireguard-go package is unpacked (`dpkg-deb -x`).
pub const TRIXIE_ROOT: &str = "/opt/skymesh-bench/wireguard-go-trixie";

/// Where the trixie `.deb` is kept: its control file gives the version.
const DEB_CACHE: &str = "/opt/skymesh-bench/debs";

/// The apt source and pin this module adds for trixie.
const TRIXIE_SOURCES: &str = "/etc/apt/sources.list.d/skymesh-bench-trixie.sources";
const TRIXIE_PIN: &str = "/etc/apt/preferences.d/skymesh-bench-trixie";

/// `(program, crate)` of the peers built with `cargo install --locked`.
/// gotatun-cli's binary is called `gotatun`.
const CARGO_PEERS: &[(&str, &str)] = &[
    ("boringtun-cli", "boringtun-cli"),
    ("gotatun", "gotatun-cli"),
];

/// What to do about missing peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Install everything missing; fail if something cannot be installed.
    All,
    /// `--quick`: install the Debian packages and fetch the trixie `.deb`
    /// (downloads of seconds) but compile nothing: peers that would need
    /// `cargo install` are skipped (their columns say so).
    NoCompile,
    /// `--no-install`: install nothing; missing tools fail the run, missing
    /// peers are skipped.
    Nothing,
}

/// Where a program is on `PATH` (or in `~/.cargo/bin`, `/usr/sbin`); a
/// path with a `/` is taken as is.
pub fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    dirs.into_iter().map(|d| d.join(prog)).find(|p| p.is_file())
}

/// Debian trixie's wireguard-go, if unpacked.
pub fn wireguard_go_trixie() -> Option<PathBuf> {
    which(&format!("{TRIXIE_ROOT}/usr/bin/wireguard-go"))
}

fn apt_get(args: &[&str], dir: Option<&Path>) -> Result<()> {
    eprintln!("+ apt-get {}", args.join(" "));
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let st = cmd
        .status()
        .context("failed to run apt-get (is this a Debian machine?)")?;
    if !st.success() {
        bail!("apt-get {} failed ({st})", args.join(" "));
    }
    Ok(())
}

/// Installs whatever is missing, as `policy` allows; fails with a message
/// naming what could not be installed. Peers left missing are skipped by
/// the tunnel section, which says so in its table.
pub fn ensure_peers(policy: Policy) -> Result<()> {
    let mut debian: Vec<(&str, &str)> = TOOLS.to_vec();
    debian.push((SYSTEM_WIREGUARD_GO, "wireguard-go"));
    let mut missing: Vec<&str> = debian
        .iter()
        .filter(|(prog, _)| which(prog).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if policy == Policy::Nothing {
        let tools: Vec<&str> = TOOLS
            .iter()
            .filter(|(prog, _)| which(prog).is_none())
            .map(|(prog, _)| *prog)
            .collect();
        if !tools.is_empty() {
            bail!(
                "{} missing (run without --no-install to install)",
                tools.join(", ")
            );
        }
        return Ok(());
    }
    if !missing.is_empty() {
        eprintln!("installing missing Debian packages: {}", missing.join(" "));
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&missing);
        if apt_get(&args, None).is_err() {
            apt_get(&["update"], None).context("apt-get update failed")?;
            apt_get(&args, None).with_context(|| {
                format!(
                    "could not install the benchmark peers {}",
                    missing.join(" ")
                )
            })?;
        }
        for (prog, pkg) in &debian {
            if which(prog).is_none() {
                bail!("{prog} is still missing after installing {pkg}");
            }
        }
    }
    if wireguard_go_trixie().is_none() {
        match fetch_wireguard_go_trixie() {
            Ok(()) => {}
            Err(e) if policy == Policy::NoCompile => {
                eprintln!("skipping wireguard-go from Debian trixie (could not fetch it): {e:#}");
            }
            Err(e) => return Err(e.context("fetching wireguard-go from Debian trixie")),
        }
    }
    for (prog, krate) in CARGO_PEERS {
        if which(prog).is_some() {
            continue;
        }
        if policy == Policy::NoCompile {
            eprintln!(
                "skipping {krate}: not installed, and --quick does not compile peers \
                 (`cargo install {krate} --locked` or a full run installs it)"
            );
            continue;
        }
        cargo_install(prog, krate)?;
    }
    Ok(())
}

fn cargo_install(prog: &str, krate: &str) -> Result<()> {
    eprintln!(
        "installing {krate} with `cargo install {krate} --locked` \
         (takes minutes on 2 cores; cargo's progress follows)"
    );
    let st = Command::new("cargo")
        .args(["install", krate, "--locked"])
        .stdin(Stdio::null())
        .status()
        .context("failed to run cargo install")?;
    if !st.success() {
        bail!("`cargo install {krate} --locked` failed ({st})");
    }
    if which(prog).is_none() {
        bail!("{krate} was installed but {prog} is not on PATH nor in ~/.cargo/bin");
    }
    Ok(())
}

/// A Debian mirror and the keyring that signs it, as an apt source names them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirror {
    uri: String,
    signed_by: Option<String>,
}

/// The machine's main Debian mirror (not `debian-security`) from deb822
/// `.sources` files, else from one-line `sources.list` entries.
fn debian_mirror(deb822: &[String], one_line: &[String]) -> Option<Mirror> {
    let is_main = |uri: &str| uri.contains("debian") && !uri.contains("security");
    for file in deb822 {
        for stanza in file.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    (k.trim().eq_ignore_ascii_case(name)).then(|| v.trim().to_string())
                })
            };
            let types = field("Types").unwrap_or_default();
            if !types.split_whitespace().any(|t| t == "deb") {
                continue;
            }
            if field("Enabled").is_some_and(|e| e.eq_ignore_ascii_case("no")) {
                continue;
            }
            let uris = field("URIs").unwrap_or_default();
            if let Some(uri) = uris.split_whitespace().find(|u| is_main(u)) {
                return Some(Mirror {
                    uri: uri.to_string(),
                    signed_by: field("Signed-By"),
                });
            }
        }
    }
    for file in one_line {
        for line in file.lines().map(str::trim) {
            let Some(rest) = line.strip_prefix("deb ") else {
                continue;
            };
            let mut words = rest.split_whitespace().peekable();
            let mut signed_by = None;
            if words.peek().is_some_and(|w| w.starts_with('[')) {
                for w in words.by_ref() {
                    let opt = w.trim_matches(|c| c == '[' || c == ']');
                    if let Some(k) = opt.strip_prefix("signed-by=") {
                        signed_by = Some(k.to_string());
                    }
                    if w.ends_with(']') {
                        break;
                    }
                }
            }
            if let Some(uri) = words.next().filter(|u| is_main(u)) {
                return Some(Mirror {
                    uri: uri.to_string(),
                    signed_by,
                });
            }
        }
    }
    None
}

/// Files in `dir` whose names end with `ext`, read.
fn read_dir_files(dir: &str, ext: &str) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .filter(|p| !p.to_string_lossy().contains("skymesh-bench"))
        .collect();
    paths.sort();
    paths
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

/// The apt source stanza for trixie on `mirror`.
fn trixie_source(mirror: &Mirror) -> String {
    let mut s = format!(
        "# Added by skymesh-bench for wireguard-go from trixie (apt-get download only;\n\
         # pinned at priority 1 in {TRIXIE_PIN}, so nothing installs from it).\n\
         Types: deb\nURIs: {}\nSuites: trixie\nComponents: main\n",
        mirror.uri
    );
    if let Some(k) = &mirror.signed_by {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    s
}

const TRIXIE_PIN_TEXT: &str = "# Added by skymesh-bench: never install or upgrade from trixie on its own.\n\
     Package: *\nPin: release n=trixie\nPin-Priority: 1\n";

/// Writes `path` if its contents differ; says so.
fn write_if_changed(path: &str, text: &str) -> Result<()> {
    if std::fs::read_to_string(path).ok().as_deref() == Some(text) {
        return Ok(());
    }
    eprintln!("writing {path}");
    std::fs::write(path, text).with_context(|| format!("writing {path}"))
}

/// Debian trixie's wireguard-go (0.0.20231211, with TUN TSO/GRO, UDP
/// GSO/GRO and per-core crypto), fetched the Debian way: the trixie suite
/// of the machine's own mirror as a source pinned at priority 1, `apt-get
/// update`, `apt-get download wireguard-go/trixie` into [`DEB_CACHE`], and
/// `dpkg-deb -x` into [`TRIXIE_ROOT`], beside the system package.
fn fetch_wireguard_go_trixie() -> Result<()> {
    let mirror = debian_mirror(
        &read_dir_files("/etc/apt/sources.list.d", ".sources"),
        &[
            std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default(),
            read_dir_files("/etc/apt/sources.list.d", ".list").concat(),
        ],
    )
    .unwrap_or_else(|| Mirror {
        uri: "http://deb.debian.org/debian".into(),
        signed_by: None,
    });
    let mirror = Mirror {
        signed_by: mirror.signed_by.or_else(|| {
            let k = "/usr/share/keyrings/debian-archive-keyring.gpg";
            Path::new(k).is_file().then(|| k.to_string())
        }),
        ..mirror
    };
    eprintln!(
        "fetching wireguard-go from Debian trixie ({}), beside the system package",
        mirror.uri
    );
    write_if_changed(TRIXIE_PIN, TRIXIE_PIN_TEXT)?;
    write_if_changed(TRIXIE_SOURCES, &trixie_source(&mirror))?;
    apt_get(&["update"], None).context("apt-get update (with the trixie source) failed")?;
    std::fs::create_dir_all(DEB_CACHE).with_context(|| format!("creating {DEB_CACHE}"))?;
    let before = trixie_debs();
    apt_get(
        &["download", "wireguard-go/trixie"],
        Some(Path::new(DEB_CACHE)),
    )?;
    let deb = newest_deb().context("apt-get download left no wireguard-go_*.deb")?;
    for old in before.iter().filter(|d| **d != deb) {
        let _ = std::fs::remove_file(old);
    }
    let tmp = format!("{TRIXIE_ROOT}.partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {tmp}"))?;
    eprintln!("+ dpkg-deb -x {} {tmp}", deb.display());
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tmp)
        .status()
        .context("failed to run dpkg-deb")?;
    if !st.success() {
        bail!("dpkg-deb -x {} failed ({st})", deb.display());
    }
    let _ = std::fs::remove_dir_all(TRIXIE_ROOT);
    std::fs::rename(&tmp, TRIXIE_ROOT).with_context(|| format!("renaming {tmp}"))?;
    let bin = wireguard_go_trixie()
        .with_context(|| format!("{} has no usr/bin/wireguard-go", deb.display()))?;
    eprintln!(
        "wireguard-go {} unpacked: {}",
        deb_file_version(&deb),
        bin.display()
    );
    Ok(())
}

/// The wireguard-go `.deb`s in [`DEB_CACHE`].
fn trixie_debs() -> Vec<PathBuf> {
    std::fs::read_dir(DEB_CACHE)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name().is_some_and(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with("wireguard-go_") && n.ends_with(".deb")
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The most recently written wireguard-go `.deb` in [`DEB_CACHE`].
fn newest_deb() -> Option<PathBuf> {
    trixie_debs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// `dpkg-deb -f DEB Version`.
fn deb_file_version(deb: &Path) -> String {
    Command::new("dpkg-deb")
        .arg("-f")
        .arg(deb)
        .arg("Version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
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
    let trixie = match (wireguard_go_trixie(), newest_deb()) {
        (Some(bin), deb) => format!(
            "{} (Debian trixie's `.deb`, version from `dpkg-deb -f`; `apt-get download` from a \
             trixie source pinned at priority 1, unpacked with `dpkg-deb -x` into \
             {TRIXIE_ROOT}, beside the system package). Its `--version` prints {}: a known \
             upstream quirk (the version string was not bumped for the 0.0.20231211 tag)",
            deb.map_or_else(|| "?".into(), |d| deb_file_version(&d)),
            version_of(&bin.to_string_lossy(), &["--version"], any),
        ),
        (None, _) => "not installed: not measured".into(),
    };
    // A peer's version, or that it was not measured.
    let peer = |prog: &str, how: &str| match version_of(prog, &["--version"], any) {
        v if v == "not installed" => "not installed: not measured".to_string(),
        v => format!("{v} ({how})"),
    };
    let mut v = vec![
        (Kind::WireguardGo2023.label().to_string(), trixie),
        (
            Kind::WireguardGo2022.label().to_string(),
            format!(
                "{} (Debian {}, the system package)",
                version_of(SYSTEM_WIREGUARD_GO, &["--version"], any),
                deb_version("wireguard-go")
            ),
        ),
        (
            Kind::Boringtun.label().to_string(),
            peer(
                "boringtun-cli",
                "crates.io, `cargo install --locked`, default options: 4 threads",
            ),
        ),
        (
            Kind::Gotatun.label().to_string(),
            peer(
                "gotatun",
                "crates.io `gotatun-cli`, `cargo install --locked`, default features; \
                 binary `gotatun`",
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
        // A tool's banner can run on; cut it on a character boundary.
        if let Some((i, _)) = s.char_indices().nth(400) {
            s.truncate(i);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_from_deb822_skips_security() {
        let sources = "Types: deb\n# http://snapshot.debian.org/archive/debian-security/x\n\
            URIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n\
            Components: main\n\n\
            Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n\
            Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
        let m = debian_mirror(&[sources.to_string()], &[]).unwrap();
        assert_eq!(m.uri, "http://deb.debian.org/debian");
        assert_eq!(
            m.signed_by.as_deref(),
            Some("/usr/share/keyrings/debian-archive-keyring.gpg")
        );
        let src = trixie_source(&m);
        assert!(src.contains("Suites: trixie\n"), "{src}");
        assert!(
            src.contains("URIs: http://deb.debian.org/debian\n"),
            "{src}"
        );
    }

    #[test]
    fn mirror_from_one_line_sources() {
        let list = "# comment\ndeb-src http://x/debian bookworm main\n\
            deb [arch=amd64 signed-by=/k.gpg] http://ftp.de.debian.org/debian bookworm main\n";
        let m = debian_mirror(&[], &[list.to_string()]).unwrap();
        assert_eq!(m.uri, "http://ftp.de.debian.org/debian");
        assert_eq!(m.signed_by.as_deref(), Some("/k.gpg"));
        assert_eq!(
            debian_mirror(
                &[],
                &["deb http://security.debian.org/debian-security bookworm-security main".into()]
            ),
            None
        );
    }

    #[test]
    fn pin_never_upgrades() {
        assert!(TRIXIE_PIN_TEXT.contains("Pin: release n=trixie\nPin-Priority: 1\n"));
    }
}
