//! Several real `coordinator` binaries on one real 3-member etcd cluster
//! (loopback): allocations never collide, any replica sees every write,
//! the controllers move to a survivor when their replica dies, and the
//! coordinators keep serving when an etcd member dies.
//!
//! Needs the `etcd` binary (Debian: `apt-get install etcd-server`); without
//! it every test fails with that hint.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use skymesh_proto::v1::{
    Cluster, ClusterSpec, CreateRequest, DeleteRequest, EventType, GetRequest, Job, JobSpec, Kind,
    ListRequest, Object, ObjectMeta, Service, ServicePort, ServiceSpec, UpdateRequest,
    WatchRequest, object::Obj,
};
use skymesh_tests::etcd::{self, EtcdCluster};
use skymesh_tests::{ApiClient, Coordinator};

fn meta(name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        ..Default::default()
    })
}

fn service(name: &str, app: Option<&str>) -> Object {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            selector: app
                .map(|a| [("app".to_string(), a.to_string())].into())
                .unwrap_or_default(),
            ports: vec![ServicePort {
                port: 80,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
    .into()
}

fn job(name: &str, cluster: &str, ip: &str, app: &str) -> Object {
    let mut j: Object = Job {
        metadata: meta(name),
        spec: Some(JobSpec {
            cluster: cluster.into(),
            ip: ip.into(),
            ports: vec![],
            probe: None,
        }),
        status: None,
    }
    .into();
    j.meta_mut()
        .unwrap()
        .labels
        .insert("app".into(), app.into());
    j
}

fn vip(o: &Object) -> String {
    match &o.obj {
        Some(Obj::Service(s)) => s.status.as_ref().unwrap().cluster_ip.clone(),
        _ => panic!("not a service"),
    }
}

async fn create(api: &mut ApiClient, o: Object) -> Result<Object, tonic::Status> {
    api.create(CreateRequest { object: Some(o) })
        .await
        .map(|r| r.into_inner().object.unwrap())
}

async fn list(api: &mut ApiClient, kind: Kind) -> Result<(Vec<Object>, u64), tonic::Status> {
    api.list(ListRequest {
        kind: kind as i32,
        all_namespaces: true,
        ..Default::default()
    })
    .await
    .map(|r| {
        let r = r.into_inner();
        (r.objects, r.resource_version)
    })
}

/// A 3-member etcd cluster and two coordinators on it sharing one admin
/// token.
fn two_coordinators() -> (EtcdCluster, Coordinator, Coordinator) {
    let cluster = etcd::cluster(3).unwrap();
    let a = etcd::coordinator(&cluster, None, &[]).unwrap();
    let b = etcd::coordinator(&cluster, Some(&a), &[]).unwrap();
    assert_eq!(a.token(), b.token(), "one admin token for both replicas");
    (cluster, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_services_through_two_coordinators_get_distinct_vips() {
    let (_cluster, a, b) = two_coordinators();
    let apis = [a.api().await.unwrap(), b.api().await.unwrap()];
    let started = Instant::now();
    let created: Vec<(String, Result<Object, tonic::Status>)> = futures::stream::iter(0..500)
        .map(|i| {
            let mut api = apis[i % 2].clone();
            async move {
                let name = format!("svc-{i}");
                let r = create(&mut api, service(&name, None)).await;
                (name, r)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let took = started.elapsed();
    let mut vips = BTreeMap::new();
    for (name, r) in created {
        let o = r.unwrap_or_else(|e| panic!("create {name}: {e}"));
        vips.insert(name, vip(&o));
    }
    let distinct: BTreeSet<&String> = vips.values().collect();
    assert_eq!(distinct.len(), 500, "500 services, 500 distinct VIPs");
    for v in &distinct {
        let ip: Ipv4Addr = v.parse().unwrap();
        assert_eq!(
            ip.octets()[..2],
            [100, 65],
            "{v} in the default service CIDR"
        );
    }
    // Both replicas list the same 500 services with the same VIPs.
    for api in &apis {
        let (objs, _) = list(&mut api.clone(), Kind::Service).await.unwrap();
        let listed: BTreeMap<String, String> = objs
            .iter()
            .map(|o| (o.name().to_string(), vip(o)))
            .collect();
        assert_eq!(listed, vips);
    }
    eprintln!("500 services through two coordinators on etcd in {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_on_one_coordinator_sees_writes_through_the_other() {
    let (_cluster, a, b) = two_coordinators();
    let mut api_a = a.api().await.unwrap();
    let mut api_b = b.api().await.unwrap();
    let (_, rv) = list(&mut api_a, Kind::Service).await.unwrap();
    let mut watch = api_a
        .watch(WatchRequest {
            kind: Kind::Service as i32,
            namespace: "default".into(),
            resource_version: rv,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let created = create(&mut api_b, service("w1", None)).await.unwrap();
    let mut changed = created.clone();
    if let Some(Obj::Service(s)) = changed.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].target_port = 9090;
    }
    let updated = api_b
        .update(UpdateRequest {
            object: Some(changed),
        })
        .await
        .unwrap()
        .into_inner();
    api_b
        .delete(DeleteRequest {
            kind: Kind::Service as i32,
            namespace: "default".into(),
            name: "w1".into(),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 3 {
        let resp = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("the watch on A delivers within 10 s")
            .unwrap()
            .unwrap();
        for e in resp.events {
            let o = e.object.unwrap();
            seen.push((e.r#type, o.name().to_string(), o.resource_version()));
        }
    }
    assert_eq!(seen[0].0, EventType::Added as i32);
    assert_eq!(seen[1].0, EventType::Modified as i32);
    assert_eq!(seen[2].0, EventType::Deleted as i32);
    assert!(seen.iter().all(|s| s.1 == "w1"));
    assert_eq!(seen[0].2, created.resource_version());
    assert_eq!(seen[1].2, updated.resource_version());
    assert!(seen[2].2 > seen[1].2);
}

/// Waits until the Endpoints of `name` list `ip`; how long it took.
async fn wait_for_endpoint(api: &mut ApiClient, name: &str, ip: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = api
            .get(GetRequest {
                kind: Kind::Endpoints as i32,
                namespace: "default".into(),
                name: name.into(),
            })
            .await;
        if let Ok(r) = got
            && let Some(Obj::Endpoints(e)) = r.into_inner().obj
            && e.status
                .iter()
                .flat_map(|s| &s.clusters)
                .any(|c| c.addresses.iter().any(|a| a.ip == ip))
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "Endpoints {name} did not list {ip} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The controller leader, waiting up to 10 s for one to be elected.
async fn leader(cluster: &EtcdCluster) -> String {
    let started = Instant::now();
    loop {
        if let Some(l) = etcd::controller_leader(cluster).await.unwrap() {
            return l;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no controller leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controllers_move_to_the_survivor_when_their_coordinator_is_killed() {
    let (cluster, a, b) = two_coordinators();
    let first = leader(&cluster).await;
    let (mut dead, survivor) = if first == etcd::addr(&a) {
        (a, b)
    } else {
        assert_eq!(first, etcd::addr(&b), "the leader is one of the two");
        (b, a)
    };
    assert!(
        survivor
            .log()
            .contains("another coordinator leads the controllers"),
        "the other replica stands by:\n{}",
        survivor.log()
    );
    let mut api = survivor.api().await.unwrap();
    let east = Cluster {
        metadata: meta("east"),
        spec: Some(ClusterSpec {
            workload_cidrs: vec!["10.1.0.0/16".into()],
        }),
        status: None,
    };
    create(&mut api, east.into()).await.unwrap();
    // The leader's controllers work (through the survivor's API).
    create(&mut api, service("before", Some("before")))
        .await
        .unwrap();
    create(&mut api, job("before-1", "east", "10.1.0.4", "before"))
        .await
        .unwrap();
    wait_for_endpoint(&mut api, "before", "10.1.0.4", Duration::from_secs(10)).await;

    dead.kill9();
    let killed = Instant::now();
    create(&mut api, service("web", Some("web"))).await.unwrap();
    create(&mut api, job("web-1", "east", "10.1.0.5", "web"))
        .await
        .unwrap();
    wait_for_endpoint(&mut api, "web", "10.1.0.5", Duration::from_secs(10)).await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "takeover took {takeover:?}"
    );
    assert_eq!(leader(&cluster).await, etcd::addr(&survivor));
    assert!(
        survivor
            .log()
            .contains("this coordinator now leads the controllers"),
        "{}",
        survivor.log()
    );
    eprintln!("controllers taken over {takeover:?} after the leader was killed");
}

/// A leader stopped cleanly (SIGTERM) revokes its lease: the other replica
/// takes over at once instead of waiting for the lease to expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cleanly_stopped_leader_hands_over_at_once() {
    let (cluster, a, b) = two_coordinators();
    leader(&cluster).await;
    let record = etcd::controller_leader_record(&cluster)
        .await
        .unwrap()
        .unwrap();
    let pid: i32 = record
        .split_whitespace()
        .skip_while(|w| *w != "pid")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {record:?}"));
    let survivor = if record.starts_with(&etcd::addr(&a)) {
        etcd::addr(&b)
    } else {
        etcd::addr(&a)
    };
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let stopped = Instant::now();
    loop {
        if etcd::controller_leader(&cluster).await.unwrap().as_deref() == Some(survivor.as_str()) {
            break;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(3),
            "no hand-over within 3 s of a clean stop (the lease TTL is 5 s)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("clean hand-over in {:?}", stopped.elapsed());
}

/// A coordinator whose token file holds another token than the one the
/// shared store has refuses to start, saying how to fix it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_coordinator_needs_the_shared_admin_token() {
    let cluster = etcd::cluster(3).unwrap();
    let a = etcd::coordinator(&cluster, None, &[]).unwrap();
    let err = match etcd::coordinator(&cluster, None, &[]) {
        Ok(_) => panic!("a replica without the shared token must not start"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("already has an admin token"), "{err}");
    assert!(err.contains("--admin-token-file"), "{err}");
    // With the token it starts, and accepts it.
    let b = etcd::coordinator(&cluster, Some(&a), &[]).unwrap();
    let (objs, _) = list(&mut b.api().await.unwrap(), Kind::Namespace)
        .await
        .unwrap();
    assert!(objs.iter().any(|o| o.name() == "default"));
}

/// Writes through both coordinators and reads through the other; all must
/// succeed. Returns the names created.
async fn exercise(apis: &mut [ApiClient; 2], tag: &str, n: usize) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..n {
        let name = format!("{tag}-{i}");
        let o = create(&mut apis[i % 2], service(&name, None))
            .await
            .unwrap_or_else(|e| panic!("create {name} through {}: {e}", i % 2));
        let got = apis[(i + 1) % 2]
            .get(GetRequest {
                kind: Kind::Service as i32,
                namespace: "default".into(),
                name: name.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("get {name}: {e}"))
            .into_inner();
        assert_eq!(vip(&got), vip(&o));
        names.push(name);
    }
    for api in apis.iter_mut() {
        list(api, Kind::Service).await.unwrap();
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_keep_serving_when_an_etcd_member_dies() {
    let (mut cluster, a, b) = two_coordinators();
    let mut apis = [a.api().await.unwrap(), b.api().await.unwrap()];
    let (_, rv) = list(&mut apis[0], Kind::Service).await.unwrap();
    let mut watch = apis[0]
        .clone()
        .watch(WatchRequest {
            kind: Kind::Service as i32,
            namespace: "default".into(),
            resource_version: rv,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut expected = exercise(&mut apis, "warmup", 10).await;

    // A follower dies: no request may fail.
    let raft_leader = etcd::raft_leader(&cluster).await.unwrap();
    let follower = (raft_leader + 1) % 3;
    cluster.kill(follower);
    expected.extend(exercise(&mut apis, "no-follower", 40).await);
    cluster.restart(follower).unwrap();

    // The raft leader dies: once etcd has elected another (about a second),
    // everything works again.
    let raft_leader = etcd::raft_leader(&cluster).await.unwrap();
    cluster.kill(raft_leader);
    let killed = Instant::now();
    for (i, api) in apis.iter_mut().enumerate() {
        let name = format!("recovery-{i}");
        loop {
            match create(api, service(&name, None)).await {
                Ok(_) => break,
                Err(e) if e.code() == tonic::Code::AlreadyExists => break,
                Err(e) => {
                    assert!(
                        killed.elapsed() < Duration::from_secs(15),
                        "coordinator {i} still failing 15 s after the etcd leader died: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        expected.push(name);
    }
    let recovered = killed.elapsed();
    expected.extend(exercise(&mut apis, "no-leader", 40).await);
    eprintln!("writes succeeded again {recovered:?} after the etcd leader was killed");

    // The watch on A saw every service exactly once, across both losses.
    let mut seen = Vec::new();
    while seen.len() < expected.len() {
        let resp = tokio::time::timeout(Duration::from_secs(30), watch.next())
            .await
            .expect("the watch on A keeps delivering")
            .expect("the watch stays open")
            .expect("the watch yields events");
        for e in resp.events {
            assert_eq!(e.r#type, EventType::Added as i32);
            seen.push(e.object.unwrap().name().to_string());
        }
    }
    let seen_set: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen_set.len(), seen.len(), "no event twice");
    assert_eq!(seen_set, expected.iter().collect::<BTreeSet<_>>());
}

#[test]
fn skyctl_fails_over_between_coordinator_replicas() {
    let (_etcd, mut a, b) = two_coordinators();
    let both = format!("{},{}", a.url(), b.url());
    let token = a.token();
    let ca = a.ca_file();
    let run = |args: &[&str]| skymesh_tests::skyctl(&both, &token, &ca, args);
    let out = run(&["create", "service", "web", "-p", "80:8080"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    a.kill9();
    let out = run(&["create", "service", "api", "-p", "80:8080"]);
    assert!(
        out.status.success(),
        "with replica A dead: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run(&["get", "services"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("web") && text.contains("api"), "{text}");
    drop(b);
    let out = run(&["get", "services"]);
    assert_eq!(out.status.code(), Some(1), "no replica left");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

/// Writes a CA, an etcd member certificate (127.0.0.1; server and client
/// auth, for clients and peers) and a client certificate into `dir`.
fn etcd_certs(
    dir: &std::path::Path,
) -> (
    skymesh_store::etcd::testcluster::TlsFiles,
    std::path::PathBuf,
    std::path::PathBuf,
) {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |names: Vec<String>, ekus: Vec<Eku>, name: &str| {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names).unwrap();
        p.extended_key_usages = ekus;
        let cert = p.signed_by(&key, &issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let (member, member_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        vec![Eku::ServerAuth, Eku::ClientAuth],
        "member",
    );
    let (client, client_key) = issue(
        vec!["skymesh-coordinator".into()],
        vec![Eku::ClientAuth],
        "client",
    );
    let ca_file = dir.join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (
        skymesh_store::etcd::testcluster::TlsFiles {
            ca: ca_file,
            cert: member,
            key: member_key,
        },
        client,
        client_key,
    )
}

/// SPEC §3: the etcd backend over TLS with client certificates. Two
/// coordinators on a 3-member etcd that speaks only TLS (clients and peers)
/// and requires client certificates share one mesh (and one mesh CA);
/// etcd refuses a client without a certificate and plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinators_share_an_etcd_that_requires_tls_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let (files, client, client_key) = etcd_certs(dir.path());
    let cluster = EtcdCluster::start_tls(3, files.clone()).unwrap();
    assert!(
        cluster
            .endpoints()
            .iter()
            .all(|e| e.starts_with("https://"))
    );
    let tls_args = [
        "--etcd-ca",
        files.ca.to_str().unwrap(),
        "--etcd-cert",
        client.to_str().unwrap(),
        "--etcd-key",
        client_key.to_str().unwrap(),
    ];
    let a = etcd::coordinator(&cluster, None, &tls_args).unwrap();
    let b = etcd::coordinator(&cluster, Some(&a), &tls_args).unwrap();
    assert_eq!(
        std::fs::read(a.ca_file()).unwrap(),
        std::fs::read(b.ca_file()).unwrap(),
        "replicas present one mesh CA"
    );
    let out = a.skyctl(&["create", "service", "web", "-p", "80:8080"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let through_a =
        String::from_utf8_lossy(&a.skyctl(&["get", "service", "web", "-o", "json"]).stdout)
            .into_owned();
    let through_b =
        String::from_utf8_lossy(&b.skyctl(&["get", "service", "web", "-o", "json"]).stdout)
            .into_owned();
    assert!(through_a.contains("100.65."), "{through_a}");
    assert_eq!(through_a, through_b, "both replicas serve the one mesh");

    // Without a client certificate, and in plaintext: refused.
    let ca_pem = std::fs::read(&files.ca).unwrap();
    let no_cert = skymesh_store::etcd::EtcdStore::connect_with(
        &cluster.endpoints(),
        etcd::PREFIX,
        Some(skymesh_store::etcd::EtcdTls {
            ca_pem,
            identity: None,
        }),
    )
    .await;
    assert!(
        no_cert.is_err(),
        "etcd accepted a client without a certificate"
    );
    let plain: Vec<String> = cluster
        .endpoints()
        .iter()
        .map(|e| e.replace("https://", "http://"))
        .collect();
    assert!(
        skymesh_store::etcd::EtcdStore::connect(&plain, etcd::PREFIX)
            .await
            .is_err(),
        "etcd spoke plaintext"
    );
}
