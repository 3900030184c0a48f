//! Service-to-service policy (Space Cloud's upstreams and whitelists;
//! README "Service policy"), compiled from the netmap into tables a
//! gateway consults once per new flow. Pure.
//!
//! # The rule
//! - A packet's **source job is its source IP**. Cryptokey routing has
//!   already checked that the IP lies in the workload CIDRs of the cluster
//!   whose key delivered it, and the coordinator only registers a job IP
//!   inside its own cluster's CIDRs, so the mapping is trustworthy.
//! - A job's **identity** is its namespace and the services that select it
//!   (in its namespace); a job no service selects has only its namespace
//!   (a job of another cluster is known by its address,
//!   `NetState::job_addresses`), and an address that is no known job has
//!   neither.
//! - A **pattern** `namespace/service` matches an identity when its
//!   namespace part matches the namespace and its service part matches one
//!   of the services; `*` stands for any run of characters, and a service
//!   part of exactly `*` also matches an identity without services
//!   (`shop/*` is "anything in shop"); `*/*` matches every address, a
//!   job or not.
//! - As Kubernetes' NetworkPolicy does, lists add up. A caller is
//!   **egress-restricted** when any of its services lists `upstreams`; it
//!   may then call only what one of those entries matches. A destination
//!   is **ingress-restricted** when any of its services lists
//!   `whitelists`; only callers one of those entries matches may call it.
//!   A call is allowed when both sides allow it; empty lists restrict
//!   nothing.
//! - Calling a **VIP**, the destination is that service alone (its own
//!   whitelist); calling a job's IP, it is the job's identity. The gateway
//!   that owns the replica checks again with the job's identity.
//!
//! # Cost
//! [`PolicyTable::check`] is a hash lookup per side and, for a restricted
//! side, a few set lookups per service of the other side plus the
//! patterns with a `*` inside a name. A mesh whose services list nothing
//! compiles to an empty table that every check passes at once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::state::NetState;

/// Why a call is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The caller's upstreams do not include the destination.
    Upstreams,
    /// The destination's whitelists do not include the caller.
    Whitelists,
}

/// A refused call, with what the metric names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub why: Refusal,
    /// The destination: `namespace/service` (a VIP's service, or a job's
    /// first service), `namespace` or `unknown`.
    pub service: Arc<str>,
    /// The caller, named the same way.
    pub from: Arc<str>,
}

/// One side's identity, compiled.
#[derive(Debug, Default, PartialEq)]
struct Identity {
    /// Namespace id; `None` for an address that is no known job.
    ns: Option<u32>,
    /// Service ids, sorted.
    services: Box<[u32]>,
    /// Rule ids of the upstreams that restrict this identity as a caller.
    egress: Option<u32>,
    /// Rule id of the whitelists that restrict it as a destination.
    ingress: Option<u32>,
    /// How the metric names it.
    label: Arc<str>,
}

/// A union of patterns, split by shape for lookup.
#[derive(Debug, Default, PartialEq)]
struct Rule {
    /// `*/*`.
    all: bool,
    /// `ns/*` by namespace id.
    ns_any: HashSet<u32>,
    /// `ns/svc` by service id.
    exact: HashSet<u32>,
    /// `*/svc` by service name.
    name_any: HashSet<Box<str>>,
    /// Everything else (a `*` inside a part).
    globs: Vec<(Box<str>, Box<str>)>,
}

/// The policy of one gateway's netmap (comparable: a rebuild that
/// compiles the same policy keeps the old one, and no flow is judged
/// again).
#[derive(Debug, Default, PartialEq)]
pub struct PolicyTable {
    namespaces: Vec<Box<str>>,
    /// `(namespace id, name)` per service id.
    services: Vec<(u32, Box<str>)>,
    rules: Vec<Rule>,
    identities: Vec<Identity>,
    /// Job address → identity.
    by_ip: HashMap<Ipv4Addr, u32>,
    /// VIP → the identity of its service alone.
    by_vip: HashMap<Ipv4Addr, u32>,
    /// Identity of an address that is no known job.
    unknown: u32,
}

