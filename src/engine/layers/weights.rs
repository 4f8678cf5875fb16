//! Where a model's tensors come from and what its linear layers become: float safetensors as stored,
//! float safetensors quantized as they load (`QUANTIZATION=q8_0`, `q4k`, ...), or a GGUF file's blocks
//! as stored. Model files ask for tensors by their Hugging Face names and never see the difference.

use std::collections::HashMap;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Result, Shape, Tensor, WithDType};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::{Embedding, Linear};
use crate::engine::gguf::{GgufBackend, GgufFile};
use crate::engine::quant::checkpoint::{self, CheckpointQuant, Loaded, Method};
use crate::engine::quant::{self, GgmlDType};

#[derive(Clone)]
enum Source {
    /// Linear layers keep the checkpoint's float weights.
    Float,
    /// Linear layers are quantized to this type as they load (the embedding table to 8 bits).
    InSitu(GgmlDType),
    /// Linear layers and the embedding table keep the GGUF file's blocks.
    Gguf(Arc<GgufFile>),
    /// A checkpoint published quantized (AWQ, GPTQ, FP8): its quantized linear layers are repacked
    /// into ggml blocks as they load, one at a time; the rest is float.
    Checkpoint(Arc<CheckpointQuant>),
}

/// A `VarBuilder` (prefix, dtype, device, float tensors by name) that also knows how linear layers and
/// embedding tables are stored.
#[derive(Clone)]
pub(crate) struct Weights<'a> {
    vb: VarBuilder<'a>,
    source: Source,
    /// The safetensors files behind `vb`, when it reads them: large float tables quantized at load
    /// are read from them a chunk of rows at a time.
    files: Option<Arc<SafetensorsFiles>>,
}

impl<'a> Weights<'a> {
    /// Float weights, used as they are.
    pub fn float(vb: VarBuilder<'a>) -> Self {
        Self {
            vb,
            source: Source::Float,
            files: None,
        }
    }

    /// Float weights whose linear layers are quantized to `dtype` at load.
    pub fn in_situ(vb: VarBuilder<'a>, dtype: GgmlDType) -> Self {
        Self {
            vb,
            source: Source::InSitu(dtype),
            files: None,
        }
    }

    /// A quantized checkpoint (`quantization_config`): its AWQ / GPTQ / FP8 layers become ggml blocks.
    pub fn checkpoint(vb: VarBuilder<'a>, quant: CheckpointQuant) -> Self {
        Self {
            vb,
            source: Source::Checkpoint(Arc::new(quant)),
            files: None,
        }
    }

    /// A GGUF file's tensors under their Hugging Face names, computing in `dtype` on `device`.
    pub fn gguf(file: Arc<GgufFile>, dtype: DType, device: &Device) -> Self {
        let vb =
            VarBuilder::from_backend(Box::new(GgufBackend(file.clone())), dtype, device.clone());
        Self {
            vb,
            source: Source::Gguf(file),
            files: None,
        }
    }

    /// These weights with `files` being what their `VarBuilder` reads (see [`SafetensorsFiles`]).
    pub fn with_files(self, files: Arc<SafetensorsFiles>) -> Self {
        Self {
            files: Some(files),
            ..self
        }
    }

    pub(crate) fn pp(&self, s: impl ToString) -> Self {
        Self {
            vb: self.vb.pp(s),
            source: self.source.clone(),
            files: self.files.clone(),
        }
    }

    /// A float tensor `{prefix}.{name}` of shape `s`.
    pub fn get<S: Into<Shape>>(&self, s: S, name: &str) -> Result<Tensor> {
        self.vb.get(s, name)
    }

    pub(crate) fn contains_tensor(&self, name: &str) -> bool {
        self.vb.contains_tensor(name)
    }

    pub fn dtype(&self) -> DType {
        self.vb.dtype()
    }

    pub fn device(&self) -> &Device {
        self.vb.device()
    }

    /// `{prefix}.weight` `[out, in]` and, with `bias`, `{prefix}.bias`.
    pub fn linear(&self, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
        self.linear_as(in_dim, out_dim, bias, |q| q)
    }

