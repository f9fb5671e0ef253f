//! A test host that launches the built plugin binary exactly as the workflow engine does
//! (install layout, cwd, env, first-line handshake, broker stream, callback server reached via
//! ConnInfo) and drives it over gRPC. Typed configs are built from YAML with the plugin's own
//! FileDescriptorSet and the host's strict JSON rules, independently of the plugin's decoder.

#![allow(dead_code)]

pub mod iac;
pub mod pki;
pub mod typed;

use eventbus_plugin::pb::go_plugin::{
    grpc_broker_client::GrpcBrokerClient, grpc_controller_client::GrpcControllerClient, ConnInfo,
    Empty,
};
use eventbus_plugin::pb::plugin::{
    engine_callback_service_server::{EngineCallbackService, EngineCallbackServiceServer},
    plugin_service_client::PluginServiceClient,
    ConfigureCallbackRequest, CreateModuleRequest, CreateStepRequest, CreateTriggerRequest,
    ErrorResponse, ExecuteStepRequest, GetServiceRequest, GetServiceResponse, HandleRequest,
    LogRequest, PublishMessageRequest, PublishMessageResponse, SubscribeRequest,
    TriggerWorkflowRequest, UnsubscribeRequest,
};
use futures::future::BoxFuture;
use serde_json::Value as Json;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Response, Status};
pub use typed::Codec;

/// The plugin binary: `BIN` works wherever a path does (`Command::new(BIN)`, `fs::copy(BIN, ..)`).
pub const BIN: PluginBin = PluginBin;

#[derive(Clone, Copy, Debug)]
pub struct PluginBin;

impl AsRef<Path> for PluginBin {
    fn as_ref(&self) -> &Path {
        plugin_bin()
    }
}

impl AsRef<std::ffi::OsStr> for PluginBin {
    fn as_ref(&self) -> &std::ffi::OsStr {
        plugin_bin().as_os_str()
    }
}

/// `EVENTBUS_PLUGIN_BIN` when set; else, for an example (`target/<profile>/examples/x`), the
/// binary of that profile (or the other one); else Cargo's `CARGO_BIN_EXE_*` for tests.
pub fn plugin_bin() -> &'static Path {
    static PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        const NAME: &str = "workflow-plugin-eventbus";
        if let Some(p) = std::env::var_os("EVENTBUS_PLUGIN_BIN").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let exe = std::env::current_exe().ok();
        let examples = exe
            .as_deref()
            .and_then(Path::parent)
            .filter(|d| d.file_name().is_some_and(|n| n == "examples"));
        if let Some(profile) = examples.and_then(Path::parent) {
            let candidates = [
                profile.join(NAME),
                profile.with_file_name("release").join(NAME),
                profile.with_file_name("debug").join(NAME),
            ];
            if let Some(p) = candidates.into_iter().find(|p| p.is_file()) {
                return p;
            }
        }
        match option_env!("CARGO_BIN_EXE_workflow-plugin-eventbus") {
            Some(p) => PathBuf::from(p),
            None => panic!(
                "plugin binary not found: set EVENTBUS_PLUGIN_BIN or run \
                 `cargo build --release --bin {NAME}`"
            ),
        }
    })
}

/// grpc-go's default largest inbound message, which the host's callback server keeps.
pub const HOST_CALLBACK_LIMIT: usize = 4 * 1024 * 1024;

pub const COOKIE: (&str, &str) = ("WORKFLOW_PLUGIN", "workflow-external-plugin-v1");

/// What the host's pipeline does when TriggerWorkflow arrives: `Ok(())` or a pipeline error.
pub type PipelineFn =
    Arc<dyn Fn(TriggerWorkflowRequest) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

pub struct LaunchOptions {
    pub env: Vec<(String, String)>,
    pub callback: Option<PipelineFn>,
    /// Delay before the host sends the callback ConnInfo (late arrival, as go-plugin allows).
    pub conninfo_delay: Duration,
    /// Another plugin binary than [`plugin_bin`] (the bench compares against an older build).
    pub bin: Option<PathBuf>,
}

impl Default for LaunchOptions {
    fn default() -> Self {
        LaunchOptions {
            env: Vec::new(),
            callback: None,
            conninfo_delay: Duration::ZERO,
            bin: None,
        }
    }
}

