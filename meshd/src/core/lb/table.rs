//! The balancer's view of the mesh: for every VIP reachable from this
//! cluster, its port map, the backends new flows may go to, the backends
//! established flows may stay on, the affinity setting and the Maglev
//! table. [`LbTable::build`] is a pure function of the netmap, this
//! cluster's config and health; rebuild it whenever either changes.
//!
//! Must not: hold flows or counters, read the clock, or do I/O.

use crate::core::policy::PolicyTable;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use ipnet::Ipv4Net;
use skymesh_proto::v1::{Protocol, Service, ServiceSpec, SessionAffinity, TrafficPolicy};
use skymesh_proto::validate::service_type_has_vip;

use super::maglev::{self, Maglev};
use super::nat::FlowLimits;
use super::packet::Proto;
use crate::state::NetState;

/// SPEC §2: `affinity_timeout_s` 0 means 10800 s.
pub const DEFAULT_AFFINITY_TIMEOUT: Duration = Duration::from_secs(10_800);
/// SPEC §2: `affinity_timeout_s` is at most 86400 s.
pub const MAX_AFFINITY_TIMEOUT: Duration = Duration::from_secs(86_400);

/// What the balancer needs to know about this gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    /// This cluster's name.
    pub cluster: String,
    /// The service CIDR: every address in it belongs to the balancer.
    pub service_cidr: Ipv4Net,
    /// Key of the flow hash. Pick it at random per process
    /// (`rand::random()`) so clients cannot steer flows; fixed in tests.
    pub hash_key: [u64; 2],
    /// Bounds on the flow table and affinity pins.
    pub limits: FlowLimits,
    /// This gateway's overlay IP: the source of its NodePort relay's
    /// flows, one per outside client, so exempt from the per-source cap.
    pub gateway_ip: Option<Ipv4Addr>,
}

impl LbConfig {
    /// The config for the netmap's own cluster and service CIDR; `None`
    /// while the netmap has no valid service CIDR (before the first
    /// snapshot).
    pub fn from_state(
        state: &NetState,
        hash_key: [u64; 2],
        limits: FlowLimits,
    ) -> Option<LbConfig> {
        Some(LbConfig {
            cluster: state.cluster.clone(),
            service_cidr: state.net.service_cidr?,
            hash_key,
            limits,
            gateway_ip: state.net.overlay_ip,
        })
    }
}

/// Health known to this gateway before the coordinator hears of it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Clusters whose gateway missed 3 probes.
    pub peers_down: BTreeSet<String>,
    /// Clusters whose gateway missed its latest probe but is not down:
    /// their replicas take no new flows while another cluster's can (flows
    /// they already serve, and DNS answers, stay).
    pub peers_suspect: BTreeSet<String>,
    /// Local jobs failing their checks, as `(namespace, job)`.
    pub local_unready: BTreeSet<(String, String)>,
}

/// One replica behind a VIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// Stable identity `cluster/namespace/job`: the Maglev key.
    pub name: Arc<str>,
    /// Counter label `cluster/job`.
    pub label: Arc<str>,
    pub ip: Ipv4Addr,
    pub cluster: String,
    pub namespace: String,
    pub job: String,
    /// In this cluster (reached through the TUN with SNAT).
    pub local: bool,
}

impl Backend {
    /// A backend; `job` may be empty (then the IP names it).
    pub fn new(ip: Ipv4Addr, cluster: &str, namespace: &str, job: &str, local: bool) -> Backend {
        let ip_s;
        let job_or_ip = if job.is_empty() {
            ip_s = ip.to_string();
            ip_s.as_str()
        } else {
            job
        };
        Backend {
            name: format!("{cluster}/{namespace}/{job_or_ip}").into(),
            label: format!("{cluster}/{job_or_ip}").into(),
            ip,
            cluster: cluster.to_owned(),
            namespace: namespace.to_owned(),
            job: job.to_owned(),
            local,
        }
    }
}

