//! Declarative objects end to end (issue #17, SPEC §7): `skyctl apply -f`,
//! `create -f`, `delete -f`, `edit` and `describe` against the real
//! coordinator; a Kubernetes v1 Service applied, then applied again with a
//! new port, through the real meshd of three clusters.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use skymesh_tests::mesh::Mesh;
use skymesh_tests::netns::wait_until;
use skymesh_tests::replica::{Replica, TCP_PORT, UDP_PORT, ask_name, job_entry};
use skymesh_tests::{Coordinator, bin_path};

/// A Service as kubectl users write it: named ports, targetPort by name
/// and by number, session affinity, skymesh settings as annotations.
const WEB_V1: &str = r#"# web: the storefront
apiVersion: v1
kind: Service
metadata:
  name: web
  labels:
    app: web
  annotations:
    skymesh.io/traffic-policy: Spread
spec:
  type: ClusterIP
  selector:
    app: web
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: http
    - name: dns
      protocol: UDP
      port: 53
      targetPort: 9090
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
"#;

/// [`WEB_V1`] with one more port.
fn web_v2() -> String {
    WEB_V1.replace(
        "  sessionAffinity: ClientIP",
        "    - name: alt\n      port: 8081\n      targetPort: 8080\n  sessionAffinity: ClientIP",
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "skyctl failed: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// Exit code `code`, one line on stderr containing every needle.
fn refused(out: &Output, code: i32, needles: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout {} stderr {err}",
        text(&out.stdout)
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in {err}");
    }
}

fn write(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_str().unwrap().to_string()
}

fn json(c: &Coordinator, args: &[&str]) -> serde_json::Value {
    let mut full = args.to_vec();
    full.extend(["-o", "json"]);
    serde_json::from_str(&ok(&c.skyctl(&full))).unwrap()
}

/// skyctl with extra environment variables and stdin.
fn skyctl_with(c: &Coordinator, env: &[(&str, &str)], stdin: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(bin_path("skyctl"));
    cmd.args(args)
        .env("SKYCTL_COORDINATOR", c.url())
        .env("SKYCTL_TOKEN", c.token())
        .env("SKYCTL_CA", c.ca_file())
        .env_remove("RUST_LOG")
        .env_remove("VISUAL")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// A coordinator with a cluster and two jobs that `app=web` selects.
fn coordinator_with_jobs() -> Coordinator {
    let c = Coordinator::start().unwrap();
    ok(&c.skyctl(&["create", "cluster", "c1", "--workload-cidr", "10.1.0.0/16"]));
    for (name, ip) in [("web-1", "10.1.0.5"), ("web-2", "10.1.0.6")] {
        ok(&c.skyctl(&[
            "create",
            "job",
            name,
            "--cluster",
            "c1",
            "--ip",
            ip,
            "-l",
            "app=web",
            "-p",
            "http:8080",
            "-p",
            "dns:9090/UDP",
        ]));
    }
    c
}

#[test]
fn apply_creates_updates_and_keeps_the_vip() {
    let c = coordinator_with_jobs();
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "web.yaml", WEB_V1);

    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &v1])),
        "service/web created\n"
    );
    let svc = json(&c, &["get", "svc", "web"]);
    let vip = svc["status"]["cluster_ip"].as_str().unwrap().to_string();
    assert_eq!(
        svc["spec"]["ports"][0],
        serde_json::json!({"name": "http", "port": 80, "target_port": 8080, "protocol": "TCP"}),
        "targetPort http resolved from the jobs"
    );
    assert_eq!(svc["spec"]["ports"][1]["target_port"], 9090);
    assert_eq!(svc["spec"]["session_affinity"], "ClientIP");
    assert_eq!(svc["spec"]["affinity_timeout_s"], 600);
    assert_eq!(svc["metadata"]["labels"]["app"], "web");
    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &v1])),
        "service/web unchanged\n"
    );

    // A new port: configured, same VIP.
    let v2 = write(dir.path(), "web-v2.yaml", &web_v2());
    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &v2])),
        "service/web configured\n"
    );
    let svc = json(&c, &["get", "svc", "web"]);
    assert_eq!(svc["status"]["cluster_ip"], vip.as_str());
    assert_eq!(svc["spec"]["ports"][2]["port"], 8081);

    // `get -o yaml` is apply input: unchanged as it is; a changed copy
    // whose status claims another VIP is configured and keeps the VIP.
    let got = ok(&c.skyctl(&["get", "svc", "web", "-o", "yaml"]));
    let got_file = write(dir.path(), "got.yaml", &got);
    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &got_file])),
        "service/web unchanged\n"
    );
    let edited = got
        .replace(&vip, "100.65.9.9")
        .replace("port: 8081", "port: 8082");
    assert!(edited.contains("100.65.9.9") && edited.contains("port: 8082"));
    let edited_file = write(dir.path(), "edited.yaml", &edited);
    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &edited_file])),
        "service/web configured\n"
    );
    let svc = json(&c, &["get", "svc", "web"]);
    assert_eq!(
        svc["status"]["cluster_ip"],
        vip.as_str(),
        "status from input is ignored"
    );
    assert_eq!(svc["spec"]["ports"][2]["port"], 8082);

    // The copy read before that update is stale now: refused, naming
    // the object, nothing written.
    let stale = write(
        dir.path(),
        "stale.yaml",
        &got.replace("port: 8081", "port: 8083"),
    );
    let before = json(&c, &["get", "svc", "web"]);
    refused(
        &c.skyctl(&["apply", "-f", &stale]),
        1,
        &["service/web", "conflict", "resource version"],
    );
    assert_eq!(json(&c, &["get", "svc", "web"]), before);

    // JSON on stdin works as well; the same object is unchanged.
    let as_json = ok(&c.skyctl(&["get", "svc", "web", "-o", "json"]));
    let out = skyctl_with(&c, &[], &as_json, &["apply", "-f", "-"]);
    assert_eq!(ok(&out), "service/web unchanged\n");

    // create -f refuses what exists; delete -f deletes it.
    refused(
        &c.skyctl(&["create", "-f", &v1]),
        1,
        &["service \"web\" already exists"],
    );
    assert_eq!(
        ok(&c.skyctl(&["delete", "-f", &v1])),
        "service/web deleted\n"
    );
    refused(&c.skyctl(&["get", "svc", "web"]), 1, &["not found"]);
    assert_eq!(
        ok(&c.skyctl(&["create", "-f", &v1])),
        "service/web created\n"
    );

    // A cluster made by apply gets its join token shown, as with create.
    let cluster = write(
        dir.path(),
        "c2.yaml",
        "kind: Cluster\nmetadata: {name: c2}\nspec: {workload_cidrs: [10.2.0.0/16]}\n",
    );
    let out = ok(&c.skyctl(&["apply", "-f", &cluster]));
    assert!(out.starts_with("cluster/c2 created\njoin token"), "{out}");
    assert!(out.contains("skyjoin_"), "{out}");
    assert_eq!(
        ok(&c.skyctl(&["apply", "-f", &cluster])),
        "cluster/c2 unchanged\n"
    );
    let overlap = write(
        dir.path(),
        "c3.yaml",
        "kind: Cluster\nmetadata: {name: c3}\nspec: {workload_cidrs: [10.2.1.0/24]}\n",
    );
    refused(
        &c.skyctl(&["apply", "-f", &overlap]),
        1,
        &["c3.yaml#1 (cluster/c3)", "overlaps"],
    );
}

