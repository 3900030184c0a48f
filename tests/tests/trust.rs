//! The trust model end to end (SPEC §3 "TLS everywhere"): what crosses the
//! WAN, what a coordinator impostor learns, and when plaintext is allowed.
//! Real coordinator, skyctl and meshd binaries; real tcpdump and wg.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use skymesh_tests::mesh::{Mesh, write_private};
use skymesh_tests::netns::{Topology, wait_until};
use skymesh_tests::{Coordinator, bin_path};

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The SHA-256 fingerprint (`sha256:<hex>`) of the first certificate in a
/// PEM file.
fn fingerprint(ca: &std::path::Path) -> String {
    match skymesh_proto::tls::Trust::from_ca_file(ca).unwrap() {
        skymesh_proto::tls::Trust::Ca(certs) => {
            skymesh_proto::tls::Fingerprint::of(&certs[0]).to_string()
        }
        skymesh_proto::tls::Trust::Fingerprint(f) => f.to_string(),
    }
}

/// Everything on the WAN while three gateways join and stream their
/// netmaps and skyctl creates and lists objects: no token, credential or
/// pre-shared key (base64 or raw) and no plaintext HTTP/2.
#[test]
fn the_wan_carries_no_secret_in_the_clear() {
    skymesh_tests::netns::require_root().unwrap();
    let topo = Topology::new(3, 1).unwrap();
    let pcap = topo.dir().join("wan.pcap");
    let capture = topo
        .wan()
        .capture("any", &[], &pcap, &topo.dir().join("tcpdump.log"))
        .unwrap();
    let mesh = Mesh::start_in(topo).unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    mesh.sky(&["create", "namespace", "shop"]).unwrap();
    mesh.sky(&[
        "create", "service", "web", "-n", "shop", "-s", "app=web", "-p", "80:8080",
    ])
    .unwrap();
    mesh.sky(&[
        "create",
        "job",
        "web-1",
        "-n",
        "shop",
        "--cluster",
        "c1",
        "--ip",
        "10.1.0.11",
        "-l",
        "app=web",
        "--port",
        "8080",
    ])
    .unwrap();
    for kind in ["services", "endpoints", "clusters", "jobs", "tunnels"] {
        mesh.sky(&["get", kind, "-A"]).unwrap();
    }
    // At least one status report from every gateway (every 5 s).
    std::thread::sleep(Duration::from_secs(6));
    capture.terminate(Duration::from_secs(5));
    let bytes = std::fs::read(&pcap).unwrap();

    // The capture saw the control plane: many packets to and from :7400.
    let read = Command::new("tcpdump")
        .args(["-nn", "-r", pcap.to_str().unwrap(), "tcp port 7400"])
        .output()
        .unwrap();
    let packets = String::from_utf8_lossy(&read.stdout).lines().count();
    assert!(
        packets > 100,
        "only {packets} control-plane packets captured"
    );

    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    let dir = mesh.topo.dir();
    let admin = std::fs::read_to_string(dir.join("coordinator/admin.token")).unwrap();
    secrets.push(("admin token".into(), admin.trim().as_bytes().to_vec()));
    for i in 1..=3 {
        let join = std::fs::read_to_string(dir.join(format!("join-token-{i}"))).unwrap();
        let join = join.trim();
        secrets.push((format!("join token {i}"), join.as_bytes().to_vec()));
        // The secret part alone, too (the fingerprint is public).
        let secret = join.split('.').next().unwrap();
        secrets.push((format!("join token {i} secret"), secret.as_bytes().to_vec()));
        let cred = std::fs::read_to_string(mesh.state_dir(i).join("credential")).unwrap();
        secrets.push((format!("credential {i}"), cred.trim().as_bytes().to_vec()));
        let psks = mesh.wg(i, &["preshared-keys"]).unwrap();
        let mut n = 0;
        for line in psks.lines() {
            let psk = line.split_whitespace().nth(1).unwrap();
            let raw = base64::engine::general_purpose::STANDARD
                .decode(psk)
                .unwrap();
            assert_eq!(raw.len(), 32);
            secrets.push((
                format!("PSK of cluster {i} (base64)"),
                psk.as_bytes().to_vec(),
            ));
            secrets.push((format!("PSK of cluster {i} (raw)"), raw));
            n += 1;
        }
        assert_eq!(n, 2, "cluster {i} has a PSK per peer: {psks}");
    }
    for prefix in ["skyadm_", "skyjoin_", "skygw_", "PRI * HTTP/2.0"] {
        secrets.push((format!("{prefix:?}"), prefix.as_bytes().to_vec()));
    }
    for (what, s) in &secrets {
        assert!(
            !contains(&bytes, s),
            "the {what} crossed the WAN in the clear"
        );
    }
    drop(capture);
}

