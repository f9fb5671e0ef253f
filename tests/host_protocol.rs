//! Issue 2: the binary loads and is driven exactly as the workflow engine drives it.

mod common;

use common::*;
use eventbus_plugin::pb::go_plugin::grpc_controller_client::GrpcControllerClient;
use eventbus_plugin::pb::go_plugin::{ConnInfo, Empty};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn handshake_line_health_and_shutdown() {
    let mut p = Plugin::launch(LaunchOptions::default()).await;
    let parts: Vec<&str> = p.handshake.split('|').collect();
    assert_eq!(parts.len(), 6, "{}", p.handshake);
    assert_eq!(&parts[..3], &["1", "1", "unix"]);
    assert!(
        parts[3].starts_with('/'),
        "absolute socket path: {}",
        parts[3]
    );
    assert_eq!(parts[4], "grpc");
    assert_eq!(parts[5], "", "no server cert: this host has no TLS");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&p.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    eprintln!("spawn-to-handshake: {:?}", p.spawn_to_handshake);

    let mut health = tonic_health::pb::health_client::HealthClient::new(p.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "plugin".into(),
        })
        .await
        .unwrap();
    assert_eq!(
        r.get_ref().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let (code, took) = p.shutdown().await;
    assert_eq!(code, Some(0), "stderr: {}", p.stderr());
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    assert!(!p.socket.exists(), "socket removed on exit");
}

#[tokio::test]
async fn without_cookie_exits_1_with_nothing_on_stdout() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    let out = spawn_raw(&bin, &[], false).wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "stdout: {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugin"));
    // Wrong cookie value too.
    let out = spawn_raw(&bin, &[("WORKFLOW_PLUGIN".into(), "nope".into())], false)
        .wait_with_output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn help_and_version_work_without_cookie() {
    let out = std::process::Command::new(BIN)
        .arg("--version")
        .env_remove("WORKFLOW_PLUGIN")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
    let out = std::process::Command::new(BIN)
        .arg("--help")
        .env_remove("WORKFLOW_PLUGIN")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("Usage"));
}

#[tokio::test]
async fn socket_dir_env_is_honoured() {
    let sock_dir = tempfile::tempdir().unwrap();
    let p = Plugin::launch(LaunchOptions {
        env: vec![(
            "PLUGIN_UNIX_SOCKET_DIR".into(),
            sock_dir.path().display().to_string(),
        )],
        ..Default::default()
    })
    .await;
    assert!(p.socket.starts_with(sock_dir.path()), "{:?}", p.socket);
}

#[tokio::test]
async fn sigint_is_ignored_and_sigterm_exits() {
    let mut p = Plugin::launch(LaunchOptions::default()).await;
    let pid = p.child.id() as i32;
    unsafe { libc::kill(pid, libc::SIGINT) };
    // Still serving after SIGINT: a full RPC round trip proves it.
    let m = p.client.clone().get_manifest(()).await.unwrap();
    assert_eq!(m.get_ref().name, "workflow-plugin-eventbus");
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_exit(&mut p.child, Duration::from_secs(3));
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn broker_conninfo_arriving_after_configure_callback_is_awaited() {
    let mut p = Plugin::launch(LaunchOptions {
        callback: Some(ok_pipeline()),
        conninfo_delay: Duration::from_millis(700),
        ..Default::default()
    })
    .await;
    // launch() asserted that ConfigureCallback succeeded although ConnInfo came 700 ms later.
    let (code, _) = p.shutdown().await;
    assert_eq!(code, Some(0));
}

#[tokio::test]
async fn configure_callback_errors_are_clear() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let mut c = p.client.clone();
    let r = c
        .configure_callback(eventbus_plugin::pb::plugin::ConfigureCallbackRequest { broker_id: 0 })
        .await
        .unwrap();
    assert!(
        r.get_ref().error.contains("broker id 0"),
        "{}",
        r.get_ref().error
    );
    // A ConnInfo pointing nowhere: a dial error, not a hang.
    p.send_conninfo(ConnInfo {
        service_id: 9,
        network: "unix".into(),
        address: "/nonexistent/sock".into(),
        knock: None,
    });
    let t = Instant::now();
    let r = c
        .configure_callback(eventbus_plugin::pb::plugin::ConfigureCallbackRequest { broker_id: 9 })
        .await
        .unwrap();
    assert!(
        r.get_ref().error.contains("broker id 9"),
        "{}",
        r.get_ref().error
    );
    assert!(t.elapsed() < Duration::from_secs(8));
}

