//! End-to-end tests of `skyctl` against a real coordinator: the SkyShift /
//! SkyFlow reference examples verbatim, the tables of SPEC §7, the bad
//! inputs of SPEC §8 (refused with one line, nothing written), and
//! `get --watch` following changes across a coordinator restart.
//!
//! Needs the `coordinator` and `skyctl` binaries: `cargo build --workspace`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use skymesh_proto::v1::{GetRequest, Kind, ServicePort, UpdateRequest, object::Obj};
use skymesh_tests::{Coordinator, bin_path};

/// How long to wait for a watch line.
const LINE_TIMEOUT: Duration = Duration::from_secs(15);

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs skyctl, asserts success, returns stdout.
fn ok(c: &Coordinator, args: &[&str]) -> String {
    let out = c.skyctl(args);
    assert!(
        out.status.success(),
        "skyctl {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts skyctl failed with `code` and one `error: ` line on stderr that
/// contains `needle` (case-insensitive); returns that line.
fn refused(out: &Output, code: i32, needle: &str, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: exit code\nstdout: {}\nstderr: {err}",
        stdout(out)
    );
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "{what}: stderr must be one line, got:\n{err}"
    );
    assert!(lines[0].starts_with("error: "), "{what}: {err}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "{what}: {err:?} does not mention {needle:?}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{what}: {err}"
    );
    lines[0].to_string()
}

/// Whitespace-split lines of a table.
fn cells(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

/// The data row of a table whose first cell is `name`.
fn row<'a>(table: &'a [Vec<String>], name: &str) -> &'a [String] {
    table
        .iter()
        .find(|r| r.first().map(String::as_str) == Some(name))
        .unwrap_or_else(|| panic!("no row {name:?} in {table:?}"))
}

fn start_with_cluster() -> Coordinator {
    let c = Coordinator::start().unwrap();
    ok(&c, &["create", "namespace", "myNamespace"]);
    let out = ok(
        &c,
        &[
            "create",
            "cluster",
            "myCluster",
            "--workload-cidr",
            "10.1.0.0/16",
        ],
    );
    assert!(out.contains("cluster/mycluster created"), "{out}");
    c
}

