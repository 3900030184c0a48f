//! Unit tests for [`crate::validate`].

use crate::v1::{
    Cluster, ClusterSpec, Job, JobSpec, Object, ObjectMeta, Probe, ProbeType, Protocol, Service,
    ServicePort, ServiceSpec, ServiceType, object::Obj,
};
use crate::validate::{self, *};

fn meta(name: &str) -> Option<ObjectMeta> {
    Some(ObjectMeta {
        name: name.into(),
        ..Default::default()
    })
}

#[test]
fn names_fold_case_and_follow_dns_1123() {
    assert_eq!(name("f", "myService").unwrap(), "myservice");
    assert_eq!(name("f", "a-1").unwrap(), "a-1");
    for bad in ["", "-a", "a-", "a_b", "a.b", &"x".repeat(64), "é"] {
        let e = name("metadata.name", bad).unwrap_err();
        assert_eq!(e.field, "metadata.name", "{bad}");
    }
    assert!(name("f", &"x".repeat(63)).is_ok());
}

#[test]
fn cidrs_ips_ports() {
    assert_eq!(cidr("c", "10.1.0.0/16").unwrap().to_string(), "10.1.0.0/16");
    let e = cidr("c", "10.1.0.5/16").unwrap_err();
    assert!(e.rule.contains("did you mean 10.1.0.0/16"), "{e}");
    assert!(cidr("c", "10.1.0.0/33").is_err());
    assert!(cidr("c", "banana").is_err());
    assert!(cidr("c", "fd00::/8").is_err());
    assert!(ip("i", "10.0.0.1").is_ok());
    assert!(ip("i", "10.0.0.256").is_err());
    assert!(ip("i", "::1").is_err());
    assert!(port("p", 0).is_err());
    assert!(port("p", 65536).is_err());
    assert_eq!(port("p", 65535).unwrap(), 65535);
}

#[test]
fn selectors() {
    let s = selector("spec.selector", &["app=myApp", "tier=web,env=prod"]).unwrap();
    assert_eq!(s.len(), 3);
    assert_eq!(s["app"], "myApp");
    for bad in ["app", "=x", "a=b=c", "a b=c", "a=-x"] {
        let e = selector("spec.selector", &[bad]).unwrap_err();
        assert_eq!(e.field, "spec.selector", "{bad}");
    }
    assert!(selector("s", &["a=1", "a=2"]).is_err());
    assert!(selector("s", &["example.com/app=x", "a="]).is_ok());
}

#[test]
fn service_ports_parse() {
    let p = parse_service_port("p", "80:8080").unwrap();
    assert_eq!(
        (p.port, p.target_port, p.protocol),
        (80, 8080, Protocol::Tcp as i32)
    );
    let p = parse_service_port("p", "dns:53:5353/udp").unwrap();
    assert_eq!(p.name, "dns");
    assert_eq!(p.protocol, Protocol::Udp as i32);
    assert_eq!(parse_service_port("p", "443").unwrap().target_port, 443);
    for bad in ["0:80", "80:70000", "80:8080/SCTP", "a:b:c:d", "x:80", "80:"] {
        assert!(parse_service_port("p", bad).is_err(), "{bad}");
    }
    let j = parse_job_port("port", "http:8080").unwrap();
    assert_eq!((j.name.as_str(), j.port), ("http", 8080));
}

#[test]
fn enums_parse_in_any_case() {
    assert_eq!(
        parse_service_type("t", "clusterip").unwrap(),
        ServiceType::ClusterIp
    );
    assert_eq!(
        parse_service_type("t", "LoadBalancer").unwrap(),
        ServiceType::LoadBalancer
    );
    assert!(parse_service_type("t", "Gateway").is_err());
    assert!(parse_traffic_policy("t", "PreferLocal").is_ok());
    assert!(parse_session_affinity("t", "ClientIP").is_ok());
    assert!(parse_protocol("t", "sctp").is_err());
}

