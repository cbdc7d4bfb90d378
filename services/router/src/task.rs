//! The task classes the router routes by, and a guess of one with where it came from.

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_names_round_trip() {
        for task in Task::ALL {
            assert_eq!(Task::parse(task.as_str()), Some(task));
        }
        assert_eq!(Task::parse(" Code "), Some(Task::Code));
        assert_eq!(Task::parse("dance"), None);
    }
}
