//! End-to-end tests of the real `coordinator` binary over gRPC: durability
//! across `kill -9`, watch resume, bad input (SPEC §8), join and netmap.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt as _;
use skymesh_proto::v1::{
    Cluster, ClusterSpec, CreateRequest, DeleteRequest, EventType, GetRequest, Job, JobSpec,
    JoinRequest, Kind, ListRequest, Namespace, NetmapRequest, Object, ObjectMeta, Service,
    ServicePort, ServiceSpec, UpdateRequest, WatchRequest, netmap_change::Change,
    netmap_update::Update, object::Obj,
};
use skymesh_tests::{ApiClient, Coordinator};
use tonic::Code;

fn meta(name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        ..Default::default()
    })
}

fn service(name: &str, port: u32) -> Object {
    Service {
        metadata: meta(name),
        spec: Some(ServiceSpec {
            selector: [("app".to_string(), name.to_string())].into(),
            ports: vec![ServicePort {
                port,
                target_port: 8080,
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
    .into()
}

fn cluster(name: &str, cidr: &str) -> Object {
    Cluster {
        metadata: meta(name),
        spec: Some(ClusterSpec {
            workload_cidrs: vec![cidr.into()],
        }),
        status: None,
    }
    .into()
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

/// The store revision once background controllers have settled (no write
/// for 300 ms): unchanged across a request means it wrote nothing.
async fn revision(api: &mut ApiClient) -> u64 {
    let mut last = current_revision(api).await;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = current_revision(api).await;
        if now == last {
            return now;
        }
        last = now;
    }
}

async fn current_revision(api: &mut ApiClient) -> u64 {
    api.list(ListRequest {
        kind: Kind::Namespace as i32,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .resource_version
}

async fn list(api: &mut ApiClient, kind: Kind) -> Vec<Object> {
    api.list(ListRequest {
        kind: kind as i32,
        all_namespaces: true,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .objects
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let mut coord = Coordinator::start().unwrap();
    let api = coord.api().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // Writer: 200 services as fast as the coordinator acknowledges them.
    let writer = {
        let mut api = api.clone();
        tokio::spawn(async move {
            for i in 0..200 {
                match create(&mut api, service(&format!("svc-{i}"), 80)).await {
                    Ok(o) => {
                        let _ = tx.send(o);
                    }
                    Err(_) => return i,
                }
            }
            200
        })
    };
    // Kill the coordinator in the middle of the stream of writes.
    let mut acked = Vec::new();
    while acked.len() < 60 {
        acked.push(rx.recv().await.expect("writer acknowledged 60 writes"));
    }
    coord.kill9();
    let stopped_at = writer.await.unwrap();
    while let Ok(o) = rx.try_recv() {
        acked.push(o);
    }
    assert!(stopped_at < 200, "the kill interrupted the writes");
    coord.restart().unwrap();
    let mut api = coord.api().await.unwrap();
    let after: BTreeMap<String, Object> = list(&mut api, Kind::Service)
        .await
        .into_iter()
        .map(|o| (o.name().to_string(), o))
        .collect();
    for o in &acked {
        let got = after
            .get(o.name())
            .unwrap_or_else(|| panic!("acknowledged {} lost", o.name()));
        assert_eq!(vip(got), vip(o), "VIP of {} changed", o.name());
        assert_eq!(got.resource_version(), o.resource_version(), "{}", o.name());
    }
    let vips: BTreeSet<_> = after.values().map(vip).collect();
    assert_eq!(vips.len(), after.len(), "VIPs are unique");
    // The coordinator keeps working after the crash; remaining writes land.
    for i in stopped_at..200 {
        let name = format!("svc-{i}");
        match create(&mut api, service(&name, 80)).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::AlreadyExists => {}
            Err(s) => panic!("{name}: {s}"),
        }
    }
    assert_eq!(list(&mut api, Kind::Service).await.len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_with_exactly_the_missed_events() {
    let coord = Coordinator::start().unwrap();
    let mut api = coord.api().await.unwrap();
    let start = revision(&mut api).await;
    let watch = |api: &mut ApiClient, rv: u64| {
        let mut api = api.clone();
        async move {
            api.watch(WatchRequest {
                kind: Kind::Service as i32,
                namespace: "default".into(),
                resource_version: rv,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let mut stream = watch(&mut api, start).await;
    let mut seen: Vec<(i32, String, u64)> = Vec::new();
    create(&mut api, service("a", 80)).await.unwrap();
    create(&mut api, service("b", 80)).await.unwrap();
    while seen.len() < 2 {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for e in r.events {
            seen.push((
                e.r#type,
                e.object.unwrap().name().to_string(),
                r.resource_version,
            ));
        }
    }
    let last = seen.last().unwrap().2;
    drop(stream);
    // While disconnected: modify, delete, create.
    let mut a = api
        .get(GetRequest {
            kind: Kind::Service as i32,
            namespace: String::new(),
            name: "a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    if let Some(Obj::Service(s)) = a.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].port = 81;
    }
    api.update(UpdateRequest { object: Some(a) }).await.unwrap();
    api.delete(DeleteRequest {
        kind: Kind::Service as i32,
        namespace: String::new(),
        name: "b".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    create(&mut api, service("c", 80)).await.unwrap();
    // Noise in another kind must not show up.
    create(
        &mut api,
        Namespace {
            metadata: meta("other"),
        }
        .into(),
    )
    .await
    .unwrap();

    let mut stream = watch(&mut api, last).await;
    let mut missed = Vec::new();
    while missed.len() < 3 {
        let r = tokio::time::timeout(Duration::from_secs(5), stream.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(r.resource_version > last);
        for e in r.events {
            missed.push((e.r#type, e.object.unwrap().name().to_string()));
        }
    }
    assert_eq!(
        missed,
        vec![
            (EventType::Modified as i32, "a".to_string()),
            (EventType::Deleted as i32, "b".to_string()),
            (EventType::Added as i32, "c".to_string()),
        ]
    );
    // Nothing more (no repeats).
    assert!(
        tokio::time::timeout(Duration::from_millis(500), stream.next())
            .await
            .is_err(),
        "no event is delivered twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_nothing_is_written() {
    let coord = Coordinator::start_with(&["--service-cidr", "100.65.0.0/30"]).unwrap();
    let mut api = coord.api().await.unwrap();
    create(&mut api, cluster("east", "10.1.0.0/16"))
        .await
        .unwrap();
    let first = create(&mut api, service("web", 80)).await.unwrap();

    let mut bad_port = service("p0", 80);
    let mut big_port = service("p1", 80);
    let mut bad_selector = service("sel", 80);
    let mut bad_proto = service("proto", 80);
    let mut bad_type = service("ty", 80);
    if let Some(Obj::Service(s)) = bad_port.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].port = 0;
    }
    if let Some(Obj::Service(s)) = big_port.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].target_port = 70000;
    }
    if let Some(Obj::Service(s)) = bad_selector.obj.as_mut() {
        s.spec.as_mut().unwrap().selector = [("a b".to_string(), "x".to_string())].into();
    }
    if let Some(Obj::Service(s)) = bad_proto.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].protocol = 7;
    }
    if let Some(Obj::Service(s)) = bad_type.obj.as_mut() {
        s.spec.as_mut().unwrap().r#type = 42;
    }
    let bad_job: Object = Job {
        metadata: meta("j"),
        spec: Some(JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.999".into(),
            ports: vec![],
            probe: None,
        }),
        status: None,
    }
    .into();
    let cases: Vec<(&str, Object, Code, &str)> = vec![
        (
            "name",
            service("Bad_Name", 80),
            Code::InvalidArgument,
            "metadata.name",
        ),
        (
            "cidr",
            cluster("west", "10.2.0.0/33"),
            Code::InvalidArgument,
            "spec.workload_cidrs[0]",
        ),
        (
            "cidr host bits",
            cluster("west", "10.2.0.1/16"),
            Code::InvalidArgument,
            "did you mean 10.2.0.0/16",
        ),
        ("ip", bad_job, Code::InvalidArgument, "spec.ip"),
        (
            "port 0",
            bad_port,
            Code::InvalidArgument,
            "spec.ports[0].port",
        ),
        (
            "port > 65535",
            big_port,
            Code::InvalidArgument,
            "spec.ports[0].target_port",
        ),
        (
            "selector",
            bad_selector,
            Code::InvalidArgument,
            "spec.selector",
        ),
        (
            "protocol",
            bad_proto,
            Code::InvalidArgument,
            "spec.ports[0].protocol",
        ),
        ("type", bad_type, Code::InvalidArgument, "spec.type"),
        (
            "duplicate",
            service("WEB", 90),
            Code::AlreadyExists,
            "already exists",
        ),
        (
            "overlap",
            cluster("west", "10.1.128.0/17"),
            Code::FailedPrecondition,
            "10.1.0.0/16 of cluster \"east\"",
        ),
        (
            "overlap overlay",
            cluster("west", "100.64.0.0/24"),
            Code::FailedPrecondition,
            "overlay CIDR 100.64.0.0/16",
        ),
        (
            "missing namespace",
            {
                let mut s = service("x", 80);
                s.meta_mut().unwrap().namespace = "nope".into();
                s
            },
            Code::FailedPrecondition,
            "namespace \"nope\" does not exist",
        ),
        (
            "missing cluster",
            {
                let mut s = service("y", 80);
                if let Some(Obj::Service(sv)) = s.obj.as_mut() {
                    sv.spec.as_mut().unwrap().clusters = vec!["nope".into()];
                }
                s
            },
            Code::FailedPrecondition,
            "cluster \"nope\" does not exist",
        ),
    ];
    for (what, obj, code, needle) in cases {
        let before = revision(&mut api).await;
        let err = create(&mut api, obj).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(
            err.message().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            err.message()
        );
        assert!(!err.message().contains('\n'), "{what}: one line");
        assert_eq!(revision(&mut api).await, before, "{what}: nothing written");
    }
    // The duplicate left the original untouched.
    let web = api
        .get(GetRequest {
            kind: Kind::Service as i32,
            namespace: "default".into(),
            name: "web".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(web, first);

    // Stale update: conflict, nothing written.
    let mut fresh = web.clone();
    if let Some(Obj::Service(s)) = fresh.obj.as_mut() {
        s.spec.as_mut().unwrap().ports[0].port = 81;
    }
    let fresh = api
        .update(UpdateRequest {
            object: Some(fresh),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(vip(&fresh), vip(&first), "VIP stable across updates");
    let before = revision(&mut api).await;
    let err = api
        .update(UpdateRequest { object: Some(web) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Aborted, "{}", err.message());
    assert!(err.message().contains("conflict"));
    assert_eq!(revision(&mut api).await, before);

    // VIP pool exhausted: a /30 holds two VIPs.
    create(&mut api, service("second", 80)).await.unwrap();
    let before = revision(&mut api).await;
    let err = create(&mut api, service("third", 80)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.message().contains("100.65.0.0/30"), "{}", err.message());
    assert_eq!(revision(&mut api).await, before);
    // Freed on delete, then reused.
    api.delete(DeleteRequest {
        kind: Kind::Service as i32,
        namespace: String::new(),
        name: "second".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    create(&mut api, service("third", 80)).await.unwrap();

    // Deleting a namespace that holds objects is refused.
    create(
        &mut api,
        Namespace {
            metadata: meta("shop"),
        }
        .into(),
    )
    .await
    .unwrap();
    let mut s = service("cart", 80);
    s.meta_mut().unwrap().namespace = "shop".into();
    if let Err(e) = create(&mut api, s).await {
        // The pool is full again; any object will do.
        assert_eq!(e.code(), Code::ResourceExhausted);
    }
    let mut j: Object = Job {
        metadata: meta("worker"),
        spec: Some(JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.7".into(),
            ports: vec![],
            probe: None,
        }),
        status: None,
    }
    .into();
    j.meta_mut().unwrap().namespace = "shop".into();
    create(&mut api, j).await.unwrap();
    let before = revision(&mut api).await;
    let err = api
        .delete(DeleteRequest {
            kind: Kind::Namespace as i32,
            namespace: String::new(),
            name: "shop".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("not empty"), "{}", err.message());
    assert_eq!(revision(&mut api).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_needs_the_token() {
    let coord = Coordinator::start().unwrap();
    let mut admin = coord.api().await.unwrap();
    let before = revision(&mut admin).await;
    for token in [None, Some("wrong")] {
        let mut api = coord.api_with_token(token).await.unwrap();
        let e = create(&mut api, service("web", 80)).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{token:?}");
        let e = api
            .list(ListRequest {
                kind: Kind::Service as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
        let e = api
            .watch(WatchRequest {
                kind: Kind::Service as i32,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let mut gw = coord.gateway("wrong").await.unwrap();
    let e = gw
        .netmap(NetmapRequest {
            cluster: "default".into(),
            resource_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert_eq!(revision(&mut admin).await, before, "nothing written");
    assert!(
        coord.log().contains("rejected unauthenticated request"),
        "refusals are logged"
    );
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(coord.data_dir().join("admin.token"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let db = std::fs::read(coord.data_dir().join("store.redb")).unwrap();
    let token = coord.token();
    assert!(
        !db.windows(token.len()).any(|w| w == token.as_bytes()),
        "the store holds only the token's hash"
    );
}

fn key(b: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_pins_keys_and_streams_netmaps() {
    let coord = Coordinator::start().unwrap();
    let mut api = coord.api().await.unwrap();
    let mut tokens = BTreeMap::new();
    for (name, cidr) in [("east", "10.1.0.0/16"), ("west", "10.2.0.0/16")] {
        let r = api
            .create(CreateRequest {
                object: Some(cluster(name, cidr)),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.join_token.starts_with("skyjoin_"));
        tokens.insert(name, r.join_token);
    }
    let join = |token: String, cluster: &str, k: u8, ep: &str| {
        let req = JoinRequest {
            cluster: cluster.into(),
            public_key: key(k),
            endpoint: ep.into(),
        };
        let coord = &coord;
        async move { coord.gateway(&token).await.unwrap().join(req).await }
    };
    // Wrong cluster for the token: refused, token still usable.
    let e = join(tokens["east"].clone(), "west", 1, "198.51.100.1:51820")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let east = join(tokens["east"].clone(), "east", 1, "198.51.100.1:51820")
        .await
        .unwrap()
        .into_inner();
    assert!(east.overlay_ip.starts_with("100.64."));
    // Single use.
    let e = join(tokens["east"].clone(), "east", 1, "198.51.100.1:51820")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{}", e.message());
    // A new token cannot re-key a joined cluster.
    let t2 = api
        .issue_join_token(skymesh_proto::v1::IssueJoinTokenRequest {
            cluster: "east".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .join_token;
    let e = join(t2, "east", 9, "198.51.100.1:51820").await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{}", e.message());
    let west = join(tokens["west"].clone(), "west", 2, "198.51.100.2:51820")
        .await
        .unwrap()
        .into_inner();
    assert_ne!(west.overlay_ip, east.overlay_ip);

    // Each side's netmap has the other as peer with the same pair key.
    let open = |cred: String, cluster: &'static str| {
        let coord = &coord;
        async move {
            coord
                .gateway(&cred)
                .await
                .unwrap()
                .netmap(NetmapRequest {
                    cluster: cluster.into(),
                    resource_version: 0,
                })
                .await
        }
    };
    let snapshot = |cred: String, cluster: &'static str| {
        let open = &open;
        async move {
            let mut s = open(cred, cluster).await.unwrap().into_inner();
            let first = s.next().await.unwrap().unwrap();
            (first, s)
        }
    };
    let (e_first, mut e_stream) = snapshot(east.credential.clone(), "east").await;
    let (w_first, mut w_stream) = snapshot(west.credential.clone(), "west").await;
    let (Some(Update::Snapshot(en)), Some(Update::Snapshot(wn))) = (e_first.update, w_first.update)
    else {
        panic!("streams start with a snapshot")
    };
    assert_eq!(en.peers.len(), 1);
    assert_eq!((en.format, wn.format), (1, 1), "netmaps with job addresses");
    assert_eq!(en.peers[0].cluster, "west");
    assert_eq!(en.peers[0].public_key, key(2));
    assert_eq!(
        en.peers[0].allowed_ips,
        vec![format!("{}/32", west.overlay_ip), "10.2.0.0/16".into()]
    );
    assert_eq!(en.peers[0].preshared_key, wn.peers[0].preshared_key);
    assert!(!en.peers[0].preshared_key.is_empty());
    // A credential only opens its own cluster's netmap.
    let e = open(east.credential.clone(), "west").await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // One credential holds at most two netmap streams at once.
    let (_, second) = snapshot(east.credential.clone(), "east").await;
    let e = open(east.credential.clone(), "east").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(e.message().contains("at most 2"), "{}", e.message());
    drop(second);
    // The server frees the place once it sees the stream cancelled.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if open(east.credential.clone(), "east").await.is_ok() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed stream never freed its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A service appears as a delta; its Endpoints follow the jobs.
    create(&mut api, service("web", 80)).await.unwrap();
    let mut j: Object = Job {
        metadata: meta("web-1"),
        spec: Some(JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.5".into(),
            ports: vec![],
            probe: None,
        }),
        status: None,
    }
    .into();
    j.meta_mut()
        .unwrap()
        .labels
        .insert("app".into(), "web".into());
    create(&mut api, j).await.unwrap();
    let mut got_service = false;
    let mut got_job = false;
    let mut got_endpoint = false;
    let mut last_rv = e_first.resource_version;
    while !(got_service && got_job && got_endpoint) {
        let u = tokio::time::timeout(Duration::from_secs(5), e_stream.next())
            .await
            .expect("delta within 5 s")
            .unwrap()
            .unwrap();
        assert!(u.resource_version > last_rv);
        last_rv = u.resource_version;
        let Some(Update::Delta(d)) = u.update else {
            panic!("delta expected")
        };
        for c in d.changes {
            match c.change.unwrap() {
                Change::ServiceUpsert(s) => got_service |= s.metadata.unwrap().name == "web",
                Change::JobUpsert(j) => got_job |= j.metadata.unwrap().name == "web-1",
                Change::EndpointsUpsert(e) => {
                    got_endpoint |= e
                        .status
                        .unwrap()
                        .clusters
                        .iter()
                        .any(|c| c.addresses.iter().any(|a| a.ip == "10.1.0.5"));
                }
                _ => {}
            }
        }
    }
    drop(e_stream);
    // West learns of east's job only its address (for the service policy).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let address = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no job address for west"
        );
        let u = tokio::time::timeout(Duration::from_secs(5), w_stream.next())
            .await
            .expect("west's delta within 5 s")
            .unwrap()
            .unwrap();
        let Some(Update::Delta(d)) = u.update else {
            panic!("delta expected")
        };
        let mut found = None;
        for c in d.changes {
            match c.change.unwrap() {
                Change::JobUpsert(j) => panic!("east's job in west's netmap: {j:?}"),
                Change::JobAddressUpsert(a) => found = Some(a),
                _ => {}
            }
        }
        if let Some(a) = found {
            break a;
        }
    };
    assert_eq!(
        (&*address.namespace, &*address.name, &*address.ip),
        ("default", "web-1", "10.1.0.5")
    );
    drop(w_stream);
    // Resume: deleting west while disconnected arrives as a removed peer.
    api.delete(DeleteRequest {
        kind: Kind::Cluster as i32,
        namespace: String::new(),
        name: "west".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let mut s = coord
        .gateway(&east.credential)
        .await
        .unwrap()
        .netmap(NetmapRequest {
            cluster: "east".into(),
            resource_version: last_rv,
        })
        .await
        .unwrap()
        .into_inner();
    let u = tokio::time::timeout(Duration::from_secs(5), s.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Update::Delta(d)) = u.update else {
        panic!("resume sends a delta")
    };
    assert!(
        d.changes
            .iter()
            .any(|c| matches!(&c.change, Some(Change::PeerRemoved(p)) if p == "west")),
        "{d:?}"
    );
    // The deleted cluster's credential is gone.
    let e = coord
        .gateway(&west.credential)
        .await
        .unwrap()
        .netmap(NetmapRequest {
            cluster: "west".into(),
            resource_version: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_join_token_is_refused() {
    let coord = Coordinator::start_with(&["--join-token-ttl", "1"]).unwrap();
    let mut api = coord.api().await.unwrap();
    let r = api
        .create(CreateRequest {
            object: Some(cluster("east", "10.1.0.0/16")),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let e = coord
        .gateway(&r.join_token)
        .await
        .unwrap()
        .join(JoinRequest {
            cluster: "east".into(),
            public_key: key(1),
            endpoint: "198.51.100.1:51820".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().contains("expired") || e.message().contains("unknown"),
        "{}",
        e.message()
    );
}

/// SPEC §2: a job's IP lies in its cluster's workload CIDRs, whoever
/// registers it — the admin (skyctl) or the cluster's own gateway
/// (SyncJobs with its credential). Refused naming both; nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_ips_must_lie_in_their_clusters_workload_cidrs() {
    let coord = Coordinator::start().unwrap();
    let mut api = coord.api().await.unwrap();
    let r = api
        .create(CreateRequest {
            object: Some(cluster("a", "10.1.0.0/24")),
        })
        .await
        .unwrap()
        .into_inner();

    // The admin, through skyctl, as a new user would.
    let out = coord.skyctl(&[
        "create",
        "job",
        "j",
        "--cluster",
        "a",
        "--ip",
        "203.0.113.9",
        "-l",
        "app=web",
        "--port",
        "80",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.contains("203.0.113.9") && err.contains("10.1.0.0/24") && err.contains("spec.ip"),
        "{err}"
    );
    let ok = coord.skyctl(&[
        "create",
        "job",
        "inside",
        "--cluster",
        "a",
        "--ip",
        "10.1.0.9",
        "-l",
        "app=web",
    ]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // The gateway, with its own credential.
    let joined = coord
        .gateway(&r.join_token)
        .await
        .unwrap()
        .join(JoinRequest {
            cluster: "a".into(),
            public_key: key(7),
            endpoint: "198.51.100.11:51820".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut gw = coord.gateway(&joined.credential).await.unwrap();
    let job = |name: &str, ip: &str| Job {
        metadata: Some(ObjectMeta {
            name: name.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        }),
        spec: Some(JobSpec {
            ip: ip.into(),
            ..Default::default()
        }),
        status: None,
    };
    let e = gw
        .sync_jobs(skymesh_proto::v1::SyncJobsRequest {
            cluster: "a".into(),
            jobs: vec![job("g1", "10.1.0.20"), job("g2", "10.2.0.20")],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(
        e.message().contains("10.2.0.20") && e.message().contains("10.1.0.0/24"),
        "{}",
        e.message()
    );
    let jobs = api
        .list(ListRequest {
            kind: Kind::Job as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .objects;
    let names: BTreeSet<String> = jobs.iter().map(|o| o.name().to_string()).collect();
    assert_eq!(
        names,
        ["inside".to_string()].into(),
        "nothing but the valid job"
    );
    gw.sync_jobs(skymesh_proto::v1::SyncJobsRequest {
        cluster: "a".into(),
        jobs: vec![job("g1", "10.1.0.20")],
    })
    .await
    .unwrap();
}

/// Gateways that join at the same moment each get every other as a peer:
/// a join that did not see a concurrent one retries, so no pair is left
/// without a pre-shared key (and its tunnel never comes up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_joins_give_every_pair_a_key() {
    const N: u8 = 8;
    let coord = Coordinator::start().unwrap();
    let mut api = coord.api().await.unwrap();
    let mut tokens = Vec::new();
    for i in 1..=N {
        let r = api
            .create(CreateRequest {
                object: Some(cluster(&format!("c{i}"), &format!("10.{i}.0.0/16"))),
            })
            .await
            .unwrap()
            .into_inner();
        tokens.push((format!("c{i}"), r.join_token, i));
    }
    let joins = tokens.iter().map(|(name, token, i)| {
        let coord = &coord;
        async move {
            let req = JoinRequest {
                cluster: name.clone(),
                public_key: key(*i),
                endpoint: format!("198.51.100.{i}:51820"),
            };
            let joined = coord
                .gateway(token)
                .await
                .unwrap()
                .join(req)
                .await
                .unwrap()
                .into_inner();
            (name.clone(), joined.credential)
        }
    });
    let joined = futures::future::join_all(joins).await;
    for (name, cred) in joined {
        let mut s = coord
            .gateway(&cred)
            .await
            .unwrap()
            .netmap(NetmapRequest {
                cluster: name.clone(),
                resource_version: 0,
            })
            .await
            .unwrap()
            .into_inner();
        let Some(Update::Snapshot(n)) = s.next().await.unwrap().unwrap().update else {
            panic!("streams start with a snapshot")
        };
        let peers: BTreeSet<String> = n.peers.iter().map(|p| p.cluster.clone()).collect();
        assert_eq!(peers.len(), usize::from(N) - 1, "{name} sees {peers:?}");
    }
}

async fn get(
    api: &mut ApiClient,
    kind: Kind,
    ns: &str,
    name: &str,
) -> Result<Object, tonic::Status> {
    api.get(GetRequest {
        kind: kind as i32,
        namespace: ns.into(),
        name: name.into(),
    })
    .await
    .map(|r| r.into_inner())
}

fn service_clusters(o: &Object) -> Vec<String> {
    match &o.obj {
        Some(Obj::Service(s)) => s.spec.as_ref().unwrap().clusters.clone(),
        _ => panic!("not a service"),
    }
}

/// skyctl's stderr, which must be one line.
fn one_line_error(out: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(err.lines().count(), 1, "not one line: {err:?}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_cluster_still_named_is_refused_or_cascades() {
    let c = Coordinator::start().unwrap();
    let sky = |args: &[&str]| {
        let out = c.skyctl(args);
        assert!(out.status.success(), "skyctl {args:?}: {out:?}");
    };
    sky(&[
        "create",
        "cluster",
        "east",
        "--workload-cidr",
        "10.1.0.0/16",
    ]);
    sky(&[
        "create",
        "cluster",
        "west",
        "--workload-cidr",
        "10.2.0.0/16",
    ]);
    sky(&[
        "create", "service", "web", "-p", "80:8080", "-s", "app=web", "-c", "east", "-c", "west",
    ]);
    sky(&[
        "create",
        "service",
        "only-east",
        "-p",
        "80:8080",
        "-s",
        "app=x",
        "-c",
        "east",
    ]);
    sky(&[
        "create", "service", "anywhere", "-p", "80:8080", "-s", "app=y",
    ]);
    sky(&[
        "create",
        "endpoints",
        "pinned",
        "--num_endpoints",
        "1",
        "--primary_cluster",
        "east",
        "-s",
        "app=web",
    ]);
    let mut api = c.api().await.unwrap();
    let web_vip = vip(&get(&mut api, Kind::Service, "default", "web")
        .await
        .unwrap());
    let before = revision(&mut api).await;

    // Refused, in one line naming everything that names it; nothing written.
    let out = c.skyctl(&["delete", "cluster", "east"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = one_line_error(&out);
    for what in [
        "service default/web (spec.clusters)",
        "service default/only-east (spec.clusters)",
        "endpoints default/pinned (spec.primary_cluster)",
        "--cascade",
    ] {
        assert!(err.contains(what), "{what:?} missing from: {err}");
    }
    assert!(!err.contains("anywhere"), "{err}");
    assert_eq!(revision(&mut api).await, before, "a refused delete wrote");
    get(&mut api, Kind::Cluster, "", "east").await.unwrap();

    // --cascade belongs to clusters only: bad usage, nothing sent.
    let out = c.skyctl(&["delete", "service", "web", "--cascade"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(one_line_error(&out).contains("--cascade"));

    // With --cascade: east leaves web's clusters (its VIP stays), the
    // service and the Endpoints that existed only for east go.
    sky(&["delete", "cluster", "east", "--cascade"]);
    let web = get(&mut api, Kind::Service, "default", "web")
        .await
        .unwrap();
    assert_eq!(service_clusters(&web), vec!["west".to_string()]);
    assert_eq!(vip(&web), web_vip);
    for (kind, name) in [
        (Kind::Service, "only-east"),
        (Kind::Endpoints, "pinned"),
        (Kind::Cluster, "east"),
    ] {
        let e = get(
            &mut api,
            kind,
            if kind == Kind::Cluster { "" } else { "default" },
            name,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::NotFound, "{kind:?} {name}: {e:?}");
    }
    get(&mut api, Kind::Service, "default", "anywhere")
        .await
        .unwrap();
    // Its VIP is free again: the service CIDR's allocations hold web's and
    // anywhere's only (checked through a new service getting an address).
    sky(&["create", "service", "later", "-p", "80:8080", "-s", "app=z"]);

    // west is now the last cluster of web: refused, naming it.
    let out = c.skyctl(&["delete", "cluster", "west"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_line_error(&out).contains("service default/web"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_namespace_never_races_a_create() {
    let c = Coordinator::start().unwrap();
    let api = c.api().await.unwrap();
    let mut deleted_rounds = 0;
    for round in 0..12 {
        let ns = format!("race-{round}");
        let mut a = api.clone();
        create(
            &mut a,
            Namespace {
                metadata: meta(&ns),
            }
            .into(),
        )
        .await
        .unwrap();
        // Eight creates in the namespace and its delete, all at once.
        let mut creates = Vec::new();
        for i in 0..8 {
            let mut a = api.clone();
            let ns = ns.clone();
            creates.push(tokio::spawn(async move {
                let mut o = service(&format!("s{i}"), 80);
                o.meta_mut().unwrap().namespace = ns;
                create(&mut a, o).await.is_ok()
            }));
        }
        let mut d = api.clone();
        let ns2 = ns.clone();
        let delete = tokio::spawn(async move {
            d.delete(DeleteRequest {
                kind: Kind::Namespace as i32,
                name: ns2,
                ..Default::default()
            })
            .await
        });
        let mut created = 0;
        for t in creates {
            created += usize::from(t.await.unwrap());
        }
        let deleted = delete.await.unwrap();
        let left = a
            .list(ListRequest {
                kind: Kind::Service as i32,
                namespace: ns.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .objects
            .len();
        let ns_exists = get(&mut a, Kind::Namespace, "", &ns).await.is_ok();
        match deleted {
            Ok(_) => {
                deleted_rounds += 1;
                assert!(!ns_exists);
                assert_eq!(
                    left, 0,
                    "round {round}: namespace deleted with {left} services in it"
                );
            }
            Err(e) => {
                assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
                assert!(e.message().contains("not empty"), "{e:?}");
                assert!(ns_exists);
                assert!(left > 0);
            }
        }
        assert_eq!(left, created, "round {round}");
    }
    // Both outcomes are legitimate; the invariant held in every round.
    eprintln!("namespace deleted first in {deleted_rounds} of 12 rounds");
}
