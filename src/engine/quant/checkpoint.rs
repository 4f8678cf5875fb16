//! Checkpoints published already quantized (`quantization_config` in config.json): AWQ and GPTQ 4-bit
//! weights repacked at load into ggml q4_1 / q4_0 (q5_0) blocks, FP8 weights converted to q8_0.
//!
//! An int4 group with scale `s` and zero `z` holds `w = s·(q − z)`. Every 32 columns of a group
//! become one ggml block: a q4_1 block (`d·q + m`, 4.5 bits per weight) with `d = s` (the
//! checkpoint's f16 scale), the checkpoint's `q` as stored and `m = f16(−s·z)`, which holds the
//! checkpoint's weights up to the f16 rounding of `m` (at most `2⁻¹¹·s·z`, under 0.75% of the
//! group's step `s`: `q4_1_bound` (tests)). Symmetric layers (every zero 8) fit q4_0, `d·(q − 8)`,
//! exactly, at llama.cpp q4_0's size. Where q4_1 does not fit (rows of an odd number of blocks,
//! which candle's q4_1 kernels refuse, or an `s·z` past f16's range) a q5_0 block (`d·(x − 16)`,
//! `x = q − z + 16` in 0..=31) holds them exactly, at 5.5 bits. All three run on this engine's own
//! 32-block kernels. GPTQ's act-order
//! (`desc_act`) puts a layer's columns into groups out of order: those layers keep their weight with
//! the columns sorted by group and gather the input's columns in the same order on each forward.

use std::borrow::Cow;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{bail, DType, Device, Result, Tensor};
use half::f16;
use rayon::prelude::*;
use serde_json::Value;

/// AutoAWQ's GEMM packing: nibble `i` of a packed int32 holds column `8c + AWQ_ORDER[i]`.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// What this build runs, for the errors naming what it does not.
const SUPPORTED: &str = "supported: AWQ 4-bit GEMM checkpoints (zero_point true, version gemm), \
    GPTQ 4-bit checkpoints (checkpoint_format gptq or gptq_v2, with or without desc_act, sym or \
    asym), group sizes that are multiples of 32 (or -1), and FP8 (quant_method fp8, or \
    compressed-tensors float-quantized; per-tensor, per-channel or block-wise scales)";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Awq,
    /// `zero_offset`: 1 for the historic v1 format (zeros stored minus one), 0 for `gptq_v2`.
    Gptq {
        zero_offset: i32,
    },
    Fp8,
}

/// A checkpoint's quantization, as read from its `quantization_config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckpointQuant {
    pub method: Method,
    /// Input columns per scale; `None` for one group over the whole row (`group_size: -1`).
    pub group_size: Option<usize>,
    /// FP8's `weight_block_size` `[rows, cols]` of block-wise scales.
    pub block: Option<(usize, usize)>,
}

impl CheckpointQuant {
    /// `awq`, `gptq` or `fp8`: the `QUANTIZATION` value that names this method.
    pub fn name(&self) -> &'static str {
        match self.method {
            Method::Awq => "awq",
            Method::Gptq { .. } => "gptq",
            Method::Fp8 => "fp8",
        }
    }
}

fn unsupported(what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "this checkpoint's quantization ({what}) is not supported by this worker; {SUPPORTED}"
    ))
}

