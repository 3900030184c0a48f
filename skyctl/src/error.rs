//! The errors skyctl ends with, and their exit codes: 2 for bad usage
//! (input refused before anything is sent), 1 for a request the coordinator
//! refused or could not be reached (SPEC §7). Each renders as one line; no
//! gRPC decorations, no backtraces.

use std::fmt;

use skymesh_proto::v1::Kind;
use skymesh_proto::validate::ValidationError;
use tonic::{Code, Status};

/// Exit code for bad usage.
pub(crate) const EXIT_USAGE: u8 = 2;
/// Exit code for a refused request or an unreachable coordinator.
pub(crate) const EXIT_REFUSED: u8 = 1;

/// An error to print as `error: <message>` before exiting with `code`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exit {
    pub(crate) code: u8,
    pub(crate) message: String,
}

impl Exit {
    /// Bad usage (exit 2).
    pub(crate) fn usage(message: impl Into<String>) -> Self {
        Exit {
            code: EXIT_USAGE,
            message: one_line(&message.into()),
        }
    }

    /// Refused or failed request (exit 1).
    pub(crate) fn refused(message: impl Into<String>) -> Self {
        Exit {
            code: EXIT_REFUSED,
            message: one_line(&message.into()),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

impl From<ValidationError> for Exit {
    fn from(e: ValidationError) -> Self {
        Exit::usage(e.to_string())
    }
}

/// Joins the lines of a message so that it prints as one line.
fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// `service "x" not found in namespace "default"` / `cluster "x" not found`.
pub(crate) fn not_found(kind: Kind, namespace: &str, name: &str) -> Exit {
    let what = kind.singular();
    if kind.namespaced() {
        Exit::refused(format!(
            "{what} {name:?} not found in namespace {namespace:?}"
        ))
    } else {
        Exit::refused(format!("{what} {name:?} not found"))
    }
}

/// Turns a gRPC status from the coordinator at `url` into one line that says
/// what is wrong and how to fix it.
pub(crate) fn from_status(url: &str, status: &Status) -> Exit {
    let msg = status.message().trim();
    let detail = if msg.is_empty() {
        String::new()
    } else {
        format!(" ({msg})")
    };
    match status.code() {
        Code::Unauthenticated => Exit::refused(format!(
            "the coordinator refused the admin token{detail}: pass it with --token (or SKYCTL_TOKEN), \
             or name the coordinator's <data-dir>/admin.token with --token-file (or SKYCTL_TOKEN_FILE)"
        )),
        Code::PermissionDenied => Exit::refused(format!(
            "permission denied{detail}: use the admin token (--token or SKYCTL_TOKEN)"
        )),
        Code::Unavailable => unreachable(url, msg),
        Code::DeadlineExceeded => Exit::refused(format!(
            "the coordinator at {url} did not answer in time{detail}"
        )),
        Code::Unimplemented => Exit::refused(format!(
            "the coordinator at {url} does not support this request{detail}: is it a skymesh coordinator of the same version?"
        )),
        _ if msg.is_empty() => Exit::refused(format!(
            "the coordinator failed the request ({})",
            status.code().description()
        )),
        _ => Exit::refused(msg.to_string()),
    }
}

/// The coordinator could not be reached.
pub(crate) fn unreachable(url: &str, cause: &str) -> Exit {
    let cause = if cause.is_empty() {
        String::new()
    } else {
        format!(" ({cause})")
    };
    Exit::refused(format!(
        "the coordinator at {url} is unreachable{cause}: check --coordinator (or SKYCTL_COORDINATOR) and that the coordinator is running"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_become_one_line() {
        let e = from_status(
            "http://h:1",
            &Status::invalid_argument("invalid spec.ports[0].port: 0 is bad"),
        );
        assert_eq!(e, Exit::refused("invalid spec.ports[0].port: 0 is bad"));
        let e = from_status("http://h:1", &Status::unauthenticated("bad token"));
        assert!(e.message.contains("--token"), "{}", e.message);
        assert!(e.message.contains("bad token"), "{}", e.message);
        let e = from_status("http://h:1", &Status::unavailable("tcp connect error"));
        assert!(
            e.message
                .starts_with("the coordinator at http://h:1 is unreachable")
        );
        let e = from_status("u", &Status::internal("a\nb\n"));
        assert_eq!(e.message, "a; b");
        let e = from_status("u", &Status::internal(""));
        assert_eq!(e.code, EXIT_REFUSED);
        assert!(!e.message.is_empty());
    }

    #[test]
    fn not_found_names_the_object() {
        assert_eq!(
            not_found(Kind::Service, "default", "x").message,
            r#"service "x" not found in namespace "default""#
        );
        assert_eq!(
            not_found(Kind::Cluster, "", "c").message,
            r#"cluster "c" not found"#
        );
    }

    #[test]
    fn validation_errors_are_usage_errors() {
        let e: Exit = skymesh_proto::validate::port("spec.ports[0].port", 0)
            .expect_err("0 is not a port")
            .into();
        assert_eq!(e.code, EXIT_USAGE);
        assert!(e.message.contains("spec.ports[0].port"));
    }
}
