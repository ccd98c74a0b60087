//! A checker for the subset of OpenAPI v3 that structural CRD schemas use, so `pacer validate`
//! applies the very schema the API server gets, not a hand-kept copy of it.

use serde_json::{Map, Value};

use super::FieldProblem;

/// Reads a manifest as the API server does before it validates: a field set to `null` whose
/// schema is not `nullable` is taken as absent (so a required one is then missing, and a
/// defaulted one gets its default), and a whole number written as a float (`3.0`) in an
/// integer field is that integer.
pub fn normalize(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            let properties = schema.get("properties").and_then(Value::as_object);
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            map.retain(|key, child| {
                let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) else {
                    return true;
                };
                if child.is_null() {
                    return child_schema.get("nullable").and_then(Value::as_bool) == Some(true);
                }
                normalize(child_schema, child);
                true
            });
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                items
                    .iter_mut()
                    .for_each(|item| normalize(item_schema, item));
            }
        }
        Value::Number(n) if schema.get("type").and_then(Value::as_str) == Some("integer") => {
            // The API server's bound for a float it reads as an integer: 2^53.
            const EXACT: f64 = 9_007_199_254_740_992.0;
            if let Some(f) = n.as_f64().filter(|f| n.is_f64() && f.fract() == 0.0)
                && f.abs() <= EXACT
            {
                *value = Value::from(f as i64);
            }
        }
        _ => {}
    }
}

/// Checks `value` against `schema`, appending one problem per violation under `path`.
pub fn check(schema: &Value, value: &Value, path: &str, problems: &mut Vec<FieldProblem>) {
    let mut report = |message: String| problems.push(FieldProblem::new(display(path), message));
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            report("must not be null".into());
        }
        return;
    }
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
        || schema
            .get("x-kubernetes-int-or-string")
            .and_then(Value::as_bool)
            == Some(true)
    {
        return;
    }
    let expected = schema.get("type").and_then(Value::as_str);
    if let Some(expected) = expected
        && !has_type(value, expected)
    {
        report(format!(
            "must be of type {expected}, got {}",
            type_name(value)
        ));
        return;
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(Value::to_string).collect();
        report(format!(
            "unsupported value {value}: must be one of {}",
            list.join(", ")
        ));
    }
    match value {
        Value::String(s) => check_string(schema, s, &mut report),
        Value::Number(n) => check_number(schema, n.as_f64().unwrap_or_default(), &mut report),
        Value::Array(items) => check_array(schema, items, path, problems),
        Value::Object(map) => check_object(schema, map, path, problems),
        Value::Bool(_) | Value::Null => {}
    }
}

fn check_string(schema: &Value, s: &str, report: &mut impl FnMut(String)) {
    let len = s.chars().count() as u64;
    if let Some(min) = schema.get("minLength").and_then(Value::as_u64)
        && len < min
    {
        report(format!("must be at least {min} characters long"));
    }
    if let Some(max) = schema.get("maxLength").and_then(Value::as_u64)
        && len > max
    {
        report(format!("must be at most {max} characters long, got {len}"));
    }
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
        let matches = regex_lite::Regex::new(pattern)
            .map(|re| re.is_match(s))
            .unwrap_or(true);
        if !matches {
            report(format!("invalid value {s:?}: must match '{pattern}'"));
        }
    }
}

fn check_number(schema: &Value, n: f64, report: &mut impl FnMut(String)) {
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && n < min
    {
        report(format!("must be greater than or equal to {min}, got {n}"));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && n > max
    {
        report(format!("must be less than or equal to {max}, got {n}"));
    }
}

fn check_array(schema: &Value, items: &[Value], path: &str, problems: &mut Vec<FieldProblem>) {
    let len = items.len() as u64;
    if let Some(min) = schema.get("minItems").and_then(Value::as_u64)
        && len < min
    {
        problems.push(FieldProblem::new(
            display(path),
            format!("must have at least {min} items"),
        ));
    }
    if let Some(max) = schema.get("maxItems").and_then(Value::as_u64)
        && len > max
    {
        problems.push(FieldProblem::new(
            display(path),
            format!("must have at most {max} items, got {len}"),
        ));
    }
    if schema.get("x-kubernetes-list-type").and_then(Value::as_str) == Some("set") {
        for (i, item) in items.iter().enumerate() {
            if items[..i].contains(item) {
                problems.push(FieldProblem::new(
                    format!("{}[{i}]", display(path)),
                    format!("duplicate value {item}"),
                ));
            }
        }
    }
    if let Some(item_schema) = schema.get("items") {
        for (i, item) in items.iter().enumerate() {
            check(item_schema, item, &format!("{path}[{i}]"), problems);
        }
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    problems: &mut Vec<FieldProblem>,
) {
    let properties = schema.get("properties").and_then(Value::as_object);
    if let Some(required) = schema.get("required").and_then(Value::as_array) {
        for field in required.iter().filter_map(Value::as_str) {
            if !map.contains_key(field) {
                problems.push(FieldProblem::new(
                    display(&join(path, field)),
                    "Required value",
                ));
            }
        }
    }
    if let Some(max) = schema.get("maxProperties").and_then(Value::as_u64)
        && map.len() as u64 > max
    {
        problems.push(FieldProblem::new(
            display(path),
            format!("must have at most {max} entries"),
        ));
    }
    let additional = schema.get("additionalProperties");
    for (key, value) in map {
        let child = join(path, key);
        match (properties.and_then(|p| p.get(key)), additional) {
            (Some(prop), _) => check(prop, value, &child, problems),
            (None, Some(extra)) if extra.is_object() => check(extra, value, &child, problems),
            (None, Some(Value::Bool(true))) => {}
            (None, _) => problems.push(FieldProblem::new(display(&child), "unknown field")),
        }
    }
}

fn has_type(value: &Value, expected: &str) -> bool {
    match expected {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "boolean" => value.is_boolean(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        _ => true,
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn display(path: &str) -> String {
    if path.is_empty() {
        "<root>".to_string()
    } else {
        path.to_string()
    }
}
