//! The server as hickory's own client sees it, over UDP and TCP.

use std::net::SocketAddr;
use std::str::FromStr;

use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::tcp::TcpClientStream;
use hickory_net::udp::UdpClientStream;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RData, RecordType};

use crate::support::{mesh, start};

async fn udp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let conn = UdpClientStream::builder(addr, TokioRuntimeProvider::default()).build();
    let (client, bg) = Client::<TokioRuntimeProvider>::from_sender(conn);
    tokio::spawn(bg);
    client
}

async fn tcp_client(addr: SocketAddr) -> Client<TokioRuntimeProvider> {
    let (stream, sender) = TcpClientStream::new(addr, None, None, TokioRuntimeProvider::new());
    let (client, bg) = Client::<TokioRuntimeProvider>::new(stream.await.unwrap(), sender);
    tokio::spawn(bg);
    client
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_answers() {
    let srv = start(&mesh()).await;
    for mut client in [udp_client(srv.addr).await, tcp_client(srv.addr).await] {
        let resp = client
            .query(
                name("web.default.svc.clusterset.local."),
                DNSClass::IN,
                RecordType::A,
            )
            .await
            .unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::NoError);
        assert!(resp.metadata.authoritative);
        let ips: Vec<String> = resp.answers.iter().map(|r| r.data.to_string()).collect();
        assert_eq!(ips, ["100.65.0.10"]);

        let resp = client
            .query(
                name("_http._tcp.web.default.svc."),
                DNSClass::IN,
                RecordType::SRV,
            )
            .await
            .unwrap();
        match &resp.answers[0].data {
            RData::SRV(srv) => {
                assert_eq!((srv.priority, srv.weight, srv.port), (0, 100, 80));
                assert_eq!(srv.target.to_string(), "web.default.svc.");
            }
            other => panic!("not SRV: {other:?}"),
        }

        let resp = client
            .query(
                name("10.0.65.100.in-addr.arpa."),
                DNSClass::IN,
                RecordType::PTR,
            )
            .await
            .unwrap();
        assert_eq!(resp.answers[0].data.to_string(), "web.default.svc.");

        let resp = client
            .query(name("api.default.svc."), DNSClass::IN, RecordType::A)
            .await
            .unwrap();
        assert_eq!(resp.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(resp.authorities.len(), 1);
        assert_eq!(resp.authorities[0].record_type(), RecordType::SOA);
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_replicas_truncated_over_udp_complete_over_tcp() {
    let srv = start(&mesh()).await;
    let mut udp = udp_client(srv.addr).await;
    udp.disable_edns();
    let resp = udp
        .query(name("big.default.svc."), DNSClass::IN, RecordType::A)
        .await
        .unwrap();
    assert!(resp.metadata.truncation, "{:?}", resp.metadata);
    assert!(resp.answers.len() < 100);

    let mut tcp = tcp_client(srv.addr).await;
    let resp = tcp
        .query(name("big.default.svc."), DNSClass::IN, RecordType::A)
        .await
        .unwrap();
    assert!(!resp.metadata.truncation);
    assert_eq!(resp.answers.len(), 100);
    srv.stop().await;
}
