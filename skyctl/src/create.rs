//! `skyctl create KIND NAME ...`: builds the object from the flags, checks
//! and normalises it with `skymesh_proto::validate` (so bad input is refused
//! before anything is sent, exit 2), sends `Api.Create`, and prints
//! `kind/name created` — for clusters also the join token and the meshd
//! command line. Never re-implements validation.

use anyhow::Result;
use skymesh_proto::v1::{
    Cluster, ClusterSpec, CreateRequest, Endpoints, EndpointsClusterSpec, EndpointsSpec, Job,
    JobSpec, Namespace, Object, ObjectMeta, Service, ServiceSpec,
};
use skymesh_proto::validate::{self, ValidationError};

use crate::cli::{
    CreateCluster, CreateCommand, CreateEndpoints, CreateJob, CreateNamespace, CreateService,
    OutputFormat,
};
use crate::client::Ctx;
use crate::output::{self, Printer, View, human};

fn meta(name: &str, namespace: &str, labels: &[String]) -> Result<ObjectMeta, ValidationError> {
    Ok(ObjectMeta {
        name: validate::name("NAME", name)?,
        namespace: namespace.to_string(),
        labels: validate::selector("-l/--label", labels)?
            .into_iter()
            .collect(),
        ..Default::default()
    })
}

fn service(a: &CreateService, namespace: &str) -> Result<Object, ValidationError> {
    let mut spec = ServiceSpec {
        selector: validate::selector("-s/--selector", &a.selector)?
            .into_iter()
            .collect(),
        ports: a
            .ports
            .iter()
            .map(|p| validate::parse_service_port("-p/--port", p))
            .collect::<Result<_, _>>()?,
        clusters: a
            .clusters
            .iter()
            .map(|c| validate::name("-c/--cluster", c))
            .collect::<Result<_, _>>()?,
        affinity_timeout_s: a.affinity_timeout.unwrap_or(0),
        external_name: a.external_name.clone().unwrap_or_default(),
        upstreams: a
            .upstreams
            .iter()
            .map(|p| validate::policy_pattern("--upstream", p))
            .collect::<Result<_, _>>()?,
        whitelists: a
            .whitelists
            .iter()
            .map(|p| validate::policy_pattern("--whitelist", p))
            .collect::<Result<_, _>>()?,
        ..Default::default()
    };
    if let Some(t) = &a.service_type {
        spec.r#type = validate::parse_service_type("-t/--service-type", t)? as i32;
    }
    if let Some(s) = &a.session_affinity {
        spec.session_affinity = validate::parse_session_affinity("--session-affinity", s)? as i32;
    }
    if let Some(p) = &a.traffic_policy {
        spec.traffic_policy = validate::parse_traffic_policy("--traffic-policy", p)? as i32;
    }
    Ok(Service {
        metadata: Some(meta(&a.name, namespace, &a.labels)?),
        spec: Some(spec),
        status: None,
    }
    .into())
}

fn endpoints(a: &CreateEndpoints, namespace: &str) -> Result<Object, ValidationError> {
    // With a primary cluster, the limit and exposure are that cluster's;
    // without, each cluster's on its own.
    let settings = EndpointsClusterSpec {
        cluster: String::new(),
        num_endpoints: a.num_endpoints.unwrap_or(0),
        exposed: a.exposed,
    };
    let (clusters, every_cluster) = match &a.primary_cluster {
        Some(c) => (
            vec![EndpointsClusterSpec {
                cluster: validate::name("--primary_cluster", c)?,
                ..settings
            }],
            None,
        ),
        None => (Vec::new(), Some(settings)),
    };
    Ok(Endpoints {
        metadata: Some(meta(&a.name, namespace, &a.labels)?),
        spec: Some(EndpointsSpec {
            selector: validate::selector("-s/--selector", &a.selector)?
                .into_iter()
                .collect(),
            primary_cluster: a.primary_cluster.clone().unwrap_or_default(),
            clusters,
            every_cluster,
        }),
        status: None,
    }
    .into())
}