/// What one service contributes, as compiled from.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServicePolicy {
    pub namespace: String,
    pub name: String,
    pub vip: Option<Ipv4Addr>,
    pub upstreams: Vec<String>,
    pub whitelists: Vec<String>,
}

/// A job address and who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub ip: Ipv4Addr,
    pub namespace: String,
    /// Names of the services (in `namespace`) that select it.
    pub services: Vec<String>,
}

/// Whether glob `pat` (`*` = any run of characters) matches `s`.
pub fn glob(pat: &str, s: &str) -> bool {
    let Some((first, rest)) = pat.split_once('*') else {
        return pat == s;
    };
    let Some(mut s) = s.strip_prefix(first) else {
        return false;
    };
    let mut parts: Vec<&str> = rest.split('*').collect();
    let last = parts.pop().unwrap_or("");
    for p in parts {
        match s.find(p) {
            Some(i) => s = &s[i + p.len()..],
            None => return false,
        }
    }
    s.len() >= last.len() && s.ends_with(last)
}

impl PolicyTable {
    /// Compiles `services` (their lists already validated) and `members`.
    pub fn compile(services: &[ServicePolicy], members: &[Member]) -> PolicyTable {
        let mut t = PolicyTable::default();
        if services
            .iter()
            .all(|s| s.upstreams.is_empty() && s.whitelists.is_empty())
        {
            return t;
        }
        // Every namespace (of services and of jobs) and every service gets
        // an id first: patterns resolve to them.
        let mut ns_lookup: HashMap<&str, u32> = HashMap::new();
        for ns in services
            .iter()
            .map(|s| s.namespace.as_str())
            .chain(members.iter().map(|m| m.namespace.as_str()))
        {
            ns_lookup.entry(ns).or_insert_with(|| {
                t.namespaces.push(ns.into());
                (t.namespaces.len() - 1) as u32
            });
        }
        let mut svc_ids: HashMap<(&str, &str), u32> = HashMap::new();
        for s in services {
            let ns = ns_lookup[s.namespace.as_str()];
            svc_ids
                .entry((s.namespace.as_str(), s.name.as_str()))
                .or_insert_with(|| {
                    t.services.push((ns, s.name.as_str().into()));
                    (t.services.len() - 1) as u32
                });
        }
        let mut rule_ids: HashMap<Vec<String>, u32> = HashMap::new();
        let mut rule_of = |t: &mut PolicyTable, patterns: Vec<&str>| -> Option<u32> {
            if patterns.is_empty() {
                return None;
            }
            let key = patterns.iter().map(|p| p.to_string()).collect();
            let id = *rule_ids.entry(key).or_insert_with(|| {
                t.rules.push(compile_rule(&patterns, &ns_lookup, &svc_ids));
                (t.rules.len() - 1) as u32
            });
            Some(id)
        };
        // Identities: one per distinct (namespace, services), plus one per
        // VIP (its service alone) and the unknown one.
        let by_key: HashMap<(&str, &str), &ServicePolicy> = services
            .iter()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect();
        let mut ident_ids: HashMap<(Option<u32>, Vec<u32>), u32> = HashMap::new();
        let mut identity = |t: &mut PolicyTable, ns: Option<&str>, names: &[&str]| -> u32 {
            let ns_id = ns.and_then(|n| ns_lookup.get(n).copied());
            let mut ids: Vec<u32> = match ns {
                Some(n) => names
                    .iter()
                    .filter_map(|s| svc_ids.get(&(n, *s)).copied())
                    .collect(),
                None => Vec::new(),
            };
            ids.sort_unstable();
            ids.dedup();
            if let Some(&id) = ident_ids.get(&(ns_id, ids.clone())) {
                return id;
            }
            let pols: Vec<&ServicePolicy> = ids
                .iter()
                .filter_map(|&i| {
                    let (_, name) = &t.services[i as usize];
                    by_key.get(&(ns.unwrap_or(""), &**name)).copied()
                })
                .collect();
            let union = |f: fn(&ServicePolicy) -> &Vec<String>| -> Vec<&str> {
                let mut v: Vec<&str> = pols
                    .iter()
                    .flat_map(|p| f(p).iter().map(String::as_str))
                    .collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            let egress = rule_of(t, union(|p| &p.upstreams));
            let ingress = rule_of(t, union(|p| &p.whitelists));
            let label: Arc<str> = match (ns, ids.first()) {
                (Some(n), Some(&i)) => format!("{n}/{}", t.services[i as usize].1).into(),
                (Some(n), None) => n.into(),
                (None, _) => "unknown".into(),
            };
            t.identities.push(Identity {
                ns: ns_id,
                services: ids.clone().into(),
                egress,
                ingress,
                label,
            });
            let id = (t.identities.len() - 1) as u32;
            ident_ids.insert((ns_id, ids), id);
            id
        };
        t.unknown = identity(&mut t, None, &[]);
        for m in members {
            let names: Vec<&str> = m.services.iter().map(String::as_str).collect();
            let id = identity(&mut t, Some(&m.namespace), &names);
            t.by_ip.insert(m.ip, id);
        }
        for s in services {
            if let Some(vip) = s.vip {
                let id = identity(&mut t, Some(&s.namespace), &[&s.name]);
                t.by_vip.insert(vip, id);
            }
        }
        t
    }

    /// The policy of a netmap: its services' lists, and who every job
    /// address is (the endpoints' addresses, and this cluster's own jobs
    /// by their labels).
    pub fn from_state(s: &NetState) -> PolicyTable {
        if s.services.values().all(|v| {
            v.spec
                .as_ref()
                .is_none_or(|p| p.upstreams.is_empty() && p.whitelists.is_empty())
        }) {
            return PolicyTable::default();
        }
        let (services, members) = inputs(s);
        PolicyTable::compile(&services, &members)
    }

    /// Whether nothing is restricted (every check passes).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn identity_of(&self, ip: Ipv4Addr) -> &Identity {
        let id = self.by_ip.get(&ip).copied().unwrap_or(self.unknown);
        &self.identities[id as usize]
    }

