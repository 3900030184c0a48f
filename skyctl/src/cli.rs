//! The command grammar: verbs, kinds with their aliases, and every flag in
//! both the `_` spelling of the SkyShift/SkyFlow docs and the `-` spelling
//! (SPEC §7). Parsing only: values are checked by `skymesh_proto::validate`
//! in the subcommand modules, never here.

use std::path::PathBuf;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand, ValueEnum};
use skymesh_proto::v1::Kind;

/// Where the coordinator writes its admin token when it runs on this host.
pub(crate) const DEFAULT_TOKEN_FILE: &str = "/var/lib/skymesh/coordinator/admin.token";
/// The coordinator's default listen address.
pub(crate) const DEFAULT_COORDINATOR: &str = "https://127.0.0.1:7400";

/// skymesh command line: manage services, endpoints, clusters, jobs and
/// namespaces of a multi-cluster mesh.
#[derive(Debug, Parser)]
#[command(name = "skyctl", version, propagate_version = true)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) global: GlobalArgs,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// Flags accepted anywhere on the command line.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Global options")]
pub(crate) struct GlobalArgs {
    /// Coordinator URL; several replicas comma-separated (the first that
    /// answers is used).
    #[arg(
        long,
        global = true,
        env = "SKYCTL_COORDINATOR",
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL"
    )]
    pub(crate) coordinator: String,

    /// Admin token (default: read from --token-file).
    #[arg(
        long,
        global = true,
        env = "SKYCTL_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub(crate) token: Option<String>,

    /// File holding the admin token, used when no --token is given.
    #[arg(
        long = "token-file",
        alias = "token_file",
        global = true,
        env = "SKYCTL_TOKEN_FILE",
        default_value = DEFAULT_TOKEN_FILE,
        value_name = "PATH"
    )]
    pub(crate) token_file: PathBuf,

    /// The coordinator's CA certificate (PEM) to verify it with (default:
    /// ca.crt beside --token-file, which the coordinator writes).
    #[arg(
        long = "ca-file",
        alias = "ca_file",
        global = true,
        env = "SKYCTL_CA",
        value_name = "PATH"
    )]
    pub(crate) ca_file: Option<PathBuf>,

    /// Output format.
    #[arg(
        short = 'o',
        long,
        global = true,
        value_enum,
        ignore_case = true,
        default_value_t = OutputFormat::Table
    )]
    pub(crate) output: OutputFormat,

    /// Namespace of namespaced objects (services, endpoints, jobs).
    #[arg(
        short = 'n',
        long,
        global = true,
        default_value = "default",
        value_name = "NAMESPACE"
    )]
    pub(crate) namespace: String,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    /// Aligned columns, like kubectl.
    Table,
    /// Aligned columns with more detail.
    Wide,
    /// A JSON document.
    Json,
    /// A YAML document.
    Yaml,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Create an object from flags, or the objects of files with -f.
    #[command(args_conflicts_with_subcommands = true)]
    Create {
        /// File, directory or - (stdin) of YAML/JSON documents to create.
        #[arg(short = 'f', long = "filename", value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(subcommand)]
        what: Option<CreateCommand>,
    },
    /// Create or update the objects of files (YAML/JSON, skymesh documents
    /// or Kubernetes v1 Service and Endpoints).
    Apply(FileArgs),
    /// Show objects (or tunnels), optionally following changes with --watch.
    Get(GetArgs),
    /// Delete objects, by name or those of files with -f.
    Delete(DeleteArgs),
    /// Edit an object's YAML in $EDITOR and update it; an invalid edit or
    /// a conflict reopens the editor with the error on top.
    Edit(EditArgs),
    /// Show an object in detail: spec, VIP, endpoints per cluster, the
    /// jobs it selects.
    Describe(DescribeArgs),
    /// Issue a new join token for a cluster whose gateway has not joined yet.
    #[command(name = "join-token", alias = "join_token")]
    JoinToken(JoinTokenArgs),
    /// Ask the coordinator's gRPC health service (grpc.health.v1 Check;
    /// no token needed): prints SERVING and exits 0, else exits 1. For
    /// exec probes and scripts.
    Health(HealthArgs),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
}

/// What `get` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Objects of one kind.
    Kind(Kind),
    /// Every cluster's tunnels to its peers.
    Tunnels,
    /// The state changes the coordinator recorded (kept 1 h).
    Events,
}