#[test]
fn service_objects_normalise() {
    let mut o: Object = Service {
        metadata: meta("myService"),
        spec: Some(ServiceSpec {
            ports: vec![ServicePort {
                port: 80,
                ..Default::default()
            }],
            clusters: vec!["B".into(), "a".into(), "b".into()],
            ..Default::default()
        }),
        status: None,
    }
    .into();
    validate::object(&mut o).unwrap();
    assert_eq!(o.name(), "myservice");
    assert_eq!(o.namespace(), "default");
    let crate::v1::object::Obj::Service(s) = o.obj.unwrap() else {
        panic!("kind changed")
    };
    let spec = s.spec.unwrap();
    assert_eq!(spec.r#type, ServiceType::ClusterIp as i32);
    assert_eq!(spec.ports[0].target_port, 80);
    assert_eq!(spec.clusters, vec!["a", "b"]);
    assert_eq!(spec.affinity_timeout_s, DEFAULT_AFFINITY_TIMEOUT_S);
}

#[test]
fn service_rules() {
    let svc = |spec: ServiceSpec| -> Object {
        Service {
            metadata: meta("s"),
            spec: Some(spec),
            status: None,
        }
        .into()
    };
    let p80 = vec![ServicePort {
        port: 80,
        ..Default::default()
    }];
    let cases = [
        (ServiceSpec::default(), "spec.ports"),
        (
            ServiceSpec {
                ports: p80.clone(),
                affinity_timeout_s: 86_401,
                ..Default::default()
            },
            "spec.affinity_timeout_s",
        ),
        (
            ServiceSpec {
                r#type: ServiceType::ExternalName as i32,
                ..Default::default()
            },
            "spec.external_name",
        ),
        (
            ServiceSpec {
                ports: vec![p80[0].clone(), p80[0].clone()],
                ..Default::default()
            },
            "spec.ports[1].port",
        ),
        (
            ServiceSpec {
                ports: p80.clone(),
                r#type: 99,
                ..Default::default()
            },
            "spec.type",
        ),
    ];
    for (spec, field) in cases {
        let e = validate::object(&mut svc(spec)).unwrap_err();
        assert_eq!(e.field, field, "{e}");
    }
    let mut headless = svc(ServiceSpec {
        r#type: ServiceType::Headless as i32,
        ..Default::default()
    });
    validate::object(&mut headless).unwrap();
}

#[test]
fn clusters_and_jobs() {
    let mut c: Object = Cluster {
        metadata: meta("East"),
        spec: Some(ClusterSpec {
            workload_cidrs: vec!["10.1.0.0/16".into(), "10.1.2.0/24".into()],
        }),
        status: None,
    }
    .into();
    let e = validate::object(&mut c).unwrap_err();
    assert_eq!(e.field, "spec.workload_cidrs[1]");
    let mut c: Object = Cluster {
        metadata: meta("East"),
        spec: Some(ClusterSpec::default()),
        status: None,
    }
    .into();
    assert_eq!(
        validate::object(&mut c).unwrap_err().field,
        "spec.workload_cidrs"
    );
    let mut j: Object = Job {
        metadata: meta("web-1"),
        spec: Some(JobSpec {
            cluster: "East".into(),
            ip: "10.1.0.300".into(),
            ports: vec![],
            probe: None,
        }),
        status: None,
    }
    .into();
    assert_eq!(validate::object(&mut j).unwrap_err().field, "spec.ip");
    let mut ns: Object = crate::v1::Namespace {
        metadata: Some(ObjectMeta {
            name: "x".into(),
            namespace: "y".into(),
            ..Default::default()
        }),
    }
    .into();
    assert_eq!(
        validate::object(&mut ns).unwrap_err().field,
        "metadata.namespace"
    );
}

/// A job with these ports and probe, validated: the error's field, or the
/// normalised probe.
fn job_probe(ports: &[&str], probe: &str) -> std::result::Result<Option<Probe>, String> {
    let probe = validate::parse_probe("--probe", probe).map_err(|e| e.field)?;
    let mut j: Object = Job {
        metadata: meta("web-1"),
        spec: Some(JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.3".into(),
            ports: ports
                .iter()
                .map(|p| validate::parse_job_port("--port", p).unwrap())
                .collect(),
            probe: Some(probe),
        }),
        status: None,
    }
    .into();
    validate::object(&mut j).map_err(|e| e.field)?;
    let Some(Obj::Job(j)) = j.obj else {
        unreachable!()
    };
    Ok(j.spec.unwrap().probe)
}