    /// Whether `src` may open a flow to `dst` (a VIP or a job's address).
    pub fn check(&self, src: Ipv4Addr, dst: Ipv4Addr) -> Result<(), Denied> {
        if self.is_empty() {
            return Ok(());
        }
        let caller = self.identity_of(src);
        let dest = match self.by_vip.get(&dst) {
            Some(&id) => &self.identities[id as usize],
            None => self.identity_of(dst),
        };
        let denied = |why| Denied {
            why,
            service: dest.label.clone(),
            from: caller.label.clone(),
        };
        if let Some(r) = caller.egress
            && !self.matches(&self.rules[r as usize], dest)
        {
            return Err(denied(Refusal::Upstreams));
        }
        if let Some(r) = dest.ingress
            && !self.matches(&self.rules[r as usize], caller)
        {
            return Err(denied(Refusal::Whitelists));
        }
        Ok(())
    }

    /// Whether one of `rule`'s patterns matches `who`.
    fn matches(&self, rule: &Rule, who: &Identity) -> bool {
        if rule.all {
            return true;
        }
        let Some(ns) = who.ns else {
            return false;
        };
        if rule.ns_any.contains(&ns) {
            return true;
        }
        for &s in &who.services {
            if rule.exact.contains(&s) || rule.name_any.contains(&*self.services[s as usize].1) {
                return true;
            }
        }
        if rule.globs.is_empty() {
            return false;
        }
        let ns_name = self.namespaces.get(ns as usize).map_or("", |n| &**n);
        rule.globs.iter().any(|(pn, ps)| {
            glob(pn, ns_name)
                && ((&**ps == "*")
                    || who
                        .services
                        .iter()
                        .any(|&s| glob(ps, &self.services[s as usize].1)))
        })
    }
}