#[test]
fn reference_examples_work_verbatim() {
    let c = Coordinator::start().unwrap();
    ok(&c, &["create", "namespace", "myNamespace"]);

    let out = ok(
        &c,
        &[
            "create",
            "cluster",
            "myCluster",
            "--workload-cidr",
            "10.1.0.0/16",
        ],
    );
    assert!(out.contains("cluster/mycluster created"), "{out}");
    assert!(out.contains("join token"), "{out}");
    let cmd = format!(
        "meshd --coordinator {} --cluster mycluster --join-token-file <FILE> ",
        c.url()
    );
    let line = out
        .lines()
        .find(|l| l.contains(&cmd))
        .unwrap_or_else(|| panic!("no meshd command line in:\n{out}"));
    assert!(
        line.trim_end()
            .ends_with("--endpoint <THIS-GATEWAY-IP>:51820"),
        "{line}"
    );

    // skyshift-services.txt / skyflow-services.rst.txt
    let out = ok(
        &c,
        &[
            "create",
            "service",
            "myService",
            "-t",
            "ClusterIP",
            "-s",
            "app=myApp",
            "-p",
            "80:8080",
            "-c",
            "myCluster",
        ],
    );
    assert_eq!(out.trim(), "service/myservice created");

    // skyshift-endpoints.txt
    let out = ok(
        &c,
        &[
            "create",
            "endpoints",
            "myEndpoints",
            "--namespace",
            "myNamespace",
            "--num_endpoints",
            "3",
            "--exposed",
            "--primary_cluster",
            "myCluster",
            "-s",
            "key1=value1",
        ],
    );
    assert_eq!(out.trim(), "endpoints/myendpoints created");

    let out = ok(&c, &["get", "service", "myService"]);
    let t = cells(&out);
    assert_eq!(
        t[0],
        [
            "NAME",
            "TYPE",
            "CLUSTER-IP",
            "EXTERNAL-IP",
            "PORTS",
            "CLUSTERS",
            "NAMESPACE",
            "AGE"
        ],
        "{out}"
    );
    let r = row(&t, "myservice");
    assert_eq!(&r[1], "ClusterIP", "{out}");
    let vip: Ipv4Addr = r[2].parse().unwrap_or_else(|_| panic!("no VIP in {out}"));
    assert_eq!(
        &vip.octets()[..2],
        &[100, 65],
        "VIP {vip} outside 100.65.0.0/16"
    );
    assert_eq!(&r[3], "<none>");
    assert_eq!(&r[4], "80:8080/TCP");
    assert_eq!(&r[5], "mycluster");
    assert_eq!(&r[6], "default");

    // The endpoints example lives in myNamespace; the docs' `get` and
    // `delete` use the default namespace, so give them one there too.
    ok(
        &c,
        &["create", "endpoints", "myEndpoints", "-s", "key1=value1"],
    );
    let out = ok(&c, &["get", "endpoints", "myEndpoints"]);
    let t = cells(&out);
    assert_eq!(t[0], ["NAME", "NAMESPACE", "ENDPOINTS", "AGE"], "{out}");
    assert_eq!(row(&t, "myendpoints")[1], "default");
    // The addresses are filled in by the coordinator's endpoints
    // controller, a moment after the create.
    let get = || {
        ok(
            &c,
            &[
                "get",
                "endpoints",
                "myEndpoints",
                "--namespace",
                "myNamespace",
            ],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let mut out = get();
    while !out.contains("mycluster: ") && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        out = get();
    }
    let r = row(&cells(&out), "myendpoints").to_vec();
    assert_eq!(r[1], "mynamespace", "{out}");
    assert!(
        out.contains("mycluster: "),
        "ENDPOINTS should show the primary cluster: {out}"
    );

    let out = ok(&c, &["delete", "service", "myService"]);
    assert_eq!(out.trim(), "service/myservice deleted");
    let out = ok(&c, &["delete", "endpoints", "myEndpoints"]);
    assert_eq!(out.trim(), "endpoints/myendpoints deleted");
    let out = ok(
        &c,
        &[
            "delete",
            "endpoints",
            "myEndpoints",
            "--namespace",
            "myNamespace",
        ],
    );
    assert_eq!(out.trim(), "endpoints/myendpoints deleted");

    let out = c.skyctl(&["get", "service", "myService"]);
    refused(
        &out,
        1,
        r#"service "myservice" not found in namespace "default""#,
        "get deleted",
    );
    let out = c.skyctl(&["delete", "service", "myService"]);
    refused(
        &out,
        1,
        r#"service "myservice" not found in namespace "default""#,
        "delete twice",
    );
}

#[test]
fn tables_of_every_kind() {
    let c = start_with_cluster();
    ok(
        &c,
        &[
            "create",
            "job",
            "web-1",
            "--cluster",
            "myCluster",
            "--ip",
            "10.1.0.5",
            "-l",
            "app=web",
            "--port",
            "http:8080",
        ],
    );
    ok(
        &c,
        &[
            "create",
            "service",
            "web",
            "-s",
            "app=web",
            "-p",
            "http:80:8080",
        ],
    );

    let out = ok(&c, &["get", "clusters"]);
    let t = cells(&out);
    assert_eq!(
        t[0],
        [
            "NAME",
            "STATUS",
            "OVERLAY-IP",
            "ENDPOINT",
            "WORKLOAD-CIDRS",
            "PEERS",
            "AGE"
        ],
        "{out}"
    );
    let r = row(&t, "mycluster");
    assert_eq!(
        (r[1].as_str(), r[4].as_str()),
        ("Pending", "10.1.0.0/16"),
        "{out}"
    );

    let out = ok(&c, &["get", "jobs"]);
    let t = cells(&out);
    assert_eq!(
        t[0],
        [
            "NAME",
            "CLUSTER",
            "IP",
            "READY",
            "PORTS",
            "NAMESPACE",
            "AGE"
        ],
        "{out}"
    );
    let r = row(&t, "web-1");
    assert_eq!(
        (r[1].as_str(), r[2].as_str(), r[4].as_str()),
        ("mycluster", "10.1.0.5", "8080/TCP")
    );

    let out = ok(&c, &["get", "svc", "-o", "wide"]);
    let r = row(&cells(&out), "web").to_vec();
    assert_eq!(r[4], "80:8080/TCP", "{out}");
    assert_eq!(r[5], "<all>", "{out}");
    assert_eq!(r[r.len() - 3..], ["app=web", "<none>", "<none>"], "{out}");

    let out = ok(&c, &["get", "ns"]);
    let t = cells(&out);
    assert_eq!(t[0], ["NAME", "AGE"]);
    row(&t, "default");
    row(&t, "mynamespace");

    let out = ok(&c, &["get", "svc", "-A"]);
    row(&cells(&out), "web");

    let out = c.skyctl(&["get", "tunnels"]);
    assert!(out.status.success(), "{}", stderr(&out));

    let out = ok(&c, &["get", "service", "web", "-o", "json"]);
    for needle in [
        r#""kind": "Service""#,
        r#""type": "ClusterIP""#,
        r#""protocol": "TCP""#,
        r#""name": "http""#,
    ] {
        assert!(out.contains(needle), "{needle} missing in {out}");
    }
    let out = ok(&c, &["get", "services", "-o", "yaml"]);
    assert!(out.starts_with("items:"), "{out}");
    assert!(out.contains("kind: Service"), "{out}");

    let out = ok(&c, &["completions", "bash"]);
    assert!(out.contains("skyctl"));
}

#[test]
fn bad_input_is_refused_and_nothing_is_written() {
    let c = start_with_cluster();
    ok(&c, &["create", "service", "dup", "-p", "80:8080"]);
    ok(
        &c,
        &[
            "create",
            "service",
            "inner",
            "-p",
            "80",
            "-n",
            "myNamespace",
        ],
    );
    let before_svc = ok(&c, &["get", "service", "-A", "-o", "json"]);
    let before_clusters = ok(&c, &["get", "clusters", "-o", "json"]);

    for (args, code, needle) in [
        (&["create", "service", "s1", "-p", "0:8080"][..], 2, "port"),
        (&["create", "service", "s1", "-p", "80:0"], 2, "port"),
        (&["create", "service", "s1", "-p", "70000"], 2, "port"),
        (
            &["create", "service", "s1", "-p", "80", "-s", "app"],
            2,
            "selector",
        ),
        (
            &["create", "service", "s1", "-p", "80", "-t", "Bogus"],
            2,
            "type",
        ),
        (
            &["create", "service", "s1", "-p", "80", "-p", "53/SCTP"],
            2,
            "protocol",
        ),
        (&["create", "service", "Bad_Name", "-p", "80"], 2, "name"),
        (
            &[
                "create",
                "service",
                "s1",
                "-p",
                "80",
                "--whitelist",
                "frontend",
            ],
            2,
            "--whitelist",
        ),
        (
            &[
                "create",
                "service",
                "s1",
                "-p",
                "80",
                "--upstream",
                "shop/d_b",
            ],
            2,
            "--upstream",
        ),
        (
            &["create", "cluster", "c2", "--workload-cidr", "10.2.0.0/33"],
            2,
            "workload-cidr",
        ),
        (
            &["create", "cluster", "c2", "--workload-cidr", "10.2.0.1/16"],
            2,
            "workload-cidr",
        ),
        (&["create", "cluster", "c2"], 2, "workload-cidr"),
        (
            &[
                "create",
                "job",
                "j",
                "--cluster",
                "myCluster",
                "--ip",
                "10.1.0.256",
            ],
            2,
            "ip",
        ),
        (
            &["create", "service", "s1", "-p", "80", "-c", "nope"],
            1,
            "nope",
        ),
        (
            &["create", "endpoints", "e", "--primary_cluster", "nope"],
            1,
            "nope",
        ),
        (
            &[
                "create",
                "job",
                "j",
                "--cluster",
                "nope",
                "--ip",
                "10.1.0.9",
            ],
            1,
            "nope",
        ),
        (
            &["create", "service", "dup", "-p", "81"],
            1,
            "already exists",
        ),
        (
            &["create", "service", "s1", "-p", "80", "--namespace", "nope"],
            1,
            "nope",
        ),
        (
            &[
                "create",
                "cluster",
                "c2",
                "--workload-cidr",
                "10.1.128.0/17",
            ],
            1,
            "10.1.0.0/16",
        ),
        (&["delete", "namespace", "myNamespace"], 1, "mynamespace"),
        (&["delete", "namespace", "default"], 1, "default"),
    ] {
        let out = c.skyctl(args);
        refused(&out, code, needle, &format!("{args:?}"));
    }

    // Wrong, then missing token.
    let out = skymesh_tests::skyctl(
        &c.url(),
        "wrong-token",
        &c.ca_file(),
        &["create", "service", "s1", "-p", "80"],
    );
    refused(&out, 1, "token", "wrong token");
    let out = Command::new(bin_path("skyctl"))
        .args(["get", "services"])
        .env("SKYCTL_COORDINATOR", c.url())
        .env("SKYCTL_CA", c.ca_file())
        .env_remove("SKYCTL_TOKEN")
        .env("SKYCTL_TOKEN_FILE", c.data_dir().join("no-such-token"))
        .output()
        .unwrap();
    refused(&out, 2, "--token", "missing token");

    // Nothing was written.
    assert_eq!(ok(&c, &["get", "service", "-A", "-o", "json"]), before_svc);
    assert_eq!(ok(&c, &["get", "clusters", "-o", "json"]), before_clusters);
    let out = c.skyctl(&["get", "service", "s1"]);
    refused(&out, 1, "not found", "s1 must not exist");
    let out = c.skyctl(&["get", "service", "dup", "-o", "json"]);
    assert!(
        stdout(&out).contains(r#""port": 80,"#),
        "dup untouched: {}",
        stdout(&out)
    );
}

#[test]
fn unreachable_coordinator_is_one_line() {
    let c = Coordinator::start().unwrap();
    let url = c.url();
    let token = c.token();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::copy(c.ca_file(), ca.path()).unwrap();
    drop(c);
    let out = skymesh_tests::skyctl(&url, &token, ca.path(), &["get", "services"]);
    refused(&out, 1, "unreachable", "coordinator gone");
}

/// A `skyctl ... --watch` child whose stdout lines arrive on a channel.
/// Killed on drop.
struct Watcher {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Watcher {
    fn spawn(c: &Coordinator, args: &[&str]) -> Self {
        let mut child = Command::new(bin_path("skyctl"))
            .args(args)
            .env("SKYCTL_COORDINATOR", c.url())
            .env("SKYCTL_TOKEN", c.token())
            .env("SKYCTL_CA", c.ca_file())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Watcher {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line whose first cells are `first` (e.g. ["ADDED", "web"]).
    fn expect(&mut self, first: &[&str]) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    let c: Vec<&str> = line.split_whitespace().collect();
                    if c.len() >= first.len() && c[..first.len()] == *first {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "no line starting with {first:?} within {LINE_TIMEOUT:?}; saw {:?}",
                        self.seen
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "watch ended before a line starting with {first:?}; saw {:?}",
                        self.seen
                    )
                }
            }
        }
    }

    /// Every line received so far (waiting `quiet` for stragglers).
    fn drain(&mut self, quiet: Duration) -> Vec<String> {
        while let Ok(line) = self.lines.recv_timeout(quiet) {
            self.seen.push(line);
        }
        self.seen.clone()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Changes the first port of service `name` through the API (skyctl has no
/// update verb): a MODIFIED event.
fn bump_port(c: &Coordinator, name: &str, port: u32) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut api = c.api().await.unwrap();
        let mut obj = api
            .get(GetRequest {
                kind: Kind::Service as i32,
                namespace: "default".into(),
                name: name.into(),
            })
            .await
            .unwrap()
            .into_inner();
        let Some(Obj::Service(s)) = obj.obj.as_mut() else {
            panic!("not a service");
        };
        s.spec.as_mut().unwrap().ports = vec![ServicePort {
            name: String::new(),
            port,
            target_port: 8080,
            protocol: 0,
        }];
        api.update(UpdateRequest { object: Some(obj) })
            .await
            .unwrap();
    });
}

#[test]
fn watch_follows_changes_across_a_restart() {
    let mut c = Coordinator::start().unwrap();
    let mut all = Watcher::spawn(&c, &["get", "service", "--watch"]);
    all.expect(&["NAME", "TYPE", "CLUSTER-IP"]);

    ok(&c, &["create", "service", "web", "-p", "80:8080"]);
    all.expect(&["ADDED", "web", "ClusterIP"]);
    ok(&c, &["create", "service", "api", "-p", "81"]);
    all.expect(&["ADDED", "api"]);

    let mut one = Watcher::spawn(&c, &["get", "service", "web", "--watch"]);
    let first = one.expect(&["NAME"]);
    assert!(first.starts_with("NAME"), "{first}");
    one.expect(&["web", "ClusterIP"]);

    bump_port(&c, "web", 90);
    let line = all.expect(&["MODIFIED", "web"]);
    assert!(line.contains("90:8080/TCP"), "{line}");
    one.expect(&["MODIFIED", "web"]);

    ok(&c, &["delete", "service", "api"]);
    all.expect(&["DELETED", "api"]);

    c.restart().unwrap();

    ok(&c, &["create", "service", "after-restart", "-p", "82"]);
    all.expect(&["ADDED", "after-restart"]);
    bump_port(&c, "web", 91);
    all.expect(&["MODIFIED", "web"]);
    one.expect(&["MODIFIED", "web"]);
    ok(&c, &["delete", "service", "web"]);
    all.expect(&["DELETED", "web"]);
    one.expect(&["DELETED", "web"]);

    // Exactly once each, in order.
    let events: Vec<String> = all
        .drain(Duration::from_millis(500))
        .iter()
        .filter(|l| !l.starts_with("NAME"))
        .map(|l| l.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        events,
        [
            "ADDED web",
            "ADDED api",
            "MODIFIED web",
            "DELETED api",
            "ADDED after-restart",
            "MODIFIED web",
            "DELETED web"
        ]
    );
    let named: Vec<String> = one.drain(Duration::from_millis(200));
    assert!(
        named
            .iter()
            .all(|l| !l.contains("api") && !l.contains("after-restart")),
        "the named watch shows only web: {named:?}"
    );
    assert_eq!(
        named.iter().filter(|l| l.starts_with("MODIFIED")).count(),
        2,
        "{named:?}"
    );
}

/// Service policy lists (README "Service policy"): set with flags, shown
/// by `get -o wide`, `-o json` and `describe`, normalised by the
/// coordinator's validation (sorted, duplicates and case folded).
#[test]
fn service_policy_lists_are_stored_and_shown() {
    let c = start_with_cluster();
    ok(
        &c,
        &[
            "create",
            "service",
            "web",
            "-p",
            "80:8080",
            "--whitelist",
            "shop/Frontend",
            "--whitelist",
            "ops/*",
            "--whitelist",
            "shop/frontend",
            "--upstream",
            "shop/db",
        ],
    );
    let wide = ok(&c, &["get", "service", "web", "-o", "wide"]);
    let t = cells(&wide);
    let r = row(&t, "web");
    assert_eq!(
        r[r.len() - 2..],
        ["shop/db", "ops/*,shop/frontend"],
        "{wide}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&c, &["get", "service", "web", "-o", "json"])).unwrap();
    assert_eq!(
        json["spec"]["whitelists"],
        serde_json::json!(["ops/*", "shop/frontend"])
    );
    assert_eq!(json["spec"]["upstreams"], serde_json::json!(["shop/db"]));
    let d = ok(&c, &["describe", "service", "web"]);
    assert!(d.contains("Whitelists:        ops/*, shop/frontend"), "{d}");
    assert!(d.contains("enforced on VIP and job-IP calls"), "{d}");
}