/// The checkpoint's quantization, `None` for a float checkpoint; an error naming the variant for
/// quantized checkpoints this build cannot run.
pub(crate) fn from_config(config: &Value) -> Result<Option<CheckpointQuant>> {
    let Some(qc) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = qc
        .get("quant_method")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    let int = |k: &str| qc.get(k).and_then(Value::as_i64);
    let text = |k: &str| {
        qc.get(k)
            .and_then(Value::as_str)
            .map(str::to_ascii_lowercase)
    };
    let group_size = || -> Result<Option<usize>> {
        match int("group_size") {
            None | Some(-1) => Ok(None),
            Some(g) if g > 0 && g % 32 == 0 => Ok(Some(g as usize)),
            Some(g) => Err(unsupported(format!("{method} with group_size {g}"))),
        }
    };
    let bits = |default: i64| -> Result<()> {
        match int("bits").or(int("w_bit")).unwrap_or(default) {
            4 => Ok(()),
            b => Err(unsupported(format!("{b}-bit {method}"))),
        }
    };
    match method.as_str() {
        "awq" => {
            bits(4)?;
            let version = text("version").unwrap_or_else(|| "gemm".into());
            if version != "gemm" {
                return Err(unsupported(format!("AWQ version {version}")));
            }
            if qc.get("zero_point").and_then(Value::as_bool) == Some(false) {
                return Err(unsupported("AWQ without zero points".into()));
            }
            Ok(Some(CheckpointQuant {
                method: Method::Awq,
                group_size: group_size()?,
                block: None,
            }))
        }
        "gptq" => {
            bits(4)?;
            if qc.get("is_marlin_format").and_then(Value::as_bool) == Some(true) {
                return Err(unsupported("GPTQ in Marlin format".into()));
            }
            let zero_offset = match text("checkpoint_format").as_deref() {
                None | Some("gptq") => 1,
                Some("gptq_v2") => 0,
                Some(other) => return Err(unsupported(format!("GPTQ checkpoint_format {other}"))),
            };
            Ok(Some(CheckpointQuant {
                method: Method::Gptq { zero_offset },
                group_size: group_size()?,
                block: None,
            }))
        }
        "fp8" => {
            if let Some(fmt) = text("fmt") {
                if fmt != "e4m3" {
                    return Err(unsupported(format!("FP8 format {fmt}")));
                }
            }
            let block = match qc.get("weight_block_size").and_then(Value::as_array) {
                Some(b) => match (
                    b.first().and_then(Value::as_u64),
                    b.get(1).and_then(Value::as_u64),
                ) {
                    (Some(r), Some(c)) if b.len() == 2 && r > 0 && c > 0 => {
                        Some((r as usize, c as usize))
                    }
                    _ => return Err(unsupported(format!("FP8 weight_block_size {b:?}"))),
                },
                None => None,
            };
            Ok(Some(CheckpointQuant {
                method: Method::Fp8,
                group_size: None,
                block,
            }))
        }
        "compressed-tensors" => compressed_tensors_fp8(qc).map(Some),
        "" => Err(unsupported(
            "a quantization_config without quant_method".into(),
        )),
        other => Err(unsupported(format!("quant_method {other}"))),
    }
}

/// llm-compressor's `compressed-tensors` checkpoints, of which this build runs the FP8 weight format
/// (`format: float-quantized`, 8-bit `float` weights per tensor, channel or block).
fn compressed_tensors_fp8(qc: &Value) -> Result<CheckpointQuant> {
    let format = qc.get("format").and_then(Value::as_str).unwrap_or("");
    if format != "float-quantized" {
        return Err(unsupported(format!("compressed-tensors format {format:?}")));
    }
    let mut block = None;
    let groups = qc.get("config_groups").and_then(Value::as_object);
    for (name, group) in groups.into_iter().flatten() {
        let w = &group["weights"];
        let (kind, bits) = (w["type"].as_str(), w["num_bits"].as_u64());
        if kind != Some("float") || bits != Some(8) {
            return Err(unsupported(format!(
                "compressed-tensors group {name} with {}-bit {} weights",
                bits.map_or("?".into(), |b| b.to_string()),
                kind.unwrap_or("?")
            )));
        }
        if let Some(b) = w["block_structure"].as_array() {
            match (
                b.first().and_then(Value::as_u64),
                b.get(1).and_then(Value::as_u64),
            ) {
                (Some(r), Some(c)) if r > 0 && c > 0 => block = Some((r as usize, c as usize)),
                _ => {
                    return Err(unsupported(format!(
                        "compressed-tensors block_structure {b:?}"
                    )))
                }
            }
        }
    }
    Ok(CheckpointQuant {
        method: Method::Fp8,
        group_size: None,
        block,
    })
}