#[tokio::test]
async fn manifest_and_type_lists() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let mut c = p.client.clone();
    let m = c.get_manifest(()).await.unwrap().into_inner();
    let disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("plugin.json").unwrap()).unwrap();
    assert_eq!(m.name, disk["name"]);
    assert_eq!(m.version, disk["version"]);
    assert_eq!(m.version, env!("CARGO_PKG_VERSION"));
    assert!(!m.author.is_empty() && !m.description.is_empty());
    let modules = c.get_module_types(()).await.unwrap().into_inner().types;
    for t in [
        "infra.eventbus",
        "infra.eventbus.stream",
        "infra.eventbus.consumer",
        "eventbus.broker",
        "eventbus.stream",
        "eventbus.consumer",
    ] {
        assert!(modules.contains(&t.to_string()), "{t}");
    }
    // Stable across calls.
    assert_eq!(
        modules,
        c.get_module_types(()).await.unwrap().into_inner().types
    );
    let steps = c.get_step_types(()).await.unwrap().into_inner().types;
    assert_eq!(
        steps,
        vec![
            "step.eventbus.publish",
            "step.eventbus.consume",
            "step.eventbus.ack",
            "step.eventbus.kv",
            "step.eventbus.object"
        ]
    );
    let triggers = c.get_trigger_types(()).await.unwrap().into_inner().types;
    assert_eq!(triggers, vec!["trigger.eventbus.subscribe"]);
    let schemas = c.get_module_schemas(()).await.unwrap().into_inner().schemas;
    assert_eq!(schemas.len(), 10);
    let stream = schemas
        .iter()
        .find(|s| s.r#type == "eventbus.stream")
        .unwrap();
    let name = stream
        .config_fields
        .iter()
        .find(|f| f.name == "name")
        .unwrap();
    assert!(name.required && !name.description.is_empty());
    let ret = stream
        .config_fields
        .iter()
        .find(|f| f.name == "retention_policy")
        .unwrap();
    assert!(ret
        .options
        .contains(&"RETENTION_POLICY_WORKQUEUE".to_string()));
    let frag = c.get_config_fragment(()).await.unwrap().into_inner();
    assert!(frag.yaml_config.is_empty());
}

#[tokio::test]
async fn registry_is_strict_and_its_descriptor_set_resolves_every_message() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let reg = &p.codec.registry;
    use eventbus_plugin::pb::plugin::{ContractKind, ContractMode};
    for d in &reg.contracts {
        assert_eq!(d.mode, ContractMode::StrictProto as i32, "{d:?}");
        for m in [&d.config_message, &d.input_message, &d.output_message] {
            if !m.is_empty() {
                assert!(
                    p.codec.pool.get_message_by_name(m).is_some(),
                    "{m} does not resolve"
                );
            }
        }
        if d.kind == ContractKind::Step as i32 {
            assert!(
                !d.config_message.is_empty()
                    && !d.input_message.is_empty()
                    && !d.output_message.is_empty(),
                "{d:?}"
            );
        }
    }
    let set = reg.file_descriptor_set.as_ref().unwrap();
    let names: Vec<&str> = set.file.iter().map(|f| f.name()).collect();
    assert!(names.contains(&"eventbus.proto"));
    for f in &set.file {
        for dep in &f.dependency {
            assert!(
                names.contains(&dep.as_str()),
                "{} imports {dep}, missing",
                f.name()
            );
        }
    }
    let triggers: Vec<_> = reg
        .contracts
        .iter()
        .filter(|d| d.kind == ContractKind::Trigger as i32)
        .collect();
    assert_eq!(triggers.len(), 1);
    assert_eq!(triggers[0].trigger_type, "trigger.eventbus.subscribe");
}

