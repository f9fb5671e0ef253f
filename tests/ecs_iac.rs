//! The `aws.ecs` deploy target driven the way wfctl drives it (tests/common/iac.rs) against
//! moto's server for every AWS API, with a local task runner (tests/ecs_runner) booting each
//! service's task definition with the real nats-server: the 3-node plan/apply/re-plan/drift/
//! destroy flow with an R3 stream and a consumer applied through the load balancer's address,
//! a rolling version update that keeps every message of the R3 stream, and a killed task whose
//! replacement re-syncs from its peers. A live variant runs only with EVENTBUS_ACCEPTANCE=1
//! and AWS credentials.

mod common;
mod ecs_runner;

use common::iac::{Res, Wfctl};
use ecs_runner::{aws_env, network, Moto, Runner};
use eventbus_plugin::iac::targets::ecs::aws::Aws;
use eventbus_plugin::pb::iac::DriftClass;
use eventbus_plugin::pb::iac::ImportRequest;
use serde_json::{json, Value as Json};
use std::time::{Duration, Instant};

const BROKER: &str = "infra.eventbus";
const STREAM: &str = "infra.eventbus.stream";
const CONSUMER: &str = "infra.eventbus.consumer";
const NATS_TOKEN: &str = "ecsToken.s3cret";

fn broker(name: &str, version: &str, aws: Json) -> Res {
    Res::new(
        name,
        BROKER,
        json!({
            "iac_provider": "eventbus-iac",
            "provider": "nats",
            "deploy_target": "aws.ecs",
            "version": version,
            "replicas": 3,
            "auth": {"token": NATS_TOKEN},
            "aws": aws,
        }),
    )
}

fn stream(bus: &str) -> Res {
    Res::new(
        &format!("{bus}-orders"),
        STREAM,
        json!({
            "iac_provider": "eventbus-iac",
            "broker_ref": bus,
            "depends_on": [bus],
            "name": "ORDERS",
            "subjects": ["orders.>"],
            "num_replicas": 3,
        }),
    )
}

fn consumer(bus: &str) -> Res {
    Res::new(
        &format!("{bus}-shipping"),
        CONSUMER,
        json!({
            "iac_provider": "eventbus-iac",
            "broker_ref": bus,
            "depends_on": [format!("{bus}-orders")],
            "name": "shipping",
            "stream_name": "ORDERS",
            "filter_subject": "orders.created",
            "ack_policy": "ACK_POLICY_EXPLICIT",
        }),
    )
}

struct Setup {
    moto: Moto,
    aws: Aws,
    runner: Runner,
    aws_section: Json,
    _dir: tempfile::TempDir,
    w: Wfctl,
}

