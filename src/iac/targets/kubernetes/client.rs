//! The Kubernetes API client of the `kubernetes` and `aws.eks` targets: which cluster (a
//! kubeconfig file and context, else the in-cluster service account) and the errors of talking
//! to it, each saying what to do about it.
//!
//! The provider module's `kubeconfig` (a path) and `kube_context` keys pick the cluster; without
//! them the usual client rules apply (`KUBECONFIG`, else `~/.kube/config`, with its current
//! context), and inside a pod the service account. The choice is recorded with the broker so a
//! later destroy (even one wfctl runs with an empty provider config) talks to the same cluster.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use std::path::PathBuf;
use std::time::Duration;

/// Our field manager for server-side apply: the fields this provider owns on every object.
pub const FIELD_MANAGER: &str = "workflow-plugin-eventbus";

/// Where the cluster is, as the provider config (or the broker's record) names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    /// A kubeconfig file (`None` = `KUBECONFIG` / `~/.kube/config`, else in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// A context of that kubeconfig (`None` = its current context).
    pub context: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}; set the provider's kubeconfig to a readable file (or KUBECONFIG)")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no usable Kubernetes config: {kubeconfig}; and not inside a cluster ({in_cluster}); set KUBECONFIG or the provider's kubeconfig (and kube_context)")]
    NoConfig {
        kubeconfig: String,
        in_cluster: String,
    },
    #[error("context {context:?} of the kubeconfig: {source}; kube_context must name a context of that file (kubectl config get-contexts)")]
    Context {
        context: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("cannot build a Kubernetes client: {0}")]
    Client(#[source] Box<kube::Error>),
    /// The API answered with an error status.
    #[error("{action}: the API server answered {code} {reason}: {message}{hint}")]
    Api {
        action: String,
        code: u16,
        reason: String,
        message: String,
        hint: &'static str,
    },
    /// The API could not be reached (connection, TLS, timeout).
    #[error("{action}: {source}; is the cluster reachable (kubectl cluster-info)?")]
    Transport {
        action: String,
        #[source]
        source: Box<kube::Error>,
    },
    #[error("{what} did not become ready within {waited:?}: {state}")]
    NotReady {
        what: String,
        waited: Duration,
        state: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("port-forward to {pod}: {message}")]
    Forward { pod: String, message: String },
}

impl KubeError {
    /// Wraps a kube error of `action`, telling API answers from transport failures.
    pub fn api(action: impl Into<String>, e: kube::Error) -> KubeError {
        let action = action.into();
        match e {
            kube::Error::Api(s) => {
                let hint = match s.code {
                    401 => "; the kubeconfig's credentials were refused (expired token? re-run your cloud's `update-kubeconfig`)",
                    403 => "; the kubeconfig's user lacks RBAC rights for this (it needs get/list/patch/delete on secrets, configmaps, services, statefulsets, poddisruptionbudgets, networkpolicies, persistentvolumeclaims (and serviceaccounts, certificates.cert-manager.io, podmonitors.monitoring.coreos.com when rendered), and create on pods/portforward in the namespace)",
                    409 => "; another field manager owns these fields (kubectl apply --server-side took them?)",
                    422 => "; the object was rejected as invalid",
                    _ => "",
                };
                KubeError::Api {
                    action,
                    code: s.code,
                    reason: s.reason,
                    message: s.message,
                    hint,
                }
            }
            other => KubeError::Transport {
                action,
                source: Box::new(other),
            },
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, KubeError::Api { code: 404, .. })
    }

    pub fn is_forbidden(&self) -> bool {
        matches!(self, KubeError::Api { code: 403, .. })
    }

    /// The class the provider reports to wfctl.
    pub fn class(&self) -> crate::iac::error::PlatformClass {
        use crate::iac::error::PlatformClass as C;
        match self {
            KubeError::Kubeconfig { .. }
            | KubeError::NoConfig { .. }
            | KubeError::Context { .. } => C::Auth,
            KubeError::Api {
                code: 401 | 403, ..
            } => C::Auth,
            KubeError::Api {
                code: 400 | 409 | 422,
                ..
            }
            | KubeError::Invalid(_) => C::Invalid,
            KubeError::Api {
                code: 429 | 500.., ..
            }
            | KubeError::Transport { .. }
            | KubeError::Client(_) => C::Unavailable,
            KubeError::NotReady { .. } => C::Timeout,
            _ => C::Failed,
        }
    }
}

/// A client for the cluster `access` names.
pub async fn connect(access: &Access) -> Result<Client, KubeError> {
    let opts = KubeConfigOptions {
        context: access.context.clone(),
        ..Default::default()
    };
    let mut config = match &access.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| KubeError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .map_err(|source| context_error(access, source))?
        }
        None => match Config::from_kubeconfig(&opts).await {
            Ok(c) => c,
            // A named context must come from a kubeconfig; only without one is the pod's own
            // service account the fallback.
            Err(source) if access.context.is_some() => return Err(context_error(access, source)),
            Err(kerr) => Config::incluster().map_err(|ierr| KubeError::NoConfig {
                kubeconfig: crate::error_chain::render(&kerr),
                in_cluster: crate::error_chain::render(&ierr),
            })?,
        },
    };
    // Every call is a short request (no watches): fail in seconds, not the default minutes.
    config.connect_timeout = Some(Duration::from_secs(10));
    config.read_timeout = Some(Duration::from_secs(60));
    Client::try_from(config).map_err(|e| KubeError::Client(Box::new(e)))
}

fn context_error(access: &Access, source: kube::config::KubeconfigError) -> KubeError {
    match &access.context {
        Some(c) => KubeError::Context {
            context: c.clone(),
            source,
        },
        None => KubeError::Kubeconfig {
            path: access
                .kubeconfig
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(KUBECONFIG or ~/.kube/config)".into()),
            source,
        },
    }
}