const BROKER: &str = "provider: nats\ndeploy_target: self_hosted\n";

#[tokio::test]
async fn typed_and_legacy_module_creation_for_both_name_sets() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    for (broker, stream, consumer) in [
        (
            "infra.eventbus",
            "infra.eventbus.stream",
            "infra.eventbus.consumer",
        ),
        ("eventbus.broker", "eventbus.stream", "eventbus.consumer"),
    ] {
        let b = p.create_module(broker, "bus", BROKER).await.unwrap();
        p.lifecycle("init", &b).await.unwrap();
        // No URL anywhere: degraded start, as the Go plugin.
        p.lifecycle("start", &b).await.unwrap();
        let s = p.create_module(stream, "orders", "name: ORDERS\nsubjects: [orders.>]\nmaxAge: 3600s\nretention_policy: RETENTION_POLICY_LIMITS\n").await.unwrap();
        let c = p.create_module(consumer, "worker", "name: worker\nstream_name: ORDERS\nack_policy: ACK_POLICY_EXPLICIT\nmax_deliver: '5'\n").await.unwrap();
        let legacy = p
            .create_module_legacy(
                stream,
                "orders2",
                "name: ORDERS2\nsubjects: [o2.>]\nnum_replicas: 1\n",
            )
            .await
            .unwrap();
        let ids = [&b, &s, &c, &legacy];
        let mut uniq: Vec<_> = ids.to_vec();
        uniq.sort();
        uniq.dedup();
        assert_eq!(uniq.len(), 4, "handles are unique");
        for h in [&s, &c, &legacy, &b] {
            p.lifecycle("stop", h).await.unwrap();
            p.lifecycle("destroy", h).await.unwrap();
        }
    }
}

#[tokio::test]
async fn wfctl_keys_are_accepted_in_strict_mode() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    p.create_module(
        "infra.eventbus",
        "bus",
        "provider: nats\ndeploy_target: local\niac_provider: eventbus-iac\ndepends_on: [net]\nsize: s\nadopt_existing: true\nprotected: true\nregion: local\n",
    )
    .await
    .unwrap();
    p.create_module("infra.eventbus.stream", "s", "name: S\nsubjects: [s.>]\niac_provider: eventbus-iac\ndepends_on: [bus]\nbroker_ref: bus\n").await.unwrap();
}

#[tokio::test]
async fn unknown_handles_and_types_are_errors_in_the_body() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let e = p.lifecycle("init", "nope").await.unwrap_err();
    assert_eq!(e, "unknown module handle: nope");
    let e = p.lifecycle("destroy_step", "nope").await.unwrap_err();
    assert_eq!(e, "unknown step handle: nope");
    let r = p
        .client
        .clone()
        .create_module(eventbus_plugin::pb::plugin::CreateModuleRequest {
            r#type: "eventbus.queue".into(),
            name: "q".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.error.contains("unknown module type \"eventbus.queue\""),
        "{}",
        r.error
    );
    let e = p.create_trigger("x", &json!({})).await;
    assert!(e.is_err());
    // Module and trigger handles share the Init/Start/Stop namespace.
    let t = p
        .create_trigger(
            "pipeline:orders",
            &json!({"name": "w", "stream_name": "S", "broker_ref": "b"}),
        )
        .await;
    // broker b is unknown at create time only when started; creation succeeds.
    let t = t.unwrap();
    assert!(p.lifecycle("stop", &t).await.is_ok());
}

