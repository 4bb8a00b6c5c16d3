//! Rendering a Helm chart as `helm install` does, for the subset of Helm the chart keeps to: values
//! (the chart's `values.yaml`, coalesced with the user's, and checked against its
//! `values.schema.json`), `.Values`, `.Chart`, `.Release`, the templates in `templates/*.yaml` and
//! `templates/NOTES.txt` with the definitions of `templates/_*.tpl`, and the sprig and Helm
//! functions in [`FUNCTIONS`].

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use gtmpl::{Context, Func, FuncError, Template, Value as Tmpl};
use serde_json::{Map, Value, json};

/// The sprig and Helm functions the chart may use, with their semantics.
pub const FUNCTIONS: &[(&str, Func)] = &[
    ("toYaml", to_yaml as Func),
    ("nindent", nindent as Func),
    ("indent", indent as Func),
    ("quote", quote as Func),
    ("default", default as Func),
    ("required", required as Func),
    ("include", include as Func),
];

/// The file of `templates/` Helm prints after an install rather than applying it.
const NOTES: &str = "NOTES.txt";

/// The chart's JSON Schema of its values, which Helm checks them against before rendering.
const SCHEMA: &str = "values.schema.json";

/// The release a chart is rendered as: `helm install NAME CHART --namespace NAMESPACE`.
#[derive(Debug, Clone, Copy)]
pub struct Release<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
}

/// What `helm install` makes of a chart.
#[derive(Debug)]
pub struct Rendered {
    /// The templates' output, in file name order, as one YAML stream (`---` between templates, as
    /// `helm template` prints them).
    pub manifests: String,
    /// `templates/NOTES.txt` rendered (empty without one): what Helm prints after an install.
    pub notes: String,
}

/// Renders the chart in `dir` as `release`, with `values` over its defaults.
///
/// # Errors
/// Unreadable files, YAML errors, values the chart's schema refuses, template errors (a failed
/// `required` among them).
pub fn render(dir: &Path, release: Release<'_>, values: Option<&Value>) -> Result<Rendered, String> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    let chart: Value =
        serde_saphyr::from_str(&read("Chart.yaml")?).map_err(|e| format!("Chart.yaml: {e}"))?;
    let mut merged: Value =
        serde_saphyr::from_str(&read("values.yaml")?).map_err(|e| format!("values.yaml: {e}"))?;
    if let Some(values) = values {
        coalesce(&mut merged, values);
    }
    check_schema(dir, &merged)?;
    let context = json!({
        "Values": merged,
        "Chart": {
            "Name": chart["name"],
            "Version": chart["version"],
            "AppVersion": chart["appVersion"],
        },
        "Release": { "Name": release.name, "Namespace": release.namespace, "Service": "Helm" },
    });
    let context = Context::from(to_tmpl(&context));

    let templates = dir.join("templates");
    let mut names: Vec<String> = std::fs::read_dir(&templates)
        .map_err(|e| format!("{}: {e}", templates.display()))?
        .flatten()
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    let helpers = names
        .iter()
        .filter(|n| n.starts_with('_') && n.ends_with(".tpl"))
        .map(|helper| Ok((helper.clone(), read(&format!("templates/{helper}"))?)))
        .collect::<Result<Vec<_>, String>>()?;
    with_helpers(helpers, |helpers| {
        let render_file = |name: &str| {
            let text = read(&format!("templates/{name}"))?;
            parse_with_helpers(name, &text, helpers)?
                .render(&context)
                .map_err(|e| format!("templates/{name}: {e}"))
        };
        let mut manifests = String::new();
        for name in names.iter().filter(|n| n.ends_with(".yaml")) {
            let rendered = render_file(name)?;
            let chart_name = chart["name"].as_str().unwrap_or("");
            manifests.push_str(&format!("---\n# Source: {chart_name}/templates/{name}\n{rendered}\n"));
        }
        let notes = if names.iter().any(|n| n == NOTES) { render_file(NOTES)? } else { String::new() };
        Ok(Rendered { manifests, notes })
    })
}