fn cluster(a: &CreateCluster) -> Result<Object, ValidationError> {
    Ok(Cluster {
        metadata: Some(meta(&a.name, "", &a.labels)?),
        spec: Some(ClusterSpec {
            workload_cidrs: a
                .workload_cidrs
                .iter()
                .map(|c| validate::cidr("--workload-cidr", c).map(|n| n.to_string()))
                .collect::<Result<_, _>>()?,
        }),
        status: None,
    }
    .into())
}

fn job(a: &CreateJob, namespace: &str) -> Result<Object, ValidationError> {
    let ports: Vec<_> = a
        .ports
        .iter()
        .map(|p| validate::parse_job_port("--port", p))
        .collect::<Result<_, _>>()?;
    let probe = match a.probe.as_deref() {
        Some(text) => {
            let mut p = validate::parse_probe("--probe", text)?;
            validate::probe("--probe", &mut p, &ports)?;
            Some(p)
        }
        None => None,
    };
    Ok(Job {
        metadata: Some(meta(&a.name, namespace, &a.labels)?),
        spec: Some(JobSpec {
            cluster: validate::name("--cluster", &a.cluster)?,
            ip: validate::ip("--ip", &a.ip)?.to_string(),
            ports,
            probe,
        }),
        status: None,
    }
    .into())
}

fn namespace_obj(a: &CreateNamespace) -> Result<Object, ValidationError> {
    Ok(Namespace {
        metadata: Some(meta(&a.name, "", &[])?),
    }
    .into())
}

/// Builds and validates the object a `create` command asks for.
pub(crate) fn build(cmd: &CreateCommand, namespace: &str) -> Result<Object, ValidationError> {
    let mut obj = match cmd {
        CreateCommand::Service(a) => service(a, namespace)?,
        CreateCommand::Endpoints(a) => endpoints(a, namespace)?,
        CreateCommand::Cluster(a) => cluster(a)?,
        CreateCommand::Job(a) => job(a, namespace)?,
        CreateCommand::Namespace(a) => namespace_obj(a)?,
    };
    validate::object(&mut obj)?;
    Ok(obj)
}

/// The last step of a cluster's creation: how to start its gateway.
pub(crate) fn join_instructions(url: &str, cluster: &str, token: &str, expires: i64) -> String {
    let expiry = if expires > 0 {
        format!(
            ", expires {} (in {})",
            human::rfc3339(expires),
            human::duration(expires - output::now())
        )
    } else {
        String::new()
    };
    let pin = match skymesh_proto::tls::join_token_fingerprint(token) {
        Ok(Some(fp)) => format!("; it pins the coordinator's CA {fp}"),
        _ => String::new(),
    };
    format!(
        "join token (single use{expiry}{pin}):\n  {token}\n\
         start the cluster's gateway with the token in a file (mode 0600) or in MESHD_JOIN_TOKEN, never on its command line:\n  \
         meshd --coordinator {url} --cluster {cluster} --join-token-file <FILE> --endpoint <THIS-GATEWAY-IP>:51820\n\
         (<THIS-GATEWAY-IP> is the address the other clusters' gateways reach this gateway at)\n"
    )
}