/// Every validation rule of issue 2: one line per problem naming module, field and remedy.
#[tokio::test]
async fn validation_errors_name_module_field_and_remedy() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let cases: &[(&str, &str, &[&str])] = &[
        ("eventbus.broker", "deploy_target: self_hosted\n", &["eventbus.broker \"m\": config.provider: is required"]),
        ("eventbus.broker", "provider: nats\n", &["config.deploy_target: is required for provider nats"]),
        ("eventbus.broker", "provider: rabbitmq\ndeploy_target: self_hosted\n", &["unknown provider \"rabbitmq\"", "supported providers are: nats, pgchannel, kafka, kinesis"]),
        ("eventbus.broker", "provider: NATS\ndeploy_target: self_hosted\n", &["lowercase"]),
        ("eventbus.broker", "provider: nats\ndeploy_target: aws.msk\n", &["config.deploy_target: provider \"nats\" does not support deploy target \"aws.msk\"", "local, self_hosted"]),
        ("eventbus.broker", "provider: kafka\ndeploy_target: self_hosted\nservers: ['nats://x:4222']\npoll_interval: 1s\n", &["config.servers: is a NATS setting; kafka brokers go in dsn", "config.poll_interval: applies to provider pgchannel only"]),
        ("eventbus.broker", "provider: kinesis\ndeploy_target: aws.kinesis\n", &["provider \"kinesis\" is not available yet"]),
        ("eventbus.broker", "provider: kafka\ndeploy_target: local\n", &["does not support deploy target \"local\""]),
        ("eventbus.broker", "provider: nats\ndeploy_target: kubernetes\nversion: latest\n", &["config.version: \"latest\" is not allowed"]),
        ("eventbus.broker", "provider: nats\ndeploy_target: self_hosted\ndsn: 'http://x y'\n", &["config.dsn:", "not a NATS url"]),
        ("eventbus.broker", "provider: nats\ndeploy_target: self_hosted\nauth: {user: u}\n", &["config.auth: user and password go together"]),
        ("eventbus.broker", "provider: nats\ndeploy_target: self_hosted\nlocal: {binary: /x}\n", &["config.local: only applies to deploy_target local"]),
        ("eventbus.stream", "subjects: [a.>]\n", &["eventbus.stream \"m\": config.name: is required"]),
        ("eventbus.stream", "name: S\n", &["config.subjects: must contain at least one subject"]),
        ("eventbus.stream", "name: 'a.b'\nsubjects: ['x..y']\n", &["config.name:", "config.subjects[0]:"]),
        ("eventbus.stream", "name: S\nsubjects: [a]\nnum_replicas: 7\n", &["config.num_replicas: 7 is out of range"]),
        ("eventbus.stream", "name: S\nsubjects: [a]\nmax_age: 60s\nduplicate_window: 120s\n", &["config.duplicate_window:", "exceeds max_age"]),
        ("eventbus.consumer", "stream_name: S\n", &["eventbus.consumer \"m\": config.name:", "is required"]),
        ("eventbus.consumer", "name: c\n", &["config.stream_name: is required"]),
        ("eventbus.consumer", "name: c\nstream_name: S\ndeliver_policy: DELIVER_POLICY_BY_START_SEQUENCE\n", &["config.opt_start_seq: is required"]),
        ("eventbus.consumer", "name: c\nstream_name: S\ndeliver_policy: DELIVER_POLICY_BY_START_TIME\n", &["config.opt_start_time: is required"]),
        ("eventbus.consumer", "name: c\nstream_name: S\nmax_deliver: 2\nbackoff: [1s, 2s]\n", &["config.backoff: has 2 entries"]),
        ("infra.eventbus.consumer", "name: c\nstream_name: S\nfilter_subject: 'a.>.b'\n", &["infra.eventbus.consumer \"m\": config.filter_subjects[0]:"]),
    ];
    for (type_name, yaml, wants) in cases {
        let err = p.create_module(type_name, "m", yaml).await.expect_err(yaml);
        for w in *wants {
            assert!(
                err.contains(w),
                "{type_name} {yaml:?}: want {w:?} in {err:?}"
            );
        }
        for line in err.lines() {
            assert!(
                line.starts_with(&format!("{type_name} \"m\": ")),
                "every line names the module: {line:?}"
            );
        }
    }
    // Unknown keys: in STRICT mode the host refuses them before the call; a legacy Struct
    // reaches the plugin, which names the key and the valid ones.
    let err = p
        .create_module_legacy(
            "eventbus.broker",
            "m",
            "provider: nats\ndeploy_target: self_hosted\nbogus: 1\n",
        )
        .await
        .unwrap_err();
    assert!(
        err.starts_with("eventbus.broker \"m\": config.bogus: unknown field")
            && err.contains("deploy_target"),
        "{err}"
    );
    // Several problems are all reported at once, one per line.
    let err = p
        .create_module("eventbus.stream", "m", "num_replicas: 9\n")
        .await
        .unwrap_err();
    assert_eq!(err.lines().count(), 3, "{err}");
}

