//! Verifiers: turn a completion into a reward in [0, 1].
//!
//! Built in: the final number (default), the exact final answer, a regular expression, a
//! multiple-choice letter, and an external command with a time limit (JSON on stdin, a number or
//! `{"score": x}` on stdout). A failing or slow command scores 0, is counted and logged, and
//! never stops a run.

pub mod number;

use crate::{Error, Result};
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

/// Which verifier to use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum VerifierConfig {
    /// The final number equals the answer (see [`number`]).
    #[default]
    Numeric,
    /// The final answer (after the last "answer:" or on the last non-empty line) equals the
    /// reference after normalising whitespace, surrounding punctuation and (unless
    /// `case_sensitive`) case.
    Exact {
        /// Compare case-sensitively.
        #[serde(default)]
        case_sensitive: bool,
    },
    /// With a capture group: the last match's group 1 equals the answer (normalised as for
    /// `exact`). Without: 1 when the pattern matches the completion at all.
    Regex {
        /// The pattern (Rust regex syntax).
        pattern: String,
    },
    /// The chosen multiple-choice letter (A–J) equals the answer letter.
    Choice,
    /// An external program: receives `{"prompt", "completion", "answer"}` as JSON on stdin and
    /// prints a score in [0, 1] (a number or `{"score": x}`).
    Command {
        /// Program and arguments.
        command: Vec<String>,
        /// Time limit per call in milliseconds (default 5,000).
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_timeout_ms() -> u64 {
    5_000
}

/// Counts of verifier calls that could not produce a score (they scored 0).
#[derive(Debug, Default)]
pub struct VerifierFailures {
    /// The command exceeded its time limit.
    pub timeouts: AtomicU64,
    /// The command failed to start, exited non-zero, or printed something that is not a score.
    pub errors: AtomicU64,
}

/// A built verifier.
pub struct Verifier {
    kind: Kind,
    /// Failure counters (external commands).
    pub failures: VerifierFailures,
}

enum Kind {
    Numeric,
    Exact { case_sensitive: bool },
    Regex(Regex),
    Choice,
    Command { argv: Vec<String>, timeout: Duration },
}

impl Verifier {
    /// Builds a verifier; bad patterns or empty commands are errors.
    pub fn new(cfg: &VerifierConfig) -> Result<Verifier> {
        let kind = match cfg {
            VerifierConfig::Numeric => Kind::Numeric,
            VerifierConfig::Exact { case_sensitive } => Kind::Exact { case_sensitive: *case_sensitive },
            VerifierConfig::Regex { pattern } => {
                Kind::Regex(Regex::new(pattern).map_err(|e| Error::invalid("verifier.pattern", e.to_string()))?)
            }
            VerifierConfig::Choice => Kind::Choice,
            VerifierConfig::Command { command, timeout_ms } => {
                if command.is_empty() {
                    return Err(Error::invalid("verifier.command", "name the program to run"));
                }
                if *timeout_ms == 0 {
                    return Err(Error::invalid("verifier.timeout_ms", "must be positive"));
                }
                Kind::Command { argv: command.clone(), timeout: Duration::from_millis(*timeout_ms) }
            }
        };
        Ok(Verifier { kind, failures: VerifierFailures::default() })
    }

    /// Scores a completion against the reference answer; always in [0, 1].
    pub fn score(&self, prompt: &str, completion: &str, answer: &str) -> f32 {
        match &self.kind {
            Kind::Numeric => number::score(completion, answer),
            Kind::Exact { case_sensitive } => {
                (normalise(final_answer(completion), *case_sensitive) == normalise(answer, *case_sensitive)) as u8
                    as f32
            }
            Kind::Regex(re) => score_regex(re, completion, answer),
            Kind::Choice => {
                match (choice_letter(completion), choice_letter(answer).or_else(|| answer.trim().chars().next())) {
                    (Some(a), Some(b)) => (a == b.to_ascii_uppercase()) as u8 as f32,
                    _ => 0.0,
                }
            }
            Kind::Command { argv, timeout } => match run_command(argv, *timeout, prompt, completion, answer) {
                Ok(s) => s,
                Err(CommandFailure::Timeout) => {
                    self.failures.timeouts.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("verifier command timed out after {timeout:?}; scoring 0");
                    0.0
                }
                Err(CommandFailure::Error(why)) => {
                    self.failures.errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("verifier command failed ({why}); scoring 0");
                    0.0
                }
            },
        }
    }
}

static ANSWER_MARK: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"(?i)answer\s*(?:is|:)\s*").expect("regex"));

