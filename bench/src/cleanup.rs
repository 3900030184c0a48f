//! Teardown on Ctrl-C / SIGTERM. Normal ends, errors and panics are covered
//! by the harness's `Drop` impls (every lab lives in harness namespaces that
//! are deleted when dropped); a signal would skip those, so every topology
//! is registered here and a dedicated thread, woken by `sigwait`, kills
//! what runs inside this run's namespaces, deletes them and exits.

use std::process::{Command, Stdio};
use std::sync::Mutex;

use nix::sys::signal::{SigSet, Signal};
use skymesh_tests::netns::Topology;

/// Namespaces and run ids of every topology this process made.
static REGISTRY: Mutex<Vec<(String, Vec<String>, std::path::PathBuf)>> = Mutex::new(Vec::new());

/// Remembers `topo`'s namespaces for a signal-time teardown.
pub fn register(topo: &Topology) {
    let mut r = REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    r.push((
        topo.id().to_string(),
        topo.namespaces(),
        topo.dir().to_path_buf(),
    ));
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and every thread it
/// starts later) and starts the thread that handles them. Call first thing
/// in `main`, before any other thread exists. Child processes start with
/// an empty signal mask (the standard library resets it).
pub fn install() -> anyhow::Result<()> {
    let mut set = SigSet::empty();
    for s in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        set.add(s);
    }
    set.thread_block()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let sig = set.wait().unwrap_or(Signal::SIGTERM);
            eprintln!("\nskymesh-bench: {sig}, tearing down the benchmark namespaces");
            teardown();
            std::process::exit(130);
        })?;
    Ok(())
}

fn teardown() {
    let r = REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for (id, names, dir) in r.iter() {
        for ns in names {
            if !std::path::Path::new("/run/netns").join(ns).exists() {
                continue;
            }
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>()
                        && pid > 1
                        && pid != std::process::id() as i32
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
        let prefix = format!("sk{id}");
        if let Ok(entries) = std::fs::read_dir("/var/run/wireguard") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&prefix) && name.ends_with(".sock") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
