//! `skymesh-demo-app`: one replica of the quickstart's demo service.
//!
//! It answers every HTTP request (`GET /`, or any path) on `--listen` (TCP)
//! with `hello from <name> in <cluster>\n`, and every UDP datagram sent to
//! the same address with the same text, so a client can tell which replica
//! in which cluster a connection (or flow) reached. Only the standard
//! library: one thread per TCP connection, one thread for UDP.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

/// A tiny HTTP + UDP server that answers `hello from <name> in <cluster>`.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// This replica's name (the job name), e.g. web-c1-1.
    #[arg(long)]
    name: String,
    /// The cluster this replica runs in, e.g. c1.
    #[arg(long)]
    cluster: String,
    /// TCP (HTTP) and UDP address to serve on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
}

/// The greeting every request gets.
fn greeting(name: &str, cluster: &str) -> String {
    format!("hello from {name} in {cluster}\n")
}

/// The HTTP/1.1 response for one request line (`GET / HTTP/1.1`): the
/// greeting for GET and HEAD, 405 for anything else.
fn http_response(request_line: &str, body: &str) -> String {
    let method = request_line.split_whitespace().next().unwrap_or("");
    let (status, body) = match method {
        "GET" | "HEAD" => ("200 OK", body),
        _ => ("405 Method Not Allowed", "only GET is served here\n"),
    };
    let mut r = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if method != "HEAD" {
        r.push_str(body);
    }
    r
}

/// Reads one request (request line + headers) and answers it.
fn serve_http(stream: TcpStream, body: &str) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // Skip the headers up to the blank line (bounded, so a client cannot
    // keep a thread forever).
    for _ in 0..100 {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
    }
    let mut stream = stream;
    stream.write_all(http_response(&request_line, body).as_bytes())?;
    stream.flush()
}

fn main() -> ExitCode {
    let a = Args::parse();
    let body = greeting(&a.name, &a.cluster);
    let tcp = match TcpListener::bind(a.listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("skymesh-demo-app: cannot listen on tcp {}: {e}", a.listen);
            return ExitCode::FAILURE;
        }
    };
    let udp = match UdpSocket::bind(a.listen) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("skymesh-demo-app: cannot listen on udp {}: {e}", a.listen);
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "skymesh-demo-app: {} in {} serving HTTP and UDP on {}",
        a.name, a.cluster, a.listen
    );
    {
        let body = body.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            loop {
                match udp.recv_from(&mut buf) {
                    Ok((_, peer)) => {
                        let _ = udp.send_to(body.as_bytes(), peer);
                    }
                    Err(e) => eprintln!("skymesh-demo-app: udp: {e}"),
                }
            }
        });
    }
    for conn in tcp.incoming() {
        match conn {
            Ok(s) => {
                let body = body.clone();
                std::thread::spawn(move || {
                    let _ = serve_http(s, &body);
                });
            }
            Err(e) => {
                eprintln!("skymesh-demo-app: accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_get_with_the_greeting() {
        let body = greeting("web-c1-1", "c1");
        assert_eq!(body, "hello from web-c1-1 in c1\n");
        let r = http_response("GET / HTTP/1.1\r\n", &body);
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nhello from web-c1-1 in c1\n"), "{r}");
        assert!(r.contains(&format!("Content-Length: {}\r\n", body.len())));
        let head = http_response("HEAD / HTTP/1.1\r\n", &body);
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(http_response("POST / HTTP/1.1\r\n", &body).starts_with("HTTP/1.1 405"));
    }
}
