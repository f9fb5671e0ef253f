//! Playing wfctl against the plugin's IaC face: every command launches a fresh plugin process
//! from the install layout, runs the host's probe sequence (GetManifest, GetTriggerTypes,
//! GetContractRegistry, GetConfigFragment, Initialize, Capabilities; iac-protocol §1.4), then
//! drives the ResourceDriver with the host's plan/apply algorithm over an in-memory copy of
//! wfctl's state (§4). It is written from the protocol description, not from the plugin's code.

use super::{dial_unix, install, wait_exit};
use eventbus_plugin::pb::go_plugin::{
    grpc_broker_client::GrpcBrokerClient, grpc_controller_client::GrpcControllerClient, ConnInfo,
    Empty,
};
use eventbus_plugin::pb::iac::{
    ia_c_provider_drift_detector_client::IaCProviderDriftDetectorClient,
    ia_c_provider_enumerator_client::IaCProviderEnumeratorClient,
    ia_c_provider_required_client::IaCProviderRequiredClient,
    ia_c_provider_validator_client::IaCProviderValidatorClient,
    resource_driver_client::ResourceDriverClient, CapabilitiesRequest, DestroyRequest,
    DestroyResult, DetectDriftRequest, DriftClass, DriftResult, FieldChange, InitializeRequest,
    ResourceCreateRequest, ResourceDeleteRequest, ResourceDiffRequest, ResourceOutput, ResourceRef,
    ResourceSpec, ResourceUpdateRequest,
};
use eventbus_plugin::pb::plugin::{plugin_service_client::PluginServiceClient, ContractKind};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

pub const REQUIRED: &str = "workflow.plugin.external.iac.IaCProviderRequired";
pub const DRIVER: &str = "workflow.plugin.external.iac.ResourceDriver";
pub const NOT_FOUND: &str = "iac: resource not found";

/// One plugin process loaded the way wfctl loads an IaC provider.
/// The plugin process; stopped like the host stops it (SIGTERM, then SIGKILL) when dropped.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            wait_exit(&mut self.0, Duration::from_secs(3));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Loaded {
    pub proc: Proc,
    pub channel: Channel,
    pub stderr: Arc<Mutex<String>>,
    pub services: Vec<String>,
    pub required: IaCProviderRequiredClient<Channel>,
    pub driver: ResourceDriverClient<Channel>,
    pub drift: IaCProviderDriftDetectorClient<Channel>,
    pub validator: IaCProviderValidatorClient<Channel>,
    pub enumerator: IaCProviderEnumeratorClient<Channel>,
    pub probes: Vec<&'static str>,
    _dir: tempfile::TempDir,
}

