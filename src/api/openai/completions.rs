//! `POST /v1/completions`: prompts as text, token ids or lists of either; `echo`, legacy `logprobs`,
//! `n`/`best_of`, streaming. Choice `i` of prompt `p` is choice `p * n + i` of the response.

use futures::stream::{self, BoxStream};
use futures::StreamExt;
use serde_json::{json, Value};

use super::outcome::{collect, Outcome};
use super::params::{
    check_fields, extensions, sampling_params, stream_options, Body, Extensions, StreamOptions,
    COMMON_FIELDS,
};
use super::shapes::{self, LegacyLogprobs};
use super::{OpenAiResponse, OpenAiSettings, StreamEvent};
use crate::api::error::ApiError;
use crate::engine::tokenizer::Tokenizer;
use crate::engine::{
    ChoiceDelta, Engine, GenerateRequest, GenerationEvent, GenerationStream, Prompt,
    SamplingParams, TokenLogprob, Usage,
};

/// A parsed completions request.
#[derive(Debug, Clone)]
pub(crate) struct CompletionRequest {
    pub prompts: Vec<Prompt>,
    pub params: SamplingParams,
    pub echo: bool,
    /// vLLM's `add_special_tokens` (default true for completions).
    pub add_special_tokens: bool,
    pub stream: StreamOptions,
    pub ext: Extensions,
}

/// The completions route's own typed fields (the sampling ones are shared, see `params`).
#[derive(Debug, Default, serde::Deserialize)]
#[serde(default)]
struct CompletionFields {
    logprobs: Option<usize>,
    echo: Option<bool>,
    add_special_tokens: Option<bool>,
}

/// The completions route's own fields (besides [`COMMON_FIELDS`]).
const COMPLETION_FIELDS: &[&str] = &["prompt", "suffix", "logprobs", "echo", "add_special_tokens"];

pub(crate) fn parse(body: &Body<'_>) -> Result<CompletionRequest, ApiError> {
    check_fields(body, &[COMMON_FIELDS, COMPLETION_FIELDS])?;
    if body.raw("suffix").is_some() {
        return Err(ApiError::invalid(
            "suffix",
            "`suffix` is not supported (as in vLLM): this worker completes prompts only at their end",
        ));
    }
    let prompts = parse_prompts(body.raw("prompt"))?;
    let mut params = sampling_params(body, Some(16))?;
    let CompletionFields {
        logprobs,
        echo,
        add_special_tokens,
    } = body.typed()?;
    // `logprobs` is judged by the engine against `MAX_LOGPROBS`.
    let echo = echo.unwrap_or(false);
    params.logprobs = logprobs;
    if echo && logprobs.is_some() && params.prompt_logprobs.is_none() {
        params.prompt_logprobs = logprobs;
    }
    let stream = stream_options(body)?;
    Ok(CompletionRequest {
        prompts,
        params,
        echo,
        add_special_tokens: add_special_tokens.unwrap_or(true),
        stream,
        ext: extensions(body)?,
    })
}

/// `prompt`: a string, a list of strings, a list of token ids, or a list of token-id lists.
fn parse_prompts(value: Option<&Value>) -> Result<Vec<Prompt>, ApiError> {
    let invalid = |m: &str| ApiError::invalid("prompt", m);
    let tokens = |items: &[Value]| -> Result<Vec<u32>, ApiError> {
        items
            .iter()
            .map(|v| {
                v.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| invalid("token ids must be non-negative integers"))
            })
            .collect()
    };
    match value {
        None => Err(invalid("`prompt` is required")),
        Some(Value::String(s)) => Ok(vec![Prompt::Text(s.clone())]),
        Some(Value::Array(items)) if items.is_empty() => Err(invalid("`prompt` must not be empty")),
        Some(Value::Array(items)) => match &items[0] {
            Value::String(_) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(Prompt::Text(s.clone())),
                    _ => Err(invalid("a list of prompts must hold only strings")),
                })
                .collect(),
            Value::Number(_) => Ok(vec![Prompt::Tokens(tokens(items)?)]),
            Value::Array(_) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) if !ids.is_empty() => Ok(Prompt::Tokens(tokens(ids)?)),
                    _ => Err(invalid(
                        "a list of token-id prompts must hold only non-empty lists",
                    )),
                })
                .collect(),
            _ => Err(invalid(
                "`prompt` must be a string, a list of strings, token ids or lists of token ids",
            )),
        },
        Some(_) => Err(invalid(
            "`prompt` must be a string, a list of strings, token ids or lists of token ids",
        )),
    }
}