#[test]
fn bad_manifests_are_refused_with_one_line_and_nothing_written() {
    let c = coordinator_with_jobs();
    let dir = tempfile::tempdir().unwrap();
    let list_before = json(&c, &["get", "svc", "-A"]);
    let good_ns = "kind: Namespace\nmetadata: {name: shop}\n---\n";
    for (name, body, needles) in [
        (
            "kind.yaml",
            format!("{good_ns}apiVersion: v1\nkind: Pod\nmetadata: {{name: p}}\n"),
            &["kind.yaml#2", "invalid kind", "\"Pod\""][..],
        ),
        (
            "port.yaml",
            format!("{good_ns}{}", WEB_V1.replace("port: 80", "port: 70000")),
            &[
                "port.yaml#2 (service/web)",
                "spec.ports[0].port",
                "70000",
                "1-65535",
            ],
        ),
        (
            "unmappable.yaml",
            format!(
                "{good_ns}{}",
                WEB_V1.replace(
                    "      targetPort: 9090",
                    "      targetPort: 9090\n      nodePort: 30053"
                )
            ),
            &[
                "unmappable.yaml#2",
                "spec.ports[1].nodePort",
                "not supported",
            ],
        ),
        (
            "unknown.yaml",
            format!(
                "{good_ns}{}",
                WEB_V1.replace(
                    "  type: ClusterIP",
                    "  loadBalancerClass: x\n  type: ClusterIP"
                )
            ),
            &["spec.loadBalancerClass", "not supported"],
        ),
        (
            "target.yaml",
            format!(
                "{good_ns}{}",
                WEB_V1.replace("targetPort: http", "targetPort: metrics")
            ),
            &[
                "spec.ports[0].targetPort",
                "no job matching the selector app=web has a TCP port named \"metrics\"",
            ],
        ),
    ] {
        let f = write(dir.path(), name, &body);
        for verb in ["apply", "create"] {
            refused(&c.skyctl(&[verb, "-f", &f]), 2, needles);
        }
    }
    // Nothing was written: not the valid namespace before the bad document.
    refused(&c.skyctl(&["get", "ns", "shop"]), 1, &["not found"]);
    assert_eq!(json(&c, &["get", "svc", "-A"]), list_before);
    // A directory is read in name order; one bad file stops them all.
    let only = tempfile::tempdir().unwrap();
    write(
        only.path(),
        "a.yaml",
        "kind: Namespace\nmetadata: {name: shop}\n",
    );
    write(
        only.path(),
        "b.json",
        r#"{"kind": "Service", "metadata": {"name": "x"}, "spec": {"ports": [{"port": 0}]}}"#,
    );
    refused(
        &c.skyctl(&["apply", "-f", only.path().to_str().unwrap()]),
        2,
        &["b.json#1 (service/x)", "spec.ports[0].port"],
    );
    refused(&c.skyctl(&["get", "ns", "shop"]), 1, &["not found"]);
}

