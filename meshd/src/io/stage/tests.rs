//! The pipelined stage against the inline one: the same batches sealed by
//! several threads in parallel (each delayed at random, so that later
//! batches often finish first) come out byte for byte as the packet
//! thread would have sent them itself, and the peer opens them all, in
//! order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::mpsc;

use super::*;
use crate::core::batch::{Datagrams, Packets};
use crate::core::engine::tests::{A_ADDR, Wire, numbered, stage as read_into, wire};
use crate::core::engine::{SLOT, TUN_SLOTS};

type Sent = Vec<(SocketAddr, Vec<u8>)>;

/// Two engines with a session up, and numbered packets of `sizes` from a
/// to b.
fn established(sizes: &[usize]) -> (Wire, Vec<Vec<u8>>) {
    let mut w = wire();
    // The handshake, so that every packet after it is sealed in place.
    w.run(
        vec![numbered([10, 1, 0, 5], [10, 2, 0, 5], 0, 100)],
        Vec::new(),
    );
    w.tun_b.clear();
    let packets = sizes
        .iter()
        .enumerate()
        .map(|(i, n)| numbered([10, 1, 0, 5], [10, 2, 0, 5], i as u32 + 1, *n))
        .collect();
    (w, packets)
}

/// Thread `k` of `threads`' delay before each batch it works on: its
/// batches are k, k + threads, ...; batch n sleeps `delays[n % len]` ×
/// 100 µs.
fn delayed(k: usize, threads: usize, delays: Vec<u8>) -> impl FnMut() {
    let mut seen = 0;
    move || {
        let nth = k + seen * threads;
        seen += 1;
        let us = 100 * u64::from(delays[nth % delays.len()]);
        std::thread::sleep(Duration::from_micros(us));
    }
}

/// Runs `batches` through a stage of `threads` threads that seal them
/// (each batch after its [`delayed`] sleep) and collect what they send.
fn pipelined(batches: Vec<Datagrams>, threads: usize, delays: Vec<u8>) -> Sent {
    let sent: Arc<Mutex<Sent>> = Arc::default();
    let (mut w, ends) = writer("test-tx", threads, || Datagrams::new(1 << 16, 64));
    let handles = spawn("test-tx", ends, |k| {
        let sent = sent.clone();
        let mut delay = delayed(k, threads, delays.clone());
        Ok(Steps {
            work: move |d: &mut Datagrams| {
                delay();
                d.seal();
            },
            emit: move |d: &mut Datagrams| {
                let mut out = sent.lock().unwrap();
                out.extend(d.datagrams().map(|(a, b)| (a, b.to_vec())));
                d.clear();
            },
        })
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        for b in batches {
            w.current = b;
            w.swap().await.unwrap();
        }
    });
    drop(w);
    for h in handles {
        h.join().unwrap();
    }
    Arc::try_unwrap(sent).unwrap().into_inner().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn pipelined_output_equals_inline_output(
        sizes in prop::collection::vec(4usize..1397, 1..400),
        per_read in 1usize..=TUN_SLOTS,
        threads in 1usize..5,
        delays in prop::collection::vec(0u8..4, 1..8),
    ) {
        let (mut w, packets) = established(&sizes);
        // The packet thread's part: each read staged, balanced, routed,
        // nonces reserved in order; nothing sealed yet.
        let mut tun = Packets::new(128, 10);
        let batches: Vec<Datagrams> = packets
            .chunks(per_read)
            .map(|read| {
                let mut net = Datagrams::new(TUN_SLOTS * SLOT + 4096, 64);
                read_into(&mut net, read);
                for (i, p) in read.iter().enumerate() {
                    w.a.handle_tun_staged(i, p.len(), w.now, &mut net, &mut tun);
                }
                w.a.finish_staged(&mut net);
                prop_assert!(!net.is_sealed());
                Ok(net)
            })
            .collect::<Result<_, TestCaseError>>()?;
        let mut inline: Sent = Vec::new();
        for mut b in batches.clone() {
            inline.extend(b.datagrams().map(|(a, d)| (a, d.to_vec())));
        }
        let piped = pipelined(batches, threads, delays);
        prop_assert_eq!(piped.len(), packets.len());
        prop_assert!(piped == inline, "the stage's output differs from the inline one");
        // And it is a valid stream: the peer opens every datagram, in order.
        let mut net = Datagrams::new(1 << 16, 64);
        let mut out = Packets::new(packets.len() + 1, 10);
        let from: SocketAddr = A_ADDR.parse().unwrap();
        for (_, d) in &piped {
            w.b.handle_network(from, d, w.now, &mut net, &mut out);
        }
        w.b.finish_opened(&mut out, w.now);
        let got: Vec<&[u8]> = out.packets().collect();
        let want: Vec<&[u8]> = packets.iter().map(Vec::as_slice).collect();
        prop_assert!(got == want, "the peer got every packet intact and in order");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Received batches opened by the `meshd-open` stage (in parallel,
    /// each thread delayed at random) come back in hand-out order, and
    /// judged in that order they are exactly the packets sent: none
    /// reordered, none taken for a replay.
    #[test]
    fn opened_in_parallel_received_batches_arrive_in_order(
        sizes in prop::collection::vec(4usize..1397, 1..400),
        per_batch in 1usize..=128,
        threads in 1usize..5,
        delays in prop::collection::vec(0u8..4, 1..8),
    ) {
        let (mut w, packets) = established(&sizes);
        let mut net = Datagrams::new(1 << 16, 64);
        let mut tun = Packets::new(128, 10);
        let mut sealed = Vec::new();
        for read in packets.chunks(TUN_SLOTS) {
            read_into(&mut net, read);
            for (i, p) in read.iter().enumerate() {
                w.a.handle_tun_staged(i, p.len(), w.now, &mut net, &mut tun);
            }
            w.a.finish_staged(&mut net);
            sealed.extend(net.datagrams().map(|(_, d)| d.to_vec()));
            net.clear();
        }
        let from: SocketAddr = A_ADDR.parse().unwrap();
        let (back_tx, mut back) = mpsc::channel(2 * threads);
        let (mut to, ends) = middle("test-open", threads, &back_tx);
        drop(back_tx);
        let handles = spawn("test-open", ends, |k| {
            let mut delay = delayed(k, threads, delays.clone());
            Ok(Steps {
                work: move |p: &mut Packets| {
                    delay();
                    p.open();
                },
                emit: |_: &mut Packets| {},
            })
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        rt.block_on(async {
            let (mut handed, mut judged) = (0, 0);
            for (n, chunk) in sealed.chunks(per_batch).enumerate() {
                let mut batch = Packets::new(128, 10);
                for d in chunk {
                    w.b.handle_network(from, d, w.now, &mut net, &mut batch);
                }
                to.send(batch).await.unwrap();
                handed += 1;
                // As the device's pool does: a bounded number in flight.
                while handed - judged >= 2 * threads || (n + 1) * per_batch >= sealed.len() && judged < handed {
                    let mut b = back.recv().await.unwrap();
                    w.b.finish_opened(&mut b, w.now);
                    got.extend(b.packets().map(<[u8]>::to_vec));
                    judged += 1;
                }
            }
            drop(to);
        });
        for h in handles {
            h.join().unwrap();
        }
        prop_assert!(w.b.node().drops().is_empty(), "{:?}", w.b.node().drops());
        prop_assert!(got == packets, "every packet, intact and in order");
    }
}
