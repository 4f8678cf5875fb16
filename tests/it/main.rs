//! The integration tests, one test binary (so CI links candle once for all of them, not once per
//! file): one module per area, the shared helpers (queue emulator, fixtures, the real binary) in
//! `tests/common`. Run one area with `cargo test --test it <module>::`.

#[path = "../common/mod.rs"]
mod common;

mod batch_run;
mod builder_download;
mod docker_lint;
mod embed_decoder;
mod embed_http;
mod embed_reference;
mod engine_fixtures;
mod engine_isolation;
#[cfg(feature = "cuda")]
mod gpu;
mod kv_cache_8bit;
mod layering;
mod lora;
mod models_reference;
mod openai_client;
mod openai_http;
mod platform_config;
mod quant_checkpoint;
mod quant_gguf;
mod quant_insitu;
mod queue_jobs;
mod queue_protocol;
mod queue_shutdown;
mod readme_settings;
mod runpod_hub;
mod sampling_detokenize;
mod sampling_reference;
mod sampling_speed;
mod sampling_stop;
mod serve_cli;
mod serve_endpoint;
mod serve_limits;
mod serve_model;
mod serve_platform;
mod structured_output;
mod templates;
mod tool_round_trips;
