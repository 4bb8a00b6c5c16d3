//! `labelSelector` and `fieldSelector` query parameters, for LIST, WATCH and DELETE collection.
//!
//! Labels support the whole selector grammar (`a=b`, `a==b`, `a!=b`, `a`, `!a`, `a in (x,y)`,
//! `a notin (x,y)`). Fields support `=`, `==` and `!=` on any dotted path (`metadata.name`,
//! `spec.nodeName`, `status.phase`): a real server accepts only a per-type list of field labels and
//! answers 400 for the others; the fake accepts them all and compares the field's scalar value as text
//! (a missing field is the empty string).

use serde_json::Value;

#[derive(Debug, Clone)]
enum LabelRequirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

#[derive(Debug, Clone)]
struct FieldRequirement {
    path: Vec<String>,
    value: String,
    equal: bool,
}

/// A parsed pair of selectors; the default matches everything.
#[derive(Debug, Clone, Default)]
pub(crate) struct Selector {
    labels: Vec<LabelRequirement>,
    fields: Vec<FieldRequirement>,
}

/// Splits on commas that are not inside parentheses (`a in (x,y),b`).
fn split_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0_i32, 0);
    for (index, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..index]);
                start = index + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms.into_iter().map(str::trim).filter(|term| !term.is_empty()).collect()
}

fn set_values(list: &str, term: &str) -> Result<Vec<String>, String> {
    let inner = list
        .trim()
        .strip_prefix('(')
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: {term}: values must be in parentheses"))?;
    Ok(inner.split(',').map(|value| value.trim().to_owned()).collect())
}

fn label_key(key: &str, term: &str) -> Result<String, String> {
    let key = key.trim();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err(format!("unable to parse requirement: {term}: invalid label key"));
    }
    Ok(key.to_owned())
}

fn parse_label_term(term: &str) -> Result<LabelRequirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(LabelRequirement::NotExists(label_key(key, term)?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(LabelRequirement::NotEquals(label_key(key, term)?, value.trim().to_owned()));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(LabelRequirement::Equals(label_key(key, term)?, value.trim().to_owned()));
    }
    if let Some((key, list)) = term.split_once(" notin ") {
        return Ok(LabelRequirement::NotIn(label_key(key, term)?, set_values(list, term)?));
    }
    if let Some((key, list)) = term.split_once(" in ") {
        return Ok(LabelRequirement::In(label_key(key, term)?, set_values(list, term)?));
    }
    Ok(LabelRequirement::Exists(label_key(term, term)?))
}

fn parse_field_term(term: &str) -> Result<FieldRequirement, String> {
    let (path, value, equal) = if let Some((path, value)) = term.split_once("!=") {
        (path, value, false)
    } else if let Some((path, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (path, value, true)
    } else {
        return Err(format!("invalid selector: '{term}'; can't understand '{term}'"));
    };
    let path = path.trim();
    if path.is_empty() {
        return Err(format!("invalid selector: '{term}'"));
    }
    Ok(FieldRequirement {
        path: path.split('.').map(str::to_owned).collect(),
        value: value.trim().to_owned(),
        equal,
    })
}

/// A scalar field rendered as text for comparison; absent or structured values are "".
fn field_text(object: &Value, path: &[String]) -> String {
    match path.iter().try_fold(object, |node, key| node.get(key)) {
        Some(Value::String(text)) => text.clone(),
        Some(value @ (Value::Number(_) | Value::Bool(_))) => value.to_string(),
        _ => String::new(),
    }
}

impl Selector {
    /// Parses the two query parameters; an error is a 400.
    pub(crate) fn parse(labels: Option<&str>, fields: Option<&str>) -> Result<Selector, String> {
        Ok(Selector {
            labels: split_terms(labels.unwrap_or_default())
                .into_iter()
                .map(parse_label_term)
                .collect::<Result<_, _>>()?,
            fields: split_terms(fields.unwrap_or_default())
                .into_iter()
                .map(parse_field_term)
                .collect::<Result<_, _>>()?,
        })
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let label =
            |key: &str| object.pointer("/metadata/labels").and_then(|l| l.get(key)).and_then(Value::as_str);
        let labels_match = self.labels.iter().all(|requirement| match requirement {
            LabelRequirement::Equals(key, value) => label(key) == Some(value.as_str()),
            LabelRequirement::NotEquals(key, value) => label(key) != Some(value.as_str()),
            LabelRequirement::Exists(key) => label(key).is_some(),
            LabelRequirement::NotExists(key) => label(key).is_none(),
            LabelRequirement::In(key, values) => label(key).is_some_and(|v| values.iter().any(|x| x == v)),
            LabelRequirement::NotIn(key, values) => {
                !label(key).is_some_and(|v| values.iter().any(|x| x == v))
            }
        });
        labels_match
            && self.fields.iter().all(|requirement| {
                (field_text(object, &requirement.path) == requirement.value) == requirement.equal
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn label_and_field_selectors() {
        let pod = json!({
            "metadata": {"name": "p", "namespace": "n", "labels": {"app": "web", "tier": "front"}},
            "spec": {"nodeName": "node-1"},
            "status": {"phase": "Running"},
        });
        let matches = |labels: &str, fields: &str| {
            Selector::parse(Some(labels), Some(fields)).map(|selector| selector.matches(&pod))
        };
        assert_eq!(matches("app=web,tier", "metadata.name=p,spec.nodeName==node-1"), Ok(true));
        assert_eq!(matches("app!=db,!missing,tier in (front, back),app notin (db)", ""), Ok(true));
        assert_eq!(matches("missing!=x", "status.phase!=Failed"), Ok(true));
        assert_eq!(matches("app=db", ""), Ok(false));
        assert_eq!(matches("tier notin (front)", ""), Ok(false));
        assert_eq!(matches("", "status.phase!=Running"), Ok(false));
        assert_eq!(matches("", "spec.missing="), Ok(true));
        assert!(matches("a in x", "").is_err());
        assert!(matches("", "nonsense").is_err());
    }
}