/// The values against the chart's `values.schema.json`, when it has one, as Helm checks them: every
/// problem, at its place in the values.
fn check_schema(dir: &Path, values: &Value) -> Result<(), String> {
    let text = match std::fs::read_to_string(dir.join(SCHEMA)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{SCHEMA}: {e}")),
    };
    let schema: Value = serde_json::from_str(&text).map_err(|e| format!("{SCHEMA}: {e}"))?;
    let validator = jsonschema::validator_for(&schema).map_err(|e| format!("{SCHEMA}: {e}"))?;
    let problems: Vec<String> =
        validator.iter_errors(values).map(|e| format!("- at '{}': {e}", e.instance_path())).collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "values don't meet the specifications of the schema ({SCHEMA}):\n{}",
            problems.join("\n")
        ))
    }
}

thread_local! {
    /// The chart's `templates/_*.tpl` (file name, text) while it renders. `include` needs the
    /// definitions, and gtmpl's functions are plain `fn`s with nothing but their arguments.
    static HELPERS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `render` with `helpers` as the definitions `include` finds.
fn with_helpers<T>(helpers: Vec<(String, String)>, render: impl FnOnce(&[(String, String)]) -> T) -> T {
    let previous = HELPERS.with(|h| h.replace(helpers));
    let result = HELPERS.with(|h| render(&h.borrow()));
    HELPERS.with(|h| h.replace(previous));
    result
}

/// The template `name` (`text`), with the functions and the definitions of `helpers`.
fn parse_with_helpers(name: &str, text: &str, helpers: &[(String, String)]) -> Result<Template, String> {
    let mut template = Template::with_name(name);
    template.add_funcs(FUNCTIONS);
    for (helper, helper_text) in helpers {
        template
            .add_template(helper.as_str(), helper_text.as_str())
            .map_err(|e| format!("templates/{helper}: {e}"))?;
    }
    template.parse(text).map_err(|e| format!("templates/{name}: {e}"))?;
    Ok(template)
}

/// Helm's coalescing of user values over the chart's: maps merge key by key, anything else replaces,
/// and a null removes the key.
pub fn coalesce(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                if value.is_null() {
                    base.remove(key);
                } else if let Some(existing) = base.get_mut(key) {
                    coalesce(existing, value);
                } else {
                    base.insert(key.clone(), value.clone());
                }
            }
        }
        (base, over) => *base = over.clone(),
    }
}

/// JSON to template values. Objects become Go maps (`Value::Map`): a missing key is `<no value>`, not
/// an error, as with Helm's `map[string]interface{}` values.
fn to_tmpl(value: &Value) -> Tmpl {
    match value {
        Value::Null => Tmpl::Nil,
        Value::Bool(b) => Tmpl::Bool(*b),
        Value::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Tmpl::from(u),
            (None, Some(i), _) => Tmpl::from(i),
            (None, None, Some(f)) => Tmpl::from(f),
            _ => Tmpl::Nil,
        },
        Value::String(s) => Tmpl::String(s.clone()),
        Value::Array(a) => Tmpl::Array(a.iter().map(to_tmpl).collect()),
        Value::Object(o) => {
            Tmpl::Map(o.iter().map(|(k, v)| (k.clone(), to_tmpl(v))).collect::<HashMap<_, _>>())
        }
    }
}

/// Template values back to JSON (for `toYaml`).
fn to_json(value: &Tmpl) -> Value {
    match value {
        Tmpl::NoValue | Tmpl::Nil | Tmpl::Function(_) => Value::Null,
        Tmpl::Bool(b) => Value::Bool(*b),
        Tmpl::String(s) => Value::String(s.clone()),
        Tmpl::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => json!(u),
            (None, Some(i), _) => json!(i),
            (None, None, Some(f)) => json!(f),
            _ => Value::Null,
        },
        Tmpl::Array(a) => Value::Array(a.iter().map(to_json).collect()),
        Tmpl::Object(o) | Tmpl::Map(o) => {
            // Sorted keys, as Go's YAML encoder writes maps.
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            Value::Object(keys.into_iter().map(|k| (k.clone(), to_json(&o[k]))).collect::<Map<_, _>>())
        }
    }
}