/// A service as the balancer serves it at its VIP.
#[derive(Debug, Clone)]
pub struct VipService {
    /// `namespace/name`.
    pub service: Arc<str>,
    pub vip: Ipv4Addr,
    /// `(protocol, port)` → target port, sorted by `(protocol, port)`: a
    /// service has a port or two, and a map node would take 96 bytes for
    /// them.
    pub ports: Box<[((Proto, u16), u16)]>,
    /// Candidates for new flows: ready, healthy, visible from here, after
    /// the traffic policy; sorted by name. Maglev indices point here.
    pub backends: Vec<Arc<Backend>>,
    /// Every ready, healthy backend visible from here, whatever the
    /// traffic policy: established flows to these stay where they are.
    pub eligible: BTreeMap<Ipv4Addr, Arc<Backend>>,
    /// ClientIP affinity timeout, if the service has ClientIP affinity.
    pub affinity: Option<Duration>,
    pub policy: TrafficPolicy,
    candidates: BTreeMap<Ipv4Addr, usize>,
    maglev: Arc<Maglev>,
}

impl VipService {
    /// The target port for a packet to `port`, if the service defines it.
    pub fn target_port(&self, proto: Proto, port: u16) -> Option<u16> {
        let i = self
            .ports
            .binary_search_by_key(&(proto, port), |(k, _)| *k)
            .ok()?;
        Some(self.ports[i].1)
    }

    /// The candidate backend with this IP.
    pub fn candidate(&self, ip: Ipv4Addr) -> Option<&Arc<Backend>> {
        self.candidates.get(&ip).map(|i| &self.backends[*i])
    }

    /// The Maglev table over [`VipService::backends`].
    pub fn maglev(&self) -> &Maglev {
        &self.maglev
    }
}

/// Every VIP reachable from this cluster.
#[derive(Debug, Clone, Default)]
pub struct LbTable {
    vips: BTreeMap<Ipv4Addr, VipService>,
    /// The service policy, judged at flow setup (empty without lists).
    policy: Arc<PolicyTable>,
}

impl LbTable {
    /// The table for `state` as seen from `cfg.cluster` under `health`.
    pub fn build(state: &NetState, cfg: &LbConfig, health: &Health) -> LbTable {
        Self::rebuild(None, state, cfg, health)
    }

    /// Like [`LbTable::build`], reusing `prev`'s Maglev tables where a
    /// service's backends did not change (the common case on a health or
    /// unrelated netmap change).
    pub fn rebuild(
        prev: Option<&LbTable>,
        state: &NetState,
        cfg: &LbConfig,
        health: &Health,
    ) -> LbTable {
        let mut vips = BTreeMap::new();
        for ((ns, name), svc) in &state.services {
            let Some((mut v, size)) = vip_service(state, cfg, health, ns, name, svc) else {
                continue;
            };
            if vips.contains_key(&v.vip) {
                tracing::warn!(vip = %v.vip, service = %v.service, "VIP used twice; ignored");
                continue;
            }
            let names: Vec<Arc<str>> = v.backends.iter().map(|b| b.name.clone()).collect();
            let reused = prev
                .and_then(|p| p.vips.get(&v.vip))
                .filter(|p| p.maglev.size() == size && p.maglev.names() == names.as_slice())
                .map(|p| p.maglev.clone());
            v.maglev = match reused {
                Some(m) => m,
                None if size == 0 => no_backends(),
                None => Arc::new(maglev::build(&names, size)),
            };
            vips.insert(v.vip, v);
        }
        let policy = PolicyTable::from_state(state);
        let policy = match prev {
            Some(p) if *p.policy == policy => p.policy.clone(),
            _ => Arc::new(policy),
        };
        LbTable { vips, policy }
    }

    /// The service policy of the netmap this table was built from.
    pub fn policy(&self) -> &PolicyTable {
        &self.policy
    }

    /// Whether `other` holds the very same policy (a rebuild keeps it when
    /// it compiles to the same): then no flow needs judging again.
    pub fn same_policy(&self, other: &LbTable) -> bool {
        Arc::ptr_eq(&self.policy, &other.policy)
    }

    /// Whether `ip` is a VIP served here.
    pub fn is_vip(&self, ip: Ipv4Addr) -> bool {
        self.vips.contains_key(&ip)
    }

    /// The service at `vip`.
    pub fn vip(&self, vip: Ipv4Addr) -> Option<&VipService> {
        self.vips.get(&vip)
    }

    /// Every served VIP, in address order.
    pub fn vips(&self) -> impl Iterator<Item = &VipService> {
        self.vips.values()
    }
}