    /// The output projection to the vocabulary: like `linear`, but quantized in situ to at least 8 bits.
    pub fn lm_head(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let wanted = match &self.source {
            Source::InSitu(wanted) => Some(quant::lm_head_dtype(*wanted)),
            // a float head (not one of the checkpoint's quantized layers)
            Source::Checkpoint(_)
                if !["qweight", "weight_scale", "weight_scale_inv"]
                    .iter()
                    .any(|t| self.contains_tensor(t)) =>
            {
                Some(GgmlDType::Q8_0)
            }
            _ => None,
        };
        if let Some(wanted) = wanted {
            if let Some(q) = self.quantize_streamed((out_dim, in_dim), wanted)? {
                return Linear::quantized(Arc::new(q), None, self.dtype());
            }
        }
        let head = self.linear_as(in_dim, out_dim, false, quant::lm_head_dtype)?;
        match self.source {
            // a quantized checkpoint's float head (AWQ/GPTQ keep it in f16) at 8 bits, as in situ
            Source::Checkpoint(_) => head.quantize(GgmlDType::Q8_0),
            _ => Ok(head),
        }
    }

    /// GPT-2's `Conv1D`: the weight is stored `[in, out]`.
    pub(crate) fn conv1d(&self, in_dim: usize, out_dim: usize) -> Result<Linear> {
        let weight = self.get((in_dim, out_dim), "weight")?.t()?.contiguous()?;
        let bias = self.get(out_dim, "bias")?;
        self.finish(Linear::new(weight, Some(bias))?, |q| q)
    }

    /// The embedding table `{prefix}.weight` `[vocab, hidden]`. Quantized in situ, or in a quantized
    /// checkpoint (which keeps it in f16), it is kept at 8 bits (as llama.cpp keeps `token_embd`):
    /// often the largest matrix, and a tied LM head shares it.
    pub fn embedding(&self, vocab: usize, hidden: usize) -> Result<Embedding> {
        match &self.source {
            Source::Gguf(file) => {
                let name = self.full_name("weight");
                if let Some(q) = file.qtensor(&name, self.device())? {
                    return Embedding::quantized(Arc::new(q), (vocab, hidden), self.dtype());
                }
            }
            Source::InSitu(_) | Source::Checkpoint(_) => {
                let wanted = match &self.source {
                    Source::InSitu(wanted) => quant::lm_head_dtype(*wanted),
                    _ => GgmlDType::Q8_0,
                };
                if let Some(q) = self.quantize_streamed((vocab, hidden), wanted)? {
                    return Embedding::quantized(Arc::new(q), (vocab, hidden), self.dtype());
                }
                let table = self.get((vocab, hidden), "weight")?;
                if let Some(q) = quant::quantize_matrix(&table, wanted)? {
                    return Embedding::quantized(Arc::new(q), (vocab, hidden), self.dtype());
                }
                return Ok(Embedding::Dense(table));
            }
            Source::Float => {}
        }
        Ok(Embedding::Dense(self.get((vocab, hidden), "weight")?))
    }

    /// An LM head that shares the embedding table's weights (`tie_word_embeddings`).
    pub(crate) fn tied_lm_head(&self, embedding: &Embedding) -> Result<Linear> {
        match embedding {
            Embedding::Dense(table) => {
                self.finish(Linear::new(table.clone(), None)?, quant::lm_head_dtype)
            }
            Embedding::Quantized { table, .. } => {
                Linear::quantized(table.clone(), None, self.dtype())
            }
        }
    }

    fn linear_as(
        &self,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        head: fn(GgmlDType) -> GgmlDType,
    ) -> Result<Linear> {
        let bias = if bias {
            Some(self.get(out_dim, "bias")?)
        } else {
            None
        };
        if let Source::Gguf(file) = &self.source {
            let name = self.full_name("weight");
            if let Some(q) = file.qtensor(&name, self.device())? {
                let dims = q.shape().dims2()?;
                if dims != (out_dim, in_dim) {
                    candle_core::bail!(
                        "{name}: GGUF holds {dims:?}, expected ({out_dim}, {in_dim})"
                    )
                }
                return Linear::quantized(Arc::new(q), bias, self.dtype());
            }
        }
        if let Source::Checkpoint(q) = &self.source {
            if let Some(linear) = self.checkpoint_linear(q, in_dim, out_dim, bias.clone())? {
                return Ok(linear);
            }
        }
        let weight = self.get((out_dim, in_dim), "weight")?;
        self.finish(Linear::new(weight, bias)?, head)
    }

