//! TEMPORARY (k8s-apply): k8s-render owns this file; replaced by its version on merge.
pub mod apply;
pub mod client;
pub mod forward;
