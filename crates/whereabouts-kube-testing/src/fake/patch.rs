//! Patch documents: RFC 6902 JSON patch and RFC 7386 JSON merge patch, on `serde_json::Value`.
//!
//! The JSON patch follows the library the real API server uses (evanphx/json-patch v4), including its
//! quirks that clients rely on: a `test` whose value is `null` passes when the member is absent from
//! an existing object (the usual "only if absent" precondition), while it fails on a member holding a
//! non-null value and on a path whose parent is missing; a missing `value` member counts as `null`;
//! unknown operations fail when applied (422), not when decoded (only a document that is not an
//! array of objects is malformed, 400).

use serde_json::{Map, Value};

/// One decoded JSON patch operation.
pub(crate) type Operation = Map<String, Value>;

/// Decodes a JSON patch document; an error here is a malformed patch (400).
pub(crate) fn decode_json_patch(body: &[u8]) -> Result<Vec<Operation>, String> {
    let document: Value = serde_json::from_slice(body).map_err(|e| format!("invalid JSON patch: {e}"))?;
    let Value::Array(operations) = document else {
        return Err("invalid JSON patch: the document must be an array of operations".to_owned());
    };
    operations
        .into_iter()
        .map(|operation| match operation {
            Value::Object(operation) => Ok(operation),
            other => Err(format!("invalid JSON patch: an operation must be an object, not {other}")),
        })
        .collect()
}

/// Applies decoded operations in order. The caller passes a copy and keeps the original on error,
/// which makes the patch atomic. An error means the patch does not apply (422).
pub(crate) fn apply_json_patch(document: &mut Value, operations: &[Operation]) -> Result<(), String> {
    operations.iter().try_for_each(|operation| apply_operation(document, operation))
}

fn apply_operation(document: &mut Value, operation: &Operation) -> Result<(), String> {
    let op = operation.get("op").and_then(Value::as_str).unwrap_or_default();
    let path = member_pointer(operation, "path")?;
    let value = || operation.get("value").cloned().unwrap_or(Value::Null);
    match op {
        "add" => add(document, &path, value()),
        "remove" => remove(document, &path).map(drop),
        "replace" => {
            let target = get_mut(document, &path).ok_or_else(|| {
                format!("replace operation does not apply: doc is missing key: {}", show(&path))
            })?;
            *target = value();
            Ok(())
        }
        "move" => {
            let from = member_pointer(operation, "from")?;
            if from != path {
                let moved = remove(document, &from)?;
                add(document, &path, moved)?;
            }
            Ok(())
        }
        "copy" => {
            let from = member_pointer(operation, "from")?;
            let copied = get(document, &from).cloned().ok_or_else(|| {
                format!("copy operation does not apply: doc is missing from path: {}", show(&from))
            })?;
            add(document, &path, copied)
        }
        "test" => {
            let expected = value();
            // As in json-patch v4: an absent member of an existing object counts as null, but a
            // missing parent (or array element) fails the test whatever the value.
            let actual = match path.split_last() {
                None => Some(&*document),
                Some((last, parent)) => match get(document, parent) {
                    Some(Value::Object(map)) => Some(map.get(last).unwrap_or(&Value::Null)),
                    Some(Value::Array(items)) => array_index(last).and_then(|index| items.get(index)),
                    _ => None,
                },
            };
            match actual {
                Some(actual) if *actual == expected => Ok(()),
                _ => Err(format!("testing value {} failed: test failed", show(&path))),
            }
        }
        other => Err(format!("Unexpected kind: {other}")),
    }
}

/// The unescaped tokens of the JSON pointer in `operation[member]`.
fn member_pointer(operation: &Operation, member: &str) -> Result<Vec<String>, String> {
    let pointer = operation
        .get(member)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("operation is missing its \"{member}\" string"))?;
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let rest = pointer
        .strip_prefix('/')
        .ok_or_else(|| format!("JSON pointer must be empty or start with a \"/\": {pointer}"))?;
    Ok(rest.split('/').map(|token| token.replace("~1", "/").replace("~0", "~")).collect())
}

/// Renders tokens back into a pointer, for error messages.
fn show(tokens: &[String]) -> String {
    tokens.iter().map(|token| format!("/{}", token.replace('~', "~0").replace('/', "~1"))).collect()
}

/// An array index token: decimal digits only (RFC 6901).
fn array_index(token: &str) -> Option<usize> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
}

fn get<'a>(document: &'a Value, tokens: &[String]) -> Option<&'a Value> {
    tokens.iter().try_fold(document, |node, token| match node {
        Value::Object(map) => map.get(token),
        Value::Array(items) => array_index(token).and_then(|index| items.get(index)),
        _ => None,
    })
}

