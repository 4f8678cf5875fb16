//! The OpenAI routes of the one HTTP router (`serve`'s, in-process over real HTTP on 127.0.0.1:0)
//! on the llama fixture: wire details the official client hides (SSE framing, chunk order, error
//! bodies) and the settings.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use worker_candle::engine::EngineSettings;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Server {
    base: String,
    http: reqwest::Client,
}

async fn start(role: &str) -> Server {
    start_model("llama", role).await
}

async fn start_model(model: &str, role: &str) -> Server {
    start_with(model, role, |_| {}).await
}

async fn start_with(
    model: &str,
    role: &str,
    configure: impl FnOnce(&mut EngineSettings),
) -> Server {
    let root = crate::common::router::serve(model, role, configure).await;
    Server {
        base: format!("{root}/v1"),
        http: reqwest::Client::new(),
    }
}

impl Server {
    async fn post(&self, route: &str, body: Value) -> (u16, String) {
        let r = self
            .http
            .post(format!("{}{route}", self.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post_json(&self, route: &str, body: Value) -> (u16, Value) {
        let (status, text) = self.post(route, body).await;
        (status, serde_json::from_str(&text).unwrap())
    }
}

/// The `data:` payloads of an SSE body, `[DONE]` included.
fn sse_events(body: &str) -> Vec<String> {
    assert!(body.ends_with("\n\n"), "{body:?}");
    body.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| e.strip_prefix("data: ").expect("data: events").to_string())
        .collect()
}

#[tokio::test]
async fn streamed_chat_follows_openai_framing() {
    let server = start("assistant").await;
    let (status, body) = server
        .post(
            "/chat/completions",
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "n": 2,
                   "max_tokens": 5, "temperature": 0, "ignore_eos": true, "stream": true,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(status, 200);
    let events = sse_events(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // The role comes first for each choice, the usage chunk last with no choices.
    for (i, chunk) in chunks[..2].iter().enumerate() {
        assert_eq!(chunk["choices"][0]["index"], json!(i));
        assert_eq!(chunk["choices"][0]["delta"]["role"], json!("assistant"));
    }
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], json!(10));
    for i in 0..2 {
        let mine: Vec<&Value> = chunks
            .iter()
            .filter(|c| c["choices"][0]["index"] == json!(i))
            .collect();
        let finishes: Vec<&Value> = mine
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(finishes, vec![&json!("length")]);
        assert!(!mine.last().unwrap()["choices"][0]["finish_reason"].is_null());
    }
    assert!(chunks
        .iter()
        .all(|c| c["object"] == json!("chat.completion.chunk")));
}

#[tokio::test]
async fn the_response_role_and_echo_follow_the_settings() {
    let server = start("bot").await;
    let (status, body) = server
        .post_json(
            "/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Well,"}],
                   "max_tokens": 3, "echo": true, "add_generation_prompt": false,
                   "continue_final_message": true, "chat_template": "{% for m in messages %}{{ m.content }} {% endfor %}"}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["role"], json!("bot"));
    assert!(message["content"].as_str().unwrap().starts_with("Well,"));
}

