//! JSON instances generated from JSON schemas: the arguments of the mock's tool calls and the
//! content of its structured-output replies.
//!
//! The instance is a pure function of the schema, so a test computes what to expect with
//! [`instance`]. Every property of an object is filled (required and optional alike), `$ref`s to
//! the same document (`#/$defs/...`, `#/definitions/...`) are followed, and the first non-null
//! branch of `anyOf`/`oneOf` is taken. Values:
//! - `const` and `enum` win (an array's n-th item takes the n-th enum value, so `uniqueItems`
//!   holds);
//! - strings are the property's name (`"item"` in arrays, `"value"` at the root), suffixed with
//!   the item number after the first, padded or cut to `minLength`/`maxLength`; known `format`s
//!   get a valid value of that format;
//! - integers and numbers are the smallest value the bounds allow (1 and 1.5 when unbounded),
//!   rounded up to `multipleOf`;
//! - booleans are `true`; arrays hold `max(minItems, 1)` items, capped by `maxItems`.
//!
//! `pattern` is not honoured (no generator for arbitrary regular expressions).

use serde_json::{Map, Value, json};

/// Deepest nesting followed; a recursive schema ends in `null` there.
const MAX_DEPTH: usize = 24;

/// A JSON instance of `schema`.
pub fn instance(schema: &Value) -> Value {
    Generator { root: schema }.value(schema, "value", 0, 0)
}

/// The arguments of a call to a tool with these `parameters`: [`instance`], or `{}` when the
/// schema does not describe an object (a call's arguments are always an object).
pub fn arguments(parameters: Option<&Value>) -> Value {
    match parameters.map(instance) {
        Some(Value::Object(object)) => Value::Object(object),
        _ => Value::Object(Map::new()),
    }
}

struct Generator<'a> {
    root: &'a Value,
}

impl Generator<'_> {
    /// An instance of `schema`; `name` names strings, `variant` is the item number in an array.
    fn value(&self, schema: &Value, name: &str, variant: usize, depth: usize) -> Value {
        if depth > MAX_DEPTH {
            return Value::Null;
        }
        let Some(schema) = schema.as_object() else {
            // `true` (anything) or `false` (nothing can satisfy it).
            return json!(name);
        };
        if let Some(target) = schema.get("$ref").and_then(Value::as_str) {
            return match self.resolve(target) {
                Some(resolved) => self.value(resolved, name, variant, depth + 1),
                None => Value::Null,
            };
        }
        if let Some(value) = schema.get("const") {
            return value.clone();
        }
        if let Some(values) = schema.get("enum").and_then(Value::as_array).filter(|v| !v.is_empty()) {
            return values[variant % values.len()].clone();
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(branches) = schema.get(key).and_then(Value::as_array) {
                let branch = branches.iter().find(|b| !self.is_null_type(b)).or(branches.first());
                return branch.map_or(Value::Null, |b| self.value(b, name, variant, depth + 1));
            }
        }
        if let Some(branches) = schema.get("allOf").and_then(Value::as_array) {
            return self.all_of(branches, name, variant, depth);
        }
        match self.kind(schema) {
            "object" => self.object(schema, depth),
            "array" => self.array(schema, name, depth),
            "string" => string(schema, name, variant),
            "integer" => integer(schema, variant),
            "number" => number(schema, variant),
            "boolean" => Value::Bool(true),
            "null" => Value::Null,
            _ => json!(name),
        }
    }

    /// The schema's type: the first non-null of `type`, else guessed from its keywords.
    fn kind<'s>(&self, schema: &'s Map<String, Value>) -> &'s str {
        match schema.get("type") {
            Some(Value::String(kind)) => kind,
            Some(Value::Array(kinds)) => {
                let mut named = kinds.iter().filter_map(Value::as_str);
                named.clone().find(|k| *k != "null").or_else(|| named.next()).unwrap_or("null")
            }
            _ if schema.contains_key("properties") || schema.contains_key("required") => "object",
            _ if schema.contains_key("items") || schema.contains_key("prefixItems") => "array",
            _ => "string",
        }
    }

    fn is_null_type(&self, schema: &Value) -> bool {
        schema.get("type").and_then(Value::as_str) == Some("null")
    }

    /// A `#/...` JSON pointer into the root schema.
    fn resolve(&self, target: &str) -> Option<&Value> {
        let pointer = target.strip_prefix('#')?;
        if pointer.is_empty() { Some(self.root) } else { self.root.pointer(pointer) }
    }

    fn object(&self, schema: &Map<String, Value>, depth: usize) -> Value {
        let mut out = Map::new();
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            for (key, property) in properties {
                out.insert(key.clone(), self.value(property, key, 0, depth + 1));
            }
        }
        // Required names without a property schema take any value.
        for key in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str) {
            if !out.contains_key(key) {
                out.insert(key.to_owned(), json!(key));
            }
        }
        Value::Object(out)
    }

    fn array(&self, schema: &Map<String, Value>, name: &str, depth: usize) -> Value {
        let prefix = schema.get("prefixItems").and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
        let min = schema.get("minItems").and_then(Value::as_u64).unwrap_or(0) as usize;
        let max = schema.get("maxItems").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize);
        let count = min.max(prefix.len()).max(1).min(max);
        let item_name = if name == "value" { "item" } else { name };
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let item = match (prefix.get(i), schema.get("items")) {
                (Some(item), _) => self.value(item, item_name, i, depth + 1),
                (None, Some(Value::Bool(false))) => break,
                (None, Some(item)) => self.value(item, item_name, i, depth + 1),
                // Items of any kind.
                (None, None) => string(&Map::new(), item_name, i),
            };
            out.push(item);
        }
        Value::Array(out)
    }

    /// `allOf`: the object branches' properties merged, else the first branch.
    fn all_of(&self, branches: &[Value], name: &str, variant: usize, depth: usize) -> Value {
        let mut merged: Option<Map<String, Value>> = None;
        for branch in branches {
            match self.value(branch, name, variant, depth + 1) {
                Value::Object(object) => merged.get_or_insert_with(Map::new).extend(object),
                other if merged.is_none() => return other,
                _ => {}
            }
        }
        merged.map_or(Value::Null, Value::Object)
    }
}

