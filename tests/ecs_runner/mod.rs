//! What the `aws.ecs` tests run against: moto's server on loopback for every AWS API, and a
//! local task runner standing in for ECS's scheduler and Fargate. The runner reads the
//! services and task definitions back from moto and, for every active service with a desired
//! count of 1, starts its container's entry point and command with the task definition's
//! environment and secrets (read from moto's Secrets Manager) and the real nats-server
//! (`NATS_SERVER_BIN`, on PATH as `nats-server`). Each node gets a loopback address of its own
//! (its "network interface": `0.0.0.0` in the task's config and its Cloud Map name
//! `nats-<i>.<namespace>` become that address) and a fresh working directory per task (the
//! volume ECS creates with each task). Like a service with maximum 100 % / minimum 0 %, it stops
//! a node's old task before starting its replacement, and replaces a task whose process died.
//! It reports a task to moto (RunTask, StopTask) once its healthz answers, so the provider's
//! waits see what ECS would show. A TCP proxy on 127.0.0.1 stands in for the load balancer.

#![allow(dead_code)]

use aws_sdk_ecs::types::{AwsVpcConfiguration, LaunchType, NetworkConfiguration};
use eventbus_plugin::iac::targets::ecs::aws::Aws;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const REGION: &str = "us-east-1";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `MOTO_SERVER`, else `moto_server` on PATH or beside python3's scripts.
fn moto_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MOTO_SERVER").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Ok(o) = Command::new("python3")
        .args([
            "-c",
            "import sysconfig; print(sysconfig.get_path('scripts'))",
        ])
        .output()
    {
        dirs.insert(0, PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    }
    dirs.into_iter()
        .map(|d| d.join("moto_server"))
        .find(|p| p.is_file())
}