#[tokio::test]
async fn step_and_trigger_configs_are_validated_at_create() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    p.create_step(
        "step.eventbus.publish",
        "pub",
        "subject: orders.created\npayload: '{{ toJson .order }}'\n",
    )
    .await
    .unwrap();
    p.create_step(
        "step.eventbus.publish",
        "pub2",
        "subject: '{{ .subject }}'\n",
    )
    .await
    .unwrap();
    let e = p
        .create_step("step.eventbus.publish", "pub3", "subject: 'orders.*'\n")
        .await
        .unwrap_err();
    assert!(
        e.contains("step.eventbus.publish \"pub3\": config.subject:") && e.contains("wildcard"),
        "{e}"
    );
    let e = p
        .create_step(
            "step.eventbus.consume",
            "c",
            "consumer: w\nbatch_size: 5000\n",
        )
        .await
        .unwrap_err();
    assert!(e.contains("config.batch_size: 5000 is out of range"), "{e}");
    let e = p
        .create_step("step.eventbus.ack", "a", "ack_token: 'orders.created'\n")
        .await
        .unwrap_err();
    assert!(
        e.contains("config.ack_token:") && e.contains("$JS.ACK."),
        "{e}"
    );
    let e = p
        .create_step(
            "step.eventbus.ack",
            "a2",
            "action: ACK_ACTION_TERM\nnak_delay: 1s\n",
        )
        .await
        .unwrap_err();
    assert!(e.contains("nak_delay only applies"), "{e}");
    let e = p
        .create_step("step.eventbus.publish", "p4", "subjekt: x\n")
        .await
        .unwrap_err();
    assert!(e.contains("subjekt"), "{e}");

    let e = p
        .create_trigger("pipeline:p", &json!({"stream_name": "S"}))
        .await
        .unwrap_err();
    assert!(
        e.contains("trigger.eventbus.subscribe \"pipeline:p\": config.name: is required"),
        "{e}"
    );
    let e = p
        .create_trigger("pipeline:p", &json!({"name": 3, "stream_name": "S"}))
        .await
        .unwrap_err();
    assert!(
        e.contains("config.name: must be a string, got number"),
        "{e}"
    );
    let e = p
        .create_trigger("pipeline:p", &json!({"name": "w"}))
        .await
        .unwrap_err();
    assert!(e.contains("config.stream_name: is required"), "{e}");
    let e = p
        .create_trigger(
            "pipeline:p",
            &json!({"name": "w", "stream_name": "S", "ack_mode": "later", "ack_policy": "x"}),
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("config.ack_mode:") && e.contains("config.ack_policy: unknown key"),
        "{e}"
    );
    // Aliases and inheritance from a declared consumer module.
    p.create_module(
        "eventbus.consumer",
        "cm",
        "name: settle\nstream_name: BMW\nbroker_ref: bus\n",
    )
    .await
    .unwrap();
    p.create_trigger(
        "pipeline:settle",
        &json!({"consumer": "settle", "workflowType": "pipeline:settle"}),
    )
    .await
    .unwrap();
    p.create_trigger(
        "pipeline:settle2",
        &json!({"consumer": "settle", "bus": "bus", "filter_subject": ""}),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn execute_without_broker_is_a_clear_error_not_a_hang() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    p.module_up("eventbus.broker", "bus", BROKER).await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "subject: orders.created\n")
        .await
        .unwrap();
    let t = Instant::now();
    let e = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: orders.created\npayload: hi\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("no broker url configured") && e.contains("EVENTBUS_BUS_URI"),
        "{e}"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