/// sprig's `empty`: nil, false, 0, "", and empty lists and maps.
fn is_empty(value: &Tmpl) -> bool {
    match value {
        Tmpl::NoValue | Tmpl::Nil => true,
        Tmpl::Bool(b) => !b,
        Tmpl::String(s) => s.is_empty(),
        Tmpl::Number(n) => n.as_f64().map(|f| f == 0.0).or(n.as_i64().map(|i| i == 0)).unwrap_or(false),
        Tmpl::Array(a) => a.is_empty(),
        Tmpl::Object(o) | Tmpl::Map(o) => o.is_empty(),
        Tmpl::Function(_) => false,
    }
}

/// Helm's `required MESSAGE VALUE`: VALUE, or the error MESSAGE when VALUE is nil or "".
fn required(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    match args {
        [message, Tmpl::NoValue | Tmpl::Nil] => Err(FuncError::Generic(strval(message))),
        [message, Tmpl::String(s)] if s.is_empty() => Err(FuncError::Generic(strval(message))),
        [_, value] => Ok(value.clone()),
        _ => Err(FuncError::ExactlyXArgs("required".into(), 2)),
    }
}

/// Helm's `include NAME DOT`: the output of the definition NAME rendered with DOT, as a string (which,
/// unlike a `template` action's, can be piped).
fn include(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    let [Tmpl::String(name), dot] = args else {
        return Err(FuncError::Generic("include takes a template name and a value".into()));
    };
    // A JSON string is a Go string literal too.
    let call = format!("{{{{ template {} . }}}}", Value::String(name.clone()));
    HELPERS.with(|helpers| {
        parse_with_helpers("include", &call, &helpers.borrow())
            .map_err(FuncError::Generic)?
            .render(&Context::from(dot.clone()))
            .map(Tmpl::String)
            .map_err(|e| FuncError::Generic(format!("include {name:?}: {e}")))
    })
}

/// `default DEFAULT GIVEN`: GIVEN unless it is empty (or absent).
fn default(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    match args {
        [fallback] => Ok(fallback.clone()),
        [fallback, given, ..] => Ok(if is_empty(given) { fallback.clone() } else { given.clone() }),
        [] => Err(FuncError::AtLeastXArgs("default".into(), 1)),
    }
}

