//! A whole (non-streamed) generation gathered from the engine's events.

use futures::{Stream, StreamExt};

use crate::api::error::ApiError;
use crate::engine::{Finish, GenerationEvent, TokenLogprob, Usage};

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct ChoiceOutcome {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub logprobs: Vec<TokenLogprob>,
    pub finish: Option<Finish>,
}

#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Outcome {
    pub prompt_token_ids: Vec<u32>,
    pub prompt_logprobs: Option<Vec<Option<TokenLogprob>>>,
    pub choices: Vec<ChoiceOutcome>,
    pub usage: Usage,
    /// Prompt tokens served from the prefix cache.
    pub cached_prompt_tokens: usize,
}

/// Reads events to the end. `n` is the number of choices the request returns.
pub(crate) async fn collect(
    events: impl Stream<Item = GenerationEvent>,
    n: usize,
) -> Result<Outcome, ApiError> {
    let mut outcome = Outcome {
        choices: vec![ChoiceOutcome::default(); n],
        ..Default::default()
    };
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        match event {
            GenerationEvent::Prompt {
                prompt_token_ids,
                prompt_logprobs,
            } => {
                outcome.prompt_token_ids = prompt_token_ids;
                outcome.prompt_logprobs = prompt_logprobs;
            }
            GenerationEvent::Delta(delta) => {
                let choice = outcome.choices.get_mut(delta.index).ok_or_else(|| {
                    ApiError::internal(format!("the engine sent choice {} of {n}", delta.index))
                })?;
                choice.text.push_str(&delta.text);
                choice.token_ids.extend(delta.token_ids);
                choice.logprobs.extend(delta.logprobs);
                if delta.finish.is_some() {
                    choice.finish = delta.finish;
                }
            }
            GenerationEvent::Done { usage, metrics } => {
                outcome.usage = usage;
                outcome.cached_prompt_tokens = metrics.cached_prompt_tokens;
                return Ok(outcome);
            }
            GenerationEvent::Error(e) => return Err(e.into()),
        }
    }
    Err(ApiError::internal(
        "the engine ended the request without finishing it",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{ChoiceDelta, EngineError, FinishReason, RequestMetrics};

    fn delta(index: usize, text: &str, finish: bool) -> GenerationEvent {
        GenerationEvent::Delta(ChoiceDelta {
            index,
            text: text.into(),
            token_ids: vec![index as u32],
            logprobs: vec![],
            finish: finish.then_some(Finish {
                reason: FinishReason::Length,
                stop_reason: None,
            }),
        })
    }

    #[tokio::test]
    async fn deltas_are_gathered_per_choice() {
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        let events = vec![
            GenerationEvent::Prompt {
                prompt_token_ids: vec![1, 2, 3],
                prompt_logprobs: None,
            },
            delta(0, "a", false),
            delta(1, "x", false),
            delta(0, "b", true),
            delta(1, "y", true),
            GenerationEvent::Done {
                usage,
                metrics: RequestMetrics::default(),
            },
        ];
        let out = collect(futures::stream::iter(events), 2).await.unwrap();
        assert_eq!(out.choices[0].text, "ab");
        assert_eq!(out.choices[1].text, "xy");
        assert_eq!(out.choices[1].token_ids, vec![1, 1]);
        assert_eq!(
            out.choices[0].finish.as_ref().unwrap().reason,
            FinishReason::Length
        );
        assert_eq!((out.prompt_token_ids.len(), out.usage), (3, usage));
    }

    #[tokio::test]
    async fn errors_and_truncated_streams_fail() {
        let events = vec![
            delta(0, "a", false),
            GenerationEvent::Error(EngineError::invalid("x", "bad")),
        ];
        let e = collect(futures::stream::iter(events), 1).await.unwrap_err();
        assert_eq!(e.status(), 400);
        let e = collect(futures::stream::iter(vec![delta(0, "a", false)]), 1)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 500);
        let e = collect(futures::stream::iter(vec![delta(3, "a", false)]), 1)
            .await
            .unwrap_err();
        assert_eq!(e.status(), 500);
    }
}
