//! `MeshZoneHandler`: hickory's [`ZoneHandler`] seam over the current
//! [`RecordSet`]. One instance per served zone, all reading the same
//! `ArcSwap`, so a view update is one pointer swap and a lookup takes no lock.
//!
//! It only translates a pure [`Answer`] into hickory's lookup results (the
//! [`Catalog`](hickory_server::zone_handler::Catalog) adds the SOA to
//! negative answers and sets the header); it must not synthesize records.
//! The one thing it adds is chasing an ExternalName CNAME whose target lies
//! outside the mesh through the forwarder, as Kubernetes' CoreDNS does.

use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{LowerName, Record, RecordType, TSigResponseContext};
use hickory_server::server::{Request, RequestInfo};
use hickory_server::store::forwarder::ForwardZoneHandler;
use hickory_server::zone_handler::{
    AuthLookup, AxfrPolicy, LookupControlFlow, LookupError, LookupOptions, LookupRecords,
    ZoneHandler, ZoneTransfer, ZoneType,
};

use crate::records::{Answer, RecordSet, cname_target};

/// Serves one zone (`svc.`, `svc.clusterset.local.`, a reverse zone) from the
/// shared, atomically swapped [`RecordSet`].
pub(crate) struct MeshZoneHandler {
    origin: LowerName,
    records: Arc<ArcSwap<RecordSet>>,
    forwarder: Option<Arc<ForwardZoneHandler>>,
}

impl MeshZoneHandler {
    pub(crate) fn new(
        origin: LowerName,
        records: Arc<ArcSwap<RecordSet>>,
        forwarder: Option<Arc<ForwardZoneHandler>>,
    ) -> Self {
        Self {
            origin,
            records,
            forwarder,
        }
    }

    /// Records for the target of a trailing CNAME that leaves the mesh, via
    /// the upstream resolvers. Empty when there is nothing to chase or the
    /// upstream fails (the client still gets the CNAME).
    async fn chase(&self, answer: &Answer, qtype: RecordType, opts: LookupOptions) -> Vec<Record> {
        let Some(forwarder) = &self.forwarder else {
            return Vec::new();
        };
        if matches!(qtype, RecordType::CNAME | RecordType::ANY) {
            return Vec::new();
        }
        let Some(last) = answer.answers.last() else {
            return Vec::new();
        };
        let Some(target) = cname_target(last).map(LowerName::new) else {
            return Vec::new();
        };
        if self.records.load().zone_of(&target).is_some() {
            return Vec::new();
        }
        match forwarder
            .lookup(&target, qtype, None, opts)
            .await
            .map_result()
        {
            Some(Ok(found)) => found.iter().cloned().collect(),
            Some(Err(error)) => {
                tracing::debug!(%target, %error, "external name target did not resolve");
                Vec::new()
            }
            None => Vec::new(),
        }
    }
}

/// Turns a pure answer into what the catalog expects: records, or an error
/// that it maps to NXDOMAIN / NODATA (+SOA) / REFUSED.
fn into_lookup(
    answer: Answer,
    chased: Vec<Record>,
    opts: LookupOptions,
) -> Result<AuthLookup, LookupError> {
    match answer.rcode {
        ResponseCode::NoError if answer.answers.is_empty() => Err(LookupError::NameExists),
        ResponseCode::NoError if chased.is_empty() => Ok(AuthLookup::answers(
            LookupRecords::many(opts, answer.answers),
            None,
        )),
        ResponseCode::NoError => {
            let mut records: Vec<Record> = answer.answer_records().cloned().collect();
            records.extend(chased);
            Ok(AuthLookup::answers(LookupRecords::Section(records), None))
        }
        rcode => Err(LookupError::from(rcode)),
    }
}

#[async_trait::async_trait]
impl ZoneHandler for MeshZoneHandler {
    fn zone_type(&self) -> ZoneType {
        ZoneType::Primary
    }

    fn axfr_policy(&self) -> AxfrPolicy {
        AxfrPolicy::Deny
    }

    fn origin(&self) -> &LowerName {
        &self.origin
    }

    async fn lookup(
        &self,
        name: &LowerName,
        rtype: RecordType,
        _request_info: Option<&RequestInfo<'_>>,
        lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        let answer = self.records.load().lookup(name, rtype);
        let chased = self.chase(&answer, rtype, lookup_options).await;
        LookupControlFlow::Continue(into_lookup(answer, chased, lookup_options))
    }

    async fn search(
        &self,
        request: &Request,
        lookup_options: LookupOptions,
    ) -> (LookupControlFlow<AuthLookup>, Option<TSigResponseContext>) {
        let info = match request.request_info() {
            Ok(info) => info,
            Err(e) => return (LookupControlFlow::Break(Err(e)), None),
        };
        let found = self
            .lookup(
                info.query.name(),
                info.query.query_type(),
                Some(&info),
                lookup_options,
            )
            .await;
        (found, None)
    }

    async fn nsec_records(
        &self,
        _name: &LowerName,
        _lookup_options: LookupOptions,
    ) -> LookupControlFlow<AuthLookup> {
        LookupControlFlow::Continue(Err(LookupError::from(ResponseCode::NotImp)))
    }

    /// Zone transfers of synthesized, per-cluster zones make no sense.
    async fn zone_transfer(
        &self,
        _request: &Request,
        _lookup_options: LookupOptions,
        _now: u64,
    ) -> Option<(
        Result<ZoneTransfer, LookupError>,
        Option<TSigResponseContext>,
    )> {
        Some((Err(LookupError::from(ResponseCode::Refused)), None))
    }
}
