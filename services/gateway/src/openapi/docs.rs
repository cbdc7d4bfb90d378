//! The API reference as one self-contained HTML page (no script, no CDN), rendered from the
//! OpenAPI document.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use meshgate_runtime::ErrorCode;
use serde_json::Value;

use super::document::ref_name;
use super::{TAGS, operations};

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Inline code spans (`x`) of a description as `<code>`.
fn prose(text: &str) -> String {
    let escaped = esc(text);
    let mut out = String::with_capacity(escaped.len());
    for (i, part) in escaped.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "<code>{part}</code>");
        } else {
            out.push_str(part);
        }
    }
    out
}

/// A short label of a schema's type, with links to named schemas.
fn type_label(schema: &Value) -> String {
    if let Some(reference) = schema["$ref"].as_str() {
        let name = ref_name(reference);
        return format!("<a href=\"#schema-{0}\">{0}</a>", esc(name));
    }
    for combinator in ["oneOf", "anyOf", "allOf"] {
        if let Some(parts) = schema[combinator].as_array() {
            let sep = if combinator == "allOf" { " &amp; " } else { " | " };
            let labels: Vec<String> = parts.iter().map(type_label).filter(|l| !l.is_empty()).collect();
            if !labels.is_empty() {
                return labels.join(sep);
            }
        }
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut labels = Vec::new();
    for t in types {
        labels.push(match t {
            "array" => format!("array of {}", type_label(&schema["items"])),
            "string" if schema["format"].is_string() => {
                format!("string ({})", esc(schema["format"].as_str().unwrap_or_default()))
            }
            other => esc(other),
        });
    }
    if let Some(values) = schema["enum"].as_array() {
        let values: Vec<String> = values.iter().map(|v| format!("<code>{}</code>", esc(&v.to_string()))).collect();
        labels.push(format!("one of {}", values.join(", ")));
    }
    labels.join(" or ")
}

/// Bounds of a schema (`min 1`, `≤ 256 chars`, …).
fn constraints(schema: &Value) -> String {
    let mut parts = Vec::new();
    for (key, label) in [
        ("minimum", "≥"),
        ("exclusiveMinimum", ">"),
        ("maximum", "≤"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
    ] {
        if let Some(v) = schema.get(key).filter(|v| v.is_number()) {
            parts.push(format!("{label} {v}"));
        }
    }
    if let Some(default) = schema.get("default") {
        parts.push(format!("default <code>{}</code>", esc(&default.to_string())));
    }
    parts.join(", ")
}

/// A table of an object schema's properties (nested objects inline).
fn properties_table(out: &mut String, schema: &Value) {
    let Some(props) = schema["properties"].as_object().filter(|p| !p.is_empty()) else { return };
    let required: BTreeSet<&str> =
        schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    out.push_str("<table><tr><th>field</th><th>type</th><th>notes</th></tr>");
    for (name, prop) in props {
        let req = if required.contains(name.as_str()) { " <span class=req>required</span>" } else { "" };
        let description = prop["description"].as_str().map(prose).unwrap_or_default();
        let bounds = constraints(prop);
        let _ =
            write!(out, "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{description}", esc(name), type_label(prop));
        if !bounds.is_empty() {
            let _ = write!(out, " <span class=dim>{bounds}</span>");
        }
        if prop["properties"].is_object() {
            properties_table(out, prop);
        }
        out.push_str("</td></tr>");
    }
    out.push_str("</table>");
}

fn schema_block(out: &mut String, schema: &Value) {
    let _ = write!(out, "<p>{}</p>", type_label(schema));
    if schema["$ref"].is_null() {
        properties_table(out, schema);
    }
}

const STYLE: &str = "body{font:15px/1.5 system-ui,sans-serif;margin:0;display:flex;color:#1d2330}\
nav{width:260px;flex:none;height:100vh;overflow:auto;position:sticky;top:0;background:#f3f4f7;padding:1em;box-sizing:border-box}\
nav a{display:block;color:#1d2330;text-decoration:none;font-size:13px;padding:1px 0}nav h4{margin:1em 0 .2em}\
main{padding:1em 2em;max-width:1100px}code{background:#eef0f4;padding:0 3px;border-radius:3px;font-size:90%}\
table{border-collapse:collapse;margin:.4em 0 1em;width:100%}td,th{border:1px solid #d9dce3;padding:3px 8px;text-align:left;vertical-align:top}\
th{background:#f3f4f7}.op{border-top:2px solid #d9dce3;margin-top:2em}.m{font-weight:bold;text-transform:uppercase;padding:1px 6px;border-radius:3px;color:#fff}\
.get{background:#2f7d32}.post{background:#1f5fa8}.put{background:#a86b1f}.delete{background:#a8321f}\
.req{color:#a8321f;font-size:11px}.dim{color:#687085;font-size:12px}";

/// The reference page: operations grouped by tag with their parameters, bodies, responses,
/// headers and error codes, then every schema.
pub(super) fn render(spec: &Value) -> String {
    let title = spec["info"]["title"].as_str().unwrap_or("API");
    let mut nav = String::new();
    let mut body = String::new();
    let _ = write!(
        body,
        "<h1>{}</h1><p>{}</p><p>OpenAPI {} document: <a href=\"/openapi.json\">/openapi.json</a>.</p>",
        esc(title),
        prose(spec["info"]["description"].as_str().unwrap_or_default()),
        esc(spec["openapi"].as_str().unwrap_or_default())
    );
    body.push_str("<h2 id=errors>Errors</h2><table><tr><th>code</th><th>HTTP</th><th>type</th></tr>");
    for code in ErrorCode::ALL {
        let _ = write!(
            body,
            "<tr><td><code>{}</code></td><td>{}</td><td><code>{}</code></td></tr>",
            code.as_str(),
            code.http_status().as_u16(),
            code.error_type()
        );
    }
    body.push_str("</table>");
    nav.push_str("<a href=\"#errors\">Errors</a>");
    for (tag, description) in TAGS {
        let ops: Vec<_> = operations(spec)
            .filter(|(_, _, op)| op["tags"].as_array().is_some_and(|t| t.iter().any(|v| v == tag)))
            .collect();
        if ops.is_empty() {
            continue;
        }
        let _ = write!(nav, "<h4>{tag}</h4>");
        let _ = write!(body, "<h2 id=\"tag-{tag}\">{tag}</h2><p>{}</p>", prose(description));
        for (path, method, op) in ops {
            let id = esc(op["operationId"].as_str().unwrap_or_default());
            let _ = write!(nav, "<a href=\"#op-{id}\">{} {}</a>", method.to_uppercase(), esc(path));
            let _ = write!(
                body,
                "<div class=op id=\"op-{id}\"><h3><span class=\"m {method}\">{method}</span> <code>{}</code></h3><p><b>{}</b></p><p>{}</p>",
                esc(path),
                prose(op["summary"].as_str().unwrap_or_default()),
                prose(op["description"].as_str().unwrap_or_default())
            );
            if op["security"].as_array().is_some_and(Vec::is_empty) {
                body.push_str("<p class=dim>No API key needed.</p>");
            }
            if let Some(params) = op["parameters"].as_array().filter(|p| !p.is_empty()) {
                body.push_str("<h4>Parameters</h4><table><tr><th>name</th><th>in</th><th>type</th><th>notes</th></tr>");
                for p in params {
                    let req = if p["required"] == true { " <span class=req>required</span>" } else { "" };
                    let _ = write!(
                        body,
                        "<tr><td><code>{}</code>{req}</td><td>{}</td><td>{}</td><td>{} <span class=dim>{}</span></td></tr>",
                        esc(p["name"].as_str().unwrap_or_default()),
                        esc(p["in"].as_str().unwrap_or_default()),
                        type_label(&p["schema"]),
                        prose(p["description"].as_str().unwrap_or_default()),
                        constraints(&p["schema"])
                    );
                }
                body.push_str("</table>");
            }
            if let Some(content) = op["requestBody"]["content"].as_object() {
                body.push_str("<h4>Request body</h4>");
                for (media, c) in content {
                    let _ = write!(body, "<p><code>{}</code></p>", esc(media));
                    schema_block(&mut body, &c["schema"]);
                }
            }
            body.push_str(
                "<h4>Responses</h4><table><tr><th>status</th><th>description</th><th>body</th><th>headers</th></tr>",
            );
            for (status, response) in op["responses"].as_object().into_iter().flatten() {
                let mut bodies = Vec::new();
                for (media, c) in response["content"].as_object().into_iter().flatten() {
                    let schema = &c["schema"];
                    let shown =
                        if schema["allOf"].is_array() { type_label(&schema["allOf"][0]) } else { type_label(schema) };
                    bodies.push(format!("<code>{}</code> {shown}", esc(media)));
                }
                let headers: Vec<String> = response["headers"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, h)| {
                        format!(
                            "<code title=\"{}\">{}</code>{}",
                            esc(h["description"].as_str().unwrap_or_default()),
                            esc(name),
                            if h["required"] == true { "" } else { "?" }
                        )
                    })
                    .collect();
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td class=dim>{}</td></tr>",
                    esc(status),
                    prose(response["description"].as_str().unwrap_or_default()),
                    bodies.join("<br>"),
                    headers.join(" ")
                );
            }
            body.push_str("</table></div>");
        }
    }
    body.push_str("<h2 id=schemas>Schemas</h2>");
    nav.push_str("<h4><a href=\"#schemas\">Schemas</a></h4>");
    for (name, schema) in spec["components"]["schemas"].as_object().into_iter().flatten() {
        let name = esc(name);
        let _ = write!(nav, "<a href=\"#schema-{name}\">{name}</a>");
        let _ = write!(
            body,
            "<div id=\"schema-{name}\"><h3>{name}</h3><p>{}</p><p>{}</p>",
            prose(schema["description"].as_str().unwrap_or_default()),
            type_label(schema)
        );
        properties_table(&mut body, schema);
        body.push_str("</div>");
    }
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><meta name=viewport content=\"width=device-width\">\
<title>{}</title><style>{STYLE}</style></head><body><nav>{nav}</nav><main>{body}</main></body></html>",
        esc(title)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docs_page_escapes_and_links() {
        assert_eq!(esc("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
        assert_eq!(prose("use `x<y>`"), "use <code>x&lt;y&gt;</code>");
        let html = render(super::super::spec());
        assert!(html.contains("id=\"op-createChatCompletion\""));
        assert!(html.contains("href=\"#schema-ChatCompletionRequest\""));
        assert!(!html.contains("<script"), "no script, nothing fetched");
    }
}
