//! Config problems: collected all at once, one line each, naming component, field and remedy.

use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// e.g. `eventbus.stream "orders"`.
    pub component: String,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{}: {p}", self.component)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Accumulates `config.<field>: <message>` lines.
pub struct Problems {
    component: String,
    lines: Vec<String>,
}

impl Problems {
    pub fn new(type_name: &str, name: &str) -> Self {
        // Quoted like any value (at most 200 characters), so an oversized name is not echoed.
        Problems {
            component: format!("{type_name} {}", crate::secret::quote(name)),
            lines: Vec::new(),
        }
    }

    pub fn field(&mut self, field: &str, message: impl fmt::Display) {
        self.lines.push(format!("config.{field}: {message}"));
    }

    /// Decode errors already start with the field name.
    pub fn raw(&mut self, lines: Vec<String>) {
        self.lines
            .extend(lines.into_iter().map(|l| format!("config.{l}")));
    }

    /// Takes over the lines of a check of the same component (a provider's own section).
    pub fn absorb(&mut self, e: ConfigError) {
        self.lines.extend(e.problems);
    }

    pub fn check(&mut self, field: &str, r: Result<(), String>) {
        if let Err(m) = r {
            self.field(field, m);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// The problems so far as an error (for a refusal that needs no further checks).
    pub fn into_error(self) -> ConfigError {
        ConfigError {
            component: self.component,
            problems: self.lines,
        }
    }

    pub fn finish<T>(self, value: T) -> Result<T, ConfigError> {
        if self.lines.is_empty() {
            Ok(value)
        } else {
            Err(ConfigError {
                component: self.component,
                problems: self.lines,
            })
        }
    }
}

pub fn duration(d: &Option<prost_types::Duration>) -> Option<std::time::Duration> {
    d.as_ref()
        .map(|d| std::time::Duration::new(d.seconds.max(0) as u64, d.nanos.max(0) as u32))
}

pub fn negative(d: &Option<prost_types::Duration>) -> bool {
    d.as_ref().is_some_and(|d| d.seconds < 0 || d.nanos < 0)
}

/// Timeouts and delays above this are configuration mistakes, and near `i64::MAX` seconds they
/// overflow `Instant + Duration`.
pub const MAX_DURATION: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A protobuf duration from a config: not negative, well formed, and at most `max`. `Ok(None)`
/// when unset.
pub fn check_duration(
    d: &Option<prost_types::Duration>,
    max: std::time::Duration,
) -> Result<Option<std::time::Duration>, String> {
    let Some(d) = d else { return Ok(None) };
    if d.seconds < 0 || d.nanos < 0 {
        return Err("must not be negative".into());
    }
    if d.nanos >= 1_000_000_000 {
        return Err(
            "has a fractional part of a second or more; write it as seconds such as \"1.5s\""
                .into(),
        );
    }
    let out = std::time::Duration::new(d.seconds as u64, d.nanos as u32);
    if out > max {
        return Err(format!(
            "{}s is longer than the limit of {}s",
            d.seconds,
            max.as_secs()
        ));
    }
    Ok(Some(out))
}
