//! llama.cpp's GGUF files: which file a model path means, the metadata turned into the config.json the
//! model loaders read, tensors served under their Hugging Face names (rows of q and k put back in
//! Hugging Face order where llama.cpp's converter permuted them), and the tokenizer and chat template
//! the metadata carries.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Shape, Tensor};
use serde_json::{json, Map, Value};

use super::quant;
use super::settings::{EngineSettings, Quantization};

/// GGUF `general.architecture` values this build loads, with the Hugging Face architecture each is.
pub(crate) const SUPPORTED: &[(&str, &str)] = &[
    ("llama", "LlamaForCausalLM"),
    ("qwen2", "Qwen2ForCausalLM"),
    ("qwen3", "Qwen3ForCausalLM"),
    ("gemma3", "Gemma3ForCausalLM"),
    ("qwen3moe", "Qwen3MoeForCausalLM"),
    ("phi3", "Phi3ForCausalLM"),
    ("granite", "GraniteForCausalLM"),
    ("olmo2", "Olmo2ForCausalLM"),
    ("smollm3", "SmolLM3ForCausalLM"),
];

/// The GGUF file the settings point at, if any: `MODEL_NAME` naming a `.gguf` file, or a folder with
/// `.gguf` files when `QUANTIZATION=gguf` or `GGUF_FILE` is set, or a folder whose only weights are one
/// `.gguf` file.
pub(crate) fn locate(settings: &EngineSettings) -> anyhow::Result<Option<PathBuf>> {
    let path = &settings.model_path;
    if path.is_file() {
        if is_gguf(path) {
            return Ok(Some(path.clone()));
        }
        bail!(
            "model path {} is a file but not a .gguf file; point MODEL_NAME at a model folder",
            path.display()
        )
    }
    if !path.is_dir() {
        return Ok(None);
    }
    if let Some(name) = settings.gguf_file.as_deref().filter(|n| !n.is_empty()) {
        let file = path.join(name);
        if !file.is_file() {
            bail!(
                "GGUF_FILE `{name}` is not in {} (GGUF files there: {:?})",
                path.display(),
                gguf_files(path)?
            )
        }
        return Ok(Some(file));
    }
    let found = gguf_files(path)?;
    let has_safetensors = std::fs::read_dir(path)?
        .filter_map(|e| e.ok())
        .any(|e| e.path().extension().is_some_and(|x| x == "safetensors"));
    let wanted = settings.quantization == Quantization::Gguf || !has_safetensors;
    match found.as_slice() {
        [] if settings.quantization == Quantization::Gguf => bail!(
            "QUANTIZATION=gguf but {} holds no .gguf file",
            path.display()
        ),
        [one] if wanted => Ok(Some(path.join(one))),
        [_, _, ..] if wanted => bail!(
            "{} holds several GGUF files {found:?}; set GGUF_FILE to pick one",
            path.display()
        ),
        _ => Ok(None),
    }
}

fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
}

fn gguf_files(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| is_gguf(p))
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    Ok(names)
}

/// An open GGUF file: its metadata, where its tensors are, and the file, read a tensor at a time
/// with positional reads (not memory-mapped: mapped pages read once would stay in the process's
/// resident memory beside the tensors made of them, two copies of the weights while loading).
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    file: std::fs::File,
    arch: String,
    /// Hugging Face config.json equivalent of the metadata.
    config: Value,
    /// `(heads, kv_heads, head_dim)` when q/k rows were permuted by llama.cpp's converter (llama).
    permuted_qk: Option<(usize, usize, usize)>,
    /// Gemma: llama.cpp's converter stores RMSNorm weights as `1 + w`; they are served as `w`.
    norms_plus_one: bool,
}

/// A reader of a file at its own position (positional reads: a shared file, no shared cursor).
struct At<'a> {
    file: &'a std::fs::File,
    pos: u64,
}

impl<'a> At<'a> {
    fn new(file: &'a std::fs::File) -> Self {
        Self { file, pos: 0 }
    }
}