/// sprig's `strval`: strings as they are, anything else as Go prints it.
fn strval(value: &Tmpl) -> String {
    match value {
        Tmpl::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `quote ARGS...`: each non-nil argument in double quotes (Go's `%q`), joined by spaces.
fn quote(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    let quoted: Vec<String> = args
        .iter()
        .filter(|arg| !matches!(arg, Tmpl::Nil | Tmpl::NoValue))
        .map(|arg| Value::String(strval(arg)).to_string())
        .collect();
    Ok(Tmpl::String(quoted.join(" ")))
}

fn width(args: &[Tmpl], name: &str) -> Result<(usize, String), FuncError> {
    match args {
        [Tmpl::Number(n), text] => {
            let width = n.as_u64().ok_or_else(|| FuncError::Generic(format!("{name}: a width >= 0")))?;
            let width = usize::try_from(width).map_err(|_| FuncError::Generic(format!("{name}: width")))?;
            Ok((width, strval(text)))
        }
        _ => Err(FuncError::Generic(format!("{name} takes a width and a string"))),
    }
}

/// `indent N TEXT`: every line of TEXT after N spaces.
fn indent(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    let (width, text) = width(args, "indent")?;
    let pad = " ".repeat(width);
    Ok(Tmpl::String(format!("{pad}{}", text.replace('\n', &format!("\n{pad}")))))
}

/// `nindent N TEXT`: a newline, then `indent N TEXT`.
fn nindent(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    let indented = indent(args)?;
    Ok(Tmpl::String(format!("\n{}", strval(&indented))))
}

/// `toYaml VALUE`: VALUE as block YAML in the style of Go's encoder (sorted keys, two spaces, list
/// items at their key's indentation), without the final newline (as Helm trims it). Strings are
/// written plain when that cannot change their meaning, else double-quoted.
fn to_yaml(args: &[Tmpl]) -> Result<Tmpl, FuncError> {
    let [value] = args else { return Err(FuncError::ExactlyXArgs("toYaml".into(), 1)) };
    let mut out = String::new();
    write_yaml(&to_json(value), 0, &mut out);
    Ok(Tmpl::String(out.trim_end_matches('\n').to_owned()))
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(s) if plain_safe(s) => s.clone(),
        Value::Null => "null".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        other => other.to_string(),
    }
}

/// Whether a string may be written unquoted: a word that YAML 1.1 and 1.2 read as that same string.
fn plain_safe(s: &str) -> bool {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic());
    let rest_ok = s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '/' | '-' | '_'));
    let keyword = matches!(
        s.to_ascii_lowercase().as_str(),
        "true" | "false" | "yes" | "no" | "on" | "off" | "y" | "n" | "null" | "nan" | "inf"
    );
    // Quantities such as 100m and 200Mi (digits then a unit) are strings in either version.
    let quantity = {
        let digits = s.trim_start_matches(|c: char| c.is_ascii_digit());
        digits.len() < s.len() && matches!(digits, "m" | "k" | "M" | "G" | "T" | "Ki" | "Mi" | "Gi" | "Ti")
    };
    (first_ok && rest_ok && !keyword) || quantity
}

fn is_block(value: &Value) -> bool {
    match value {
        Value::Object(o) => !o.is_empty(),
        Value::Array(a) => !a.is_empty(),
        _ => false,
    }
}

