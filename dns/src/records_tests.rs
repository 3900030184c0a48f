//! Unit tests of record synthesis ([`crate::records`]), without a server.

use std::collections::HashSet;
use std::sync::Arc;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Name, RData, RecordType};
use skymesh_proto::v1::{
    EndpointAddress, Endpoints, EndpointsClusterSpec, EndpointsClusterStatus, EndpointsSpec,
    EndpointsStatus, JobPort, ObjectMeta, Protocol, Service, ServicePort, ServiceSpec,
    ServiceStatus, ServiceType,
};

use crate::records::{SRV_PRIORITY, SRV_WEIGHT, parse_zone, ptr_name, reverse_zones};
use crate::{Answer, DnsConfig, MeshView, RecordSet};

const CLUSTER: &str = "east";

fn meta(ns: &str, name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        namespace: ns.into(),
        ..ObjectMeta::default()
    })
}

fn port(name: &str, port: u32, target: u32, protocol: Protocol) -> ServicePort {
    ServicePort {
        name: name.into(),
        port,
        target_port: target,
        protocol: protocol.into(),
    }
}

fn service(
    ns: &str,
    name: &str,
    ty: ServiceType,
    vip: &str,
    clusters: &[&str],
    ports: Vec<ServicePort>,
) -> Service {
    Service {
        metadata: meta(ns, name),
        spec: Some(ServiceSpec {
            r#type: ty.into(),
            ports,
            clusters: clusters.iter().map(|c| (*c).to_owned()).collect(),
            ..ServiceSpec::default()
        }),
        status: Some(ServiceStatus {
            cluster_ip: vip.into(),
            external_ips: vec![],
        }),
    }
}

fn external(ns: &str, name: &str, target: &str) -> Service {
    let mut s = service(ns, name, ServiceType::ExternalName, "", &[], vec![]);
    if let Some(spec) = s.spec.as_mut() {
        spec.external_name = target.into();
    }
    s
}

/// `(job, ip, ready)` addresses of one cluster entry.
fn entry(cluster: &str, exposed: bool, addrs: &[(&str, &str, bool)]) -> EndpointsClusterStatus {
    EndpointsClusterStatus {
        cluster: cluster.into(),
        exposed,
        addresses: addrs
            .iter()
            .map(|(job, ip, ready)| EndpointAddress {
                ip: (*ip).into(),
                ports: vec![JobPort {
                    name: "metrics".into(),
                    port: 9100,
                    protocol: Protocol::Tcp.into(),
                }],
                job: (*job).into(),
                ready: *ready,
            })
            .collect(),
    }
}

fn endpoints(
    ns: &str,
    name: &str,
    spec_exposed: bool,
    entries: Vec<EndpointsClusterStatus>,
) -> Endpoints {
    Endpoints {
        metadata: meta(ns, name),
        spec: Some(EndpointsSpec {
            primary_cluster: "west".into(),
            every_cluster: None,
            clusters: vec![EndpointsClusterSpec {
                cluster: "west".into(),
                num_endpoints: 0,
                exposed: spec_exposed,
            }],
            ..EndpointsSpec::default()
        }),
        status: Some(EndpointsStatus { clusters: entries }),
    }
}

fn config() -> DnsConfig {
    DnsConfig {
        service_cidr: Some("100.65.0.0/16".parse().unwrap()),
        ..DnsConfig::default()
    }
}

fn view(services: Vec<Service>, endpoints: Vec<Endpoints>) -> MeshView {
    MeshView {
        cluster: CLUSTER.into(),
        services: services.into_iter().map(Arc::new).collect(),
        endpoints: endpoints.into_iter().map(Arc::new).collect(),
        local_unready: HashSet::new(),
        local_cidrs: Vec::new(),
    }
}

fn ask(set: &RecordSet, name: &str, qtype: RecordType) -> Answer {
    set.lookup(&LowerName::new(&Name::from_ascii(name).unwrap()), qtype)
}

