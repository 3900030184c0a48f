//! Malformed input never stops the server (SPEC §8): FORMERR or silence,
//! then valid queries still succeed. And shutdown really stops it.

use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::support::{dig, mesh, start};

fn query_bytes(id: u16, name: &str) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    msg.to_vec().unwrap()
}

/// Receives one datagram, or `None` after 500 ms.
async fn recv(sock: &UdpSocket) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv(&mut buf)).await {
        Ok(Ok(n)) => Some(buf[..n].to_vec()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_datagrams_get_formerr_or_nothing() {
    let srv = start(&mesh()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(srv.addr).await.unwrap();

    let valid = query_bytes(0x4242, "web.default.svc.");
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff],
        vec![0; 11],
        (0..=255u8).collect(),
        vec![0xff; 1400],
        // A header claiming 1 question, then a compression pointer loop.
        vec![0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0, 12, 0, 1, 0, 1],
        // A "response" (QR set) is never answered (no reflection).
        {
            let mut r = valid.clone();
            r[2] |= 0x80;
            r
        },
    ];
    // Every truncation of a valid query.
    for cut in 1..valid.len() {
        junk.push(valid[..cut].to_vec());
    }
    for datagram in &junk {
        sock.send(datagram).await.unwrap();
    }
    // Drain whatever came back: each reply must be FORMERR (rcode 1) or a
    // proper answer, never a crash.
    while let Some(reply) = recv(&sock).await {
        assert!(reply.len() >= 12);
        assert_eq!(reply[2] & 0x80, 0x80, "replies are responses");
    }

    // A question cut off after the header gets FORMERR.
    sock.send(&valid[..valid.len() - 2]).await.unwrap();
    let reply = recv(&sock).await.expect("FORMERR for a truncated question");
    assert_eq!(reply[3] & 0x0f, 1, "rcode FORMERR: {reply:?}");

    // Still serving, over UDP and TCP.
    sock.send(&valid).await.unwrap();
    let reply = recv(&sock).await.expect("answer after garbage");
    let msg = Message::from_vec(&reply).unwrap();
    assert_eq!(msg.metadata.id, 0x4242);
    assert_eq!(msg.answers.len(), 1);
    assert_eq!(
        dig(srv.addr, &["web.default.svc", "A"]).await.rdata("A"),
        ["100.65.0.10"]
    );
    assert_eq!(
        dig(srv.addr, &["+tcp", "web.default.svc", "A"])
            .await
            .rdata("A"),
        ["100.65.0.10"]
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_over_tcp_does_not_stop_the_server() {
    let srv = start(&mesh()).await;
    let valid = query_bytes(7, "web.default.svc.");

    // Random bytes, then close.
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    drop(c);
    // A length prefix promising more than is sent, then close.
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    c.write_all(&[0xff, 0xff, 1, 2, 3]).await.unwrap();
    drop(c);
    // A well-framed message whose body is garbage, then a valid one on the
    // same connection.
    let mut c = TcpStream::connect(srv.addr).await.unwrap();
    let garbage = [0u8, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xc0];
    c.write_all(&(garbage.len() as u16).to_be_bytes())
        .await
        .unwrap();
    c.write_all(&garbage).await.unwrap();
    c.write_all(&(valid.len() as u16).to_be_bytes())
        .await
        .unwrap();
    c.write_all(&valid).await.unwrap();
    let mut answered = false;
    for _ in 0..2 {
        let mut len = [0u8; 2];
        let read = tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut len)).await;
        let Ok(Ok(_)) = read else { break };
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        c.read_exact(&mut body).await.unwrap();
        let msg = Message::from_vec(&body).unwrap();
        if msg.metadata.id == 7 {
            assert_eq!(msg.answers.len(), 1);
            answered = true;
        }
    }
    assert!(
        answered,
        "the valid query after a garbage body on one connection is answered"
    );
    drop(c);
    // A connection that never sends anything stays harmless.
    let idle = TcpStream::connect(srv.addr).await.unwrap();

    assert_eq!(
        dig(srv.addr, &["+tcp", "web.default.svc", "A"])
            .await
            .rdata("A"),
        ["100.65.0.10"]
    );
    assert_eq!(
        dig(srv.addr, &["web.default.svc", "A"]).await.rdata("A"),
        ["100.65.0.10"]
    );
    drop(idle);
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_serving() {
    let srv = start(&mesh()).await;
    let addr = srv.addr;
    srv.stop().await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(addr).await.unwrap();
    let _ = sock.send(&query_bytes(9, "web.default.svc.")).await;
    assert!(recv(&sock).await.is_none(), "answered after shutdown");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting TCP after shutdown"
    );
}
