//! From settings to `EngineParts`: the model, its tokenizer and facts, and the KV budget in blocks.

use crate::engine::settings::EngineSettings;

use super::EngineParts;

/// Default KV budget on CPU when `KV_CACHE_MEMORY` is unset: enough for `max_num_seqs` full-length
/// sequences, capped (a CPU box shares its memory with the weights and everything else).
pub const DEFAULT_CPU_KV_BYTES: u64 = 1 << 30;

/// How many KV blocks the budget buys. `budget`: `KV_CACHE_MEMORY`, else on GPU the share
/// `gpu_memory_utilization` of the free memory (`gpu_free`), else the CPU default. Never fewer than
/// one full-length sequence needs, so every admissible request can run.
pub fn num_kv_blocks(
    settings: &EngineSettings,
    bytes_per_block: u64,
    max_model_len: usize,
    gpu_free: Option<u64>,
) -> usize {
    let bs = settings.block_size.max(1);
    let per_seq = max_model_len.div_ceil(bs) as u64;
    let budget = match (settings.kv_cache_memory, gpu_free) {
        (Some(b), _) => b,
        (None, Some(free)) => (free as f64 * settings.gpu_memory_utilization as f64) as u64,
        (None, None) => {
            let wanted = per_seq * settings.max_num_seqs as u64 * bytes_per_block;
            wanted.min(DEFAULT_CPU_KV_BYTES)
        }
    };
    ((budget / bytes_per_block.max(1)) as usize).max(1)
}

pub fn load(_settings: &EngineSettings) -> anyhow::Result<EngineParts> {
    anyhow::bail!("model loading is not wired yet")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_budget_wins_and_default_is_capped() {
        let mut s = EngineSettings::for_model("/x");
        s.kv_cache_memory = Some(10_000);
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(1 << 40)), 10);
        s.kv_cache_memory = None;
        // 256 seqs x 128 blocks x 1 MiB is far above the cap.
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None), 1024);
        s.max_num_seqs = 2;
        assert_eq!(num_kv_blocks(&s, 1 << 20, 2048, None), 256);
        s.gpu_memory_utilization = 0.5;
        assert_eq!(num_kv_blocks(&s, 1000, 2048, Some(1_000_000)), 500);
    }
}
