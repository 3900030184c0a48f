//! Forwarding names outside the zones to upstream resolvers. The upstream is
//! a second instance of this server, serving the zone `example.test`.

use std::io::Write;

use skymesh_dns::{DnsServer, MeshView, Upstreams};
use skymesh_proto::v1::ServiceType;
use tokio_util::sync::CancellationToken;

use crate::support::{TestServer, config, dig, external, mesh, service, start_with};

async fn upstream() -> TestServer {
    let mut cfg = config(vec![]);
    cfg.zones = vec!["example.test".into()];
    cfg.service_cidr = None;
    let view = MeshView {
        services: vec![service("default", "web", ServiceType::ClusterIp, "192.0.2.80", &[]).into()],
        ..MeshView::new("upstream")
    };
    start_with(cfg, &view).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_zones_go_upstream() {
    let up = upstream().await;
    let mut view = mesh();
    view.services
        .push(external("default", "ext", "web.default.example.test").into());
    let srv = start_with(config(vec![up.addr]), &view).await;
    assert_eq!(srv.handle.upstreams(), [up.addr]);

    let out = dig(srv.addr, &["web.default.example.test", "A"]).await;
    assert_eq!(out.status, "NOERROR", "{}", out.raw);
    assert_eq!(out.rdata("A"), ["192.0.2.80"], "{}", out.raw);
    assert!(
        !out.has_flag("aa"),
        "forwarded answers are not authoritative: {}",
        out.raw
    );
    assert!(out.has_flag("ra"), "{}", out.raw);

    let out = dig(srv.addr, &["nope.default.example.test", "A"]).await;
    assert_eq!(out.status, "NXDOMAIN", "{}", out.raw);

    // Mesh names are still answered locally.
    let out = dig(srv.addr, &["web.default.svc", "A"]).await;
    assert_eq!(out.rdata("A"), ["100.65.0.10"], "{}", out.raw);
    assert!(out.has_flag("aa"), "{}", out.raw);

    // An ExternalName leaving the mesh is chased through the upstream.
    let out = dig(srv.addr, &["ext.default.svc", "A"]).await;
    assert_eq!(out.status, "NOERROR", "{}", out.raw);
    assert_eq!(
        out.rdata("CNAME"),
        ["web.default.example.test."],
        "{}",
        out.raw
    );
    assert_eq!(out.rdata("A"), ["192.0.2.80"], "{}", out.raw);

    assert!(srv.handle.metrics().forwarded() >= 2);
    srv.stop().await;
    up.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstreams_come_from_resolv_conf_minus_ourselves() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(
        file,
        "search example.com\nnameserver 192.0.2.53\nnameserver 127.0.0.1"
    )
    .unwrap();
    let mut cfg = config(vec![]);
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.upstreams = Upstreams::ResolvConf(file.path().to_owned());
    let mut registry = prometheus_client::registry::Registry::default();
    let token = CancellationToken::new();
    let (server, handle) = DnsServer::bind(cfg.clone(), &mut registry, token.clone())
        .await
        .unwrap();
    assert_eq!(
        handle.upstreams(),
        [
            "192.0.2.53:53".parse().unwrap(),
            "127.0.0.1:53".parse().unwrap()
        ]
    );
    token.cancel();
    server.run().await.unwrap();

    // No file: no upstream, names outside the zones are refused.
    cfg.upstreams = Upstreams::ResolvConf("/nonexistent/resolv.conf".into());
    let srv = start_with(cfg, &mesh()).await;
    assert!(srv.handle.upstreams().is_empty());
    assert_eq!(dig(srv.addr, &["example.com", "A"]).await.status, "REFUSED");
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_zone_is_refused_at_bind() {
    let mut cfg = config(vec![]);
    cfg.zones = vec!["svc".into(), ".".into()];
    let mut registry = prometheus_client::registry::Registry::default();
    let err = DnsServer::bind(cfg, &mut registry, CancellationToken::new())
        .await
        .err()
        .expect("root zone must be refused");
    assert!(err.to_string().contains("invalid DNS zone"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_in_flight_are_bounded() {
    let up = upstream().await;
    let mut cfg = config(vec![up.addr]);
    // No forward may be in flight: every name outside the zones is turned
    // away at once, and the mesh's own names are still answered.
    cfg.max_forwards = 0;
    let srv = start_with(cfg, &mesh()).await;
    let out = dig(srv.addr, &["web.default.example.test", "A"]).await;
    assert_eq!(out.status, "SERVFAIL", "{}", out.raw);
    let out = dig(srv.addr, &["web.default.svc", "A"]).await;
    assert_eq!(out.rdata("A"), ["100.65.0.10"], "{}", out.raw);
    srv.stop().await;

    // One permit is returned when its query is answered.
    let mut cfg = config(vec![up.addr]);
    cfg.max_forwards = 1;
    let srv = start_with(cfg, &mesh()).await;
    for _ in 0..3 {
        let out = dig(srv.addr, &["web.default.example.test", "A"]).await;
        assert_eq!(out.rdata("A"), ["192.0.2.80"], "{}", out.raw);
    }
    srv.stop().await;
    up.stop().await;
}
