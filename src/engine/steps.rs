//! Step segmentation of a trajectory at token boundaries.
//!
//! A step ends after the token in which an occurrence of the delimiter ends (a delimiter may span
//! tokens, and one token may hold text on both sides of it: the boundary is then after that token,
//! since resets happen at token positions, never by re-tokenising text). Then, in order:
//! whitespace-only steps merge into the next step, and steps shorter than `min_step_tokens` merge
//! into the next one (the last step merges backwards). The final answer line is the last step.

use serde::{Deserialize, Serialize};

/// How trajectories are split into steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StepConfig {
    /// Text that ends a step. Default `"\n"`.
    pub delimiter: String,
    /// Steps with fewer tokens merge into the next step. Default 1 (no merging).
    pub min_step_tokens: usize,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig { delimiter: "\n".into(), min_step_tokens: 1 }
    }
}

impl StepConfig {
    /// Checks the settings; an empty delimiter would make every token a step boundary.
    pub fn validate(&self) -> crate::Result<()> {
        if self.delimiter.is_empty() {
            return Err(crate::Error::invalid("steps.delimiter", "must not be empty (default is \"\\n\")"));
        }
        Ok(())
    }
}

/// Token range `[start, end)` of one step, indices into the trajectory's generated tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepSpan {
    /// First token of the step.
    pub start: usize,
    /// One past the last token of the step.
    pub end: usize,
}

impl StepSpan {
    /// Number of tokens in the step.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True for a step without tokens (never produced by [`segment`]).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Splits tokens, given as their byte pieces, into steps. Returns no spans for no tokens.
pub fn segment<P: AsRef<[u8]>>(pieces: &[P], cfg: &StepConfig) -> Vec<StepSpan> {
    let delim = cfg.delimiter.as_bytes();
    if pieces.is_empty() || delim.is_empty() {
        return if pieces.is_empty() { Vec::new() } else { vec![StepSpan { start: 0, end: pieces.len() }] };
    }
    // 1. Raw boundaries: after each token in which a delimiter occurrence ends.
    let mut text: Vec<u8> = Vec::new();
    let mut raw: Vec<StepSpan> = Vec::new();
    let mut start = 0;
    let mut searched_to: usize = 0; // text offset below which no occurrence can end any more
    for (i, piece) in pieces.iter().enumerate() {
        text.extend_from_slice(piece.as_ref());
        let from = searched_to.saturating_sub(delim.len() - 1);
        let ends_here = text[from..].windows(delim.len()).any(|w| w == delim);
        searched_to = text.len();
        if ends_here {
            raw.push(StepSpan { start, end: i + 1 });
            start = i + 1;
        }
    }
    if start < pieces.len() {
        raw.push(StepSpan { start, end: pieces.len() });
    }

    // 2. Merge whitespace-only steps and short steps into the next one.
    let is_blank = |s: &StepSpan| pieces[s.start..s.end].iter().all(|p| p.as_ref().iter().all(u8::is_ascii_whitespace));
    let min = cfg.min_step_tokens.max(1);
    let mut out: Vec<StepSpan> = Vec::with_capacity(raw.len());
    let mut carry: Option<usize> = None; // start of a step being merged forward
    for s in raw {
        let span = StepSpan { start: carry.take().unwrap_or(s.start), end: s.end };
        let blank_so_far = is_blank(&span);
        if span.len() < min || blank_so_far {
            carry = Some(span.start);
        } else {
            out.push(span);
        }
    }
    if let Some(c) = carry {
        match out.last_mut() {
            Some(last) => last.end = pieces.len(),
            None => out.push(StepSpan { start: c, end: pieces.len() }),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(pieces: &[&str], delim: &str, min: usize) -> Vec<(usize, usize)> {
        let cfg = StepConfig { delimiter: delim.into(), min_step_tokens: min };
        segment(pieces, &cfg).iter().map(|s| (s.start, s.end)).collect()
    }

    #[test]
    fn newline_tokens_end_steps() {
        let p = ["First", " step", "\n", "Second", "\n", "Answer", ": 4"];
        assert_eq!(spans(&p, "\n", 1), vec![(0, 3), (3, 5), (5, 7)]);
    }

    #[test]
    fn delimiter_inside_a_token_ends_the_step_after_that_token() {
        let p = ["a", ".\nB", "c", "\n"];
        assert_eq!(spans(&p, "\n", 1), vec![(0, 2), (2, 4)]);
    }

    #[test]
    fn delimiter_spanning_two_tokens() {
        let p = ["x", "\n", "\n", "y", "\n", "z"];
        // "\n\n" ends in token 2; the single "\n" at token 4 is not a delimiter.
        assert_eq!(spans(&p, "\n\n", 1), vec![(0, 3), (3, 6)]);
    }

    #[test]
    fn blank_steps_merge_forward() {
        let p = ["a", "\n", "\n", "b", "\n"];
        assert_eq!(spans(&p, "\n", 1), vec![(0, 2), (2, 5)]);
    }

    #[test]
    fn short_steps_merge_forward_and_the_tail_merges_back() {
        let p = ["a", "\n", "b", "c", "d", "\n", "e"];
        // (0,2) is short and merges into (2,6); the 1-token tail merges back into it.
        assert_eq!(spans(&p, "\n", 3), vec![(0, 7)]);
    }

    #[test]
    fn min_tokens_keeps_long_steps() {
        let p = ["a", "b", "\n", "c", "d", "\n", "e", "f", "g"];
        assert_eq!(spans(&p, "\n", 3), vec![(0, 3), (3, 6), (6, 9)]);
    }

    #[test]
    fn no_delimiter_is_one_step_and_empty_is_none() {
        assert_eq!(spans(&["a", "b"], "\n", 1), vec![(0, 2)]);
        assert!(spans(&[], "\n", 1).is_empty());
    }

    #[test]
    fn spans_cover_all_tokens_in_order() {
        let p = ["1", "\n", "\n", "2", "3", "\n", "4", "\n", "\n", "\n", "5"];
        for min in 1..5 {
            let s = spans(&p, "\n", min);
            assert_eq!(s.first().unwrap().0, 0);
            assert_eq!(s.last().unwrap().1, p.len());
            for w in s.windows(2) {
                assert_eq!(w[0].1, w[1].0);
            }
        }
    }

    #[test]
    fn empty_delimiter_is_rejected() {
        assert!(StepConfig { delimiter: String::new(), min_step_tokens: 1 }.validate().is_err());
    }
}