async fn setup() -> Option<Setup> {
    let moto = Moto::start()?;
    let aws = moto.aws().await;
    let (vpc, subnets) = network(&aws).await;
    let runner = Runner::start(aws.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    w.env.extend(aws_env());
    w.env
        .push(("EVENTBUS_ECS_POLL_INTERVAL_MS".into(), "100".into()));
    // The runner's proxy is this machine's way to the broker (an SSM tunnel in real life).
    w.provider_config["aws_reach"] = json!(runner.lb_url());
    let aws_section = json!({
        "region": ecs_runner::REGION,
        "endpoint_url": moto.url,
        "vpc_id": vpc,
        "subnets": subnets,
        "execution_role_arn": "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
        "infrastructure_role_arn": "arn:aws:iam::123456789012:role/ecsInfrastructureRole",
        "client_cidrs": ["10.0.0.0/16"],
        "ready_timeout": "120s",
        "tags": {"team": "events"},
    });
    Some(Setup {
        moto,
        aws,
        runner,
        aws_section,
        _dir: dir,
        w,
    })
}

fn fail(s: &Setup, errors: &[String]) -> String {
    format!(
        "{errors:?}\nrunner errors: {:?}\n{}\nplugin:\n{}",
        s.runner.errors(),
        s.runner.logs(),
        s.w.logs()
    )
}

async fn js(url: &str) -> async_nats::jetstream::Context {
    let c = tokio::time::timeout(
        Duration::from_secs(10),
        async_nats::ConnectOptions::with_token(NATS_TOKEN.into()).connect(url),
    )
    .await
    .expect("connect in time")
    .unwrap();
    async_nats::jetstream::new(c)
}

async fn messages(url: &str) -> u64 {
    let js = js(url).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        js.get_stream("ORDERS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    })
    .await
    .expect("stream info in time")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_broker_plan_apply_replan_drift_destroy_through_moto_and_a_task_runner() {
    let Some(mut s) = setup().await else { return };
    let bus = "orders-bus";
    let file = vec![
        broker(bus, "2.10.29", s.aws_section.clone()),
        stream(bus),
        consumer(bus),
    ];

    let t = Instant::now();
    let plan = s.w.plan(&file).await;
    let plan_time = t.elapsed();
    assert_eq!(
        plan.iter().filter(|a| a.action == "create").count(),
        3,
        "{plan:?}"
    );

    let t = Instant::now();
    let (_, errors) = s.w.apply(&file).await;
    let apply_time = t.elapsed();
    assert!(errors.is_empty(), "{}", fail(&s, &errors));

    let o = s.w.state[bus].outputs.clone();
    assert_eq!(o["in_vpc_url"], "nats://nats-0.orders-bus.nats.local:4222,nats://nats-1.orders-bus.nats.local:4222,nats://nats-2.orders-bus.nats.local:4222", "{o}");
    assert!(
        o["url"].as_str().unwrap().starts_with("nats://")
            && o["url"].as_str().unwrap().ends_with(":4222"),
        "{o}"
    );
    assert_eq!(o["durable"], json!(true), "{o}");
    assert_eq!(o["desired_counts"], "1,1,1", "{o}");
    assert!(!o.to_string().contains(NATS_TOKEN), "{o}");
    assert!(
        !s.w.logs().contains(NATS_TOKEN),
        "the token leaked into the plugin's log"
    );

    // What moto holds: one service per node, desired 1, each in its own Cloud Map service (moto
    // does not echo deploymentConfiguration: ops::tests checks the 100 % / 0 % request).
    let svcs = s
        .aws
        .ecs
        .describe_services()
        .cluster(bus)
        .services("orders-bus-nats-0")
        .services("orders-bus-nats-1")
        .services("orders-bus-nats-2")
        .send()
        .await
        .unwrap();
    assert_eq!(svcs.services().len(), 3);
    for svc in svcs.services() {
        assert_eq!(svc.desired_count(), 1);
        assert_eq!(svc.service_registries().len(), 1);
    }
    // The token is a secret reference, never a plain environment variable.
    let td = s
        .aws
        .ecs
        .describe_task_definition()
        .task_definition("orders-bus-nats-1")
        .send()
        .await
        .unwrap();
    let c = &td.task_definition().unwrap().container_definitions()[0];
    assert!(c
        .environment()
        .iter()
        .all(|e| !e.value().unwrap_or_default().contains(NATS_TOKEN)));
    assert!(
        c.secrets()
            .iter()
            .any(|x| x.name() == "NATS_TOKEN" && x.value_from().ends_with(":token::")),
        "{c:?}"
    );
    let lbs = s.aws.elb.describe_load_balancers().send().await.unwrap();
    assert_eq!(lbs.load_balancers().len(), 1);
    assert_eq!(
        lbs.load_balancers()[0].scheme().map(|x| x.as_str()),
        Some("internal")
    );

    // The stream is replicated over the three real servers; the consumer is on it.
    let url = s.runner.node_url("orders-bus-nats-2").unwrap();
    let js2 = js(&url).await;
    let mut st = js2.get_stream("ORDERS").await.unwrap();
    let info = st.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.cluster.clone().unwrap().replicas.len() + 1,
        3,
        "{info:?}"
    );
    let cons: async_nats::jetstream::consumer::PullConsumer =
        st.get_consumer("shipping").await.unwrap();
    assert_eq!(cons.cached_info().config.filter_subject, "orders.created");

    let t = Instant::now();
    let replan = s.w.plan(&file).await;
    let replan_time = t.elapsed();
    assert!(replan.is_empty(), "second plan must be empty: {replan:?}");
    let drifts = s.w.drift().await.unwrap();
    assert!(
        drifts.iter().all(|d| d.class == DriftClass::InSync as i32),
        "{drifts:?}"
    );

    // Import: the recorded broker as wfctl adopts it, read back from ECS, no credentials.
    let l = s.w.load().await;
    let imported = l
        .required
        .clone()
        .import(ImportRequest {
            provider_id: bus.into(),
            resource_type: BROKER.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .state
        .unwrap();
    assert_eq!(imported.provider_id, "orders-bus/orders-bus");
    let applied: Json = serde_json::from_slice(&imported.applied_config_json).unwrap();
    assert_eq!(applied["deploy_target"], "aws.ecs", "{applied}");
    assert_eq!(applied["desired_counts"], "1,1,1", "{applied}");
    assert!(!String::from_utf8_lossy(&imported.outputs_json).contains(NATS_TOKEN));
    l.close().await;

    // Someone scales a node's service to 2: config drift.
    s.aws
        .ecs
        .update_service()
        .cluster(bus)
        .service("orders-bus-nats-1")
        .desired_count(2)
        .send()
        .await
        .unwrap();
    let t = Instant::now();
    let drifts = s.w.drift().await.unwrap();
    let drift_time = t.elapsed();
    let d = drifts.iter().find(|d| d.name == bus).unwrap();
    assert_eq!(d.class, DriftClass::Config as i32, "{drifts:?}");
    assert!(
        d.fields.contains(&"desired_counts".to_string()),
        "{drifts:?}"
    );
    // Apply puts it back.
    let (_, errors) = s.w.apply(&file).await;
    assert!(errors.is_empty(), "{}", fail(&s, &errors));
    assert!(s.w.plan(&file).await.is_empty());

    // Someone deletes a node's service: the broker is a ghost.
    s.aws
        .ecs
        .update_service()
        .cluster(bus)
        .service("orders-bus-nats-2")
        .desired_count(0)
        .send()
        .await
        .unwrap();
    s.aws
        .ecs
        .delete_service()
        .cluster(bus)
        .service("orders-bus-nats-2")
        .force(true)
        .send()
        .await
        .unwrap();
    let drifts = s.w.drift().await.unwrap();
    let d = drifts.iter().find(|d| d.name == bus).unwrap();
    assert_eq!(d.class, DriftClass::Ghost as i32, "{drifts:?}");

    let t = Instant::now();
    let result = s.w.destroy().await;
    let destroy_time = t.elapsed();
    assert!(result.errors.is_empty(), "{result:?}\n{}", s.w.logs());
    let left = s
        .aws
        .ecs
        .describe_services()
        .cluster(bus)
        .services("orders-bus-nats-0")
        .send()
        .await;
    if let Ok(l) = left {
        assert!(
            l.services().iter().all(|x| x.status() != Some("ACTIVE")),
            "{l:?}"
        );
    }
    assert!(s
        .aws
        .elb
        .describe_load_balancers()
        .send()
        .await
        .unwrap()
        .load_balancers()
        .is_empty());
    assert!(s
        .aws
        .secrets
        .list_secrets()
        .send()
        .await
        .unwrap()
        .secret_list()
        .is_empty());
    let ns = s.aws.discovery.list_namespaces().send().await.unwrap();
    assert!(ns.namespaces().is_empty(), "{ns:?}");
    assert!(s.runner.errors().is_empty(), "{:?}", s.runner.errors());
    eprintln!(
        "aws.ecs, 3-node broker + R3 stream + consumer against moto and the task runner: plan {plan_time:?}, apply {apply_time:?}, re-plan {replan_time:?}, drift {drift_time:?}, destroy {destroy_time:?}"
    );
    s.runner.stop().await;
    drop(s.moto);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_version_update_keeps_every_message_and_a_killed_task_resyncs() {
    let Some(mut s) = setup().await else { return };
    let bus = "roll-bus";
    let mut file = vec![broker(bus, "2.10.29", s.aws_section.clone()), stream(bus)];
    let (_, errors) = s.w.apply(&file).await;
    assert!(errors.is_empty(), "{}", fail(&s, &errors));

    let js0 = js(&s.runner.lb_url()).await;
    const N: u64 = 300;
    for i in 0..N {
        tokio::time::timeout(Duration::from_secs(10), async {
            js0.publish(format!("orders.created.{i}"), format!("{i}").into())
                .await
                .unwrap()
                .await
                .unwrap()
        })
        .await
        .expect("publish acked in time");
    }
    let before = s.runner.starts().len();

    // A new version: a new task definition per node, rolled one node at a time.
    file[0].config["version"] = json!("2.10.30");
    let plan = s.w.plan(&file).await;
    let b = plan.iter().find(|a| a.name == bus).unwrap();
    assert_eq!(b.action, "update", "{plan:?}");
    let t = Instant::now();
    let (_, errors) = s.w.apply(&file).await;
    let roll_time = t.elapsed();
    assert!(errors.is_empty(), "{}", fail(&s, &errors));
    let starts = s.runner.starts();
    let rolled: Vec<&(String, String, Instant)> = starts[before..].iter().collect();
    assert_eq!(rolled.len(), 3, "{rolled:?}");
    let order: Vec<&str> = rolled.iter().map(|x| x.0.as_str()).collect();
    assert_eq!(
        order,
        ["roll-bus-nats-0", "roll-bus-nats-1", "roll-bus-nats-2"]
    );
    for r in &rolled {
        assert!(r.1.contains(":2"), "a new revision: {r:?}");
    }
    // Each node was replaced only after the previous one had caught up (the provider held
    // off for at least the stable window), and every node's own store holds every message
    // (each replacement started empty).
    for w in rolled.windows(2) {
        assert!(w[1].2 - w[0].2 >= Duration::from_secs(4), "{rolled:?}");
    }
    for i in 0..3 {
        let got = s
            .runner
            .local_messages(&format!("{bus}-nats-{i}"), "ORDERS")
            .await;
        assert_eq!(got, Some(N), "node {i}");
    }
    assert!(s.w.plan(&file).await.is_empty());

    // A task dies; its replacement starts empty and re-syncs from its peers.
    let t = Instant::now();
    s.runner.kill("roll-bus-nats-1");
    let start = Instant::now();
    loop {
        if s.runner.starts().len() > starts.len() && s.runner.node_url("roll-bus-nats-1").is_some()
        {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no replacement task\n{}",
            s.runner.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let start = Instant::now();
    loop {
        // The replacement's own store, not the stream leader's answer.
        let got = s.runner.local_messages("roll-bus-nats-1", "ORDERS").await;
        if got == Some(N) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "re-synced {got:?} of {N}\n{}",
            s.runner.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resync_time = t.elapsed();
    assert_eq!(messages(&s.runner.lb_url()).await, N);
    // The replacement's return may move the meta leadership: destroy once the JetStream API
    // answers on every node again.
    let start = Instant::now();
    'meta: loop {
        for i in 0..3 {
            let url = s.runner.node_url(&format!("{bus}-nats-{i}"));
            let ok = match url {
                Some(u) => {
                    let js = js(&u).await;
                    matches!(
                        tokio::time::timeout(Duration::from_secs(5), js.query_account()).await,
                        Ok(Ok(_))
                    )
                }
                None => false,
            };
            if !ok {
                assert!(
                    start.elapsed() < Duration::from_secs(60),
                    "no meta leader\n{}",
                    s.runner.logs()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue 'meta;
            }
        }
        break;
    }

    let result = s.w.destroy().await;
    assert!(result.errors.is_empty(), "{result:?}");
    eprintln!("aws.ecs rolling update of 3 nodes: {roll_time:?}; killed task replaced and re-synced {N} messages in {resync_time:?}");
    s.runner.stop().await;
}

#[tokio::test]
#[ignore = "live AWS: EVENTBUS_ACCEPTANCE=1 with AWS credentials, EVENTBUS_ECS_VPC, EVENTBUS_ECS_SUBNETS, EVENTBUS_ECS_EXECUTION_ROLE and EVENTBUS_ECS_INFRA_ROLE"]
async fn live_aws_ecs_apply_and_destroy() {
    let live = std::env::var("EVENTBUS_ACCEPTANCE").as_deref() == Ok("1")
        && (std::env::var_os("AWS_ACCESS_KEY_ID").is_some()
            || std::env::var_os("AWS_PROFILE").is_some());
    if !live {
        eprintln!("skipped: live aws.ecs (set EVENTBUS_ACCEPTANCE=1 and AWS credentials)");
        return;
    }
    let var = |k: &str| {
        std::env::var(k).unwrap_or_else(|_| panic!("{k} is required for the live aws.ecs test"))
    };
    let dir = tempfile::tempdir().unwrap();
    let mut w = Wfctl::new(dir.path());
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_REGION",
        "HOME",
    ] {
        if let Ok(v) = std::env::var(k) {
            w.env.push((k.into(), v));
        }
    }
    if let Ok(r) = std::env::var("EVENTBUS_ECS_REACH") {
        w.provider_config["aws_reach"] = json!(r);
    }
    let bus = "eventbus-live";
    let file = vec![
        broker(
            bus,
            "2.10.29",
            json!({
                "vpc_id": var("EVENTBUS_ECS_VPC"),
                "subnets": var("EVENTBUS_ECS_SUBNETS").split(',').collect::<Vec<_>>(),
                "execution_role_arn": var("EVENTBUS_ECS_EXECUTION_ROLE"),
                "infrastructure_role_arn": var("EVENTBUS_ECS_INFRA_ROLE"),
                "client_cidrs": [std::env::var("EVENTBUS_ECS_CLIENT_CIDR").unwrap_or_else(|_| "10.0.0.0/8".into())],
                "volume_size_gib": 4,
            }),
        ),
        stream(bus),
    ];
    let t = Instant::now();
    let (_, errors) = w.apply(&file).await;
    eprintln!("live aws.ecs apply: {:?}", t.elapsed());
    let result = w.destroy().await;
    assert!(errors.is_empty(), "{errors:?}\n{}", w.logs());
    assert!(result.errors.is_empty(), "{result:?}");
}