pub struct Plugin {
    pub child: Child,
    pub handshake: String,
    pub spawn_to_handshake: Duration,
    pub socket: PathBuf,
    pub channel: Channel,
    pub client: PluginServiceClient<Channel>,
    pub codec: Codec,
    pub stderr: Arc<Mutex<String>>,
    pub calls: Option<mpsc::UnboundedReceiver<TriggerWorkflowRequest>>,
    broker_tx: mpsc::UnboundedSender<ConnInfo>,
    pub dir: tempfile::TempDir,
    _callback_server: Option<tokio::task::JoinHandle<()>>,
}

/// `<dir>/plugins/eventbus/eventbus` + both manifests, as `wfctl plugin install` lays it out.
pub fn install(root: &Path) -> PathBuf {
    install_bin(root, plugin_bin())
}

/// [`install`] of a given plugin binary.
pub fn install_bin(root: &Path, plugin: &Path) -> PathBuf {
    let dir = root.join("plugins").join("eventbus");
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("eventbus");
    // A hard link opens no file for writing, so no thread of this process can fork while
    // holding a write handle to a binary another test is about to exec ("text file busy").
    // Copied when the temp dir is on another file system.
    if std::fs::hard_link(plugin, &bin).is_err() {
        std::fs::copy(plugin, &bin).unwrap();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(repo.join("plugin.json"), dir.join("plugin.json")).unwrap();
    std::fs::copy(
        repo.join("plugin.contracts.json"),
        dir.join("plugin.contracts.json"),
    )
    .unwrap();
    bin
}

/// `cmd.spawn()`, retrying only "text file busy": a binary just written can be busy for a
/// moment while another thread of this process forks with the write handle inherited.
pub fn spawn_retrying(cmd: &mut Command) -> Child {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("spawn {cmd:?}: {e}"),
        }
    }
}

pub async fn dial_unix(path: &Path) -> Channel {
    let path = path.to_path_buf();
    Endpoint::from_static("http://unused")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                let s = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
            }
        }))
        .await
        .expect("dial plugin socket")
}

/// Spawns the binary like the engine: argv = [path], cwd = plugin dir, cookie and PLUGIN_* env.
pub fn spawn_raw(bin: &Path, env: &[(String, String)], with_cookie: bool) -> Child {
    let mut cmd = Command::new(bin);
    cmd.current_dir(bin.parent().unwrap())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PLUGIN_MIN_PORT", "10000")
        .env("PLUGIN_MAX_PORT", "25000")
        .env("PLUGIN_PROTOCOL_VERSIONS", "1")
        .env_remove("WORKFLOW_PLUGIN");
    if with_cookie {
        cmd.env(COOKIE.0, COOKIE.1);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    spawn_retrying(&mut cmd)
}

fn collect_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    if let Some(mut err) = child.stderr.take() {
        let b = buf.clone();
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
    buf
}

/// Reads the first stdout line (bounded), then keeps draining stdout into `rest`.
fn read_handshake(child: &mut Child, rest: Arc<Mutex<String>>) -> Result<String, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut line = String::new();
        let n = r.read_line(&mut line).unwrap_or(0);
        let _ = tx.send(if n == 0 { None } else { Some(line) });
        let mut more = String::new();
        let _ = r.read_to_string(&mut more);
        rest.lock().unwrap().push_str(&more);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Some(line)) => Ok(line),
        Ok(None) => Err("stdout closed before the handshake".into()),
        Err(_) => Err("no handshake within 20 s".into()),
    }
}

pub struct CallbackSvc {
    calls: mpsc::UnboundedSender<TriggerWorkflowRequest>,
    pipeline: PipelineFn,
}

