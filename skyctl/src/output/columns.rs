//! What each table shows (SPEC §7): the headers and cells of services,
//! endpoints, clusters, jobs, namespaces and tunnels, in `table` and `wide`
//! form. Pure functions of an object and `now`.

use std::collections::HashMap;

use skymesh_proto::v1::object::Obj;
use skymesh_proto::v1::{
    Cluster, ClusterPhase, Endpoints, Job, JobPort, Kind, Namespace, Object, ObjectMeta,
    PeerHealth, Service, ServiceType,
};
use skymesh_proto::validate;

use super::human;

/// Shown for an empty cell.
const NONE: &str = "<none>";

/// What a table lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// One row per object of the kind.
    Objects(Kind),
    /// One row per (cluster, peer) pair, from clusters' status.
    Tunnels,
}

/// The column headers of a view.
pub(crate) fn headers(view: View, wide: bool) -> Vec<&'static str> {
    let (mut h, extra): (Vec<&str>, &[&str]) = match view {
        View::Objects(Kind::Service) => (
            vec![
                "NAME",
                "TYPE",
                "CLUSTER-IP",
                "EXTERNAL-IP",
                "PORTS",
                "CLUSTERS",
                "NAMESPACE",
                "AGE",
            ],
            &["SELECTOR", "UPSTREAMS", "WHITELISTS"],
        ),
        View::Objects(Kind::Endpoints) => {
            (vec!["NAME", "NAMESPACE", "ENDPOINTS", "AGE"], &["SELECTOR"])
        }
        View::Objects(Kind::Cluster) => (
            vec![
                "NAME",
                "STATUS",
                "OVERLAY-IP",
                "ENDPOINT",
                "WORKLOAD-CIDRS",
                "PEERS",
                "AGE",
            ],
            &["LAST-SEEN", "LABELS", "PUBLIC-KEY"],
        ),
        View::Objects(Kind::Job) => (
            vec![
                "NAME",
                "CLUSTER",
                "IP",
                "READY",
                "PORTS",
                "NAMESPACE",
                "AGE",
            ],
            &["PROBE", "LABELS"],
        ),
        View::Objects(Kind::Namespace | Kind::Unspecified) => (vec!["NAME", "AGE"], &[]),
        View::Tunnels => (
            vec!["CLUSTER", "PEER", "STATUS", "HANDSHAKE", "RTT", "RX", "TX"],
            &[],
        ),
    };
    if wide {
        h.extend_from_slice(extra);
    }
    h
}

/// The rows an object contributes to a view (one, except for tunnels: one
/// per peer of the cluster; none for an object of another kind).
pub(crate) fn rows(view: View, obj: &Object, wide: bool, now: i64) -> Vec<Vec<String>> {
    match (view, obj.obj.as_ref()) {
        (View::Objects(Kind::Service), Some(Obj::Service(s))) => vec![service(s, wide, now)],
        (View::Objects(Kind::Endpoints), Some(Obj::Endpoints(e))) => vec![endpoints(e, wide, now)],
        (View::Objects(Kind::Cluster), Some(Obj::Cluster(c))) => vec![cluster(c, wide, now)],
        (View::Objects(Kind::Job), Some(Obj::Job(j))) => vec![job(j, wide, now)],
        (View::Objects(Kind::Namespace), Some(Obj::Namespace(n))) => vec![namespace(n, now)],
        (View::Tunnels, Some(Obj::Cluster(c))) => tunnels(c, now),
        _ => Vec::new(),
    }
}

fn or_none(s: String) -> String {
    if s.is_empty() { NONE.to_string() } else { s }
}

fn meta_of(m: Option<&ObjectMeta>) -> (&str, &str, i64) {
    m.map_or(("", "", 0), |m| {
        (m.name.as_str(), m.namespace.as_str(), m.creation_timestamp)
    })
}