impl Target {
    /// Parses a kind or `tunnels`, with aliases, in any case.
    pub(crate) fn parse(s: &str) -> Option<Target> {
        if s.eq_ignore_ascii_case("tunnels") || s.eq_ignore_ascii_case("tunnel") {
            return Some(Target::Tunnels);
        }
        if ["events", "event", "ev"]
            .iter()
            .any(|e| s.eq_ignore_ascii_case(e))
        {
            return Some(Target::Events);
        }
        Kind::from_alias(s).map(Target::Kind)
    }
}

/// The kinds with the aliases `Kind::from_alias` accepts, for help and
/// completion.
fn kind_values() -> Vec<PossibleValue> {
    vec![
        PossibleValue::new("service").aliases(["services", "svc"]),
        PossibleValue::new("endpoints").aliases(["endpoint", "ep"]),
        PossibleValue::new("cluster").alias("clusters"),
        PossibleValue::new("job").alias("jobs"),
        PossibleValue::new("namespace").aliases(["namespaces", "ns"]),
    ]
}

fn target_parser() -> impl TypedValueParser<Value = Target> {
    let mut values = kind_values();
    values.push(PossibleValue::new("tunnels").alias("tunnel"));
    values.push(PossibleValue::new("events").aliases(["event", "ev"]));
    PossibleValuesParser::new(values)
        .try_map(|s| Target::parse(&s).ok_or_else(|| format!("unknown kind {s:?}")))
}

fn kind_parser() -> impl TypedValueParser<Value = Kind> {
    PossibleValuesParser::new(kind_values())
        .try_map(|s| Kind::from_alias(&s).ok_or_else(|| format!("unknown kind {s:?}")))
}

/// `skyctl get KIND [NAME]`.
#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// What to show.
    #[arg(value_parser = target_parser(), ignore_case = true, value_name = "KIND")]
    pub(crate) target: Target,
    /// Show this object only.
    pub(crate) name: Option<String>,
    /// After the current state, print every change as it happens, until interrupted.
    #[arg(short = 'w', long)]
    pub(crate) watch: bool,
    /// List objects of every namespace.
    #[arg(short = 'A', long = "all-namespaces", alias = "all_namespaces")]
    pub(crate) all_namespaces: bool,
}

/// `skyctl apply -f FILE...`.
#[derive(Debug, Args)]
pub(crate) struct FileArgs {
    /// File, directory (its *.yaml, *.yml, *.json) or - (stdin) of
    /// YAML/JSON documents, `---` separated (repeatable).
    #[arg(short = 'f', long = "filename", required = true, value_name = "FILE")]
    pub(crate) files: Vec<PathBuf>,
}

/// `skyctl edit KIND NAME`.
#[derive(Debug, Args)]
pub(crate) struct EditArgs {
    /// Kind of the object.
    #[arg(value_parser = kind_parser(), ignore_case = true, value_name = "KIND")]
    pub(crate) kind: Kind,
    /// Name of the object.
    pub(crate) name: String,
}

/// `skyctl describe KIND NAME`.
#[derive(Debug, Args)]
pub(crate) struct DescribeArgs {
    /// Kind of the object.
    #[arg(value_parser = kind_parser(), ignore_case = true, value_name = "KIND")]
    pub(crate) kind: Kind,
    /// Name of the object.
    pub(crate) name: String,
}

/// `skyctl delete KIND NAME...` or `skyctl delete -f FILE`.
#[derive(Debug, Args)]
pub(crate) struct DeleteArgs {
    /// Kind of the objects.
    #[arg(
        value_parser = kind_parser(),
        ignore_case = true,
        value_name = "KIND",
        required_unless_present = "files"
    )]
    pub(crate) kind: Option<Kind>,
    /// Names of the objects to delete.
    #[arg(num_args = 1.., value_name = "NAME", required_unless_present = "files")]
    pub(crate) names: Vec<String>,
    /// Delete the objects of these files (or directories, or - for stdin)
    /// instead.
    #[arg(
        short = 'f',
        long = "filename",
        value_name = "FILE",
        conflicts_with_all = ["kind", "names"]
    )]
    pub(crate) files: Vec<PathBuf>,
    /// Clusters only: also take the cluster out of the services and
    /// Endpoints that name it (deleting a service it was the only cluster
    /// of, and Endpoints whose primary cluster it is) instead of refusing.
    #[arg(long)]
    pub(crate) cascade: bool,
}