fn read_first_line(child: &mut std::process::Child) -> String {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(out).read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

#[tokio::test]
async fn tcp_fallback_when_unix_sockets_are_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    let mut child = spawn_raw(
        &bin,
        &[
            ("PLUGIN_UNIX_SOCKET_DIR".into(), "/nonexistent/dir".into()),
            ("PLUGIN_MIN_PORT".into(), "21000".into()),
            ("PLUGIN_MAX_PORT".into(), "21999".into()),
        ],
        true,
    );
    let line = read_first_line(&mut child);
    let parts: Vec<&str> = line.split('|').collect();
    assert_eq!(parts[2], "tcp", "{line}");
    let addr: std::net::SocketAddr = parts[3].parse().unwrap();
    assert!(
        addr.ip().is_loopback() && (21000..=21999).contains(&addr.port()),
        "{addr}"
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let m = eventbus_plugin::pb::plugin::plugin_service_client::PluginServiceClient::new(
        channel.clone(),
    )
    .get_manifest(())
    .await
    .unwrap();
    assert_eq!(m.get_ref().name, "workflow-plugin-eventbus");
    let _ =
        eventbus_plugin::pb::go_plugin::grpc_controller_client::GrpcControllerClient::new(channel)
            .shutdown(eventbus_plugin::pb::go_plugin::Empty {})
            .await;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(3)), Some(0));
}

#[tokio::test]
async fn exits_when_the_host_process_dies() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    // An intermediate "host" that starts the plugin and is then killed.
    let mut host = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!("{:?} & wait", bin.display().to_string()))
        .current_dir(bin.parent().unwrap())
        .env(COOKIE.0, COOKIE.1)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let line = read_first_line(&mut host);
    let socket = std::path::PathBuf::from(line.split('|').nth(3).unwrap());
    assert!(socket.exists());
    host.kill().unwrap();
    host.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while socket.exists() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!socket.exists(), "plugin kept running after its host died");
}

/// The plugin with the cookie at log level `level`, stdout and stderr piped and left to the test.
fn spawn_logging(bin: &std::path::Path, level: &str) -> std::process::Child {
    spawn_retrying(
        std::process::Command::new(bin)
            .current_dir(bin.parent().unwrap())
            .env(COOKIE.0, COOKIE.1)
            .env("RUST_LOG", level)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    )
}

#[tokio::test]
async fn a_closed_stderr_never_crashes_the_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    let mut child = spawn_logging(&bin, "debug");
    drop(child.stderr.take()); // the host stopped reading: every log write now fails (EPIPE)
    let line = read_first_line(&mut child);
    let socket = std::path::PathBuf::from(line.split('|').nth(3).unwrap());
    let channel = dial_unix(&socket).await;
    let mut c = eventbus_plugin::pb::plugin::plugin_service_client::PluginServiceClient::new(
        channel.clone(),
    );
    for i in 0..20 {
        // Degraded brokers log warnings at Init.
        let r = c
            .create_module(eventbus_plugin::pb::plugin::CreateModuleRequest {
                r#type: "eventbus.broker".into(),
                name: format!("b{i}"),
                config: Some(common::typed::json_to_struct(
                    &json!({"provider": "nats", "deploy_target": "self_hosted"}),
                )),
                typed_config: None,
            })
            .await
            .unwrap()
            .into_inner();
        c.init_module(eventbus_plugin::pb::plugin::HandleRequest {
            handle_id: r.handle_id,
        })
        .await
        .unwrap();
    }
    assert!(c.get_manifest(()).await.is_ok(), "still serving");
    let _ =
        eventbus_plugin::pb::go_plugin::grpc_controller_client::GrpcControllerClient::new(channel)
            .shutdown(eventbus_plugin::pb::go_plugin::Empty {})
            .await;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(3)), Some(0));
}

