//! Placeholder while the flow test is written.
mod k8s_fake;
#[test]
fn fake_starts() {
    let f = k8s_fake::Fake::start();
    assert!(f.url.starts_with("http://127.0.0.1:"));
}