/// The AWS environment of every process talking to moto (the plugin and this test).
pub fn aws_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_REGION", REGION),
        ("AWS_EC2_METADATA_DISABLED", "true"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// moto's server on a free loopback port; stopped when dropped.
pub struct Moto {
    child: Child,
    pub url: String,
    _log: tempfile::TempDir,
}

impl Moto {
    /// `None` (the test says "skipped") when moto is not installed, except under `CI=true`.
    pub fn start() -> Option<Moto> {
        let Some(bin) = moto_bin() else {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "moto_server is not installed (make deps: pip install 'moto[server]')"
            );
            eprintln!("skipped: moto_server is not installed (pip install 'moto[server]')");
            return None;
        };
        let log = tempfile::tempdir().unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::from(
                std::fs::File::create(log.path().join("moto.log")).unwrap(),
            ))
            .stderr(Stdio::from(
                std::fs::File::create(log.path().join("moto.err")).unwrap(),
            ))
            .spawn()
            .expect("start moto_server");
        let m = Moto {
            child,
            url: format!("http://127.0.0.1:{port}"),
            _log: log,
        };
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "moto_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Tasks stay RUNNING until stopped (by default moto advances a task's state on every
        // read, as if each read took a lifecycle step).
        let body = r#"{"model_name": "ecs::task", "transition": {"progression": "manual", "times": 1000000}}"#;
        let req = format!(
            "POST /moto-api/state-manager/set-transition HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(req.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = c.read_to_string(&mut answer);
        assert!(
            answer.starts_with("HTTP/1.1 201")
                || answer.starts_with("HTTP/1.1 200")
                || answer.starts_with("HTTP/1.0 20"),
            "{answer}"
        );
        Some(m)
    }

    pub async fn aws(&self) -> Aws {
        for (k, v) in aws_env() {
            // Same values from every test thread.
            std::env::set_var(k, v);
        }
        Aws::connect(Some(REGION), Some(&self.url)).await.unwrap()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A VPC with two subnets in moto; (vpc, subnets).
pub async fn network(aws: &Aws) -> (String, Vec<String>) {
    use eventbus_plugin::iac::targets::ecs::ec2::tag;
    let p = |k: &str, v: &str| (k.to_string(), v.to_string());
    let vpc = aws
        .ec2
        .call("CreateVpc", &[p("CidrBlock", "10.0.0.0/16")])
        .await
        .unwrap();
    let vpc = tag(&vpc, "vpcId").unwrap();
    // Cloud Map private DNS needs DNS host names in the VPC (and moto's task interfaces too).
    aws.ec2
        .call(
            "ModifyVpcAttribute",
            &[p("VpcId", &vpc), p("EnableDnsHostnames.Value", "true")],
        )
        .await
        .unwrap();
    let mut subnets = Vec::new();
    for (i, az) in ["a", "b"].iter().enumerate() {
        let s = aws
            .ec2
            .call(
                "CreateSubnet",
                &[
                    p("VpcId", &vpc),
                    p("CidrBlock", &format!("10.0.{i}.0/24")),
                    p("AvailabilityZone", &format!("{REGION}{az}")),
                ],
            )
            .await
            .unwrap();
        subnets.push(tag(&s, "subnetId").unwrap());
    }
    (vpc, subnets)
}

/// One running task.
struct Task {
    service: String,
    node: u32,
    task_definition: String,
    task_arn: Option<String>,
    child: Child,
    dir: tempfile::TempDir,
    started: Instant,
}

#[derive(Default)]
struct Shared {
    tasks: BTreeMap<String, Task>,
    /// (service, task definition, time) of every start, in order.
    starts: Vec<(String, String, Instant)>,
    stops: Vec<(String, Instant)>,
    /// Addresses the load balancer forwards to.
    healthy: BTreeMap<String, Ipv4Addr>,
    errors: Vec<String>,
}

pub struct Runner {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    loop_task: Option<tokio::task::JoinHandle<()>>,
    lb_task: tokio::task::JoinHandle<()>,
    pub lb_port: u16,
    /// The second octet of every node address (127.<net>.<ns>.<10+i>).
    net: u8,
    _bin: tempfile::TempDir,
}

/// The node address of Cloud Map name `nats-<i>.<namespace>` (namespace index `k`).
fn node_ip(net: u8, k: u8, i: u32) -> Ipv4Addr {
    Ipv4Addr::new(127, net, k, 10 + i as u8)
}

async fn healthy(ip: Ipv4Addr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(Ok(mut s)) = tokio::time::timeout(
        Duration::from_millis(500),
        tokio::net::TcpStream::connect((ip, 8222)),
    )
    .await
    else {
        return false;
    };
    let req = format!("GET /healthz?js-enabled-only=true HTTP/1.0\r\nHost: {ip}\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(1), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).starts_with("HTTP/1.1 200")
        || String::from_utf8_lossy(&buf).starts_with("HTTP/1.0 200")
}

impl Runner {
    pub async fn start(aws: Aws) -> Runner {
        let nats = std::env::var("NATS_SERVER_BIN").unwrap_or_else(|_| "nats-server".into());
        let nats = which(&nats)
            .unwrap_or_else(|| panic!("nats-server not found ({nats}); set NATS_SERVER_BIN"));
        let bin = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(&nats, bin.path().join("nats-server")).unwrap();
        let shared = Arc::new(Mutex::new(Shared::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let net = 100 + (std::process::id() % 100) as u8;
        // The load balancer.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let lb_port = listener.local_addr().unwrap().port();
        let lb_shared = shared.clone();
        let lb_task = tokio::spawn(async move {
            let mut turn = 0usize;
            while let Ok((mut inbound, _)) = listener.accept().await {
                let targets: Vec<Ipv4Addr> = lb_shared
                    .lock()
                    .unwrap()
                    .healthy
                    .values()
                    .copied()
                    .collect();
                if targets.is_empty() {
                    continue;
                }
                turn += 1;
                let ip = targets[turn % targets.len()];
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect((ip, 4222)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        let path = format!(
            "{}:{}",
            bin.path().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let (s2, st2) = (shared.clone(), stop.clone());
        let loop_task = tokio::spawn(async move {
            let mut namespaces: BTreeMap<String, (String, u8)> = BTreeMap::new();
            while !st2.load(Ordering::SeqCst) {
                if let Err(e) = tick(&aws, &s2, &mut namespaces, net, &path).await {
                    s2.lock().unwrap().errors.push(e);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let tasks = std::mem::take(&mut s2.lock().unwrap().tasks);
            for (_, mut t) in tasks {
                let _ = t.child.kill();
                let _ = t.child.wait();
            }
        });
        Runner {
            shared,
            stop,
            loop_task: Some(loop_task),
            lb_task,
            lb_port,
            net,
            _bin: bin,
        }
    }

    pub fn lb_url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.lb_port)
    }

    /// The client url of a running node's task (by service name).
    pub fn node_url(&self, service: &str) -> Option<String> {
        self.shared
            .lock()
            .unwrap()
            .healthy
            .get(service)
            .map(|ip| format!("nats://{ip}:4222"))
    }

    /// How many messages of `stream` a node's own store holds (its monitoring port's
    /// `/jsz?streams=true`, which answers from the node, not from the stream's leader).
    pub async fn local_messages(&self, service: &str, stream: &str) -> Option<u64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ip = *self.shared.lock().unwrap().healthy.get(service)?;
        let mut s = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((ip, 8222)),
        )
        .await
        .ok()?
        .ok()?;
        let req = format!("GET /jsz?streams=true HTTP/1.0\r\nHost: {ip}\r\n\r\n");
        s.write_all(req.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
            .await
            .ok()?
            .ok()?;
        let text = String::from_utf8_lossy(&buf);
        let body = text.split_once("\r\n\r\n")?.1;
        let j: serde_json::Value = serde_json::from_str(body).ok()?;
        j["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|d| d["name"] == stream)
            .and_then(|d| d["state"]["messages"].as_u64())
    }

    /// Services with a running task.
    pub fn running(&self) -> Vec<String> {
        self.shared.lock().unwrap().tasks.keys().cloned().collect()
    }

    /// (service, task definition, when) of every task start so far.
    pub fn starts(&self) -> Vec<(String, String, Instant)> {
        self.shared.lock().unwrap().starts.clone()
    }

    pub fn errors(&self) -> Vec<String> {
        self.shared.lock().unwrap().errors.clone()
    }

    /// Kills a node's process (a crashed task); the runner replaces it.
    pub fn kill(&self, service: &str) {
        if let Some(t) = self.shared.lock().unwrap().tasks.get_mut(service) {
            let _ = t.child.kill();
        }
    }

    /// The log of every running task.
    pub fn logs(&self) -> String {
        let g = self.shared.lock().unwrap();
        g.tasks
            .iter()
            .map(|(s, t)| {
                format!(
                    "--- {s}\n{}",
                    std::fs::read_to_string(t.dir.path().join("task.log")).unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits (bounded) until `n` tasks are healthy.
    pub async fn wait_healthy(&self, n: usize, within: Duration) {
        let start = Instant::now();
        while self.shared.lock().unwrap().healthy.len() < n {
            assert!(
                start.elapsed() < within,
                "{} of {n} tasks healthy after {within:?}\n{}",
                self.shared.lock().unwrap().healthy.len(),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.loop_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
        }
        self.lb_task.abort();
    }
}

impl Drop for Runner {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.lb_task.abort();
        if let Ok(mut g) = self.shared.lock() {
            for (_, t) in g.tasks.iter_mut() {
                let _ = t.child.kill();
                let _ = t.child.wait();
            }
        }
    }
}

fn which(bin: &str) -> Option<PathBuf> {
    let p = Path::new(bin);
    if p.is_absolute() {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::var_os("PATH")
        .map(|ps| std::env::split_paths(&ps).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn stop_task(t: &mut Task) {
    // SAFETY: kill(2) on our own child: SIGTERM first, as ECS stops a task.
    unsafe { libc::kill(t.child.id() as i32, libc::SIGTERM) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(Some(_)) = t.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = t.child.kill();
    let _ = t.child.wait();
}

/// One pass of the scheduler.
async fn tick(
    aws: &Aws,
    shared: &Arc<Mutex<Shared>>,
    namespaces: &mut BTreeMap<String, (String, u8)>,
    net: u8,
    path: &str,
) -> Result<(), String> {
    let e = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let clusters = aws.ecs.list_clusters().send().await.map_err(|x| e(&x))?;
    // service name -> (cluster, task definition, registry arn, network config)
    let mut wanted: BTreeMap<
        String,
        (String, String, String, Option<NetworkConfiguration>, String),
    > = BTreeMap::new();
    for c in clusters.cluster_arns() {
        let list = aws
            .ecs
            .list_services()
            .cluster(c)
            .send()
            .await
            .map_err(|x| e(&x))?;
        if list.service_arns().is_empty() {
            continue;
        }
        for chunk in list.service_arns().chunks(10) {
            let d = aws
                .ecs
                .describe_services()
                .cluster(c)
                .set_services(Some(chunk.to_vec()))
                .send()
                .await
                .map_err(|x| e(&x))?;
            for s in d.services() {
                if s.status() != Some("ACTIVE") || s.desired_count() < 1 {
                    continue;
                }
                let reg = s
                    .service_registries()
                    .first()
                    .and_then(|r| r.registry_arn())
                    .unwrap_or_default()
                    .to_string();
                wanted.insert(
                    s.service_name().unwrap_or_default().to_string(),
                    (
                        c.clone(),
                        s.task_definition().unwrap_or_default().to_string(),
                        reg,
                        s.network_configuration().cloned(),
                        s.deployments()
                            .iter()
                            .find(|d| d.status() == Some("PRIMARY"))
                            .and_then(|d| d.id())
                            .unwrap_or_default()
                            .to_string(),
                    ),
                );
            }
        }
    }
    // Stop tasks whose service is gone, whose definition changed, or whose process died.
    let mut stopping = Vec::new();
    {
        let mut g = shared.lock().unwrap();
        let names: Vec<String> = g.tasks.keys().cloned().collect();
        for n in names {
            let t = g.tasks.get_mut(&n).unwrap();
            let dead = matches!(t.child.try_wait(), Ok(Some(_)));
            let changed = wanted
                .get(&n)
                .map(|w| w.1 != t.task_definition)
                .unwrap_or(true);
            if dead || changed {
                let t = g.tasks.remove(&n).unwrap();
                g.healthy.remove(&n);
                g.stops.push((n.clone(), Instant::now()));
                stopping.push(t);
            }
        }
    }
    for mut t in stopping {
        stop_task(&mut t);
        if let (Some(arn), Some(w)) = (&t.task_arn, wanted.get(&t.service)) {
            let _ = aws
                .ecs
                .stop_task()
                .cluster(&w.0)
                .task(arn)
                .reason("replaced")
                .send()
                .await;
        } else if let Some(arn) = &t.task_arn {
            // The service is gone; its cluster is in the task's ARN path.
            let cluster = arn.split('/').nth(1).unwrap_or("default").to_string();
            let _ = aws
                .ecs
                .stop_task()
                .cluster(cluster)
                .task(arn)
                .reason("service deleted")
                .send()
                .await;
        }
    }
    // Start what is missing.
    for (svc, (cluster, td, reg, netconf, _)) in &wanted {
        if shared.lock().unwrap().tasks.contains_key(svc) {
            continue;
        }
        let (ns, node) = namespace_of(aws, namespaces, reg).await?;
        let k = namespaces.get(reg).map(|x| x.1).unwrap_or(0);
        let def = aws
            .ecs
            .describe_task_definition()
            .task_definition(td)
            .send()
            .await
            .map_err(|x| e(&x))?;
        let Some(c) = def
            .task_definition()
            .and_then(|d| d.container_definitions().first())
        else {
            return Err(format!("{td} has no container"));
        };
        let ip = node_ip(net, k, node);
        let netmap = |text: &str| -> String {
            let mut t = text.replace("0.0.0.0", &ip.to_string());
            for i in 0..9 {
                t = t.replace(&format!("nats-{i}.{ns}"), &node_ip(net, k, i).to_string());
            }
            t
        };
        let dir = tempfile::tempdir().map_err(|x| e(&x))?;
        let mut cmd_line: Vec<String> = c.entry_point().to_vec();
        cmd_line.extend(c.command().iter().cloned());
        let mut cmd = Command::new(&cmd_line[0]);
        cmd.args(&cmd_line[1..]);
        cmd.env_clear().env("PATH", path).env("HOME", dir.path());
        for kv in c.environment() {
            cmd.env(
                kv.name().unwrap_or_default(),
                netmap(kv.value().unwrap_or_default()),
            );
        }
        for s in c.secrets() {
            cmd.env(s.name(), netmap(&secret_value(aws, s.value_from()).await?));
        }
        // The working directory is the volume's mount point: this task's own directory.
        cmd.current_dir(dir.path());
        let log = std::fs::File::create(dir.path().join("task.log")).map_err(|x| e(&x))?;
        cmd.stdout(Stdio::from(log.try_clone().map_err(|x| e(&x))?))
            .stderr(Stdio::from(log));
        let child = cmd.spawn().map_err(|x| e(&x))?;
        let mut g = shared.lock().unwrap();
        g.starts.push((svc.clone(), td.clone(), Instant::now()));
        g.tasks.insert(
            svc.clone(),
            Task {
                service: svc.clone(),
                node,
                task_definition: td.clone(),
                task_arn: None,
                child,
                dir,
                started: Instant::now(),
            },
        );
        drop(g);
        let _ = (cluster, netconf);
    }
    // Report tasks whose healthz answers.
    let pending: Vec<(String, u32, String)> = {
        let g = shared.lock().unwrap();
        g.tasks
            .values()
            .filter(|t| t.task_arn.is_none())
            .map(|t| (t.service.clone(), t.node, t.task_definition.clone()))
            .collect()
    };
    for (svc, node, td) in pending {
        let Some((cluster, _, reg, netconf, deployment)) = wanted.get(&svc) else {
            continue;
        };
        let k = namespaces.get(reg).map(|x| x.1).unwrap_or(0);
        let ip = node_ip(net, k, node);
        if !healthy(ip).await {
            continue;
        }
        let vpc = netconf.clone().unwrap_or_else(|| {
            NetworkConfiguration::builder()
                .awsvpc_configuration(
                    AwsVpcConfiguration::builder()
                        .subnets("subnet-0")
                        .build()
                        .unwrap(),
                )
                .build()
        });
        let family = td
            .rsplit('/')
            .next()
            .and_then(|f| f.rsplit_once(':'))
            .map(|x| x.0.to_string())
            .unwrap_or_default();
        let listed = |aws: &Aws| {
            let req = aws
                .ecs
                .list_tasks()
                .cluster(cluster)
                .family(&family)
                .desired_status(aws_sdk_ecs::types::DesiredStatus::Running);
            async move { req.send().await.map(|o| o.task_arns().to_vec()) }
        };
        let before = listed(aws).await.map_err(|x| e(&x))?;
        // moto answers RunTask with a container `cpu` number where the API has a string, which
        // the SDK refuses to parse; the task is made all the same, and ListTasks finds it.
        let _ = aws
            .ecs
            .run_task()
            .cluster(cluster)
            .task_definition(&td)
            .launch_type(LaunchType::Fargate)
            .network_configuration(vpc)
            .group(format!("service:{svc}"))
            .started_by(deployment)
            .send()
            .await;
        let after = listed(aws).await.map_err(|x| e(&x))?;
        let Some(arn) = after.into_iter().find(|a| !before.contains(a)) else {
            return Err(format!("RunTask for {svc} made no task"));
        };
        let mut g = shared.lock().unwrap();
        if let Some(t) = g.tasks.get_mut(&svc) {
            t.task_arn = Some(arn);
        }
        g.healthy.insert(svc.clone(), ip);
    }
    Ok(())
}

/// The Cloud Map namespace name behind a service registry, and the node index of its service
/// (`nats-<i>`); each namespace gets an index of its own for its addresses.
async fn namespace_of(
    aws: &Aws,
    cache: &mut BTreeMap<String, (String, u8)>,
    registry_arn: &str,
) -> Result<(String, u32), String> {
    let id = registry_arn.rsplit('/').next().unwrap_or_default();
    let svc = aws
        .discovery
        .get_service()
        .id(id)
        .send()
        .await
        .map_err(|x| format!("{x:?}"))?;
    let s = svc.service().ok_or("no service")?;
    let name = s.name().unwrap_or_default().to_string();
    let node: u32 = name
        .trim_start_matches("nats-")
        .parse()
        .map_err(|_| format!("unexpected Cloud Map service {name}"))?;
    if let Some((ns, _)) = cache.get(registry_arn) {
        return Ok((ns.clone(), node));
    }
    let ns_id = s.namespace_id().unwrap_or_default();
    let ns = aws
        .discovery
        .get_namespace()
        .id(ns_id)
        .send()
        .await
        .map_err(|x| format!("{x:?}"))?
        .namespace()
        .and_then(|n| n.name())
        .unwrap_or_default()
        .to_string();
    // Every namespace of this test process (runners of parallel tests included) gets
    // addresses of its own.
    static NEXT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let k = match cache.values().find(|v| v.0 == ns) {
        Some(v) => v.1,
        None => NEXT.fetch_add(1, Ordering::SeqCst),
    };
    cache.insert(registry_arn.to_string(), (ns.clone(), k));
    Ok((ns, node))
}

/// A task definition's `valueFrom` (`<secret arn>:<json key>::`) resolved against moto.
async fn secret_value(aws: &Aws, value_from: &str) -> Result<String, String> {
    let parts: Vec<&str> = value_from.split(':').collect();
    if parts.len() < 7 {
        return Err(format!(
            "valueFrom {value_from} is not a Secrets Manager ARN"
        ));
    }
    let arn = parts[..7].join(":");
    let key = parts.get(7).copied().unwrap_or("");
    let v = aws
        .secrets
        .get_secret_value()
        .secret_id(&arn)
        .send()
        .await
        .map_err(|x| format!("{x:?}"))?;
    let text = v.secret_string().unwrap_or_default();
    if key.is_empty() {
        return Ok(text.to_string());
    }
    let j: serde_json::Value = serde_json::from_str(text).map_err(|x| x.to_string())?;
    j.get(key)
        .and_then(|x| x.as_str())
        .map(str::to_string)
        .ok_or_else(|| format!("secret {arn} has no key {key}"))
}
