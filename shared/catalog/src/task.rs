//! The task classes requests are routed by, a guess of one with where it came from, and the
//! keyword heuristic that guesses it in microseconds: the router falls back on it when no task
//! classifier answers, and a gateway labels a request with it when it reuses a plan the router
//! decided for another (one heuristic, so both label alike).

use std::borrow::Cow;

use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::common::v1::content_part::Part;
use meshgate_proto::inference::v1::Classification;

/// The task classes the router routes by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    Code,
    Math,
    Creative,
    Reasoning,
    Chat,
}

impl Task {
    pub const ALL: [Task; 5] = [Task::Code, Task::Math, Task::Creative, Task::Reasoning, Task::Chat];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Code => "code",
            Task::Math => "math",
            Task::Creative => "creative",
            Task::Reasoning => "reasoning",
            Task::Chat => "chat",
        }
    }

    pub fn parse(name: &str) -> Option<Task> {
        Task::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

/// A task with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskGuess {
    pub task: Task,
    pub confidence: f32,
    /// "classifier:<model>", "heuristic", "hint" or "request".
    pub source: String,
    /// Why the classifier was not used, when it was not.
    pub note: Option<String>,
}

/// "code, math, creative, reasoning or chat", for messages naming the choices.
pub const TASK_NAMES: &str = "code, math, creative, reasoning or chat";

/// Keyword cues per task with their weight. Cheap on purpose: it runs when the classifier is
/// missing or down, on the request path.
const CUES: &[(Task, &[(&str, u32)])] = &[
    (
        Task::Code,
        &[
            ("```", 4),
            ("def ", 3),
            ("fn ", 3),
            ("function", 2),
            ("class ", 1),
            ("compile", 2),
            ("stack trace", 3),
            ("traceback", 3),
            ("exception", 2),
            ("refactor", 3),
            ("debug", 2),
            ("regex", 3),
            ("sql", 2),
            ("python", 2),
            ("rust", 2),
            ("javascript", 2),
            ("typescript", 2),
            ("java ", 2),
            ("c++", 2),
            ("golang", 2),
            ("bash", 2),
            ("code", 2),
            ("script", 1),
            ("api", 1),
            ("unit test", 2),
            ("syntax", 2),
            ("variable", 1),
            ("algorithm", 1),
            ("implement", 1),
            ("bug", 2),
            ("json", 1),
        ],
    ),
    (
        Task::Math,
        &[
            ("solve", 2),
            ("equation", 3),
            ("integral", 3),
            ("derivative", 3),
            ("calculate", 2),
            ("compute", 1),
            ("probability", 2),
            ("matrix", 2),
            ("sum of", 2),
            ("square root", 3),
            ("prime", 2),
            ("theorem", 2),
            ("algebra", 3),
            ("geometry", 3),
            ("percent", 2),
            ("how many", 1),
            ("what is the value", 2),
            ("x^", 3),
            ("=", 1),
            ("+", 1),
            ("*", 1),
        ],
    ),
    (
        Task::Creative,
        &[
            ("poem", 4),
            ("story", 3),
            ("haiku", 4),
            ("lyrics", 4),
            ("song", 2),
            ("fiction", 3),
            ("novel", 2),
            ("character", 2),
            ("imagine", 2),
            ("slogan", 3),
            ("tagline", 3),
            ("limerick", 4),
            ("creative", 2),
            ("fairy tale", 3),
            ("screenplay", 3),
            ("rhyme", 3),
            ("write a", 1),
        ],
    ),
    (
        Task::Reasoning,
        &[
            ("why", 1),
            ("explain", 1),
            ("step by step", 3),
            ("reason", 2),
            ("compare", 2),
            ("pros and cons", 3),
            ("trade-off", 3),
            ("tradeoff", 3),
            ("analyze", 2),
            ("analyse", 2),
            ("logic", 2),
            ("puzzle", 3),
            ("riddle", 3),
            ("deduce", 3),
            ("should i", 2),
            ("implications", 2),
            ("evaluate", 2),
            ("argument", 2),
            ("plan ", 1),
        ],
    ),
];

/// Guesses the task from keyword cues; "chat" when nothing stands out. A digit next to an
/// arithmetic operator counts as a strong math cue.
pub fn heuristic(text: &str) -> TaskGuess {
    let lower = text.to_lowercase();
    let mut scores: Vec<(Task, u32)> = CUES
        .iter()
        .map(|(task, cues)| {
            let score = cues.iter().filter(|(cue, _)| lower.contains(cue)).map(|(_, weight)| weight).sum();
            (*task, score)
        })
        .collect();
    if has_arithmetic(&lower)
        && let Some((_, score)) = scores.iter_mut().find(|(task, _)| *task == Task::Math)
    {
        *score += 3;
    }
    let total: u32 = scores.iter().map(|(_, s)| s).sum();
    // The first task listed wins ties: code cues are the most specific.
    let (task, best) = scores.iter().fold((Task::Chat, 0), |acc, &(task, s)| if s > acc.1 { (task, s) } else { acc });
    // A single weak cue ("why", "=") is not enough to leave plain chat.
    if best < 2 {
        return TaskGuess { task: Task::Chat, confidence: 0.5, source: "heuristic".into(), note: None };
    }
    let confidence = best as f32 / (total as f32 + 1.0);
    TaskGuess { task, confidence, source: "heuristic".into(), note: None }
}

fn has_arithmetic(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.windows(3).any(|w| {
        let op = |b: u8| matches!(b, b'+' | b'-' | b'*' | b'/' | b'^' | b'=');
        (w[0].is_ascii_digit() && (op(w[1]) || (w[1] == b' ' && op(w[2]))))
            || (op(w[0]) && (w[1].is_ascii_digit() || (w[1] == b' ' && w[2].is_ascii_digit())))
    })
}