/// `k=v,k2=v2`, sorted by key.
pub(crate) fn labels(map: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = map.iter().collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn service(s: &Service, wide: bool, now: i64) -> Vec<String> {
    let (name, ns, created) = meta_of(s.metadata.as_ref());
    let spec = s.spec.clone().unwrap_or_default();
    let status = s.status.clone().unwrap_or_default();
    let ty = spec.r#type();
    let cluster_ip = match ty {
        ServiceType::Headless => "None".to_string(),
        _ => or_none(status.cluster_ip),
    };
    let external = if ty == ServiceType::ExternalName {
        or_none(spec.external_name.clone())
    } else {
        or_none(status.external_ips.join(","))
    };
    let ports = spec
        .ports
        .iter()
        .map(|p| {
            let target = p.effective_target_port();
            format!(
                "{}:{}/{}",
                p.port,
                target,
                validate::protocol_name(p.protocol())
            )
        })
        .collect::<Vec<_>>()
        .join(",");
    let clusters = if spec.clusters.is_empty() {
        "<all>".to_string()
    } else {
        spec.clusters.join(",")
    };
    let mut row = vec![
        name.to_string(),
        validate::service_type_name(ty).to_string(),
        cluster_ip,
        external,
        or_none(ports),
        clusters,
        ns.to_string(),
        human::age(created, now),
    ];
    if wide {
        row.push(or_none(labels(&spec.selector)));
        row.push(or_none(spec.upstreams.join(",")));
        row.push(or_none(spec.whitelists.join(",")));
    }
    row
}

/// `east: 2, west: 1` (ready addresses per cluster), or in wide form
/// `east: 10.1.0.5:8080,10.1.0.6:8080; west: 10.2.0.7:8080`.
fn endpoints_cell(e: &Endpoints, wide: bool) -> String {
    let Some(status) = e.status.as_ref() else {
        return NONE.to_string();
    };
    let parts: Vec<String> = status
        .clusters
        .iter()
        .map(|c| {
            let ready = c.addresses.iter().filter(|a| a.ready);
            if wide {
                let addrs: Vec<String> = ready
                    .flat_map(|a| {
                        if a.ports.is_empty() {
                            vec![a.ip.clone()]
                        } else {
                            a.ports
                                .iter()
                                .map(|p| format!("{}:{}", a.ip, p.port))
                                .collect()
                        }
                    })
                    .collect();
                format!("{}: {}", c.cluster, or_none(addrs.join(",")))
            } else {
                format!("{}: {}", c.cluster, ready.count())
            }
        })
        .collect();
    or_none(parts.join(if wide { "; " } else { ", " }))
}

fn endpoints(e: &Endpoints, wide: bool, now: i64) -> Vec<String> {
    let (name, ns, created) = meta_of(e.metadata.as_ref());
    let mut row = vec![
        name.to_string(),
        ns.to_string(),
        endpoints_cell(e, wide),
        human::age(created, now),
    ];
    if wide {
        let sel = e
            .spec
            .as_ref()
            .map(|s| labels(&s.selector))
            .unwrap_or_default();
        row.push(or_none(sel));
    }
    row
}

/// Display name of a cluster phase.
pub(crate) fn phase_name(p: ClusterPhase) -> &'static str {
    match p {
        ClusterPhase::Unspecified => "Unknown",
        ClusterPhase::Pending => "Pending",
        ClusterPhase::Ready => "Ready",
        ClusterPhase::NotReady => "NotReady",
    }
}

fn cluster(c: &Cluster, wide: bool, now: i64) -> Vec<String> {
    let (name, _, created) = meta_of(c.metadata.as_ref());
    let spec = c.spec.clone().unwrap_or_default();
    let status = c.status.clone().unwrap_or_default();
    let up = status.peers.iter().filter(|p| p.up).count();
    // A NotReady gateway's last report says nothing of its tunnels now.
    let peers = if status.phase() == ClusterPhase::NotReady {
        format!("?/{}", status.peers.len())
    } else {
        format!("{up}/{}", status.peers.len())
    };
    let mut row = vec![
        name.to_string(),
        phase_name(status.phase()).to_string(),
        or_none(status.overlay_ip.clone()),
        or_none(status.endpoint.clone()),
        or_none(spec.workload_cidrs.join(",")),
        peers,
        human::age(created, now),
    ];
    if wide {
        let last_seen = if status.last_seen > 0 {
            format!("{} ago", human::age(status.last_seen, now))
        } else {
            "never".to_string()
        };
        let l = c
            .metadata
            .as_ref()
            .map(|m| labels(&m.labels))
            .unwrap_or_default();
        row.push(last_seen);
        row.push(or_none(l));
        row.push(or_none(status.public_key));
    }
    row
}

/// `8080/TCP,53/UDP`.
pub(crate) fn job_ports(ports: &[JobPort]) -> String {
    ports
        .iter()
        .map(|p| format!("{}/{}", p.port, validate::protocol_name(p.protocol())))
        .collect::<Vec<_>>()
        .join(",")
}