/// What a quantized checkpoint's linear layer becomes.
#[derive(Debug)]
pub(crate) enum Loaded {
    /// `[out, in]` blocks.
    Blocks(QTensor),
    /// `[out, in']` blocks over the input's columns taken in `order` (`x[:, order]`).
    Gathered(QTensor, Vec<u32>),
    /// A float `[out, in]` weight (the rows fit no block layout).
    Dense(Tensor),
}

/// A 4-bit layer unpacked: `q[n * in + k]` for output `n` and input column `k`, per group `zeros`
/// and `scales` (`[groups * out]`), and each input column's group.
pub(crate) struct Int4 {
    pub in_dim: usize,
    pub out_dim: usize,
    pub q: Vec<u8>,
    pub zeros: Vec<i32>,
    pub scales: Vec<f32>,
    pub g_idx: Vec<u32>,
}

impl Int4 {
    /// The checkpoint's dequantized weight `s·(q − z)`, `[out, in]` row-major, in float32.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.in_dim * self.out_dim];
        for k in 0..self.in_dim {
            let g = self.g_idx[k] as usize;
            for n in 0..self.out_dim {
                let (s, z) = (
                    self.scales[g * self.out_dim + n],
                    self.zeros[g * self.out_dim + n],
                );
                w[n * self.in_dim + k] = s * (self.q[n * self.in_dim + k] as i32 - z) as f32;
            }
        }
        w
    }

    /// ggml blocks of the columns in `order`, 32 at a time: q4_0 (`d·(x − 8)`) when every zero is 8
    /// (symmetric), q4_1 (`d·q + m`, `m = f16(−s·z)`), or q5_0 (`d·(x − 16)`, `x = q − z + 16` in
    /// 0..=31); `d` is the group's scale. q4_0 and q5_0 hold `s·(q − z)` exactly, q4_1 up to
    /// `q4_1_bound` (tests). `None` when 32 consecutive columns of `order` span two groups.
    fn blocks(&self, order: &[usize], dtype: GgmlDType) -> Option<Vec<u8>> {
        let (in_dim, out) = (self.in_dim, self.out_dim);
        let blocks = in_dim / 32;
        for b in 0..blocks {
            let g = self.g_idx[order[b * 32]];
            if order[b * 32..(b + 1) * 32]
                .iter()
                .any(|&k| self.g_idx[k] != g)
            {
                return None;
            }
        }
        let size = dtype.type_size();
        let mut bytes = vec![0u8; out * blocks * size];
        // one output row's blocks per task: large layers repack on every core
        bytes
            .par_chunks_mut(blocks * size)
            .enumerate()
            .for_each(|(n, row_bytes)| {
                let q = &self.q[n * in_dim..(n + 1) * in_dim];
                for b in 0..blocks {
                    let cols = &order[b * 32..(b + 1) * 32];
                    let g = self.g_idx[cols[0]] as usize;
                    let (s, z) = (self.scales[g * out + n], self.zeros[g * out + n]);
                    let blk = &mut row_bytes[b * size..(b + 1) * size];
                    blk[0..2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                    if dtype == GgmlDType::Q4_0 {
                        for j in 0..16 {
                            blk[2 + j] = q[cols[j]] | (q[cols[j + 16]] << 4);
                        }
                        continue;
                    }
                    if dtype == GgmlDType::Q4_1 {
                        let m = f16::from_f32(-s * z as f32);
                        blk[2..4].copy_from_slice(&m.to_le_bytes());
                        for j in 0..16 {
                            blk[4 + j] = q[cols[j]] | (q[cols[j + 16]] << 4);
                        }
                        continue;
                    }
                    let x = |k: usize| (q[k] as i32 - z + 16) as u32;
                    let mut qh = 0u32;
                    for j in 0..16 {
                        let (lo, hi) = (x(cols[j]), x(cols[j + 16]));
                        qh |= ((lo >> 4) & 1) << j | ((hi >> 4) & 1) << (j + 16);
                        blk[6 + j] = (lo & 0xF) as u8 | ((hi & 0xF) as u8) << 4;
                    }
                    blk[2..6].copy_from_slice(&qh.to_le_bytes());
                }
            });
        Some(bytes)
    }

    /// Whether every group's `−s·z` is a finite f16 (q4_1's min).
    fn mins_fit_f16(&self) -> bool {
        self.scales
            .iter()
            .zip(&self.zeros)
            .all(|(s, z)| f16::from_f32(-s * *z as f32).is_finite())
    }

    /// The layer in ggml blocks: in the checkpoint's column order when its groups run along it, else
    /// with the columns sorted by group (and the order to gather the input in), else dense.
    pub fn repack(&self, device: &Device) -> Result<Loaded> {
        let (in_dim, out) = (self.in_dim, self.out_dim);
        let dtype = if self.zeros.iter().all(|&z| z == 8) {
            GgmlDType::Q4_0
        } else if super::fits(GgmlDType::Q4_1, in_dim) && self.mins_fit_f16() {
            GgmlDType::Q4_1
        } else {
            GgmlDType::Q5_0
        };
        let block = |bytes: Vec<u8>| -> Result<QTensor> {
            let storage = QStorage::from_data(Cow::Owned(bytes), device, dtype)?;
            QTensor::new(storage, (out, in_dim))
        };
        if in_dim.is_multiple_of(32) {
            let natural: Vec<usize> = (0..in_dim).collect();
            if let Some(bytes) = self.blocks(&natural, dtype) {
                return Ok(Loaded::Blocks(block(bytes)?));
            }
            let mut sorted = natural;
            sorted.sort_by_key(|&k| self.g_idx[k]);
            if let Some(bytes) = self.blocks(&sorted, dtype) {
                let order = sorted.iter().map(|&k| k as u32).collect();
                return Ok(Loaded::Gathered(block(bytes)?, order));
            }
        }
        tracing::info!(
            in_dim,
            out,
            "a 4-bit layer whose groups do not split into 32-wide blocks runs dense"
        );
        let w = Tensor::from_vec(self.dequantize(), (out, in_dim), device)?;
        Ok(Loaded::Dense(w))
    }
}

