//! IPAM through the registry on a real embedded store: concurrent
//! allocators never hand out one address twice; a freed address is not
//! handed out again at once (also across a restart), but is reused once the
//! pool has gone round.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use coordinator::registry::Registry;
use skymesh_proto::v1::{
    Cluster, ClusterSpec, Kind, Object, ObjectMeta, Service, ServicePort, ServiceSpec, object::Obj,
};
use skymesh_store::embedded::EmbeddedStore;

fn service(name: &str) -> Object {
    Service {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: Some(ServiceSpec {
            ports: vec![ServicePort {
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        }),
        status: None,
    }
    .into()
}

fn vip(o: &Object) -> String {
    match &o.obj {
        Some(Obj::Service(s)) => s.status.clone().unwrap().cluster_ip,
        _ => panic!("not a service"),
    }
}

fn cluster(name: &str, cidr: &str) -> Object {
    Cluster {
        metadata: Some(ObjectMeta {
            name: name.into(),
            ..Default::default()
        }),
        spec: Some(ClusterSpec {
            workload_cidrs: vec![cidr.into()],
        }),
        status: None,
    }
    .into()
}

async fn registry(dir: &std::path::Path, pool: &str) -> Registry {
    registry_with(dir, "100.64.0.0/16", pool).await
}

async fn registry_with(dir: &std::path::Path, overlay: &str, pool: &str) -> Registry {
    let store = EmbeddedStore::open(&dir.join("store.redb")).unwrap();
    let reg = Registry::new(
        Arc::new(store),
        overlay.parse().unwrap(),
        pool.parse().unwrap(),
        Duration::from_secs(3600),
    );
    reg.ensure_default_namespace().await.unwrap();
    reg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_never_collide() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), "100.65.0.0/24").await;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let mut vips = Vec::new();
            for i in 0..25 {
                let o = reg.create(service(&format!("s-{t}-{i}"))).await.unwrap();
                vips.push(vip(&o.object));
            }
            vips
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: BTreeSet<_> = all.iter().collect();
    assert_eq!(all.len(), 200);
    assert_eq!(distinct.len(), 200, "no VIP handed out twice");
    let (listed, _) = reg.list(Kind::Service, None).await.unwrap();
    let stored: BTreeSet<_> = listed.iter().map(vip).collect();
    assert_eq!(stored.len(), 200);
}

#[tokio::test]
async fn freed_vips_are_reused_and_exhaustion_names_the_pool() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), "100.65.0.0/29").await;
    let mut vips = Vec::new();
    for i in 0..6 {
        vips.push(vip(&reg
            .create(service(&format!("s{i}")))
            .await
            .unwrap()
            .object));
    }
    let e = reg.create(service("s6")).await.unwrap_err();
    assert!(e.to_string().contains("100.65.0.0/29"), "{e}");
    assert!(e.to_string().contains("all 6 addresses"), "{e}");
    reg.delete(Kind::Service, "default", "s2").await.unwrap();
    let again = vip(&reg.create(service("s6")).await.unwrap().object);
    assert_eq!(
        again, vips[2],
        "the freed VIP is handed out again when it is the only one left"
    );
}

#[tokio::test]
async fn a_freed_vip_is_not_handed_out_at_once_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry(dir.path(), "100.65.0.0/29").await; // .1 - .6
    let a = vip(&reg.create(service("a")).await.unwrap().object);
    reg.delete(Kind::Service, "default", "a").await.unwrap();
    let b = vip(&reg.create(service("b")).await.unwrap().object);
    assert_ne!(a, b, "b must not get the VIP a just freed");
    reg.delete(Kind::Service, "default", "b").await.unwrap();
    // The cursor is in the store: a restarted coordinator goes on from it.
    drop(reg);
    let reg = registry(dir.path(), "100.65.0.0/29").await;
    let c = vip(&reg.create(service("c")).await.unwrap().object);
    assert!(c != a && c != b, "{c} after restart reuses a freed VIP");
    assert_eq!(c, "100.65.0.3");
    // Round the pool: .4 .5 .6, then the oldest freed (.1, .2).
    let mut next = Vec::new();
    for i in 0..5 {
        next.push(vip(&reg
            .create(service(&format!("n{i}")))
            .await
            .unwrap()
            .object));
    }
    assert_eq!(
        next,
        [
            "100.65.0.4",
            "100.65.0.5",
            "100.65.0.6",
            "100.65.0.1",
            "100.65.0.2"
        ]
    );
}

#[tokio::test]
async fn a_freed_overlay_ip_is_not_handed_out_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let reg = registry_with(dir.path(), "100.64.0.0/29", "100.65.0.0/24").await;
    let mut ips = Vec::new();
    for (i, name) in ["east", "west", "north"].iter().enumerate() {
        let created = reg
            .create(cluster(name, &format!("10.{}.0.0/16", i + 1)))
            .await
            .unwrap();
        let (token, _) = created.join_token.unwrap();
        let key = format!("{:0>43}=", i);
        let joined = reg
            .join(name, &token, &key, "192.0.2.1:51820")
            .await
            .unwrap();
        ips.push(joined.overlay_ip);
        if i == 0 {
            // east leaves; west must not get its address.
            reg.delete(Kind::Cluster, "", name).await.unwrap();
        }
    }
    assert_eq!(ips, ["100.64.0.1", "100.64.0.2", "100.64.0.3"]);
}