/// Submits every prompt before reading any, so a bad one fails the request before work starts.
fn submit(
    engine: &Engine,
    id: &str,
    request: &CompletionRequest,
) -> Result<Vec<GenerationStream>, ApiError> {
    request
        .prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let prompt = match (&request.ext.truncate, prompt) {
                (None, prompt) => prompt.clone(),
                (Some(t), prompt) => {
                    let mut ids = match prompt {
                        Prompt::Text(text) => engine
                            .tokenizer()
                            .encode(text, request.add_special_tokens)?,
                        Prompt::Tokens(ids) => ids.clone(),
                    };
                    t.apply(&mut ids, engine.info().max_model_len)?;
                    Prompt::Tokens(ids)
                }
            };
            engine
                .generate(GenerateRequest {
                    request_id: format!("{id}-{i}"),
                    prompt,
                    add_special_tokens: request.add_special_tokens,
                    params: request.params.clone(),
                })
                .map_err(|e| {
                    let e = ApiError::from(e);
                    // The engine names `messages` for an over-long prompt; here it is `prompt`.
                    if e.param() == Some("messages") {
                        e.with_param("prompt")
                    } else {
                        e
                    }
                })
        })
        .collect()
}

pub(crate) async fn handle(
    engine: &Engine,
    settings: &OpenAiSettings,
    body: &Body<'_>,
) -> Result<OpenAiResponse, ApiError> {
    let request = parse(body)?;
    let id = shapes::new_id("cmpl");
    let streams = submit(engine, &id, &request)?;
    let header = Header {
        id,
        created: shapes::unix_now(),
        model: settings.served_model_name.clone(),
        prefix_caching: engine.info().prefix_caching,
    };
    let tokenizer = engine.tokenizer().clone();
    if request.stream.stream {
        return Ok(OpenAiResponse::Stream(stream_chunks(
            header, request, streams, tokenizer,
        )));
    }
    let n = request.params.n;
    let mut outcomes =
        futures::future::try_join_all(streams.into_iter().map(|s| collect(s, n))).await?;
    if request.ext.tokens_as_ids {
        for o in &mut outcomes {
            for c in &mut o.choices {
                shapes::spell_as_ids(&mut c.logprobs);
            }
            for lp in o.prompt_logprobs.iter_mut().flatten().flatten() {
                shapes::spell_as_ids(std::slice::from_mut(lp));
            }
        }
    }
    let body = response(&header, &request, &outcomes, &tokenizer)?;
    Ok(OpenAiResponse::Json(body))
}

#[derive(Debug, Clone)]
struct Header {
    id: String,
    created: u64,
    model: String,
    prefix_caching: bool,
}

impl Header {
    fn object(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": shapes::SYSTEM_FINGERPRINT,
            "choices": choices,
        })
    }
}

/// The echoed prompt: its text, and its tokens for logprobs.
fn echo_text(prompt: &Prompt, tokenizer: &Tokenizer) -> Result<String, ApiError> {
    match prompt {
        Prompt::Text(text) => Ok(text.clone()),
        Prompt::Tokens(ids) => Ok(tokenizer.decode(ids, false)?),
    }
}

/// Legacy logprobs of the prompt (echo): the first token has no logprob.
fn prompt_logprobs(
    ids: &[u32],
    logprobs: Option<&Vec<Option<TokenLogprob>>>,
    tokenizer: &Tokenizer,
    out: &mut LegacyLogprobs,
    offset: &mut usize,
) {
    for (i, id) in ids.iter().enumerate() {
        let lp = logprobs.and_then(|l| l.get(i)).and_then(Option::as_ref);
        let text = lp.map_or_else(|| tokenizer.token_text(*id), |lp| lp.token.clone());
        out.push(&text, lp, offset);
    }
}

fn response(
    header: &Header,
    request: &CompletionRequest,
    outcomes: &[Outcome],
    tokenizer: &Tokenizer,
) -> Result<Value, ApiError> {
    let mut choices = Vec::new();
    let mut total = Usage::default();
    let mut cached = 0;
    for (p, outcome) in outcomes.iter().enumerate() {
        cached += outcome.cached_prompt_tokens;
        total.prompt_tokens += outcome.usage.prompt_tokens;
        total.completion_tokens += outcome.usage.completion_tokens;
        let echo = if request.echo {
            echo_text(&request.prompts[p], tokenizer)?
        } else {
            String::new()
        };
        for (i, choice) in outcome.choices.iter().enumerate() {
            let logprobs = request.params.logprobs.map(|_| {
                let mut l = LegacyLogprobs::default();
                let mut offset = 0;
                if request.echo {
                    prompt_logprobs(
                        &outcome.prompt_token_ids,
                        outcome.prompt_logprobs.as_ref(),
                        tokenizer,
                        &mut l,
                        &mut offset,
                    );
                    offset = echo.chars().count();
                }
                for lp in &choice.logprobs {
                    l.push(&lp.token, Some(lp), &mut offset);
                }
                l.to_json()
            });
            let mut value = json!({
                "index": p * request.params.n + i,
                "text": format!("{echo}{}", choice.text),
                "logprobs": logprobs,
                "finish_reason": shapes::finish_reason(choice.finish.as_ref()),
                "stop_reason": shapes::stop_reason(choice.finish.as_ref()),
            });
            // vLLM's `prompt_logprobs` is null unless asked for.
            value["prompt_logprobs"] = match &outcome.prompt_logprobs {
                Some(lps) => shapes::prompt_logprobs(&outcome.prompt_token_ids, lps),
                None => Value::Null,
            };
            if request.ext.return_token_ids {
                value["prompt_token_ids"] = json!(outcome.prompt_token_ids);
                value["token_ids"] = json!(choice.token_ids);
            }
            choices.push(value);
        }
    }
    let mut body = header.object(Value::Array(choices));
    body["usage"] = shapes::usage(&total, header.prefix_caching.then_some(cached));
    Ok(body)
}

