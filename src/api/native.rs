//! worker-vllm's native input and output.