/// `skyctl join-token CLUSTER`.
#[derive(Debug, Args)]
pub(crate) struct JoinTokenArgs {
    /// The cluster (still Pending) whose gateway will join.
    pub(crate) cluster: String,
}

/// `skyctl health`.
#[derive(Debug, Args)]
pub(crate) struct HealthArgs {
    /// The service to ask about (e.g. skymesh.v1.Api); default: the whole
    /// server.
    #[arg(long, default_value = "")]
    pub(crate) service: String,
}

/// `skyctl completions SHELL`.
#[derive(Debug, Args)]
pub(crate) struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub(crate) shell: clap_complete::Shell,
}

/// `skyctl create KIND ...`.
#[derive(Debug, Subcommand)]
pub(crate) enum CreateCommand {
    /// Create a service: a stable name and VIP in front of the jobs its selector picks.
    #[command(visible_aliases = ["services", "svc"])]
    Service(Box<CreateService>),
    /// Create user-managed endpoints: the jobs matching a selector, per cluster.
    #[command(visible_aliases = ["endpoint", "ep"])]
    Endpoints(CreateEndpoints),
    /// Create a cluster and print the join token for its gateway (meshd).
    #[command(visible_alias = "clusters")]
    Cluster(CreateCluster),
    /// Register a job (one replica of an application) in a cluster.
    #[command(visible_alias = "jobs")]
    Job(CreateJob),
    /// Create a namespace.
    #[command(visible_aliases = ["namespaces", "ns"])]
    Namespace(CreateNamespace),
}

/// `skyctl create service NAME ...`.
#[derive(Debug, Default, Args)]
pub(crate) struct CreateService {
    /// Name of the service (folded to lower case).
    pub(crate) name: String,
    /// ClusterIP (default), Headless, ExternalName, NodePort or LoadBalancer.
    #[arg(
        short = 't',
        long = "service-type",
        visible_alias = "service_type",
        alias = "type",
        value_name = "TYPE"
    )]
    pub(crate) service_type: Option<String>,
    /// Label selector KEY=VALUE picking the jobs (repeatable, or comma-separated).
    #[arg(short = 's', long = "selector", value_name = "KEY=VALUE")]
    pub(crate) selector: Vec<String>,
    /// Port mapping [NAME:]PORT:TARGET[/TCP|UDP] (repeatable).
    #[arg(
        short = 'p',
        long = "port",
        visible_alias = "ports",
        value_delimiter = ',',
        value_name = "[NAME:]PORT:TARGET[/PROTO]"
    )]
    pub(crate) ports: Vec<String>,
    /// Cluster to expose the service on (repeatable; default: every cluster).
    #[arg(
        short = 'c',
        long = "cluster",
        alias = "clusters",
        value_delimiter = ',',
        value_name = "CLUSTER"
    )]
    pub(crate) clusters: Vec<String>,
    /// None (default) or ClientIP.
    #[arg(
        long = "session-affinity",
        visible_alias = "session_affinity",
        value_name = "AFFINITY"
    )]
    pub(crate) session_affinity: Option<String>,
    /// ClientIP affinity timeout in seconds (default 10800, at most 86400).
    #[arg(
        long = "affinity-timeout",
        visible_alias = "affinity_timeout",
        value_name = "SECONDS"
    )]
    pub(crate) affinity_timeout: Option<u32>,
    /// Spread (default), PreferLocal or Local.
    #[arg(
        long = "traffic-policy",
        visible_alias = "traffic_policy",
        value_name = "POLICY"
    )]
    pub(crate) traffic_policy: Option<String>,
    /// A service this one may call, as NAMESPACE/SERVICE with `*` for any
    /// run of characters (repeatable; none = any; README "Service policy").
    #[arg(
        long = "upstream",
        alias = "upstreams",
        value_name = "NAMESPACE/SERVICE"
    )]
    pub(crate) upstreams: Vec<String>,
    /// A service that may call this one, as a pattern (repeatable; none =
    /// anyone).
    #[arg(
        long = "whitelist",
        alias = "whitelists",
        value_name = "NAMESPACE/SERVICE"
    )]
    pub(crate) whitelists: Vec<String>,
    /// DNS name an ExternalName service points to.
    #[arg(
        long = "external-name",
        visible_alias = "external_name",
        value_name = "HOST"
    )]
    pub(crate) external_name: Option<String>,
    /// Label KEY=VALUE on the service itself (repeatable).
    #[arg(
        short = 'l',
        long = "label",
        alias = "labels",
        value_name = "KEY=VALUE"
    )]
    pub(crate) labels: Vec<String>,
}