    /// A quantized checkpoint's layer in ggml blocks; `None` for a layer the checkpoint keeps in
    /// float (`modules_to_not_convert`, the LM head).
    fn checkpoint_linear(
        &self,
        q: &CheckpointQuant,
        in_dim: usize,
        out_dim: usize,
        bias: Option<Tensor>,
    ) -> Result<Option<Linear>> {
        let raw = |name: &str, dtype: DType| self.vb.get_unchecked_dtype(name, dtype);
        let name = self.full_name("weight");
        let loaded = match q.method {
            Method::Awq | Method::Gptq { .. } => {
                if !self.contains_tensor("qweight") {
                    return Ok(None);
                }
                let g_idx = if self.contains_tensor("g_idx") {
                    Some(raw("g_idx", DType::I32)?)
                } else {
                    None
                };
                let int4 = checkpoint::unpack_int4(
                    q,
                    &raw("qweight", DType::I32)?,
                    &raw("qzeros", DType::I32)?,
                    &raw("scales", DType::F32)?,
                    g_idx.as_ref(),
                    (out_dim, in_dim),
                )
                .map_err(|e| e.context(format!("{name} ({})", q.name())))?;
                int4.repack(self.device())?
            }
            Method::Fp8 => {
                let scale = ["weight_scale_inv", "weight_scale"]
                    .into_iter()
                    .find(|s| self.contains_tensor(s));
                let Some(scale) = scale else {
                    return Ok(None);
                };
                let w = raw("weight", DType::F8E4M3)?;
                if w.dims2()? != (out_dim, in_dim) {
                    candle_core::bail!("{name}: {:?}, expected ({out_dim}, {in_dim})", w.shape())
                }
                let dense = checkpoint::dequantize_fp8(&w, &raw(scale, DType::F32)?, q.block)?;
                drop(w);
                match quant::quantize_matrix(&dense, GgmlDType::Q8_0)? {
                    Some(blocks) => Loaded::Blocks(blocks),
                    None => Loaded::Dense(dense.to_dtype(self.dtype())?),
                }
            }
        };
        let linear = match loaded {
            Loaded::Blocks(blocks) => Linear::quantized(Arc::new(blocks), bias, self.dtype())?,
            Loaded::Gathered(blocks, order) => Linear::gathered(
                order,
                Linear::quantized(Arc::new(blocks), bias, self.dtype())?,
            )?,
            Loaded::Dense(w) => Linear::new(w.to_dtype(self.dtype())?, bias)?,
        };
        Ok(Some(linear))
    }

    /// The float matrix `{prefix}.weight` `[rows, cols]` quantized to `wanted` (or the type its rows
    /// fall back to) straight from the safetensors file, a chunk of rows at a time: no float copy
    /// of the whole matrix (an embedding table is often the largest) is ever held. `None` when the
    /// weights are not read from files, the file has no such tensor, or no block type fits.
    fn quantize_streamed(
        &self,
        (rows, cols): (usize, usize),
        wanted: GgmlDType,
    ) -> Result<Option<QTensor>> {
        let Some(files) = &self.files else {
            return Ok(None);
        };
        let name = self.full_name("weight");
        let Some(dims) = files.dims(&name) else {
            return Ok(None);
        };
        if dims != [rows, cols] {
            candle_core::bail!("{name}: the checkpoint holds {dims:?}, expected [{rows}, {cols}]")
        }
        let Some(dtype) = quant::storage_dtype(wanted, cols) else {
            return Ok(None);
        };
        let read = |r: Range<usize>| files.read_rows(&name, r)?.to_dtype(DType::F32);
        quant::quantize_in_chunks((rows, cols), dtype, self.device(), read).map(Some)
    }

    /// Quantizes a freshly loaded float layer when loading in situ.
    fn finish(&self, linear: Linear, head: fn(GgmlDType) -> GgmlDType) -> Result<Linear> {
        match self.source {
            Source::InSitu(dtype) => linear.quantize(head(dtype)),
            _ => Ok(linear),
        }
    }

    fn full_name(&self, name: &str) -> String {
        let prefix = self.vb.prefix();
        if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}.{name}")
        }
    }
}

/// A checkpoint's safetensors files, read a tensor (or a few rows of one) at a time with positional
/// reads straight into the tensor's own buffer. Not memory-mapped: pages of a mapping, once read,
/// stay in the process's resident memory beside the tensors made of them until it is unmapped, so
/// loading through a map held two copies of the weights.
pub(crate) struct SafetensorsFiles {
    files: Vec<std::fs::File>,
    tensors: HashMap<String, Stored>,
    /// Tensors of a dtype candle has no type for (`F8_E5M2`, `I8`, ...), by name: an error only
    /// when one is asked for.
    unreadable: HashMap<String, String>,
}

/// Where one tensor lies: file, dtype, shape, and its first byte.
struct Stored {
    file: usize,
    dtype: DType,
    shape: Vec<usize>,
    start: u64,
}

