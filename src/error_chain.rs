//! One line from an error and its causes, for the host's `error` fields and the IaC face's
//! gRPC messages.

/// Renders an error with its whole source chain, `a: b: c`, for the host's `error` fields.
pub fn render(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let t = e.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = e.source();
    }
    s
}
