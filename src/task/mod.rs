//! Tasks: a prompt and its reference answer, from a JSONL file or the built-in generator.

pub mod arith;

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One problem: the user prompt and the reference answer (text; numbers are compared numerically).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// The question as the user would ask it (the chat template is applied by the engine).
    pub prompt: String,
    /// The reference answer.
    #[serde(deserialize_with = "string_or_number")]
    pub answer: String,
}

fn string_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        other => Err(serde::de::Error::custom(format!("answer must be a string or a number, got {other}"))),
    }
}

/// Reads a JSONL task file: one `{"prompt": …, "answer": …}` object per non-blank line.
pub fn load_jsonl(path: &Path) -> Result<Vec<Task>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path.to_path_buf())
        } else {
            Error::io(path, e)
        }
    })?;
    let mut tasks = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let task: Task = serde_json::from_str(line).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("{e} (expected {{\"prompt\": \"…\", \"answer\": \"…\"}})"),
        })?;
        tasks.push(task);
    }
    if tasks.is_empty() {
        return Err(Error::Data { path: path.to_path_buf(), line: 0, reason: "no tasks in file".into() });
    }
    Ok(tasks)
}

/// Writes tasks as JSONL.
pub fn save_jsonl(path: &Path, tasks: &[Task]) -> Result<()> {
    let mut out = String::new();
    for t in tasks {
        out.push_str(&serde_json::to_string(t).expect("task serialises"));
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trip_and_numeric_answers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "{\"prompt\":\"1+1?\",\"answer\":2}\n\n{\"prompt\":\"x\",\"answer\":\"3/4\"}\n").unwrap();
        let t = load_jsonl(&p).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].answer, "2");
        let q = dir.path().join("u.jsonl");
        save_jsonl(&q, &t).unwrap();
        assert_eq!(load_jsonl(&q).unwrap(), t);
    }

    #[test]
    fn malformed_lines_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, "{\"prompt\":\"a\",\"answer\":1}\n{\"prompt\":\"b\"}\n").unwrap();
        let e = load_jsonl(&p).unwrap_err().to_string();
        assert!(e.contains(":2:") && e.contains("answer"), "{e}");
        std::fs::write(&p, "{\"prompt\":\"a\",\"answer\":[1]}\n").unwrap();
        assert!(load_jsonl(&p).unwrap_err().to_string().contains("string or a number"));
        assert!(matches!(load_jsonl(&dir.path().join("none")), Err(Error::NotFound(_))));
    }
}