impl SafetensorsFiles {
    /// Reads the headers of `paths` (each: an 8-byte length, then the JSON table of tensors).
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::new();
        let mut tensors = HashMap::new();
        let mut unreadable = HashMap::new();
        for path in paths {
            let err = |what: String| candle_core::Error::Msg(format!("{}: {what}", path.display()));
            let file = std::fs::File::open(path).map_err(|e| err(format!("cannot open: {e}")))?;
            let size = file.metadata()?.len();
            let mut len = [0u8; 8];
            file.read_exact_at(&mut len, 0)
                .map_err(|e| err(format!("not a safetensors file: {e}")))?;
            let len = u64::from_le_bytes(len);
            if len > size.saturating_sub(8) || len > 100 << 20 {
                return Err(err(format!("a safetensors header of {len} bytes")));
            }
            let mut header = vec![0u8; len as usize];
            file.read_exact_at(&mut header, 8)?;
            let header: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&header)
                    .map_err(|e| err(format!("unreadable safetensors header: {e}")))?;
            let data = 8 + len;
            for (name, info) in header {
                if name == "__metadata__" {
                    continue;
                }
                let bad = || err(format!("tensor {name}: unreadable entry {info}"));
                let dtype = match info["dtype"].as_str().ok_or_else(bad)? {
                    "U8" | "BOOL" => DType::U8,
                    "U32" => DType::U32,
                    "I16" => DType::I16,
                    "I32" => DType::I32,
                    "I64" => DType::I64,
                    "F16" => DType::F16,
                    "BF16" => DType::BF16,
                    "F32" => DType::F32,
                    "F64" => DType::F64,
                    "F8_E4M3" => DType::F8E4M3,
                    other => {
                        unreadable.insert(name, other.to_string());
                        continue;
                    }
                };
                let shape: Vec<usize> = info["shape"]
                    .as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                    .collect::<Result<_>>()?;
                let offsets = info["data_offsets"].as_array().ok_or_else(bad)?;
                let (Some(begin), Some(end)) = (
                    offsets.first().and_then(|v| v.as_u64()),
                    offsets.get(1).and_then(|v| v.as_u64()),
                ) else {
                    return Err(bad());
                };
                let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
                if end < begin || end - begin != bytes as u64 || data + end > size {
                    return Err(err(format!(
                        "tensor {name}: its bytes lie outside the file"
                    )));
                }
                let stored = Stored {
                    file: files.len(),
                    dtype,
                    shape,
                    start: data + begin,
                };
                tensors.insert(name, stored);
            }
            files.push(file);
        }
        Ok(Self {
            files,
            tensors,
            unreadable,
        })
    }

    /// The shape of tensor `name`, if a file holds it.
    pub fn dims(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }

    fn stored(&self, name: &str) -> Result<&Stored> {
        if let Some(dtype) = self.unreadable.get(name) {
            candle_core::bail!("tensor {name}: safetensors dtype {dtype} is not supported")
        }
        self.tensors.get(name).ok_or_else(|| {
            candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            }
            .bt()
        })
    }

    /// Tensor `name` as stored, on `device`.
    pub fn read(&self, name: &str, device: &Device) -> Result<Tensor> {
        let t = self.stored(name)?;
        let rows = t.shape.first().copied().unwrap_or(1);
        self.read_part(name, t, 0..rows, t.shape.clone(), device)
    }

    /// Rows `rows` (along the first dimension) of tensor `name` as stored, on the CPU.
    pub fn read_rows(&self, name: &str, rows: Range<usize>) -> Result<Tensor> {
        let t = self.stored(name)?;
        let mut shape = t.shape.clone();
        match shape.first_mut() {
            Some(n) if rows.start <= rows.end && rows.end <= *n => *n = rows.len(),
            _ => candle_core::bail!("{name}: rows {rows:?} of {:?}", t.shape),
        }
        self.read_part(name, t, rows, shape, &Device::Cpu)
    }

    fn read_part(
        &self,
        name: &str,
        t: &Stored,
        rows: Range<usize>,
        shape: Vec<usize>,
        device: &Device,
    ) -> Result<Tensor> {
        let row: usize = t.shape.iter().skip(1).product();
        let at = t.start + (rows.start * row * t.dtype.size_in_bytes()) as u64;
        let n = shape.iter().product::<usize>();
        let file = &self.files[t.file];
        match t.dtype {
            DType::U8 => read_vec::<u8>(file, at, n, shape, device),
            DType::U32 => read_vec::<u32>(file, at, n, shape, device),
            DType::I16 => read_vec::<i16>(file, at, n, shape, device),
            DType::I32 => read_vec::<i32>(file, at, n, shape, device),
            DType::I64 => read_vec::<i64>(file, at, n, shape, device),
            DType::F16 => read_vec::<half::f16>(file, at, n, shape, device),
            DType::BF16 => read_vec::<half::bf16>(file, at, n, shape, device),
            DType::F32 => read_vec::<f32>(file, at, n, shape, device),
            DType::F64 => read_vec::<f64>(file, at, n, shape, device),
            DType::F8E4M3 => {
                // (candle does not export its f8 type: one layer's bytes, copied once)
                let mut bytes = vec![0u8; n];
                file.read_exact_at(&mut bytes, at)?;
                Tensor::from_raw_buffer(&bytes, DType::F8E4M3, &shape, device)
            }
            other => candle_core::bail!("{name}: dtype {other:?} is not supported"),
        }
    }
}

