//! Load generators and probes run inside the harness's namespaces: iperf3
//! (client and server), ping, a minimal DNS client (for polling names while
//! timing the control plane), TCP connection-rate loops, meshd's metrics
//! page.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use skymesh_tests::netns::{Netns, NsProcess, wait_until};

/// UDP payload for iperf3 -u: fits a 1420-byte tunnel MTU unfragmented.
pub const UDP_PAYLOAD: u32 = 1372;

/// What an iperf3 run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Iperf {
    /// TCP with this many parallel streams.
    Tcp(u32),
    /// UDP at a high target rate.
    Udp,
}

/// The outcome of one iperf3 run.
#[derive(Debug, Clone, Copy)]
pub struct IperfResult {
    /// Received throughput.
    pub gbps: f64,
    /// UDP datagrams lost, percent (0 for TCP).
    pub loss_pct: f64,
}

/// Starts `iperf3 -s` bound to `ip:port` in `ns` and waits until it accepts.
pub fn iperf_server(ns: &Netns, ip: Ipv4Addr, port: u16, log: &Path) -> Result<NsProcess> {
    let p = ns.spawn(
        &[
            "iperf3",
            "-s",
            "-B",
            &ip.to_string(),
            "-p",
            &port.to_string(),
        ],
        log,
    )?;
    let up = wait_until(Duration::from_secs(5), || {
        ns.exec(&["sh", "-c", &format!("ss -ltn | grep -q '{ip}:{port} '")])
            .status
            .success()
    });
    ensure!(
        up,
        "iperf3 server on {ip}:{port} did not start: {}",
        p.log()
    );
    Ok(p)
}

