use super::*;
use crate::cli::OutputFormat;
use crate::output::columns::tests::{endpoints_obj, web_service};
use crate::output::{Printer, View};
use skymesh_proto::v1::{
    Job, JobPort, JobSpec, Kind, ObjectMeta, Probe, ProbeType, Protocol, ServiceType,
    SessionAffinity, TrafficPolicy,
};

fn one(text: &str) -> Result<Manifest, Exit> {
    let docs = split("t.yaml", text)?;
    assert_eq!(docs.len(), 1, "{docs:?}");
    parse(&docs[0], "default")
}

fn service(m: &Manifest) -> &skymesh_proto::v1::Service {
    match m.object.obj.as_ref() {
        Some(Obj::Service(s)) => s,
        other => panic!("not a service: {other:?}"),
    }
}

use skymesh_proto::v1::object::Obj;

/// A Service as kubectl users write it.
const K8S_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: Web
  labels:
    app: web
  annotations:
    skymesh.io/clusters: c2, c1
    skymesh.io/traffic-policy: PreferLocal
    team: storefront
spec:
  type: ClusterIP
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: http
    - name: admin
      port: 8081
      targetPort: 8080
      protocol: TCP
    - name: dns
      port: 53
      targetPort: 9090
      protocol: UDP
  sessionAffinity: ClientIP
  sessionAffinityConfig:
    clientIP:
      timeoutSeconds: 600
"#;

#[test]
fn kubernetes_service_maps_every_field() {
    let m = one(K8S_SERVICE).unwrap();
    assert_eq!(m.what(), "service/web");
    assert!(m.origin.starts_with("t.yaml#1"), "{}", m.origin);
    let s = service(&m);
    let meta = s.metadata.as_ref().unwrap();
    assert_eq!(meta.namespace, "default");
    assert_eq!(
        meta.annotations.keys().collect::<Vec<_>>(),
        ["team"],
        "skymesh annotations move into the spec"
    );
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.r#type(), ServiceType::ClusterIp);
    assert_eq!(spec.clusters, ["c1", "c2"]);
    assert_eq!(spec.traffic_policy(), TrafficPolicy::PreferLocal);
    assert_eq!(spec.session_affinity(), SessionAffinity::ClientIp);
    assert_eq!(spec.affinity_timeout_s, 600);
    let ports: Vec<_> = spec
        .ports
        .iter()
        .map(|p| (p.name.as_str(), p.port, p.target_port, p.protocol()))
        .collect();
    assert_eq!(
        ports,
        [
            ("http", 80, 0, Protocol::Tcp),
            ("admin", 8081, 8080, Protocol::Tcp),
            ("dns", 53, 9090, Protocol::Udp),
        ]
    );
    assert_eq!(
        m.named_targets,
        [NamedTarget {
            index: 0,
            field: "spec.ports[0].targetPort".into(),
            name: "http".into(),
            protocol: Protocol::Tcp,
        }]
    );
}

#[test]
fn kubernetes_headless_external_name_and_defaults() {
    let m = one(
        "apiVersion: v1\nkind: Service\nmetadata: {name: h, namespace: shop}\nspec:\n  clusterIP: None\n  selector: {app: db}\n",
    )
    .unwrap();
    assert_eq!(m.object.namespace(), "shop");
    assert_eq!(
        service(&m).spec.as_ref().unwrap().r#type(),
        ServiceType::Headless
    );
    let m = one(
        "apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  type: ExternalName\n  externalName: db.example.com\n",
    )
    .unwrap();
    assert_eq!(
        service(&m).spec.as_ref().unwrap().external_name,
        "db.example.com"
    );
    // A port without targetPort targets the same number (Kubernetes' rule).
    let m =
        one("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec:\n  ports: [{port: 80}]\n")
            .unwrap();
    assert_eq!(service(&m).spec.as_ref().unwrap().ports[0].target_port, 80);
}