impl std::io::Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl std::io::Seek for At<'_> {
    fn seek(&mut self, to: std::io::SeekFrom) -> std::io::Result<u64> {
        let len = || self.file.metadata().map(|m| m.len());
        let pos = match to {
            std::io::SeekFrom::Start(p) => Some(p),
            std::io::SeekFrom::End(d) => len()?.checked_add_signed(d),
            std::io::SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::other("seek before the start of the file"))?;
        Ok(self.pos)
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("arch", &self.arch)
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let content = Content::read(&mut std::io::BufReader::new(At::new(&file)))
            .map_err(|e| anyhow::anyhow!("{} is not a readable GGUF file: {e}", path.display()))?;
        let meta = Meta(&content.metadata);
        let arch = meta.string("general.architecture")?;
        if !SUPPORTED.iter().any(|(a, _)| *a == arch) {
            let list: Vec<&str> = SUPPORTED.iter().map(|(a, _)| *a).collect();
            bail!(
                "GGUF architecture `{arch}` is not supported (supported: {})",
                list.join(", ")
            )
        }
        let mut gguf = Self {
            path: path.to_path_buf(),
            content,
            file,
            arch,
            config: Value::Null,
            permuted_qk: None,
            norms_plus_one: false,
        };
        gguf.norms_plus_one = gguf.arch == "gemma3";
        gguf.config = gguf.hf_config()?;
        // Granite's and SmolLM3's converters are Llama's: q/k rows permuted too
        if ["llama", "granite", "smollm3"].contains(&gguf.arch.as_str()) {
            let c = &gguf.config;
            let n = |k: &str| c[k].as_u64().unwrap_or(0) as usize;
            gguf.permuted_qk = Some((
                n("num_attention_heads"),
                n("num_key_value_heads"),
                n("head_dim"),
            ));
        }
        Ok(gguf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata as a Hugging Face config.json.
    pub fn config(&self) -> &Value {
        &self.config
    }

    fn meta(&self) -> Meta<'_> {
        Meta(&self.content.metadata)
    }

    fn hf_config(&self) -> anyhow::Result<Value> {
        let m = self.meta();
        let a = |k: &str| format!("{}.{k}", self.arch);
        let heads = m.uint(&a("attention.head_count"))?;
        let hidden = m.uint(&a("embedding_length"))?;
        let Some(embd) = self.content.tensor_infos.get("token_embd.weight") else {
            bail!("{} has no token_embd.weight", self.path.display())
        };
        let vocab = embd.shape.dims()[0];
        let head_dim = m
            .uint(&a("attention.key_length"))
            .unwrap_or(hidden / heads.max(1));
        let experts = m.uint(&a("expert_count")).unwrap_or(0);
        let hf_arch = SUPPORTED
            .iter()
            .find(|(g, _)| *g == self.arch)
            .map(|(_, h)| *h)
            .unwrap_or_default();
        // llama.cpp writes Mixtral as `llama` with experts
        let hf_arch = if self.arch == "llama" && experts > 0 {
            "MixtralForCausalLM"
        } else {
            hf_arch
        };
        let expert_ffn = m.uint(&a("expert_feed_forward_length")).ok();
        let mut c = json!({
            "architectures": [hf_arch],
            "model_type": self.arch,
            "hidden_size": hidden,
            "intermediate_size": match (m.uint(&a("feed_forward_length")), expert_ffn) {
                (Ok(n), _) | (Err(_), Some(n)) => n,
                (Err(e), None) => return Err(e),
            },
            "num_hidden_layers": m.uint(&a("block_count"))?,
            "num_attention_heads": heads,
            "num_key_value_heads": m.uint(&a("attention.head_count_kv")).unwrap_or(heads),
            "head_dim": head_dim,
            "rms_norm_eps": m.float(&a("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
            "rope_theta": m.float(&a("rope.freq_base")).unwrap_or(10000.0),
            "max_position_embeddings": m.uint(&a("context_length")).unwrap_or(4096),
            "vocab_size": vocab,
            "tie_word_embeddings": !self.content.tensor_infos.contains_key("output.weight"),
            "hidden_act": "silu",
            "torch_dtype": "float16",
        });
        if let Some(eos) = self.special_id("eos") {
            c["eos_token_id"] = json!(eos);
        }
        if let Some(bos) = self.special_id("bos") {
            c["bos_token_id"] = json!(bos);
        }
        if let Some(scaling) = self.rope_scaling(head_dim)? {
            c["rope_scaling"] = scaling;
        }
        if self.arch == "gemma3" {
            self.gemma3_config(&mut c, heads, head_dim)?;
        }
        if self.arch == "phi3" {
            self.phi3_config(&mut c, head_dim)?;
        }
        if self.arch == "smollm3" {
            // the converter writes no layer pattern; llama.cpp leaves RoPE out of every 4th layer
            c["no_rope_layer_interval"] = json!(4);
        }
        if self.arch == "granite" {
            // the converter writes Granite's multipliers as `*_scale` (each only when set)
            for (key, hf) in [
                ("attention.scale", "attention_multiplier"),
                ("embedding_scale", "embedding_multiplier"),
                ("residual_scale", "residual_multiplier"),
                ("logit_scale", "logits_scaling"),
            ] {
                if let Ok(v) = m.float(&a(key)) {
                    c[hf] = json!(v);
                }
            }
        }
        if experts > 0 {
            c["num_experts"] = json!(experts);
            c["num_experts_per_tok"] = json!(m.uint(&a("expert_used_count"))?);
            if let Some(n) = expert_ffn {
                c["moe_intermediate_size"] = json!(n);
            }
            // llama.cpp renormalises qwen3moe's top-k weights unless the file says otherwise
            c["norm_topk_prob"] = json!(m.bool(&a("expert_weights_norm")).unwrap_or(true));
        }
        Ok(c)
    }

    /// Gemma 3's fields, as llama.cpp reads them: sliding window and its layer pattern (every sixth
    /// layer global unless the file says otherwise), the sliding layers' RoPE base (10000 unless
    /// `rope.freq_base_swa`), the attention scale (`1/sqrt(head_dim)`; `1/sqrt(hidden/heads)` for the
    /// 62-layer 27B).
    fn gemma3_config(&self, c: &mut Value, heads: usize, head_dim: usize) -> anyhow::Result<()> {
        let m = self.meta();
        let a = |k: &str| format!("{}.{k}", self.arch);
        let layers = m.uint(&a("block_count"))?;
        let sliding: Vec<bool> = match m.get(&a("attention.sliding_window_pattern")) {
            Ok(GgufValue::Array(per_layer)) => per_layer
                .iter()
                .map(|v| v.to_bool().unwrap_or(false))
                .collect(),
            Ok(v) => {
                let period = as_u64(v).unwrap_or(6).max(1) as usize;
                (0..layers).map(|i| (i + 1) % period != 0).collect()
            }
            Err(_) => (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
        };
        let types: Vec<&str> = sliding
            .iter()
            .map(|s| {
                if *s {
                    "sliding_attention"
                } else {
                    "full_attention"
                }
            })
            .collect();
        let hidden = m.uint(&a("embedding_length"))?;
        let scalar = if layers == 62 {
            hidden / heads.max(1)
        } else {
            head_dim
        };
        c["hidden_activation"] = json!("gelu_pytorch_tanh");
        c["query_pre_attn_scalar"] = json!(scalar);
        c["sliding_window"] = json!(m.uint(&a("attention.sliding_window")).ok());
        c["layer_types"] = json!(types);
        c["rope_theta"] = json!(m.float(&a("rope.freq_base")).unwrap_or(1e6));
        c["rope_local_base_freq"] = json!(m.float(&a("rope.freq_base_swa")).unwrap_or(1e4));
        Ok(())
    }

    /// Phi-3 / Phi-4's fields as llama.cpp's converter writes them: the rotated share of each head
    /// (`rope.dimension_count`), the sliding window, and `longrope` from the `rope_factors_long` /
    /// `rope_factors_short` tensors, `rope.scaling.original_context_length` and
    /// `rope.scaling.attn_factor`.
    fn phi3_config(&self, c: &mut Value, head_dim: usize) -> anyhow::Result<()> {
        let m = self.meta();
        let a = |k: &str| format!("{}.{k}", self.arch);
        if let Ok(rot) = m.uint(&a("rope.dimension_count")) {
            c["partial_rotary_factor"] = json!(rot as f64 / head_dim as f64);
        }
        // the converter writes 0 for none (Phi-4)
        let window = m
            .uint(&a("attention.sliding_window"))
            .ok()
            .filter(|w| *w > 0);
        c["sliding_window"] = json!(window);
        let (Some(long), Some(short)) = (
            self.f32_tensor("rope_factors_long.weight")?,
            self.f32_tensor("rope_factors_short.weight")?,
        ) else {
            return Ok(());
        };
        let original = m
            .uint(&a("rope.scaling.original_context_length"))
            .context("longrope factors without rope.scaling.original_context_length")?;
        let mut scaling = json!({"rope_type": "longrope", "long_factor": long,
            "short_factor": short, "original_max_position_embeddings": original});
        if let Ok(f) = m.float(&a("rope.scaling.attn_factor")) {
            scaling["attention_factor"] = json!(f);
        }
        c["rope_scaling"] = scaling;
        Ok(())
    }

    /// A small float tensor's values (RoPE factors), if the file has it.
    fn f32_tensor(&self, name: &str) -> anyhow::Result<Option<Vec<f32>>> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let t = info.read(
            &mut At::new(&self.file),
            self.content.tensor_data_offset,
            &Device::Cpu,
        )?;
        Ok(Some(
            t.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        ))
    }

    /// RoPE scaling from the metadata, or the per-frequency divisors of `rope_freqs.weight` that
    /// llama.cpp's converter writes for Llama 3.1+ instead of the `llama3` parameters.
    fn rope_scaling(&self, head_dim: usize) -> anyhow::Result<Option<Value>> {
        let m = self.meta();
        let key = |k: &str| format!("{}.rope.scaling.{k}", self.arch);
        match m.string(&key("type")).ok().as_deref() {
            None | Some("none") => {}
            Some("linear") => {
                let factor = m.float(&key("factor"))?;
                return Ok(Some(json!({"rope_type": "linear", "factor": factor})));
            }
            Some(other) => bail!("GGUF RoPE scaling `{other}` is not supported"),
        }
        let Some(info) = self.content.tensor_infos.get("rope_freqs.weight") else {
            return Ok(None);
        };
        let factors = info
            .read(
                &mut At::new(&self.file),
                self.content.tensor_data_offset,
                &Device::Cpu,
            )?
            .dequantize(&Device::Cpu)?
            .to_vec1::<f32>()?;
        if factors.len() != head_dim / 2 {
            bail!(
                "{}: rope_freqs.weight has {} factors for a head of {head_dim}",
                self.path.display(),
                factors.len()
            )
        }
        Ok(Some(
            json!({"rope_type": "gguf_freq_factors", "factors": factors}),
        ))
    }

    /// `tokenizer.ggml.<kind>_token_id`.
    fn special_id(&self, kind: &str) -> Option<u32> {
        self.meta()
            .uint(&format!("tokenizer.ggml.{kind}_token_id"))
            .ok()
            .map(|n| n as u32)
    }

    /// Every id that ends generation: EOS, and the end-of-turn / end-of-message ids chat models use.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let mut ids = Vec::new();
        for kind in ["eos", "eot", "eom"] {
            if let Some(id) = self.special_id(kind) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id("bos")
    }

    pub fn chat_template(&self) -> Option<String> {
        self.meta().string("tokenizer.chat_template").ok()
    }

    /// The GGUF tensor a Hugging Face tensor name stands for, and for an expert of a mixture stored
    /// as one 3-D tensor (`ffn_{gate,up,down}_exps`), the expert's index in it.
    fn gguf_tensor(&self, hf: &str) -> Option<(String, Option<usize>)> {
        if let Some(rest) = hf.strip_prefix("model.layers.") {
            let (idx, rest) = rest.split_once('.')?;
            if let Some(expert) = rest.strip_prefix("mlp.experts.") {
                let (e, rest) = expert.split_once('.')?;
                let (proj, suffix) = rest.split_once('.')?;
                let kind = match proj {
                    "gate_proj" | "w1" => "gate",
                    "up_proj" | "w3" => "up",
                    "down_proj" | "w2" => "down",
                    _ => return None,
                };
                // older Mixtral GGUFs: one tensor per expert
                let single = format!("blk.{idx}.ffn_{kind}.{e}.{suffix}");
                if self.content.tensor_infos.contains_key(&single) {
                    return Some((single, None));
                }
                let e: usize = e.parse().ok()?;
                return Some((format!("blk.{idx}.ffn_{kind}_exps.{suffix}"), Some(e)));
            }
        }
        self.gguf_name(hf).map(|n| (n, None))
    }

    /// The GGUF tensor a Hugging Face tensor name stands for.
    fn gguf_name(&self, hf: &str) -> Option<String> {
        let top = match hf {
            "model.embed_tokens.weight" => Some("token_embd.weight"),
            "model.norm.weight" => Some("output_norm.weight"),
            "lm_head.weight" => Some("output.weight"),
            _ => None,
        };
        if let Some(t) = top {
            return Some(t.to_string());
        }
        let rest = hf.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let (module, suffix) = rest.rsplit_once('.')?;
        let name = match module {
            "input_layernorm" => "attn_norm",
            // Gemma's four norms per layer
            "post_attention_layernorm" if self.norms_plus_one || self.arch == "olmo2" => {
                "post_attention_norm"
            }
            "pre_feedforward_layernorm" => "ffn_norm",
            "post_feedforward_layernorm" => "post_ffw_norm",
            "post_attention_layernorm" => "ffn_norm",
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "self_attn.q_norm" => "attn_q_norm",
            "self_attn.k_norm" => "attn_k_norm",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            // Phi-3's fused layers
            "self_attn.qkv_proj" => "attn_qkv",
            "mlp.gate_up_proj" => "ffn_up",
            // a mixture's router
            "mlp.gate" => "ffn_gate_inp",
            _ => return None,
        };
        Some(format!("blk.{idx}.{name}.{suffix}"))
    }

    pub fn contains(&self, hf: &str) -> bool {
        match self.gguf_tensor(hf) {
            Some((n, expert)) => self.content.tensor_infos.get(&n).is_some_and(|info| {
                expert.is_none_or(|e| info.shape.rank() == 3 && e < info.shape.dims()[0])
            }),
            None => false,
        }
    }

    /// Expert `e`'s `[out, in]` matrix of a 3-D `[experts, out, in]` tensor, read from its own bytes
    /// only (not the whole stack).
    fn expert_qtensor(
        &self,
        name: &str,
        e: usize,
        device: &Device,
    ) -> candle_core::Result<Option<QTensor>> {
        let Some(info) = self.content.tensor_infos.get(name) else {
            return Ok(None);
        };
        let &[n, rows, cols] = info.shape.dims() else {
            candle_core::bail!("{name}: {:?} is not a stack of expert matrices", info.shape)
        };
        if e >= n {
            return Ok(None);
        }
        let dtype = info.ggml_dtype;
        if cols % dtype.block_size() != 0 {
            candle_core::bail!("{name}: rows of {cols} do not fill {dtype:?} blocks")
        }
        let size = rows * cols / dtype.block_size() * dtype.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize + e * size;
        let mut bytes = vec![0u8; size];
        std::os::unix::fs::FileExt::read_exact_at(&self.file, &mut bytes, start as u64).map_err(
            |err| candle_core::Error::Msg(format!("{name}: expert {e} cannot be read: {err}")),
        )?;
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Owned(bytes),
            device,
            dtype,
        )?;
        QTensor::new(storage, (rows, cols)).map(Some)
    }

    /// The tensor stored for Hugging Face name `hf`, in the file's block type, rows in Hugging Face
    /// order. `None` if the file has no such tensor.
    pub(crate) fn qtensor(
        &self,
        hf: &str,
        device: &Device,
    ) -> candle_core::Result<Option<QTensor>> {
        let Some((name, expert)) = self.gguf_tensor(hf) else {
            return Ok(None);
        };
        if let Some(e) = expert {
            return self.expert_qtensor(&name, e, device);
        }
        let Some(info) = self.content.tensor_infos.get(&name) else {
            return Ok(None);
        };
        let q = info.read(
            &mut At::new(&self.file),
            self.content.tensor_data_offset,
            device,
        )?;
        let Some(order) = self.unpermute_order(&name, q.shape().dims()[0]) else {
            return Ok(Some(q));
        };
        if q.shape().rank() == 2 {
            return quant::permute_rows(&q, &order).map(Some);
        }
        let idx = Tensor::new(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), device)?;
        let rows = q.dequantize(device)?.index_select(&idx, 0)?;
        QTensor::quantize(&rows, candle_core::quantized::GgmlDType::F32).map(Some)
    }

    /// llama.cpp's converter interleaves the two rotary halves of each q/k head (its RoPE rotates
    /// adjacent pairs); row `i` of Hugging Face's layout is row `order[i]` of the file's.
    fn unpermute_order(&self, gguf_name: &str, rows: usize) -> Option<Vec<usize>> {
        let (heads, kv_heads, head_dim) = self.permuted_qk?;
        let n = if gguf_name.ends_with("attn_q.weight") || gguf_name.ends_with("attn_q.bias") {
            heads
        } else if gguf_name.ends_with("attn_k.weight") || gguf_name.ends_with("attn_k.bias") {
            kv_heads
        } else {
            return None;
        };
        if n * head_dim != rows || head_dim % 2 != 0 {
            return None;
        }
        let half = head_dim / 2;
        let mut order = Vec::with_capacity(rows);
        for h in 0..n {
            for j in 0..2 {
                for i in 0..half {
                    order.push(h * head_dim + 2 * i + j);
                }
            }
        }
        Some(order)
    }

    /// The tokenizer the metadata describes, as a Hugging Face `tokenizer.json` document and the
    /// `tokenizer_config.json` that goes with it (special tokens, chat template). Byte-level BPE
    /// (`tokenizer.ggml.model` = `gpt2`) and SentencePiece (`llama`); others need `TOKENIZER_NAME`.
    pub(crate) fn tokenizer_files(&self) -> anyhow::Result<(Value, Value)> {
        let m = self.meta();
        let model = m.string("tokenizer.ggml.model")?;
        let tokens = m.strings("tokenizer.ggml.tokens")?;
        let types = m.uints("tokenizer.ggml.token_type").unwrap_or_default();
        // CONTROL (3) and USER_DEFINED (4) tokens are never split; only CONTROL ones are special
        let added: Vec<Value> = types
            .iter()
            .enumerate()
            .filter(|(_, t)| matches!(t, 3 | 4))
            .filter_map(|(i, t)| {
                tokens.get(i).map(|content| {
                    json!({"id": i, "content": content, "single_word": false, "lstrip": false,
                        "rstrip": false, "normalized": false, "special": *t == 3})
                })
            })
            .collect();
        let tokenizer = match model.as_str() {
            "gpt2" => self.byte_level_bpe(&tokens, added)?,
            "llama" => self.sentencepiece(&tokens, &types, added)?,
            _ => bail!(
                "{}: the GGUF tokenizer `{model}` cannot be rebuilt from metadata by this build \
                 (it rebuilds `gpt2` and `llama`); set TOKENIZER_NAME to the original model's \
                 repository or folder",
                self.path.display()
            ),
        };
        Ok((tokenizer, self.tokenizer_config_for(&tokens)))
    }

    /// llama.cpp's SentencePiece tokenizer as a `tokenizers` BPE model: spaces become `▁` (with one in
    /// front when `add_space_prefix`), adjacent pieces merge highest score first (so the merges are
    /// every split of a vocabulary piece into two pieces, ranked by the whole piece's score), and text
    /// no piece covers falls back to the `<0xXX>` byte tokens.
    fn sentencepiece(
        &self,
        tokens: &[String],
        types: &[u64],
        added: Vec<Value>,
    ) -> anyhow::Result<Value> {
        let m = self.meta();
        let scores = m.floats("tokenizer.ggml.scores").with_context(|| {
            format!(
                "{}: a SentencePiece tokenizer needs its scores; set TOKENIZER_NAME to the original \
                 model's repository or folder",
                self.path.display()
            )
        })?;
        if scores.len() != tokens.len() {
            bail!(
                "{}: {} tokenizer scores for {} tokens",
                self.path.display(),
                scores.len(),
                tokens.len()
            )
        }
        // pieces that merge: normal (1) and user-defined (4) ones; the first id of a repeated text
        let mut ids: HashMap<&str, usize> = HashMap::new();
        for (i, t) in tokens.iter().enumerate() {
            if matches!(types.get(i).copied().unwrap_or(1), 1 | 4) {
                ids.entry(t.as_str()).or_insert(i);
            }
        }
        let mut merges: Vec<(f64, usize, usize, usize)> = Vec::new();
        for (&piece, &id) in &ids {
            for (cut, _) in piece.char_indices().skip(1) {
                let (a, b) = piece.split_at(cut);
                if let (Some(&l), Some(&r)) = (ids.get(a), ids.get(b)) {
                    merges.push((scores[id], id, l, r));
                }
            }
        }
        // best score first; ties by the merged piece's id, then the left piece's (stable across runs)
        merges.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)));
        let merges: Vec<Value> = merges
            .iter()
            .map(|(_, _, l, r)| json!([tokens[*l], tokens[*r]]))
            .collect();
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .rev()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let prefix = m.bool("tokenizer.ggml.add_space_prefix").unwrap_or(true);
        let replace = json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"});
        let normalizer = if prefix {
            json!({"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"}, replace]})
        } else {
            replace
        };
        let mut decoders = vec![
            json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
            json!({"type": "ByteFallback"}),
            json!({"type": "Fuse"}),
        ];
        if prefix {
            decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
        }
        let unk = self
            .special_id("unknown")
            .and_then(|i| tokens.get(i as usize))
            .cloned();
        Ok(json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": normalizer,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Sequence", "decoders": decoders},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true,
                "byte_fallback": true, "ignore_merges": false, "vocab": vocab, "merges": merges},
        }))
    }

    /// Byte-level BPE (`gpt2`): the vocabulary, the merges and the pre-tokenizer `tokenizer.ggml.pre`
    /// names.
    fn byte_level_bpe(&self, tokens: &[String], added: Vec<Value>) -> anyhow::Result<Value> {
        let m = self.meta();
        let merges = m.strings("tokenizer.ggml.merges")?;
        let pre = m
            .string("tokenizer.ggml.pre")
            .unwrap_or_else(|_| "default".into());
        let (pre_tokenizer, ignore_merges) = pre_tokenizer(&pre).with_context(|| {
            format!(
                "{}: set TOKENIZER_NAME to the original model's repository",
                self.path.display()
            )
        })?;
        let vocab: Map<String, Value> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let merges: Vec<Value> = merges
            .iter()
            .filter_map(|m| m.split_once(' '))
            .map(|(a, b)| json!([a, b]))
            .collect();
        let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
            "trim_offsets": true, "use_regex": true});
        let tokenizer = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": false,
                "trim_offsets": false, "use_regex": true},
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": ignore_merges, "vocab": vocab,
                "merges": merges},
        });
        Ok(tokenizer)
    }

    /// The `tokenizer_config.json` the metadata implies: special tokens by name, `add_bos_token`, the
    /// chat template.
    pub fn tokenizer_config(&self) -> Value {
        let tokens = self
            .meta()
            .strings("tokenizer.ggml.tokens")
            .unwrap_or_default();
        self.tokenizer_config_for(&tokens)
    }

    fn tokenizer_config_for(&self, tokens: &[String]) -> Value {
        let m = self.meta();
        let mut config = json!({"clean_up_tokenization_spaces": false});
        let name = |id: Option<u32>| id.and_then(|i| tokens.get(i as usize)).cloned();
        for (kind, key) in [
            ("bos", "bos_token"),
            ("eos", "eos_token"),
            ("unknown", "unk_token"),
            ("padding", "pad_token"),
        ] {
            if let Some(t) = name(self.special_id(kind)) {
                config[key] = json!(t);
            }
        }
        if let Ok(add_bos) = m.bool("tokenizer.ggml.add_bos_token") {
            config["add_bos_token"] = json!(add_bos);
        }
        if let Some(t) = self.chat_template() {
            config["chat_template"] = json!(t);
        }
        config
    }
}

