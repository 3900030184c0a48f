//! The deployment pieces in `deploy/`: the Kubernetes manifests parse and
//! carry what a gateway and a coordinator need, the systemd units pass
//! `systemd-analyze verify`, and the quickstart brings a three-cluster demo
//! up, answers from every cluster, and tears everything down again.
//!
//! The quickstart test needs root (it creates network namespaces) and the
//! workspace's binaries (`cargo build --workspace --bins`): it runs
//! `deploy/quickstart.sh` with `SKYMESH_BIN_DIR` pointing at the test's own
//! target directory and `SKYMESH_SKIP_BUILD=1`, so it never rebuilds in
//! release mode.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use skymesh_tests::bin_path;
use skymesh_tests::netns::require_root;
use yaml_serde::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

fn deploy_dir() -> PathBuf {
    repo().join("deploy")
}

// ------------------------------------------------------------------ YAML

/// `v[k1][k2]...`, or `Null` when any step is missing.
fn at<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    static NULL: Value = Value::Null;
    path.iter().fold(v, |v, k| v.get(*k).unwrap_or(&NULL))
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path).as_str()
}

fn seq_at<'a>(v: &'a Value, path: &[&str]) -> &'a [Value] {
    at(v, path).as_sequence().map_or(&[], Vec::as_slice)
}

/// Every document of every `*.yaml`/`*.yml` under `deploy/kubernetes`, with
/// its file name (empty documents, e.g. a comment header before `---`,
/// are skipped).
fn k8s_docs() -> Vec<(String, Value)> {
    let dir = deploy_dir().join("kubernetes");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no YAML in {}", dir.display());
    let mut docs = Vec::new();
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&f).unwrap();
        for (i, de) in yaml_serde::Deserializer::from_str(&text).enumerate() {
            let v: Value = serde::Deserialize::deserialize(de)
                .unwrap_or_else(|e| panic!("{name}: document {i} does not parse: {e}"));
            if !v.is_null() {
                docs.push((format!("{name}#{i}"), v));
            }
        }
    }
    docs
}

fn kind_of(v: &Value) -> &str {
    str_at(v, &["kind"]).unwrap_or("")
}

/// The pod template's containers of a workload.
fn containers(v: &Value) -> &[Value] {
    seq_at(v, &["spec", "template", "spec", "containers"])
}