/// Runs an iperf3 client in `ns` against `server:port` for `secs` seconds,
/// retrying while the server is still busy with the previous test, and a
/// few times when the control connection fails transiently (a tunnel still
/// draining the previous run's UDP flood can reset it).
pub fn iperf(
    ns: &Netns,
    server: Ipv4Addr,
    port: u16,
    mode: Iperf,
    secs: u32,
) -> Result<IperfResult> {
    let (mut busy, mut transient) = (0, 0);
    loop {
        match iperf_once(ns, server, port, mode, secs) {
            Err(e) if busy < 8 && format!("{e:#}").contains("busy") => {
                busy += 1;
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) if transient < 3 && is_transient(&format!("{e:#}")) => {
                transient += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
            r => return r,
        }
    }
}

/// iperf3 failures worth one more try.
fn is_transient(msg: &str) -> bool {
    [
        "unable to connect",
        "Connection reset",
        "Connection refused",
        "control socket has closed",
    ]
    .iter()
    .any(|m| msg.contains(m))
}

fn iperf_once(
    ns: &Netns,
    server: Ipv4Addr,
    port: u16,
    mode: Iperf,
    secs: u32,
) -> Result<IperfResult> {
    let (ip, port_s, t) = (server.to_string(), port.to_string(), secs.to_string());
    let mut args = vec!["iperf3", "-c", &ip, "-p", &port_s, "-t", &t, "-J"];
    let streams;
    let payload = UDP_PAYLOAD.to_string();
    match mode {
        Iperf::Tcp(n) => {
            streams = n.to_string();
            args.extend(["-P", &streams]);
        }
        Iperf::Udp => args.extend(["-u", "-b", "10G", "-l", &payload]),
    }
    let out = ns.exec(&args);
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
        format!(
            "iperf3 {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        bail!("iperf3 {mode:?} to {ip}: {e}");
    }
    let end = v.get("end").context("iperf3 JSON has no `end`")?;
    match mode {
        Iperf::Tcp(_) => {
            let bps = end
                .pointer("/sum_received/bits_per_second")
                .and_then(serde_json::Value::as_f64)
                .context("iperf3 JSON has no end.sum_received.bits_per_second")?;
            Ok(IperfResult {
                gbps: bps / 1e9,
                loss_pct: 0.0,
            })
        }
        Iperf::Udp => {
            let sum = end.get("sum").context("iperf3 JSON has no end.sum")?;
            let f = |k: &str| sum.get(k).and_then(serde_json::Value::as_f64);
            let loss = f("lost_percent").unwrap_or(0.0);
            // Newer iperf3 reports the receiver's view separately; 3.12
            // reports the sender's rate and the receiver's losses.
            let bps = end
                .pointer("/sum_received/bits_per_second")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or_else(|| f("bits_per_second").unwrap_or(0.0) * (1.0 - loss / 100.0));
            Ok(IperfResult {
                gbps: bps / 1e9,
                loss_pct: loss,
            })
        }
    }
}

/// `count` pings at `interval_ms` from `ns` to `dst`: the RTTs of the
/// replies, milliseconds.
pub fn ping_rtts(ns: &Netns, dst: Ipv4Addr, count: u32, interval_ms: u32) -> Result<Vec<f64>> {
    let interval = format!("{:.3}", f64::from(interval_ms) / 1000.0);
    let out = ns.exec(&[
        "ping",
        "-n",
        "-c",
        &count.to_string(),
        "-i",
        &interval,
        "-W",
        "1",
        &dst.to_string(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let rtts: Vec<f64> = text
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    ensure!(
        rtts.len() * 2 >= count as usize,
        "ping {dst}: only {} of {count} replies: {}",
        rtts.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(rtts)
}

/// A DNS A query for `name` with id `id`.
pub fn dns_query(name: &str, id: u16) -> Vec<u8> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).unwrap_or(63).min(63));
        q.extend_from_slice(&label.as_bytes()[..label.len().min(63)]);
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Skips a (possibly compressed) name at `i`; returns the offset after it.
fn skip_name(m: &[u8], mut i: usize) -> Option<usize> {
    loop {
        let len = *m.get(i)?;
        if len & 0xc0 == 0xc0 {
            return Some(i + 2);
        }
        if len == 0 {
            return Some(i + 1);
        }
        i += 1 + usize::from(len);
    }
}

/// A parsed DNS answer: its id, rcode and the A records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub id: u16,
    pub rcode: u8,
    pub a: Vec<Ipv4Addr>,
}

/// Parses a DNS response (id, rcode, A records of the answer section).
pub fn dns_parse(m: &[u8]) -> Option<DnsAnswer> {
    if m.len() < 12 {
        return None;
    }
    let id = u16::from_be_bytes([m[0], m[1]]);
    let rcode = m[3] & 0x0f;
    let qd = u16::from_be_bytes([m[4], m[5]]);
    let an = u16::from_be_bytes([m[6], m[7]]);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    let mut a = Vec::new();
    for _ in 0..an {
        i = skip_name(m, i)?;
        let h = m.get(i..i + 10)?;
        let (ty, len) = (
            u16::from_be_bytes([h[0], h[1]]),
            usize::from(u16::from_be_bytes([h[8], h[9]])),
        );
        let data = m.get(i + 10..i + 10 + len)?;
        if ty == 1 && len == 4 {
            a.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        i += 10 + len;
    }
    Some(DnsAnswer { id, rcode, a })
}

/// A UDP socket inside a namespace that asks one DNS server.
pub struct DnsProbe {
    sock: UdpSocket,
    next_id: u16,
}

impl DnsProbe {
    /// Opens the socket inside `ns`, connected to `server`.
    pub fn new(ns: &Netns, server: SocketAddr) -> Result<DnsProbe> {
        let sock = ns.run_in(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(server)?;
            s.set_read_timeout(Some(Duration::from_millis(200)))?;
            Ok(s)
        })??;
        Ok(DnsProbe { sock, next_id: 1 })
    }

    /// Asks for `name` A once; `None` on timeout or garbage.
    pub fn ask(&mut self, name: &str) -> Option<DnsAnswer> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.sock.send(&dns_query(name, id)).ok()?;
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_millis(200);
        while Instant::now() < deadline {
            let n = self.sock.recv(&mut buf).ok()?;
            if let Some(a) = dns_parse(&buf[..n])
                && a.id == id
            {
                return Some(a);
            }
        }
        None
    }

    /// Whether `name` resolves (NOERROR with at least one A record).
    pub fn resolves(&mut self, name: &str) -> bool {
        self.ask(name)
            .is_some_and(|a| a.rcode == 0 && !a.a.is_empty())
    }
}

/// A TCP server in `ns` on `ip:port` that accepts connections and answers
/// each with `reply` then closes; runs until the returned flag is set (or
/// the process ends).
pub fn tcp_reply_server(
    ns: &Netns,
    ip: Ipv4Addr,
    port: u16,
    reply: String,
) -> Result<Arc<AtomicBool>> {
    let l: TcpListener = ns.run_in(move || TcpListener::bind((ip, port)))??;
    l.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        while !flag.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let _ = c.set_nonblocking(false);
                    let _ = c.write_all(reply.as_bytes());
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    Ok(stop)
}

/// Opens one TCP connection from `ns`... (already inside `ns`: call from
/// [`Netns::run_in`]) to `dst`, reads what the server says, closes.
pub fn tcp_fetch(dst: SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// New TCP connections per second from `ns` to `dst` over `secs` seconds,
/// `workers` connecting in parallel (each connection: connect, read the
/// server's reply, close).
pub fn conn_rate(ns: &Netns, dst: SocketAddr, secs: f64, workers: usize) -> Result<f64> {
    ns.run_in(move || -> Result<f64> {
        let deadline = Instant::now() + Duration::from_secs_f64(secs);
        let t0 = Instant::now();
        let counts: Vec<Result<u64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..workers)
                .map(|_| {
                    s.spawn(move || -> Result<u64> {
                        let mut n = 0u64;
                        while Instant::now() < deadline {
                            tcp_fetch(dst, Duration::from_secs(2))
                                .with_context(|| format!("connection {n} to {dst}"))?;
                            n += 1;
                        }
                        Ok(n)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
                })
                .collect()
        });
        let mut total = 0;
        for c in counts {
            total += c?;
        }
        Ok(total as f64 / t0.elapsed().as_secs_f64())
    })?
}

/// The IPv4 address of `dev` inside `ns`.
pub fn iface_ip(ns: &Netns, dev: &str) -> Result<Ipv4Addr> {
    let out = ns.ip(&["-4", "-o", "addr", "show", "dev", dev])?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .with_context(|| format!("no IPv4 address on {dev} in {}: {out}", ns.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_roundtrip_parses_a_records() {
        let q = dns_query("web.default.svc", 7);
        // Build a response: header with QR, 1 question, 2 answers
        // (compressed name pointers to the question).
        let mut r = q.clone();
        r[2] = 0x81;
        r[3] = 0x80;
        r[7] = 2;
        for ip in [[100, 65, 0, 1], [100, 65, 0, 2]] {
            r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4]);
            r.extend_from_slice(&ip);
        }
        let a = dns_parse(&r).unwrap();
        assert_eq!(a.id, 7);
        assert_eq!(a.rcode, 0);
        assert_eq!(
            a.a,
            vec![Ipv4Addr::new(100, 65, 0, 1), Ipv4Addr::new(100, 65, 0, 2)]
        );
        assert!(dns_parse(&r[..20]).is_none());
    }
}
