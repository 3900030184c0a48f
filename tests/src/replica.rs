//! A service replica for end-to-end tests, run in an app host's namespace.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Result;

use crate::netns::Netns;

/// The TCP port replicas listen on.
pub const TCP_PORT: u16 = 8080;
/// The UDP port replicas answer on.
pub const UDP_PORT: u16 = 9090;

/// Connects to the replica (or the VIP) at `dst` and reads the name it
/// answers with; `timeout` for the connect and for the read.
pub fn ask_name(dst: std::net::SocketAddr, timeout: Duration) -> std::io::Result<String> {
    let s = std::net::TcpStream::connect_timeout(&dst, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line.trim().to_string())
}

/// The `[[job]]` entry of a meshd jobs file (`--jobs`) for the replica
/// `name` at `ip`, labelled `app = "web"`, with these ports (e.g.
/// `http:8080`, `dns:9090/UDP`).
pub fn job_entry(name: &str, ip: Ipv4Addr, ports: &[&str]) -> String {
    labelled_job_entry(name, ip, "web", ports)
}

/// [`job_entry`] labelled `app = "<app>"`.
pub fn labelled_job_entry(name: &str, ip: Ipv4Addr, app: &str, ports: &[&str]) -> String {
    let ports: Vec<String> = ports.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[[job]]\nname = \"{name}\"\nip = \"{ip}\"\nlabels = {{ app = \"{app}\" }}\nports = [{}]\n\n",
        ports.join(", ")
    )
}

/// A replica: answers every TCP connection with its name and a newline,
/// then echoes lines; answers every UDP datagram with its name. Stops
/// (closes its listeners) when dropped or [`Replica::stop`]ped.
pub struct Replica {
    alive: Arc<AtomicBool>,
}

impl Replica {
    /// Starts the replica `name` at `ip` in `ns`.
    ///
    /// # Panics
    /// When its ports cannot be bound (a test's setup failed).
    pub fn start(ns: &Netns, ip: Ipv4Addr, name: &str) -> Replica {
        match Self::try_start(ns, ip, name) {
            Ok(r) => r,
            Err(e) => panic!("replica {name} at {ip}: {e:#}"),
        }
    }

    /// Starts the replica `name` at `ip` in `ns`.
    pub fn try_start(ns: &Netns, ip: Ipv4Addr, name: &str) -> Result<Replica> {
        let alive = Arc::new(AtomicBool::new(true));
        let (tcp, udp) = ns.run_in(move || -> std::io::Result<_> {
            Ok((
                TcpListener::bind((ip, TCP_PORT))?,
                UdpSocket::bind((ip, UDP_PORT))?,
            ))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let (n1, a1) = (name.to_string(), alive.clone());
        std::thread::spawn(move || {
            while a1.load(Ordering::SeqCst) {
                match tcp.accept() {
                    Ok((c, _)) => {
                        let (n, a) = (n1.clone(), a1.clone());
                        std::thread::spawn(move || serve(c, &n, &a));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let (n2, a2) = (name.to_string(), alive.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while a2.load(Ordering::SeqCst) {
                if let Ok((_, src)) = udp.recv_from(&mut buf) {
                    let _ = udp.send_to(n2.as_bytes(), src);
                }
            }
        });
        Ok(Replica { alive })
    }

    /// Closes the listeners (connections end within 200 ms).
    pub fn stop(&self) {
        self.alive.store(false, Ordering::SeqCst);
    }
}

/// One connection: the name, then every line echoed, while `alive`.
fn serve(mut c: std::net::TcpStream, name: &str, alive: &AtomicBool) {
    let setup = (|| -> std::io::Result<_> {
        c.set_nonblocking(false)?;
        c.set_read_timeout(Some(Duration::from_millis(200)))?;
        c.write_all(format!("{name}\n").as_bytes())?;
        c.try_clone()
    })();
    let Ok(reader) = setup else {
        return;
    };
    let mut r = BufReader::new(reader);
    let mut line = String::new();
    while alive.load(Ordering::SeqCst) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                let _ = c.write_all(line.as_bytes());
            }
            Err(_) => {}
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop();
    }
}
