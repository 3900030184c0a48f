//! A minimal HTTP/1.0 GET, for the binaries' `/metrics` and `/healthz`
//! (the tests see the status, the headers and the body exactly as a
//! scraper would), and `promtool check metrics` over a scraped body.

use std::io::{Read as _, Write as _};
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// Header names in lower case, with their values.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// `GET path` from `addr`, with an `Accept` header when given.
pub fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> Result<Reply> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut req = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    if let Some(a) = accept {
        req.push_str(&format!("Accept: {a}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP header in {raw:?}"))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("no HTTP status in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Runs `promtool check metrics` (Debian package `prometheus`) over a
/// scraped body: fails with what promtool said unless it found nothing to
/// complain about.
pub fn promtool_check(body: &str) -> Result<()> {
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("promtool not found: apt-get install prometheus (scripts/install-test-deps)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(body.as_bytes())?;
    let out = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || !said.trim().is_empty() {
        bail!(
            "promtool check metrics ({}): {said}\nover:\n{body}",
            out.status
        );
    }
    Ok(())
}

/// The value of the first sample line starting with `prefix` (e.g.
/// `grpc_server_handled_total{`), matching every `must_contain` too.
pub fn sample(body: &str, prefix: &str, must_contain: &[&str]) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(prefix) && must_contain.iter().all(|m| l.contains(m)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}
