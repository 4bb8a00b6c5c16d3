//! Structural schemas of custom resources (`spec.versions[].schema.openAPIV3Schema`), applied to every
//! write as the apiextensions API server does:
//!
//! 1. [`Schema::normalise`]: prune unknown fields (except under `x-kubernetes-preserve-unknown-fields`
//!    or `additionalProperties: true`), drop `null` values of fields that are not `nullable` (replacing
//!    them with the field's `default` if it has one), fill in absent fields that have a `default`, and
//!    turn whole floating-point numbers into integers (as the Kubernetes JSON decoder does).
//! 2. [`Schema::validate`]: `type`, `x-kubernetes-int-or-string`, `nullable`, `required`, `enum`,
//!    `minimum`/`maximum` (with `exclusiveMinimum`/`exclusiveMaximum`), `minLength`/`maxLength`,
//!    `pattern`, `minItems`/`maxItems`, `minProperties`/`maxProperties`, collecting every error with
//!    its dotted field path (`spec.allocations.5.id`), as the real server reports them.
//!
//! Not modelled: `format`, `allOf`/`anyOf`/`oneOf`/`not`, `uniqueItems`, `x-kubernetes-validations`
//! (CEL), list/map types, and metadata restrictions beyond the name rules every object gets. The
//! root's (and embedded resources') `apiVersion`, `kind` and `metadata` are left alone.

use std::collections::BTreeMap;

use regex::Regex;
use serde_json::{Map, Number, Value};

use super::error::{FieldError, render_value};

/// The JSON types a schema's `type` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonType {
    String,
    Integer,
    Number,
    Boolean,
    Object,
    Array,
}