/// Issue 19 finding 11: a host that does not drain stderr, at RUST_LOG=trace. Every log write
/// blocked once the pipe was full, and with it every RPC. Logging never blocks a request now:
/// lines beyond what the queue holds are dropped (and counted).
#[tokio::test]
async fn an_undrained_stderr_at_trace_never_blocks_rpcs() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    let mut child = spawn_logging(&bin, "trace");
    // Kept open and never read: the pipe (64 KiB) fills after a few hundred lines.
    let _stderr = child.stderr.take();
    let line = read_first_line(&mut child);
    let socket = std::path::PathBuf::from(line.split('|').nth(3).unwrap());
    let channel = dial_unix(&socket).await;
    let mut c = eventbus_plugin::pb::plugin::plugin_service_client::PluginServiceClient::new(
        channel.clone(),
    );
    let started = Instant::now();
    for i in 0..300 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            c.create_module(eventbus_plugin::pb::plugin::CreateModuleRequest {
                r#type: "eventbus.broker".into(),
                name: format!("b{i}"),
                config: Some(common::typed::json_to_struct(
                    &json!({"provider": "nats", "deploy_target": "self_hosted"}),
                )),
                typed_config: None,
            }),
        )
        .await
        .unwrap_or_else(|_| panic!("CreateModule {i} blocked (stderr full)"))
        .unwrap()
        .into_inner();
        assert_eq!(r.error, "");
    }
    eprintln!(
        "300 CreateModule with stderr never read: {:?}",
        started.elapsed()
    );
    let mut controller = GrpcControllerClient::new(channel);
    let _ = tokio::time::timeout(Duration::from_secs(5), controller.shutdown(Empty {})).await;
    assert_eq!(wait_exit(&mut child, Duration::from_secs(3)), Some(0));
}

#[tokio::test]
async fn several_brokers_need_broker_ref_and_one_is_the_default() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    p.module_up("eventbus.broker", "a", BROKER).await;
    let h = p
        .create_step("step.eventbus.publish", "pub", "")
        .await
        .unwrap();
    // One broker: used without broker_ref (fails only because it has no url).
    let e = p
        .execute("step.eventbus.publish", &h, "subject: x.y\n", &json!({}))
        .await
        .unwrap_err();
    assert!(e.contains("broker \"a\""), "{e}");
    p.module_up("eventbus.broker", "b", BROKER).await;
    let e = p
        .execute("step.eventbus.publish", &h, "subject: x.y\n", &json!({}))
        .await
        .unwrap_err();
    assert!(
        e.contains("several brokers are declared ([a, b]); set broker_ref"),
        "{e}"
    );
    let e = p
        .execute(
            "step.eventbus.publish",
            &h,
            "subject: x.y\nbroker_ref: c\n",
            &json!({}),
        )
        .await
        .unwrap_err();
    assert!(
        e.contains("broker_ref \"c\" names no declared eventbus.broker module (declared: [a, b])"),
        "{e}"
    );
}

/// ExecuteStepRequest carries every prior step's output: far above grpc's 4 MiB default.
#[tokio::test]
async fn large_execute_requests_are_accepted() {
    let p = Plugin::launch(LaunchOptions::default()).await;
    let h = p.create_step("step.eventbus.ack", "ack", "").await.unwrap();
    let big = "x".repeat(12 * 1024 * 1024);
    let mut outputs = std::collections::HashMap::new();
    outputs.insert(
        "earlier".to_string(),
        common::typed::json_to_struct(&json!({"blob": big})),
    );
    let r = p
        .client
        .clone()
        .execute_step(eventbus_plugin::pb::plugin::ExecuteStepRequest {
            handle_id: h,
            step_outputs: outputs,
            typed_input: Some(
                p.codec
                    .typed_input(
                        "workflow.plugin.eventbus.v1.AckRequest",
                        &json!({"ack_token": "nope"}),
                    )
                    .unwrap(),
            ),
            ..Default::default()
        })
        .await
        .expect("a 12 MiB request is not refused by the transport")
        .into_inner();
    assert!(r.error.contains("not a JetStream ack token"), "{}", r.error);
}

#[tokio::test]
async fn malformed_worker_thread_env_exits_1_with_a_message_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let bin = install(dir.path());
    let out = spawn_raw(
        &bin,
        &[("TOKIO_WORKER_THREADS".into(), "lots".into())],
        true,
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TOKIO_WORKER_THREADS") && !err.contains("panicked"),
        "{err}"
    );
}