/// Per-choice streaming state: where the next token's text starts (legacy `text_offset`).
struct ChunkState {
    header: Header,
    request: CompletionRequest,
    tokenizer: Tokenizer,
    offsets: Vec<usize>,
}

impl ChunkState {
    fn choice_chunk(
        &self,
        index: usize,
        text: String,
        logprobs: Value,
        finish: Value,
        stop: Value,
    ) -> Value {
        self.header.object(json!([{
            "index": index,
            "text": text,
            "logprobs": logprobs,
            "finish_reason": finish,
            "stop_reason": stop,
        }]))
    }

    /// Echo chunks, one per choice of the prompt, when the engine reports the prompt.
    fn on_prompt(
        &mut self,
        p: usize,
        ids: &[u32],
        logprobs: Option<&Vec<Option<TokenLogprob>>>,
    ) -> Result<Vec<Value>, ApiError> {
        if !self.request.echo {
            if self.request.ext.return_token_ids {
                // vLLM sends the prompt's ids on each choice's first chunk.
                let n = self.request.params.n;
                return Ok((0..n)
                    .map(|i| {
                        let mut c = self.choice_chunk(
                            p * n + i,
                            String::new(),
                            Value::Null,
                            Value::Null,
                            Value::Null,
                        );
                        c["choices"][0]["prompt_token_ids"] = json!(ids);
                        c["choices"][0]["token_ids"] = json!([]);
                        c
                    })
                    .collect());
            }
            return Ok(Vec::new());
        }
        let text = echo_text(&self.request.prompts[p], &self.tokenizer)?;
        let n = self.request.params.n;
        let mut chunks = Vec::new();
        for i in 0..n {
            let index = p * n + i;
            let lps = self.request.params.logprobs.map(|_| {
                let mut l = LegacyLogprobs::default();
                let mut offset = 0;
                prompt_logprobs(ids, logprobs, &self.tokenizer, &mut l, &mut offset);
                l.to_json()
            });
            self.offsets[index] = text.chars().count();
            let mut chunk = self.choice_chunk(
                index,
                text.clone(),
                lps.unwrap_or(Value::Null),
                Value::Null,
                Value::Null,
            );
            if self.request.ext.return_token_ids {
                chunk["choices"][0]["prompt_token_ids"] = json!(ids);
                chunk["choices"][0]["token_ids"] = json!([]);
            }
            chunks.push(chunk);
        }
        Ok(chunks)
    }

    fn on_delta(&mut self, p: usize, mut delta: ChoiceDelta) -> Option<Value> {
        let index = p * self.request.params.n + delta.index;
        if self.request.ext.tokens_as_ids {
            shapes::spell_as_ids(&mut delta.logprobs);
        }
        if delta.text.is_empty()
            && delta.logprobs.is_empty()
            && delta.finish.is_none()
            && (delta.token_ids.is_empty() || !self.request.ext.return_token_ids)
        {
            return None;
        }
        let logprobs = match self.request.params.logprobs {
            None => Value::Null,
            Some(_) => {
                let mut l = LegacyLogprobs::default();
                let offset = self.offsets.get_mut(index)?;
                for lp in &delta.logprobs {
                    l.push(&lp.token, Some(lp), offset);
                }
                l.to_json()
            }
        };
        let mut chunk = self.choice_chunk(
            index,
            delta.text,
            logprobs,
            shapes::finish_reason(delta.finish.as_ref()),
            shapes::stop_reason(delta.finish.as_ref()),
        );
        if self.request.ext.return_token_ids {
            chunk["choices"][0]["token_ids"] = json!(delta.token_ids);
        }
        Some(chunk)
    }
}