fn write_yaml(value: &Value, depth: usize, out: &mut String) {
    let pad = " ".repeat(depth);
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, item) in map {
                let key = scalar(&Value::String(key.clone()));
                match item {
                    Value::Object(_) if is_block(item) => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        write_yaml(item, depth + 2, out);
                    }
                    Value::Array(_) if is_block(item) => {
                        out.push_str(&format!("{pad}{key}:\n"));
                        write_yaml(item, depth, out);
                    }
                    _ => out.push_str(&format!("{pad}{key}: {}\n", scalar(item))),
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for item in items {
                if is_block(item) {
                    let mut nested = String::new();
                    write_yaml(item, depth + 2, &mut nested);
                    // The first line's indentation becomes the dash.
                    out.push_str(&format!("{pad}- {}", &nested[depth + 2..]));
                } else {
                    out.push_str(&format!("{pad}- {}\n", scalar(item)));
                }
            }
        }
        other => out.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(template: &str, values: Value) -> String {
        let mut t = Template::with_name("t");
        t.add_funcs(FUNCTIONS);
        t.parse(template).expect("parses");
        t.render(&Context::from(to_tmpl(&values))).expect("renders")
    }

    #[test]
    fn sprig_functions() {
        let values = json!({
            "sel": {"kubernetes.io/os": "linux", "a": "true"},
            "tol": [{"operator": "Exists", "effect": "NoSchedule"}, {"key": "k"}],
            "res": {"requests": {"cpu": "100m", "memory": "100Mi"}, "limits": {}},
            "cron": "*/5 * * * *",
            "n": 0,
            "empty": "",
            "nested": [["a", 1]],
        });
        let out = run(
            "x:{{ toYaml .sel | nindent 2 }}\ny:{{ toYaml .tol | nindent 2 }}\nz:{{ toYaml .res | nindent 2 }}\n",
            values.clone(),
        );
        assert_eq!(
            out,
            "x:\n  a: \"true\"\n  kubernetes.io/os: linux\ny:\n  - effect: NoSchedule\n    operator: Exists\n  - key: k\nz:\n  limits: {}\n  requests:\n    cpu: 100m\n    memory: 100Mi\n"
        );
        let parsed: Value = serde_saphyr::from_str(&out).expect("yaml");
        assert_eq!(parsed["x"], values["sel"]);
        assert_eq!(parsed["y"], values["tol"]);
        assert_eq!(toyaml_of(&values["nested"]), "- - a\n  - 1");
        assert_eq!(
            run("{{ .cron | quote }} {{ quote .empty 1 }}", values.clone()),
            "\"*/5 * * * *\" \"\" \"1\""
        );
        assert_eq!(
            run(
                "{{ .empty | default \"d\" }} {{ .missing | default \"m\" }} {{ .cron | default \"d\" }}",
                values.clone()
            ),
            "d m */5 * * * *"
        );
        assert_eq!(run("{{ \"a\\nb\" | indent 3 }}", values), "   a\n   b");
    }

    fn toyaml_of(value: &Value) -> String {
        match to_yaml(&[to_tmpl(value)]) {
            Ok(Tmpl::String(s)) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn required_and_include() {
        let values = json!({"set": "x", "empty": "", "zero": 0, "no": false});
        assert_eq!(
            run(
                "{{ required \"m\" .set }} {{ required \"m\" .zero }} {{ required \"m\" .no }}",
                values.clone()
            ),
            "x 0 false"
        );
        for missing in [".empty", ".missing"] {
            let mut t = Template::with_name("t");
            t.add_funcs(FUNCTIONS);
            t.parse(format!("{{{{ required \"give it\" {missing} }}}}")).expect("parses");
            let error = t.render(&Context::from(to_tmpl(&values))).expect_err("fails").to_string();
            assert!(error.contains("give it"), "{error}");
        }

        let helpers = vec![(
            "_helpers.tpl".to_owned(),
            "{{- define \"kv\" -}}\na: {{ .set }}\nb: {{ include \"inner\" . }}\n{{- end -}}{{- define \"inner\" -}}{{ .zero }}{{- end -}}".to_owned(),
        )];
        let out = with_helpers(helpers, |helpers| {
            parse_with_helpers("t", "m:{{ include \"kv\" . | nindent 2 }}", helpers)
                .and_then(|t| t.render(&Context::from(to_tmpl(&values))).map_err(|e| e.to_string()))
        });
        assert_eq!(out.as_deref(), Ok("m:\n  a: x\n  b: 0"));
        // Outside a chart's rendering there is nothing to include.
        let mut t = Template::with_name("t");
        t.add_funcs(FUNCTIONS);
        t.parse("{{ include \"kv\" . }}").expect("parses");
        assert!(t.render(&Context::from(to_tmpl(&values))).is_err());
    }

    #[test]
    fn values_are_checked_against_the_schema_the_chart_has() {
        let dir = tempfile::tempdir().expect("a directory");
        assert_eq!(check_schema(dir.path(), &json!({"anything": 1})), Ok(()));
        let schema = json!({
            "$schema": "http://json-schema.org/draft-07/schema#",
            "additionalProperties": false,
            "properties": {"a": {"type": "integer"}},
        });
        std::fs::write(dir.path().join(SCHEMA), schema.to_string()).expect("written");
        assert_eq!(check_schema(dir.path(), &json!({"a": 1})), Ok(()));
        let error = check_schema(dir.path(), &json!({"a": "1", "b": 2})).expect_err("refused");
        assert!(error.contains("at '/a'") && error.contains("'b' was unexpected"), "{error}");
    }

    #[test]
    fn coalescing() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "d": [1], "e": 1});
        coalesce(&mut base, &json!({"a": {"c": 3}, "d": [2, 3], "e": null, "f": "x"}));
        assert_eq!(base, json!({"a": {"b": 1, "c": 3}, "d": [2, 3], "f": "x"}));
    }
}
