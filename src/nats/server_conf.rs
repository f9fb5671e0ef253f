//! The one nats-server config renderer every deploy target uses (`local` files on this machine,
//! the App Platform env var, the Kubernetes ConfigMap). Native NATS conf syntax: every string is quoted, and values that
//! must come from the process environment (listen host, secrets) are left as bare `$NAME`
//! references, which nats-server resolves from its environment at start. Secrets are therefore
//! never part of the rendered text. Only keys nats-server 2.9 already knows are written.

/// Where a listener binds: a fixed `host:port`, or a host from the environment plus a port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    Addr(String),
    /// `host: $VAR` resolved at start; the port is fixed.
    EnvHost {
        var: String,
        port: u16,
    },
}

/// Client authentication for the global account, by environment variable name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EnvAuth {
    Token {
        var: String,
    },
    UserPassword {
        user_var: String,
        password_var: String,
    },
}

/// A server's name: fixed, or from the environment (one config file shared by every pod of a
/// StatefulSet, each pod naming itself after its pod name).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServerName {
    Fixed(String),
    Env(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConf {
    pub name: String,
    pub listen: String,
    pub routes: Vec<String>,
    /// Keep the server from telling clients about peer addresses they cannot reach (pod IPs
    /// behind a Service): clients stay on the url they were given.
    pub no_advertise: bool,
    /// A file beside nats.conf (relative to it) included inside the block: the routes and
    /// the cluster's `authorization`, which carry the route credentials and so live in a
    /// secret store, never in the rendered text ([`routes_conf`] writes it). `routes` is then
    /// empty.
    pub include: Option<String>,
}

/// Lame-duck mode on shutdown: clients are moved off gradually over `duration_secs`, after
/// `grace_secs` (must be lower) during which the server still accepts them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LameDuck {
    pub duration_secs: u32,
    pub grace_secs: u32,
}

/// A websocket listener without TLS (TLS ends at whatever is in front: an edge proxy).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebsocketConf {
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConf {
    /// First line, as a comment.
    pub header: String,
    pub server_name: ServerName,
    pub client: Listen,
    /// Monitoring port; with `Listen::EnvHost` it binds the same host as the client port.
    pub monitor: Listen,
    /// `None` = log to stderr.
    pub logfile: Option<String>,
    /// Where the server writes its pid, so `nats-server --signal ldm=<file>` can reach it.
    pub pid_file: Option<String>,
    pub lame_duck: Option<LameDuck>,
    pub store_dir: String,
    /// 0 = not set (nats-server's default).
    pub max_file_store: i64,
    pub max_memory_store: i64,
    pub cluster: Option<ClusterConf>,
    pub websocket: Option<WebsocketConf>,
    pub auth: Option<EnvAuth>,
}