fn i32s(t: &Tensor) -> Result<Vec<i32>> {
    t.to_dtype(DType::I32)?.flatten_all()?.to_vec1::<i32>()
}

/// Unpacks an AWQ (GEMM) or GPTQ layer from its `qweight`, `qzeros`, `scales` (and GPTQ's `g_idx`).
pub(crate) fn unpack_int4(
    quant: &CheckpointQuant,
    qweight: &Tensor,
    qzeros: &Tensor,
    scales: &Tensor,
    g_idx: Option<&Tensor>,
    (out_dim, in_dim): (usize, usize),
) -> Result<Int4> {
    let group = quant.group_size.unwrap_or(in_dim);
    if !in_dim.is_multiple_of(group) || !out_dim.is_multiple_of(8) || !in_dim.is_multiple_of(8) {
        bail!("a 4-bit layer of [{out_dim}, {in_dim}] with group size {group}")
    }
    let groups = in_dim / group;
    let expect = |t: &Tensor, what: &str, dims: (usize, usize)| -> Result<()> {
        if t.dims2()? != dims {
            bail!("{what} is {:?}, expected {dims:?}", t.shape())
        }
        Ok(())
    };
    expect(scales, "scales", (groups, out_dim))?;
    expect(qzeros, "qzeros", (groups, out_dim / 8))?;
    let mut q = vec![0u8; in_dim * out_dim];
    let mut zeros = vec![0i32; groups * out_dim];
    let packed_zeros = i32s(qzeros)?;
    let scales = scales
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let nibble = |v: i32, i: usize| ((v as u32 >> (4 * i)) & 0xF) as u8;
    let g_idx = match quant.method {
        Method::Awq => {
            expect(qweight, "qweight", (in_dim, out_dim / 8))?;
            let packed = i32s(qweight)?;
            for c in 0..out_dim / 8 {
                for k in 0..in_dim {
                    let v = packed[k * out_dim / 8 + c];
                    for (i, &col) in AWQ_ORDER.iter().enumerate() {
                        q[(8 * c + col) * in_dim + k] = nibble(v, i);
                    }
                }
            }
            for g in 0..groups {
                for c in 0..out_dim / 8 {
                    let v = packed_zeros[g * out_dim / 8 + c];
                    for (i, &col) in AWQ_ORDER.iter().enumerate() {
                        zeros[g * out_dim + 8 * c + col] = nibble(v, i) as i32;
                    }
                }
            }
            (0..in_dim).map(|k| (k / group) as u32).collect()
        }
        Method::Gptq { zero_offset } => {
            expect(qweight, "qweight", (in_dim / 8, out_dim))?;
            let packed = i32s(qweight)?;
            for n in 0..out_dim {
                for r in 0..in_dim / 8 {
                    let v = packed[r * out_dim + n];
                    for j in 0..8 {
                        q[n * in_dim + 8 * r + j] = nibble(v, j);
                    }
                }
            }
            for g in 0..groups {
                for c in 0..out_dim / 8 {
                    let v = packed_zeros[g * out_dim / 8 + c];
                    for j in 0..8 {
                        zeros[g * out_dim + 8 * c + j] = nibble(v, j) as i32 + zero_offset;
                    }
                }
            }
            match g_idx {
                Some(t) => {
                    let idx = i32s(t)?;
                    if idx.len() != in_dim || idx.iter().any(|&g| g < 0 || g as usize >= groups) {
                        bail!(
                            "g_idx of {} entries for {in_dim} columns in {groups} groups",
                            idx.len()
                        )
                    }
                    idx.into_iter().map(|g| g as u32).collect()
                }
                None => (0..in_dim).map(|k| (k / group) as u32).collect(),
            }
        }
        Method::Fp8 => bail!("an FP8 layer is not a 4-bit layer"),
    };
    Ok(Int4 {
        in_dim,
        out_dim,
        q,
        zeros,
        scales,
        g_idx,
    })
}