fn compile_rule(
    patterns: &[&str],
    ns_ids: &HashMap<&str, u32>,
    svc_ids: &HashMap<(&str, &str), u32>,
) -> Rule {
    let mut r = Rule::default();
    for p in patterns {
        let Some((ns, svc)) = p.split_once('/') else {
            continue;
        };
        match (ns, svc) {
            ("*", "*") => r.all = true,
            (ns, "*") if !ns.contains('*') => {
                if let Some(&n) = ns_ids.get(ns) {
                    r.ns_any.insert(n);
                }
            }
            ("*", svc) if !svc.contains('*') => {
                r.name_any.insert(svc.into());
            }
            (ns, svc) if !ns.contains('*') && !svc.contains('*') => {
                if let Some(&s) = svc_ids.get(&(ns, svc)) {
                    r.exact.insert(s);
                }
            }
            (ns, svc) => r.globs.push((ns.into(), svc.into())),
        }
    }
    r
}

/// Whether `selector` (non-empty) selects `labels`.
fn selects(
    selector: &std::collections::HashMap<String, String>,
    labels: &std::collections::HashMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The compiler's inputs from a netmap.
pub fn inputs(s: &NetState) -> (Vec<ServicePolicy>, Vec<Member>) {
    let services: Vec<ServicePolicy> = s
        .services
        .iter()
        .map(|((ns, name), svc)| {
            let spec = svc.spec.as_ref();
            let list = |l: fn(&skymesh_proto::v1::ServiceSpec) -> &Vec<String>| {
                spec.map(l).cloned().unwrap_or_default()
            };
            ServicePolicy {
                namespace: ns.clone(),
                name: name.clone(),
                vip: svc
                    .status
                    .as_ref()
                    .and_then(|st| st.cluster_ip.parse().ok()),
                upstreams: list(|s| &s.upstreams),
                whitelists: list(|s| &s.whitelists),
            }
        })
        .collect();
    // ip → (namespace, services)
    let mut who: BTreeMap<Ipv4Addr, (String, Vec<String>)> = BTreeMap::new();
    for ((ns, name), ep) in &s.endpoints {
        for c in ep.status.iter().flat_map(|st| &st.clusters) {
            for a in &c.addresses {
                let Ok(ip) = a.ip.parse() else { continue };
                let e = who.entry(ip).or_insert_with(|| (ns.clone(), Vec::new()));
                if e.0 == *ns {
                    e.1.push(name.clone());
                }
            }
        }
    }
    for ((ns, _), job) in &s.jobs {
        let Some(ip) = job
            .spec
            .as_ref()
            .and_then(|sp| sp.ip.parse::<Ipv4Addr>().ok())
        else {
            continue;
        };
        let no_labels = Default::default();
        let labels = job.metadata.as_ref().map_or(&no_labels, |m| &m.labels);
        let e = who.entry(ip).or_insert_with(|| (ns.clone(), Vec::new()));
        if e.0 != *ns {
            continue;
        }
        for ((sns, sname), svc) in &s.services {
            if sns == ns
                && svc
                    .spec
                    .as_ref()
                    .is_some_and(|sp| selects(&sp.selector, labels))
            {
                e.1.push(sname.clone());
            }
        }
    }
    // Jobs of other clusters that no service selects: their namespace.
    for ((ns, _), ip) in &s.job_addresses {
        who.entry(*ip).or_insert_with(|| (ns.clone(), Vec::new()));
    }
    let members = who
        .into_iter()
        .map(|(ip, (namespace, mut services))| {
            services.sort();
            services.dedup();
            Member {
                ip,
                namespace,
                services,
            }
        })
        .collect();
    (services, members)
}

#[cfg(test)]
mod tests;
