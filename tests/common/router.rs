//! The one HTTP router (`serve`'s) in process over real HTTP on 127.0.0.1:0, on an engine over a
//! fixture model, for tests of wire details the official clients hide.

use std::path::Path;
use std::sync::Arc;

use worker_candle::api::stream_batch::BatchPolicy;
use worker_candle::engine::settings::DeviceChoice;
use worker_candle::engine::{Engine, EngineSettings};
use worker_candle::serverless::handler::{EngineHandler, HandlerSettings};
use worker_candle::serverless::local::LocalEndpoint;

/// Serves the fixture `model` (CPU, 64 MiB of KV cache, served as `m`, replies in `role`) after
/// `configure`; the root URL (`http://127.0.0.1:PORT`).
pub async fn serve(model: &str, role: &str, configure: impl FnOnce(&mut EngineSettings)) -> String {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(model);
    let mut settings = EngineSettings::for_model(fixture);
    settings.device = DeviceChoice::Cpu;
    settings.kv_cache_memory = Some(64 << 20);
    settings.served_model_name = "m".into();
    configure(&mut settings);
    let engine = Engine::start(settings).expect("the fixture loads");
    let handler = EngineHandler::new(
        engine,
        HandlerSettings {
            batch_defaults: BatchPolicy::default(),
            raw_openai_output: true,
            response_role: role.into(),
            log_requests: false,
            max_output_tokens: 1 << 20,
            responses_store: (10_000, 64 << 20, std::time::Duration::from_secs(86_400)),
        },
        Arc::default(),
    );
    let app = LocalEndpoint::new(Arc::new(handler), 4, Arc::default(), None).router();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}
