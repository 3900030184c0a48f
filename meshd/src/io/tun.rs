//! The TUN interface and the kernel routes that send mesh traffic into it.
//!
//! Addresses and routes are set with iproute2's `ip`, as wg-quick does;
//! route changes are diffs between the routes we installed and the ones the
//! netmap wants, so unchanged routes are never touched.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context as _, Result, bail};
use ipnet::Ipv4Net;
use tun_rs::{DeviceBuilder, SyncDevice};

use crate::state::NetState;

/// MTU of the TUN interface (SPEC §4): 1500 minus IPv4 (20), UDP (8) and
/// WireGuard (32) overheads, rounded down as wg-quick does for IPv6 paths.
pub const MTU: u16 = 1420;

/// Creates the TUN interface `name` with `ip/prefix` and brings it up.
///
/// The interface is opened with offloads (`IFF_VNET_HDR`, TSO/USO), as
/// wireguard-go does since 0.0.20230223: the kernel hands meshd whole
/// 64 KiB TCP segments, which are split, encrypted and sent as one UDP GSO
/// batch, and decrypted packets of one flow are coalesced into one write.
/// Kernels without TUN offloads, and `offload: false` (`meshd
/// --no-offload`), get a plain interface (one packet per read and write).
///
/// The device is returned unregistered: the packet thread registers it
/// with its own runtime ([`super::device::spawn`]).
pub fn create(name: &str, ip: Ipv4Addr, prefix: u8, offload: bool) -> Result<SyncDevice> {
    let build = |offload: bool| {
        DeviceBuilder::new()
            .name(name)
            .ipv4(ip, prefix, None)
            .mtu(MTU)
            .offload(offload)
            .build_sync()
    };
    let dev = match build(offload) {
        Ok(dev) => dev,
        Err(e) if offload => {
            tracing::warn!(error = %e, "TUN offloads unavailable; one packet per read");
            build(false).with_context(|| create_failed(name))?
        }
        Err(e) => return Err(anyhow::Error::from(e).context(create_failed(name))),
    };
    tracing::info!(
        tcp_offload = dev.tcp_gso(),
        udp_offload = dev.udp_gso(),
        "TUN interface {name} created"
    );
    Ok(dev)
}

fn create_failed(name: &str) -> String {
    format!("failed to create TUN interface {name} (is /dev/net/tun available and are we root?)")
}

/// Runs `ip ARGS...`.
pub async fn ip(args: &[&str]) -> Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(args)
        .output()
        .await
        .context("failed to run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Turns on IPv4 forwarding in this network namespace (nothing to do when
/// it is on already, e.g. on a Kubernetes node where /proc/sys is
/// read-only inside the container).
pub fn enable_forwarding() -> Result<()> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    if std::fs::read_to_string(PATH).is_ok_and(|v| v.trim() == "1") {
        return Ok(());
    }
    std::fs::write(PATH, "1").context("failed to enable IPv4 forwarding (net.ipv4.ip_forward)")
}

/// The routes the netmap wants through the interface: the service CIDR and
/// every peer's allowed IPs outside the overlay (whose route comes with the
/// interface address).
pub fn desired_routes(s: &NetState) -> BTreeSet<Ipv4Net> {
    let overlay = s.net.overlay_cidr;
    let peers = s.net.peers.values().flat_map(|p| &p.allowed_ips);
    s.net
        .service_cidr
        .iter()
        .chain(peers.filter(|n| !overlay.is_some_and(|o| o.contains(*n))))
        .copied()
        .collect()
}

/// The routes installed through one interface.
#[derive(Debug)]
pub struct Routes {
    iface: String,
    installed: BTreeSet<Ipv4Net>,
}

impl Routes {
    /// No routes installed yet on `iface`.
    pub fn new(iface: &str) -> Self {
        Routes {
            iface: iface.to_string(),
            installed: BTreeSet::new(),
        }
    }

    /// Adds and removes routes so that exactly `desired` go through the
    /// interface. Failures are logged and retried on the next call.
    pub async fn sync(&mut self, desired: &BTreeSet<Ipv4Net>) {
        let remove: Vec<Ipv4Net> = self.installed.difference(desired).copied().collect();
        let add: Vec<Ipv4Net> = desired.difference(&self.installed).copied().collect();
        for n in remove {
            let net = n.to_string();
            match ip(&["route", "del", &net, "dev", &self.iface]).await {
                Ok(()) => tracing::info!(route = %net, "route removed"),
                Err(e) => tracing::warn!(error = %e, "route removal failed"),
            }
            self.installed.remove(&n);
        }
        for n in add {
            let net = n.to_string();
            match ip(&["route", "replace", &net, "dev", &self.iface]).await {
                Ok(()) => {
                    tracing::info!(route = %net, "route added");
                    self.installed.insert(n);
                }
                Err(e) => tracing::warn!(error = %e, "route add failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skymesh_proto::v1::Peer;

    /// Routes come from the parsed netmap, by the node's rule: a bare
    /// address is its /32, host bits are cleared, the overlay's own
    /// addresses need no route.
    #[test]
    fn routes_follow_the_parsed_netmap() {
        let mut s = NetState {
            overlay_cidr: "100.64.0.0/16".into(),
            service_cidr: "100.65.0.0/16".into(),
            ..Default::default()
        };
        s.peers.insert(
            "b".into(),
            Peer {
                cluster: "b".into(),
                allowed_ips: vec![
                    "100.64.0.2/32".into(),
                    "10.2.3.4/16".into(),
                    "192.0.2.9".into(),
                ],
                ..Default::default()
            },
        );
        s.reparse();
        let got: Vec<String> = desired_routes(&s).iter().map(|n| n.to_string()).collect();
        assert_eq!(got, ["10.2.0.0/16", "100.65.0.0/16", "192.0.2.9/32"]);
    }
}