fn get_mut<'a>(document: &'a mut Value, tokens: &[String]) -> Option<&'a mut Value> {
    tokens.iter().try_fold(document, |node, token| match node {
        Value::Object(map) => map.get_mut(token),
        Value::Array(items) => array_index(token).and_then(|index| items.get_mut(index)),
        _ => None,
    })
}

fn add(document: &mut Value, tokens: &[String], value: Value) -> Result<(), String> {
    let Some((last, parent_tokens)) = tokens.split_last() else {
        *document = value;
        return Ok(());
    };
    let missing = || format!("add operation does not apply: doc is missing path: \"{}\"", show(tokens));
    match get_mut(document, parent_tokens).ok_or_else(missing)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(items) if last == "-" => {
            items.push(value);
            Ok(())
        }
        Value::Array(items) => {
            let index = array_index(last).filter(|index| *index <= items.len()).ok_or_else(|| {
                format!("add operation does not apply: index out of bounds: {}", show(tokens))
            })?;
            items.insert(index, value);
            Ok(())
        }
        _ => Err(missing()),
    }
}

fn remove(document: &mut Value, tokens: &[String]) -> Result<Value, String> {
    let missing = || format!("remove operation does not apply: doc is missing path: \"{}\"", show(tokens));
    let (last, parent_tokens) = tokens.split_last().ok_or_else(missing)?;
    match get_mut(document, parent_tokens).ok_or_else(missing)? {
        Value::Object(map) => map.shift_remove(last).ok_or_else(missing),
        Value::Array(items) => {
            let index = array_index(last).filter(|index| *index < items.len()).ok_or_else(missing)?;
            Ok(items.remove(index))
        }
        _ => Err(missing()),
    }
}

/// RFC 7386: objects merge recursively, `null` deletes a key, anything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.shift_remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn patched(mut document: Value, patch: Value) -> Result<Value, String> {
        let operations = decode_json_patch(patch.to_string().as_bytes())?;
        apply_json_patch(&mut document, &operations)?;
        Ok(document)
    }

    #[test]
    fn json_patch_operations() {
        let document = json!({"a": {"b": [1, 2]}, "c~/d": 1});
        assert_eq!(
            patched(
                document.clone(),
                json!([
                    {"op": "add", "path": "/a/b/-", "value": 3},
                    {"op": "add", "path": "/a/b/0", "value": 0},
                    {"op": "replace", "path": "/c~0~1d", "value": 2},
                    {"op": "copy", "from": "/a/b", "path": "/e"},
                    {"op": "move", "from": "/e/0", "path": "/f"},
                    {"op": "remove", "path": "/a/b/1"},
                    {"op": "test", "path": "/f", "value": 0},
                    {"op": "add", "path": "/a", "value": "replaced"},
                ])
            ),
            Ok(json!({"a": "replaced", "c~/d": 2, "e": [1, 2, 3], "f": 0}))
        );
        assert!(patched(document.clone(), json!([{"op": "test", "path": "/x", "value": null}])).is_ok());
        assert!(patched(document.clone(), json!([{"op": "test", "path": "/x/y", "value": null}])).is_err());
        assert!(patched(json!({"n": null}), json!([{"op": "test", "path": "/n", "value": null}])).is_ok());
        assert_eq!(
            patched(document.clone(), json!([{"op": "test", "path": "/a", "value": null}])),
            Err("testing value /a failed: test failed".to_owned())
        );
        for failing in [
            json!([{"op": "remove", "path": "/x"}]),
            json!([{"op": "replace", "path": "/x", "value": 1}]),
            json!([{"op": "add", "path": "/x/y", "value": 1}]),
            json!([{"op": "add", "path": "/a/b/5", "value": 1}]),
            json!([{"op": "frobnicate", "path": "/a"}]),
            json!([{"op": "add", "value": 1}]),
        ] {
            assert!(patched(document.clone(), failing.clone()).is_err(), "{failing}");
        }
        assert!(decode_json_patch(b"{\"op\": \"add\"}").is_err());
        assert!(decode_json_patch(b"[1]").is_err());
        assert!(decode_json_patch(b"[{").is_err());
    }

    #[test]
    fn merge_patch_deletes_with_null_and_merges_objects() {
        let mut document = json!({"a": {"b": 1, "c": 2}, "d": [1], "e": 1});
        merge_patch(&mut document, &json!({"a": {"b": null, "x": {"y": null, "z": 1}}, "d": [2], "e": null}));
        assert_eq!(document, json!({"a": {"c": 2, "x": {"z": 1}}, "d": [2]}));
    }
}
