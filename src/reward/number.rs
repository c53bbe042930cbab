//! Final-number extraction and comparison: the default verifier for arithmetic and math tasks.
//!
//! Where the answer is looked for, first match wins: the last `\boxed{…}`, then the last
//! `#### n` (GSM8K), then the last number after "answer is" / "answer:", then the last number
//! anywhere. Numbers may carry a sign (`-`, `−`), thousands separators (`1,234`), decimals,
//! fractions (`3/4`, `\frac{3}{4}`), exponents (`1.5e3`), a leading `$` or a trailing `%` (ignored).

use regex::Regex;
use std::sync::LazyLock;

static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?P<sign>[-−+])?\$?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<dec>\.\d+)?(?P<exp>[eE][-+]?\d+)?(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?")
        .expect("number regex")
});
static FRAC: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"^\s*(?P<sign>[-−])?\s*\\d?frac\s*\{\s*(?P<num>[^{}]+?)\s*\}\s*\{\s*(?P<den>[^{}]+?)\s*\}\s*$")
        .expect("frac regex")
});
static HASHES: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"####\s*(?P<rest>[^\n]*)").expect("#### regex"));
static ANSWER_IS: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)answer(?:\s+is|\s*[:=])\s*(?P<rest>[^\n]*)").expect("answer regex"));

/// Parses every number in `text`, in order of appearance.
pub fn numbers(text: &str) -> Vec<f64> {
    let mut out = Vec::new();
    for c in NUMBER.captures_iter(text) {
        let whole = c.get(0).expect("match");
        // A sign glued to a preceding word or digit is an operator ("5-3"), not a sign.
        let signed = c.name("sign").is_some_and(|s| {
            text[..s.start()].chars().next_back().is_none_or(|p| !(p.is_alphanumeric() || p == ')' || p == '.'))
        });
        // Digits glued to letters ("x2", "3rd") or inside a longer decimal are not answers.
        if text[..whole.start()].chars().next_back().is_some_and(|p| p.is_alphabetic() || p == '_') {
            continue;
        }
        // Ordinals ("3rd") are positions, not quantities; units ("5kg") keep their number.
        let after = &text[whole.end()..];
        let suffix: String = after.chars().take_while(|ch| ch.is_alphabetic()).collect::<String>().to_lowercase();
        if matches!(suffix.as_str(), "st" | "nd" | "rd" | "th") {
            continue;
        }
        let int: String = c["int"].chars().filter(|&ch| ch != ',').collect();
        let dec = c.name("dec").map_or("", |m| m.as_str());
        let exp = c.name("exp").map_or("", |m| m.as_str());
        let Ok(mut v) = format!("{int}{dec}{exp}").parse::<f64>() else { continue };
        if let Some(den) = c.name("den") {
            match den.as_str().parse::<f64>() {
                Ok(d) if d != 0.0 => v /= d,
                _ => continue,
            }
        }
        if signed && matches!(c.name("sign").map(|s| s.as_str()), Some("-" | "−")) {
            v = -v;
        }
        out.push(v);
    }
    out
}