/// Another coordinator with another CA at the real one's address: skyctl
/// and meshd (pinned, and joining for the first time) refuse it during the
/// TLS handshake, naming the fingerprint they expected, and it receives no
/// request. The gateways keep forwarding with their last netmap.
#[test]
fn an_impostor_coordinator_is_refused_and_told_nothing() {
    skymesh_tests::netns::require_root().unwrap();
    let mut mesh = Mesh::start(2, 1).unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(20)));
    let out = mesh
        .sky(&["create", "cluster", "c3", "--workload-cidr", "10.3.0.0/16"])
        .unwrap();
    let token = out
        .split_whitespace()
        .find(|w| w.starts_with("skyjoin_"))
        .unwrap()
        .to_string();
    let real_ca = mesh.topo.dir().join("coordinator/ca.crt");
    let expected = fingerprint(&real_ca);

    // The gateways' netmap caches lag the applied netmap by up to 1 s
    // (meshd's CACHE_INTERVAL); a restart below starts from the cache.
    std::thread::sleep(Duration::from_secs(2));
    mesh.stop_coordinator();
    let fake_dir = mesh.topo.dir().join("impostor");
    let listen = mesh.topo.coordinator_addr().to_string();
    let impostor = mesh
        .topo
        .wan()
        .spawn(
            &[
                bin_path("coordinator").to_str().unwrap(),
                "--listen",
                &listen,
                "--data-dir",
                fake_dir.to_str().unwrap(),
            ],
            &mesh.topo.dir().join("impostor.log"),
        )
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || fake_dir
        .join("listen.addr")
        .exists()));
    assert_ne!(fingerprint(&fake_dir.join("ca.crt")), expected);

    // skyctl with the real CA (beside the real admin token).
    let out = mesh.skyctl(&["get", "services"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("not trusted") && err.contains(&expected),
        "{err}"
    );

    // A gateway that pinned the real CA, restarted.
    mesh.stop_meshd(1);
    mesh.start_meshd(1, None).unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || mesh
            .meshd_log(1)
            .contains("refused the coordinator")),
        "{}",
        mesh.meshd_log(1)
    );
    assert!(mesh.meshd_log(1).contains(&expected));
    // Fail-static: the tunnel still carries traffic.
    let c2 = mesh.topo.app_ip(2, 1);
    assert!(wait_until(Duration::from_secs(15), || mesh
        .topo
        .app(1, 1)
        .ping(c2)));

    // A first join with the real coordinator's token.
    let state = mesh.topo.dir().join("meshd-c3");
    let token_file = mesh.topo.dir().join("join-token-c3");
    write_private(&token_file, &token).unwrap();
    let out = mesh.topo.wan().exec(&[
        bin_path("meshd").to_str().unwrap(),
        "--coordinator",
        &mesh.topo.coordinator_url(),
        "--cluster",
        "c3",
        "--join-token-file",
        token_file.to_str().unwrap(),
        "--endpoint",
        "198.51.100.99:51820",
        "--state-dir",
        state.to_str().unwrap(),
        "--interface",
        &mesh.topo.iface_named("x"),
    ]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("refused to join") && err.contains(&expected),
        "{err}"
    );
    assert!(!state.join("credential").exists());
    assert!(!state.join("ca.crt").exists());

    // The impostor saw no request: no token, no join, no stream.
    let log = impostor.log();
    for needle in [
        "rejected",
        "refused join",
        "cluster joined",
        "netmap",
        "credential",
    ] {
        assert!(
            !log.contains(needle),
            "the impostor got a request ({needle}):\n{log}"
        );
    }
}

