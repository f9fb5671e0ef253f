//! How long wfctl-style plan, apply, re-plan, no-op apply and destroy take for one `local`
//! broker with N streams and N consumers (default 100), each command in a fresh plugin process
//! as wfctl runs it. Prints `name value unit` lines; nothing is asserted. Build the plugin first
//! (the example does not rebuild it):
//!
//! ```sh
//! cargo build --release --bin workflow-plugin-eventbus
//! cargo run --release --example iac_bench -- 100
//! ```

#[path = "../tests/common/mod.rs"]
mod common;

use common::iac::{LocalGuard, Res, Wfctl};
use serde_json::json;
use std::time::Instant;

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let dir = tempfile::tempdir().expect("temp dir");
    let _guard = LocalGuard {
        state_dir: dir.path().to_path_buf(),
    };
    let mut w = Wfctl::new(dir.path());
    let mut desired = vec![Res::new(
        "bus",
        "infra.eventbus",
        json!({"provider": "nats", "deploy_target": "local", "local": {"remove_data_on_delete": true}}),
    )];
    for i in 0..n {
        desired.push(Res::new(
            &format!("s{i}"),
            "infra.eventbus.stream",
            json!({"broker_ref": "bus", "depends_on": ["bus"], "name": format!("S{i}"),
                   "subjects": [format!("s{i}.>")], "max_age": "3600s"}),
        ));
        desired.push(Res::new(
            &format!("c{i}"),
            "infra.eventbus.consumer",
            json!({"broker_ref": "bus", "depends_on": [format!("s{i}")], "name": format!("w{i}"),
                   "stream_name": format!("S{i}"), "max_deliver": 5}),
        ));
    }
    println!("# 1 local broker + {n} streams + {n} consumers; one plugin process per command");
    let t = Instant::now();
    let plan = w.plan(&desired).await;
    println!("iac_plan_empty_state {} ms", t.elapsed().as_millis());
    println!("# {} creates planned", plan.len());
    let t = Instant::now();
    let (_, errors) = w.apply(&desired).await;
    println!("iac_apply {} ms", t.elapsed().as_millis());
    assert!(errors.is_empty(), "{errors:?}");
    let t = Instant::now();
    let replan = w.plan(&desired).await;
    println!("iac_replan {} ms", t.elapsed().as_millis());
    println!("# {} actions after apply", replan.len());
    let t = Instant::now();
    let _ = w.apply(&desired).await;
    println!("iac_apply_noop {} ms", t.elapsed().as_millis());
    let t = Instant::now();
    let d = w.destroy().await;
    println!("iac_destroy {} ms", t.elapsed().as_millis());
    println!(
        "# {} destroyed, {} errors",
        d.destroyed.len(),
        d.errors.len()
    );
}
