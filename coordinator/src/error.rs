//! The coordinator's one error type, and the one place it becomes a gRPC
//! status.

use skymesh_proto::validate::ValidationError;

/// Everything a coordinator request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("{kind} {name:?} already exists{}", in_ns(.namespace))]
    AlreadyExists {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error("{kind} {name:?} not found{}", in_ns(.namespace))]
    NotFound {
        kind: &'static str,
        namespace: String,
        name: String,
    },
    #[error(
        "conflict: {kind} {name:?} was modified (resource version {current}, request had {given}); get it again and retry"
    )]
    Conflict {
        kind: &'static str,
        name: String,
        given: u64,
        current: u64,
    },
    /// A referenced object is missing, or the request contradicts the
    /// current state (overlapping CIDR, namespace not empty, ...).
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error(transparent)]
    Store(#[from] skymesh_store::Error),
    #[error("corrupt object at {key}: {source}")]
    Decode {
        key: String,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{0}")]
    Internal(String),
}

fn in_ns(ns: &str) -> String {
    if ns.is_empty() {
        String::new()
    } else {
        format!(" in namespace {ns:?}")
    }
}

/// Result of coordinator operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::AlreadyExists { .. } => Code::AlreadyExists,
            Error::NotFound { .. } => Code::NotFound,
            Error::Conflict { .. } => Code::Aborted,
            Error::Precondition(_) => Code::FailedPrecondition,
            Error::Exhausted(_) => Code::ResourceExhausted,
            Error::Unauthenticated(_) => Code::Unauthenticated,
            Error::PermissionDenied(_) => Code::PermissionDenied,
            Error::Store(skymesh_store::Error::Compacted { .. }) => Code::OutOfRange,
            // The store (e.g. etcd) is unreachable: another coordinator
            // replica may serve the request.
            Error::Store(skymesh_store::Error::Backend(_) | skymesh_store::Error::Closed) => {
                Code::Unavailable
            }
            Error::Decode { .. } | Error::Internal(_) => Code::Internal,
        };
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::error!(error = %e, "internal error");
        }
        tonic::Status::new(code, e.to_string())
    }
}