impl Loaded {
    /// wfctl's load: spawn, handshake, broker stream, probes, Initialize, Capabilities gate.
    pub async fn load(config: &Json, env: &[(String, String)]) -> Result<Loaded, String> {
        let dir = tempfile::tempdir().unwrap();
        let bin = install(dir.path());
        let mut proc = Proc(super::spawn_raw(&bin, env, true));
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = proc.0.stderr.take() {
            let b = stderr.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = err.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
        }
        let out = proc.0.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            let mut rest = String::new();
            let _ = r.read_to_string(&mut rest);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .map_err(|_| "no handshake".to_string())?;
        let parts: Vec<&str> = line.trim_end().split('|').collect();
        if parts.len() < 5 || parts[2] != "unix" {
            return Err(format!("bad handshake {line:?}"));
        }
        let channel = dial_unix(Path::new(parts[3])).await;
        // go-plugin always opens the broker stream on connect.
        let (_btx, brx) = tokio::sync::mpsc::unbounded_channel::<ConnInfo>();
        let mut broker = GrpcBrokerClient::new(channel.clone());
        tokio::spawn(async move {
            let _keep = _btx;
            if let Ok(resp) = broker
                .start_stream(tokio_stream::wrappers::UnboundedReceiverStream::new(brx))
                .await
            {
                let mut s = resp.into_inner();
                while let Ok(Some(_)) = s.message().await {}
            }
        });
        let mut ps = PluginServiceClient::new(channel.clone());
        let mut probes = Vec::new();
        ps.get_manifest(())
            .await
            .map_err(|e| format!("GetManifest: {e}"))?;
        probes.push("GetManifest");
        match ps.get_trigger_types(()).await {
            Ok(_) => {}
            Err(e) if e.code() == tonic::Code::Unimplemented => {}
            Err(e) => return Err(format!("GetTriggerTypes: {e}")),
        }
        probes.push("GetTriggerTypes");
        let reg = ps
            .get_contract_registry(())
            .await
            .map_err(|e| format!("GetContractRegistry: {e}"))?
            .into_inner();
        probes.push("GetContractRegistry");
        let services: Vec<String> = reg
            .contracts
            .iter()
            .filter(|c| c.kind == ContractKind::Service as i32)
            .map(|c| c.service_name.clone())
            .collect();
        for must in [REQUIRED, DRIVER] {
            if !services.iter().any(|s| s == must) {
                return Err(format!(
                    "plugin does not register the required service {must}"
                ));
            }
        }
        let _ = ps.get_config_fragment(()).await;
        probes.push("GetConfigFragment");
        let mut required = IaCProviderRequiredClient::new(channel.clone());
        let config_json = if config.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(config).unwrap()
        };
        required
            .initialize(InitializeRequest { config_json })
            .await
            .map_err(|e| format!("initialize provider \"eventbus\": {}", e.message()))?;
        probes.push("Initialize");
        let caps = tokio::time::timeout(
            Duration::from_secs(10),
            required.capabilities(CapabilitiesRequest {}),
        )
        .await
        .map_err(|_| "Capabilities timed out".to_string())?
        .map_err(|e| format!("Capabilities: {e}"))?
        .into_inner();
        if caps.compute_plan_version != "v2" {
            return Err(format!(
                "compute_plan_version {:?} is not v2",
                caps.compute_plan_version
            ));
        }
        probes.push("Capabilities");
        Ok(Loaded {
            proc,
            driver: ResourceDriverClient::new(channel.clone()),
            drift: IaCProviderDriftDetectorClient::new(channel.clone()),
            validator: IaCProviderValidatorClient::new(channel.clone()),
            enumerator: IaCProviderEnumeratorClient::new(channel.clone()),
            required,
            channel,
            stderr,
            services,
            probes,
            _dir: dir,
        })
    }

    /// GRPCController.Shutdown and wait (wfctl ends each command this way).
    pub async fn close(mut self) {
        let _ = GrpcControllerClient::new(self.channel.clone())
            .shutdown(Empty {})
            .await;
        wait_exit(&mut self.proc.0, Duration::from_secs(5));
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

/// A resource module of the infra YAML.
#[derive(Clone, Debug)]
pub struct Res {
    pub name: String,
    pub type_name: String,
    pub config: Json,
}

impl Res {
    pub fn new(name: &str, type_name: &str, config: Json) -> Res {
        Res {
            name: name.into(),
            type_name: type_name.into(),
            config,
        }
    }

    pub fn spec(&self) -> ResourceSpec {
        ResourceSpec {
            name: self.name.clone(),
            r#type: self.type_name.clone(),
            config_json: serde_json::to_vec(&self.config).unwrap(),
            depends_on: self.depends_on(),
            ..Default::default()
        }
    }

    fn depends_on(&self) -> Vec<String> {
        self.config
            .get("depends_on")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One record of wfctl's state.
#[derive(Clone, Debug)]
pub struct Record {
    pub type_name: String,
    pub provider_id: String,
    pub outputs: Json,
    pub dependencies: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Action {
    pub action: String,
    pub name: String,
    pub type_name: String,
    pub changes: Vec<FieldChange>,
}

impl Action {
    pub fn forced(&self) -> Vec<String> {
        self.changes
            .iter()
            .filter(|c| c.force_new)
            .map(|c| c.path.clone())
            .collect()
    }
    pub fn paths(&self) -> Vec<String> {
        self.changes.iter().map(|c| c.path.clone()).collect()
    }
}

/// wfctl's side: the provider module config, its own state, and the commands.
pub struct Wfctl {
    pub provider_config: Json,
    pub env: Vec<(String, String)>,
    pub state: BTreeMap<String, Record>,
    /// The stderr of every plugin process this wfctl started (wfctl forwards it to its log).
    stderrs: Mutex<Vec<Arc<Mutex<String>>>>,
}

impl Wfctl {
    pub fn new(state_dir: &Path) -> Wfctl {
        Wfctl {
            provider_config: serde_json::json!({"provider": "eventbus", "state_dir": state_dir}),
            env: Vec::new(),
            state: BTreeMap::new(),
            stderrs: Mutex::new(Vec::new()),
        }
    }

    pub async fn load(&self) -> Loaded {
        match Loaded::load(&self.provider_config, &self.env).await {
            Ok(l) => {
                self.stderrs.lock().unwrap().push(l.stderr.clone());
                l
            }
            Err(e) => panic!("load: {e}"),
        }
    }

    /// What the plugin processes of this wfctl wrote to stderr so far.
    pub fn logs(&self) -> String {
        self.stderrs
            .lock()
            .unwrap()
            .iter()
            .map(|s| s.lock().unwrap().clone())
            .collect()
    }

    fn current(&self, name: &str) -> Option<ResourceOutput> {
        self.state.get(name).map(|r| ResourceOutput {
            name: name.into(),
            r#type: r.type_name.clone(),
            provider_id: r.provider_id.clone(),
            outputs_json: serde_json::to_vec(&r.outputs).unwrap(),
            ..Default::default()
        })
    }

    pub fn r#ref(&self, name: &str) -> ResourceRef {
        let r = &self.state[name];
        ResourceRef {
            name: name.into(),
            r#type: r.type_name.clone(),
            provider_id: r.provider_id.clone(),
        }
    }

    /// The host's ComputePlan with the plugin's Diff.
    pub async fn plan_with(&self, l: &mut Loaded, desired: &[Res]) -> Result<Vec<Action>, String> {
        let mut forward = Vec::new();
        for r in desired {
            match self.current(&r.name) {
                None => forward.push(Action {
                    action: "create".into(),
                    name: r.name.clone(),
                    type_name: r.type_name.clone(),
                    changes: Vec::new(),
                }),
                Some(cur) => {
                    let res = l
                        .driver
                        .diff(ResourceDiffRequest {
                            resource_type: r.type_name.clone(),
                            desired: Some(r.spec()),
                            current: Some(cur),
                        })
                        .await
                        .map_err(|e| format!("diff {}: {}", r.name, e.message()))?
                        .into_inner()
                        .result;
                    let Some(d) = res else { continue };
                    let replace = d.needs_replace || d.changes.iter().any(|c| c.force_new);
                    let kind = if replace {
                        "replace"
                    } else if d.needs_update {
                        "update"
                    } else {
                        continue;
                    };
                    forward.push(Action {
                        action: kind.into(),
                        name: r.name.clone(),
                        type_name: r.type_name.clone(),
                        changes: d.changes,
                    });
                }
            }
        }
        let deps: BTreeMap<String, Vec<String>> = desired
            .iter()
            .map(|r| (r.name.clone(), r.depends_on()))
            .chain(
                self.state
                    .iter()
                    .map(|(n, r)| (n.clone(), r.dependencies.clone())),
            )
            .collect();
        let mut ordered = order(forward, &deps);
        let deletes: Vec<Action> = self
            .state
            .iter()
            .filter(|(n, _)| !desired.iter().any(|r| &r.name == *n))
            .map(|(n, r)| Action {
                action: "delete".into(),
                name: n.clone(),
                type_name: r.type_name.clone(),
                changes: Vec::new(),
            })
            .collect();
        let mut deletes = order(deletes, &deps);
        deletes.reverse();
        ordered.extend(deletes);
        Ok(ordered)
    }

    pub async fn plan(&self, desired: &[Res]) -> Vec<Action> {
        let mut l = self.load().await;
        let p = self.plan_with(&mut l, desired).await;
        l.close().await;
        p.unwrap_or_else(|e| panic!("plan: {e}"))
    }

    /// Plan then apply, sequentially, checking every host rule on outputs. Returns the plan
    /// and the per-action errors.
    pub async fn apply(&mut self, desired: &[Res]) -> (Vec<Action>, Vec<String>) {
        let mut l = self.load().await;
        let plan = self
            .plan_with(&mut l, desired)
            .await
            .unwrap_or_else(|e| panic!("plan: {e}"));
        let by_name: BTreeMap<&str, &Res> = desired.iter().map(|r| (r.name.as_str(), r)).collect();
        let mut errors = Vec::new();
        for a in &plan {
            let res = match a.action.as_str() {
                "create" => self.create(&mut l, by_name[a.name.as_str()]).await,
                "update" => {
                    let r = by_name[a.name.as_str()];
                    let out = l
                        .driver
                        .update(ResourceUpdateRequest {
                            resource_type: r.type_name.clone(),
                            r#ref: Some(self.r#ref(&r.name)),
                            spec: Some(r.spec()),
                        })
                        .await
                        .map(|x| x.into_inner().output);
                    match out {
                        Ok(o) => self.persist(r, o),
                        Err(e) => Err(e.message().to_string()),
                    }
                }
                "replace" => {
                    let rf = self.r#ref(&a.name);
                    match l
                        .driver
                        .delete(ResourceDeleteRequest {
                            resource_type: rf.r#type.clone(),
                            r#ref: Some(rf),
                        })
                        .await
                    {
                        Ok(_) => {
                            self.state.remove(&a.name);
                            self.create(&mut l, by_name[a.name.as_str()])
                                .await
                                .map_err(|e| format!("replace: create: {e}"))
                        }
                        Err(e) => Err(format!("replace: delete: {}", e.message())),
                    }
                }
                "delete" => {
                    let rf = self.r#ref(&a.name);
                    match l
                        .driver
                        .delete(ResourceDeleteRequest {
                            resource_type: rf.r#type.clone(),
                            r#ref: Some(rf),
                        })
                        .await
                    {
                        Ok(_) => {
                            self.state.remove(&a.name);
                            Ok(())
                        }
                        Err(e) => Err(e.message().to_string()),
                    }
                }
                other => Err(format!("unknown action {other}")),
            };
            if let Err(e) = res {
                errors.push(format!("{}/{}: {e}", a.action, a.name));
            }
        }
        l.close().await;
        (plan, errors)
    }

    async fn create(&mut self, l: &mut Loaded, r: &Res) -> Result<(), String> {
        let out = l
            .driver
            .create(ResourceCreateRequest {
                resource_type: r.type_name.clone(),
                spec: Some(r.spec()),
            })
            .await
            .map_err(|e| e.message().to_string())?
            .into_inner()
            .output;
        self.persist(r, out)
    }

    /// The host's post-success checks (iac-protocol pitfalls 6 and 8), then the state write.
    fn persist(&mut self, r: &Res, out: Option<ResourceOutput>) -> Result<(), String> {
        let Some(o) = out else {
            return Ok(()); // nothing persisted, silently (the host's behaviour)
        };
        assert!(
            o.name.is_empty() || o.name == r.name,
            "state write rejected: name {:?}",
            o.name
        );
        assert!(
            o.r#type.is_empty() || o.r#type == r.type_name,
            "state write rejected: type {:?}",
            o.r#type
        );
        assert!(
            !o.provider_id.is_empty(),
            "empty provider_id for {}",
            r.name
        );
        let outputs: Json = serde_json::from_slice(&o.outputs_json).expect("outputs_json is JSON");
        assert!(
            outputs.is_object(),
            "outputs_json must be an object: {outputs}"
        );
        for (k, sensitive) in &o.sensitive {
            if *sensitive {
                assert!(
                    outputs[k].is_string(),
                    "sensitive output {k} must be a string"
                );
            }
        }
        self.state.insert(
            r.name.clone(),
            Record {
                type_name: r.type_name.clone(),
                provider_id: o.provider_id,
                outputs,
                dependencies: r.depends_on(),
            },
        );
        Ok(())
    }

    pub fn all_refs(&self) -> Vec<ResourceRef> {
        self.state.keys().map(|n| self.r#ref(n)).collect()
    }

    /// `wfctl infra destroy`: all refs of the group in state-listing (alphabetical) order;
    /// state is removed only when no error came back.
    pub async fn destroy(&mut self) -> DestroyResult {
        let refs = self.all_refs();
        let l = self.load().await;
        let r = self.destroy_refs(&l, refs).await;
        l.close().await;
        r
    }

    pub async fn destroy_refs(&mut self, l: &Loaded, refs: Vec<ResourceRef>) -> DestroyResult {
        let result = l
            .required
            .clone()
            .destroy(DestroyRequest { refs })
            .await
            .expect("Destroy RPC")
            .into_inner()
            .result
            .unwrap_or_default();
        if result.errors.is_empty() {
            self.state.clear();
        }
        result
    }

    pub async fn drift(&self) -> Result<Vec<DriftResult>, tonic::Status> {
        let l = self.load().await;
        let r = l
            .drift
            .clone()
            .detect_drift(DetectDriftRequest {
                refs: self.all_refs(),
            })
            .await
            .map(|r| r.into_inner().drifts);
        l.close().await;
        r
    }

    /// `apply --refresh`: GHOST entries are pruned from state before planning.
    pub async fn refresh(&mut self) -> Vec<String> {
        let drifts = self.drift().await.expect("DetectDrift");
        let ghosts: Vec<String> = drifts
            .iter()
            .filter(|d| d.class == DriftClass::Ghost as i32)
            .map(|d| d.name.clone())
            .collect();
        for g in &ghosts {
            self.state.remove(g);
        }
        ghosts
    }
}

fn order(items: Vec<Action>, deps: &BTreeMap<String, Vec<String>>) -> Vec<Action> {
    let names: Vec<String> = items.iter().map(|a| a.name.clone()).collect();
    let mut done: Vec<String> = Vec::new();
    fn visit(
        n: &str,
        names: &[String],
        deps: &BTreeMap<String, Vec<String>>,
        done: &mut Vec<String>,
        depth: usize,
    ) {
        assert!(depth < 100, "depends_on cycle");
        if done.iter().any(|d| d == n) {
            return;
        }
        for d in deps.get(n).cloned().unwrap_or_default() {
            if names.contains(&d) {
                visit(&d, names, deps, done, depth + 1);
            }
        }
        done.push(n.to_string());
    }
    for n in &names {
        visit(n, &names, deps, &mut done, 0);
    }
    let mut slots: Vec<Option<Action>> = items.into_iter().map(Some).collect();
    done.iter()
        .filter_map(|n| {
            let i = names.iter().position(|x| x == n)?;
            slots[i].take()
        })
        .collect()
}

/// Kills every nats-server a test's `local` brokers started, even when the test fails: the pids
/// recorded in the provider state file, and any nats-server whose command line mentions the
/// state directory (started but not yet recorded).
pub struct LocalGuard {
    pub state_dir: PathBuf,
}

impl LocalGuard {
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        if let Ok(text) = std::fs::read_to_string(self.state_dir.join("state.json")) {
            if let Ok(v) = serde_json::from_str::<Json>(&text) {
                for b in v["brokers"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                {
                    for n in b["local"]["nodes"].as_array().into_iter().flatten() {
                        if let Some(p) = n["pid"].as_i64() {
                            pids.push(p as i32);
                        }
                    }
                }
            }
        }
        let needle = self.state_dir.display().to_string();
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for e in entries.flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                if let Ok(raw) = std::fs::read(e.path().join("cmdline")) {
                    let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
                    if cmd.contains("nats-server") && cmd.contains(&needle) && !pids.contains(&pid)
                    {
                        pids.push(pid);
                    }
                }
            }
        }
        pids
    }

    /// nats-server processes of this test that are still running.
    pub fn running(&self) -> Vec<i32> {
        let needle = self.state_dir.display().to_string();
        self.pids()
            .into_iter()
            .filter(|p| {
                std::fs::read(format!("/proc/{p}/cmdline"))
                    .map(|raw| String::from_utf8_lossy(&raw).contains(&needle))
                    .unwrap_or(false)
                    && std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .map(|s| {
                            !s.rsplit_once(')')
                                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                        })
                        .unwrap_or(false)
            })
            .collect()
    }
}

impl Drop for LocalGuard {
    fn drop(&mut self) {
        for pid in self.running() {
            // SAFETY: kill(2) on a nats-server started for this test's state directory.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