/// The service's entry and its Maglev table size, or `None` if it has no
/// VIP here. The Maglev table is left empty; the caller fills it.
fn vip_service(
    state: &NetState,
    cfg: &LbConfig,
    health: &Health,
    ns: &str,
    name: &str,
    svc: &Service,
) -> Option<(VipService, usize)> {
    let no_spec = ServiceSpec::default();
    let spec = svc.spec.as_ref().unwrap_or(&no_spec);
    if !service_type_has_vip(spec.r#type()) {
        return None;
    }
    let vip: Ipv4Addr = svc.status.as_ref()?.cluster_ip.parse().ok()?;
    // Exposure (SPEC §2): empty `clusters` = every cluster.
    if !spec.clusters.is_empty() && !spec.clusters.contains(&cfg.cluster) {
        return None;
    }
    let mut ports = BTreeMap::new();
    for p in &spec.ports {
        let proto = match p.protocol() {
            Protocol::Udp => Proto::Udp,
            Protocol::Tcp | Protocol::Unspecified => Proto::Tcp,
        };
        let Ok(port) = u16::try_from(p.port) else {
            continue;
        };
        let target = u16::try_from(p.effective_target_port()).unwrap_or(0);
        if port != 0 && target != 0 {
            ports.insert((proto, port), target);
        }
    }

    let key = (ns.to_owned(), name.to_owned());
    let mut visible = 0usize;
    let mut eligible: Vec<Backend> = Vec::new();
    let statuses = state.endpoints.get(&key).and_then(|e| e.status.as_ref());
    for c in statuses.map(|s| s.clusters.as_slice()).unwrap_or_default() {
        let local = c.cluster == cfg.cluster;
        // Unexposed endpoints serve only clients of their own cluster.
        if !(c.exposed || local) {
            continue;
        }
        for a in &c.addresses {
            let Ok(ip) = a.ip.parse::<Ipv4Addr>() else {
                continue;
            };
            visible += 1;
            let healthy = !local
                || !health
                    .local_unready
                    .contains(&(ns.to_owned(), a.job.clone()));
            if a.ready && healthy && routable(state, health, &c.cluster, ip) {
                eligible.push(Backend::new(ip, &c.cluster, ns, &a.job, local));
            }
        }
    }
    // One backend per name and per IP (two jobs on one address are one
    // destination); first by name wins.
    eligible.sort_by(|a, b| a.name.cmp(&b.name));
    eligible.dedup_by(|a, b| a.name == b.name);
    let mut seen = BTreeSet::new();
    eligible.retain(|b| seen.insert(b.ip));

    let policy = spec.traffic_policy();
    let any_local = eligible.iter().any(|b| b.local);
    let eligible: Vec<Arc<Backend>> = eligible.into_iter().map(Arc::new).collect();
    let mut backends: Vec<Arc<Backend>> = eligible
        .iter()
        .filter(|b| match policy {
            TrafficPolicy::Unspecified | TrafficPolicy::Spread => true,
            TrafficPolicy::PreferLocal => b.local || !any_local,
            TrafficPolicy::Local => b.local,
        })
        .cloned()
        .collect();
    // Behind a suspect gateway: no new flows, unless nothing else is left
    // (a lost probe must not take a service away).
    if backends
        .iter()
        .any(|b| !health.peers_suspect.contains(&b.cluster))
    {
        backends.retain(|b| !health.peers_suspect.contains(&b.cluster));
    }
    let affinity = (spec.session_affinity() == SessionAffinity::ClientIp).then(|| {
        match spec.affinity_timeout_s {
            0 => DEFAULT_AFFINITY_TIMEOUT,
            s => Duration::from_secs(u64::from(s)).min(MAX_AFFINITY_TIMEOUT),
        }
    });
    // Sized by every replica visible from here, ready or not, so that
    // health flapping does not change the table size (which would reshuffle
    // every entry rather than only the failed backend's).
    let size = if backends.is_empty() {
        0
    } else {
        maglev::table_size(visible.max(backends.len()))
    };
    let v = VipService {
        service: format!("{ns}/{name}").into(),
        vip,
        ports: ports.into_iter().collect(),
        candidates: backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.ip, i))
            .collect(),
        eligible: eligible.iter().map(|b| (b.ip, b.clone())).collect(),
        backends,
        affinity,
        policy,
        maglev: no_backends(),
    };
    Some((v, size))
}

