//! `run-batch`: OpenAI batch files through the engine.