#[test]
fn probes_parse_and_fit_the_job() {
    let p = |s: &str| validate::parse_probe("--probe", s);
    assert_eq!(p("HTTP:8080/healthz").unwrap().r#type(), ProbeType::Http);
    assert_eq!(p("http:8080/healthz").unwrap().port, 8080);
    assert_eq!(p("http:/healthz").unwrap().path, "/healthz");
    assert_eq!(p("udp:53").unwrap().port, 53);
    assert_eq!(p("icmp").unwrap().r#type(), ProbeType::Icmp);
    assert_eq!(p("none").unwrap().r#type(), ProbeType::None);
    for bad in [
        "ping",
        "",
        "icmp:1",
        "none:/x",
        "tcp:0",
        "tcp:",
        "udp:x",
        "http:",
        "http:99999/x",
    ] {
        let e = p(bad).unwrap_err();
        assert_eq!(e.field, "--probe", "{bad:?}");
        assert!(!e.rule.contains('\n'), "one line: {e}");
    }
    // Every type round-trips through its text.
    for s in [
        "tcp",
        "tcp:8080",
        "http:/",
        "http:8080/healthz",
        "icmp",
        "udp",
        "udp:53",
        "none",
    ] {
        assert_eq!(validate::probe_text(Some(&p(s).unwrap())), s);
    }
    assert_eq!(validate::probe_text(None), "tcp");

    // Against the job's ports.
    assert_eq!(
        job_probe(&["8080"], "http").unwrap().unwrap().path,
        "/",
        "an empty path is /"
    );
    assert!(job_probe(&["53/udp"], "udp").is_ok());
    assert!(job_probe(&[], "icmp").is_ok());
    assert!(job_probe(&[], "none").is_ok());
    assert!(job_probe(&[], "udp:53").is_ok());
    assert_eq!(
        job_probe(&["53/udp"], "tcp").unwrap_err(),
        "spec.probe.port"
    );
    assert_eq!(
        job_probe(&["53/udp"], "http:/x").unwrap_err(),
        "spec.probe.port"
    );
    assert_eq!(job_probe(&["8080"], "udp").unwrap_err(), "spec.probe.port");
    assert_eq!(
        job_probe(&["8080"], "http:/a b").unwrap_err(),
        "spec.probe.path"
    );
    let long = format!("http:/{}", "a".repeat(validate::MAX_PROBE_PATH_LEN));
    assert_eq!(job_probe(&["8080"], &long).unwrap_err(), "spec.probe.path");

    // Probes written by hand (the API) get the same checks.
    let mut j: Object = Job {
        metadata: meta("web-1"),
        spec: Some(JobSpec {
            cluster: "east".into(),
            ip: "10.1.0.3".into(),
            ports: vec![],
            probe: Some(Probe {
                r#type: 9,
                ..Default::default()
            }),
        }),
        status: None,
    }
    .into();
    assert_eq!(
        validate::object(&mut j).unwrap_err().field,
        "spec.probe.type"
    );
    let Some(Obj::Job(job)) = j.obj.as_mut() else {
        unreachable!()
    };
    job.spec.as_mut().unwrap().probe = Some(Probe {
        r#type: ProbeType::Icmp as i32,
        path: "/x".into(),
        ..Default::default()
    });
    assert_eq!(
        validate::object(&mut j).unwrap_err().field,
        "spec.probe.path"
    );
}

#[test]
fn policy_patterns_name_a_namespace_and_a_service() {
    for (ok, want) in [
        ("shop/web", "shop/web"),
        ("Shop/Web", "shop/web"),
        ("shop/*", "shop/*"),
        ("*/db", "*/db"),
        ("*/*", "*/*"),
        ("team-*/api-*", "team-*/api-*"),
    ] {
        assert_eq!(policy_pattern("spec.whitelists[0]", ok).unwrap(), want);
    }
    for bad in [
        "web",
        "shop/",
        "/web",
        "shop/web/x",
        "shop/we_b",
        "sh op/web",
        "",
    ] {
        let e = policy_pattern("spec.whitelists[0]", bad).unwrap_err();
        assert_eq!(e.field, "spec.whitelists[0]", "{bad}");
    }
    let svc = |whitelists: Vec<String>| -> Object {
        Service {
            metadata: meta("web"),
            spec: Some(ServiceSpec {
                ports: vec![ServicePort {
                    port: 80,
                    ..Default::default()
                }],
                whitelists,
                upstreams: vec!["shop/db".into(), "Shop/DB".into()],
                ..Default::default()
            }),
            status: None,
        }
        .into()
    };
    let mut o = svc(vec!["shop/b".into(), "shop/a".into(), "shop/a".into()]);
    validate::object(&mut o).unwrap();
    let crate::v1::object::Obj::Service(s) = o.obj.unwrap() else {
        panic!("kind changed")
    };
    let spec = s.spec.unwrap();
    assert_eq!(spec.whitelists, vec!["shop/a", "shop/b"]);
    assert_eq!(spec.upstreams, vec!["shop/db"]);
    let e = validate::object(&mut svc(vec!["shop/a".into(), "web".into()])).unwrap_err();
    assert_eq!(e.field, "spec.whitelists[1]");
    let many = (0..=MAX_POLICY_ENTRIES)
        .map(|i| format!("shop/s{i}"))
        .collect();
    let e = validate::object(&mut svc(many)).unwrap_err();
    assert_eq!(e.field, "spec.whitelists");
    assert!(e.rule.contains("at most 1000"), "{}", e.rule);
}
