//! The `/metrics` answer of every skymesh binary: one
//! [`prometheus_client`] registry rendered in the format the scraper asks
//! for.
//!
//! prometheus-client only encodes OpenMetrics text, whose counters carry
//! their `HELP` and `TYPE` under the name without `_total` (and whose
//! `# UNIT` and `# EOF` lines the Prometheus text format 0.0.4 does not
//! have). Served as `text/plain`, that is what `promtool check metrics`
//! refuses. So a scrape gets OpenMetrics only when its `Accept` header asks
//! for `application/openmetrics-text` (Prometheus does), and the Prometheus
//! text format 0.0.4 otherwise (curl, older scrapers), converted line by
//! line from the same encoding ([`to_text_format`]).
//!
//! Must not: keep state of its own or touch sockets; the binaries own their
//! listeners.
//!
//! # Layout
//! - [`scrape`]: the HTTP answer (body and `Content-Type`) for one scrape.
//! - [`wants_openmetrics`]: content negotiation on `Accept`.
//! - [`to_text_format`]: OpenMetrics text to Prometheus text format 0.0.4.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::registry::Registry;

/// `Content-Type` of the Prometheus text format (the default).
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// `Content-Type` of OpenMetrics text 1.0.0.
pub const OPENMETRICS_FORMAT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The answer to a scrape of `registry`: OpenMetrics when `headers`'
/// `Accept` asks for it, else the Prometheus text format 0.0.4.
pub fn scrape(registry: &Registry, headers: &HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut om = String::new();
    if prometheus_client::encoding::text::encode(&mut om, registry).is_err() {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "failed to encode metrics\n",
        )
            .into_response();
    }
    if wants_openmetrics(accept) {
        ([(header::CONTENT_TYPE, OPENMETRICS_FORMAT)], om).into_response()
    } else {
        ([(header::CONTENT_TYPE, TEXT_FORMAT)], to_text_format(&om)).into_response()
    }
}

/// Whether an `Accept` header asks for OpenMetrics: it names
/// `application/openmetrics-text` with a quality above 0 and at least that
/// of `text/plain` (when it names that too). Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...,text/plain;version=0.0.4;q=0.5,...`.
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut openmetrics: Option<f32> = None;
    let mut text: Option<f32> = None;
    for range in accept.split(',') {
        let mut parts = range.split(';');
        let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.trim().strip_prefix("q="))
            .find_map(|q| q.trim().parse::<f32>().ok())
            .unwrap_or(1.0);
        let slot = match media.as_str() {
            "application/openmetrics-text" => &mut openmetrics,
            "text/plain" => &mut text,
            _ => continue,
        };
        *slot = Some(slot.map_or(q, |old| old.max(q)));
    }
    match openmetrics {
        Some(om) if om > 0.0 => text.is_none_or(|t| om >= t),
        _ => false,
    }
}

/// Rewrites OpenMetrics text (as prometheus-client encodes it) in the
/// Prometheus text format 0.0.4: a counter's `HELP` and `TYPE` take its
/// samples' `_total` name, an info metric becomes a gauge named `_info`,
/// `unknown` is `untyped`; `# UNIT` and `# EOF` lines, counters' `_created`
/// samples and exemplars (` # {...}` after a value) are dropped. Gauges and
/// histograms are the same in both formats. Other OpenMetrics types
/// (stateset, gaugehistogram), which prometheus-client does not make,
/// become `untyped`.
pub fn to_text_format(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // The HELP line waits for its TYPE line, which says which name to use.
    let mut help: Option<(&str, &str)> = None;
    let mut counter: Option<String> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (om_name, om_kind) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, kind) = match om_kind {
                "counter" => (format!("{om_name}_total"), "counter"),
                "info" => (format!("{om_name}_info"), "gauge"),
                "gauge" | "histogram" => (om_name.to_string(), om_kind),
                _ => (om_name.to_string(), "untyped"),
            };
            counter = (kind == "counter").then(|| om_name.to_string());
            if let Some((help_name, text)) = help.take()
                && help_name == om_name
            {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line.starts_with('#') {
            // # UNIT, # EOF: not in the text format.
            continue;
        }
        if line.is_empty() {
            continue;
        }
        if let Some(c) = &counter
            && line
                .strip_prefix(c.as_str())
                .is_some_and(|r| r.starts_with("_created"))
        {
            continue;
        }
        let sample = line.split_once(" # ").map_or(line, |(s, _)| s);
        out.push_str(sample);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::metrics::info::Info;
    use prometheus_client::registry::Unit;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Reason {
        reason: String,
    }

    fn registry() -> Registry {
        let mut reg = Registry::default();
        let r = reg.sub_registry_with_prefix("skymesh");
        let drops = Family::<Reason, Counter>::default();
        drops
            .get_or_create(&Reason {
                reason: "no_route".into(),
            })
            .inc_by(3);
        r.register("drops", "Packets dropped, by reason", drops);
        let g = Gauge::<i64>::default();
        g.set(7);
        r.register("jobs", "Local jobs being checked", g);
        let h = Histogram::new([0.001, 0.01]);
        h.observe(0.005);
        r.register_with_unit("store", "Store call latency", Unit::Seconds, h);
        r.register(
            "build",
            "Build information",
            Info::new(vec![("version", "0.1.0")]),
        );
        reg
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let mut om = String::new();
        prometheus_client::encoding::text::encode(&mut om, &registry()).unwrap();
        let text = to_text_format(&om);
        assert_eq!(
            text,
            "# HELP skymesh_drops_total Packets dropped, by reason.\n\
             # TYPE skymesh_drops_total counter\n\
             skymesh_drops_total{reason=\"no_route\"} 3\n\
             # HELP skymesh_jobs Local jobs being checked.\n\
             # TYPE skymesh_jobs gauge\n\
             skymesh_jobs 7\n\
             # HELP skymesh_store_seconds Store call latency.\n\
             # TYPE skymesh_store_seconds histogram\n\
             skymesh_store_seconds_sum 0.005\n\
             skymesh_store_seconds_count 1\n\
             skymesh_store_seconds_bucket{le=\"0.001\"} 0\n\
             skymesh_store_seconds_bucket{le=\"0.01\"} 1\n\
             skymesh_store_seconds_bucket{le=\"+Inf\"} 1\n\
             # HELP skymesh_build_info Build information.\n\
             # TYPE skymesh_build_info gauge\n\
             skymesh_build_info{version=\"0.1.0\"} 1\n",
            "from:\n{om}"
        );
    }

    #[test]
    fn created_samples_and_exemplars_are_dropped() {
        let om = "# HELP x A counter\n# TYPE x counter\nx_total 2 # {trace=\"a\"} 1.0\nx_created 1700000000.0\n# EOF\n";
        assert_eq!(
            to_text_format(om),
            "# HELP x_total A counter\n# TYPE x_total counter\nx_total 2\n"
        );
    }

    #[test]
    fn negotiation() {
        // What Prometheus 2.x sends.
        assert!(wants_openmetrics(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
        ));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain"));
        assert!(!wants_openmetrics(
            "text/plain;version=0.0.4,application/openmetrics-text;q=0.5"
        ));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn scrape_answers_in_the_format_asked_for() {
        let reg = registry();
        let mut h = HeaderMap::new();
        let r = scrape(&reg, &h);
        assert_eq!(r.headers()[header::CONTENT_TYPE], TEXT_FORMAT);
        h.insert(
            header::ACCEPT,
            "application/openmetrics-text; version=1.0.0"
                .parse()
                .unwrap(),
        );
        let r = scrape(&reg, &h);
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS_FORMAT);
    }
}
