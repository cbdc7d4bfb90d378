//! Task classification: the inference service's task classifier, or the catalog's keyword
//! heuristic when it is missing, slow or down.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use meshgate_proto::inference::v1::ClassifyRequest;
use meshgate_proto::inference::v1::inference_client::InferenceClient;
use meshgate_runtime::MeshChannel;

use meshgate_catalog::task::{ClassifierMiss, Task, TaskGuess, heuristic, task_from_classifier};

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

    /// Updates the classifier model from the inference service's list (unless configured); true
    /// when it changed.
    pub fn set_discovered(&self, model: Option<String>) -> bool {
        let changed = !self.pinned && self.model.load().as_deref() != model.as_ref();
        if changed {
            tracing::info!(model = ?model, "task classifier model changed");
            self.model.store(model.map(Arc::new));
        }
        changed
    }

    /// Whether the model comes from configuration rather than discovery.
    pub fn is_pinned(&self) -> bool {
        self.pinned
    }

    pub fn model(&self) -> Option<Arc<String>> {
        self.model.load_full()
    }

    /// The model classifying now: none without an inference service to ask.
    pub fn active_model(&self) -> Option<Arc<String>> {
        self.model.load_full().filter(|_| self.client.is_some())
    }

    /// How long the classifier is waited for before the heuristic decides.
    pub fn timeout(&self) -> Duration {
        self.timeout
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
        let answer = match tokio::time::timeout(self.timeout, client.classify(request)).await {
            Err(_) => Err(ClassifierMiss::Late(self.timeout)),
            Ok(Err(status)) => Err(ClassifierMiss::Failed(status.message().to_owned())),
            Ok(Ok(response)) => Ok(response.into_inner().results.into_iter().next()),
        };
        task_from_classifier(text, &model, answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_classifier_has_exactly_the_five_tasks_as_labels() {
        let labels = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(labels_are_tasks(&labels(&["chat", "code", "math", "creative", "reasoning"])));
        assert!(!labels_are_tasks(&labels(&["benign", "injection"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative", "creative"])));
        assert!(!labels_are_tasks(&labels(&["chat", "code", "math", "creative", "reasoning", "other"])));
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
        assert!(!configured.set_discovered(Some("other".into())));
        assert_eq!(configured.model().as_deref().map(String::as_str), Some("mine"));
        let discovered = TaskClassifier::heuristic_only();
        assert!(discovered.set_discovered(Some("found".into())));
        assert_eq!(discovered.model().as_deref().map(String::as_str), Some("found"));
        assert!(discovered.set_discovered(None));
        assert!(discovered.model().is_none());
    }
}