fn job(j: &Job, wide: bool, now: i64) -> Vec<String> {
    let (name, ns, created) = meta_of(j.metadata.as_ref());
    let spec = j.spec.clone().unwrap_or_default();
    let ready = j.status.as_ref().is_some_and(|s| s.ready);
    let mut row = vec![
        name.to_string(),
        spec.cluster.clone(),
        spec.ip.clone(),
        ready.to_string(),
        or_none(job_ports(&spec.ports)),
        ns.to_string(),
        human::age(created, now),
    ];
    if wide {
        let l = j
            .metadata
            .as_ref()
            .map(|m| labels(&m.labels))
            .unwrap_or_default();
        row.push(validate::probe_text(spec.probe.as_ref()));
        row.push(or_none(l));
    }
    row
}

fn namespace(n: &Namespace, now: i64) -> Vec<String> {
    let (name, _, created) = meta_of(n.metadata.as_ref());
    vec![name.to_string(), human::age(created, now)]
}

/// A tunnel's state as its cluster's gateway last reported it: `up`,
/// `down`, or `unknown` while that gateway is not reporting (NotReady: the
/// report is stale, and what the other gateways see of it is in their rows).
pub(crate) fn tunnel_status(c: &Cluster, p: &PeerHealth) -> &'static str {
    let reporting = c
        .status
        .as_ref()
        .is_some_and(|s| s.phase() != ClusterPhase::NotReady);
    match (reporting, p.up) {
        (false, _) => "unknown",
        (true, true) => "up",
        (true, false) => "down",
    }
}

