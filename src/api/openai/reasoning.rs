//! `REASONING_PARSER` (`deepseek_r1`, `qwen3`, ...): the text a model writes between `<think>` and
//! `</think>` is its reasoning (`reasoning_content`), the rest its answer (`content`). Pure: text in,
//! the two parts out, whole or streamed.

pub(crate) const THINK_START: &str = "<think>";
pub(crate) const THINK_END: &str = "</think>";

/// Whether the output starts inside a reasoning block: the prompt (the template's generation
/// prompt) opened `<think>` without closing it, or the parser's models always think first
/// (`deepseek_r1`, whose templates open the block themselves in newer versions).
pub(crate) fn starts_in_reasoning(parser: &str, prompt: &str) -> bool {
    let open = prompt.rfind(THINK_START);
    let close = prompt.rfind(THINK_END);
    match (open, close) {
        (Some(o), Some(c)) if o > c => true,
        (Some(_), None) => true,
        (_, Some(_)) => false,
        (None, None) => parser == "deepseek_r1",
    }
}

#[derive(Debug, PartialEq)]
enum State {
    /// Before any output: a `<think>` may open the block.
    Start,
    Reasoning,
    Answer,
}

/// Splits streamed output into reasoning and answer, holding back text that may be the start of a
/// marker until it is decided.
#[derive(Debug)]
pub(crate) struct ReasoningSplitter {
    state: State,
    held: String,
}

impl ReasoningSplitter {
    /// `in_reasoning`: the output starts inside the block (see [`starts_in_reasoning`]).
    pub(crate) fn new(in_reasoning: bool) -> Self {
        Self {
            state: if in_reasoning {
                State::Reasoning
            } else {
                State::Start
            },
            held: String::new(),
        }
    }

    /// New text in: (reasoning, answer) text out.
    pub(crate) fn push(&mut self, text: &str) -> (String, String) {
        self.held.push_str(text);
        let mut reasoning = String::new();
        let mut answer = String::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.held.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(THINK_START) {
                        self.held = rest.to_string();
                        self.state = State::Reasoning;
                    } else if THINK_START.starts_with(trimmed) {
                        return (reasoning, answer);
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning => {
                    if let Some(at) = self.held.find(THINK_END) {
                        reasoning.push_str(&self.held[..at]);
                        self.held = self.held[at + THINK_END.len()..].to_string();
                        self.state = State::Answer;
                    } else {
                        let keep = partial_suffix(&self.held, THINK_END);
                        let cut = self.held.len() - keep;
                        reasoning.push_str(&self.held[..cut]);
                        self.held.drain(..cut);
                        return (reasoning, answer);
                    }
                }
                State::Answer => {
                    answer.push_str(&self.held);
                    self.held.clear();
                    return (reasoning, answer);
                }
            }
        }
    }

    /// The end of the output: what was held back.
    pub(crate) fn finish(&mut self) -> (String, String) {
        let held = std::mem::take(&mut self.held);
        match self.state {
            State::Reasoning => (held, String::new()),
            _ => (String::new(), held),
        }
    }

    /// A whole output: (reasoning if any, answer).
    pub(crate) fn split(in_reasoning: bool, text: &str) -> (Option<String>, String) {
        let mut s = Self::new(in_reasoning);
        let (mut r, mut a) = s.push(text);
        let (r2, a2) = s.finish();
        r.push_str(&r2);
        a.push_str(&a2);
        let had_block = in_reasoning || text.trim_start().starts_with(THINK_START);
        (had_block.then_some(r), a)
    }
}

/// The length of the longest suffix of `text` that is a proper prefix of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_outputs_split_at_the_markers() {
        assert_eq!(
            ReasoningSplitter::split(true, "let me see</think>42"),
            (Some("let me see".into()), "42".into())
        );
        assert_eq!(
            ReasoningSplitter::split(false, "<think>hmm</think>\n\nyes"),
            (Some("hmm".into()), "\n\nyes".into())
        );
        assert_eq!(
            ReasoningSplitter::split(false, "plain answer"),
            (None, "plain answer".into())
        );
        assert_eq!(
            ReasoningSplitter::split(true, "still thinking"),
            (Some("still thinking".into()), String::new())
        );
    }

    #[test]
    fn streamed_pieces_give_the_same_split_whatever_the_cuts() {
        let text = "<think>a < b </thi and</think>answer </think>";
        for cut in 1..text.len() {
            let mut s = ReasoningSplitter::new(false);
            let (mut r, mut a) = s.push(&text[..cut]);
            let (r2, a2) = s.push(&text[cut..]);
            let (r3, a3) = s.finish();
            r += &(r2 + &r3);
            a += &(a2 + &a3);
            assert_eq!(r, "a < b </thi and", "cut {cut}");
            assert_eq!(a, "answer </think>", "cut {cut}");
        }
    }

    #[test]
    fn an_open_think_in_the_prompt_starts_the_output_in_reasoning() {
        assert!(starts_in_reasoning(
            "qwen3",
            "<|im_start|>assistant\n<think>\n"
        ));
        assert!(!starts_in_reasoning(
            "qwen3",
            "assistant\n<think>\n\n</think>\n\n"
        ));
        assert!(!starts_in_reasoning("qwen3", "assistant\n"));
        assert!(starts_in_reasoning("deepseek_r1", "assistant\n"));
    }
}
