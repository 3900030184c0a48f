//! What still names a cluster that is being deleted: services'
//! `spec.clusters[]` and user Endpoints' `spec.primary_cluster` and
//! `spec.clusters[]`. A delete refuses while any does, in one line listing
//! them; with `cascade` it cleans them up in the same transaction: the
//! cluster leaves every list, Endpoints whose primary cluster it is are
//! deleted, and so is a service it was the only cluster of (an empty list
//! would mean "every cluster": never widen where a service is exposed).
//!
//! The transaction pins the service and Endpoints prefixes as they were
//! read ([`Compare::NoWritesUnder`]), so a service that starts naming the
//! cluster meanwhile makes the delete re-read instead of leaving a dangling
//! name. Managed Endpoints (the controller's) are left to the controller.

use skymesh_proto::v1::{Kind, Object, object::Obj};
use skymesh_store::Compare;

use super::{Registry, Txn, decode, encode, is_managed, kind_prefix};
use crate::error::{Error, Result};

/// How many referring objects a refusal names before "and N more".
const LISTED: usize = 10;

fn who(kind: Kind, o: &Object) -> String {
    format!("{} {}/{}", kind.singular(), o.namespace(), o.name())
}

impl Registry {
    /// Refuses to delete `cluster` while objects name it, or (`cascade`)
    /// adds their clean-up to `txn`. Returns what was cleaned up.
    pub(super) async fn cluster_references(
        &self,
        cluster: &str,
        cascade: bool,
        txn: &mut Txn,
    ) -> Result<Vec<String>> {
        let mut refs = Vec::new();
        let prefix = kind_prefix(Kind::Service, None);
        let (services, at) = self.store.range(&prefix).await?;
        txn.compares.push(Compare::NoWritesUnder(prefix, at));
        for kv in &services {
            let mut o = decode(kv)?;
            let Some(Obj::Service(s)) = o.obj.as_mut() else {
                continue;
            };
            let Some(spec) = s.spec.as_mut() else {
                continue;
            };
            if !spec.clusters.iter().any(|c| c == cluster) {
                continue;
            }
            spec.clusters.retain(|c| c != cluster);
            let only = spec.clusters.is_empty();
            if cascade && only {
                txn.delete(kv.key.clone());
                self.release_service(s, txn).await?;
                refs.push(format!("{} deleted", who(Kind::Service, &o)));
            } else if cascade {
                txn.put(kv.key.clone(), encode(&o));
                refs.push(format!("{} updated", who(Kind::Service, &o)));
            } else {
                refs.push(format!("{} (spec.clusters)", who(Kind::Service, &o)));
            }
        }
        let prefix = kind_prefix(Kind::Endpoints, None);
        let (endpoints, at) = self.store.range(&prefix).await?;
        txn.compares.push(Compare::NoWritesUnder(prefix, at));
        for kv in &endpoints {
            let mut o = decode(kv)?;
            let Some(Obj::Endpoints(e)) = o.obj.as_mut() else {
                continue;
            };
            if is_managed(e) {
                continue;
            }
            let Some(spec) = e.spec.as_mut() else {
                continue;
            };
            let primary = spec.primary_cluster == cluster;
            let listed = spec.clusters.iter().any(|c| c.cluster == cluster);
            if !primary && !listed {
                continue;
            }
            spec.clusters.retain(|c| c.cluster != cluster);
            if cascade && primary {
                txn.delete(kv.key.clone());
                refs.push(format!("{} deleted", who(Kind::Endpoints, &o)));
            } else if cascade {
                txn.put(kv.key.clone(), encode(&o));
                refs.push(format!("{} updated", who(Kind::Endpoints, &o)));
            } else {
                let field = if primary {
                    "spec.primary_cluster"
                } else {
                    "spec.clusters"
                };
                refs.push(format!("{} ({field})", who(Kind::Endpoints, &o)));
            }
        }
        if !cascade && !refs.is_empty() {
            let n = refs.len();
            let mut listed = refs[..n.min(LISTED)].join(", ");
            if n > LISTED {
                listed.push_str(&format!(" and {} more", n - LISTED));
            }
            return Err(Error::Precondition(format!(
                "cluster {cluster:?} is still named by {listed}: remove it from them first, \
                 or delete with --cascade (skyctl delete cluster {cluster} --cascade)"
            )));
        }
        Ok(refs)
    }
}