/// The answer's A/AAAA addresses, sorted.
fn addrs(answer: &Answer) -> Vec<String> {
    let mut out: Vec<String> = answer
        .answer_records()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            RData::AAAA(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

/// `(priority, weight, port, target)` of the answer's SRV records, sorted.
fn srvs(answer: &Answer) -> Vec<(u16, u16, u16, String)> {
    let mut out: Vec<_> = answer
        .answer_records()
        .filter_map(|r| match &r.data {
            RData::SRV(s) => Some((s.priority, s.weight, s.port, s.target.to_string())),
            _ => None,
        })
        .collect();
    out.sort();
    out
}

fn assert_negative(answer: &Answer, rcode: ResponseCode, zone: &str) {
    assert_eq!(answer.rcode, rcode, "{answer:?}");
    assert!(answer.answers.is_empty(), "{answer:?}");
    let soa: Vec<_> = answer.authority_records().collect();
    assert_eq!(soa.len(), 1, "{answer:?}");
    assert_eq!(soa[0].name.to_string(), zone);
    match &soa[0].data {
        RData::SOA(soa) => assert_eq!(soa.minimum, 5),
        other => panic!("not a SOA: {other:?}"),
    }
}

fn web() -> Service {
    service(
        "default",
        "web",
        ServiceType::ClusterIp,
        "100.65.0.10",
        &[],
        vec![
            port("http", 80, 8080, Protocol::Tcp),
            port("dns", 53, 0, Protocol::Udp),
            port("", 9000, 9000, Protocol::Tcp),
        ],
    )
}

#[test]
fn vip_a_record_in_both_zones_with_ttl_5() {
    let set = RecordSet::build(&view(vec![web()], vec![]), &config());
    for name in ["web.default.svc.", "web.default.svc.clusterset.local."] {
        let answer = ask(&set, name, RecordType::A);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        assert_eq!(addrs(&answer), ["100.65.0.10"], "{name}");
        assert!(answer.answer_records().all(|r| r.ttl == 5));
        assert!(answer.authority.is_empty());
    }
}

#[test]
fn names_are_case_insensitive() {
    let mut svc = web();
    svc.metadata = meta("Default", "myService");
    let set = RecordSet::build(&view(vec![svc], vec![]), &config());
    let answer = ask(&set, "MYSERVICE.default.Svc.", RecordType::A);
    assert_eq!(addrs(&answer), ["100.65.0.10"]);
    assert_eq!(
        addrs(&ask(
            &set,
            "myservice.DEFAULT.svc.CLUSTERSET.local.",
            RecordType::A
        )),
        ["100.65.0.10"]
    );
}

#[test]
fn service_not_exposed_here_is_nxdomain_with_soa() {
    let west_only = service(
        "default",
        "api",
        ServiceType::ClusterIp,
        "100.65.0.11",
        &["west"],
        vec![],
    );
    let here = service(
        "default",
        "db",
        ServiceType::ClusterIp,
        "100.65.0.12",
        &["west", "EAST"],
        vec![],
    );
    let set = RecordSet::build(&view(vec![west_only, here], vec![]), &config());
    assert_negative(
        &ask(&set, "api.default.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
    assert_negative(
        &ask(&set, "api.default.svc.clusterset.local.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.clusterset.local.",
    );
    assert_negative(
        &ask(&set, "11.0.65.100.in-addr.arpa.", RecordType::PTR),
        ResponseCode::NXDomain,
        "65.100.in-addr.arpa.",
    );
    assert_eq!(
        addrs(&ask(&set, "db.default.svc.", RecordType::A)),
        ["100.65.0.12"]
    );
}

#[test]
fn unknown_names_are_nxdomain_and_known_names_nodata() {
    let set = RecordSet::build(&view(vec![web()], vec![]), &config());
    assert_negative(
        &ask(&set, "nope.default.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
    assert_negative(
        &ask(&set, "web.other.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
    // The name exists, not with this type.
    let aaaa = ask(&set, "web.default.svc.", RecordType::AAAA);
    assert!(aaaa.is_nodata());
    assert_negative(&aaaa, ResponseCode::NoError, "svc.");
    // Empty non-terminals exist (RFC 8020).
    assert_negative(
        &ask(&set, "default.svc.", RecordType::A),
        ResponseCode::NoError,
        "svc.",
    );
    assert_negative(
        &ask(&set, "_tcp.web.default.svc.", RecordType::SRV),
        ResponseCode::NoError,
        "svc.",
    );
    // The apex has data but no A.
    assert_negative(
        &ask(&set, "svc.", RecordType::A),
        ResponseCode::NoError,
        "svc.",
    );
}

#[test]
fn apex_has_soa_and_ns_with_glue() {
    let set = RecordSet::build_with_serial(&view(vec![], vec![]), &config(), 7);
    assert_eq!(set.serial(), 7);
    let soa = ask(&set, "svc.clusterset.local.", RecordType::SOA);
    match &soa.answer_records().next().unwrap().data {
        RData::SOA(s) => {
            assert_eq!(s.serial, 7);
            assert_eq!(s.minimum, 5);
            assert_eq!(s.mname.to_string(), "ns.dns.svc.clusterset.local.");
            assert_eq!(s.rname.to_string(), "hostmaster.svc.clusterset.local.");
        }
        other => panic!("not a SOA: {other:?}"),
    }
    let ns = ask(&set, "svc.", RecordType::NS);
    let targets: Vec<String> = ns.answer_records().map(|r| r.data.to_string()).collect();
    assert_eq!(targets, ["ns.dns.svc."]);
    // The listen address (127.0.0.1:53 by default) is the NS glue.
    assert_eq!(
        addrs(&ask(&set, "ns.dns.svc.", RecordType::A)),
        ["127.0.0.1"]
    );
    let rev = ask(&set, "65.100.in-addr.arpa.", RecordType::SOA);
    assert_eq!(rev.rcode, ResponseCode::NoError);
    assert_eq!(rev.answers.len(), 1);
}

#[test]
fn vip_srv_records_for_named_ports() {
    let set = RecordSet::build(&view(vec![web()], vec![]), &config());
    let http = ask(&set, "_http._tcp.web.default.svc.", RecordType::SRV);
    assert_eq!(
        srvs(&http),
        [(SRV_PRIORITY, SRV_WEIGHT, 80, "web.default.svc.".to_owned())]
    );
    let dns = ask(
        &set,
        "_dns._udp.web.default.svc.clusterset.local.",
        RecordType::SRV,
    );
    assert_eq!(
        srvs(&dns),
        [(0, 100, 53, "web.default.svc.clusterset.local.".to_owned())]
    );
    // Wrong protocol, unnamed port: nothing.
    assert_negative(
        &ask(&set, "_http._udp.web.default.svc.", RecordType::SRV),
        ResponseCode::NXDomain,
        "svc.",
    );
    assert_negative(
        &ask(&set, "_._tcp.web.default.svc.", RecordType::SRV),
        ResponseCode::NXDomain,
        "svc.",
    );
}

fn headless_view() -> MeshView {
    let svc = service(
        "shop",
        "cart",
        ServiceType::Headless,
        "",
        &[],
        vec![port("http", 80, 8080, Protocol::Tcp)],
    );
    let ep = endpoints(
        "shop",
        "cart",
        true,
        vec![
            entry(
                "east",
                false,
                &[
                    ("cart-e1", "10.1.0.1", true),
                    ("cart-e2", "10.1.0.2", true),
                    ("cart-e3", "10.1.0.3", false),
                ],
            ),
            entry(
                "west",
                true,
                &[("cart-w1", "10.2.0.1", true), ("cart-w2", "10.2.0.2", true)],
            ),
            entry("north", false, &[("cart-n1", "10.3.0.1", true)]),
        ],
    );
    let mut v = view(vec![svc], vec![ep]);
    v.local_unready.insert(("shop".into(), "cart-w2".into()));
    v
}

#[test]
fn headless_answers_every_visible_ready_replica_across_clusters() {
    let set = RecordSet::build(&headless_view(), &config());
    let answer = ask(&set, "cart.shop.svc.", RecordType::A);
    // east: local, so visible although not exposed; e3 not ready.
    // west: exposed; w2 fails local health checks. north: neither.
    assert_eq!(addrs(&answer), ["10.1.0.1", "10.1.0.2", "10.2.0.1"]);
    assert_eq!(
        addrs(&ask(&set, "cart.shop.svc.clusterset.local.", RecordType::A)),
        addrs(&answer)
    );
    assert_eq!(
        addrs(&ask(&set, "cart-w1.cart.shop.svc.", RecordType::A)),
        ["10.2.0.1"]
    );
    assert_negative(
        &ask(&set, "cart-w2.cart.shop.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
    assert_negative(
        &ask(&set, "cart-n1.cart.shop.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
    // No VIP, so no PTR either.
    assert!(ask(&set, "cart.shop.svc.", RecordType::PTR).is_nodata());
}

#[test]
fn headless_srv_per_replica_with_target_port() {
    let set = RecordSet::build(&headless_view(), &config());
    let answer = ask(&set, "_http._tcp.cart.shop.svc.", RecordType::SRV);
    assert_eq!(
        srvs(&answer),
        [
            (0, 100, 8080, "cart-e1.cart.shop.svc.".to_owned()),
            (0, 100, 8080, "cart-e2.cart.shop.svc.".to_owned()),
            (0, 100, 8080, "cart-w1.cart.shop.svc.".to_owned()),
        ]
    );
}

#[test]
fn headless_without_endpoints_is_nodata() {
    let svc = service("shop", "empty", ServiceType::Headless, "", &[], vec![]);
    let set = RecordSet::build(&view(vec![svc], vec![]), &config());
    assert_negative(
        &ask(&set, "empty.shop.svc.", RecordType::A),
        ResponseCode::NoError,
        "svc.",
    );
}

#[test]
fn service_without_vip_yet_is_nodata() {
    let svc = service(
        "default",
        "new",
        ServiceType::ClusterIp,
        "",
        &[],
        vec![port("http", 80, 80, Protocol::Tcp)],
    );
    let set = RecordSet::build(&view(vec![svc], vec![]), &config());
    assert!(ask(&set, "new.default.svc.", RecordType::A).is_nodata());
}

#[test]
fn node_port_and_load_balancer_get_their_vip() {
    let np = service(
        "default",
        "np",
        ServiceType::NodePort,
        "100.65.1.1",
        &[],
        vec![],
    );
    let lb = service(
        "default",
        "lb",
        ServiceType::LoadBalancer,
        "100.65.1.2",
        &[],
        vec![],
    );
    let set = RecordSet::build(&view(vec![np, lb], vec![]), &config());
    assert_eq!(
        addrs(&ask(&set, "np.default.svc.", RecordType::A)),
        ["100.65.1.1"]
    );
    assert_eq!(
        addrs(&ask(&set, "lb.default.svc.", RecordType::A)),
        ["100.65.1.2"]
    );
}

#[test]
fn ptr_for_vips_points_into_the_first_zone() {
    let set = RecordSet::build(&view(vec![web()], vec![]), &config());
    let answer = ask(&set, "10.0.65.100.in-addr.arpa.", RecordType::PTR);
    let targets: Vec<String> = answer
        .answer_records()
        .map(|r| r.data.to_string())
        .collect();
    assert_eq!(targets, ["web.default.svc."]);
    assert_eq!(
        ptr_name("100.65.0.10".parse().unwrap())
            .unwrap()
            .to_string(),
        "10.0.65.100.in-addr.arpa."
    );
    assert_negative(
        &ask(&set, "99.0.65.100.in-addr.arpa.", RecordType::PTR),
        ResponseCode::NXDomain,
        "65.100.in-addr.arpa.",
    );
    // Outside the service CIDR's reverse zone: not ours.
    assert_eq!(
        ask(&set, "1.0.0.10.in-addr.arpa.", RecordType::PTR).rcode,
        ResponseCode::Refused
    );
}

#[test]
fn no_reverse_zone_without_service_cidr() {
    let cfg = DnsConfig::default();
    let set = RecordSet::build(&view(vec![web()], vec![]), &cfg);
    assert_eq!(
        ask(&set, "10.0.65.100.in-addr.arpa.", RecordType::PTR).rcode,
        ResponseCode::Refused
    );
    let origins: Vec<String> = RecordSet::origins(&cfg)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(origins, ["svc.", "svc.clusterset.local."]);
}

#[test]
fn reverse_zones_follow_octet_boundaries() {
    let z = |cidr: &str| -> Vec<String> {
        reverse_zones(cidr.parse().unwrap())
            .iter()
            .map(ToString::to_string)
            .collect()
    };
    assert_eq!(z("100.65.0.0/16"), ["65.100.in-addr.arpa."]);
    assert_eq!(z("100.65.7.0/24"), ["7.65.100.in-addr.arpa."]);
    assert_eq!(z("10.0.0.0/8"), ["10.in-addr.arpa."]);
    let twelve = z("100.64.0.0/12");
    assert_eq!(twelve.len(), 16);
    assert_eq!(twelve[0], "64.100.in-addr.arpa.");
    assert_eq!(twelve[15], "79.100.in-addr.arpa.");
    assert_eq!(z("100.65.16.0/20").len(), 16);
}

#[test]
fn external_name_is_a_cname() {
    let set = RecordSet::build(
        &view(vec![external("default", "ext", "Example.COM")], vec![]),
        &config(),
    );
    for qtype in [RecordType::A, RecordType::CNAME, RecordType::AAAA] {
        let answer = ask(&set, "ext.default.svc.", qtype);
        assert_eq!(answer.rcode, ResponseCode::NoError);
        let data: Vec<String> = answer
            .answer_records()
            .map(|r| r.data.to_string())
            .collect();
        assert_eq!(data, ["example.com."], "{qtype}");
    }
}

#[test]
fn cname_into_the_mesh_is_followed() {
    let alias = external("default", "alias", "web.default.svc");
    let set = RecordSet::build(&view(vec![alias, web()], vec![]), &config());
    let answer = ask(&set, "alias.default.svc.", RecordType::A);
    let types: Vec<RecordType> = answer.answer_records().map(|r| r.record_type()).collect();
    assert_eq!(types, [RecordType::CNAME, RecordType::A]);
    assert_eq!(addrs(&answer), ["100.65.0.10"]);
    // A loop ends.
    let a = external("default", "a", "b.default.svc");
    let b = external("default", "b", "a.default.svc");
    let set = RecordSet::build(&view(vec![a, b], vec![]), &config());
    assert_eq!(ask(&set, "a.default.svc.", RecordType::A).answers.len(), 2);
}

#[test]
fn standalone_exposed_endpoints_resolve_like_headless() {
    let exposed = endpoints(
        "default",
        "legacy",
        true,
        vec![entry(
            "west",
            true,
            &[("db-0", "10.2.0.7", true), ("db-1", "10.2.0.8", false)],
        )],
    );
    let hidden = endpoints(
        "default",
        "hidden",
        false,
        vec![entry("west", false, &[("x-0", "10.2.0.9", true)])],
    );
    let set = RecordSet::build(&view(vec![], vec![exposed, hidden]), &config());
    assert_eq!(
        addrs(&ask(&set, "legacy.default.svc.", RecordType::A)),
        ["10.2.0.7"]
    );
    assert_eq!(
        addrs(&ask(
            &set,
            "db-0.legacy.default.svc.clusterset.local.",
            RecordType::A
        )),
        ["10.2.0.7"]
    );
    // SRV from the addresses' own named ports.
    let srv = ask(&set, "_metrics._tcp.legacy.default.svc.", RecordType::SRV);
    assert_eq!(
        srvs(&srv),
        [(0, 100, 9100, "db-0.legacy.default.svc.".to_owned())]
    );
    assert_negative(
        &ask(&set, "hidden.default.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
}

#[test]
fn endpoints_of_a_vip_service_are_not_standalone() {
    let ep = endpoints(
        "default",
        "web",
        true,
        vec![entry("east", true, &[("web-0", "10.1.0.5", true)])],
    );
    let set = RecordSet::build(&view(vec![web()], vec![ep]), &config());
    assert_eq!(
        addrs(&ask(&set, "web.default.svc.", RecordType::A)),
        ["100.65.0.10"]
    );
    assert_negative(
        &ask(&set, "web-0.web.default.svc.", RecordType::A),
        ResponseCode::NXDomain,
        "svc.",
    );
}

#[test]
fn hundred_replicas_all_answered() {
    let addrs_list: Vec<(String, String)> = (0..100)
        .map(|i| {
            (
                format!("big-{i}"),
                format!("10.9.{}.{}", i / 250, i % 250 + 1),
            )
        })
        .collect();
    let borrowed: Vec<(&str, &str, bool)> = addrs_list
        .iter()
        .map(|(j, ip)| (j.as_str(), ip.as_str(), true))
        .collect();
    let svc = service("default", "big", ServiceType::Headless, "", &[], vec![]);
    let ep = endpoints("default", "big", true, vec![entry("west", true, &borrowed)]);
    let set = RecordSet::build(&view(vec![svc], vec![ep]), &config());
    assert_eq!(
        addrs(&ask(&set, "big.default.svc.", RecordType::A)).len(),
        100
    );
}

#[test]
fn any_returns_every_rrset_of_the_name() {
    let set = RecordSet::build(&view(vec![], vec![]), &config());
    let answer = ask(&set, "svc.", RecordType::ANY);
    let mut types: Vec<RecordType> = answer.answer_records().map(|r| r.record_type()).collect();
    types.sort_by_key(|t| u16::from(*t));
    assert_eq!(types, [RecordType::NS, RecordType::SOA]);
}

#[test]
fn names_outside_the_zones_are_refused() {
    let set = RecordSet::build(&view(vec![web()], vec![]), &config());
    assert_eq!(
        ask(&set, "example.com.", RecordType::A).rcode,
        ResponseCode::Refused
    );
    assert_eq!(
        ask(&set, "clusterset.local.", RecordType::A).rcode,
        ResponseCode::Refused
    );
}

#[test]
fn custom_zones_and_invalid_zones() {
    assert!(parse_zone("").is_err());
    assert!(parse_zone(".").is_err());
    assert_eq!(
        parse_zone("Mesh.Example.").unwrap().to_string(),
        "mesh.example."
    );
    let cfg = DnsConfig {
        zones: vec![
            "mesh.example".into(),
            "bad..zone".into(),
            "MESH.example".into(),
        ],
        ..DnsConfig::default()
    };
    let origins: Vec<String> = RecordSet::origins(&cfg)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(origins, ["mesh.example."]);
    let set = RecordSet::build(&view(vec![web()], vec![]), &cfg);
    assert_eq!(
        addrs(&ask(&set, "web.default.mesh.example.", RecordType::A)),
        ["100.65.0.10"]
    );
    assert_eq!(
        ask(&set, "web.default.svc.", RecordType::A).rcode,
        ResponseCode::Refused
    );
}

#[test]
fn empty_namespace_means_default_and_bad_names_are_skipped() {
    let mut svc = web();
    svc.metadata = meta("", "web");
    let mut bad = web();
    bad.metadata = meta("default", "not a label");
    let set = RecordSet::build(&view(vec![svc, bad], vec![]), &config());
    assert_eq!(
        addrs(&ask(&set, "web.default.svc.", RecordType::A)),
        ["100.65.0.10"]
    );
}