/// The text classified: the last user message, which says what is asked. The system prompt is
/// an application's standing instructions, the same for every request whatever its task, and
/// drags the class towards itself (see `eval/README.md`); it is classified only when no user
/// message exists.
pub fn classified_text(messages: &[ChatMessage]) -> String {
    let last_user = messages.iter().rev().find(|m| m.role == "user").map(message_text);
    let system = || messages.iter().filter(|m| m.role == "system").map(message_text).collect::<Vec<_>>();
    let mut text = last_user.map_or_else(|| system().join("\n"), |text| text.into_owned());
    // The classifier reads a few hundred tokens at most; the rest costs time for nothing.
    if text.len() > MAX_CLASSIFIED_BYTES {
        let mut end = MAX_CLASSIFIED_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

const MAX_CLASSIFIED_BYTES: usize = 4096;

/// The text of a message: its `content`, or its text parts one per line.
pub fn message_text(message: &ChatMessage) -> Cow<'_, str> {
    if message.parts.is_empty() {
        return Cow::Borrowed(&message.content);
    }
    let texts: Vec<&str> = message
        .parts
        .iter()
        .filter_map(|part| match &part.part {
            Some(Part::Text(text)) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    Cow::Owned(texts.join("\n"))
}

/// Why a task classifier gave no answer to use.
#[derive(Debug)]
pub enum ClassifierMiss {
    /// It did not answer within `timeout`.
    Late(std::time::Duration),
    /// The call failed with this message.
    Failed(String),
}

/// The task of `text` as a task classifier `model` answered it (its top label), or the
/// heuristic's guess with a note saying why the classifier's is not used. The router and a gateway
/// reusing the router's plan label alike with it.
pub fn task_from_classifier(
    text: &str,
    model: &str,
    answer: Result<Option<Classification>, ClassifierMiss>,
) -> TaskGuess {
    let note = match answer {
        Err(ClassifierMiss::Late(timeout)) => format!("classifier {model} took longer than {} ms", timeout.as_millis()),
        Err(ClassifierMiss::Failed(message)) => format!("classifier {model} failed: {message}"),
        Ok(answer) => match answer.as_ref().and_then(|result| result.scores.first()) {
            None => format!("classifier {model} answered no label"),
            Some(top) => match Task::parse(&top.label) {
                Some(task) => {
                    let source = format!("classifier:{model}");
                    return TaskGuess { task, confidence: top.probability, source, note: None };
                }
                None => format!("classifier {model} answered unknown label {:?}", top.label),
            },
        },
    };
    TaskGuess { note: Some(note), ..heuristic(text) }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::{ContentPart, ImageUrl};

    use super::*;

    fn message(role: &str, content: &str) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into(), ..Default::default() }
    }

    fn text_part(text: &str) -> ContentPart {
        ContentPart { part: Some(Part::Text(text.into())) }
    }

    fn image_part(url: &str) -> ContentPart {
        ContentPart { part: Some(Part::ImageUrl(ImageUrl { url: url.into(), detail: String::new() })) }
    }

    #[test]
    fn task_names_round_trip() {
        for task in Task::ALL {
            assert_eq!(Task::parse(task.as_str()), Some(task));
        }
        assert_eq!(Task::parse(" Code "), Some(Task::Code));
        assert_eq!(Task::parse("dance"), None);
    }

    #[test]
    fn heuristic_table() {
        let cases = [
            ("Write a Python function that reverses a linked list", Task::Code),
            ("Why does this panic?\n```rust\nfn main() { let v: Vec<i32> = vec![]; v[0]; }\n```", Task::Code),
            ("Fix the SQL syntax error in: SELEC * FROM users", Task::Code),
            ("Solve the equation 3x + 7 = 22", Task::Math),
            ("What is 17 * 23?", Task::Math),
            ("Compute the derivative of x^3 + 2x", Task::Math),
            ("Write a haiku about autumn leaves", Task::Creative),
            ("Tell me a short story about a dragon who loves tea", Task::Creative),
            ("Compare the pros and cons of renting versus buying a house", Task::Reasoning),
            ("Explain step by step how you would deduce who owns the zebra in this puzzle", Task::Reasoning),
            ("Hello! How are you today?", Task::Chat),
            ("Thanks, that helps", Task::Chat),
            ("", Task::Chat),
        ];
        for (text, expected) in cases {
            let guess = heuristic(text);
            assert_eq!(guess.task, expected, "{text:?}");
            assert_eq!(guess.source, "heuristic");
            assert!(guess.confidence > 0.0 && guess.confidence <= 1.0);
        }
    }

    #[test]
    fn classified_text_is_the_last_user_message() {
        let messages = [
            message("system", "You are terse."),
            message("user", "write a poem"),
            message("assistant", "roses are red"),
            message("user", "now in python"),
        ];
        assert_eq!(classified_text(&messages), "now in python");
        assert_eq!(classified_text(&messages[..1]), "You are terse.", "without a user message, the system prompt");
        let parts = [ChatMessage {
            role: "user".into(),
            parts: vec![text_part("what is in"), image_part("https://example.com/a.png"), text_part("this image")],
            ..Default::default()
        }];
        assert_eq!(classified_text(&parts), "what is in\nthis image", "the text parts of a message with an image");
        let long = [message("user", &"é".repeat(5000))];
        let text = classified_text(&long);
        assert!(text.len() <= MAX_CLASSIFIED_BYTES && text.chars().all(|c| c == 'é'));
    }
}
