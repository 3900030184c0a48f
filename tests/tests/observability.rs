//! The binaries as monitoring sees them: the coordinator's and meshd's
//! `/metrics` checked by Prometheus' own `promtool`, in the text format by
//! default and OpenMetrics when asked; the coordinator's standard gRPC
//! health service over its TLS; meshd's `/healthz` before and after it has
//! a netmap. All against the real binaries (meshd in network namespaces:
//! root).
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use skymesh_tests::http::{self, promtool_check, sample};
use skymesh_tests::mesh::{METRICS_PORT, Mesh};
use skymesh_tests::netns::wait_until;
use skymesh_tests::{Coordinator, skyctl};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What Prometheus 2.x sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

async fn health(c: &Coordinator, service: &str) -> Result<ServingStatus, tonic::Status> {
    let channel = c
        .tls()
        .unwrap()
        .endpoint(&c.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_health_and_metrics_pass_promtool() {
    let c = Coordinator::start_with(&["--metrics-listen", "127.0.0.1:0"]).unwrap();

    // grpc.health.v1 over the coordinator's TLS, with no token.
    assert_eq!(health(&c, "").await.unwrap(), ServingStatus::Serving);
    assert_eq!(
        health(&c, "skymesh.v1.Api").await.unwrap(),
        ServingStatus::Serving
    );
    assert_eq!(
        health(&c, "skymesh.v1.Gateway").await.unwrap(),
        ServingStatus::Serving
    );
    let unknown = health(&c, "no.such.Service").await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");
    // skyctl health, as the Kubernetes exec probe runs it: no token.
    let out = skyctl(&c.url(), "", &c.ca_file(), &["health"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "SERVING\n");
    let out = skyctl(&c.url(), "", &c.ca_file(), &["health", "--service", "x.Y"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().count(),
        1,
        "{out:?}"
    );

    // Some calls to count: OK, NotFound, Unauthenticated, and a watch.
    assert!(c.skyctl(&["create", "namespace", "shop"]).status.success());
    assert_eq!(c.skyctl(&["get", "service", "nope"]).status.code(), Some(1));
    let bad = skyctl(&c.url(), "wrong-token", &c.ca_file(), &["get", "ns"]);
    assert_eq!(bad.status.code(), Some(1));
    let watch = c.skyctl_spawn(&["get", "ns", "--watch"]);

    let addr = c.metrics_addr().unwrap();
    let mut r = http::get(addr, "/metrics", None).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || {
            r = http::get(addr, "/metrics", None).unwrap();
            sample(&r.body, "skymesh_coordinator_watch_streams ", &[]) == Some(1.0)
        }),
        "the watch is not counted:\n{}",
        r.body
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(TEXT));
    promtool_check(&r.body).unwrap();
    let handled = |method: &str, code: &str| {
        sample(
            &r.body,
            "grpc_server_handled_total{",
            &[
                "grpc_service=\"skymesh.v1.Api\"",
                &format!("grpc_method=\"{method}\""),
                &format!("grpc_code=\"{code}\""),
            ],
        )
        .unwrap_or(0.0)
    };
    assert!(handled("Create", "OK") >= 1.0, "{}", r.body);
    assert!(handled("Get", "NotFound") >= 1.0, "{}", r.body);
    assert!(handled("List", "Unauthenticated") >= 1.0, "{}", r.body);
    assert!(
        sample(
            &r.body,
            "grpc_server_handled_total{",
            &["grpc_method=\"Check\"", "grpc_code=\"OK\""]
        )
        .unwrap_or(0.0)
            >= 3.0,
        "{}",
        r.body
    );
    assert!(
        sample(
            &r.body,
            "grpc_server_started_total{",
            &["grpc_type=\"server_stream\"", "grpc_method=\"Watch\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{}",
        r.body
    );
    assert_eq!(
        sample(&r.body, "skymesh_coordinator_netmap_streams ", &[]),
        Some(0.0)
    );
    assert!(
        sample(
            &r.body,
            "skymesh_coordinator_store_request_duration_seconds_count{",
            &["op=\"txn\""]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{}",
        r.body
    );
    // The watch ends when skyctl goes: it is counted as Canceled.
    drop(watch);
    assert!(
        wait_until(Duration::from_secs(10), || {
            r = http::get(addr, "/metrics", None).unwrap();
            sample(&r.body, "skymesh_coordinator_watch_streams ", &[]) == Some(0.0)
                && sample(
                    &r.body,
                    "grpc_server_handled_total{",
                    &["grpc_method=\"Watch\"", "grpc_code=\"Canceled\""],
                )
                .is_some()
        }),
        "{}",
        r.body
    );

    // OpenMetrics when the scraper asks for it, as Prometheus does.
    let om = http::get(addr, "/metrics", Some(PROMETHEUS_ACCEPT)).unwrap();
    assert_eq!(om.header("content-type"), Some(OPENMETRICS));
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om.body.contains("# TYPE grpc_server_handled counter\n"));
    assert!(!r.body.contains("# EOF"));
}

/// `GET path` from gateway `i`'s metrics listener.
fn gateway_get(
    mesh: &Mesh,
    i: usize,
    path: &str,
    accept: Option<&str>,
) -> anyhow::Result<http::Reply> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, METRICS_PORT));
    let path = path.to_string();
    let accept = accept.map(str::to_string);
    mesh.topo
        .gateway(i)
        .run_in(move || http::get(addr, &path, accept.as_deref()))?
}

#[test]
fn gateway_metrics_pass_promtool_and_healthz_follows_start_up() {
    let mut mesh = Mesh::start(2, 0).unwrap();
    assert!(mesh.wait_for_tunnels(Duration::from_secs(30)));
    let mut r = gateway_get(&mesh, 1, "/metrics", None).unwrap();
    // Counters advance once a second: wait for the peer's.
    assert!(wait_until(Duration::from_secs(10), || {
        r = gateway_get(&mesh, 1, "/metrics", None).unwrap();
        sample(&r.body, "skymesh_peer_handshakes_total{", &[]).is_some_and(|v| v >= 1.0)
    }));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(TEXT));
    assert!(
        r.body
            .contains("# TYPE skymesh_peer_rx_bytes_total counter\n"),
        "{}",
        r.body
    );
    promtool_check(&r.body).unwrap();
    let om = gateway_get(&mesh, 1, "/metrics", Some(PROMETHEUS_ACCEPT)).unwrap();
    assert_eq!(om.header("content-type"), Some(OPENMETRICS));
    assert!(om.body.ends_with("# EOF\n"));
    let ok = gateway_get(&mesh, 1, "/healthz", None).unwrap();
    assert_eq!((ok.status, ok.body.as_str()), (200, "ok\n"));

    // Gateway 2 restarted with no netmap (cache removed) while the
    // coordinator is down: 503 until the coordinator is back.
    mesh.stop_coordinator();
    mesh.stop_meshd(2);
    std::fs::remove_file(mesh.state_dir(2).join("netmap.cache")).unwrap();
    mesh.start_meshd(2, None).unwrap();
    let mut h = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            h = gateway_get(&mesh, 2, "/healthz", None).ok();
            h.is_some()
        }),
        "meshd 2's /healthz never answered:\n{}",
        mesh.meshd_log(2)
    );
    let h = h.unwrap();
    assert_eq!(h.status, 503, "{h:?}");
    assert!(h.body.contains("no netmap"), "{h:?}");
    let m = gateway_get(&mesh, 2, "/metrics", None).unwrap();
    assert_eq!(m.status, 503, "{m:?}");
    // Still waiting a few seconds on.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(gateway_get(&mesh, 2, "/healthz", None).unwrap().status, 503);
    mesh.start_coordinator().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || {
            gateway_get(&mesh, 2, "/healthz", None).is_ok_and(|r| r.status == 200)
        }),
        "meshd 2 not healthy once the coordinator is back:\n{}",
        mesh.meshd_log(2)
    );
    let m = gateway_get(&mesh, 2, "/metrics", None).unwrap();
    assert_eq!(m.status, 200);
    promtool_check(&m.body).unwrap();
}
