//! vLLM's runtime LoRA routes (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`): `POST /v1/load_lora_adapter`
//! `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter` `{"lora_name"}`. `lora_path` is
//! a local folder (PEFT's files); the answer is vLLM's success sentence.

use serde_json::Value;

use super::params::Body;
use super::OpenAiResponse;
use crate::api::error::ApiError;
use crate::engine::Engine;

fn required(body: &Body<'_>, key: &str) -> Result<String, ApiError> {
    match body.get::<String>(key)? {
        Some(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(ApiError::bad_request(format!("`{key}` is required")).with_param(key)),
    }
}

pub(crate) async fn load(engine: &Engine, body: &Body<'_>) -> Result<OpenAiResponse, ApiError> {
    let name = required(body, "lora_name")?;
    let path = required(body, "lora_path")?;
    engine
        .load_adapter(&name, std::path::Path::new(&path))
        .await?;
    Ok(OpenAiResponse::Json(Value::String(format!(
        "Success: LoRA adapter '{name}' added successfully."
    ))))
}

pub(crate) async fn unload(engine: &Engine, body: &Body<'_>) -> Result<OpenAiResponse, ApiError> {
    let name = required(body, "lora_name")?;
    engine.unload_adapter(&name).await?;
    Ok(OpenAiResponse::Json(Value::String(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    ))))
}