#[tokio::test]
async fn errors_have_openai_bodies() {
    let server = start("assistant").await;
    let (status, body) = server
        .post_json("/completions", json!({"prompt": "a", "top_p": "x"}))
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["param"], json!("top_p"));
    assert_eq!(body["error"]["type"], json!("BadRequestError"));
    assert_eq!(body["error"]["code"], Value::Null);
    let (status, body) = server
        .post_json("/completions", json!({"model": "other", "prompt": "a"}))
        .await;
    assert_eq!((status, &body["error"]["param"]), (404, &json!("model")));
    let (status, body) = server
        .post_json("/completions", json!({"prompt": "a ".repeat(2000)}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length"));
    let (status, _) = server.post_json("/nope", json!({})).await;
    assert_eq!(status, 404);
    let r = server
        .http
        .get(format!("{}/models", server.base))
        .send()
        .await
        .unwrap();
    let models: Value = r.json().await.unwrap();
    assert_eq!(models["data"][0]["id"], json!("m"));
    assert_eq!(models["data"][0]["max_model_len"], json!(512));
}

/// OpenAI's error object, with its status, for what the client cannot send or meet: unknown routes,
/// wrong methods, a non-JSON body type; CORS for browsers.
#[tokio::test]
async fn routes_methods_media_types_and_cors_answer_as_vllm() {
    let server = start("assistant").await;
    let root = server.base.trim_end_matches("/v1").to_string();
    let openai_error = |status: u16, body: &str, want: u16, kind: &str| {
        assert_eq!(status, want, "{body}");
        let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body:?}"));
        assert_eq!(v["error"]["type"], json!(kind), "{v}");
        // OpenAI's `code` is a string or null, never the status
        assert!(
            v["error"]["code"].is_null() || v["error"]["code"].is_string(),
            "{v}"
        );
        assert!(v["error"].get("param").is_some(), "{v}");
        assert!(v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    };
    for prefix in ["/v1", "/openai/v1"] {
        for (method, path) in [
            (reqwest::Method::GET, "/no/such/route"),
            (reqwest::Method::POST, "/images/generations"),
            (reqwest::Method::GET, ""),
            (reqwest::Method::GET, "/"),
        ] {
            let r = server
                .http
                .request(method, format!("{root}{prefix}{path}"))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            openai_error(status, &r.text().await.unwrap(), 404, "NotFoundError");
        }
        for (method, path) in [
            (reqwest::Method::POST, "/models"),
            (reqwest::Method::GET, "/chat/completions"),
            (reqwest::Method::DELETE, "/completions"),
        ] {
            let r = server
                .http
                .request(method, format!("{root}{prefix}{path}"))
                .json(&json!({}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            openai_error(
                status,
                &r.text().await.unwrap(),
                405,
                "MethodNotAllowedError",
            );
        }
        let r = server
            .http
            .get(format!("{root}{prefix}/models/m"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.json::<Value>().await.unwrap()["id"], json!("m"));
        let r = server
            .http
            .get(format!("{root}{prefix}/models/other"))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        openai_error(status, &r.text().await.unwrap(), 404, "NotFoundError");
        // A body declared as something other than JSON is a 415, as vLLM answers.
        for media in ["text/plain", "application/x-www-form-urlencoded"] {
            let r = server
                .http
                .post(format!("{root}{prefix}/completions"))
                .header("content-type", media)
                .body(r#"{"prompt": "a", "max_tokens": 1}"#)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            openai_error(
                status,
                &r.text().await.unwrap(),
                415,
                "UnsupportedMediaTypeError",
            );
        }
        let r = server
            .http
            .post(format!("{root}{prefix}/completions"))
            .header("content-type", "application/json; charset=utf-8")
            .body(r#"{"prompt": "a", "max_tokens": 1}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        // CORS: any origin, as vLLM allows by default; the preflight answers without a body.
        let r = server
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{root}{prefix}/chat/completions"),
            )
            .header("origin", "http://app.example")
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "authorization,content-type",
            )
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let header = |name: &str| {
            r.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("access-control-allow-origin"), "*");
        assert!(["*", "POST"]
            .iter()
            .any(|m| header("access-control-allow-methods").contains(m)));
        // Mirrored: a `*` would not cover `Authorization` in browsers.
        assert!(
            header("access-control-allow-headers").contains("authorization"),
            "{}",
            header("access-control-allow-headers")
        );
        let r = server
            .http
            .get(format!("{root}{prefix}/models"))
            .header("origin", "http://app.example")
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers().get("access-control-allow-origin").unwrap(), "*");
    }
}

/// `usage.prompt_tokens_details.cached_tokens` counts prefix-cache hits; with prefix caching off the
/// details are null, as vLLM leaves them.
#[tokio::test]
async fn cached_prompt_tokens_follow_the_prefix_cache_setting() {
    let prompt = "The quick brown fox jumps over the lazy dog. ".repeat(6);
    let body = json!({"prompt": prompt, "max_tokens": 2, "temperature": 0});
    let on = start("assistant").await;
    let (_, first) = on.post_json("/completions", body.clone()).await;
    let (_, second) = on.post_json("/completions", body.clone()).await;
    assert_eq!(
        first["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(0)
    );
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0 && cached < second["usage"]["prompt_tokens"].as_u64().unwrap());
    let off = start_with("llama", "assistant", |s| s.enable_prefix_caching = false).await;
    for _ in 0..2 {
        let (status, r) = off.post_json("/completions", body.clone()).await;
        assert_eq!(status, 200, "{r}");
        assert!(
            r["usage"]
                .get("prompt_tokens_details")
                .is_some_and(Value::is_null),
            "{r}"
        );
    }
}

#[tokio::test]
async fn every_fixture_generates_the_reference_text_through_the_api() {
    for model in ["llama", "qwen2", "mistral", "phi3", "gemma2", "gpt2"] {
        let server = start_model(model, "assistant").await;
        let text = std::fs::read_to_string(fixture(model).join("reference.json")).unwrap();
        let reference: Value = serde_json::from_str(&text).unwrap();
        for case in reference["cases"].as_array().unwrap() {
            let greedy = json!({"temperature": 0, "max_tokens": 24});
            let (route, mut body) = match case["messages"].as_array() {
                Some(messages) => ("/chat/completions", json!({"messages": messages})),
                None => ("/completions", json!({"prompt": case["prompt"]})),
            };
            body.as_object_mut()
                .unwrap()
                .extend(greedy.as_object().unwrap().clone());
            let (status, r) = server.post_json(route, body).await;
            assert_eq!(status, 200, "{model}: {r}");
            let choice = &r["choices"][0];
            let got = choice["text"]
                .as_str()
                .or(choice["message"]["content"].as_str());
            assert_eq!(got, case["greedy_text"].as_str(), "{model} {route}");
            assert_eq!(
                r["usage"]["prompt_tokens"],
                json!(case["input_ids"].as_array().unwrap().len()),
                "{model} {route}"
            );
        }
    }
}
