//! Every key the coordinator writes, in one place: the layout of the store
//! (embedded, or etcd under `--etcd-prefix`).
//!
//! | key | value |
//! |---|---|
//! | `/registry/<kind>s/[<namespace>/]<name>` | an object (protobuf `Object`) |
//! | `/meta/clusters-generation` | bumped by writes that change clusters or their CIDRs |
//! | `/auth/admin` | SHA-256 of the admin token |
//! | `/auth/join/<hex sha256>` | a join token: `cluster\nexpiry` |
//! | `/auth/cluster/<name>` | SHA-256 of a cluster's credential |
//! | `/ipam/overlay/<ip>`, `/ipam/vip/<ip>` | an allocated address: its owner |
//! | `/ipam-cursor/overlay`, `/ipam-cursor/vip` | the pool's last allocated address (the next search starts after it) |
//! | `/psk/<a>/<b>` | the pre-shared key of a pair of clusters (`a < b`) |
//! | `/election/controllers` | the controller leader (etcd lease) |
//! | `/tls/ca` | the mesh CA, certificate and key (shared stores only) |
//! | `/events/<revision>-<n>` | a recorded event (protobuf `MeshEvent`), kept 1 h; `<revision>` is the object write's |
//! | `/events-cursor` | the last object-write revision the event recorder has recorded |

use skymesh_proto::v1::Kind;

/// Prefix of every object key.
pub const REGISTRY: &str = "/registry/";
/// Prefix of cluster objects.
pub const CLUSTERS: &str = "/registry/clusters/";
/// Prefix of service objects.
pub const SERVICES: &str = "/registry/services/";
/// Prefix of endpoints objects.
pub const ENDPOINTS: &str = "/registry/endpoints/";
/// Prefix of job objects.
pub const JOBS: &str = "/registry/jobs/";
/// Bumped by every write that changes the set of clusters or their CIDRs,
/// so overlap checks are serialised across writers.
pub const CLUSTERS_GENERATION: &str = "/meta/clusters-generation";
/// The admin token's hash.
pub const ADMIN_TOKEN: &str = "/auth/admin";
/// Join tokens, by hash.
pub const JOIN_TOKENS: &str = "/auth/join/";
/// Cluster credentials' hashes, by cluster.
pub const CREDENTIALS: &str = "/auth/cluster/";
/// Allocated gateway overlay addresses.
pub const OVERLAY_IPS: &str = "/ipam/overlay/";
/// Allocated service VIPs.
pub const VIPS: &str = "/ipam/vip/";
/// The overlay pool's allocation cursor (outside [`OVERLAY_IPS`], so ranges
/// of allocations never see it).
pub const OVERLAY_CURSOR: &str = "/ipam-cursor/overlay";
/// The VIP pool's allocation cursor.
pub const VIP_CURSOR: &str = "/ipam-cursor/vip";
/// Pre-shared keys of cluster pairs.
pub const PSKS: &str = "/psk/";
/// The controller leader's lease key.
pub const CONTROLLER_LEADER: &str = "/election/controllers";
/// The mesh CA, when the store is shared by several coordinators.
pub const MESH_CA: &str = "/tls/ca";

/// Recorded events (outside [`REGISTRY`]: recording one is no object write).
pub const EVENTS: &str = "/events/";
/// The event recorder's progress (outside [`EVENTS`]).
pub const EVENTS_CURSOR: &str = "/events-cursor";

/// The kind's name in keys (`clusters`, `jobs`, ...).
pub fn plural(kind: Kind) -> &'static str {
    match kind {
        Kind::Unspecified => "unknown",
        Kind::Namespace => "namespaces",
        Kind::Cluster => "clusters",
        Kind::Job => "jobs",
        Kind::Service => "services",
        Kind::Endpoints => "endpoints",
    }
}

/// Store key of an object.
pub fn object_key(kind: Kind, namespace: &str, name: &str) -> String {
    if kind.namespaced() {
        format!("{REGISTRY}{}/{namespace}/{name}", plural(kind))
    } else {
        format!("{REGISTRY}{}/{name}", plural(kind))
    }
}

/// Key prefix of a kind, within one namespace when given.
pub fn kind_prefix(kind: Kind, namespace: Option<&str>) -> String {
    match namespace {
        Some(ns) if kind.namespaced() => format!("{REGISTRY}{}/{ns}/", plural(kind)),
        _ => format!("{REGISTRY}{}/", plural(kind)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_prefixes_match_the_constants() {
        assert_eq!(kind_prefix(Kind::Cluster, None), CLUSTERS);
        assert_eq!(kind_prefix(Kind::Service, None), SERVICES);
        assert_eq!(kind_prefix(Kind::Endpoints, None), ENDPOINTS);
        assert_eq!(kind_prefix(Kind::Job, None), JOBS);
        assert_eq!(object_key(Kind::Job, "shop", "j"), "/registry/jobs/shop/j");
        assert_eq!(object_key(Kind::Cluster, "x", "c"), "/registry/clusters/c");
        for k in [CLUSTERS, SERVICES, ENDPOINTS, JOBS] {
            assert!(k.starts_with(REGISTRY));
        }
    }
}