/// The final answer of a completion: the text after the last "answer:"/"answer is" on its line,
/// else the last non-empty line.
pub fn final_answer(text: &str) -> &str {
    if let Some(m) = ANSWER_MARK.find_iter(text).last() {
        let rest = &text[m.end()..];
        return rest.lines().next().unwrap_or("");
    }
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")
}

fn normalise(s: &str, case_sensitive: bool) -> String {
    let s = s.trim().trim_matches(|c: char| matches!(c, '.' | ',' | ';' | ':' | '!' | '"' | '\'' | '`' | '*' | '$'));
    let s: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if case_sensitive {
        s
    } else {
        s.to_lowercase()
    }
}

fn score_regex(re: &Regex, completion: &str, answer: &str) -> f32 {
    if re.captures_len() > 1 {
        match re.captures_iter(completion).last().and_then(|c| c.get(1)) {
            Some(m) => (normalise(m.as_str(), false) == normalise(answer, false)) as u8 as f32,
            None => 0.0,
        }
    } else {
        re.is_match(completion) as u8 as f32
    }
}

static CHOICE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:answer\s*(?:is|:)\s*\(?|\\boxed\{|\(|^|\s)([A-J])(?:\)|\}|[.:,]|\s|$)").expect("regex")
});

/// The chosen letter: after "answer is"/"answer:" if present, else the last standalone letter.
pub fn choice_letter(text: &str) -> Option<char> {
    let scope = ANSWER_MARK.find_iter(text).last().map_or(text, |m| &text[m.start()..]);
    let pick = |s: &str| CHOICE.captures_iter(s).last().and_then(|c| c.get(1)).and_then(|m| m.as_str().chars().next());
    pick(scope).or_else(|| pick(text)).map(|c| c.to_ascii_uppercase())
}

enum CommandFailure {
    Timeout,
    Error(String),
}

fn run_command(
    argv: &[String],
    timeout: Duration,
    prompt: &str,
    completion: &str,
    answer: &str,
) -> Result<f32, CommandFailure> {
    use wait_timeout::ChildExt;
    let mut child = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| CommandFailure::Error(format!("cannot start {}: {e}", argv[0])))?;
    let input = serde_json::json!({ "prompt": prompt, "completion": completion, "answer": answer }).to_string();
    let mut stdin = child.stdin.take().expect("piped");
    // Feed stdin from a thread: a program that never reads must not block us past the limit.
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.by_ref().take(1 << 16).read_to_string(&mut out);
        out
    });
    let status = match child.wait_timeout(timeout) {
        Ok(Some(st)) => st,
        Ok(None) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(CommandFailure::Timeout);
        }
        Err(e) => return Err(CommandFailure::Error(e.to_string())),
    };
    let _ = writer.join();
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(CommandFailure::Error(format!("exit status {status}")));
    }
    parse_score(&out)
        .ok_or_else(|| CommandFailure::Error(format!("not a score: {:?}", out.chars().take(80).collect::<String>())))
}