/// An FP8 weight `[out, in]` times its scale: per tensor (`weight_scale`, one value or one per
/// output row) or per `block` (`weight_scale_inv` `[⌈out/rows⌉, ⌈in/cols⌉]`, DeepSeek's and Qwen's
/// `[128, 128]` blocks when the config names none), in float32.
pub(crate) fn dequantize_fp8(
    weight: &Tensor,
    scale: &Tensor,
    block: Option<(usize, usize)>,
) -> Result<Tensor> {
    let (out, inp) = weight.dims2()?;
    let w = weight.to_dtype(DType::F32)?;
    let s = scale.to_dtype(DType::F32)?;
    match s.dims() {
        [] | [1] | [1, 1] => w.broadcast_mul(&s.flatten_all()?.reshape((1, 1))?),
        [r] | [r, 1] if *r == out => w.broadcast_mul(&s.reshape((out, 1))?),
        [br, bc] => {
            let (bh, bw) = block.unwrap_or((128, 128));
            if out.div_ceil(bh) != *br || inp.div_ceil(bw) != *bc {
                bail!(
                    "FP8 block scales of {:?} for a [{out}, {inp}] weight",
                    s.shape()
                )
            }
            // each scale repeated over its block's rows and columns, cut to the weight's shape
            let rows = s.repeat_interleave_rows(bh)?.narrow(0, 0, out)?;
            let full = rows
                .t()?
                .repeat_interleave_rows(bw)?
                .narrow(0, 0, inp)?
                .t()?;
            w * full
        }
        d => bail!("FP8 scales of shape {d:?} for a [{out}, {inp}] weight"),
    }
}