fn stream_chunks(
    header: Header,
    request: CompletionRequest,
    streams: Vec<GenerationStream>,
    tokenizer: Tokenizer,
) -> BoxStream<'static, StreamEvent> {
    let prompts = streams.len();
    let choices = prompts * request.params.n;
    let include_usage = request.stream.include_usage;
    let continuous = request.stream.continuous_usage;
    let mut state = ChunkState {
        header,
        request,
        tokenizer,
        offsets: vec![0; choices],
    };
    let merged = stream::select_all(
        streams
            .into_iter()
            .enumerate()
            .map(|(p, s)| s.map(move |e| (p, e)).boxed()),
    );
    async_stream::stream! {
        futures::pin_mut!(merged);
        let mut done = 0;
        let mut usage = Usage::default();
        let mut cached = 0;
        // vLLM's `continuous_usage_stats`: the usage so far on every chunk.
        let mut so_far = Usage::default();
        let with_usage = move |mut chunk: Value, so_far: &Usage| {
            if continuous {
                chunk["usage"] = shapes::usage(so_far, None);
            }
            chunk
        };
        while let Some((p, event)) = merged.next().await {
            match event {
                GenerationEvent::Prompt { prompt_token_ids, prompt_logprobs } => {
                    so_far.prompt_tokens += prompt_token_ids.len();
                    match state.on_prompt(p, &prompt_token_ids, prompt_logprobs.as_ref()) {
                        Ok(chunks) => for c in chunks { yield StreamEvent::Data(with_usage(c, &so_far)) },
                        Err(e) => { yield StreamEvent::Error(e); yield StreamEvent::Done; return; }
                    }
                }
                GenerationEvent::Delta(delta) => {
                    so_far.completion_tokens += delta.token_ids.len();
                    if let Some(c) = state.on_delta(p, delta) {
                        yield StreamEvent::Data(with_usage(c, &so_far));
                    }
                }
                GenerationEvent::Done { usage: u, metrics } => {
                    cached += metrics.cached_prompt_tokens;
                    usage.prompt_tokens += u.prompt_tokens;
                    usage.completion_tokens += u.completion_tokens;
                    done += 1;
                    if done == prompts {
                        break;
                    }
                }
                GenerationEvent::Error(e) => {
                    yield StreamEvent::Error(e.into());
                    yield StreamEvent::Done;
                    return;
                }
            }
        }
        if done < prompts {
            yield StreamEvent::Error(ApiError::internal("the engine ended the request without finishing it"));
        } else if include_usage {
            let mut chunk = state.header.object(json!([]));
            chunk["usage"] = shapes::usage(&usage, state.header.prefix_caching.then_some(cached));
            yield StreamEvent::Data(chunk);
        }
        yield StreamEvent::Done;
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_json(v: Value) -> Result<CompletionRequest, ApiError> {
        parse(&Body(v.as_object().unwrap()))
    }

    #[test]
    fn prompts_in_every_openai_form() {
        let r = parse_json(json!({"prompt": "hi"})).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Text("hi".into())]);
        let r = parse_json(json!({"prompt": ["a", "b"]})).unwrap();
        assert_eq!(r.prompts.len(), 2);
        let r = parse_json(json!({"prompt": [1, 2, 3]})).unwrap();
        assert_eq!(r.prompts, vec![Prompt::Tokens(vec![1, 2, 3])]);
        let r = parse_json(json!({"prompt": [[1], [2, 3]]})).unwrap();
        assert_eq!(r.prompts[1], Prompt::Tokens(vec![2, 3]));
        for bad in [
            json!({}),
            json!({"prompt": []}),
            json!({"prompt": [1, "a"]}),
            json!({"prompt": [-1]}),
            json!({"prompt": [[]]}),
            json!({"prompt": 5}),
        ] {
            let e = parse_json(bad.clone()).unwrap_err();
            assert_eq!((e.status(), e.param()), (400, Some("prompt")), "{bad}");
        }
    }

    #[test]
    fn suffix_is_refused_clearly() {
        let e = parse_json(json!({"prompt": "a", "suffix": "b"})).unwrap_err();
        assert_eq!(e.param(), Some("suffix"));
        assert!(e.message().contains("not supported"));
    }

    #[test]
    fn echo_with_logprobs_asks_for_prompt_logprobs() {
        let r = parse_json(json!({"prompt": "a", "echo": true, "logprobs": 2})).unwrap();
        assert_eq!(
            (r.params.logprobs, r.params.prompt_logprobs),
            (Some(2), Some(2))
        );
        let r = parse_json(json!({"prompt": "a", "logprobs": 2})).unwrap();
        assert_eq!(r.params.prompt_logprobs, None);
        assert_eq!(r.params.max_tokens, Some(16));
        // Past 20 is the engine's to judge, against `MAX_LOGPROBS`.
        assert_eq!(
            parse_json(json!({"prompt": "a", "logprobs": 21}))
                .unwrap()
                .params
                .logprobs,
            Some(21)
        );
    }
}