fn tunnels(c: &Cluster, now: i64) -> Vec<Vec<String>> {
    let (name, _, _) = meta_of(c.metadata.as_ref());
    let Some(status) = c.status.as_ref() else {
        return Vec::new();
    };
    let mut peers: Vec<_> = status.peers.iter().collect();
    peers.sort_by(|a, b| a.peer.cmp(&b.peer));
    peers
        .into_iter()
        .map(|p| {
            let handshake = if p.last_handshake > 0 {
                human::age(p.last_handshake, now)
            } else {
                "never".to_string()
            };
            vec![
                name.to_string(),
                p.peer.clone(),
                tunnel_status(c, p).to_string(),
                handshake,
                human::rtt(p.rtt_us),
                human::bytes(p.rx_bytes),
                human::bytes(p.tx_bytes),
            ]
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use skymesh_proto::v1::{
        ClusterSpec, ClusterStatus, EndpointAddress, EndpointsClusterStatus, EndpointsSpec,
        EndpointsStatus, JobSpec, JobStatus, PeerHealth, Protocol, ServicePort, ServiceSpec,
        ServiceStatus,
    };

    pub(crate) const NOW: i64 = 1_714_564_800;

    pub(crate) fn meta(name: &str, ns: &str, age_s: i64) -> Option<ObjectMeta> {
        Some(ObjectMeta {
            name: name.into(),
            namespace: ns.into(),
            creation_timestamp: NOW - age_s,
            resource_version: 7,
            uid: "u-1".into(),
            ..Default::default()
        })
    }

    pub(crate) fn web_service() -> Service {
        Service {
            metadata: meta("myservice", "default", 45),
            spec: Some(ServiceSpec {
                r#type: ServiceType::ClusterIp as i32,
                selector: [("app".to_string(), "myApp".to_string())].into(),
                ports: vec![
                    ServicePort {
                        name: String::new(),
                        port: 80,
                        target_port: 8080,
                        protocol: Protocol::Tcp as i32,
                    },
                    ServicePort {
                        name: "dns".into(),
                        port: 53,
                        target_port: 0,
                        protocol: Protocol::Udp as i32,
                    },
                ],
                clusters: vec!["mycluster".into()],
                ..Default::default()
            }),
            status: Some(ServiceStatus {
                cluster_ip: "100.65.0.1".into(),
                external_ips: vec![],
            }),
        }
    }

    pub(crate) fn east_cluster() -> Cluster {
        Cluster {
            metadata: meta("east", "", 3 * 3600 + 5 * 60),
            spec: Some(ClusterSpec {
                workload_cidrs: vec!["10.1.0.0/16".into(), "10.11.0.0/16".into()],
            }),
            status: Some(ClusterStatus {
                phase: ClusterPhase::Ready as i32,
                overlay_ip: "100.64.0.1".into(),
                endpoint: "198.51.100.1:51820".into(),
                public_key: "k".into(),
                last_seen: NOW - 3,
                peers: vec![
                    PeerHealth {
                        peer: "west".into(),
                        up: true,
                        last_handshake: NOW - 12,
                        rtt_us: 1234,
                        rx_bytes: 1536,
                        tx_bytes: 100,
                    },
                    PeerHealth {
                        peer: "south".into(),
                        up: false,
                        last_handshake: 0,
                        rtt_us: 0,
                        rx_bytes: 0,
                        tx_bytes: 3 << 20,
                    },
                ],
            }),
        }
    }

    pub(crate) fn endpoints_obj() -> Endpoints {
        let addr = |ip: &str, ready| EndpointAddress {
            ip: ip.into(),
            ports: vec![JobPort {
                name: String::new(),
                port: 8080,
                protocol: Protocol::Tcp as i32,
            }],
            job: format!("job-{ip}"),
            ready,
        };
        Endpoints {
            metadata: meta("myendpoints", "mynamespace", 4 * 86_400),
            spec: Some(EndpointsSpec {
                selector: [("key1".to_string(), "value1".to_string())].into(),
                primary_cluster: "east".into(),
                every_cluster: None,
                clusters: vec![],
            }),
            status: Some(EndpointsStatus {
                clusters: vec![
                    EndpointsClusterStatus {
                        cluster: "east".into(),
                        exposed: true,
                        addresses: vec![
                            addr("10.1.0.5", true),
                            addr("10.1.0.6", true),
                            addr("10.1.0.7", false),
                        ],
                    },
                    EndpointsClusterStatus {
                        cluster: "west".into(),
                        exposed: true,
                        addresses: vec![addr("10.2.0.5", true)],
                    },
                ],
            }),
        }
    }

    #[test]
    fn service_row() {
        let obj = Object::from(web_service());
        let rows = rows(View::Objects(Kind::Service), &obj, false, NOW);
        assert_eq!(
            rows,
            [[
                "myservice",
                "ClusterIP",
                "100.65.0.1",
                "<none>",
                "80:8080/TCP,53:53/UDP",
                "mycluster",
                "default",
                "45s"
            ]]
        );
        let wide = super::rows(View::Objects(Kind::Service), &obj, true, NOW);
        assert_eq!(wide[0][8..], ["app=myApp", "<none>", "<none>"]);
        let mut policed = web_service();
        let spec = policed.spec.as_mut().unwrap();
        spec.upstreams = vec!["shop/db".into()];
        spec.whitelists = vec!["shop/frontend".into(), "ops/*".into()];
        let wide = super::rows(View::Objects(Kind::Service), &policed.into(), true, NOW);
        assert_eq!(wide[0][9..], ["shop/db", "shop/frontend,ops/*"]);
        assert_eq!(
            headers(View::Objects(Kind::Service), true).len(),
            wide[0].len()
        );
    }

    #[test]
    fn headless_and_external_services() {
        let mut s = web_service();
        let spec = s.spec.as_mut().unwrap();
        spec.r#type = ServiceType::Headless as i32;
        spec.clusters.clear();
        s.status = None;
        let r = &rows(View::Objects(Kind::Service), &s.clone().into(), false, NOW)[0];
        assert_eq!(
            (r[1].as_str(), r[2].as_str(), r[5].as_str()),
            ("Headless", "None", "<all>")
        );

        let spec = s.spec.as_mut().unwrap();
        spec.r#type = ServiceType::ExternalName as i32;
        spec.external_name = "db.example.com".into();
        spec.ports.clear();
        let r = &rows(View::Objects(Kind::Service), &s.into(), false, NOW)[0];
        assert_eq!(
            (r[2].as_str(), r[3].as_str(), r[4].as_str()),
            ("<none>", "db.example.com", "<none>")
        );
    }

    #[test]
    fn endpoints_rows() {
        let obj = Object::from(endpoints_obj());
        let r = &rows(View::Objects(Kind::Endpoints), &obj, false, NOW)[0];
        assert_eq!(r, &["myendpoints", "mynamespace", "east: 2, west: 1", "4d"]);
        let r = &rows(View::Objects(Kind::Endpoints), &obj, true, NOW)[0];
        assert_eq!(
            r[2],
            "east: 10.1.0.5:8080,10.1.0.6:8080; west: 10.2.0.5:8080"
        );
        assert_eq!(r[4], "key1=value1");
        let empty = Object::from(Endpoints {
            metadata: meta("e", "default", 1),
            ..Default::default()
        });
        assert_eq!(
            rows(View::Objects(Kind::Endpoints), &empty, false, NOW)[0][2],
            "<none>"
        );
    }

    #[test]
    fn cluster_row() {
        let obj = Object::from(east_cluster());
        let r = &rows(View::Objects(Kind::Cluster), &obj, false, NOW)[0];
        assert_eq!(
            r,
            &[
                "east",
                "Ready",
                "100.64.0.1",
                "198.51.100.1:51820",
                "10.1.0.0/16,10.11.0.0/16",
                "1/2",
                "3h5m"
            ]
        );
        let pending = Object::from(Cluster {
            metadata: meta("c", "", 10),
            spec: Some(ClusterSpec {
                workload_cidrs: vec!["10.1.0.0/16".into()],
            }),
            status: Some(ClusterStatus {
                phase: ClusterPhase::Pending as i32,
                ..Default::default()
            }),
        });
        let r = &rows(View::Objects(Kind::Cluster), &pending, true, NOW)[0];
        assert_eq!(
            &r[1..6],
            &["Pending", "<none>", "<none>", "10.1.0.0/16", "0/0"]
        );
        assert_eq!(r[7], "never");
    }

    #[test]
    fn tunnel_rows_sorted_by_peer() {
        let obj = Object::from(east_cluster());
        let r = rows(View::Tunnels, &obj, false, NOW);
        assert_eq!(
            r,
            [
                ["east", "south", "down", "never", "-", "0B", "3.0MiB"],
                ["east", "west", "up", "12s", "1.2ms", "1.5KiB", "100B"],
            ]
        );
        let other = Object::from(web_service());
        assert!(rows(View::Tunnels, &other, false, NOW).is_empty());
        // A gateway that stopped reporting: its tunnels are unknown, and
        // its cluster row does not count them up.
        let mut gone = east_cluster();
        gone.status.as_mut().unwrap().phase = ClusterPhase::NotReady as i32;
        let gone = Object::from(gone);
        let r = rows(View::Tunnels, &gone, false, NOW);
        assert_eq!((r[0][2].as_str(), r[1][2].as_str()), ("unknown", "unknown"));
        let c = rows(View::Objects(Kind::Cluster), &gone, false, NOW);
        assert_eq!((c[0][1].as_str(), c[0][5].as_str()), ("NotReady", "?/2"));
    }

    #[test]
    fn job_and_namespace_rows() {
        let j = Object::from(Job {
            metadata: meta("web-1", "default", 180),
            spec: Some(JobSpec {
                cluster: "east".into(),
                ip: "10.1.0.5".into(),
                ports: vec![JobPort {
                    name: "http".into(),
                    port: 8080,
                    protocol: Protocol::Tcp as i32,
                }],
                probe: None,
            }),
            status: Some(JobStatus { ready: true }),
        });
        assert_eq!(
            rows(View::Objects(Kind::Job), &j, false, NOW)[0],
            [
                "web-1", "east", "10.1.0.5", "true", "8080/TCP", "default", "3m"
            ]
        );
        let n = Object::from(Namespace {
            metadata: meta("default", "", 86_400 * 30),
        });
        assert_eq!(
            rows(View::Objects(Kind::Namespace), &n, false, NOW)[0],
            ["default", "30d"]
        );
    }

    #[test]
    fn headers_match_spec() {
        assert_eq!(
            headers(View::Objects(Kind::Service), false).join(" "),
            "NAME TYPE CLUSTER-IP EXTERNAL-IP PORTS CLUSTERS NAMESPACE AGE"
        );
        assert_eq!(
            headers(View::Objects(Kind::Endpoints), false).join(" "),
            "NAME NAMESPACE ENDPOINTS AGE"
        );
        assert_eq!(
            headers(View::Objects(Kind::Cluster), false).join(" "),
            "NAME STATUS OVERLAY-IP ENDPOINT WORKLOAD-CIDRS PEERS AGE"
        );
        assert_eq!(
            headers(View::Tunnels, false).join(" "),
            "CLUSTER PEER STATUS HANDSHAKE RTT RX TX"
        );
    }
}