#[tonic::async_trait]
impl EngineCallbackService for CallbackSvc {
    async fn trigger_workflow(
        &self,
        req: Request<TriggerWorkflowRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        let r = req.into_inner();
        let _ = self.calls.send(r.clone());
        let res = (self.pipeline)(r).await;
        Ok(Response::new(ErrorResponse {
            error: res.err().unwrap_or_default(),
        }))
    }
    async fn get_service(
        &self,
        _: Request<GetServiceRequest>,
    ) -> Result<Response<GetServiceResponse>, Status> {
        Ok(Response::new(GetServiceResponse { found: false }))
    }
    async fn log(&self, _: Request<LogRequest>) -> Result<Response<()>, Status> {
        Ok(Response::new(()))
    }
    async fn publish_message(
        &self,
        _: Request<PublishMessageRequest>,
    ) -> Result<Response<PublishMessageResponse>, Status> {
        Ok(Response::new(PublishMessageResponse {
            error: "handler not configured".into(),
            message_id: String::new(),
        }))
    }
    async fn subscribe(
        &self,
        _: Request<SubscribeRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(Response::new(ErrorResponse {
            error: "handler not configured".into(),
        }))
    }
    async fn unsubscribe(
        &self,
        _: Request<UnsubscribeRequest>,
    ) -> Result<Response<ErrorResponse>, Status> {
        Ok(Response::new(ErrorResponse {
            error: "no subscription".into(),
        }))
    }
}

impl Plugin {
    pub async fn launch(opts: LaunchOptions) -> Plugin {
        let dir = tempfile::tempdir().unwrap();
        let bin = install_bin(dir.path(), opts.bin.as_deref().unwrap_or(plugin_bin()));
        let started = Instant::now();
        let mut child = spawn_raw(&bin, &opts.env, true);
        let stderr = collect_stderr(&mut child);
        let rest = Arc::new(Mutex::new(String::new()));
        let line = match read_handshake(&mut child, rest) {
            Ok(l) => l,
            Err(e) => {
                let _ = child.kill();
                panic!("{e}; stderr: {}", stderr.lock().unwrap());
            }
        };
        let spawn_to_handshake = started.elapsed();
        let handshake = line.trim_end().to_string();
        let parts: Vec<&str> = handshake.split('|').collect();
        assert!(parts.len() >= 4, "bad handshake {handshake:?}");
        assert_eq!(parts[2], "unix", "{handshake}");
        let socket = PathBuf::from(parts[3]);
        let channel = dial_unix(&socket).await;
        let client = PluginServiceClient::new(channel.clone())
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX);

        // The host opens the broker stream right after connecting and keeps it open.
        let (broker_tx, broker_rx) = mpsc::unbounded_channel::<ConnInfo>();
        let mut broker = GrpcBrokerClient::new(channel.clone());
        let outbound = tokio_stream::wrappers::UnboundedReceiverStream::new(broker_rx);
        tokio::spawn(async move {
            if let Ok(resp) = broker.start_stream(outbound).await {
                let mut s = resp.into_inner();
                while let Ok(Some(_)) = s.message().await {}
            }
        });