pub fn quoted(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

impl ServerConf {
    pub fn render(&self) -> String {
        let name = match &self.server_name {
            ServerName::Fixed(n) => quoted(n),
            ServerName::Env(var) => format!("${var}"),
        };
        let mut c = format!(
            "# {}\nserver_name: {name}\n",
            self.header.replace('\n', " ")
        );
        match (&self.client, &self.monitor) {
            (Listen::EnvHost { var, port }, Listen::EnvHost { port: http, .. }) => {
                c.push_str(&format!("host: ${var}\nport: {port}\nhttp_port: {http}\n"));
            }
            (client, monitor) => {
                for (key, l) in [("listen", client), ("http", monitor)] {
                    match l {
                        Listen::Addr(a) => c.push_str(&format!("{key}: {}\n", quoted(a))),
                        Listen::EnvHost { port, .. } => {
                            c.push_str(&format!("{key}: {}\n", quoted(&format!("0.0.0.0:{port}"))))
                        }
                    }
                }
            }
        }
        if let Some(l) = &self.logfile {
            c.push_str(&format!("logfile: {}\n", quoted(l)));
        }
        if let Some(p) = &self.pid_file {
            c.push_str(&format!("pid_file: {}\n", quoted(p)));
        }
        if let Some(ld) = &self.lame_duck {
            c.push_str(&format!(
                "lame_duck_duration: \"{}s\"\nlame_duck_grace_period: \"{}s\"\n",
                ld.duration_secs, ld.grace_secs
            ));
        }
        c.push_str(&format!(
            "jetstream {{\n  store_dir: {}\n",
            quoted(&self.store_dir)
        ));
        if self.max_file_store > 0 {
            c.push_str(&format!("  max_file_store: {}\n", self.max_file_store));
        }
        if self.max_memory_store > 0 {
            c.push_str(&format!("  max_memory_store: {}\n", self.max_memory_store));
        }
        c.push_str("}\n");
        if let Some(cl) = &self.cluster {
            let routes: Vec<String> = cl.routes.iter().map(|r| quoted(r)).collect();
            c.push_str(&format!(
                "cluster {{\n  name: {}\n  listen: {}\n",
                quoted(&cl.name),
                quoted(&cl.listen),
            ));
            if cl.no_advertise {
                c.push_str("  no_advertise: true\n");
            }
            match &cl.include {
                // nats-server resolves an include relative to the including file's directory
                // (2.9 and later alike), inside a block as at the top level.
                Some(file) => c.push_str(&format!(
                    "  # routes and their credentials (kept secret)\n  include {}\n}}\n",
                    quoted(file)
                )),
                None => c.push_str(&format!(
                    "  routes: [\n    {}\n  ]\n}}\n",
                    routes.join("\n    ")
                )),
            }
        }
        if let Some(ws) = &self.websocket {
            // The websocket listener binds the client host (it does not follow `host` itself).
            let host = match &self.client {
                Listen::EnvHost { var, .. } => format!("${var}"),
                Listen::Addr(a) => quoted(a.rsplit_once(':').map(|(h, _)| h).unwrap_or(a)),
            };
            c.push_str(&format!(
                "websocket {{\n  host: {host}\n  port: {}\n  no_tls: true\n}}\n",
                ws.port
            ));
        }
        match &self.auth {
            Some(EnvAuth::Token { var }) => {
                c.push_str(&format!("authorization {{\n  token: ${var}\n}}\n"))
            }
            Some(EnvAuth::UserPassword {
                user_var,
                password_var,
            }) => c.push_str(&format!(
                "authorization {{\n  user: ${user_var}\n  password: ${password_var}\n}}\n"
            )),
            None => {}
        }
        c
    }
}

/// The file a cluster block includes ([`ClusterConf::include`]): the credentials a route must
/// present (`authorization`) and the routes this server solicits, each carrying them as
/// userinfo (nats-server sends a route's credentials only from its url). Secret text: it
/// belongs in a secret store. `user` and `password` go into urls unencoded, so they must be
/// url-safe (the callers derive them as `[a-z0-9]`).
pub fn routes_conf(user: &str, password: &str, routes: &[String]) -> String {
    let urls: Vec<String> = routes
        .iter()
        .map(|r| {
            let (scheme, rest) = r.split_once("://").unwrap_or(("nats", r));
            quoted(&format!("{scheme}://{user}:{password}@{rest}"))
        })
        .collect();
    format!(
        "authorization {{\n  user: {}\n  password: {}\n}}\nroutes: [\n  {}\n]\n",
        quoted(user),
        quoted(password),
        urls.join("\n  ")
    )
}

/// Whether a secret survives the trip through an environment variable into nats.conf:
/// nats-server parses a referenced variable's value as a config value, so spaces, quotes,
/// `#`, `,` or `}` would cut or break it, and `true`/`12345` would become a bool or a number.
pub fn env_safe_secret(s: &str) -> bool {
    const WORDS: [&str; 6] = ["true", "false", "yes", "no", "on", "off"];
    (1..=512).contains(&s.len())
        && s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._~+/-".contains(c))
        && !WORDS.iter().any(|w| s.eq_ignore_ascii_case(w))
}

pub const ENV_SAFE_SECRET_RULE: &str =
    "1-512 characters of A-Z a-z 0-9 . _ ~ + / -, starting with a letter (nats-server reads it \
     from an environment variable as a config value, so other characters would change it)";

#[cfg(test)]
mod tests {
    use super::*;

    fn app_like() -> ServerConf {
        ServerConf {
            header: "test".into(),
            server_name: ServerName::Fixed("bus".into()),
            client: Listen::EnvHost {
                var: "NATS_HOST".into(),
                port: 4222,
            },
            monitor: Listen::EnvHost {
                var: "NATS_HOST".into(),
                port: 8222,
            },
            logfile: None,
            pid_file: None,
            lame_duck: None,
            store_dir: "/tmp/js".into(),
            max_file_store: 1 << 30,
            max_memory_store: 0,
            cluster: None,
            websocket: Some(WebsocketConf { port: 8080 }),
            auth: Some(EnvAuth::Token {
                var: "NATS_TOKEN".into(),
            }),
        }
    }

    #[test]
    fn env_references_stay_bare_and_secrets_never_appear() {
        let c = app_like().render();
        assert!(
            c.contains("host: $NATS_HOST\nport: 4222\nhttp_port: 8222\n"),
            "{c}"
        );
        assert!(
            c.contains("websocket {\n  host: $NATS_HOST\n  port: 8080\n  no_tls: true\n}"),
            "{c}"
        );
        assert!(c.contains("token: $NATS_TOKEN"), "{c}");
        assert!(!c.contains("logfile") && !c.contains("cluster {"), "{c}");
    }

    #[test]
    fn a_pod_names_itself_and_routes_go_to_its_peers() {
        let mut conf = app_like();
        conf.server_name = ServerName::Env("SERVER_NAME".into());
        conf.pid_file = Some("/var/run/nats/nats.pid".into());
        conf.lame_duck = Some(LameDuck {
            duration_secs: 30,
            grace_secs: 10,
        });
        conf.cluster = Some(ClusterConf {
            name: "bus".into(),
            listen: "0.0.0.0:6222".into(),
            routes: vec!["nats://bus-0.bus-headless:6222".into()],
            no_advertise: true,
            include: None,
        });
        let c = conf.render();
        assert!(c.contains("server_name: $SERVER_NAME\n"), "{c}");
        assert!(c.contains("pid_file: \"/var/run/nats/nats.pid\"\n"), "{c}");
        assert!(
            c.contains("lame_duck_duration: \"30s\"\nlame_duck_grace_period: \"10s\"\n"),
            "{c}"
        );
        assert!(
            c.contains(
                "  no_advertise: true\n  routes: [\n    \"nats://bus-0.bus-headless:6222\"\n  ]"
            ),
            "{c}"
        );
    }

    #[test]
    fn secrets_that_would_change_in_nats_conf_are_refused() {
        for ok in ["abc123", "Tok.en_~+/-x", "a"] {
            assert!(env_safe_secret(ok), "{ok}");
        }
        for bad in [
            "", "a b", "a#b", "a,b", "a}b", "12345", "true", "On", "x\"y", "a=b",
        ] {
            assert!(!env_safe_secret(bad), "{bad}");
        }
    }
}