#[test]
fn kubernetes_endpoints_from_annotations() {
    let m = one(r#"apiVersion: v1
kind: Endpoints
metadata:
  name: db
  annotations:
    skymesh.io/selector: app=db
    skymesh.io/primary-cluster: c1
    skymesh.io/num-endpoints: "2"
    skymesh.io/exposed: "true"
subsets: []
"#)
    .unwrap();
    let Some(Obj::Endpoints(e)) = m.object.obj.as_ref() else {
        panic!("not endpoints");
    };
    let spec = e.spec.as_ref().unwrap();
    assert_eq!(spec.primary_cluster, "c1");
    assert_eq!(spec.selector.get("app").map(String::as_str), Some("db"));
    assert_eq!(
        (spec.clusters[0].num_endpoints, spec.clusters[0].exposed),
        (2, true)
    );
    assert!(e.metadata.as_ref().unwrap().annotations.is_empty());
}

/// Every refusal is one line naming the document, the field and the rule.
#[test]
fn unmappable_and_bad_fields_are_refused_by_name() {
    for (text, needle) in [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n",
            "invalid kind: \"Pod\"",
        ),
        (
            "kind: Gadget\nmetadata: {name: p}\n",
            "invalid kind: \"Gadget\"",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: p}\n",
            "invalid apiVersion",
        ),
        ("metadata: {name: p}\n", "invalid kind"),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 0}]\n",
            "invalid spec.ports[0].port: 0 is not a port number",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 70000}]\n",
            "invalid spec.ports[0].port",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: \"80\"}]\n",
            "invalid spec.ports[0].port: must be a number",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 80, nodePort: 30080}]\n",
            "invalid spec.ports[0].nodePort: not supported",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 80, protocol: SCTP}]\n",
            "invalid spec.ports[0].protocol",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 80}]\n  externalTrafficPolicy: Local\n",
            "invalid spec.externalTrafficPolicy: not supported",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  ports: [{port: 80}]\n  frobnicate: 1\n",
            "invalid spec.frobnicate: unknown field",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w}\nspec:\n  clusterIP: 10.0.0.1\n  ports: [{port: 80}]\n",
            "invalid spec.clusterIP",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w, finalizers: [x]}\nspec:\n  ports: [{port: 80}]\n",
            "invalid metadata.finalizers: unknown field",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w, annotations: {skymesh.io/bogus: x}}\nspec:\n  ports: [{port: 80}]\n",
            "invalid metadata.annotations.skymesh.io/bogus",
        ),
        (
            "apiVersion: v1\nkind: Service\nmetadata: {name: w, labels: {v: 1}}\nspec:\n  ports: [{port: 80}]\n",
            "invalid metadata.labels.v: must be a string",
        ),
        (
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: e}\nsubsets:\n- addresses: [{ip: 10.1.0.1}]\n",
            "invalid subsets[0].addresses: not supported",
        ),
        (
            "kind: Service\nmetadata: {name: w}\nspec: {ports: [{port: 80, targetPort: 8080}]}\n",
            "invalid spec.ports[0].targetPort: unknown field",
        ),
        (
            "kind: Service\nmetadata: {name: Bad_Name}\nspec: {ports: [{port: 80}]}\n",
            "invalid metadata.name",
        ),
        ("kind: Service\nmetadata: {name: w\n", "not valid YAML"),
    ] {
        let e = one(text).expect_err(text);
        assert!(e.message.contains(needle), "{text}\n→ {}", e.message);
        assert!(e.message.starts_with("t.yaml#1"), "{}", e.message);
        assert!(!e.message.contains('\n'));
        assert_eq!(e.code, crate::error::EXIT_USAGE);
    }
}

#[test]
fn streams_lists_and_json() {
    let docs = split(
        "m.yaml",
        "---\nkind: Namespace\nmetadata: {name: a}\n---\n---\nkind: Namespace\nmetadata: {name: b}\n",
    )
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1].origin, "m.yaml#3");
    let docs = split(
        "l.yaml",
        r#"{"items": [{"kind": "Namespace", "metadata": {"name": "x"}}, {"kind": "Namespace", "metadata": {"name": "y"}}]}"#,
    )
    .unwrap();
    assert_eq!(docs.len(), 2);
    assert_eq!(docs[1].origin, "l.yaml#1.items[1]");
    let m = parse(&docs[1], "default").unwrap();
    assert_eq!((m.object.kind(), m.object.name()), (Kind::Namespace, "y"));
}

fn yaml_of(obj: &Object) -> String {
    let mut p = Printer::new(View::Objects(obj.kind()), OutputFormat::Yaml, false);
    p.one(obj).unwrap()
}

fn json_of(obj: &Object) -> String {
    let mut p = Printer::new(View::Objects(obj.kind()), OutputFormat::Json, false);
    p.one(obj).unwrap()
}

/// `get -o yaml|json` output reads back into the same user-written object.
#[test]
fn get_output_round_trips() {
    let job: Object = Job {
        metadata: Some(ObjectMeta {
            name: "web-1".into(),
            namespace: "default".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            resource_version: 3,
            ..Default::default()
        }),
        spec: Some(JobSpec {
            cluster: "c1".into(),
            ip: "10.1.0.5".into(),
            ports: vec![JobPort {
                name: "http".into(),
                port: 8080,
                protocol: Protocol::Tcp as i32,
            }],
            probe: Some(Probe {
                r#type: ProbeType::Http as i32,
                port: 8080,
                path: "/healthz".into(),
            }),
        }),
        status: None,
    }
    .into();
    let mut policed = web_service();
    let spec = policed.spec.as_mut().unwrap();
    spec.upstreams = vec!["shop/db".into()];
    spec.whitelists = vec!["ops/*".into(), "shop/frontend".into()];
    for obj in [
        Object::from(web_service()),
        policed.into(),
        endpoints_obj().into(),
        job,
    ] {
        let mut want = obj.clone();
        validate::object(&mut want).unwrap();
        for text in [yaml_of(&obj), json_of(&obj)] {
            let docs = split("get.yaml", &text).unwrap();
            let m = parse(&docs[0], "default").unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(
                crate::apply::user_part(&m.object),
                crate::apply::user_part(&want),
                "{text}"
            );
            assert_eq!(m.object.resource_version(), obj.resource_version());
        }
    }
}

/// Service policy from a Kubernetes manifest's annotations.
#[test]
fn kubernetes_policy_annotations() {
    let text = K8S_SERVICE.replace(
        "    team: storefront\n",
        "    team: storefront\n    skymesh.io/upstreams: shop/db, shop/cache-*\n    skymesh.io/whitelists: shop/frontend\n",
    );
    let m = one(&text).unwrap();
    let s = service(&m);
    let spec = s.spec.as_ref().unwrap();
    assert_eq!(spec.upstreams, ["shop/cache-*", "shop/db"]);
    assert_eq!(spec.whitelists, ["shop/frontend"]);
    let ann = &s.metadata.as_ref().unwrap().annotations;
    assert!(!ann.contains_key("skymesh.io/upstreams"), "{ann:?}");
    let bad = K8S_SERVICE.replace(
        "    team: storefront\n",
        "    team: storefront\n    skymesh.io/whitelists: frontend\n",
    );
    let e = one(&bad).unwrap_err().to_string();
    assert!(
        e.contains("metadata.annotations.skymesh.io/whitelists"),
        "{e}"
    );
}