/// The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, as `tokenizer.json` writes it, and whether
/// the BPE model takes whole vocabulary words before merging (Llama 3's `ignore_merges`).
fn pre_tokenizer(pre: &str) -> anyhow::Result<(Value, bool)> {
    let byte_level = |regex: bool| {
        json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
            "use_regex": regex})
    };
    let split = |rx: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": false},
            byte_level(false)]})
    };
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => (byte_level(true), false),
        // llama.cpp: "\p{N}" then the GPT-2 regex
        "smollm" => (
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            false,
        ),
        "qwen2" => (split(QWEN2), false),
        "llama-bpe" | "llama3" => (split(LLAMA3), true),
        other => bail!("the GGUF pre-tokenizer `{other}` is not known to this build"),
    })
}

/// Typed reads of GGUF metadata with errors that name the key.
struct Meta<'a>(&'a HashMap<String, GgufValue>);

impl Meta<'_> {
    fn get(&self, key: &str) -> anyhow::Result<&GgufValue> {
        self.0
            .get(key)
            .with_context(|| format!("GGUF metadata lacks `{key}`"))
    }

    fn string(&self, key: &str) -> anyhow::Result<String> {
        Ok(self.get(key)?.to_string()?.clone())
    }

    fn uint(&self, key: &str) -> anyhow::Result<usize> {
        Ok(
            as_u64(self.get(key)?).with_context(|| format!("GGUF `{key}` is not an integer"))?
                as usize,
        )
    }

    fn float(&self, key: &str) -> anyhow::Result<f64> {
        match self.get(key)? {
            GgufValue::F32(v) => Ok(*v as f64),
            GgufValue::F64(v) => Ok(*v),
            v => as_u64(v)
                .map(|n| n as f64)
                .with_context(|| format!("GGUF `{key}` is not a number")),
        }
    }

    fn bool(&self, key: &str) -> anyhow::Result<bool> {
        Ok(self.get(key)?.to_bool()?)
    }

    fn strings(&self, key: &str) -> anyhow::Result<Vec<String>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.clone()))
            .collect()
    }

    fn floats(&self, key: &str) -> anyhow::Result<Vec<f64>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| match v {
                GgufValue::F32(f) => Ok(*f as f64),
                GgufValue::F64(f) => Ok(*f),
                _ => bail!("GGUF `{key}` holds a non-number"),
            })
            .collect()
    }

    fn uints(&self, key: &str) -> anyhow::Result<Vec<u64>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| as_u64(v).with_context(|| format!("GGUF `{key}` holds a non-integer")))
            .collect()
    }
}