#[test]
fn kubernetes_manifests_parse_and_carry_what_they_need() {
    let docs = k8s_docs();
    for (name, d) in &docs {
        for field in ["apiVersion", "kind"] {
            assert!(
                str_at(d, &[field]).is_some_and(|s| !s.is_empty()),
                "{name}: missing {field}"
            );
        }
        assert!(
            str_at(d, &["metadata", "name"]).is_some_and(|s| !s.is_empty()),
            "{name}: missing metadata.name"
        );
        if kind_of(d) != "Namespace" {
            assert!(
                str_at(d, &["metadata", "namespace"]).is_some(),
                "{name}: namespaced object without metadata.namespace"
            );
        }
        // Workloads: the selector picks the template's pods, and every
        // container has an image and runs with privilege escalation off.
        if matches!(kind_of(d), "Deployment" | "StatefulSet" | "DaemonSet") {
            let sel = at(d, &["spec", "selector", "matchLabels"])
                .as_mapping()
                .unwrap_or_else(|| panic!("{name}: no spec.selector.matchLabels"));
            let labels = at(d, &["spec", "template", "metadata", "labels"]);
            for (k, v) in sel {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "{name}: selector {k:?} does not match the pod template's labels"
                );
            }
            assert!(!containers(d).is_empty(), "{name}: no containers");
            for c in containers(d) {
                assert!(
                    str_at(c, &["image"]).is_some(),
                    "{name}: container without image"
                );
                assert_eq!(
                    at(c, &["securityContext", "allowPrivilegeEscalation"]).as_bool(),
                    Some(false),
                    "{name}: allowPrivilegeEscalation must be false"
                );
            }
        }
    }

    // The coordinator: a StatefulSet with a volume claim template mounted
    // as its data dir, behind a Service named by serviceName.
    let sts: Vec<_> = docs
        .iter()
        .filter(|(_, d)| kind_of(d) == "StatefulSet")
        .collect();
    assert_eq!(sts.len(), 1, "one coordinator StatefulSet");
    let (name, sts) = sts[0];
    let claims = seq_at(sts, &["spec", "volumeClaimTemplates"]);
    assert!(!claims.is_empty(), "{name}: no volumeClaimTemplates");
    let claim = str_at(&claims[0], &["metadata", "name"]).unwrap();
    assert!(
        str_at(&claims[0], &["spec", "resources", "requests", "storage"]).is_some(),
        "{name}: the claim template requests no storage"
    );
    let mounts = seq_at(&containers(sts)[0], &["volumeMounts"]);
    assert!(
        mounts
            .iter()
            .any(|m| str_at(m, &["name"]) == Some(claim) && str_at(m, &["mountPath"]).is_some()),
        "{name}: the claim template {claim} is not mounted"
    );
    assert_eq!(
        at(sts, &["spec", "replicas"]).as_u64(),
        Some(1),
        "{name}: one replica (embedded store)"
    );
    let svc_name = str_at(sts, &["spec", "serviceName"]).expect("StatefulSet serviceName");
    assert!(
        docs.iter()
            .any(|(_, d)| kind_of(d) == "Service"
                && str_at(d, &["metadata", "name"]) == Some(svc_name)),
        "{name}: no Service {svc_name} (its serviceName)"
    );
    let args = seq_at(&containers(sts)[0], &["args"]);
    assert!(
        args.iter()
            .filter_map(Value::as_str)
            .any(|a| a.starts_with("--data-dir")),
        "{name}: the coordinator gets no --data-dir"
    );

    // The gateway: NET_ADMIN, /dev/net/tun as a CharDevice hostPath mounted
    // at /dev/net/tun, and hostNetwork (or a UDP LoadBalancer for 51820).
    let gws: Vec<_> = docs
        .iter()
        .filter(|(_, d)| kind_of(d) == "Deployment")
        .collect();
    assert_eq!(gws.len(), 1, "one gateway Deployment");
    let (name, gw) = gws[0];
    assert_eq!(
        at(gw, &["spec", "replicas"]).as_u64(),
        Some(1),
        "{name}: one meshd per cluster"
    );
    let meshd = &containers(gw)[0];
    let caps: Vec<&str> = seq_at(meshd, &["securityContext", "capabilities", "add"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        caps.contains(&"NET_ADMIN"),
        "{name}: no NET_ADMIN capability ({caps:?})"
    );
    let tun = seq_at(gw, &["spec", "template", "spec", "volumes"])
        .iter()
        .find(|v| str_at(v, &["hostPath", "path"]) == Some("/dev/net/tun"))
        .unwrap_or_else(|| panic!("{name}: no hostPath volume for /dev/net/tun"));
    assert_eq!(
        str_at(tun, &["hostPath", "type"]),
        Some("CharDevice"),
        "{name}: /dev/net/tun must be a CharDevice hostPath"
    );
    let tun_vol = str_at(tun, &["name"]).unwrap();
    assert!(
        seq_at(meshd, &["volumeMounts"]).iter().any(|m| {
            str_at(m, &["name"]) == Some(tun_vol)
                && str_at(m, &["mountPath"]) == Some("/dev/net/tun")
        }),
        "{name}: /dev/net/tun is not mounted into meshd"
    );
    let host_network = at(gw, &["spec", "template", "spec", "hostNetwork"]).as_bool() == Some(true);
    let udp_lb = docs.iter().any(|(_, d)| {
        kind_of(d) == "Service"
            && str_at(d, &["spec", "type"]) == Some("LoadBalancer")
            && seq_at(d, &["spec", "ports"]).iter().any(|p| {
                at(p, &["port"]).as_u64() == Some(51820) && str_at(p, &["protocol"]) == Some("UDP")
            })
    });
    assert!(
        host_network || udp_lb,
        "{name}: WireGuard's UDP 51820 must be reachable (hostNetwork or a UDP LoadBalancer)"
    );
    let args: Vec<&str> = seq_at(meshd, &["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for flag in ["--endpoint", "--state-dir", "--dns-listen"] {
        assert!(
            args.iter().any(|a| a.starts_with(flag)),
            "{name}: meshd gets no {flag} ({args:?})"
        );
    }

    // CoreDNS: a server block for svc.clusterset.local that forwards.
    let corefiles: Vec<&str> = docs
        .iter()
        .filter(|(_, d)| kind_of(d) == "ConfigMap")
        .filter_map(|(_, d)| at(d, &["data"]).as_mapping())
        .flat_map(|m| m.values().filter_map(Value::as_str))
        .filter(|s| s.contains("svc.clusterset.local"))
        .collect();
    assert!(
        !corefiles.is_empty(),
        "no ConfigMap mentions svc.clusterset.local"
    );
    let forwards = corefiles.iter().any(|c| {
        let Some(start) = c.find("svc.clusterset.local") else {
            return false;
        };
        let block = &c[start..];
        let block = &block[..block.find("\n}").unwrap_or(block.len())];
        block.contains('{')
            && block
                .lines()
                .any(|l| l.trim_start().starts_with("forward . "))
    });
    assert!(
        forwards,
        "the CoreDNS snippet does not forward svc.clusterset.local:\n{corefiles:?}"
    );
}

// ------------------------------------------------------------------ systemd

const UNITS: [&str; 2] = ["skymesh-coordinator.service", "skymesh-meshd.service"];

/// The absolute program path of a unit's `ExecStart=`.
fn exec_start_path(unit: &str) -> String {
    let line = unit
        .lines()
        .find_map(|l| l.trim().strip_prefix("ExecStart="))
        .expect("the unit has an ExecStart=");
    let prog = line
        .trim_start_matches(['-', '+', '!', ':', '@'])
        .split_whitespace()
        .next()
        .unwrap();
    assert!(
        prog.starts_with('/'),
        "ExecStart program {prog} is not absolute"
    );
    prog.to_string()
}

/// Runs `systemd-analyze verify --root ROOT UNITS...` over a private root
/// that holds a copy of the system's unit tree, the units to check (in
/// /etc/systemd/system) and executable stubs at their ExecStart paths —
/// so the check is real (it resolves dependencies and checks the programs)
/// without installing anything on this machine. Returns (success, output).
fn verify(units: &[(&str, String)]) -> (bool, String) {
    let version = Command::new("systemd-analyze").arg("--version").output();
    match version {
        Ok(o) if o.status.success() => {}
        _ => panic!(
            "systemd-analyze not found: install it (Debian: apt-get install systemd) to verify the units"
        ),
    }
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let sys_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).join("sysinit.target").exists())
        .expect("systemd's unit directory (with sysinit.target) exists where systemd-analyze is");
    fs::create_dir_all(r.join("usr/lib/systemd")).unwrap();
    let cp = Command::new("cp")
        .arg("-a")
        .arg(sys_units)
        .arg(r.join("usr/lib/systemd/system"))
        .status()
        .unwrap();
    assert!(cp.success(), "copying {sys_units}");
    let etc = r.join("etc/systemd/system");
    fs::create_dir_all(&etc).unwrap();
    for (name, text) in units {
        fs::write(etc.join(name), text).unwrap();
        let prog = r.join(exec_start_path(text).trim_start_matches('/'));
        fs::create_dir_all(prog.parent().unwrap()).unwrap();
        fs::write(&prog, "#!/bin/sh\nexit 0\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&prog, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", r.display()))
        .arg("--man=no")
        .args(units.iter().map(|(n, _)| *n))
        .env("SYSTEMD_LOG_COLOR", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let dir = deploy_dir().join("systemd");
    let units: Vec<(&str, String)> = UNITS
        .iter()
        .map(|u| (*u, fs::read_to_string(dir.join(u)).unwrap()))
        .collect();
    let (ok, out) = verify(&units);
    // verify exits 0 on unknown keys and bad values ("…, ignoring"): any
    // diagnostic about our units is a failure too.
    let ours: Vec<&str> = out.lines().filter(|l| l.contains("skymesh-")).collect();
    assert!(ok && ours.is_empty(), "systemd-analyze verify:\n{out}");

    // The check is real: a misspelt directive in the same unit is reported.
    let (_, out) = verify(&[(
        "skymesh-meshd.service",
        units[1]
            .1
            .replace("Restart=on-failure", "Restrt=on-failure"),
    )]);
    assert!(
        out.contains("Restrt"),
        "a misspelt key goes unnoticed:\n{out}"
    );

    // What the units promise.
    let coord = &units[0].1;
    for d in [
        "DynamicUser=yes",
        "StateDirectory=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
    ] {
        assert!(
            coord.lines().any(|l| l.starts_with(d)),
            "coordinator unit lacks {d}"
        );
    }
    let meshd = &units[1].1;
    for d in [
        "AmbientCapabilities=CAP_NET_ADMIN",
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE",
        "DeviceAllow=/dev/net/tun rw",
        "StateDirectory=",
        "RuntimeDirectory=wireguard",
        "Restart=on-failure",
        "EnvironmentFile=",
    ] {
        assert!(
            meshd.lines().any(|l| l.starts_with(d)),
            "meshd unit lacks {d}"
        );
    }
    assert!(
        dir.join("meshd.env").exists(),
        "deploy/systemd/meshd.env (the env file example) is missing"
    );
}

