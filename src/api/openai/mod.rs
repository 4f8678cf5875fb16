//! The OpenAI-compatible API: types, handlers, SSE, tool-call parsing.