        let codec = Codec::from_registry(&mut client.clone()).await;
        let mut plugin = Plugin {
            child,
            handshake,
            spawn_to_handshake,
            socket,
            channel,
            client,
            codec,
            stderr,
            calls: None,
            broker_tx,
            dir,
            _callback_server: None,
        };
        if let Some(pipeline) = opts.callback {
            plugin.serve_callback(pipeline, opts.conninfo_delay).await;
        }
        plugin
    }

    /// Serves EngineCallbackService on a fresh unix socket, announces it on the broker stream
    /// (possibly late) and calls ConfigureCallback, as the engine does at load.
    pub async fn serve_callback(&mut self, pipeline: PipelineFn, delay: Duration) {
        let path = self.dir.path().join("host-callback.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        // The host's callback server is a default grpc-go server: 4 MiB inbound at most.
        let svc = EngineCallbackServiceServer::new(CallbackSvc {
            calls: tx,
            pipeline,
        })
        .max_decoding_message_size(HOST_CALLBACK_LIMIT);
        self._callback_server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await;
        }));
        self.calls = Some(rx);
        let info = ConnInfo {
            service_id: 1,
            network: "unix".into(),
            address: path.display().to_string(),
            knock: None,
        };
        if delay.is_zero() {
            self.broker_tx.send(info).unwrap();
        } else {
            let tx = self.broker_tx.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = tx.send(info);
            });
        }
        let r = self
            .client
            .clone()
            .configure_callback(ConfigureCallbackRequest { broker_id: 1 })
            .await
            .unwrap();
        assert_eq!(r.get_ref().error, "", "ConfigureCallback failed");
    }

    pub fn send_conninfo(&self, info: ConnInfo) {
        self.broker_tx.send(info).unwrap();
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits (bounded by `within`) until the plugin's stderr holds `needle`: logs are written
    /// by a background writer and read by a thread of ours, so a line can trail the event it
    /// reports. Panics with the whole stderr when it never shows.
    #[allow(dead_code)]
    pub async fn wait_stderr(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stderr().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never logged: {}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    // ------------------------------------------------------------ modules

    /// STRICT_PROTO module creation: typed_config from YAML through the registry's descriptors.
    pub async fn create_module(
        &self,
        type_name: &str,
        name: &str,
        yaml: &str,
    ) -> Result<String, String> {
        let msg = self.codec.module_config(type_name);
        let typed = self.codec.typed_from_yaml(&msg, yaml)?;
        let r = self
            .client
            .clone()
            .create_module(CreateModuleRequest {
                r#type: type_name.into(),
                name: name.into(),
                config: None,
                typed_config: Some(typed),
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        if r.error.is_empty() {
            Ok(r.handle_id)
        } else {
            Err(r.error)
        }
    }

    /// Legacy module creation: the raw YAML as a Struct (with `_config_dir`, as the host adds).
    pub async fn create_module_legacy(
        &self,
        type_name: &str,
        name: &str,
        yaml: &str,
    ) -> Result<String, String> {
        let mut json = typed::yaml_to_json(yaml);
        if let Json::Object(m) = &mut json {
            m.insert("_config_dir".into(), Json::String("/tmp".into()));
        }
        let r = self
            .client
            .clone()
            .create_module(CreateModuleRequest {
                r#type: type_name.into(),
                name: name.into(),
                config: Some(typed::json_to_struct(&json)),
                typed_config: None,
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        if r.error.is_empty() {
            Ok(r.handle_id)
        } else {
            Err(r.error)
        }
    }

    pub async fn lifecycle(&self, rpc: &str, handle: &str) -> Result<(), String> {
        let mut c = self.client.clone();
        let req = HandleRequest {
            handle_id: handle.into(),
        };
        let r = match rpc {
            "init" => c.init_module(req).await,
            "start" => c.start_module(req).await,
            "stop" => c.stop_module(req).await,
            "destroy" => c.destroy_module(req).await,
            "destroy_step" => c.destroy_step(req).await,
            other => panic!("unknown rpc {other}"),
        }
        .map_err(|s| s.to_string())?
        .into_inner();
        if r.error.is_empty() {
            Ok(())
        } else {
            Err(r.error)
        }
    }

    /// Create + Init + Start, as the engine does for each module.
    pub async fn module_up(&self, type_name: &str, name: &str, yaml: &str) -> String {
        let h = self
            .create_module(type_name, name, yaml)
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        self.lifecycle("init", &h)
            .await
            .unwrap_or_else(|e| panic!("init {name}: {e}"));
        self.lifecycle("start", &h)
            .await
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        h
    }

    // ------------------------------------------------------------ steps

    pub async fn create_step(
        &self,
        type_name: &str,
        name: &str,
        yaml: &str,
    ) -> Result<String, String> {
        let (cfg, _, _) = self.codec.step_messages(type_name);
        let typed = self.codec.typed_from_yaml(&cfg, yaml)?;
        let r = self
            .client
            .clone()
            .create_step(CreateStepRequest {
                r#type: type_name.into(),
                name: name.into(),
                config: None,
                typed_config: Some(typed),
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        if r.error.is_empty() {
            Ok(r.handle_id)
        } else {
            Err(r.error)
        }
    }

    /// Executes like the host in STRICT mode: typed_config from the (resolved) config YAML,
    /// typed_input from `current` filtered to the input message's fields; the typed output is
    /// rendered as the host renders it (proto names, zero values dropped, int64 as strings).
    pub async fn execute(
        &self,
        type_name: &str,
        handle: &str,
        config_yaml: &str,
        current: &Json,
    ) -> Result<Json, String> {
        execute_step(
            &self.client,
            &self.codec,
            type_name,
            handle,
            config_yaml,
            current,
        )
        .await
    }

    /// A cloneable step executor (its own codec from the registry) for spawned tasks and for
    /// the host's pipeline, which calls ExecuteStep while it is serving TriggerWorkflow.
    pub async fn step_client(&self) -> StepClient {
        let mut client = self.client.clone();
        let codec = Codec::from_registry(&mut client).await;
        StepClient {
            client,
            codec: Arc::new(codec),
        }
    }

    pub async fn create_trigger(&self, name: &str, config: &Json) -> Result<String, String> {
        let r = self
            .client
            .clone()
            .create_trigger(CreateTriggerRequest {
                r#type: "trigger.eventbus.subscribe".into(),
                name: name.into(),
                config: Some(typed::json_to_struct(config)),
            })
            .await
            .map_err(|s| s.to_string())?
            .into_inner();
        if r.error.is_empty() {
            Ok(r.handle_id)
        } else {
            Err(r.error)
        }
    }

    /// Next TriggerWorkflow received by the host callback (bounded wait).
    pub async fn next_call(&mut self, within: Duration) -> TriggerWorkflowRequest {
        let rx = self.calls.as_mut().expect("launched without a callback");
        tokio::time::timeout(within, rx.recv())
            .await
            .expect("no TriggerWorkflow in time")
            .expect("callback closed")
    }

    /// GRPCController.Shutdown, then the exit status and how long the process took to exit.
    pub async fn shutdown(&mut self) -> (Option<i32>, Duration) {
        let t = Instant::now();
        let _ = GrpcControllerClient::new(self.channel.clone())
            .shutdown(Empty {})
            .await;
        let code = wait_exit(&mut self.child, Duration::from_secs(5));
        (code, t.elapsed())
    }
}

/// ExecuteStep as the host sends it in STRICT mode (see `Plugin::execute`).
async fn execute_step(
    client: &PluginServiceClient<Channel>,
    codec: &Codec,
    type_name: &str,
    handle: &str,
    config_yaml: &str,
    current: &Json,
) -> Result<Json, String> {
    let (cfg, input, output) = codec.step_messages(type_name);
    let typed_config = codec.typed_from_yaml(&cfg, config_yaml)?;
    let typed_input = codec.typed_input(&input, current)?;
    let r = client
        .clone()
        .execute_step(ExecuteStepRequest {
            handle_id: handle.into(),
            typed_config: Some(typed_config),
            typed_input: Some(typed_input),
            current: Some(typed::json_to_struct(current)),
            ..Default::default()
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    if !r.error.is_empty() {
        return Err(r.error);
    }
    let any = r
        .typed_output
        .ok_or("STRICT step returned no typed_output")?;
    codec.render_output(&output, &any)
}

/// Executes steps like `Plugin::execute`, from any task (see `Plugin::step_client`).
#[derive(Clone)]
pub struct StepClient {
    client: PluginServiceClient<Channel>,
    codec: Arc<Codec>,
}

impl StepClient {
    pub async fn execute(
        &self,
        type_name: &str,
        handle: &str,
        config_yaml: &str,
        current: &Json,
    ) -> Result<Json, String> {
        execute_step(
            &self.client,
            &self.codec,
            type_name,
            handle,
            config_yaml,
            current,
        )
        .await
    }
}

pub fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for Plugin {
    /// SIGTERM first, so the plugin removes its socket; SIGKILL if it does not exit quickly.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            wait_exit(&mut self.child, Duration::from_secs(3));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The entries of a batch call's `messages` (`deliver: batch`).
pub fn batch_entries(call: &TriggerWorkflowRequest) -> Vec<prost_types::Struct> {
    use prost_types::value::Kind;
    match call
        .data
        .as_ref()
        .and_then(|d| d.fields.get("messages"))
        .and_then(|v| v.kind.clone())
    {
        Some(Kind::ListValue(l)) => l
            .values
            .into_iter()
            .filter_map(|v| match v.kind {
                Some(Kind::StructValue(s)) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// A pipeline that just succeeds.
pub fn ok_pipeline() -> PipelineFn {
    Arc::new(|_| Box::pin(async { Ok(()) }))
}