// ------------------------------------------------------------------ quickstart

/// Runs `deploy/quickstart.sh ARGS...` with the test's binaries and state
/// dir, killing it after `timeout`. Returns (success, stdout + stderr).
fn quickstart(state: &Path, args: &[&str], timeout: Duration) -> (bool, String) {
    let bin_dir = bin_path("coordinator").parent().unwrap().to_path_buf();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new(deploy_dir().join("quickstart.sh"))
        .args(args)
        .env("SKYMESH_BIN_DIR", &bin_dir)
        .env("SKYMESH_SKIP_BUILD", "1")
        .env("SKYMESH_DEMO_STATE_DIR", state)
        .stdin(Stdio::null())
        .stdout(log.reopen().unwrap())
        .stderr(log.reopen().unwrap())
        .spawn()
        .expect("deploy/quickstart.sh runs");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut text = fs::read_to_string(log.path()).unwrap_or_default();
    if status.is_none() {
        text.push_str(&format!(
            "\n(quickstart.sh {args:?} killed after {timeout:?})\n"
        ));
    }
    (status.is_some_and(|s| s.success()), text)
}

/// Tears the demo down when dropped, also when the test fails half-way.
struct Down<'a> {
    state: &'a Path,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let (ok, out) = quickstart(self.state, &["down"], Duration::from_secs(120));
        if !ok {
            eprintln!("quickstart.sh down failed:\n{out}");
        }
    }
}

