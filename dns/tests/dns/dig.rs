//! The server as `dig` sees it.

use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use skymesh_proto::v1::ServiceType;

use crate::support::{dig, mesh, service, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_of_a_vip_in_both_zones() {
    let srv = start(&mesh()).await;
    for name in [
        "web.default.svc",
        "web.default.svc.clusterset.local",
        "WEB.Default.SVC",
    ] {
        let out = dig(srv.addr, &[name, "A"]).await;
        assert_eq!(out.status, "NOERROR", "{}", out.raw);
        assert!(out.has_flag("aa"), "{}", out.raw);
        assert_eq!(out.rdata("A"), ["100.65.0.10"], "{}", out.raw);
        assert_eq!(out.answer[0][1], "5", "TTL 5 s: {}", out.raw);
    }
    assert!(
        srv.handle
            .metrics()
            .queries(RecordType::A, ResponseCode::NoError)
            >= 3
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_answers_replicas_of_every_cluster() {
    let srv = start(&mesh()).await;
    let out = dig(srv.addr, &["cart.shop.svc", "A"]).await;
    assert_eq!(out.status, "NOERROR", "{}", out.raw);
    // east is local, west exposed, north neither.
    assert_eq!(
        out.rdata("A"),
        ["10.1.0.1", "10.1.0.2", "10.2.0.1", "10.2.0.2"],
        "{}",
        out.raw
    );
    let one = dig(srv.addr, &["cart-w-1.cart.shop.svc.clusterset.local", "A"]).await;
    assert_eq!(one.rdata("A"), ["10.2.0.2"], "{}", one.raw);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_exposed_and_unknown_names_are_nxdomain_with_soa() {
    let srv = start(&mesh()).await;
    for name in ["api.default.svc", "nothing.default.svc.clusterset.local"] {
        let out = dig(srv.addr, &[name, "A"]).await;
        assert_eq!(out.status, "NXDOMAIN", "{}", out.raw);
        assert!(out.answer.is_empty(), "{}", out.raw);
        assert_eq!(out.authority.len(), 1, "{}", out.raw);
        let soa = &out.authority[0];
        assert_eq!(soa[3], "SOA", "{}", out.raw);
        assert!(name.ends_with(soa[0].trim_end_matches('.')), "{}", out.raw);
        assert_eq!(soa.last().unwrap(), "5", "SOA minimum: {}", out.raw);
    }
    // Existing name, other type: NODATA with SOA.
    let out = dig(srv.addr, &["web.default.svc", "AAAA"]).await;
    assert_eq!(out.status, "NOERROR", "{}", out.raw);
    assert!(out.answer.is_empty(), "{}", out.raw);
    assert_eq!(out.authority[0][3], "SOA", "{}", out.raw);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_for_vip_and_headless_services() {
    let srv = start(&mesh()).await;
    let out = dig(srv.addr, &["_http._tcp.web.default.svc", "SRV"]).await;
    assert_eq!(
        out.rdata("SRV"),
        ["0 100 80 web.default.svc."],
        "{}",
        out.raw
    );
    let out = dig(
        srv.addr,
        &["_http._tcp.cart.shop.svc.clusterset.local", "SRV"],
    )
    .await;
    assert_eq!(
        out.rdata("SRV"),
        [
            "0 100 8080 cart-e-0.cart.shop.svc.clusterset.local.",
            "0 100 8080 cart-e-1.cart.shop.svc.clusterset.local.",
            "0 100 8080 cart-w-0.cart.shop.svc.clusterset.local.",
            "0 100 8080 cart-w-1.cart.shop.svc.clusterset.local.",
        ],
        "{}",
        out.raw
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptr_of_a_vip_and_cname_of_an_external_name() {
    let srv = start(&mesh()).await;
    let out = dig(srv.addr, &["-x", "100.65.0.10"]).await;
    assert_eq!(out.rdata("PTR"), ["web.default.svc."], "{}", out.raw);
    let out = dig(srv.addr, &["-x", "100.65.9.9"]).await;
    assert_eq!(out.status, "NXDOMAIN", "{}", out.raw);
    assert_eq!(out.authority[0][0], "65.100.in-addr.arpa.", "{}", out.raw);
    let out = dig(srv.addr, &["docs.default.svc", "A"]).await;
    assert_eq!(out.status, "NOERROR", "{}", out.raw);
    assert_eq!(out.rdata("CNAME"), ["docs.example.org."], "{}", out.raw);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_answer_truncates_over_udp_and_is_complete_over_tcp() {
    let srv = start(&mesh()).await;
    // dig advertises 1232 bytes of EDNS payload; 100 A records do not fit.
    let udp = dig(srv.addr, &["+ignore", "+notcp", "big.default.svc", "A"]).await;
    assert!(udp.has_flag("tc"), "{}", udp.raw);
    assert!(udp.rdata("A").len() < 100, "{}", udp.raw);
    // Without EDNS the limit is 512 bytes.
    let plain = dig(
        srv.addr,
        &["+ignore", "+notcp", "+noedns", "big.default.svc", "A"],
    )
    .await;
    assert!(plain.has_flag("tc"), "{}", plain.raw);
    assert!(
        plain.rdata("A").len() < udp.rdata("A").len(),
        "{}",
        plain.raw
    );
    // A larger EDNS buffer fits them all over UDP.
    let edns = dig(
        srv.addr,
        &["+notcp", "+bufsize=4096", "big.default.svc", "A"],
    )
    .await;
    assert!(!edns.has_flag("tc"), "{}", edns.raw);
    assert_eq!(edns.rdata("A").len(), 100, "{}", edns.raw);
    let tcp = dig(srv.addr, &["+tcp", "big.default.svc", "A"]).await;
    assert!(!tcp.has_flag("tc"), "{}", tcp.raw);
    assert_eq!(tcp.rdata("A").len(), 100, "{}", tcp.raw);
    // dig's default: retry over TCP on TC.
    let fallback = dig(srv.addr, &["big.default.svc", "A"]).await;
    assert_eq!(fallback.rdata("A").len(), 100, "{}", fallback.raw);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_updates_show_within_one_second() {
    let srv = start(&mesh()).await;
    assert_eq!(
        dig(srv.addr, &["new.default.svc", "A"]).await.status,
        "NXDOMAIN"
    );

    let mut view = mesh();
    view.services
        .push(service("default", "new", ServiceType::ClusterIp, "100.65.3.3", &[]).into());
    // api becomes exposed here; web is deleted.
    view.services
        .retain(|s| s.metadata.as_ref().unwrap().name != "web");
    view.services
        .iter_mut()
        .filter(|s| s.metadata.as_ref().unwrap().name == "api")
        .for_each(|s| {
            let s = std::sync::Arc::make_mut(s);
            s.spec.as_mut().unwrap().clusters.push("east".into());
        });
    let started = Instant::now();
    srv.handle.update(&view);
    loop {
        let out = dig(srv.addr, &["new.default.svc", "A"]).await;
        if out.rdata("A") == ["100.65.3.3"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not visible after 1 s: {}",
            out.raw
        );
    }
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        dig(srv.addr, &["api.default.svc", "A"]).await.rdata("A"),
        ["100.65.0.11"]
    );
    assert_eq!(
        dig(srv.addr, &["web.default.svc", "A"]).await.status,
        "NXDOMAIN"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_applies_a_watch_stream_of_views() {
    let srv = start(&mesh()).await;
    let (tx, rx) = tokio::sync::watch::channel(mesh());
    let handle = srv.handle.clone();
    let follower = tokio::spawn(async move { handle.follow(rx).await });

    let mut view = mesh();
    view.services.push(
        service(
            "default",
            "streamed",
            ServiceType::ClusterIp,
            "100.65.4.4",
            &[],
        )
        .into(),
    );
    let started = Instant::now();
    tx.send(view).unwrap();
    loop {
        let out = dig(srv.addr, &["streamed.default.svc", "A"]).await;
        if out.rdata("A") == ["100.65.4.4"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "not visible after 1 s: {}",
            out.raw
        );
    }
    drop(tx);
    tokio::time::timeout(Duration::from_secs(2), follower)
        .await
        .unwrap()
        .unwrap();
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_the_zones_are_refused_without_upstream() {
    let srv = start(&mesh()).await;
    assert!(srv.handle.upstreams().is_empty());
    let out = dig(srv.addr, &["example.com", "A"]).await;
    assert_eq!(out.status, "REFUSED", "{}", out.raw);
    assert_eq!(
        srv.handle
            .metrics()
            .queries(RecordType::A, ResponseCode::Refused),
        1
    );
    srv.stop().await;
}