/// `skyctl create endpoints NAME ...`.
#[derive(Debug, Default, Args)]
pub(crate) struct CreateEndpoints {
    /// Name of the endpoints (folded to lower case).
    pub(crate) name: String,
    /// At most this many ready jobs of the primary cluster (needs --primary_cluster).
    #[arg(
        long = "num-endpoints",
        visible_alias = "num_endpoints",
        value_name = "N"
    )]
    pub(crate) num_endpoints: Option<u32>,
    /// Make the endpoints reachable from every cluster through the mesh.
    #[arg(long)]
    pub(crate) exposed: bool,
    /// The cluster whose jobs back the endpoints (default: every cluster).
    #[arg(
        long = "primary-cluster",
        visible_alias = "primary_cluster",
        value_name = "CLUSTER"
    )]
    pub(crate) primary_cluster: Option<String>,
    /// Label selector KEY=VALUE picking the jobs (repeatable, or comma-separated).
    #[arg(short = 's', long = "selector", value_name = "KEY=VALUE")]
    pub(crate) selector: Vec<String>,
    /// Label KEY=VALUE on the endpoints object itself (repeatable).
    #[arg(
        short = 'l',
        long = "label",
        alias = "labels",
        value_name = "KEY=VALUE"
    )]
    pub(crate) labels: Vec<String>,
}

/// `skyctl create cluster NAME ...`.
#[derive(Debug, Default, Args)]
pub(crate) struct CreateCluster {
    /// Name of the cluster (folded to lower case).
    pub(crate) name: String,
    /// CIDR of the cluster's workloads (repeatable, or comma-separated).
    #[arg(
        long = "workload-cidr",
        visible_alias = "workload_cidr",
        alias = "workload-cidrs",
        required = true,
        value_delimiter = ',',
        value_name = "CIDR"
    )]
    pub(crate) workload_cidrs: Vec<String>,
    /// Label KEY=VALUE, e.g. region=eu-west (repeatable).
    #[arg(
        short = 'l',
        long = "label",
        alias = "labels",
        value_name = "KEY=VALUE"
    )]
    pub(crate) labels: Vec<String>,
}

/// `skyctl create job NAME ...`.
#[derive(Debug, Default, Args)]
pub(crate) struct CreateJob {
    /// Name of the job (folded to lower case).
    pub(crate) name: String,
    /// The cluster the job runs in.
    #[arg(short = 'c', long, required = true, value_name = "CLUSTER")]
    pub(crate) cluster: String,
    /// The job's IPv4 address, inside its cluster's workload CIDRs.
    #[arg(long, required = true, value_name = "IP")]
    pub(crate) ip: String,
    /// Label KEY=VALUE that service selectors match (repeatable).
    #[arg(
        short = 'l',
        long = "label",
        alias = "labels",
        value_name = "KEY=VALUE"
    )]
    pub(crate) labels: Vec<String>,
    /// Port [NAME:]PORT[/TCP|UDP] the job serves (repeatable).
    #[arg(
        short = 'p',
        long = "port",
        alias = "ports",
        value_delimiter = ',',
        value_name = "[NAME:]PORT[/PROTO]"
    )]
    pub(crate) ports: Vec<String>,
    /// Readiness probe meshd runs every second: tcp[:PORT] (default: each
    /// TCP port), http[:PORT][/PATH] (2xx/3xx), icmp, udp[:PORT] (ICMP
    /// port unreachable = down) or none.
    #[arg(long, value_name = "PROBE")]
    pub(crate) probe: Option<String>,
}