/// Everything named skydemo that exists on this machine now.
fn skydemo_leftovers(state: &Path, pids: &[(u32, String)]) -> Vec<String> {
    let mut left = Vec::new();
    let names = |dir: &str, pred: &dyn Fn(&str) -> bool| -> Vec<String> {
        fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| pred(n))
                    .map(|n| format!("{dir}/{n}"))
                    .collect()
            })
            .unwrap_or_default()
    };
    left.extend(names("/run/netns", &|n| n.starts_with("skydemo")));
    left.extend(names("/etc/netns", &|n| n.starts_with("skydemo")));
    left.extend(names("/var/run/wireguard", &|n| {
        n.starts_with("skydemo") && n.ends_with(".sock")
    }));
    left.extend(names("/sys/class/net", &|n| n.starts_with("skydemo")));
    if state.exists() {
        left.push(format!("state dir {}", state.display()));
    }
    // The processes `up` recorded (pid + start time, so a recycled pid is
    // not mistaken for ours), and anything whose command line names the
    // state dir.
    for (pid, start) in pids {
        if proc_start(*pid).as_deref() == Some(start.as_str()) {
            left.push(format!("process {pid}"));
        }
    }
    let needle = state.to_string_lossy().into_owned();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(cmd) = fs::read(format!("/proc/{pid}/cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(&needle) {
                left.push(format!("process {pid}: {cmd}"));
            }
        }
    }
    left
}

/// Field 22 of /proc/PID/stat (start time), as quickstart.sh records it.
fn proc_start(pid: u32) -> Option<String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(") ")? + 2..];
    rest.split_whitespace().nth(19).map(str::to_string)
}

/// The (pid, start time) pairs in the state dir's pid files.
fn recorded_pids(state: &Path) -> Vec<(u32, String)> {
    let Ok(rd) = fs::read_dir(state.join("pids")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let t = fs::read_to_string(e.path()).ok()?;
            let mut it = t.split_whitespace();
            Some((it.next()?.parse().ok()?, it.next()?.to_string()))
        })
        .collect()
}

/// `[cN] dig +short web.default.svc -> ADDR` of cluster `i`, if resolved.
fn resolved(out: &str, i: usize) -> Option<Ipv4Addr> {
    let prefix = format!("[c{i}] dig +short web.default.svc -> ");
    out.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .and_then(|r| r.trim().parse().ok())
}

/// The clusters of the replicas that answered: `   N hello from JOB in CLUSTER`.
fn answering_clusters(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let n: u32 = w.next()?.parse().ok()?;
            let words: Vec<&str> = w.collect();
            match words.as_slice() {
                ["hello", "from", _job, "in", cluster] if n > 0 => Some((*cluster).to_string()),
                _ => None,
            }
        })
        .collect()
}

