//! The path of the JSON value at a position of a document (`messages[2].content[1].url`), so a
//! serde error — which knows only its line and column — can name the field it is about. Costs
//! nothing until a request fails to parse.

/// One level of nesting on the way to the position.
enum Frame {
    Object { key: Option<String> },
    Array { index: usize },
}

/// The end of the text serde_json had read when it reported an error at 1-based `line` and
/// `column`: the byte at the column included (for a value of the wrong type the column is the
/// value's first byte, or the `,`/`:` before a map or list; for a missing field, the `}`).
fn end_of(text: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text[start..].iter().position(|b| *b == b'\n') {
            Some(newline) => start += newline + 1,
            None => return text.len(),
        }
    }
    (start + column).min(text.len())
}

/// The path of the innermost value open at `line`/`column` of `text`: object keys joined with
/// `.`, array indices in brackets; empty at the top level.
pub(crate) fn path_at(text: &[u8], line: usize, column: usize) -> String {
    let end = end_of(text, line, column);
    let mut stack: Vec<Frame> = Vec::new();
    let mut expecting_key = false;
    let mut i = 0;
    while i < end {
        match text[i] {
            // A container opening at the very end is the value in error itself (a document that
            // is not an object), not a level above it.
            b'{' | b'[' if i + 1 == end => {}
            b'{' => {
                stack.push(Frame::Object { key: None });
                expecting_key = true;
            }
            b'[' => {
                stack.push(Frame::Array { index: 0 });
                expecting_key = false;
            }
            b'}' | b']' => {
                stack.pop();
                expecting_key = false;
            }
            b',' => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { .. }) => expecting_key = true,
                None => {}
            },
            b':' => expecting_key = false,
            b'"' => {
                let start = i + 1;
                i = start;
                while i < text.len() && text[i] != b'"' {
                    i += if text[i] == b'\\' { 2 } else { 1 };
                }
                if expecting_key && let Some(Frame::Object { key }) = stack.last_mut() {
                    let raw = &text[start..i.min(text.len())];
                    *key = Some(
                        serde_json::from_slice::<String>(&[b"\"", raw, b"\""].concat())
                            .unwrap_or_else(|_| String::from_utf8_lossy(raw).into_owned()),
                    );
                }
            }
            _ => {}
        }
        i += 1;
    }
    let mut path = String::new();
    for frame in &stack {
        match frame {
            Frame::Object { key: Some(key) } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(key);
            }
            Frame::Object { key: None } => {}
            Frame::Array { index } => {
                path.push('[');
                path.push_str(&index.to_string());
                path.push(']');
            }
        }
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path_of_error<T: serde::de::DeserializeOwned + std::fmt::Debug>(json: &str) -> String {
        let err = serde_json::from_str::<T>(json).unwrap_err();
        path_at(json.as_bytes(), err.line(), err.column())
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read only by serde
    struct Doc {
        items: Vec<Item>,
    }

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)] // read only by serde
    struct Item {
        name: String,
        #[serde(default)]
        tags: Vec<String>,
    }

    #[test]
    fn serde_errors_are_placed_in_the_document() {
        assert_eq!(path_of_error::<Doc>(r#"{"items":[{"name":"a"},{"name":5}]}"#), "items[1].name");
        assert_eq!(path_of_error::<Doc>(r#"{"items":[{"name":"a","tags":["x",{}]}]}"#), "items[0].tags[1]");
        assert_eq!(path_of_error::<Doc>("{\n \"items\": [\n  {\"name\": \"a\"},\n  {\"tags\": []}\n ]\n}"), "items[1]");
        assert_eq!(path_of_error::<Doc>(r#"{"items":"none"}"#), "items");
        assert_eq!(path_of_error::<Doc>(r#"{"it\"ems":1,"items":[{"name":"\"]}","tags":[1]}]}"#), "items[0].tags[0]");
        assert_eq!(path_of_error::<Doc>(r#""doc""#), "");
        assert_eq!(path_of_error::<std::collections::BTreeMap<String, u8>>("[1]"), "");
    }
}
