//! IPAM through the registry on a real embedded store: concurrent
//! allocators never hand out one address twice; freed addresses are reused.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use coordinator::registry::Registry;
use skymesh_proto::v1::{Kind, Object, ObjectMeta, Service, ServicePort, ServiceSpec, object::Obj};
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

async fn registry(dir: &std::path::Path, pool: &str) -> Registry {
    let store = EmbeddedStore::open(&dir.join("store.redb")).unwrap();
    let reg = Registry::new(
        Arc::new(store),
        "100.64.0.0/16".parse().unwrap(),
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
    assert_eq!(again, vips[2], "the freed VIP is handed out again");
}