impl JsonType {
    fn parse(name: &str) -> Option<JsonType> {
        Some(match name {
            "string" => JsonType::String,
            "integer" => JsonType::Integer,
            "number" => JsonType::Number,
            "boolean" => JsonType::Boolean,
            "object" => JsonType::Object,
            "array" => JsonType::Array,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            JsonType::String => "string",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::Boolean => "boolean",
            JsonType::Object => "object",
            JsonType::Array => "array",
        }
    }

    fn matches(self, value: &Value) -> bool {
        match self {
            JsonType::String => value.is_string(),
            JsonType::Integer => is_integer(value),
            JsonType::Number => value.is_number(),
            JsonType::Boolean => value.is_boolean(),
            JsonType::Object => value.is_object(),
            JsonType::Array => value.is_array(),
        }
    }
}

fn is_integer(value: &Value) -> bool {
    value.is_i64() || value.is_u64()
}

/// The name of a value's JSON type, as validation errors spell it.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(value) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// What happens to object fields that `properties` does not name.
#[derive(Debug, Default)]
enum Unknown {
    /// Dropped (the structural default).
    #[default]
    Prune,
    /// Kept as they are (`additionalProperties: true`).
    Keep,
    /// Kept, each value following this schema (`additionalProperties: {...}`, a map).
    Schema(Box<Schema>),
}

/// A parsed structural schema node.
#[derive(Debug, Default)]
pub(crate) struct Schema {
    json_type: Option<JsonType>,
    nullable: bool,
    int_or_string: bool,
    preserve_unknown: bool,
    embedded_resource: bool,
    properties: BTreeMap<String, Schema>,
    unknown: Unknown,
    items: Option<Box<Schema>>,
    required: Vec<String>,
    enumeration: Vec<Value>,
    minimum: Option<(f64, bool)>,
    maximum: Option<(f64, bool)>,
    min_length: Option<u64>,
    max_length: Option<u64>,
    min_items: Option<u64>,
    max_items: Option<u64>,
    min_properties: Option<u64>,
    max_properties: Option<u64>,
    pattern: Option<(String, Regex)>,
    default: Option<Value>,
}

fn flag(node: &Value, key: &str) -> bool {
    node.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn count(node: &Value, key: &str) -> Option<u64> {
    node.get(key).and_then(Value::as_u64)
}

fn bound(node: &Value, key: &str, exclusive_key: &str) -> Option<(f64, bool)> {
    node.get(key).and_then(Value::as_f64).map(|limit| (limit, flag(node, exclusive_key)))
}

/// Top-level fields every resource object keeps whatever its schema says.
fn is_resource_field(key: &str) -> bool {
    matches!(key, "apiVersion" | "kind" | "metadata")
}

fn child_path(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

/// Renders a schema bound the way Go prints it (`10`, not `10.0`).
fn render_bound(limit: f64) -> String {
    if limit.fract() == 0.0 && limit.abs() < 1e15 { format!("{}", limit as i64) } else { limit.to_string() }
}

impl Schema {
    /// Parses an `openAPIV3Schema` node. Unknown keywords are ignored; a `pattern` that the `regex`
    /// crate cannot compile is ignored too.
    pub(crate) fn parse(node: &Value) -> Schema {
        let properties = node
            .get("properties")
            .and_then(Value::as_object)
            .map(|properties| properties.iter().map(|(k, v)| (k.clone(), Schema::parse(v))).collect())
            .unwrap_or_default();
        let unknown = match node.get("additionalProperties") {
            Some(Value::Bool(true)) => Unknown::Keep,
            Some(schema @ Value::Object(_)) => Unknown::Schema(Box::new(Schema::parse(schema))),
            _ => Unknown::Prune,
        };
        Schema {
            json_type: node.get("type").and_then(Value::as_str).and_then(JsonType::parse),
            nullable: flag(node, "nullable"),
            int_or_string: flag(node, "x-kubernetes-int-or-string"),
            preserve_unknown: flag(node, "x-kubernetes-preserve-unknown-fields"),
            embedded_resource: flag(node, "x-kubernetes-embedded-resource"),
            properties,
            unknown,
            items: node
                .get("items")
                .filter(|items| items.is_object())
                .map(|items| Box::new(Schema::parse(items))),
            required: node
                .get("required")
                .and_then(Value::as_array)
                .map(|names| names.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default(),
            enumeration: node.get("enum").and_then(Value::as_array).cloned().unwrap_or_default(),
            minimum: bound(node, "minimum", "exclusiveMinimum"),
            maximum: bound(node, "maximum", "exclusiveMaximum"),
            min_length: count(node, "minLength"),
            max_length: count(node, "maxLength"),
            min_items: count(node, "minItems"),
            max_items: count(node, "maxItems"),
            min_properties: count(node, "minProperties"),
            max_properties: count(node, "maxProperties"),
            pattern: node
                .get("pattern")
                .and_then(Value::as_str)
                .and_then(|pattern| Regex::new(pattern).ok().map(|regex| (pattern.to_owned(), regex))),
            default: node.get("default").cloned(),
        }
    }

    /// Prunes, drops nulls, defaults (see the module documentation) a whole resource object.
    pub(crate) fn normalise(&self, object: &mut Value) {
        self.normalise_node(object, true);
    }

    fn normalise_node(&self, value: &mut Value, resource: bool) {
        match value {
            Value::Number(number) => {
                if let Some(float) = number.as_f64().filter(|_| number.is_f64())
                    && float.fract() == 0.0
                    && float.abs() < 9.0e15
                {
                    *number = Number::from(float as i64);
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = &self.items {
                    for item in items {
                        item_schema.normalise_node(item, false);
                    }
                }
            }
            Value::Object(map) => self.normalise_object(map, resource || self.embedded_resource),
            _ => {}
        }
    }

    fn normalise_object(&self, map: &mut Map<String, Value>, resource: bool) {
        match &self.unknown {
            Unknown::Schema(value_schema) => {
                map.retain(|_, value| {
                    !value.is_null() || value_schema.nullable || value_schema.default.is_some()
                });
                for value in map.values_mut() {
                    if let (Value::Null, false, Some(default)) =
                        (&*value, value_schema.nullable, &value_schema.default)
                    {
                        *value = default.clone();
                    }
                    value_schema.normalise_node(value, false);
                }
            }
            Unknown::Keep => {}
            Unknown::Prune if self.preserve_unknown => {}
            Unknown::Prune => {
                map.retain(|key, _| self.properties.contains_key(key) || (resource && is_resource_field(key)))
            }
        }
        for (key, property) in &self.properties {
            if resource && is_resource_field(key) {
                continue;
            }
            let missing_or_null = match map.get(key) {
                None => true,
                Some(Value::Null) => !property.nullable,
                Some(_) => false,
            };
            if missing_or_null {
                match &property.default {
                    Some(default) => {
                        map.insert(key.clone(), default.clone());
                    }
                    None => {
                        map.remove(key);
                        continue;
                    }
                }
            }
            if let Some(value) = map.get_mut(key) {
                property.normalise_node(value, false);
            }
        }
    }

    /// Every validation error of a (normalised) resource object.
    pub(crate) fn validate(&self, object: &Value) -> Vec<FieldError> {
        let mut errors = Vec::new();
        self.validate_node(object, "", true, &mut errors);
        errors
    }

    fn validate_node(&self, value: &Value, path: &str, resource: bool, errors: &mut Vec<FieldError>) {
        if value.is_null() && self.nullable {
            return;
        }
        let expected = if self.int_or_string {
            (!(value.is_string() || is_integer(value))).then_some("integer,string")
        } else {
            self.json_type.filter(|t| !t.matches(value)).map(JsonType::name)
        };
        if let Some(expected) = expected {
            let actual = type_name(value);
            errors.push(FieldError::invalid(
                path,
                &format!("\"{actual}\""),
                &format!("{path} in body must be of type {expected}: \"{actual}\""),
            ));
            return;
        }
        if !self.enumeration.is_empty() && !self.enumeration.contains(value) {
            errors.push(FieldError::not_supported(path, value, &self.enumeration));
        }
        match value {
            Value::Number(number) => self.validate_number(number, path, errors),
            Value::String(text) => self.validate_string(text, path, errors),
            Value::Array(items) => {
                if let Some(min) = self.min_items.filter(|min| (items.len() as u64) < *min) {
                    errors.push(FieldError::invalid(
                        path,
                        &items.len().to_string(),
                        &format!("{path} in body should have at least {min} items"),
                    ));
                }
                if let Some(max) = self.max_items.filter(|max| (items.len() as u64) > *max) {
                    errors.push(FieldError::too_many(path, items.len(), max));
                }
                if let Some(item_schema) = &self.items {
                    for (index, item) in items.iter().enumerate() {
                        item_schema.validate_node(item, &child_path(path, &index.to_string()), false, errors);
                    }
                }
            }
            Value::Object(map) => self.validate_object(map, path, resource || self.embedded_resource, errors),
            Value::Null | Value::Bool(_) => {}
        }
    }

    fn validate_number(&self, number: &Number, path: &str, errors: &mut Vec<FieldError>) {
        let Some(actual) = number.as_f64() else { return };
        if let Some((min, exclusive)) = self.minimum
            && (actual < min || (exclusive && actual == min))
        {
            let relation = if exclusive { "greater than" } else { "greater than or equal to" };
            errors.push(FieldError::invalid(
                path,
                &number.to_string(),
                &format!("{path} in body should be {relation} {}", render_bound(min)),
            ));
        }
        if let Some((max, exclusive)) = self.maximum
            && (actual > max || (exclusive && actual == max))
        {
            let relation = if exclusive { "less than" } else { "less than or equal to" };
            errors.push(FieldError::invalid(
                path,
                &number.to_string(),
                &format!("{path} in body should be {relation} {}", render_bound(max)),
            ));
        }
    }

    fn validate_string(&self, text: &str, path: &str, errors: &mut Vec<FieldError>) {
        let length = text.chars().count() as u64;
        let rendered = render_value(&Value::from(text));
        if let Some(min) = self.min_length.filter(|min| length < *min) {
            errors.push(FieldError::invalid(
                path,
                &rendered,
                &format!("{path} in body should be at least {min} chars long"),
            ));
        }
        if let Some(max) = self.max_length.filter(|max| length > *max) {
            errors.push(FieldError::too_long(path, max));
        }
        if let Some((pattern, regex)) = &self.pattern
            && !regex.is_match(text)
        {
            errors.push(FieldError::invalid(
                path,
                &rendered,
                &format!("{path} in body should match '{pattern}'"),
            ));
        }
    }

    fn validate_object(
        &self,
        map: &Map<String, Value>,
        path: &str,
        resource: bool,
        errors: &mut Vec<FieldError>,
    ) {
        for name in &self.required {
            if !map.contains_key(name) {
                errors.push(FieldError::required(&child_path(path, name), ""));
            }
        }
        let properties = map.len() as u64;
        if let Some(min) = self.min_properties.filter(|min| properties < *min) {
            errors.push(FieldError::invalid(
                path,
                &properties.to_string(),
                &format!("{path} in body should have at least {min} properties"),
            ));
        }
        if let Some(max) = self.max_properties.filter(|max| properties > *max) {
            errors.push(FieldError::too_many(path, map.len(), max));
        }
        // Known properties in name order (deterministic), then map entries in the object's order.
        for (key, property) in &self.properties {
            if let Some(value) = map.get(key)
                && !(resource && is_resource_field(key))
            {
                property.validate_node(value, &child_path(path, key), false, errors);
            }
        }
        if let Unknown::Schema(value_schema) = &self.unknown {
            for (key, value) in map {
                if !(self.properties.contains_key(key) || (resource && is_resource_field(key))) {
                    value_schema.validate_node(value, &child_path(path, key), false, errors);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pool_schema() -> Schema {
        Schema::parse(&json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["range"],
                    "properties": {
                        "range": {"type": "string", "pattern": "^[0-9./:a-f]+$"},
                        "allocations": {
                            "type": "object",
                            "default": {},
                            "additionalProperties": {
                                "type": "object",
                                "required": ["id"],
                                "properties": {
                                    "id": {"type": "string"},
                                    "node": {"type": "string", "nullable": true},
                                },
                            },
                        },
                        "extra": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "mode": {"type": "string", "enum": ["a", "b"]},
                        "size": {"type": "integer", "minimum": 1, "maximum": 10},
                        "port": {"x-kubernetes-int-or-string": true},
                    },
                },
            },
        }))
    }

    #[test]
    fn normalise_prunes_defaults_and_drops_nulls() {
        let mut object = json!({
            "apiVersion": "x/v1", "kind": "P", "metadata": {"name": "a", "whatever": 1},
            "junk": true,
            "spec": {
                "range": "10.0.0.0/8", "mode": null, "size": 2.0,
                "allocations": {"1": {"id": "c", "node": null, "junk": 1}, "2": null},
                "extra": {"anything": {"goes": [1]}},
            },
        });
        pool_schema().normalise(&mut object);
        assert_eq!(
            object,
            json!({
                "apiVersion": "x/v1", "kind": "P", "metadata": {"name": "a", "whatever": 1},
                "spec": {
                    "range": "10.0.0.0/8", "size": 2,
                    "allocations": {"1": {"id": "c", "node": null}},
                    "extra": {"anything": {"goes": [1]}},
                },
            })
        );
        assert!(object["spec"]["size"].is_i64());

        let mut bare = json!({"spec": {"range": "x"}});
        pool_schema().normalise(&mut bare);
        assert_eq!(bare, json!({"spec": {"range": "x", "allocations": {}}}));
    }

    #[test]
    fn validate_reports_every_error_with_its_path() {
        let object = json!({"spec": {
            "range": "zz", "mode": "c", "size": 11, "port": true,
            "allocations": {"5": {"id": 7}, "6": {}},
        }});
        let errors: Vec<String> = pool_schema().validate(&object).iter().map(ToString::to_string).collect();
        assert_eq!(
            errors,
            [
                r#"spec.allocations.5.id: Invalid value: "integer": spec.allocations.5.id in body must be of type string: "integer""#,
                "spec.allocations.6.id: Required value",
                r#"spec.mode: Unsupported value: "c": supported values: "a", "b""#,
                r#"spec.port: Invalid value: "boolean": spec.port in body must be of type integer,string: "boolean""#,
                r#"spec.range: Invalid value: "zz": spec.range in body should match '^[0-9./:a-f]+$'"#,
                "spec.size: Invalid value: 11: spec.size in body should be less than or equal to 10",
            ]
        );
        assert_eq!(
            pool_schema().validate(&json!({"spec": {}})).iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["spec.range: Required value"]
        );
    }
}
