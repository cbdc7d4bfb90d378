//! Task classification: the inference service's task classifier, or a keyword heuristic when
//! it is missing, slow or down.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshgate_proto::common::v1::ChatMessage;
use meshgate_proto::inference::v1::ClassifyRequest;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_runtime::MeshChannel;

use crate::request::message_text;
use crate::task::{Task, TaskGuess};

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

/// Calls the inference service's task classifier, falling back to [`heuristic`].
pub struct TaskClassifier {
    client: Option<InferenceClient<MeshChannel>>,
    /// The classifier model to call; found among the inference service's classification models
    /// by its labels, or fixed by configuration.
    model: ArcSwapOption<String>,
    /// Whether `model` comes from configuration (the model list must not replace it).
    pinned: bool,
    timeout: Duration,
}

/// A dedicated task of inference models that classify prompts into [`Task`]s; models of the
/// generic "classification" task qualify too when their labels are the tasks.
pub const CLASSIFIER_TASK: &str = "task-classification";

/// Whether a classifier's labels are exactly the router's tasks (each once, in any order).
pub fn labels_are_tasks(labels: &[String]) -> bool {
    let mut tasks: Vec<Task> = labels.iter().filter_map(|l| Task::parse(l)).collect();
    tasks.sort();
    tasks.dedup();
    labels.len() == Task::ALL.len() && tasks.len() == Task::ALL.len()
}

impl TaskClassifier {
    pub fn new(client: Option<InferenceClient<MeshChannel>>, model: Option<String>, timeout: Duration) -> Self {
        let pinned = model.is_some();
        Self { client, model: ArcSwapOption::new(model.map(Arc::new)), pinned, timeout }
    }

    /// A classifier that always uses the heuristic.
    pub fn heuristic_only() -> Self {
        Self::new(None, None, Duration::ZERO)
    }

    /// Updates the classifier model from the inference service's list (unless configured).
    pub fn set_discovered(&self, model: Option<String>) {
        if !self.pinned && self.model.load().as_deref() != model.as_ref() {
            tracing::info!(model = ?model, "task classifier model changed");
            self.model.store(model.map(Arc::new));
        }
    }

    /// Whether the model comes from configuration rather than discovery.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    pub fn model(&self) -> Option<Arc<String>> {
        self.model.load_full()
    }

    /// The task of `text`: the classifier's top label when it answers in time with a known
    /// label, else the heuristic's guess with a note saying why.
    pub async fn classify(&self, text: &str) -> TaskGuess {
        let (Some(client), Some(model)) = (&self.client, self.model.load_full()) else {
            let note = if self.client.is_none() { "no inference service" } else { "no task classifier model" };
            return TaskGuess { note: Some(note.into()), ..heuristic(text) };
        };
        let request =
            ClassifyRequest { model: model.as_ref().clone(), inputs: vec![text.to_owned()], ..Default::default() };
        let mut client = client.clone();
        let note = match tokio::time::timeout(self.timeout, client.classify(request)).await {
            Err(_) => format!("classifier {model} took longer than {} ms", self.timeout.as_millis()),
            Ok(Err(status)) => format!("classifier {model} failed: {}", status.message()),
            Ok(Ok(response)) => {
                let top = response.into_inner().results.into_iter().next().and_then(|r| r.scores.into_iter().next());
                match top {
                    Some(score) => match Task::parse(&score.label) {
                        Some(task) => {
                            return TaskGuess {
                                task,
                                confidence: score.probability,
                                source: format!("classifier:{model}"),
                                note: None,
                            };
                        }
                        None => format!("classifier {model} answered unknown label {:?}", score.label),
                    },
                    None => format!("classifier {model} answered no label"),
                }
            }
        };
        TaskGuess { note: Some(note), ..heuristic(text) }
    }
}

#[cfg(test)]
mod tests {
    use meshgate_proto::common::v1::content_part::Part;
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
    fn a_task_classifier_has_exactly_the_five_tasks_as_labels() {
        let labels = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(labels_are_tasks(&labels(&["chat", "code", "math", "creative", "reasoning"])));
        assert!(!labels_are_tasks(&labels(&["benign", "injection"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative", "creative"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative", "reasoning", "other"])));
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

    #[tokio::test]
    async fn without_inference_the_heuristic_answers_with_a_note() {
        let guess = TaskClassifier::heuristic_only().classify("Solve 2x + 1 = 5").await;
        assert_eq!(guess.task, Task::Math);
        assert_eq!(guess.source, "heuristic");
        assert_eq!(guess.note.as_deref(), Some("no inference service"));
    }

    #[tokio::test]
    async fn an_unreachable_classifier_falls_back_to_the_heuristic() {
        // Port 1 on loopback refuses connections: the call fails fast, like a down service.
        let channel = meshgate_runtime::channel("http://127.0.0.1:1", Duration::from_millis(200)).unwrap();
        let classifier =
            TaskClassifier::new(Some(InferenceClient::new(channel)), Some("tasks".into()), Duration::from_secs(2));
        let guess = classifier.classify("write a haiku about rain").await;
        assert_eq!(guess.task, Task::Creative);
        let note = guess.note.unwrap();
        assert!(note.starts_with("classifier tasks failed"), "{note}");
    }

    #[test]
    fn discovered_model_does_not_replace_a_configured_one() {
        let configured = TaskClassifier::new(None, Some("mine".into()), Duration::ZERO);
        configured.set_discovered(Some("other".into()));
        assert_eq!(configured.model().as_deref().map(String::as_str), Some("mine"));
        let discovered = TaskClassifier::heuristic_only();
        discovered.set_discovered(Some("found".into()));
        assert_eq!(discovered.model().as_deref().map(String::as_str), Some("found"));
        discovered.set_discovered(None);
        assert!(discovered.model().is_none());
    }
}