/// An EDITOR script: the first run breaks the port (0), the run after the
/// error fixes it (8088); each run's file is kept for the test to read.
const EDITOR: &str = r#"#!/bin/sh
n=$(ls "$LOG" | wc -l)
cp "$1" "$LOG/run-$n.yaml"
if grep -q '^# invalid' "$1"; then
  sed -i 's/- name: http$/- name: web/; s/port: 0$/port: 8088/' "$1"
else
  sed -i 's/^    port: 80$/    port: 0/' "$1"
fi
"#;

#[test]
fn edit_reopens_on_errors_and_writes_only_valid_edits() {
    let c = coordinator_with_jobs();
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "web.yaml", WEB_V1);
    ok(&c.skyctl(&["apply", "-f", &v1]));
    let vip = json(&c, &["get", "svc", "web"])["status"]["cluster_ip"].clone();

    // Saved unchanged: nothing written.
    let out = skyctl_with(&c, &[("EDITOR", "true")], "", &["edit", "svc", "web"]);
    assert_eq!(ok(&out), "Edit cancelled, no changes made.\n");

    let script = write(dir.path(), "editor.sh", EDITOR);
    Command::new("chmod")
        .args(["+x", &script])
        .status()
        .unwrap();
    let log = dir.path().join("runs");
    std::fs::create_dir(&log).unwrap();
    let out = skyctl_with(
        &c,
        &[("EDITOR", &script), ("LOG", log.to_str().unwrap())],
        "",
        &["edit", "service", "web"],
    );
    assert_eq!(ok(&out), "service/web edited\n");
    let second = std::fs::read_to_string(log.join("run-1.yaml")).unwrap();
    assert!(
        second.contains("# invalid spec.ports[0].port: 0 is not a port number"),
        "the editor reopened with the error on top:\n{second}"
    );
    assert!(!log.join("run-2.yaml").exists(), "two runs only");
    let svc = json(&c, &["get", "svc", "web"]);
    assert_eq!(svc["spec"]["ports"][0]["port"], 8088);
    assert_eq!(svc["spec"]["ports"][0]["name"], "web");
    assert_eq!(svc["status"]["cluster_ip"], vip);

    // An editor that keeps an invalid edit: refused, nothing written.
    let keep_bad = write(
        dir.path(),
        "bad.sh",
        "#!/bin/sh\nsed -i 's/^    port: 8088$/    port: 0/' \"$1\"\n",
    );
    Command::new("chmod")
        .args(["+x", &keep_bad])
        .status()
        .unwrap();
    let out = skyctl_with(&c, &[("EDITOR", &keep_bad)], "", &["edit", "svc", "web"]);
    refused(&out, 1, &["edit cancelled", "spec.ports[0].port"]);
    assert_eq!(json(&c, &["get", "svc", "web"]), svc);

    // Someone else writes while the editor is open: the update conflicts,
    // the editor reopens on the latest version with the error on top, and
    // the edit made again there is written over the other change.
    ok(&c.skyctl(&["apply", "-f", &v1]));
    let other = write(
        dir.path(),
        "other.yaml",
        &WEB_V1.replace(
            "    app: web\n  annotations",
            "    app: web\n    tier: front\n  annotations",
        ),
    );
    let racing = write(
        dir.path(),
        "racing.sh",
        &format!(
            "#!/bin/sh\nn=$(ls \"$LOG\" | wc -l)\ncp \"$1\" \"$LOG/race-$n.yaml\"\n\
             sed -i 's/^    port: 80$/    port: 8090/' \"$1\"\n\
             if [ \"$n\" = 0 ]; then \"$SKYCTL_BIN\" apply -f {other} >/dev/null; fi\n"
        ),
    );
    Command::new("chmod")
        .args(["+x", &racing])
        .status()
        .unwrap();
    let race_log = dir.path().join("race");
    std::fs::create_dir(&race_log).unwrap();
    let bin = bin_path("skyctl");
    let out = skyctl_with(
        &c,
        &[
            ("EDITOR", &racing),
            ("LOG", race_log.to_str().unwrap()),
            ("SKYCTL_BIN", bin.to_str().unwrap()),
        ],
        "",
        &["edit", "svc", "web"],
    );
    assert_eq!(ok(&out), "service/web edited\n");
    let reopened = std::fs::read_to_string(race_log.join("race-1.yaml")).unwrap();
    assert!(
        reopened.contains("# conflict: service \"web\" was modified")
            && reopened.contains("tier: front")
            && reopened.contains("# Your edit, not saved"),
        "reopened on the latest version with the conflict on top:\n{reopened}"
    );
    let svc = json(&c, &["get", "svc", "web"]);
    assert_eq!(
        svc["metadata"]["labels"]["tier"], "front",
        "the other writer's change stays"
    );
    assert_eq!(svc["spec"]["ports"][0]["port"], 8090, "the edit is written");

    // describe: the spec, the VIP, the selected jobs.
    let d = ok(&c.skyctl(&["describe", "svc", "web"]));
    assert!(
        d.contains(&format!("VIP:               {}", vip.as_str().unwrap())),
        "{d}"
    );
    assert!(d.contains("web-1") && d.contains("web-2"), "{d}");
    let d = ok(&c.skyctl(&["describe", "job", "web-1"]));
    assert!(d.contains("Services:\n  web (app=web)"), "{d}");
    let d = ok(&c.skyctl(&["describe", "cluster", "c1"]));
    assert!(d.contains("Status:            Pending"), "{d}");
    refused(
        &c.skyctl(&["describe", "svc", "nope"]),
        1,
        &["service \"nope\" not found"],
    );
}