/// The empty Maglev table, one for every service without backends (most
/// of them, at 10,000 services without endpoints).
fn no_backends() -> Arc<Maglev> {
    static EMPTY: std::sync::LazyLock<Arc<Maglev>> =
        std::sync::LazyLock::new(|| Arc::new(maglev::build::<&str>(&[], 0)));
    EMPTY.clone()
}

/// Whether this gateway can deliver to `ip`, an address of a replica in
/// `cluster` — the one rule for which addresses the balancer uses and DNS
/// answers (headless, SRV, `<job>.<svc>`) carry:
/// - in this cluster: `ip` lies in its own workload CIDRs;
/// - in another: its gateway is not down (peer probes), and the tunnel to
///   it carries `ip` (the peer's allowed IPs contain it; otherwise packets
///   to it would be dropped as unroutable).
pub fn routable(state: &NetState, health: &Health, cluster: &str, ip: Ipv4Addr) -> bool {
    let nets: &[Ipv4Net] = if cluster == state.cluster {
        &state.net.workload_cidrs
    } else if health.peers_down.contains(cluster) {
        return false;
    } else {
        match state.net.peers.get(cluster) {
            Some(p) => &p.allowed_ips,
            None => return false,
        }
    };
    // The node routes by the same parsed allowed IPs (`engine::peer_configs`).
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::*;
    use skymesh_proto::v1::ServiceType;

    fn vip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(100, 65, 0, i)
    }

    fn ips(t: &LbTable, v: Ipv4Addr) -> Vec<String> {
        t.vip(v)
            .unwrap()
            .backends
            .iter()
            .map(|b| b.ip.to_string())
            .collect()
    }

    #[test]
    fn config_from_the_netmap() {
        let c = LbConfig::from_state(&mesh(), [1, 2], FlowLimits::default()).unwrap();
        assert_eq!(
            (c.cluster.as_str(), c.service_cidr.to_string()),
            ("c1", "100.65.0.0/16".into())
        );
        assert_eq!(
            LbConfig::from_state(&NetState::default(), [1, 2], FlowLimits::default()),
            None
        );
    }

    #[test]
    fn exposure_decides_where_a_vip_exists() {
        let mut s = mesh();
        let tcp = [(80, 8080, Protocol::Tcp)];
        add(&mut s, service("everywhere", vip(1), &tcp), None);
        let mut only_c2 = service("only-c2", vip(2), &tcp);
        only_c2.spec.as_mut().unwrap().clusters = vec!["c2".into()];
        add(&mut s, only_c2, None);
        let mut c1_c3 = service("c1-c3", vip(3), &tcp);
        c1_c3.spec.as_mut().unwrap().clusters = vec!["c1".into(), "c3".into()];
        add(&mut s, c1_c3, None);
        for (i, ty) in [(4, ServiceType::Headless), (5, ServiceType::ExternalName)] {
            let mut svc = service(&format!("novip{i}"), vip(i), &tcp);
            svc.spec.as_mut().unwrap().r#type = ty as i32;
            add(&mut s, svc, None);
        }
        let mut np = service("nodeport", vip(6), &tcp);
        np.spec.as_mut().unwrap().r#type = ServiceType::NodePort as i32;
        add(&mut s, np, None);
        let mut pending = service("pending", vip(7), &tcp);
        pending.status = None;
        add(&mut s, pending, None);
        let t = LbTable::build(&s, &cfg(), &Health::default());
        let served: Vec<u8> = t.vips().map(|v| v.vip.octets()[3]).collect();
        assert_eq!(served, [1, 3, 6]);
        assert!(t.is_vip(vip(1)) && !t.is_vip(vip(2)) && !t.is_vip(vip(4)));
        assert_eq!(&*t.vip(vip(1)).unwrap().service, "default/everywhere");
        assert!(
            t.vip(vip(1)).unwrap().backends.is_empty(),
            "no Endpoints: no backend"
        );
    }

    #[test]
    fn unexposed_endpoints_serve_only_their_own_cluster() {
        let mut s = mesh();
        let eps = endpoints(
            "web",
            &[
                (
                    "c1",
                    false,
                    &[("10.1.0.1", "a", true), ("10.1.0.2", "b", false)],
                ),
                ("c2", false, &[("10.2.0.1", "c", true)]),
                (
                    "c3",
                    true,
                    &[("10.3.0.1", "d", true), ("not-an-ip", "e", true)],
                ),
            ],
        );
        add(
            &mut s,
            service("web", vip(1), &[(80, 0, Protocol::Tcp)]),
            Some(eps),
        );
        let t = LbTable::build(&s, &cfg(), &Health::default());
        assert_eq!(ips(&t, vip(1)), ["10.1.0.1", "10.3.0.1"]);
        let b = &t.vip(vip(1)).unwrap().backends;
        assert!(b[0].local && !b[1].local);
        assert_eq!((&*b[1].name, &*b[1].label), ("c3/default/d", "c3/d"));
        // Seen from c2, its own unexposed endpoints are usable; c1's are not.
        let mut c2 = cfg();
        c2.cluster = "c2".into();
        s.peers.insert(
            "c1".into(),
            skymesh_proto::v1::Peer {
                cluster: "c1".into(),
                allowed_ips: vec!["10.1.0.0/16".into()],
                ..Default::default()
            },
        );
        s.peers.remove("c2");
        s.cluster = "c2".into();
        s.workload_cidrs = vec!["10.2.0.0/16".into()];
        s.reparse();
        let t = LbTable::build(&s, &c2, &Health::default());
        assert_eq!(ips(&t, vip(1)), ["10.2.0.1", "10.3.0.1"]);
    }

    #[test]
    fn routable_is_own_cidrs_here_and_up_tunnels_elsewhere() {
        let s = mesh();
        let mut h = Health::default();
        let ip = |a: &str| a.parse::<Ipv4Addr>().unwrap();
        assert!(routable(&s, &h, "c1", ip("10.1.3.4")));
        assert!(
            !routable(&s, &h, "c1", ip("10.2.3.4")),
            "outside c1's CIDRs"
        );
        assert!(routable(&s, &h, "c2", ip("10.2.3.4")));
        assert!(
            !routable(&s, &h, "c2", ip("10.3.3.4")),
            "c2's tunnel does not carry it"
        );
        assert!(!routable(&s, &h, "c9", ip("10.9.0.1")), "no such peer");
        h.peers_down.insert("c2".into());
        assert!(
            !routable(&s, &h, "c2", ip("10.2.3.4")),
            "c2's gateway is down"
        );
    }

    #[test]
    fn unroutable_and_unhealthy_backends_are_left_out() {
        let mut s = mesh();
        let eps = endpoints(
            "web",
            &[
                (
                    "c1",
                    true,
                    &[("10.1.0.1", "a", true), ("10.1.0.2", "b", true)],
                ),
                (
                    "c2",
                    true,
                    &[
                        ("10.2.0.1", "c", true),
                        ("10.9.0.1", "outside-allowed-ips", true),
                    ],
                ),
                ("c3", true, &[("10.3.0.1", "d", true)]),
                ("c4", true, &[("10.4.0.1", "no-peer", true)]),
            ],
        );
        add(
            &mut s,
            service("web", vip(1), &[(80, 0, Protocol::Tcp)]),
            Some(eps),
        );
        let health = Health {
            peers_down: ["c3".into()].into(),
            local_unready: [("default".into(), "b".into()), ("other".into(), "a".into())].into(),
            ..Default::default()
        };
        let t = LbTable::build(&s, &cfg(), &health);
        assert_eq!(ips(&t, vip(1)), ["10.1.0.1", "10.2.0.1"]);
        assert_eq!(t.vip(vip(1)).unwrap().eligible.len(), 2);
    }

    #[test]
    fn traffic_policy_selects_candidates_but_not_eligibility() {
        let mut s = mesh();
        add(
            &mut s,
            with_policy(
                service("web", vip(1), &[(80, 0, Protocol::Tcp)]),
                TrafficPolicy::PreferLocal,
            ),
            Some(endpoints("web", &SIX)),
        );
        add(
            &mut s,
            with_policy(
                service("loc", vip(2), &[(80, 0, Protocol::Tcp)]),
                TrafficPolicy::Local,
            ),
            Some(endpoints("loc", &SIX[1..])),
        );
        let t = LbTable::build(&s, &cfg(), &Health::default());
        assert_eq!(ips(&t, vip(1)), ["10.1.0.11", "10.1.0.12"]);
        assert_eq!(
            t.vip(vip(1)).unwrap().eligible.len(),
            6,
            "established remote flows may stay"
        );
        assert!(
            ips(&t, vip(2)).is_empty(),
            "Local with no local replica: none"
        );
        assert_eq!(
            t.vip(vip(1)).unwrap().maglev().size(),
            maglev::table_size(6)
        );
    }

    #[test]
    fn ports_affinity_and_duplicates() {
        let mut s = mesh();
        let svc = service(
            "web",
            vip(1),
            &[
                (80, 8080, Protocol::Tcp),
                (53, 0, Protocol::Udp),
                (70_000, 1, Protocol::Tcp),
                (81, 0, Protocol::Unspecified),
            ],
        );
        let eps = endpoints(
            "web",
            &[(
                "c1",
                true,
                &[
                    ("10.1.0.1", "a", true),
                    ("10.1.0.1", "b", true),
                    ("10.1.0.2", "c", true),
                ],
            )],
        );
        add(&mut s, with_affinity(svc, 0), Some(eps));
        add(
            &mut s,
            with_affinity(service("long", vip(2), &[]), 1_000_000),
            None,
        );
        add(
            &mut s,
            with_affinity(service("short", vip(3), &[]), 30),
            None,
        );
        let t = LbTable::build(&s, &cfg(), &Health::default());
        let w = t.vip(vip(1)).unwrap();
        let ports: Vec<_> = w.ports.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(
            ports,
            [
                ((Proto::Tcp, 80), 8080),
                ((Proto::Tcp, 81), 81),
                ((Proto::Udp, 53), 53)
            ]
        );
        assert_eq!(w.affinity, Some(DEFAULT_AFFINITY_TIMEOUT));
        assert_eq!(t.vip(vip(2)).unwrap().affinity, Some(MAX_AFFINITY_TIMEOUT));
        assert_eq!(
            t.vip(vip(3)).unwrap().affinity,
            Some(Duration::from_secs(30))
        );
        // One backend per name and per address.
        let names: Vec<&str> = w.backends.iter().map(|b| &*b.name).collect();
        assert_eq!(names, ["c1/default/a", "c1/default/c"]);
        assert_eq!(ips(&t, vip(1)), ["10.1.0.1", "10.1.0.2"]);
    }

    #[test]
    fn rebuild_reuses_unchanged_maglev_tables() {
        let mut s = mesh();
        add(
            &mut s,
            service("web", vip(1), &[(80, 0, Protocol::Tcp)]),
            Some(endpoints("web", &SIX)),
        );
        add(
            &mut s,
            service("api", vip(2), &[(80, 0, Protocol::Tcp)]),
            Some(endpoints("api", &SIX)),
        );
        let t1 = LbTable::build(&s, &cfg(), &Health::default());
        let health = Health {
            local_unready: [("default".into(), "web-1a".into())].into(),
            ..Default::default()
        };
        let mut s2 = s.clone();
        s2.endpoints.remove(&("default".into(), "api".into()));
        let t2 = LbTable::rebuild(Some(&t1), &s, &cfg(), &Health::default());
        let t3 = LbTable::rebuild(Some(&t1), &s2, &cfg(), &health);
        assert!(Arc::ptr_eq(
            &t1.vip(vip(1)).unwrap().maglev,
            &t2.vip(vip(1)).unwrap().maglev
        ));
        assert!(!Arc::ptr_eq(
            &t1.vip(vip(1)).unwrap().maglev,
            &t3.vip(vip(1)).unwrap().maglev
        ));
        assert_eq!(
            *t3.vip(vip(1)).unwrap().maglev,
            maglev::build(
                &t3.vip(vip(1))
                    .unwrap()
                    .backends
                    .iter()
                    .map(|b| b.name.to_string())
                    .collect::<Vec<_>>(),
                maglev::table_size(6)
            )
        );
        assert_eq!(t3.vip(vip(2)).unwrap().maglev().size(), 0);
    }
}