/// `skyctl create namespace NAME`.
#[derive(Debug, Default, Args)]
pub(crate) struct CreateNamespace {
    /// Name of the namespace (folded to lower case).
    pub(crate) name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        let mut v = vec!["skyctl"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v) {
            Ok(c) => c,
            Err(e) => panic!("{args:?} does not parse: {e}"),
        }
    }

    fn create_service(args: &[&str]) -> (GlobalArgs, CreateService) {
        let cli = parse(args);
        match cli.command {
            Command::Create {
                what: Some(CreateCommand::Service(s)),
                ..
            } => (cli.global, *s),
            other => panic!("not create service: {other:?}"),
        }
    }

    fn create_endpoints(args: &[&str]) -> (GlobalArgs, CreateEndpoints) {
        let cli = parse(args);
        match cli.command {
            Command::Create {
                what: Some(CreateCommand::Endpoints(e)),
                ..
            } => (cli.global, e),
            other => panic!("not create endpoints: {other:?}"),
        }
    }

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn verbatim_create_service_example() {
        let (g, s) = create_service(&[
            "create",
            "service",
            "myService",
            "-t",
            "ClusterIP",
            "-s",
            "app=myApp",
            "-p",
            "80:8080",
            "-c",
            "myCluster",
        ]);
        assert_eq!(g.namespace, "default");
        assert_eq!(s.name, "myService");
        assert_eq!(s.service_type.as_deref(), Some("ClusterIP"));
        assert_eq!(s.selector, ["app=myApp"]);
        assert_eq!(s.ports, ["80:8080"]);
        assert_eq!(s.clusters, ["myCluster"]);
    }

    #[test]
    fn verbatim_create_endpoints_example() {
        let (g, e) = create_endpoints(&[
            "create",
            "endpoints",
            "myEndpoints",
            "--namespace",
            "myNamespace",
            "--num_endpoints",
            "3",
            "--exposed",
            "--primary_cluster",
            "myCluster",
            "-s",
            "key1=value1",
        ]);
        assert_eq!(g.namespace, "myNamespace");
        assert_eq!(e.name, "myEndpoints");
        assert_eq!(e.num_endpoints, Some(3));
        assert!(e.exposed);
        assert_eq!(e.primary_cluster.as_deref(), Some("myCluster"));
        assert_eq!(e.selector, ["key1=value1"]);
    }

    #[test]
    fn both_spellings_of_every_flag() {
        for (underscore, dash) in [
            ("--service_type", "--service-type"),
            ("--session_affinity", "--session-affinity"),
            ("--traffic_policy", "--traffic-policy"),
            ("--external_name", "--external-name"),
        ] {
            let a = create_service(&["create", "svc", "x", underscore, "V", "-p", "80"]);
            let b = create_service(&["create", "svc", "x", dash, "V", "-p", "80"]);
            assert_eq!(
                format!("{:?}", a.1),
                format!("{:?}", b.1),
                "{underscore} vs {dash}"
            );
        }
        let a = create_service(&["create", "svc", "x", "--type", "Headless"]);
        assert_eq!(a.1.service_type.as_deref(), Some("Headless"));
        let a = create_service(&["create", "svc", "x", "--affinity_timeout", "60"]);
        let b = create_service(&["create", "svc", "x", "--affinity-timeout", "60"]);
        assert_eq!(
            (a.1.affinity_timeout, b.1.affinity_timeout),
            (Some(60), Some(60))
        );
        let a = create_service(&["create", "svc", "x", "--ports", "80:8080", "--port", "81"]);
        assert_eq!(a.1.ports, ["80:8080", "81"]);
        let a = create_service(&["create", "svc", "x", "-p", "80:8080,53:53/UDP"]);
        assert_eq!(a.1.ports, ["80:8080", "53:53/UDP"]);
        let a = create_service(&[
            "create",
            "svc",
            "x",
            "-c",
            "a",
            "--cluster",
            "b",
            "-c",
            "c,d",
        ]);
        assert_eq!(a.1.clusters, ["a", "b", "c", "d"]);
        let a = create_service(&["create", "svc", "x", "-s", "a=1", "--selector", "b=2,c=3"]);
        assert_eq!(a.1.selector, ["a=1", "b=2,c=3"]);

        for (n, p) in [
            ("--num_endpoints", "--primary_cluster"),
            ("--num-endpoints", "--primary-cluster"),
        ] {
            let (_, e) = create_endpoints(&["create", "ep", "x", n, "2", p, "c"]);
            assert_eq!(
                (e.num_endpoints, e.primary_cluster.as_deref()),
                (Some(2), Some("c"))
            );
        }

        for flag in ["--workload-cidr", "--workload_cidr"] {
            let cli = parse(&[
                "create",
                "cluster",
                "c",
                flag,
                "10.1.0.0/16",
                "-l",
                "region=eu",
            ]);
            let Command::Create {
                what: Some(CreateCommand::Cluster(c)),
                ..
            } = cli.command
            else {
                panic!("not create cluster");
            };
            assert_eq!(c.workload_cidrs, ["10.1.0.0/16"]);
            assert_eq!(c.labels, ["region=eu"]);
        }
    }

    #[test]
    fn global_flags_anywhere() {
        let cli = parse(&[
            "get",
            "service",
            "myService",
            "--namespace",
            "x",
            "-o",
            "wide",
        ]);
        assert_eq!(cli.global.namespace, "x");
        assert_eq!(cli.global.output, OutputFormat::Wide);
        let cli = parse(&["-n", "y", "--output", "JSON", "get", "svc"]);
        assert_eq!(cli.global.namespace, "y");
        assert_eq!(cli.global.output, OutputFormat::Json);
        let cli = parse(&["delete", "endpoints", "myEndpoints", "--namespace", "z"]);
        assert_eq!(cli.global.namespace, "z");
        let cli = parse(&["get", "svc", "--coordinator", "http://h:1", "--token", "t"]);
        assert_eq!(cli.global.coordinator, "http://h:1");
        assert_eq!(cli.global.token.as_deref(), Some("t"));
    }

    #[test]
    fn kinds_and_aliases() {
        for (word, want) in [
            ("service", Target::Kind(Kind::Service)),
            ("services", Target::Kind(Kind::Service)),
            ("svc", Target::Kind(Kind::Service)),
            ("Service", Target::Kind(Kind::Service)),
            ("endpoints", Target::Kind(Kind::Endpoints)),
            ("endpoint", Target::Kind(Kind::Endpoints)),
            ("ep", Target::Kind(Kind::Endpoints)),
            ("cluster", Target::Kind(Kind::Cluster)),
            ("clusters", Target::Kind(Kind::Cluster)),
            ("job", Target::Kind(Kind::Job)),
            ("jobs", Target::Kind(Kind::Job)),
            ("namespace", Target::Kind(Kind::Namespace)),
            ("namespaces", Target::Kind(Kind::Namespace)),
            ("ns", Target::Kind(Kind::Namespace)),
            ("tunnels", Target::Tunnels),
            ("events", Target::Events),
            ("ev", Target::Events),
        ] {
            let cli = parse(&["get", word, "-w"]);
            let Command::Get(g) = cli.command else {
                panic!("not get");
            };
            assert_eq!(g.target, want, "{word}");
            assert!(g.watch);
        }
        for word in ["svc", "services", "ep", "endpoint", "ns", "namespaces"] {
            parse(&["create", word, "x"]);
            parse(&["delete", word, "x", "y"]);
        }
        parse(&["create", "clusters", "x", "--workload-cidr", "10.0.0.0/8"]);
        parse(&["create", "jobs", "x", "--cluster", "c", "--ip", "10.0.0.1"]);
        parse(&["delete", "clusters", "x"]);
        parse(&["delete", "jobs", "x"]);
        assert!(Cli::try_parse_from(["skyctl", "get", "pods"]).is_err());
        assert!(Cli::try_parse_from(["skyctl", "delete", "tunnels", "x"]).is_err());
    }

    #[test]
    fn usage_errors() {
        for args in [
            &["skyctl", "create", "cluster", "c"][..],
            &["skyctl", "create", "job", "j", "--cluster", "c"],
            &["skyctl", "create", "service"],
            &["skyctl", "delete", "service"],
            &["skyctl", "create", "ep", "x", "--num_endpoints", "many"],
            &["skyctl", "get", "svc", "-o", "xml"],
            &["skyctl", "create", "svc", "x", "--affinity-timeout", "-1"],
        ] {
            let e = Cli::try_parse_from(args).expect_err("must not parse");
            assert_eq!(e.exit_code(), 2, "{args:?}");
        }
    }
}