/// Sends a built object (see [`build`]) and prints the result.
pub(crate) async fn run(ctx: &mut Ctx, obj: Object) -> Result<()> {
    let kind = obj.kind();
    let resp = ctx
        .api
        .create(CreateRequest { object: Some(obj) })
        .await
        .map_err(|s| ctx.status(&s))?
        .into_inner();
    let created = resp.object.unwrap_or_default();
    let name = created.name().to_string();
    match ctx.output {
        OutputFormat::Json | OutputFormat::Yaml => {
            let mut printer = Printer::new(View::Objects(kind), ctx.output, false);
            output::emit(&printer.one(&created)?)?;
        }
        OutputFormat::Table | OutputFormat::Wide => {
            output::emit(&format!("{}/{name} created", kind.singular()))?;
        }
    }
    if !resp.join_token.is_empty() {
        let text = join_instructions(&ctx.url, &name, &resp.join_token, resp.join_token_expires);
        match ctx.output {
            // Documents stay parseable on stdout; the token goes to stderr.
            OutputFormat::Json | OutputFormat::Yaml => eprint!("{text}"),
            OutputFormat::Table | OutputFormat::Wide => output::emit(&text)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;
    use skymesh_proto::v1::object::Obj;
    use skymesh_proto::v1::{Protocol, ServiceType};

    fn build_from(args: &[&str]) -> Result<Object, ValidationError> {
        let mut v = vec!["skyctl", "create"];
        v.extend_from_slice(args);
        let cli = Cli::try_parse_from(v).unwrap();
        let Command::Create {
            what: Some(what), ..
        } = cli.command
        else {
            panic!("not create");
        };
        build(&what, &cli.global.namespace)
    }

    #[test]
    fn verbatim_service_example() {
        let obj = build_from(&[
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
        ])
        .unwrap();
        let Some(Obj::Service(s)) = obj.obj else {
            panic!("not a service");
        };
        let m = s.metadata.unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str()),
            ("myservice", "default")
        );
        let spec = s.spec.unwrap();
        assert_eq!(spec.r#type(), ServiceType::ClusterIp);
        assert_eq!(spec.selector.get("app").map(String::as_str), Some("myApp"));
        assert_eq!((spec.ports[0].port, spec.ports[0].target_port), (80, 8080));
        assert_eq!(spec.ports[0].protocol(), Protocol::Tcp);
        assert_eq!(spec.clusters, ["mycluster"]);
    }

    #[test]
    fn verbatim_endpoints_example() {
        let obj = build_from(&[
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
        ])
        .unwrap();
        let Some(Obj::Endpoints(e)) = obj.obj else {
            panic!("not endpoints");
        };
        let m = e.metadata.unwrap();
        assert_eq!(
            (m.name.as_str(), m.namespace.as_str()),
            ("myendpoints", "mynamespace")
        );
        let spec = e.spec.unwrap();
        assert_eq!(spec.primary_cluster, "mycluster");
        assert_eq!(
            spec.clusters,
            [EndpointsClusterSpec {
                cluster: "mycluster".into(),
                num_endpoints: 3,
                exposed: true
            }]
        );
    }

    #[test]
    fn endpoints_without_primary_cluster() {
        let obj = build_from(&["ep", "e", "-s", "a=b"]).unwrap();
        let Some(Obj::Endpoints(e)) = obj.obj else {
            panic!("not endpoints");
        };
        let spec = e.spec.unwrap();
        assert!(spec.clusters.is_empty());
        assert_eq!(
            spec.every_cluster,
            Some(EndpointsClusterSpec::default()),
            "each cluster: no limit, its own clients only"
        );
        let obj = build_from(&["ep", "e", "--num-endpoints", "2", "--exposed"]).unwrap();
        let Some(Obj::Endpoints(e)) = obj.obj else {
            panic!("not endpoints");
        };
        let every = e.spec.unwrap().every_cluster.unwrap();
        assert_eq!(
            (every.num_endpoints, every.exposed),
            (2, true),
            "kept, per cluster"
        );
    }

    #[test]
    fn bad_input_names_the_field() {
        for (args, field) in [
            ("service s -p 0:80", "-p/--port"),
            ("service s -p 70000", "-p/--port"),
            ("service s -p 80/SCTP", "-p/--port"),
            ("service s -p 80 -s app", "-s/--selector"),
            ("service s -p 80 -t Bogus", "-t/--service-type"),
            ("service s -p 80 --traffic-policy x", "--traffic-policy"),
            ("service s -p 80 --session-affinity x", "--session-affinity"),
            (
                "service s -p 80 --affinity-timeout 90000",
                "spec.affinity_timeout_s",
            ),
            ("service s", "spec.ports"),
            ("service bad_name -p 80", "NAME"),
            ("service s -p 80 -c no_such", "-c/--cluster"),
            ("ep e --primary_cluster no_such", "--primary_cluster"),
            ("cluster c --workload-cidr 10.1.0.0/33", "--workload-cidr"),
            ("cluster c --workload-cidr 10.1.0.1/16", "--workload-cidr"),
            (
                "cluster c --workload-cidr 10.1.0.0/16,10.1.2.0/24",
                "spec.workload_cidrs[1]",
            ),
            ("job j --cluster c --ip 10.1.0.300", "--ip"),
            ("job j --cluster c_ --ip 10.1.0.3", "--cluster"),
            ("job j --cluster c --ip 10.1.0.3 --port 0", "--port"),
            ("job j --cluster c --ip 10.1.0.3 --probe ping", "--probe"),
            ("job j --cluster c --ip 10.1.0.3 --probe icmp:80", "--probe"),
            (
                "job j --cluster c --ip 10.1.0.3 --port 53/udp --probe tcp",
                "--probe.port",
            ),
            (
                "job j --cluster c --ip 10.1.0.3 --probe http:/x",
                "--probe.port",
            ),
            ("job j --cluster c --ip 10.1.0.3 -l =x", "-l/--label"),
            ("namespace x-", "NAME"),
        ] {
            let argv: Vec<&str> = args.split_whitespace().collect();
            let err = build_from(&argv).expect_err(&format!("{args:?} must be refused"));
            assert_eq!(err.field, field, "{args:?}: {err}");
        }
    }

    #[test]
    fn other_kinds() {
        let obj = build_from(&[
            "cluster",
            "myCluster",
            "--workload-cidr",
            "10.1.0.0/16,10.2.0.0/16",
            "--label",
            "region=eu",
        ])
        .unwrap();
        let Some(Obj::Cluster(c)) = obj.obj else {
            panic!("not a cluster");
        };
        assert_eq!(c.metadata.as_ref().unwrap().namespace, "");
        assert_eq!(c.spec.unwrap().workload_cidrs.len(), 2);

        let obj = build_from(&[
            "job",
            "web-1",
            "--cluster",
            "East",
            "--ip",
            "10.1.0.5",
            "-l",
            "app=web",
            "--port",
            "http:8080",
            "--port",
            "53/UDP",
        ])
        .unwrap();
        let Some(Obj::Job(j)) = obj.obj else {
            panic!("not a job");
        };
        let spec = j.spec.unwrap();
        assert_eq!(spec.cluster, "east");
        assert_eq!(spec.ports[0].name, "http");
        assert_eq!(spec.ports[1].protocol(), Protocol::Udp);
        assert_eq!(
            j.metadata.unwrap().labels.get("app").map(String::as_str),
            Some("web")
        );

        let obj = build_from(&["ns", "myNamespace"]).unwrap();
        assert_eq!(obj.name(), "mynamespace");
        assert_eq!(obj.namespace(), "");
    }

    #[test]
    fn join_instructions_show_the_meshd_command() {
        let fp = skymesh_proto::tls::Fingerprint::of(b"ca");
        let tok = skymesh_proto::tls::join_token_with_fingerprint("skyjoin_x", &fp);
        let t = join_instructions("https://10.0.0.1:7400", "east", &tok, output::now() + 3600);
        assert!(t.contains(
            "meshd --coordinator https://10.0.0.1:7400 --cluster east --join-token-file <FILE> --endpoint <THIS-GATEWAY-IP>:51820"
        ), "{t}");
        assert!(t.contains(&format!("\n  {tok}\n")), "{t}");
        assert!(t.contains(&fp.to_string()), "{t}");
        assert!(t.contains("expires "), "{t}");
    }
}
