//! Mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks each token's top-k
//! experts (softmax over all experts, the k best, renormalised over those k where the model says so);
//! each expert runs once per forward on just the rows routed to it (gathered, one matmul per
//! projection, weighted and scatter-added back), so a token's result never depends on the other tokens
//! of the batch. An optional shared expert (Qwen2-MoE), gated by a sigmoid, runs on every token.

use candle_core::{bail, DType, Result, Tensor};

use super::mlp::{Activation, GatedMlp};
use super::weights::Weights;
use super::Linear;

/// What a model's config.json says about its experts.
#[derive(Debug, Clone)]
pub(crate) struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    /// Renormalise the k chosen probabilities to sum to one (Mixtral always; Qwen `norm_topk_prob`).
    pub renormalize: bool,
    /// A shared expert's intermediate size (Qwen2-MoE `shared_expert_intermediate_size`), if any.
    pub shared_intermediate_size: Option<usize>,
    /// Per layer: sparse (experts) or a dense MLP (`mlp_only_layers`, `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// The block's name under each layer: `mlp`, or Mixtral's `block_sparse_moe`.
    pub module: String,
}

impl MoeConfig {
    /// Reads the Qwen-MoE / Mixtral keys (`num_experts` or `num_local_experts`, `num_experts_per_tok`,
    /// `moe_intermediate_size` else `intermediate_size`, `norm_topk_prob`, `decoder_sparse_step`,
    /// `mlp_only_layers`, `shared_expert_intermediate_size`).
    pub fn from_config(
        config: &serde_json::Value,
        num_layers: usize,
        renormalize_default: bool,
    ) -> Result<Self> {
        let uint = |k: &str| config.get(k).and_then(serde_json::Value::as_u64);
        let Some(num_experts) = uint("num_experts").or_else(|| uint("num_local_experts")) else {
            bail!("config.json: a mixture of experts without `num_experts` / `num_local_experts`")
        };
        let top_k = uint("num_experts_per_tok").unwrap_or(2) as usize;
        let num_experts = num_experts as usize;
        if top_k == 0 || top_k > num_experts {
            bail!("config.json: {top_k} experts per token out of {num_experts}")
        }
        let Some(intermediate) =
            uint("moe_intermediate_size").or_else(|| uint("intermediate_size"))
        else {
            bail!("config.json: no `moe_intermediate_size` / `intermediate_size`")
        };
        let step = uint("decoder_sparse_step").unwrap_or(1).max(1) as usize;
        let dense: Vec<usize> = config
            .get("mlp_only_layers")
            .and_then(serde_json::Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as usize)
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            num_experts,
            top_k,
            intermediate_size: intermediate as usize,
            renormalize: config
                .get("norm_topk_prob")
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(renormalize_default),
            shared_intermediate_size: uint("shared_expert_intermediate_size")
                .filter(|s| *s > 0)
                .map(|s| s as usize),
            sparse_layers: (0..num_layers)
                .map(|i| !dense.contains(&i) && (i + 1).is_multiple_of(step))
                .collect(),
            module: "mlp".into(),
        })
    }
}

/// The shared expert and its sigmoid gate (`shared_expert`, `shared_expert_gate`).
#[derive(Debug, Clone)]
struct SharedExpert {
    mlp: GatedMlp,
    gate: Option<Linear>,
}

#[derive(Debug, Clone)]
pub(crate) struct SparseMoe {
    /// `[num_experts, hidden]`, kept in float (as vLLM and llama.cpp keep it): routing decides which
    /// weights run at all, so it is worth its few bytes.
    router: Linear,
    experts: Vec<GatedMlp>,
    top_k: usize,
    renormalize: bool,
    shared: Option<SharedExpert>,
}

/// One token's choice: `(expert, weight)` for its `k` experts, best first.
pub(crate) fn route(logits: &[f32], k: usize, renormalize: bool) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // the larger probability first, the lower index among equals (as torch.topk)
    order.sort_by(|a, b| exps[*b].total_cmp(&exps[*a]).then(a.cmp(b)));
    let mut chosen: Vec<(usize, f32)> = order[..k].iter().map(|&e| (e, exps[e] / sum)).collect();
    if renormalize {
        let total: f32 = chosen.iter().map(|c| c.1).sum();
        for c in &mut chosen {
            c.1 /= total;
        }
    }
    chosen
}

