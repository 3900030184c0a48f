//! A strict reader over one parsed document: every field a parser looks at
//! is taken by name, with its path (`spec.ports[1].targetPort`) for
//! messages, and [`Fields::finish`] refuses whatever was left untaken — so
//! a field skymesh cannot map is named in an error, never silently dropped.
//!
//! Must not: know any kind's fields; that is [`super::native`]'s and
//! [`super::k8s`]'s job.

use std::collections::{BTreeSet, HashMap};

use serde_json::{Map, Value};
use skymesh_proto::validate::ValidationError;

/// Result of reading a document.
pub(crate) type Result<T> = std::result::Result<T, ValidationError>;

/// An error at `field`.
pub(crate) fn invalid<T>(field: impl Into<String>, rule: impl Into<String>) -> Result<T> {
    Err(ValidationError {
        field: field.into(),
        rule: rule.into(),
    })
}

/// What a YAML value is, for messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// The fields of one mapping, taken one by one.
pub(crate) struct Fields<'a> {
    path: String,
    map: &'a Map<String, Value>,
    taken: BTreeSet<&'a str>,
}

impl<'a> Fields<'a> {
    /// The mapping `v` at `path` (empty for the document itself).
    pub(crate) fn new(path: &str, v: &'a Value) -> Result<Fields<'a>> {
        match v {
            Value::Object(map) => Ok(Fields {
                path: path.to_string(),
                map,
                taken: BTreeSet::new(),
            }),
            other => invalid(
                if path.is_empty() { "document" } else { path },
                format!("must be a mapping, not {}", type_name(other)),
            ),
        }
    }

    /// The path of `key` inside this mapping.
    pub(crate) fn path_of(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Takes `key`; `null` counts as absent.
    pub(crate) fn take(&mut self, key: &str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.taken.insert(k.as_str());
        (!v.is_null()).then_some(v)
    }

    /// Takes `key` and ignores its value (read-only fields the system
    /// writes, such as `status` or `uid`).
    pub(crate) fn ignore(&mut self, key: &str) {
        let _ = self.take(key);
    }

    /// Whether the mapping has `key` (taken or not).
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.get(key).is_some_and(|v| !v.is_null())
    }

    /// A string field.
    pub(crate) fn str(&mut self, key: &str) -> Result<Option<&'a str>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(other) => invalid(
                self.path_of(key),
                format!("must be a string, not {}", type_name(other)),
            ),
        }
    }

    /// An unsigned 32-bit number field.
    pub(crate) fn u32(&mut self, key: &str) -> Result<Option<u32>> {
        let field = self.path_of(key);
        match self.take(key) {
            None => Ok(None),
            Some(v) => number(&field, v).map(Some),
        }
    }

    /// A number field that Kubernetes writes as a string (`resourceVersion`);
    /// either form is read.
    pub(crate) fn u64_or_string(&mut self, key: &str) -> Result<Option<u64>> {
        let field = self.path_of(key);
        match self.take(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) => Ok(Some(v)),
                None => invalid(field, format!("{n} is not a non-negative integer")),
            },
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => match s.parse::<u64>() {
                Ok(v) => Ok(Some(v)),
                Err(_) => invalid(field, format!("{s:?} is not a resource version (a number)")),
            },
            Some(other) => invalid(field, format!("must be a number, not {}", type_name(other))),
        }
    }

    /// A boolean field.
    pub(crate) fn bool(&mut self, key: &str) -> Result<Option<bool>> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => invalid(
                self.path_of(key),
                format!("must be true or false, not {}", type_name(other)),
            ),
        }
    }

    /// A nested mapping.
    pub(crate) fn fields(&mut self, key: &str) -> Result<Option<Fields<'a>>> {
        let field = self.path_of(key);
        match self.take(key) {
            None => Ok(None),
            Some(v) => Fields::new(&field, v).map(Some),
        }
    }

    /// A list: each item with its path (`spec.ports[0]`).
    pub(crate) fn list(&mut self, key: &str) -> Result<Vec<(String, &'a Value)>> {
        let field = self.path_of(key);
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("{field}[{i}]"), v))
                .collect()),
            Some(other) => invalid(field, format!("must be a list, not {}", type_name(other))),
        }
    }

    /// A list of strings.
    pub(crate) fn strings(&mut self, key: &str) -> Result<Vec<String>> {
        self.list(key)?
            .into_iter()
            .map(|(field, v)| match v {
                Value::String(s) => Ok(s.clone()),
                other => invalid(field, format!("must be a string, not {}", type_name(other))),
            })
            .collect()
    }

    /// A mapping of strings to strings (labels, selector, annotations).
    /// Numbers and booleans are refused, as Kubernetes does: quote them.
    pub(crate) fn string_map(&mut self, key: &str) -> Result<HashMap<String, String>> {
        let Some(mut f) = self.fields(key)? else {
            return Ok(HashMap::new());
        };
        let mut out = HashMap::new();
        let keys: Vec<&'a String> = f.map.keys().collect();
        for k in keys {
            let field = f.path_of(k);
            match f.take(k) {
                Some(Value::String(s)) => {
                    out.insert(k.clone(), s.clone());
                }
                None => {
                    out.insert(k.clone(), String::new());
                }
                Some(other) => {
                    return invalid(
                        field,
                        format!(
                            "must be a string, not {} (quote it: \"{}\")",
                            type_name(other),
                            other
                        ),
                    );
                }
            }
        }
        Ok(out)
    }

    /// Refuses every field not taken, naming the first one; `hint` says
    /// what this mapping does accept.
    pub(crate) fn finish(self, hint: &str) -> Result<()> {
        match self.map.keys().find(|k| !self.taken.contains(k.as_str())) {
            None => Ok(()),
            Some(k) => invalid(
                self.path_of(k),
                format!("unknown field: skymesh cannot map it ({hint})"),
            ),
        }
    }

    /// Refuses `key` if present, saying why skymesh cannot map it.
    pub(crate) fn refuse(&mut self, key: &str, why: &str) -> Result<()> {
        if self.has(key) {
            return invalid(self.path_of(key), format!("not supported: {why}"));
        }
        self.ignore(key);
        Ok(())
    }
}

