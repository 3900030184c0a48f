//! [`PolicyTable`] against a naive evaluator that reads the rule of the
//! module docs straight off the lists, and the scenario of issue #18.

use proptest::prelude::*;

use super::*;

/// The rule as written: no ids, no sets, every pattern tried as a glob.
fn naive(
    services: &[ServicePolicy],
    members: &[Member],
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Result<(), Refusal> {
    let exists =
        |ns: &str, name: &str| services.iter().any(|s| s.namespace == ns && s.name == name);
    let job = |ip: Ipv4Addr| -> (Option<String>, Vec<String>) {
        match members.iter().find(|m| m.ip == ip) {
            Some(m) => (
                Some(m.namespace.clone()),
                m.services
                    .iter()
                    .filter(|s| exists(&m.namespace, s))
                    .cloned()
                    .collect(),
            ),
            None => (None, vec![]),
        }
    };
    let caller = job(src);
    let dest = match services.iter().find(|s| s.vip == Some(dst)) {
        Some(s) => (Some(s.namespace.clone()), vec![s.name.clone()]),
        None => job(dst),
    };
    let matches = |pat: &str, (ns, svcs): &(Option<String>, Vec<String>)| {
        let (pn, ps) = pat.split_once('/').unwrap();
        if pn == "*" && ps == "*" {
            return true;
        }
        let Some(ns) = ns else { return false };
        glob(pn, ns) && (ps == "*" || svcs.iter().any(|s| glob(ps, s)))
    };
    let lists = |(ns, svcs): &(Option<String>, Vec<String>), upstreams: bool| -> Vec<String> {
        services
            .iter()
            .filter(|s| Some(&s.namespace) == ns.as_ref() && svcs.contains(&s.name))
            .flat_map(|s| {
                if upstreams {
                    s.upstreams.clone()
                } else {
                    s.whitelists.clone()
                }
            })
            .collect()
    };
    let ups = lists(&caller, true);
    if !ups.is_empty() && !ups.iter().any(|p| matches(p, &dest)) {
        return Err(Refusal::Upstreams);
    }
    let wls = lists(&dest, false);
    if !wls.is_empty() && !wls.iter().any(|p| matches(p, &caller)) {
        return Err(Refusal::Whitelists);
    }
    Ok(())
}

/// Glob by brute force: `*` tried at every length.
fn naive_glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => (0..=s.len()).any(|i| naive_glob(rest, &s[i..])),
        Some((c, rest)) => s.first() == Some(c) && naive_glob(rest, &s[1..]),
    }
}

fn svc(ns: &str, name: &str, vip: u8, ups: &[&str], wls: &[&str]) -> ServicePolicy {
    ServicePolicy {
        namespace: ns.into(),
        name: name.into(),
        vip: Some(Ipv4Addr::new(100, 65, 0, vip)),
        upstreams: ups.iter().map(|s| s.to_string()).collect(),
        whitelists: wls.iter().map(|s| s.to_string()).collect(),
    }
}