/// `n` values of `T` at byte `at` of `file`, read into the buffer the tensor keeps (on the CPU).
fn read_vec<T: WithDType>(
    file: &std::fs::File,
    at: u64,
    n: usize,
    shape: Vec<usize>,
    device: &Device,
) -> Result<Tensor> {
    let mut v = vec![T::from_f64(0.0); n];
    // SAFETY: every `WithDType` is plain data of `size_of::<T>()` bytes, any bit pattern valid
    // (the file is little-endian, as every platform this runs on); the slice covers `v` exactly.
    let bytes = unsafe {
        std::slice::from_raw_parts_mut(
            v.as_mut_ptr() as *mut u8,
            std::mem::size_of_val(v.as_slice()),
        )
    };
    file.read_exact_at(bytes, at)?;
    Tensor::from_vec(v, shape, device)
}

/// [`SafetensorsFiles`] as a `VarBuilder` backend: tensors by name, converted to the dtype asked.
pub(crate) struct FilesBackend(pub Arc<SafetensorsFiles>);

impl SimpleBackend for FilesBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.0.read(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.tensors.contains_key(name) || self.0.unreadable.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tensors read from the file (whole, or a few rows) are the ones written, in their dtypes;
    /// the `VarBuilder` backend converts and checks shapes; a damaged file is refused at open.
    #[test]
    fn safetensors_files_read_tensors_and_rows() -> Result<()> {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        let a = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        let b = a.to_dtype(DType::F16)?;
        let c = Tensor::new(&[3i32, -1, 7], &dev)?;
        let tensors = HashMap::from([
            ("a".to_string(), a.clone()),
            ("b".to_string(), b.clone()),
            ("c".to_string(), c.clone()),
        ]);
        candle_core::safetensors::save(&tensors, &path)?;
        let files = Arc::new(SafetensorsFiles::open(std::slice::from_ref(&path))?);
        assert_eq!(files.dims("a"), Some(&[7, 5][..]));
        assert_eq!(
            files.read("a", &dev)?.to_vec2::<f32>()?,
            a.to_vec2::<f32>()?
        );
        let rows = files.read_rows("b", 2..5)?;
        assert_eq!(rows.dtype(), DType::F16);
        assert_eq!(
            rows.to_vec2::<half::f16>()?,
            b.narrow(0, 2, 3)?.to_vec2::<half::f16>()?
        );
        assert_eq!(files.read("c", &dev)?.to_vec1::<i32>()?, vec![3, -1, 7]);
        assert!(files.read_rows("a", 5..8).is_err());
        assert!(files.read("d", &dev).is_err());
        let vb = VarBuilder::from_backend(Box::new(FilesBackend(files)), DType::F32, dev.clone());
        assert_eq!(vb.get((7, 5), "b")?.dtype(), DType::F32);
        assert!(vb.get((5, 7), "a").is_err());
        assert!(vb.contains_tensor("c") && !vb.contains_tensor("d"));
        // cut short: a tensor's bytes past the end
        let bytes = std::fs::read(&path)?;
        let short = dir.path().join("short.safetensors");
        std::fs::write(&short, &bytes[..bytes.len() - 4])?;
        let err = SafetensorsFiles::open(&[short]).err().unwrap().to_string();
        assert!(err.contains("outside the file"), "{err}");
        // a dtype candle has no type for: the file opens, that tensor alone fails, naming it
        let header = br#"{"e":{"dtype":"F8_E5M2","shape":[2],"data_offsets":[0,2]}}"#;
        let mut odd = (header.len() as u64).to_le_bytes().to_vec();
        odd.extend_from_slice(header);
        odd.extend_from_slice(&[0, 0]);
        let path = dir.path().join("odd.safetensors");
        std::fs::write(&path, odd)?;
        let files = SafetensorsFiles::open(&[path])?;
        let err = files.read("e", &dev).err().unwrap().to_string();
        assert!(err.contains("F8_E5M2"), "{err}");
        Ok(())
    }
}