fn string(schema: &Map<String, Value>, name: &str, variant: usize) -> Value {
    let formatted = match schema.get("format").and_then(Value::as_str) {
        Some("date-time") => Some("2025-01-01T00:00:00Z"),
        Some("date") => Some("2025-01-01"),
        Some("time") => Some("00:00:00Z"),
        Some("duration") => Some("P1D"),
        Some("email" | "idn-email") => Some("mock@example.com"),
        Some("hostname" | "idn-hostname") => Some("example.com"),
        Some("ipv4") => Some("192.0.2.1"),
        Some("ipv6") => Some("2001:db8::1"),
        Some("uri" | "url" | "iri" | "uri-reference" | "iri-reference") => Some("https://example.com/"),
        Some("uuid") => Some("00000000-0000-4000-8000-000000000000"),
        _ => None,
    };
    if let Some(value) = formatted {
        return json!(value);
    }
    let mut text = if variant == 0 { name.to_owned() } else { format!("{name}{variant}") };
    let min = schema.get("minLength").and_then(Value::as_u64).unwrap_or(0) as usize;
    let max = schema.get("maxLength").and_then(Value::as_u64).map_or(usize::MAX, |m| m as usize);
    let chars = text.chars().count();
    if chars < min {
        text.extend(std::iter::repeat_n('x', min - chars));
    }
    if text.chars().count() > max {
        text = text.chars().take(max).collect();
    }
    Value::String(text)
}

/// A numeric bound and whether it is exclusive.
type Bound = Option<(f64, bool)>;

/// The bounds of a numeric schema, `(lower, upper)`.
fn bounds(schema: &Map<String, Value>) -> (Bound, Bound) {
    let get = |key: &str| schema.get(key).and_then(Value::as_f64);
    let lower = match (get("exclusiveMinimum"), get("minimum")) {
        (Some(e), Some(m)) if m > e => Some((m, false)),
        (Some(e), _) => Some((e, true)),
        (None, m) => m.map(|m| (m, false)),
    };
    let upper = match (get("exclusiveMaximum"), get("maximum")) {
        (Some(e), Some(m)) if m < e => Some((m, false)),
        (Some(e), _) => Some((e, true)),
        (None, m) => m.map(|m| (m, false)),
    };
    (lower, upper)
}

fn integer(schema: &Map<String, Value>, variant: usize) -> Value {
    let (lower, upper) = bounds(schema);
    let low = lower.map(|(l, exclusive)| if exclusive { l.floor() as i64 + 1 } else { l.ceil() as i64 });
    let high = upper.map(|(u, exclusive)| if exclusive { u.ceil() as i64 - 1 } else { u.floor() as i64 });
    let fits = |v: i64| low.is_none_or(|l| v >= l) && high.is_none_or(|h| v <= h);
    let base = match (low, high) {
        (Some(l), _) => l,
        (None, Some(h)) if h < 1 => h,
        (None, _) => 1,
    };
    let mut value = base.saturating_add(variant as i64);
    if !fits(value) {
        value = base;
    }
    if let Some(step) = schema.get("multipleOf").and_then(Value::as_f64).filter(|s| *s >= 1.0 && s.fract() == 0.0) {
        let step = step as i64;
        let down = value.div_euclid(step) * step;
        let up = if down == value { value } else { down.saturating_add(step) };
        value = if fits(up) || !fits(down) { up } else { down };
    }
    json!(value)
}

