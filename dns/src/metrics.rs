//! Prometheus metrics of the DNS server (prometheus-client), registered into
//! the registry meshd serves on `--metrics-listen`. Only counters and a
//! histogram; label values come from closed sets so cardinality stays bounded.
//!
//! | metric | labels |
//! |---|---|
//! | `skymesh_dns_queries_total` | `qtype` (A, SRV, ..., `Unknown`), `rcode` (NOERROR, NXDOMAIN, ...) |
//! | `skymesh_dns_forwarded_queries_total` | — |
//! | `skymesh_dns_query_duration_seconds` | — (histogram) |
//!
//! Messages hickory rejects before they reach the handler (undecodable,
//! FORMERR) are not counted.

use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `skymesh_dns_queries_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueryLabels {
    /// Question type, e.g. `A`.
    pub qtype: &'static str,
    /// Response code, e.g. `NXDOMAIN`.
    pub rcode: &'static str,
}

/// The DNS server's metrics; cheap to clone (shared counters).
#[derive(Clone, Debug)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
    forwarded: Counter,
    duration: Histogram,
}

impl DnsMetrics {
    /// Creates the metrics and registers them into `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self::unregistered();
        registry.register(
            "skymesh_dns_queries",
            "DNS queries answered, by question type and response code",
            metrics.queries.clone(),
        );
        registry.register(
            "skymesh_dns_forwarded_queries",
            "DNS queries for names outside the served zones sent to upstream resolvers",
            metrics.forwarded.clone(),
        );
        registry.register(
            "skymesh_dns_query_duration_seconds",
            "Time from a decoded DNS query to its response being sent",
            metrics.duration.clone(),
        );
        metrics
    }

    /// Metrics that are not exported anywhere.
    pub fn unregistered() -> Self {
        Self {
            queries: Family::default(),
            forwarded: Counter::default(),
            // 50 µs .. ~3.3 s
            duration: Histogram::new(exponential_buckets(0.000_05, 4.0, 9)),
        }
    }

    /// Records one answered query.
    pub fn observe(&self, qtype: RecordType, rcode: ResponseCode, forwarded: bool, took: Duration) {
        self.queries
            .get_or_create(&QueryLabels {
                qtype: qtype.into(),
                rcode: rcode_label(rcode),
            })
            .inc();
        if forwarded {
            self.forwarded.inc();
        }
        self.duration.observe(took.as_secs_f64());
    }

    /// Queries counted so far with these labels (for tests and debugging).
    pub fn queries(&self, qtype: RecordType, rcode: ResponseCode) -> u64 {
        self.queries
            .get_or_create(&QueryLabels {
                qtype: qtype.into(),
                rcode: rcode_label(rcode),
            })
            .get()
    }

    /// Forwarded queries counted so far.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.get()
    }
}

/// The mnemonic of an rcode as dig prints it.
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::NotAuth => "NOTAUTH",
        ResponseCode::NotZone => "NOTZONE",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::text::encode;

    #[test]
    fn exports_queries_forwarded_and_latency() {
        let mut registry = Registry::default();
        let m = DnsMetrics::new(&mut registry);
        m.observe(
            RecordType::A,
            ResponseCode::NoError,
            false,
            Duration::from_micros(80),
        );
        m.observe(
            RecordType::SRV,
            ResponseCode::NXDomain,
            false,
            Duration::from_micros(80),
        );
        m.observe(
            RecordType::A,
            ResponseCode::NoError,
            true,
            Duration::from_millis(3),
        );
        assert_eq!(m.queries(RecordType::A, ResponseCode::NoError), 2);
        assert_eq!(m.forwarded(), 1);
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"skymesh_dns_queries_total{qtype="SRV",rcode="NXDOMAIN"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("skymesh_dns_forwarded_queries_total 1"),
            "{text}"
        );
        assert!(
            text.contains("skymesh_dns_query_duration_seconds_count 3"),
            "{text}"
        );
    }
}
