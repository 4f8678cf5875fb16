//! The KV cache's budget on a GPU, vLLM's way: `GPU_MEMORY_UTILIZATION` is the share of the device's
//! **total** memory this engine may hold (weights, activations and the cache together), so the cache
//! gets that share less what is already in use once the weights are loaded, less a reserve for one
//! step's activations. The device is read through [`MemoryProbe`]: CUDA's `cuMemGetInfo` on a GPU,
//! nothing on a CPU (whose cache lives in host memory and has its own default), a fake in tests.

use candle_core::Device;

/// A device's memory, in bytes, as the driver reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

/// Where the device's memory figures come from.
pub(crate) trait MemoryProbe {
    /// `None` when the device has no memory of its own to report (the CPU) or the query failed.
    fn memory(&self) -> Option<DeviceMemory>;
}

impl MemoryProbe for Device {
    fn memory(&self) -> Option<DeviceMemory> {
        match self {
            #[cfg(feature = "cuda")]
            Device::Cuda(cuda) => match cuda.cuda_stream().context().mem_get_info() {
                Ok((free, total)) => Some(DeviceMemory {
                    free: free as u64,
                    total: total as u64,
                }),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the GPU's free memory");
                    None
                }
            },
            _ => None,
        }
    }
}

/// What one step's activations may need beyond the weights and the cache: the hidden states of a
/// full step (`max_tokens` positions, a generous multiple of `hidden_size` for the attention and
/// MLP intermediates), the logits of every sequence (f32, twice: the row and its softmax), and the
/// CUDA context and cuBLAS workspace.
pub(crate) fn activation_reserve(
    max_tokens: usize,
    max_seqs: usize,
    hidden_size: usize,
    vocab_size: usize,
    dtype_bytes: usize,
) -> u64 {
    const PER_TOKEN_HIDDEN_MULTIPLE: u64 = 24;
    const CONTEXT_AND_WORKSPACE: u64 = 512 << 20;
    let hidden = max_tokens as u64 * hidden_size as u64 * dtype_bytes as u64;
    let logits = max_seqs as u64 * vocab_size as u64 * 4 * 2;
    hidden * PER_TOKEN_HIDDEN_MULTIPLE + logits + CONTEXT_AND_WORKSPACE
}

/// The cache's bytes on a GPU: `utilization × total − in use − reserve`, where `in use` is what the
/// device had taken when asked (this process's weights and anyone else's allocations). An error
/// names the figures and what to change when nothing is left, as vLLM's "no available memory for
/// the cache blocks".
pub(crate) fn gpu_kv_budget(
    memory: DeviceMemory,
    utilization: f32,
    reserve: u64,
) -> Result<u64, String> {
    // In parts per ten thousand, so 0.9 of 80 GiB is 72 GiB, not a float's 71.99999.
    let parts = (f64::from(utilization) * 10_000.0).round() as u128;
    let allowed = (u128::from(memory.total) * parts / 10_000) as u64;
    let in_use = memory.total.saturating_sub(memory.free);
    let budget = allowed.saturating_sub(in_use).saturating_sub(reserve);
    if budget == 0 {
        return Err(format!(
            "no GPU memory is left for the KV cache: GPU_MEMORY_UTILIZATION={utilization} allows {} of \
             the device's {}, {} is in use after loading the weights and {} is kept for activations; \
             raise GPU_MEMORY_UTILIZATION, lower MAX_NUM_BATCHED_TOKENS or MAX_NUM_SEQS, or set \
             KV_CACHE_MEMORY",
            gib(allowed),
            gib(memory.total),
            gib(in_use),
            gib(reserve)
        ));
    }
    // Never more than the device has free right now, whatever the arithmetic says.
    Ok(budget.min(memory.free))
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A device that reports fixed figures, as a GPU's driver would.
    struct FakeGpu(DeviceMemory);

    impl MemoryProbe for FakeGpu {
        fn memory(&self) -> Option<DeviceMemory> {
            Some(self.0)
        }
    }

    const GIB: u64 = 1 << 30;

    #[test]
    fn the_budget_is_the_utilization_share_of_total_less_what_is_in_use() {
        // An 80 GiB card, 16 GiB of weights loaded: 0.9 × 80 − 16 − 2 = 54 GiB for the cache.
        let gpu = FakeGpu(DeviceMemory {
            free: 64 * GIB,
            total: 80 * GIB,
        });
        let budget = gpu_kv_budget(gpu.memory().unwrap(), 0.9, 2 * GIB).unwrap();
        assert_eq!(budget, 72 * GIB - 16 * GIB - 2 * GIB);
        // A lower utilization leaves more for other processes on the same card.
        let half = gpu_kv_budget(gpu.memory().unwrap(), 0.5, 2 * GIB).unwrap();
        assert_eq!(half, 40 * GIB - 16 * GIB - 2 * GIB);
    }

    #[test]
    fn another_process_on_the_card_is_counted_and_nothing_left_is_a_clear_error() {
        // Someone else holds 60 of 80 GiB: 0.9 × 80 − 60 − 16 (ours) < 0.
        let gpu = FakeGpu(DeviceMemory {
            free: 4 * GIB,
            total: 80 * GIB,
        });
        let err = gpu_kv_budget(gpu.memory().unwrap(), 0.9, GIB).unwrap_err();
        assert!(
            err.contains("GPU_MEMORY_UTILIZATION=0.9") && err.contains("76.0 GiB is in use"),
            "{err}"
        );
        // Utilization 1.0 on a nearly free card is still capped at what is free.
        let free = FakeGpu(DeviceMemory {
            free: 79 * GIB,
            total: 80 * GIB,
        });
        assert_eq!(
            gpu_kv_budget(free.memory().unwrap(), 1.0, 0).unwrap(),
            79 * GIB
        );
    }

    #[test]
    fn the_cpu_reports_no_device_memory() {
        assert_eq!(Device::Cpu.memory(), None);
    }

    #[test]
    fn the_activation_reserve_grows_with_the_step_and_the_vocabulary() {
        let small = activation_reserve(512, 16, 1024, 32_000, 2);
        let more_tokens = activation_reserve(8192, 16, 1024, 32_000, 2);
        let more_seqs = activation_reserve(512, 256, 1024, 32_000, 2);
        assert!(small >= 512 << 20);
        assert!(more_tokens > small && more_seqs > small);
        // 8192 tokens × 4096 hidden × bf16 × 24 = 1.5 GiB, plus logits and the context.
        let big = activation_reserve(8192, 256, 4096, 128_256, 2);
        assert!(big > 2 * GIB && big < 3 * GIB, "{big}");
    }
}