fn member(ip: [u8; 4], ns: &str, services: &[&str]) -> Member {
    Member {
        ip: Ipv4Addr::from(ip),
        namespace: ns.into(),
        services: services.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn globs() {
    for (p, s, want) in [
        ("web", "web", true),
        ("web", "web2", false),
        ("*", "", true),
        ("w*", "web", true),
        ("*b", "web", true),
        ("*e*", "web", true),
        ("a*b*c", "axxbyyc", true),
        ("a*b*c", "acb", false),
        ("ab*ba", "aba", false),
        ("**", "x", true),
    ] {
        assert_eq!(glob(p, s), want, "{p} {s}");
        assert_eq!(naive_glob(p.as_bytes(), s.as_bytes()), want, "{p} {s}");
    }
}

/// Issue #18's mesh: `web` whitelists `shop/frontend`; `batch` is no
/// frontend; `reporter` may only call `shop/db`.
#[test]
fn the_issue_scenario() {
    let services = vec![
        svc("shop", "web", 1, &[], &["shop/frontend"]),
        svc("shop", "frontend", 2, &[], &[]),
        svc("shop", "batch", 3, &[], &[]),
        svc("shop", "db", 4, &[], &[]),
        svc("shop", "reporter", 5, &["shop/db"], &[]),
    ];
    let web_c2 = [10, 2, 0, 11];
    let web_c3 = [10, 3, 0, 11];
    let frontend = [10, 1, 0, 11];
    let batch = [10, 1, 0, 12];
    let reporter = [10, 1, 0, 13];
    let db = [10, 2, 0, 12];
    let lonely = [10, 1, 0, 14];
    let members = vec![
        member(web_c2, "shop", &["web"]),
        member(web_c3, "shop", &["web"]),
        member(frontend, "shop", &["frontend"]),
        member(batch, "shop", &["batch"]),
        member(reporter, "shop", &["reporter"]),
        member(db, "shop", &["db"]),
        member(lonely, "shop", &[]),
    ];
    let t = PolicyTable::compile(&services, &members);
    let web_vip = Ipv4Addr::new(100, 65, 0, 1);
    let ip = Ipv4Addr::from;
    assert_eq!(t.check(ip(frontend), web_vip), Ok(()));
    assert_eq!(t.check(ip(frontend), ip(web_c2)), Ok(()));
    assert_eq!(t.check(ip(frontend), ip(web_c3)), Ok(()));
    let d = t.check(ip(batch), web_vip).unwrap_err();
    assert_eq!(
        (d.why, &*d.service, &*d.from),
        (Refusal::Whitelists, "shop/web", "shop/batch")
    );
    assert_eq!(
        t.check(ip(batch), ip(web_c3)).unwrap_err().why,
        Refusal::Whitelists
    );
    assert_eq!(
        t.check(ip(lonely), ip(web_c2)).unwrap_err().from.as_ref(),
        "shop"
    );
    // An address that is no job is nobody.
    let d = t.check(Ipv4Addr::new(10, 1, 0, 99), web_vip).unwrap_err();
    assert_eq!(&*d.from, "unknown");
    // Unrestricted services are open to all.
    assert_eq!(t.check(ip(batch), ip(db)), Ok(()));
    assert_eq!(t.check(Ipv4Addr::new(10, 1, 0, 99), ip(db)), Ok(()));
    // reporter may call db, and nothing else.
    assert_eq!(t.check(ip(reporter), ip(db)), Ok(()));
    assert_eq!(t.check(ip(reporter), Ipv4Addr::new(100, 65, 0, 4)), Ok(()));
    let d = t.check(ip(reporter), web_vip).unwrap_err();
    assert_eq!((d.why, &*d.service), (Refusal::Upstreams, "shop/web"));
    assert_eq!(
        t.check(ip(reporter), Ipv4Addr::new(10, 9, 9, 9))
            .unwrap_err()
            .why,
        Refusal::Upstreams
    );
    // Adding shop/batch to the whitelist lets batch in.
    let mut open = services.clone();
    open[0].whitelists.push("shop/batch".into());
    let t = PolicyTable::compile(&open, &members);
    assert_eq!(t.check(ip(batch), web_vip), Ok(()));
    assert_eq!(
        t.check(ip(lonely), web_vip).unwrap_err().why,
        Refusal::Whitelists
    );
}

#[test]
fn no_lists_compile_to_nothing() {
    let services = vec![svc("shop", "web", 1, &[], &[])];
    let t = PolicyTable::compile(&services, &[member([10, 1, 0, 1], "shop", &["web"])]);
    assert!(t.is_empty());
    assert!(t.by_ip.is_empty());
    assert_eq!(
        t.check(Ipv4Addr::new(10, 9, 9, 9), Ipv4Addr::new(100, 65, 0, 1)),
        Ok(())
    );
}

fn pattern() -> impl Strategy<Value = String> {
    let ns = prop::sample::select(vec!["a", "b", "shop", "*", "s*", "*o*", "x"]);
    let svc = prop::sample::select(vec!["web", "db", "*", "w*", "*b", "x1", "front", "*e*"]);
    (ns, svc).prop_map(|(n, s)| format!("{n}/{s}"))
}

fn mesh() -> impl Strategy<Value = (Vec<ServicePolicy>, Vec<Member>)> {
    let nss = || prop::sample::select(vec!["a", "b", "shop", "zz"]);
    let names = || prop::sample::select(vec!["web", "db", "x1", "front", "web2"]);
    let service = (
        nss(),
        names(),
        prop::option::of(1u8..20),
        prop::collection::vec(pattern(), 0..3),
        prop::collection::vec(pattern(), 0..3),
    )
        .prop_map(|(ns, name, vip, upstreams, whitelists)| ServicePolicy {
            namespace: ns.into(),
            name: name.into(),
            vip: vip.map(|v| Ipv4Addr::new(100, 65, 0, v)),
            upstreams,
            whitelists,
        });
    let services = prop::collection::vec(service, 0..8).prop_map(|mut v| {
        // One object per (namespace, name) and per VIP, as in a netmap.
        let mut seen = HashSet::new();
        let mut vips = HashSet::new();
        v.retain(|s| seen.insert((s.namespace.clone(), s.name.clone())));
        for s in &mut v {
            if let Some(vip) = s.vip
                && !vips.insert(vip)
            {
                s.vip = None;
            }
        }
        v
    });
    let member = (nss(), prop::collection::vec(names(), 0..3));
    let members = prop::collection::vec(member, 0..8).prop_map(|v| {
        v.into_iter()
            .enumerate()
            .map(|(i, (ns, svcs))| Member {
                ip: Ipv4Addr::new(10, 0, 0, i as u8 + 1),
                namespace: ns.into(),
                services: svcs.into_iter().map(str::to_string).collect(),
            })
            .collect()
    });
    (services, members)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn compiled_table_agrees_with_the_naive_rule((services, members) in mesh()) {
        let t = PolicyTable::compile(&services, &members);
        let mut addrs: Vec<Ipv4Addr> = members.iter().map(|m| m.ip).collect();
        addrs.push(Ipv4Addr::new(10, 9, 9, 9));
        let mut dsts = addrs.clone();
        dsts.extend(services.iter().filter_map(|s| s.vip));
        for &src in &addrs {
            for &dst in &dsts {
                let got = t.check(src, dst).map_err(|d| d.why);
                prop_assert_eq!(got, naive(&services, &members, src, dst), "{} -> {}", src, dst);
            }
        }
    }

    #[test]
    fn glob_agrees_with_brute_force(p in "[ab*]{0,6}", s in "[ab]{0,6}") {
        prop_assert_eq!(glob(&p, &s), naive_glob(p.as_bytes(), s.as_bytes()));
    }
}

/// Who a netmap's addresses are: remote replicas from the endpoints, this
/// cluster's own jobs from their labels (also when no endpoints list them,
/// e.g. past `num_endpoints`).
#[test]
fn identities_come_from_endpoints_and_local_labels() {
    use skymesh_proto::v1::{
        EndpointAddress, Endpoints, EndpointsClusterStatus, EndpointsStatus, Job, JobSpec,
        ObjectMeta, Service, ServiceSpec, ServiceStatus,
    };
    let meta = |name: &str, labels: &[(&str, &str)]| {
        Some(ObjectMeta {
            name: name.into(),
            namespace: "shop".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        })
    };
    let service = |name: &str, vip: &str, app: &str, whitelists: &[&str]| Service {
        metadata: meta(name, &[]),
        spec: Some(ServiceSpec {
            selector: [("app".to_string(), app.to_string())].into(),
            whitelists: whitelists.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        status: Some(ServiceStatus {
            cluster_ip: vip.into(),
            external_ips: vec![],
        }),
    };
    let mut s = NetState::default();
    let key = |n: &str| ("shop".to_string(), n.to_string());
    s.services.insert(
        key("web"),
        service("web", "100.65.0.1", "web", &["shop/frontend"]),
    );
    s.services.insert(
        key("frontend"),
        service("frontend", "100.65.0.2", "frontend", &[]),
    );
    s.services
        .insert(key("batch"), service("batch", "100.65.0.3", "batch", &[]));
    s.endpoints.insert(
        key("web"),
        Endpoints {
            metadata: meta("web", &[]),
            spec: None,
            status: Some(EndpointsStatus {
                clusters: vec![EndpointsClusterStatus {
                    cluster: "c2".into(),
                    exposed: true,
                    addresses: vec![EndpointAddress {
                        ip: "10.2.0.11".into(),
                        ports: vec![],
                        job: "web-1".into(),
                        ready: true,
                    }],
                }],
            }),
        },
    );
    let job = |name: &str, ip: &str, app: &str| Job {
        metadata: meta(name, &[("app", app)]),
        spec: Some(JobSpec {
            cluster: "c1".into(),
            ip: ip.into(),
            ..Default::default()
        }),
        status: None,
    };
    s.jobs
        .insert(key("fe-1"), job("fe-1", "10.1.0.11", "frontend"));
    s.jobs
        .insert(key("batch-1"), job("batch-1", "10.1.0.12", "batch"));
    let t = PolicyTable::from_state(&s);
    let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
    assert_eq!(t.check(ip("10.1.0.11"), ip("100.65.0.1")), Ok(()));
    assert_eq!(t.check(ip("10.1.0.11"), ip("10.2.0.11")), Ok(()));
    let d = t.check(ip("10.1.0.12"), ip("10.2.0.11")).unwrap_err();
    assert_eq!((&*d.service, &*d.from), ("shop/web", "shop/batch"));
    // Jobs of other clusters that no service selects are known by their
    // address: `shop/*` matches one in shop, not one elsewhere.
    s.services
        .insert(key("db"), service("db", "100.65.0.4", "db", &["shop/*"]));
    for (ns, name, ip) in [("shop", "loner", "10.2.0.50"), ("other", "x", "10.2.0.51")] {
        s.job_addresses
            .insert((ns.to_string(), name.to_string()), ip.parse().unwrap());
    }
    let t = PolicyTable::from_state(&s);
    assert_eq!(t.check(ip("10.2.0.50"), ip("100.65.0.4")), Ok(()));
    for (caller, named) in [("10.2.0.51", "other"), ("10.2.0.99", "unknown")] {
        let d = t.check(ip(caller), ip("100.65.0.4")).unwrap_err();
        assert_eq!((&*d.service, &*d.from), ("shop/db", named));
    }
    s.services.remove(&key("db"));
    // Without any list the netmap compiles to nothing.
    s.services
        .insert(key("web"), service("web", "100.65.0.1", "web", &[]));
    assert!(PolicyTable::from_state(&s).is_empty());
}