fn as_u64(v: &GgufValue) -> Option<u64> {
    Some(match v {
        GgufValue::U8(n) => *n as u64,
        GgufValue::U16(n) => *n as u64,
        GgufValue::U32(n) => *n as u64,
        GgufValue::U64(n) => *n,
        GgufValue::I8(n) => u64::try_from(*n).ok()?,
        GgufValue::I16(n) => u64::try_from(*n).ok()?,
        GgufValue::I32(n) => u64::try_from(*n).ok()?,
        GgufValue::I64(n) => u64::try_from(*n).ok()?,
        _ => return None,
    })
}

/// Serves a GGUF file's tensors to a `VarBuilder` by Hugging Face name, dequantized (norms, biases;
/// linear layers and the embedding table take the quantized blocks through `Weights`).
pub(crate) struct GgufBackend(pub std::sync::Arc<GgufFile>);

impl candle_nn::var_builder::SimpleBackend for GgufBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("{name}: GGUF holds {:?}, expected {s:?}", t.shape())
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.0.qtensor(name, dev)? {
            Some(q) if self.0.norms_plus_one && name.ends_with("norm.weight") => {
                (q.dequantize(dev)? - 1.0)?.to_dtype(dtype)
            }
            Some(q) => q.dequantize(dev)?.to_dtype(dtype),
            None => Err(candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}