#[test]
fn quickstart_brings_up_three_clusters_and_tears_down_cleanly() {
    require_root().unwrap();
    assert!(
        !Path::new("/run/netns/skydemo-wan").exists(),
        "a skymesh demo is already running on this machine (skydemo-* namespaces); \
         this test will not disturb it: stop it with `deploy/quickstart.sh down` first"
    );
    for b in ["coordinator", "meshd", "skyctl", "skymesh-demo-app"] {
        let _ = bin_path(b); // fails with the build hint if missing
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let down = Down { state: &state };

    let (ok, up) = quickstart(&state, &["up"], Duration::from_secs(300));
    println!("---- quickstart.sh up ----\n{up}");
    assert!(ok, "quickstart.sh up failed:\n{up}");
    let pids = recorded_pids(&state);
    assert_eq!(pids.len(), 10, "coordinator, 3 meshd, 6 replicas: {pids:?}");

    // What must work today: tunnels, jobs and endpoints, skyctl's views.
    let mut problems = Vec::new();
    if !up
        .lines()
        .any(|l| l.starts_with("web ") && l.contains("c1: 2, c2: 2, c3: 2"))
    {
        problems
            .push("skyctl get endpoints does not show 2 ready replicas per cluster".to_string());
    }
    for (a, b) in [
        ("c1", "c2"),
        ("c1", "c3"),
        ("c2", "c1"),
        ("c2", "c3"),
        ("c3", "c1"),
        ("c3", "c2"),
    ] {
        let tunnel_up = up.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() > 3 && w[0] == a && w[1] == b && w[2] == "up"
        });
        if !tunnel_up {
            problems.push(format!("skyctl get tunnels: {a} -> {b} is not up"));
        }
    }

    // Running `up` again is safe: it finds the demo and shows it again.
    let (ok, again) = quickstart(&state, &["up"], Duration::from_secs(180));
    if !(ok && again.contains("The demo already runs")) {
        problems.push(format!(
            "a second `up` did not recognise the running demo:\n{again}"
        ));
    }
    let (ok, status) = quickstart(&state, &["status"], Duration::from_secs(180));
    if !ok {
        problems.push(format!("`status` failed:\n{status}"));
    }
    let out = quickstart(
        &state,
        &[
            "exec",
            "c2",
            "--",
            "curl",
            "-s",
            "--max-time",
            "3",
            "http://10.1.0.11:8080/",
        ],
        Duration::from_secs(30),
    )
    .1;
    if out.trim() != "hello from web-c1-1 in c1" {
        problems.push(format!(
            "exec c2 -- curl to a replica in c1 through the tunnel: {out:?}"
        ));
    }

    // The final behaviour (SPEC §5 VIPs and §6 DNS): the name resolves to a
    // VIP in every cluster, and requests reach replicas in all three.
    let vip_net = (Ipv4Addr::new(100, 65, 0, 0), 16);
    for i in 1..=3 {
        match resolved(&up, i) {
            Some(ip)
                if u32::from(ip) >> (32 - vip_net.1)
                    == u32::from(vip_net.0) >> (32 - vip_net.1) => {}
            other => problems.push(format!(
                "c{i}: web.default.svc does not resolve to a VIP in 100.65.0.0/16 ({other:?})"
            )),
        }
    }
    let clusters = answering_clusters(&up);
    let want: BTreeSet<String> = ["c1", "c2", "c3"].iter().map(|s| s.to_string()).collect();
    if clusters != want {
        problems.push(format!(
            "requests to web.default.svc reached replicas in {clusters:?}, not in all of c1, c2, c3"
        ));
    }
    for i in 1..=3 {
        let line = format!("[c{i}] 12 x curl -s http://web.default.svc/ -> 12 answered, 0 failed");
        if !up.contains(&line) {
            problems.push(format!(
                "c{i}: not every request to web.default.svc was answered"
            ));
        }
    }

    // `down` removes everything, and the guard's second `down` is harmless.
    let (ok, out) = quickstart(&state, &["down"], Duration::from_secs(120));
    assert!(ok, "quickstart.sh down failed:\n{out}");
    let left = skydemo_leftovers(&state, &pids);
    assert!(left.is_empty(), "left after down: {left:#?}");
    drop(down);
    assert!(skydemo_leftovers(&state, &pids).is_empty());

    assert!(
        problems.is_empty(),
        "quickstart problems:\n  {}\n\n{up}",
        problems.join("\n  ")
    );
}