impl SparseMoe {
    /// The block under `vb` (a layer's `mlp` / `block_sparse_moe`): `gate` (the router) and
    /// `experts.{e}` with `gate_proj`/`up_proj`/`down_proj` (Qwen) or `w1`/`w3`/`w2` (Mixtral).
    pub fn load(vb: &Weights, hidden: usize, cfg: &MoeConfig, act: Activation) -> Result<Self> {
        let router = Linear::new(
            vb.pp("gate").get((cfg.num_experts, hidden), "weight")?,
            None,
        )?;
        let ex = vb.pp("experts");
        let mixtral = ex.pp("0").pp("w1").contains_tensor("weight");
        let (g, u, d) = if mixtral {
            ("w1", "w3", "w2")
        } else {
            ("gate_proj", "up_proj", "down_proj")
        };
        let i = cfg.intermediate_size;
        let experts = (0..cfg.num_experts)
            .map(|e| {
                let e = ex.pp(e);
                GatedMlp::from_parts(
                    e.pp(g).linear(hidden, i, false)?,
                    e.pp(u).linear(hidden, i, false)?,
                    e.pp(d).linear(i, hidden, false)?,
                    i,
                    act,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = match cfg.shared_intermediate_size {
            Some(si) => {
                let gate = vb.pp("shared_expert_gate");
                Some(SharedExpert {
                    mlp: GatedMlp::load(&vb.pp("shared_expert"), hidden, si, false, act)?,
                    gate: if gate.contains_tensor("weight") {
                        Some(Linear::new(gate.get((1, hidden), "weight")?, None)?)
                    } else {
                        None
                    },
                })
            }
            None => None,
        };
        Ok(Self {
            router,
            experts,
            top_k: cfg.top_k,
            renormalize: cfg.renormalize,
            shared,
        })
    }

    /// `x` `[rows, hidden]` → `[rows, hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = x.contiguous()?;
        let rows = x.dim(0)?;
        let device = x.device();
        let logits = self
            .router
            .forward(&x)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        // per expert: the rows routed to it and their weights, rows ascending
        let mut routed: Vec<(Vec<u32>, Vec<f32>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (row, l) in logits.iter().enumerate() {
            for (e, w) in route(l, self.top_k, self.renormalize) {
                routed[e].0.push(row as u32);
                routed[e].1.push(w);
            }
        }
        let mut out = x.zeros_like()?;
        for (expert, (ids, weights)) in self.experts.iter().zip(routed) {
            if ids.is_empty() {
                continue;
            }
            let n = ids.len();
            let w = Tensor::from_vec(weights, (n, 1), device)?.to_dtype(x.dtype())?;
            if n == rows {
                // every row (a single decode, or a batch all routed here): no gather
                out = (out + expert.forward(&x)?.broadcast_mul(&w)?)?;
                continue;
            }
            let ids = Tensor::from_vec(ids, n, device)?;
            let y = expert
                .forward(&x.index_select(&ids, 0)?)?
                .broadcast_mul(&w)?;
            out = out.index_add(&ids, &y, 0)?;
        }
        if let Some(shared) = &self.shared {
            let mut s = shared.mlp.forward(&x)?;
            if let Some(gate) = &shared.gate {
                s = s.broadcast_mul(&candle_nn::ops::sigmoid(&gate.forward(&x)?)?)?;
            }
            out = (out + s)?;
        }
        Ok(out)
    }
}

/// A layer's feed-forward block: one dense MLP or a mixture of experts.
#[derive(Debug, Clone)]
pub(crate) enum FeedForward {
    Dense(GatedMlp),
    Sparse(SparseMoe),
}

impl FeedForward {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(m) => m.forward(x),
            Self::Sparse(m) => m.forward(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn routing_takes_the_k_most_likely_and_renormalises_on_request() {
        let logits = [0.0f32, 2.0, 1.0, 2.0];
        let raw = route(&logits, 2, false);
        // ties go to the lower index, as torch.topk
        assert_eq!(raw.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 3]);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((raw[0].1 - 2f32.exp() / z).abs() < 1e-6);
        let norm = route(&logits, 2, true);
        assert!((norm[0].1 - 0.5).abs() < 1e-6 && (norm[1].1 - 0.5).abs() < 1e-6);
        let three = route(&[3.0, 1.0, 2.0], 3, true);
        assert_eq!(three.iter().map(|c| c.0).collect::<Vec<_>>(), vec![0, 2, 1]);
        assert!((three.iter().map(|c| c.1).sum::<f32>() - 1.0).abs() < 1e-6);
    }

    /// The gathered, per-expert computation equals the dense sum over every token of its k experts.
    #[test]
    fn experts_on_their_rows_equal_the_dense_weighted_sum() -> Result<()> {
        let dev = Device::Cpu;
        let (hidden, inter, n_exp, rows) = (8, 6, 4, 7);
        let mlp = || -> Result<GatedMlp> {
            let w = |o, i| Tensor::randn(0f32, 0.5, (o, i), &dev);
            GatedMlp::from_parts(
                Linear::new(w(inter, hidden)?, None)?,
                Linear::new(w(inter, hidden)?, None)?,
                Linear::new(w(hidden, inter)?, None)?,
                inter,
                Activation::Silu,
            )
        };
        let experts = (0..n_exp).map(|_| mlp()).collect::<Result<Vec<_>>>()?;
        let router = Tensor::randn(0f32, 1.0, (n_exp, hidden), &dev)?;
        let moe = SparseMoe {
            router: Linear::new(router.clone(), None)?,
            experts: experts.clone(),
            top_k: 2,
            renormalize: false,
            shared: None,
        };
        let x = Tensor::randn(0f32, 1.0, (rows, hidden), &dev)?;
        let got = moe.forward(&x)?.to_vec2::<f32>()?;
        let logits = x.matmul(&router.t()?)?.to_vec2::<f32>()?;
        for r in 0..rows {
            let xr = x.narrow(0, r, 1)?;
            let mut want = Tensor::zeros((1, hidden), DType::F32, &dev)?;
            for (e, w) in route(&logits[r], 2, false) {
                want = (want + (experts[e].forward(&xr)? * w as f64)?)?;
            }
            let want = want.to_vec2::<f32>()?.remove(0);
            for (a, b) in got[r].iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "row {r}: {a} vs {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn config_reads_sparse_layers_and_both_expert_counts() -> Result<()> {
        let cfg = MoeConfig::from_config(
            &serde_json::json!({"num_local_experts": 8, "num_experts_per_tok": 2,
                "intermediate_size": 32, "decoder_sparse_step": 2, "mlp_only_layers": [3]}),
            6,
            true,
        )?;
        assert_eq!(cfg.num_experts, 8);
        assert!(cfg.renormalize);
        assert_eq!(
            cfg.sparse_layers,
            vec![false, true, false, false, false, true]
        );
        let bad = MoeConfig::from_config(
            &serde_json::json!({"num_experts": 2, "num_experts_per_tok": 3, "intermediate_size": 4}),
            1,
            true,
        );
        assert!(bad.unwrap_err().to_string().contains("3 experts per token"));
        Ok(())
    }
}
