//! Config in and outputs out: the strict decode every driver's config goes through, and the
//! readers and writers of output values in the config's own vocabulary.

use crate::iac::error::DriverError;
use serde_json::{Map, Value as Json};
use std::time::Duration;

/// Config problems a target found, as one error naming each field (`field: message` lines).
pub fn config_problems(type_name: &str, name: &str, lines: Vec<String>) -> DriverError {
    let mut p = crate::config::error::Problems::new(type_name, name);
    p.raw(lines);
    match p.finish(()) {
        Err(e) => DriverError::Config(e),
        Ok(()) => DriverError::invalid(format!("{type_name} {name:?}"), "invalid config"),
    }
}

/// The config as a JSON object (`null` and empty bytes are `{}`).
pub fn config_object(what: &str, config_json: &[u8]) -> Result<Map<String, Json>, DriverError> {
    if config_json.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Json>(config_json) {
        Ok(Json::Object(m)) => Ok(m),
        Ok(Json::Null) => Ok(Map::new()),
        Ok(other) => Err(DriverError::invalid(
            what,
            format!("config_json must be a JSON object, got {}", type_of(&other)),
        )),
        Err(source) => Err(DriverError::NotJson {
            what: what.to_string(),
            source,
        }),
    }
}

fn type_of(j: &Json) -> &'static str {
    match j {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

/// Strict decode of a config message, as the engine decodes the same YAML, then `then` (the
/// spec's validation). Problems from either are reported without secrets or long values
/// (`iac::scrub`).
pub fn decode_config<T: prost::Message + Default, S>(
    type_name: &str,
    name: &str,
    message: &str,
    json: Map<String, Json>,
    then: impl FnOnce(T) -> Result<S, DriverError>,
) -> Result<S, DriverError> {
    let scrub = crate::iac::scrub::Scrubber::new(&json);
    let decoded =
        crate::config::decode::decode_json::<T>(&crate::runtime::types::qualified(message), json)
            .map_err(|lines| {
                let mut p = crate::config::error::Problems::new(type_name, name);
                p.raw(lines);
                match p.finish(()) {
                    Err(e) => DriverError::Config(e),
                    Ok(()) => {
                        DriverError::invalid(format!("{type_name} {name:?}"), "invalid config")
                    }
                }
            });
    decoded.and_then(then).map_err(|e| scrub.error(e))
}

/// A duration the way our configs write them: `"30s"`, `"1.5s"`, `"0s"`.
pub fn duration_json(d: Duration) -> Json {
    let nanos = d.subsec_nanos();
    let text = if nanos == 0 {
        format!("{}s", d.as_secs())
    } else {
        let frac = format!("{nanos:09}");
        format!("{}.{}s", d.as_secs(), frac.trim_end_matches('0'))
    };
    Json::String(text)
}

pub fn duration_from_json(j: Option<&Json>) -> Duration {
    let Some(s) = j.and_then(Json::as_str) else {
        return Duration::ZERO;
    };
    let s = s.trim().trim_end_matches('s');
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    let secs: u64 = secs.parse().unwrap_or(0);
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    Duration::new(secs, digits.parse().unwrap_or(0))
}

pub fn str_field<'a>(o: &'a Json, key: &str) -> &'a str {
    o.get(key).and_then(Json::as_str).unwrap_or_default()
}

pub fn i64_field(o: &Json, key: &str, default: i64) -> i64 {
    o.get(key).and_then(Json::as_i64).unwrap_or(default)
}

#[cfg(test)]
pub fn bool_field(o: &Json, key: &str) -> bool {
    o.get(key).and_then(Json::as_bool).unwrap_or(false)
}

pub fn strings_field(o: &Json, key: &str) -> Vec<String> {
    o.get(key)
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}