/// A number in 0..=u32::MAX.
pub(crate) fn number(field: &str, v: &Value) -> Result<u32> {
    match v {
        Value::Number(n) => match n.as_u64().and_then(|v| u32::try_from(v).ok()) {
            Some(v) => Ok(v),
            None => invalid(field, format!("{n} is not a non-negative integer")),
        },
        other => invalid(field, format!("must be a number, not {}", type_name(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn takes_and_refuses_the_rest() {
        let v = json!({"a": "x", "b": 3, "c": null, "d": true});
        let mut f = Fields::new("spec", &v).unwrap();
        assert_eq!(f.str("a").unwrap(), Some("x"));
        assert_eq!(f.u32("b").unwrap(), Some(3));
        assert_eq!(f.str("c").unwrap(), None);
        let e = f.finish("a, b or c").unwrap_err();
        assert_eq!(e.field, "spec.d");
        assert!(e.rule.contains("a, b or c"), "{e}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let v = json!({"port": "80", "labels": {"v": 1}, "ports": {}});
        let mut f = Fields::new("spec", &v).unwrap();
        let e = f.u32("port").unwrap_err();
        assert_eq!(e.field, "spec.port");
        assert!(e.rule.contains("a string"), "{e}");
        let e = f.string_map("labels").unwrap_err();
        assert_eq!(e.field, "spec.labels.v");
        let e = f.list("ports").unwrap_err();
        assert_eq!(e.field, "spec.ports");
        let v = json!({"n": -1, "rv": "12"});
        let mut f = Fields::new("", &v).unwrap();
        assert!(f.u32("n").is_err());
        assert_eq!(f.u64_or_string("rv").unwrap(), Some(12));
    }
}