trait RepeatRows {
    fn repeat_interleave_rows(&self, n: usize) -> Result<Tensor>;
}

impl RepeatRows for Tensor {
    /// Each row `n` times in a row: `[r, c]` → `[r·n, c]`.
    fn repeat_interleave_rows(&self, n: usize) -> Result<Tensor> {
        let (r, c) = self.dims2()?;
        self.unsqueeze(1)?
            .broadcast_as((r, n, c))?
            .contiguous()?
            .reshape((r * n, c))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err(cfg: Value) -> String {
        from_config(&json!({ "quantization_config": cfg }))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn configs_are_read_and_unsupported_variants_named() {
        let awq = from_config(
            &json!({"quantization_config": {"quant_method": "awq", "bits": 4,
            "group_size": 128, "zero_point": true, "version": "GEMM"}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(awq.method, Method::Awq);
        assert_eq!(awq.group_size, Some(128));
        let v2 = from_config(
            &json!({"quantization_config": {"quant_method": "gptq", "bits": 4,
            "group_size": -1, "checkpoint_format": "gptq_v2"}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(v2.method, Method::Gptq { zero_offset: 0 });
        assert_eq!(v2.group_size, None);
        assert_eq!(from_config(&json!({})).unwrap(), None);
        let ct = from_config(
            &json!({"quantization_config": {"quant_method": "compressed-tensors",
            "format": "float-quantized", "config_groups": {"group_0": {"targets": ["Linear"],
            "weights": {"type": "float", "num_bits": 8, "strategy": "block",
            "block_structure": [128, 128]}}}}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!((ct.method, ct.block), (Method::Fp8, Some((128, 128))));
        for (cfg, named) in [
            (
                json!({"quant_method": "gptq", "bits": 3, "group_size": 128}),
                "3-bit gptq",
            ),
            (
                json!({"quant_method": "gptq", "bits": 8, "group_size": 128}),
                "8-bit gptq",
            ),
            (
                json!({"quant_method": "awq", "bits": 4, "version": "gemv"}),
                "AWQ version gemv",
            ),
            (
                json!({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"}),
                "marlin",
            ),
            (
                json!({"quant_method": "gptq", "bits": 4, "is_marlin_format": true}),
                "Marlin",
            ),
            (
                json!({"quant_method": "awq", "bits": 4, "group_size": 48}),
                "group_size 48",
            ),
            (
                json!({"quant_method": "bitsandbytes"}),
                "quant_method bitsandbytes",
            ),
        ] {
            let msg = err(cfg);
            assert!(
                msg.contains(named) && msg.contains("supported: AWQ"),
                "{msg}"
            );
        }
    }

    /// How far a q4_1 weight repacked from a group with scale `s` and zero `z` may be from the
    /// checkpoint's `s·(q − z)`: the f16 rounding of `m = −s·z` (half a unit in the last place: `2⁻¹¹`
    /// of it, or `2⁻²⁵` among f16's subnormals), plus the f32 rounding of `d·q + m` (`2⁻²⁴` of a value
    /// at most `15·s + s·z`).
    fn q4_1_bound(s: f32, z: i32) -> f32 {
        let sz = (s * z as f32).abs();
        (sz * 2f32.powi(-11)).max(2f32.powi(-25)) + (15.0 * s.abs() + sz) * 2f32.powi(-24)
    }

    /// The repacked blocks `q` (columns in `order`) against the checkpoint's dequantized weights:
    /// equal bit for bit in q4_0 and q5_0, within `q4_1_bound` (tests) in q4_1. Returns the largest
    /// error as a fraction of its group's scale.
    fn check_repacked(int4: &Int4, q: &QTensor, order: &[u32], what: &str) -> Result<f32> {
        let exact = int4.dequantize();
        let got = q.dequantize(&Device::Cpu)?.to_vec2::<f32>()?;
        let (in_dim, out) = (int4.in_dim, int4.out_dim);
        let mut worst = 0f32;
        for n in 0..out {
            for (j, &k) in order.iter().enumerate() {
                let k = k as usize;
                let want = exact[n * in_dim + k];
                let g = int4.g_idx[k] as usize;
                let (s, z) = (int4.scales[g * out + n], int4.zeros[g * out + n]);
                let err = (got[n][j] - want).abs();
                if q.dtype() == GgmlDType::Q4_1 {
                    assert!(
                        err <= q4_1_bound(s, z),
                        "{what} [{n}, {k}]: {err}, s {s} z {z}"
                    );
                    worst = worst.max(err / s);
                } else {
                    assert_eq!(got[n][j], want, "{what} [{n}, {k}]");
                }
            }
        }
        Ok(worst)
    }

    /// Layers with groups of 32 over shuffled columns: sorted into group order they are q4_1
    /// blocks (rows of an even number of blocks) or exact q5_0 ones (odd), gathered from the input.
    #[test]
    fn act_order_layers_gather_their_input() -> Result<()> {
        for (in_dim, dtype) in [(64, GgmlDType::Q4_1), (96, GgmlDType::Q5_0)] {
            let (groups, out_dim) = (in_dim / 32, 8);
            let mut g_idx: Vec<u32> = (0..in_dim).map(|k| (k % groups) as u32).collect();
            g_idx.swap(0, 1);
            let int4 = Int4 {
                in_dim,
                out_dim,
                q: (0..in_dim * out_dim).map(|i| (i * 7 % 16) as u8).collect(),
                zeros: (0..groups * out_dim).map(|i| (i % 16) as i32).collect(),
                // checkpoints store f16 scales
                scales: (0..groups * out_dim)
                    .map(|i| f16::from_f32(0.01 * (i + 1) as f32).to_f32())
                    .collect(),
                g_idx,
            };
            let Loaded::Gathered(q, order) = int4.repack(&Device::Cpu)? else {
                panic!("expected a gathered layer")
            };
            assert_eq!(q.dtype(), dtype);
            check_repacked(&int4, &q, &order, &format!("{in_dim} columns"))?;
        }
        Ok(())
    }

    /// q4_1's only inexactness is the f16 rounding of `m = −s·z`: over every zero (GPTQ v1's 16
    /// included) and scales from f16's subnormals to large ones, each weight stays within
    /// `q4_1_bound` (tests), and the largest error is under 2⁻¹¹·15 = 0.73% of the group's step.
    #[test]
    fn q4_1_repacking_is_exact_up_to_the_mins_f16_rounding() -> Result<()> {
        let (in_dim, out_dim) = (64, 17 * 24);
        // per output row: zero `n % 17`; scales across the f16 range, subnormals included
        let scale = |n: usize| {
            let e = (n / 17) as i32 - 20;
            f16::from_f32(1.37f32 * 2f32.powi(e)).to_f32()
        };
        let int4 = Int4 {
            in_dim,
            out_dim,
            q: (0..in_dim * out_dim).map(|i| (i * 5 % 16) as u8).collect(),
            zeros: (0..out_dim).map(|n| (n % 17) as i32).collect(),
            scales: (0..out_dim).map(scale).collect(),
            g_idx: vec![0; in_dim],
        };
        assert!(int4.scales.iter().any(|s| !f16::from_f32(*s).is_normal()));
        let Loaded::Blocks(q) = int4.repack(&Device::Cpu)? else {
            panic!("expected blocks")
        };
        assert_eq!(q.dtype(), GgmlDType::Q4_1);
        let order: Vec<u32> = (0..in_dim as u32).collect();
        let worst = check_repacked(&int4, &q, &order, "q4_1")?;
        assert!(worst > 0.0 && worst <= 15.0 / 2048.0, "{worst}");
        // every zero 8: q4_0, exact
        let sym = Int4 {
            zeros: vec![8; out_dim],
            ..int4
        };
        let Loaded::Blocks(q) = sym.repack(&Device::Cpu)? else {
            panic!("expected blocks")
        };
        assert_eq!(q.dtype(), GgmlDType::Q4_0);
        check_repacked(&sym, &q, &order, "q4_0")?;
        Ok(())
    }

    #[test]
    fn fp8_block_scales_cover_partial_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::ones((3, 5), DType::F32, &dev)?;
        let s = Tensor::new(&[[1f32, 2.], [3., 4.]], &dev)?;
        // blocks of 2x3: rows 0-1 / 2, columns 0-2 / 3-4
        let got = dequantize_fp8(&w, &s, Some((2, 3)))?.to_vec2::<f32>()?;
        assert_eq!(got[0], vec![1., 1., 1., 2., 2.]);
        assert_eq!(got[2], vec![3., 3., 3., 4., 4.]);
        let per_row = dequantize_fp8(&w, &Tensor::new(&[1f32, 2., 3.], &dev)?, None)?;
        assert_eq!(per_row.to_vec2::<f32>()?[1], vec![2.; 5]);
        Ok(())
    }

    /// The fixtures' layers (written by tests/fixtures/gen_quant.py in AutoAWQ's and AutoGPTQ's
    /// formats): unpacked, they equal the dequantized weights transformers ran, bit for bit, and so do
    /// the repacked q4_0 (symmetric) blocks; the q4_1 (asymmetric) ones are within the f16 rounding
    /// of their mins.
    #[test]
    fn repacked_fixture_layers_equal_the_dequantized_checkpoint() -> Result<()> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        for (name, want_gathered, dtype) in [
            ("awq", false, GgmlDType::Q4_1),
            ("gptq", false, GgmlDType::Q4_0),
            ("gptq_act", true, GgmlDType::Q4_1),
        ] {
            let dir = root.join(name);
            let config: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?).unwrap();
            let reference: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json"))?)
                    .unwrap();
            let quant = from_config(&config)?.unwrap();
            let tensors =
                candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)?;
            for (weight, sample) in reference["dequantized"].as_object().unwrap() {
                let prefix = weight.trim_end_matches(".weight");
                let t = |s: &str| tensors.get(&format!("{prefix}.{s}"));
                let dims = &sample["shape"];
                let (out, inp) = (
                    dims[0].as_u64().unwrap() as usize,
                    dims[1].as_u64().unwrap() as usize,
                );
                let int4 = unpack_int4(
                    &quant,
                    t("qweight").unwrap(),
                    t("qzeros").unwrap(),
                    t("scales").unwrap(),
                    t("g_idx"),
                    (out, inp),
                )?;
                let exact = int4.dequantize();
                let what = format!("{name} {weight}");
                let (blocks, order) = match int4.repack(&Device::Cpu)? {
                    Loaded::Blocks(q) => (q, (0..inp as u32).collect::<Vec<_>>()),
                    Loaded::Gathered(q, order) => {
                        assert!(want_gathered, "{name} {weight}: gathered");
                        (q, order)
                    }
                    Loaded::Dense(_) => panic!("{name} {weight}: dense"),
                };
                assert_eq!(blocks.dtype(), dtype, "{what}");
                for (row, values) in sample["rows"].as_object().unwrap() {
                    let n: usize = row.parse().unwrap();
                    for (k, v) in values.as_array().unwrap().iter().enumerate() {
                        let want = v.as_f64().unwrap() as f32;
                        assert_eq!(exact[n * inp + k], want, "{name} {weight} [{n}, {k}]");
                    }
                }
                let worst = check_repacked(&int4, &blocks, &order, &what)?;
                assert!(worst <= 15.0 / 2048.0, "{what}: {worst}");
            }
        }
        Ok(())
    }
}