fn number(schema: &Map<String, Value>, variant: usize) -> Value {
    let (lower, upper) = bounds(schema);
    let fits = |v: f64| {
        lower.is_none_or(|(l, exclusive)| if exclusive { v > l } else { v >= l })
            && upper.is_none_or(|(u, exclusive)| if exclusive { v < u } else { v <= u })
    };
    let mut base = match lower {
        Some((l, true)) => l + 1.0,
        Some((l, false)) => l,
        None => 1.5,
    };
    if !fits(base) {
        base = match (lower, upper) {
            (Some((l, _)), Some((u, _))) => (l + u) / 2.0,
            (None, Some((u, true))) => u - 1.0,
            (None, Some((u, false))) => u,
            _ => base,
        };
    }
    let mut value = base + variant as f64;
    if !fits(value) {
        value = base;
    }
    if let Some(step) = schema.get("multipleOf").and_then(Value::as_f64).filter(|s| *s > 0.0) {
        let up = (value / step).ceil() * step;
        let down = (value / step).floor() * step;
        value = if fits(up) || !fits(down) { up } else { down };
    }
    json!(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_fill_every_property_with_values_of_their_type() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 3, "maximum": 7},
                "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "hourly": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
                "place": {
                    "type": "object",
                    "properties": {"lat": {"type": "number"}, "label": {"type": ["string", "null"], "maxLength": 3}},
                    "required": ["lat"]
                },
                "note": {"type": "null"}
            },
            "required": ["city", "unit", "extra"]
        });
        assert_eq!(
            instance(&schema),
            json!({
                "city": "city",
                "unit": "celsius",
                "days": 3,
                "ratio": 1.0,
                "hourly": true,
                "tags": ["tags", "tags1"],
                "place": {"lat": 1.5, "label": "lab"},
                "note": null,
                "extra": "extra"
            })
        );
    }

    #[test]
    fn pydantic_style_refs_unions_and_formats() {
        // What Pydantic (and the OpenAI SDK's strict conversion) emit: $defs, $ref, anyOf with null.
        let schema = json!({
            "$defs": {
                "Step": {
                    "type": "object",
                    "properties": {"explanation": {"type": "string"}, "output": {"type": "string"}},
                    "required": ["explanation", "output"],
                    "additionalProperties": false
                }
            },
            "type": "object",
            "properties": {
                "steps": {"type": "array", "items": {"$ref": "#/$defs/Step"}},
                "final_answer": {"anyOf": [{"type": "null"}, {"type": "integer", "multipleOf": 5, "minimum": 7}]},
                "when": {"type": "string", "format": "date-time"},
                "kind": {"const": "math"},
                "size": {"allOf": [{"$ref": "#/$defs/Step"}, {"properties": {"n": {"type": "integer", "maximum": -4}}}]}
            },
            "required": ["steps", "final_answer", "when", "kind", "size"],
            "additionalProperties": false
        });
        assert_eq!(
            instance(&schema),
            json!({
                "steps": [{"explanation": "explanation", "output": "output"}],
                "final_answer": 10,
                "when": "2025-01-01T00:00:00Z",
                "kind": "math",
                "size": {"explanation": "explanation", "output": "output", "n": -4}
            })
        );
    }

    #[test]
    fn arrays_respect_their_bounds_and_stay_unique() {
        assert_eq!(instance(&json!({"type": "array", "maxItems": 0})), json!([]));
        assert_eq!(
            instance(&json!({"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 3, "uniqueItems": true})),
            json!(["a", "b", "a"])
        );
        assert_eq!(
            instance(&json!({"type": "array", "items": {"type": "integer", "maximum": 2}, "minItems": 3})),
            json!([1, 2, 1])
        );
        assert_eq!(
            instance(&json!({"prefixItems": [{"type": "boolean"}, {"type": "string"}], "items": false})),
            json!([true, "item1"])
        );
    }

    #[test]
    fn strings_and_numbers_meet_their_limits() {
        assert_eq!(instance(&json!({"type": "string", "minLength": 8})), json!("valuexxx"));
        assert_eq!(instance(&json!({"type": "number", "exclusiveMaximum": 0})), json!(-1.0));
        assert_eq!(instance(&json!({"type": "number", "minimum": 2, "multipleOf": 0.75})), json!(2.25));
        assert_eq!(instance(&json!({"type": "integer", "exclusiveMinimum": 9.5})), json!(10));
    }

    #[test]
    fn recursive_schemas_end_and_arguments_are_objects() {
        let tree = json!({
            "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
            "$ref": "#/$defs/Node"
        });
        let mut depth = 0;
        let mut node = instance(&tree);
        while let Some(child) = node.get("child").cloned() {
            depth += 1;
            node = child;
        }
        assert!(depth > 3 && node.is_null(), "ends in null after {depth} levels");
        assert_eq!(arguments(None), json!({}));
        assert_eq!(arguments(Some(&json!({"type": "string"}))), json!({}));
        assert_eq!(arguments(Some(&json!({"$ref": "#/missing"}))), json!({}));
    }
}