/// `--insecure-plaintext` only on loopback, and clients speak plaintext
/// only to loopback.
#[test]
fn plaintext_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let out = Command::new(bin_path("coordinator"))
        .args([
            "--listen",
            "0.0.0.0:0",
            "--insecure-plaintext",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--insecure-plaintext"),
        "{}",
        stderr(&out)
    );
    assert!(!data.exists(), "nothing written");

    let c = Coordinator::start_with(&["--insecure-plaintext"]).unwrap();
    assert!(!c.ca_file().exists());
    let url = format!("http://{}", c.addr());
    let plain = |url: &str, args: &[&str]| {
        Command::new(bin_path("skyctl"))
            .args(args)
            .env("SKYCTL_COORDINATOR", url)
            .env("SKYCTL_TOKEN", c.token())
            .env_remove("SKYCTL_CA")
            .output()
            .unwrap()
    };
    let out = plain(&url, &["create", "namespace", "a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // A join token of a plaintext coordinator pins nothing.
    let out = plain(
        &url,
        &["create", "cluster", "c1", "--workload-cidr", "10.1.0.0/16"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("skyjoin_") && !text.contains(".sha256:"),
        "{text}"
    );

    // skyctl refuses plaintext to anything but loopback, before connecting.
    let out = plain("http://198.51.100.1:7400", &["get", "services"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("plaintext"), "{}", stderr(&out));

    // TLS clients of a TLS coordinator: an https URL without a CA is a
    // usage error naming the flag.
    let t = Coordinator::start().unwrap();
    let out = Command::new(bin_path("skyctl"))
        .args(["get", "services", "--coordinator", &t.url()])
        .env("SKYCTL_TOKEN", t.token())
        .env("SKYCTL_TOKEN_FILE", dir.path().join("nowhere/admin.token"))
        .env_remove("SKYCTL_CA")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--ca-file"), "{}", stderr(&out));
}

/// An operator's own certificate chain (`--tls-cert`/`--tls-key`): served,
/// and its CA is what clients pin (copied to `<data-dir>/ca.crt`).
#[test]
fn an_operators_certificate_is_served_and_pinned() {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let chain = dir.path().join("chain.pem");
    std::fs::write(&chain, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
    let key_file = dir.path().join("key.pem");
    std::fs::write(&key_file, key.serialize_pem()).unwrap();

    // A key that others may read is refused, with the fix.
    let out = Command::new(bin_path("coordinator"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&chain)
        .arg("--tls-key")
        .arg(&key_file)
        .arg("--data-dir")
        .arg(dir.path().join("refused"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} has mode 0644: a private key must not be readable or writable by group or others (fix: chmod 600 {})",
            key_file.display(),
            key_file.display()
        )),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();

    let c = Coordinator::start_with(&[
        "--tls-cert",
        chain.to_str().unwrap(),
        "--tls-key",
        key_file.to_str().unwrap(),
    ])
    .unwrap();
    assert_eq!(
        fingerprint(&c.ca_file()),
        skymesh_proto::tls::Fingerprint::of(ca.der()).to_string()
    );
    let out = c.skyctl(&["create", "cluster", "c1", "--workload-cidr", "10.1.0.0/16"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&skymesh_proto::tls::Fingerprint::of(ca.der()).to_string()),
        "the join token pins the operator's CA: {text}"
    );

    // --tls-cert without --tls-key: refused before anything is written.
    let data = dir.path().join("other");
    let out = Command::new(bin_path("coordinator"))
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&chain)
        .arg("--data-dir")
        .arg(&data)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--tls-key"), "{}", stderr(&out));
    assert!(!data.exists());
}

/// Private keys that group or others may read are refused at start, with a
/// line naming the file, its mode and the fix: meshd's WireGuard key, and
/// the coordinator's CA key (`--tls-key` above).
#[test]
fn private_keys_open_to_others_are_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let key = state.join("private.key");
    let b64 = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    std::fs::write(&key, format!("{b64}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin_path("meshd"))
        .args([
            "--coordinator",
            "https://127.0.0.1:9",
            "--cluster",
            "east",
            "--state-dir",
        ])
        .arg(&state)
        .env_remove("MESHD_JOIN_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    let line = format!(
        "{} has mode 0644: a private key must not be readable or writable by group or others (fix: chmod 600 {})",
        key.display(),
        key.display()
    );
    assert!(stderr(&out).contains(&line), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&key).unwrap(),
        format!("{b64}\n"),
        "the key is left alone"
    );

    let mut c = Coordinator::start().unwrap();
    c.kill9();
    let ca_key = c.data_dir().join("ca.key");
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o640)).unwrap();
    let out = Command::new(bin_path("coordinator"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(c.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "{} has mode 0640: a private key must not be readable or writable by group or others (fix: chmod 600 {})",
            ca_key.display(),
            ca_key.display()
        )),
        "{}",
        stderr(&out)
    );
    std::fs::set_permissions(&ca_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    c.restart().unwrap();
}