/// Connects to `dst` from cluster 1's first app host and reads the
/// replica's name.
fn name_at(mesh: &Mesh, dst: SocketAddr) -> std::io::Result<String> {
    name_from(mesh, 1, dst)
}

/// Whether a connection to `dst` from cluster 1 is refused at once (RST):
/// a port without replicas must not hang.
fn refused_at(mesh: &Mesh, dst: SocketAddr) -> bool {
    name_at(mesh, dst).is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

/// [`name_at`] from cluster `c`'s first app host.
fn name_from(mesh: &Mesh, c: usize, dst: SocketAddr) -> std::io::Result<String> {
    // Short: a replica answers at once, and a hung attempt must not eat a
    // 1 s budget.
    mesh.topo
        .app(c, 1)
        .run_in(move || ask_name(dst, Duration::from_millis(300)))
        .unwrap()
}

/// The SRV answer for `name` from cluster `c`'s gateway DNS (`dig +short`).
fn srv(mesh: &Mesh, c: usize, name: &str) -> String {
    let server = format!("@{}", mesh.topo.gateway_lan_ip(c));
    let out = mesh
        .topo
        .app(c, 1)
        .exec(&["dig", &server, "+time=1", "+tries=1", "+short", name, "SRV"]);
    text(&out.stdout)
}

#[test]
fn applied_port_changes_reach_the_mesh_within_a_second() {
    let mesh = Mesh::start(3, 1).unwrap();
    let mut replicas = Vec::new();
    for c in 1..=3 {
        let ip = mesh.topo.app_ip(c, 1);
        let name = format!("web-{c}-1");
        replicas.push(Replica::start(mesh.topo.app(c, 1), ip, &name));
        std::fs::write(
            mesh.jobs_file(c),
            job_entry(
                &name,
                ip,
                &[&format!("http:{TCP_PORT}"), &format!("dns:{UDP_PORT}/UDP")],
            ),
        )
        .unwrap();
    }
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    // targetPort: http is resolved against the registered jobs.
    assert!(wait_until(Duration::from_secs(15), || {
        mesh.sky(&["get", "jobs"])
            .unwrap_or_default()
            .matches("web-")
            .count()
            == 3
    }));
    let dir = mesh.topo.subdir("manifests").unwrap();
    let v1 = write(&dir, "web.yaml", WEB_V1);
    assert_eq!(
        mesh.sky(&["apply", "-f", &v1]).unwrap(),
        "service/web created\n"
    );
    assert!(
        mesh.wait_for_ready("web", 3, Duration::from_secs(15)),
        "{}",
        mesh.sky(&["get", "endpoints", "web", "-o", "wide"])
            .unwrap()
    );
    let vip = mesh.service_vip("web").unwrap();

    // describe shows the endpoints of the three clusters.
    let d = mesh.sky(&["describe", "service", "web"]).unwrap();
    for c in 1..=3 {
        let cluster = mesh.topo.cluster_name(c);
        assert!(d.contains(&format!("  {cluster}: 1 ready of 1")), "{d}");
        assert!(d.contains(&format!("web-{c}-1")), "{d}");
    }

    assert!(
        wait_until(Duration::from_secs(5), || name_at(
            &mesh,
            SocketAddr::from((vip, 80))
        )
        .is_ok()),
        "VIP port 80 answers"
    );
    refused(
        &mesh.skyctl(&[
            "apply",
            "-f",
            &write(&dir, "bad.yaml", &WEB_V1.replace("port: 80", "port: 0")),
        ]),
        2,
        &["spec.ports[0].port"],
    );
    // An established flow, to check that the update does not cut it.
    let (mut long, mut long_r) = mesh
        .topo
        .app(1, 1)
        .run_in(move || {
            let s =
                TcpStream::connect_timeout(&SocketAddr::from((vip, 80)), Duration::from_secs(2))
                    .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            (s, r)
        })
        .unwrap();
    assert!(
        refused_at(&mesh, SocketAddr::from((vip, 8081))),
        "port 8081 is not defined yet"
    );

    let v2 = write(&dir, "web-v2.yaml", &web_v2());
    assert_eq!(
        mesh.sky(&["apply", "-f", &v2]).unwrap(),
        "service/web configured\n"
    );
    let applied = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || name_at(
            &mesh,
            SocketAddr::from((vip, 8081))
        )
        .is_ok_and(|n| n.starts_with("web-"))),
        "the new port answers within 1 s of the apply"
    );
    eprintln!("new port answered {:?} after the apply", applied.elapsed());
    // Every gateway's balancer and DNS have it within that second.
    for c in 1..=3 {
        assert!(
            name_from(&mesh, c, SocketAddr::from((vip, 8081))).is_ok(),
            "cluster {c} reaches the new port"
        );
    }
    assert!(
        wait_until(
            Duration::from_secs(1).saturating_sub(applied.elapsed()),
            || { (1..=3).all(|c| srv(&mesh, c, "_alt._tcp.web.default.svc").contains(" 8081 ")) }
        ),
        "SRV of the new named port in every cluster's DNS within 1 s: {:?}",
        (1..=3)
            .map(|c| srv(&mesh, c, "_alt._tcp.web.default.svc"))
            .collect::<Vec<_>>()
    );
    eprintln!(
        "every cluster's DNS had the new port {:?} after the apply",
        applied.elapsed()
    );
    assert_eq!(mesh.service_vip("web").unwrap(), vip, "the VIP is kept");
    long.write_all(b"still there?\n").unwrap();
    let mut line = String::new();
    long_r.read_line(&mut line).unwrap();
    assert_eq!(
        line, "still there?\n",
        "the established flow survives the update"
    );

    // Events: the service's own in describe; `get events --watch` sees a
    // job go not ready when its listener stops.
    let d = mesh.sky(&["describe", "service", "web"]).unwrap();
    for reason in ["Created", "VipAllocated", "Updated", "EndpointsChanged"] {
        assert!(d.contains(reason), "{reason} in describe:\n{d}");
    }
    let (watch_out, watch_err) = (dir.join("events.out"), dir.join("events.err"));
    let watch = mesh
        .spawn_skyctl(&["get", "events", "--watch"], &watch_out, &watch_err)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_to_string(
            &watch_out
        )
        .unwrap_or_default()
        .contains("LAST SEEN")),
        "the watch printed its table"
    );
    replicas[1].stop();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let out = std::fs::read_to_string(&watch_out).unwrap_or_default();
            out.lines().any(|l| {
                l.contains("Warning") && l.contains("NotReady") && l.contains("job/web-2-1")
            })
        }),
        "get events --watch saw web-2-1 go not ready:\n{}\n{}",
        std::fs::read_to_string(&watch_out).unwrap_or_default(),
        std::fs::read_to_string(&watch_err).unwrap_or_default()
    );
    watch.kill();

    // Removing the port again: it stops answering.
    assert_eq!(
        mesh.sky(&["apply", "-f", &v1]).unwrap(),
        "service/web configured\n"
    );
    assert!(
        wait_until(Duration::from_secs(1), || refused_at(
            &mesh,
            SocketAddr::from((vip, 8081))
        )),
        "a removed port stops answering within 1 s"
    );
    assert!(wait_until(Duration::from_secs(3), || name_at(
        &mesh,
        SocketAddr::from((vip, 80))
    )
    .is_ok()));

    // A selector that picks nothing: the VIP refuses at once, within 1 s;
    // back to app=web: it answers again.
    let none = write(
        &dir,
        "web-none.yaml",
        &WEB_V1
            .replace("  selector:\n    app: web", "  selector:\n    app: none")
            // A port name resolves only against selected jobs.
            .replace("targetPort: http", "targetPort: 8080"),
    );
    assert_eq!(
        mesh.sky(&["apply", "-f", &none]).unwrap(),
        "service/web configured\n"
    );
    let applied = Instant::now();
    assert!(
        wait_until(Duration::from_secs(1), || refused_at(
            &mesh,
            SocketAddr::from((vip, 80))
        )),
        "a selector change reaches the balancer within 1 s"
    );
    eprintln!(
        "selector change took effect {:?} after the apply",
        applied.elapsed()
    );
    assert_eq!(
        mesh.sky(&["apply", "-f", &v1]).unwrap(),
        "service/web configured\n"
    );
    assert!(wait_until(Duration::from_secs(1), || name_at(
        &mesh,
        SocketAddr::from((vip, 80))
    )
    .is_ok()));
    drop(replicas);
}