/// Content of the last `\boxed{…}` with balanced braces, if any.
pub fn last_boxed(text: &str) -> Option<&str> {
    let start = text.rfind("\\boxed")?;
    let rest = &text[start + "\\boxed".len()..];
    let open = rest.find('{')?;
    if !rest[..open].trim().is_empty() {
        return None;
    }
    let mut depth = 0usize;
    for (i, ch) in rest[open..].char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[open + 1..open + i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The number a fragment states: a whole `\frac{a}{b}`, else the last number in it.
fn number_in(fragment: &str) -> Option<f64> {
    frac_in(fragment).or_else(|| numbers(fragment).into_iter().next_back())
}

/// The number right after "answer is": a whole `\frac{a}{b}`, else the first number.
fn first_number_in(fragment: &str) -> Option<f64> {
    frac_in(fragment.trim_end_matches(['.', '$', ' '])).or_else(|| numbers(fragment).into_iter().next())
}

fn frac_in(fragment: &str) -> Option<f64> {
    if let Some(c) = FRAC.captures(fragment) {
        let num = numbers(&c["num"]).last().copied()?;
        let den = numbers(&c["den"]).last().copied()?;
        if den == 0.0 {
            return None;
        }
        let v = num / den;
        return Some(if c.name("sign").is_some() { -v } else { v });
    }
    None
}

/// The final numeric answer in a model's output, following the order in the module docs.
pub fn final_number(text: &str) -> Option<f64> {
    if let Some(boxed) = last_boxed(text) {
        if let Some(v) = number_in(boxed) {
            return Some(v);
        }
    }
    if let Some(c) = HASHES.captures_iter(text).last() {
        if let Some(v) = numbers(&c["rest"]).into_iter().next() {
            return Some(v);
        }
    }
    if let Some(c) = ANSWER_IS.captures_iter(text).last() {
        if let Some(v) = first_number_in(&c["rest"]) {
            return Some(v);
        }
    }
    numbers(text).into_iter().next_back()
}

/// True when two numbers are equal up to a relative tolerance of 1e-6 (absolute near zero).
pub fn numbers_match(predicted: f64, gold: f64) -> bool {
    (predicted - gold).abs() <= 1e-6 * gold.abs().max(1.0)
}

/// Scores `output` against a numeric `gold` answer given as text: 1.0 when the final numbers match.
pub fn score(output: &str, gold: &str) -> f32 {
    match (final_number(output), final_number(gold)) {
        (Some(p), Some(g)) if numbers_match(p, g) => 1.0,
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_table() {
        let cases: &[(&str, Option<f64>)] = &[
            ("The answer is 42.", Some(42.0)),
            ("3 + 4 = 7", Some(7.0)),
            ("so 5-3 = 2", Some(2.0)),
            ("the total is -12", Some(-12.0)),
            ("temperature fell to −4 degrees", Some(-4.0)),
            ("She paid $1,250 in total", Some(1250.0)),
            ("1,234,567 people", Some(1_234_567.0)),
            ("a list 1,2,3", Some(3.0)),
            ("half is 0.5", Some(0.5)),
            ("3/4 of the cake", Some(0.75)),
            ("ratio 10 / 4", Some(2.5)),
            ("\\boxed{17}", Some(17.0)),
            ("first 3 then \\boxed{\\frac{1}{8}}", Some(0.125)),
            ("\\boxed{-\\frac{3}{4}}", Some(-0.75)),
            ("\\boxed{x = 5} and later 9", Some(5.0)),
            ("#### 72", Some(72.0)),
            ("work 4 5 6\n#### 1,000\nthanks 3", Some(1000.0)),
            ("The answer is 12. Check: 12 - 3 = 9", Some(12.0)),
            ("Answer: 8 apples, since 2*4", Some(8.0)),
            ("The answer is \\frac{3}{4}.", Some(0.75)),
            ("50% of them", Some(50.0)),
            ("no numbers here", None),
            ("", None),
            ("x2 and y3", None),
            ("divide by zero 5/0", None),
            ("\\boxed{}", None),
            ("\\boxed{unclosed 5", Some(5.0)),
            ("1.5e3", Some(1500.0)),
            ("about 2E-2 of it", Some(0.02)),
            ("she is 3rd", None),
            ("it weighs 5kg", Some(5.0)),
            ("+7 points", Some(7.0)),
            ("(-3)", Some(-3.0)),
        ];
        for (text, want) in cases {
            let got = final_number(text);
            match (got, want) {
                (Some(g), Some(w)) => assert!(numbers_match(g, *w), "{text:?}: got {g}, want {w}"),
                (None, None) => {}
                _ => panic!("{text:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn score_compares_with_tolerance() {
        assert_eq!(score("so the result is 0.3333", "1/3"), 0.0);
        assert_eq!(score("so the result is 0.33333333", "1/3"), 1.0);
        assert_eq!(score("#### 10", "10"), 1.0);
        assert_eq!(score("#### 11", "10"), 0.0);
        assert_eq!(score("anything", "not a number"), 0.0);
    }
}