/// A score printed by an external verifier: a number or `{"score": x}`, clamped to [0, 1].
pub fn parse_score(out: &str) -> Option<f32> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    let x = match v {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::Object(o) => o.get("score")?.as_f64()?,
        serde_json::Value::Bool(b) => b as u8 as f64,
        _ => return None,
    };
    x.is_finite().then(|| x.clamp(0.0, 1.0) as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(cfg: VerifierConfig) -> Verifier {
        Verifier::new(&cfg).unwrap()
    }

    #[test]
    fn verifier_table() {
        let numeric = v(VerifierConfig::Numeric);
        let exact = v(VerifierConfig::Exact { case_sensitive: false });
        let exact_cs = v(VerifierConfig::Exact { case_sensitive: true });
        let re_cap = v(VerifierConfig::Regex { pattern: r"Result:\s*(\w+)".into() });
        let re_any = v(VerifierConfig::Regex { pattern: r"(?i)\bparis\b".into() });
        let choice = v(VerifierConfig::Choice);
        let cases: &[(&Verifier, &str, &str, f32)] = &[
            (&numeric, "3 + 4 = 7\nAnswer: 7", "7", 1.0),
            (&numeric, "Answer: 8", "7", 0.0),
            (&numeric, "#### 1,250", "1250", 1.0),
            (&numeric, "\\boxed{\\frac{1}{2}}", "0.5", 1.0),
            (&numeric, "The answer is -3.", "-3", 1.0),
            (&numeric, "I don't know", "5", 0.0),
            (&numeric, "", "5", 0.0),
            (&numeric, "answer: 5", "five", 0.0),
            (&numeric, "It is 2/4", "1/2", 1.0),
            (&numeric, "It is 2.50 dollars", "2.5", 1.0),
            (&exact, "Let me think.\nAnswer: Paris.", "paris", 1.0),
            (&exact, "so the answer is   New   York", "new york", 1.0),
            (&exact, "Berlin", "Paris", 0.0),
            (&exact, "blah\n\nParis\n\n", "Paris", 1.0),
            (&exact, "", "Paris", 0.0),
            (&exact_cs, "Answer: paris", "Paris", 0.0),
            (&exact_cs, "Answer: Paris", "Paris", 1.0),
            (&exact, "Answer: \"Paris\"", "Paris", 1.0),
            (&re_cap, "Result: yes", "yes", 1.0),
            (&re_cap, "Result: no\nResult: yes", "yes", 1.0),
            (&re_cap, "Result: yes\nResult: no", "yes", 0.0),
            (&re_cap, "no result here", "yes", 0.0),
            (&re_any, "I think it is Paris.", "", 1.0),
            (&re_any, "Parisian food", "", 0.0),
            (&choice, "The answer is (B).", "B", 1.0),
            (&choice, "Answer: c", "C", 1.0),
            (&choice, "I pick A. No wait, the answer is D", "D", 1.0),
            (&choice, "\\boxed{E}", "E", 1.0),
            (&choice, "Between A and B, B is right.", "B", 1.0),
            (&choice, "The answer is (B).", "(C)", 0.0),
            (&choice, "no letter", "A", 0.0),
            (&choice, "", "A", 0.0),
            (&choice, "Answer: Z", "Z", 0.0),
            (&choice, "ANSWER: a)", "A", 1.0),
        ];
        for (i, (ver, out, ans, want)) in cases.iter().enumerate() {
            assert_eq!(ver.score("q", out, ans), *want, "case {i}: {out:?} vs {ans:?}");
        }
        assert!(cases.len() + 11 >= 40); // plus the score-parsing cases below
    }

    #[test]
    fn score_parsing_and_malformed_output() {
        assert_eq!(parse_score("1"), Some(1.0));
        assert_eq!(parse_score(" 0.25\n"), Some(0.25));
        assert_eq!(parse_score("{\"score\": 0.5}"), Some(0.5));
        assert_eq!(parse_score("7"), Some(1.0));
        assert_eq!(parse_score("-2"), Some(0.0));
        assert_eq!(parse_score("true"), Some(1.0));
        assert_eq!(parse_score("correct"), None);
        assert_eq!(parse_score(""), None);
        assert_eq!(parse_score("{\"points\": 1}"), None);
        assert_eq!(parse_score("[1]"), None);
        assert_eq!(parse_score("NaN"), None);
    }

    #[test]
    fn bad_configs_are_rejected() {
        assert!(Verifier::new(&VerifierConfig::Regex { pattern: "(".into() }).is_err());
        assert!(Verifier::new(&VerifierConfig::Command { command: vec![], timeout_ms: 10 }).is_err());
        assert!(Verifier::new(&VerifierConfig::Command { command: vec!["true".into()], timeout_ms: 0 }).is_err());
    }

    #[test]
    fn external_commands_score_and_fail_safely() {
        let sh = |script: &str, ms: u64| {
            v(VerifierConfig::Command { command: vec!["sh".into(), "-c".into(), script.into()], timeout_ms: ms })
        };
        // Reads the JSON and checks the completion mentions the answer.
        let good = sh(r#"read l; case "$l" in *'"completion":"42"'*) echo 1;; *) echo '{"score": 0}';; esac"#, 5_000);
        assert_eq!(good.score("p", "42", "42"), 1.0);
        assert_eq!(good.score("p", "41", "42"), 0.0);
        let slow = sh("sleep 5; echo 1", 100);
        let t0 = std::time::Instant::now();
        assert_eq!(slow.score("p", "c", "a"), 0.0);
        assert!(t0.elapsed() < Duration::from_secs(3), "the time limit must hold");
        assert_eq!(slow.failures.timeouts.load(Ordering::Relaxed), 1);
        let garbage = sh("echo lol", 5_000);
        assert_eq!(garbage.score("p", "c", "a"), 0.0);
        let crash = sh("exit 3", 5_000);
        assert_eq!(crash.score("p", "c", "a"), 0.0);
        let missing = v(VerifierConfig::Command { command: vec!["/nonexistent/verifier".into()], timeout_ms: 1_000 });
        assert_eq!(missing.score("p", "c", "a"), 0.0);
        assert_eq!(
            garbage.failures.errors.load(Ordering::Relaxed)
                + crash.failures.errors.load(Ordering::Relaxed)
                + missing.failures.errors.load(Ordering::Relaxed),
            3
        );
    }
}