/// Events of the coordinator alone: an object's life, and a refused join
/// (recorded once per cluster per 10 s, and only for clusters that exist).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_object_changes_and_refused_joins() {
    let c = coordinator_with_jobs();
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "web.yaml", WEB_V1);
    ok(&c.skyctl(&["apply", "-f", &v1]));
    let mut gw = c.gateway("skyjoin_not-a-token").await.unwrap();
    for cluster in ["c1", "c1", "nope"] {
        let refused = gw
            .join(skymesh_proto::v1::JoinRequest {
                cluster: cluster.into(),
                public_key: base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    [7u8; 32],
                ),
                endpoint: "127.0.0.1:51820".into(),
            })
            .await;
        assert!(refused.is_err());
    }
    ok(&c.skyctl(&["delete", "-f", &v1]));
    let mut seen = String::new();
    assert!(
        wait_until(Duration::from_secs(5), || {
            seen = ok(&c.skyctl(&["get", "events"]));
            seen.contains("service deleted, VIP 100.65.")
        }),
        "{seen}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&ok(&c.skyctl(&["get", "events", "-o", "json"]))).unwrap();
    let items = doc["items"].as_array().unwrap();
    let reasons: Vec<(&str, &str)> = items
        .iter()
        .map(|e| {
            (
                e["reason"].as_str().unwrap(),
                e["object"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    for want in [
        ("Created", "c1"),
        ("Created", "web-1"),
        ("Created", "web"),
        ("VipAllocated", "web"),
        ("Deleted", "web"),
    ] {
        assert!(reasons.contains(&want), "{want:?} in {reasons:?}");
    }
    let refusals: Vec<_> = reasons.iter().filter(|r| r.0 == "JoinRefused").collect();
    assert_eq!(refusals, [&("JoinRefused", "c1")], "{reasons:?}");
    assert!(seen.contains("Warning   JoinRefused"), "{seen}");
}
