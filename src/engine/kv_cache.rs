//! The paged KV cache: per layer, one key and one value store of `num_blocks * block_size` slots.
//! Owned by the scheduler; models write new keys/values into slots and gather a sequence's slots back
//! through its block table.
//!
//! Layout per layer: `[kv_heads, slots, head_dim]`. Heads first so that a sequence whose blocks are
//! consecutive (the common case with a fresh allocator) is read back as a zero-copy `narrow`, already in
//! the `[kv_heads, len, head_dim]` shape attention multiplies with.
//!
//! With `KV_CACHE_DTYPE` `int8`, `fp8_e4m3` or `fp8_e5m2` (CPU only) a layer stores one byte per value
//! in that layout and one float32 scale per 32 values of a head's row (per row where `head_dim` is not
//! a multiple of 32; `[kv_heads, slots, head_dim / 32]`): each group is quantized when it is
//! written, symmetric around zero, its largest magnitude mapped to the format's largest code (127,
//! 448 or 57344). The fused CPU attention reads the bytes and
//! scales directly (`layers/kv8.rs`); other paths get a float copy of one sequence's context
//! ([`KvCache::gather`]).

use candle_core::{bail, DType, Result, Tensor};

use super::batch::ModelSpec;
use super::settings::KvCacheDtype;

/// How an 8-bit cache encodes a value (in units of its row's scale).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kv8Format {
    /// Two's-complement integers in `-127..=127`.
    Int8,
    /// fp8 e4m3 (OCP/NVIDIA: bias 7, largest finite 448); subnormals flushed to zero or the
    /// smallest normal when written (they lie below 1/28672 of the row's largest magnitude).
    E4m3,
    /// fp8 e5m2 (bias 15, largest finite 57344); subnormals flushed likewise.
    E5m2,
}

impl Kv8Format {
    fn of(dtype: KvCacheDtype) -> Option<Self> {
        match dtype {
            KvCacheDtype::Auto => None,
            KvCacheDtype::Int8 => Some(Kv8Format::Int8),
            KvCacheDtype::Fp8E4m3 => Some(Kv8Format::E4m3),
            KvCacheDtype::Fp8E5m2 => Some(Kv8Format::E5m2),
        }
    }

    /// The largest magnitude a code stands for: a row's largest value maps to it.
    pub fn max(self) -> f32 {
        match self {
            Kv8Format::Int8 => 127.0,
            Kv8Format::E4m3 => 448.0,
            Kv8Format::E5m2 => 57344.0,
        }
    }

    /// The value of a code, in units of its row's scale.
    #[inline]
    pub fn decode(self, b: u8) -> f32 {
        match self {
            Kv8Format::Int8 => b as i8 as f32,
            Kv8Format::E4m3 => fp8_decode(b, 3, 7),
            Kv8Format::E5m2 => fp8_decode(b, 2, 15),
        }
    }

    /// The code nearest `v` (a value in units of the row's scale, `|v| <= max()`).
    #[inline]
    pub fn encode(self, v: f32) -> u8 {
        match self {
            Kv8Format::Int8 => v.round().clamp(-127.0, 127.0) as i8 as u8,
            Kv8Format::E4m3 => fp8_encode(v, 3, 7, 0x7e),
            Kv8Format::E5m2 => fp8_encode(v, 2, 15, 0x7b),
        }
    }

    /// `out[i] = decode(codes[i]) * scale`.
    pub fn dequantize(self, codes: &[u8], scale: f32, out: &mut [f32]) {
        match self {
            Kv8Format::Int8 => {
                for (o, b) in out.iter_mut().zip(codes) {
                    *o = *b as i8 as f32 * scale;
                }
            }
            Kv8Format::E4m3 => {
                for (o, b) in out.iter_mut().zip(codes) {
                    *o = fp8_decode(*b, 3, 7) * scale;
                }
            }
            Kv8Format::E5m2 => {
                for (o, b) in out.iter_mut().zip(codes) {
                    *o = fp8_decode(*b, 2, 15) * scale;
                }
            }
        }
    }

    /// Quantizes one row: its codes into `out`, its scale returned (`x[i] ≈ decode(out[i]) * scale`).
    pub fn quantize_row(self, x: &[f32], out: &mut [u8]) -> f32 {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 || !amax.is_finite() {
            out.fill(0);
            return if amax.is_finite() { 0.0 } else { f32::NAN };
        }
        let scale = amax / self.max();
        let inv = self.max() / amax;
        for (o, v) in out.iter_mut().zip(x) {
            *o = self.encode(v * inv);
        }
        scale
    }
}

/// An fp8 code with `m` mantissa bits and exponent bias `bias`; exponent field 0 is zero.
#[inline]
fn fp8_decode(b: u8, m: u32, bias: u32) -> f32 {
    let mag = (b & 0x7f) as u32;
    if mag == 0 {
        return 0.0;
    }
    let bits = (((b & 0x80) as u32) << 24) | ((mag << (23 - m)) + ((127 - bias) << 23));
    f32::from_bits(bits)
}

/// The fp8 code nearest `v` (round to nearest even), `max_code` the largest finite magnitude;
/// values below the smallest normal become zero or the smallest normal, whichever is nearer.
#[inline]
fn fp8_encode(v: f32, m: u32, bias: u32, max_code: u32) -> u8 {
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a.is_nan() {
        return sign | max_code as u8;
    }
    let min_normal = f32::from_bits((128 - bias) << 23);
    if a < min_normal {
        return if a >= min_normal / 2.0 {
            sign | (1 << m) as u8
        } else {
            0
        };
    }
    let bits = a.to_bits();
    let shift = 23 - m;
    let rounded = bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1);
    let code = (rounded >> shift).saturating_sub((127 - bias) << m);
    sign | code.min(max_code) as u8
}

/// Values per scale in an 8-bit cache: 32 (as llama.cpp's q8_0) where the head dimension splits into
/// 32s, else the whole head.
pub fn scale_group(head_dim: usize) -> usize {
    if head_dim.is_multiple_of(32) {
        32
    } else {
        head_dim.max(1)
    }
}

/// One layer of an 8-bit cache: codes `[kv_heads, slots, head_dim]`, scales `[kv_heads, slots,
/// head_dim / group]` (one per `group` values of a head's row).
pub(crate) struct Kv8Layer {
    pub group: usize,
    pub k: Vec<u8>,
    pub v: Vec<u8>,
    pub k_scale: Vec<f32>,
    pub v_scale: Vec<f32>,
}

enum Layer {
    Float(Tensor, Tensor),
    Eight(Kv8Layer),
}

pub struct KvCache {
    layers: Vec<Layer>,
    num_blocks: usize,
    block_size: usize,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    format: Option<Kv8Format>,
}

/// Where a run of consecutive new tokens goes: `len` tokens from `token_start` (row in the packed
/// batch) into slots `slot_start..slot_start+len` (never crossing a block boundary).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotRun {
    pub token_start: usize,
    pub slot_start: usize,
    pub len: usize,
}

/// How one sequence's context is read back.
#[derive(Debug, Clone)]
pub enum Gather {
    /// The slots are consecutive: `start..start+len`.
    Range { start: usize, len: usize },
    /// Arbitrary slots, in position order (u32 indices on the model's device).
    Slots(Tensor),
}

impl Gather {
    pub fn len(&self) -> usize {
        match self {
            Gather::Range { len, .. } => *len,
            Gather::Slots(t) => t.dims1().unwrap_or(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl KvCache {
    /// A cache in the model's dtype.
    pub fn new(spec: &ModelSpec, num_blocks: usize, block_size: usize) -> Result<Self> {
        Self::with_dtype(spec, num_blocks, block_size, KvCacheDtype::Auto)
    }

    /// A cache stored as `dtype` (`KV_CACHE_DTYPE`); the 8-bit kinds need a CPU model.
    pub fn with_dtype(
        spec: &ModelSpec,
        num_blocks: usize,
        block_size: usize,
        dtype: KvCacheDtype,
    ) -> Result<Self> {
        if num_blocks == 0 || block_size == 0 {
            bail!("a KV cache needs at least one block of at least one slot")
        }
        let format = Kv8Format::of(dtype);
        if format.is_some() && !spec.device.is_cpu() {
            bail!(
                "KV_CACHE_DTYPE={}: 8-bit KV caches are implemented for CPU only; use KV_CACHE_DTYPE=auto on a GPU",
                dtype.name()
            )
        }
        let slots = num_blocks * block_size;
        let shape = (spec.num_kv_heads, slots, spec.head_dim);
        let layers = (0..spec.num_layers)
            .map(|_| match format {
                None => Ok(Layer::Float(
                    Tensor::zeros(shape, spec.dtype, &spec.device)?,
                    Tensor::zeros(shape, spec.dtype, &spec.device)?,
                )),
                Some(_) => {
                    let n = spec.num_kv_heads * slots;
                    let group = scale_group(spec.head_dim);
                    let scales = n * (spec.head_dim / group);
                    Ok(Layer::Eight(Kv8Layer {
                        group,
                        k: vec![0; n * spec.head_dim],
                        v: vec![0; n * spec.head_dim],
                        k_scale: vec![0.0; scales],
                        v_scale: vec![0.0; scales],
                    }))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            num_blocks,
            block_size,
            kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            dtype: spec.dtype,
            format,
        })
    }

    /// Bytes one block takes over all layers, keys and values, stored as `dtype` (an 8-bit kind:
    /// one byte per value and a float32 scale per [`scale_group`] values).
    pub fn bytes_per_block(spec: &ModelSpec, block_size: usize, dtype: KvCacheDtype) -> usize {
        let per_head_token = match Kv8Format::of(dtype) {
            None => spec.head_dim * spec.dtype.size_in_bytes(),
            Some(_) => {
                spec.head_dim
                    + std::mem::size_of::<f32>() * (spec.head_dim / scale_group(spec.head_dim))
            }
        };
        2 * spec.num_layers * spec.num_kv_heads * block_size * per_head_token
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The 8-bit format, `None` for a cache in the model's dtype.
    pub fn format(&self) -> Option<Kv8Format> {
        self.format
    }

    fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Copies every layer's keys and values of block `src` into block `dst` (copy-on-write of a shared
    /// prompt block before a sibling sequence writes into it).
    pub(crate) fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        let (src, dst) = (src as usize, dst as usize);
        if src >= self.num_blocks || dst >= self.num_blocks {
            bail!(
                "copy_block({src}, {dst}) outside a cache of {} blocks",
                self.num_blocks
            )
        }
        if src == dst {
            return Ok(());
        }
        let (bs, d, slots) = (self.block_size, self.head_dim, self.num_slots());
        for layer in &mut self.layers {
            match layer {
                Layer::Float(k, v) => {
                    for t in [&*k, &*v] {
                        let block = t.narrow(1, src * bs, bs)?.contiguous()?;
                        t.slice_set(&block, 1, dst * bs)?;
                    }
                }
                Layer::Eight(l) => {
                    let g = d / l.group;
                    for h in 0..self.kv_heads {
                        let (a, b) = (h * slots + src * bs, h * slots + dst * bs);
                        for codes in [&mut l.k, &mut l.v] {
                            codes.copy_within(a * d..(a + bs) * d, b * d);
                        }
                        for scales in [&mut l.k_scale, &mut l.v_scale] {
                            scales.copy_within(a * g..(a + bs) * g, b * g);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the new keys/values `[tokens, kv_heads, head_dim]` of a packed batch into their slots.
    pub fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor, runs: &[SlotRun]) -> Result<()> {
        let (kvh, d, slots) = (self.kv_heads, self.head_dim, self.num_slots());
        let format = self.format;
        let l = self.layer_mut(layer)?;
        match (l, format) {
            (Layer::Float(kc, vc), _) => {
                for run in runs {
                    for (src, dst) in [(k, &*kc), (v, &*vc)] {
                        let part = src
                            .narrow(0, run.token_start, run.len)?
                            .transpose(0, 1)?
                            .contiguous()?;
                        dst.slice_set(&part, 1, run.slot_start)?;
                    }
                }
            }
            (Layer::Eight(l), Some(format)) => {
                let (t, kh, kd) = k.dims3()?;
                if (kh, kd) != (kvh, d) || v.dims3()? != (t, kh, kd) {
                    bail!(
                        "KV cache write: keys {:?} / values {:?} for {kvh} heads of {d}",
                        k.shape(),
                        v.shape()
                    )
                }
                let rows = |x: &Tensor| -> Result<Vec<f32>> {
                    x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
                };
                let (ks, vs) = (rows(k)?, rows(v)?);
                for run in runs {
                    if run.token_start + run.len > t || run.slot_start + run.len > slots {
                        bail!("KV cache write: run {run:?} outside {t} tokens / {slots} slots")
                    }
                    for i in 0..run.len {
                        for h in 0..kvh {
                            let src = ((run.token_start + i) * kvh + h) * d;
                            let dst = h * slots + run.slot_start + i;
                            let gs = l.group;
                            for j in 0..d / gs {
                                let (x, o) = (src + j * gs, dst * d + j * gs);
                                l.k_scale[o / gs] =
                                    format.quantize_row(&ks[x..x + gs], &mut l.k[o..o + gs]);
                                l.v_scale[o / gs] =
                                    format.quantize_row(&vs[x..x + gs], &mut l.v[o..o + gs]);
                            }
                        }
                    }
                }
            }
            (Layer::Eight(_), None) => bail!("KV cache layer without a format"),
        }
        Ok(())
    }

    /// One sequence's keys and values, `[kv_heads, len, head_dim]` each (of an 8-bit cache: a
    /// dequantized copy in the model's dtype).
    pub fn gather(&self, layer: usize, how: &Gather) -> Result<(Tensor, Tensor)> {
        match (self.layer(layer)?, self.format) {
            (Layer::Float(k, v), _) => match how {
                Gather::Range { start, len } => {
                    Ok((k.narrow(1, *start, *len)?, v.narrow(1, *start, *len)?))
                }
                Gather::Slots(idx) => Ok((k.index_select(idx, 1)?, v.index_select(idx, 1)?)),
            },
            (Layer::Eight(l), Some(format)) => {
                let slots: Vec<u32> = match how {
                    Gather::Range { start, len } => (*start as u32..(start + len) as u32).collect(),
                    Gather::Slots(idx) => idx.to_vec1::<u32>()?,
                };
                let (kvh, d, n) = (self.kv_heads, self.head_dim, self.num_slots());
                if slots.iter().any(|s| *s as usize >= n) {
                    bail!("KV cache gather: slot outside a cache of {n} slots")
                }
                let len = slots.len();
                let deq = |codes: &[u8], scales: &[f32]| -> Result<Tensor> {
                    let mut out = vec![0f32; kvh * len * d];
                    for h in 0..kvh {
                        for (p, s) in slots.iter().enumerate() {
                            let i = h * n + *s as usize;
                            let o = &mut out[(h * len + p) * d..][..d];
                            let (g, c) = (l.group, &codes[i * d..(i + 1) * d]);
                            for ((o, c), s) in o
                                .chunks_exact_mut(g)
                                .zip(c.chunks_exact(g))
                                .zip(&scales[i * d / g..])
                            {
                                format.dequantize(c, *s, o);
                            }
                        }
                    }
                    Tensor::from_vec(out, (kvh, len, d), &candle_core::Device::Cpu)?
                        .to_dtype(self.dtype)
                };
                Ok((deq(&l.k, &l.k_scale)?, deq(&l.v, &l.v_scale)?))
            }
            (Layer::Eight(_), None) => bail!("KV cache layer without a format"),
        }
    }

    /// A layer's whole key and value tensors, `[kv_heads, slots, head_dim]` (a cache in the model's
    /// dtype only).
    pub(crate) fn layer_tensors(&self, layer: usize) -> Result<(&Tensor, &Tensor)> {
        match self.layer(layer)? {
            Layer::Float(k, v) => Ok((k, v)),
            Layer::Eight(_) => bail!("an 8-bit KV cache has no float tensors"),
        }
    }

    /// A layer of an 8-bit cache with its format; `None` for a cache in the model's dtype.
    pub(crate) fn eight_bit(&self, layer: usize) -> Result<Option<(Kv8Format, &Kv8Layer)>> {
        match (self.layer(layer)?, self.format) {
            (Layer::Eight(l), Some(f)) => Ok(Some((f, l))),
            _ => Ok(None),
        }
    }

    fn layer(&self, layer: usize) -> Result<&Layer> {
        match self.layers.get(layer) {
            Some(l) => Ok(l),
            None => bail!(
                "layer {layer} outside a cache of {} layers",
                self.layers.len()
            ),
        }
    }

    fn layer_mut(&mut self, layer: usize) -> Result<&mut Layer> {
        let n = self.layers.len();
        match self.layers.get_mut(layer) {
            Some(l) => Ok(l),
            None => bail!("layer {layer} outside a cache of {n} layers"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn spec() -> ModelSpec {
        ModelSpec {
            architecture: "test".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 3,
            hidden_size: 6,
            vocab_size: 10,
            max_position_embeddings: 64,
            dtype: DType::F32,
            device: Device::Cpu,
        }
    }

    #[test]
    fn bytes_per_block_counts_keys_and_values_of_every_layer() {
        assert_eq!(
            KvCache::bytes_per_block(&spec(), 4, KvCacheDtype::Auto),
            2 * 2 * 2 * 3 * 4 * 4
        );
        // one byte per value and a float32 scale per head and token (a head of 3: one group)
        for dtype in [
            KvCacheDtype::Int8,
            KvCacheDtype::Fp8E4m3,
            KvCacheDtype::Fp8E5m2,
        ] {
            assert_eq!(
                KvCache::bytes_per_block(&spec(), 4, dtype),
                2 * 2 * 2 * 4 * (3 + 4)
            );
        }
        // a head of 64: a scale per 32 values
        let wide = ModelSpec {
            head_dim: 64,
            ..spec()
        };
        assert_eq!(
            KvCache::bytes_per_block(&wide, 4, KvCacheDtype::Int8),
            2 * 2 * 2 * 4 * (64 + 2 * 4)
        );
        assert_eq!(scale_group(64), 32);
        assert_eq!(scale_group(80), 80);
    }

    #[test]
    fn write_then_gather_round_trips_through_scattered_blocks() -> Result<()> {
        let mut cache = KvCache::new(&spec(), 4, 2)?;
        // three tokens, blocks [3, 1]: slots 6, 7, 2
        let k = Tensor::arange(0f32, 18., &Device::Cpu)?.reshape((3, 2, 3))?;
        let v = (&k + 100.)?;
        let runs = [
            SlotRun {
                token_start: 0,
                slot_start: 6,
                len: 2,
            },
            SlotRun {
                token_start: 2,
                slot_start: 2,
                len: 1,
            },
        ];
        cache.write(1, &k, &v, &runs)?;
        let idx = Tensor::new(&[6u32, 7, 2], &Device::Cpu)?;
        let (gk, gv) = cache.gather(1, &Gather::Slots(idx))?;
        let want = k.transpose(0, 1)?.contiguous()?;
        assert_eq!(gk.to_vec3::<f32>()?, want.to_vec3::<f32>()?);
        assert_eq!(gv.to_vec3::<f32>()?, (want + 100.)?.to_vec3::<f32>()?);
        // layer 0 untouched
        let (k0, _) = cache.gather(0, &Gather::Range { start: 6, len: 2 })?;
        assert!(k0.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| *x == 0.));
        Ok(())
    }

    #[test]
    fn copy_block_duplicates_contents() -> Result<()> {
        let mut cache = KvCache::new(&spec(), 3, 2)?;
        let k = Tensor::arange(0f32, 12., &Device::Cpu)?.reshape((2, 2, 3))?;
        let run = SlotRun {
            token_start: 0,
            slot_start: 0,
            len: 2,
        };
        cache.write(0, &k, &k, &[run])?;
        cache.copy_block(0, 2)?;
        let (a, _) = cache.gather(0, &Gather::Range { start: 0, len: 2 })?;
        let (b, _) = cache.gather(0, &Gather::Range { start: 4, len: 2 })?;
        assert_eq!(a.to_vec3::<f32>()?, b.to_vec3::<f32>()?);
        assert!(cache.copy_block(0, 3).is_err());
        Ok(())
    }

    const EIGHT: [KvCacheDtype; 3] = [
        KvCacheDtype::Int8,
        KvCacheDtype::Fp8E4m3,
        KvCacheDtype::Fp8E5m2,
    ];

    #[test]
    fn fp8_codes_are_the_standard_encodings() {
        let e4 = Kv8Format::E4m3;
        let e5 = Kv8Format::E5m2;
        for (code, want) in [
            (0x00u8, 0.0f32),
            (0x38, 1.0),
            (0x7e, 448.0),
            (0xb8, -1.0),
            (0x08, 1.0 / 64.0),
            (0x3c, 1.5),
        ] {
            assert_eq!(e4.decode(code), want, "e4m3 {code:#x}");
            assert_eq!(e4.encode(want), code, "e4m3 {want}");
        }
        for (code, want) in [
            (0x00u8, 0.0f32),
            (0x3c, 1.0),
            (0x7b, 57344.0),
            (0xbc, -1.0),
            (0x04, 1.0 / 16384.0),
            (0x3e, 1.5),
        ] {
            assert_eq!(e5.decode(code), want, "e5m2 {code:#x}");
            assert_eq!(e5.encode(want), code, "e5m2 {want}");
        }
        assert_eq!(Kv8Format::Int8.decode(0x81), -127.0);
    }

    #[test]
    fn encode_picks_the_nearest_code() {
        for format in [Kv8Format::Int8, Kv8Format::E4m3, Kv8Format::E5m2] {
            // every code the cache may write: finite, and no fp8 subnormals
            let codes: Vec<(u8, f32)> = (0..=255u8)
                .filter(|b| match format {
                    Kv8Format::Int8 => *b != 0x80,
                    _ => {
                        (b & 0x7f) == 0
                            || ((b & 0x7f) >= (1 << if format == Kv8Format::E4m3 { 3 } else { 2 })
                                && (b & 0x7f) as u32
                                    <= if format == Kv8Format::E4m3 {
                                        0x7e
                                    } else {
                                        0x7b
                                    })
                    }
                })
                .map(|b| (b, format.decode(b)))
                .collect();
            let max = format.max();
            let mut v = -max;
            while v <= max {
                for x in [v, v / 1000.0, v / 1e6] {
                    let got = format.decode(format.encode(x));
                    let best = codes
                        .iter()
                        .map(|(_, c)| (c - x).abs())
                        .fold(f32::INFINITY, f32::min);
                    assert!(
                        (got - x).abs() <= best * (1.0 + 1e-6),
                        "{format:?}: {x} -> {got}, nearest is {best} away"
                    );
                }
                v += max / 997.0;
            }
        }
    }

    #[test]
    fn quantized_rows_come_back_within_the_formats_step() {
        for format in [Kv8Format::Int8, Kv8Format::E4m3, Kv8Format::E5m2] {
            for n in [1, 5, 64, 129] {
                let x: Vec<f32> = (0..n)
                    .map(|i| ((i * 7919 % 23) as f32 - 11.0) * 0.37)
                    .collect();
                let mut codes = vec![0u8; n];
                let scale = format.quantize_row(&x, &mut codes);
                let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (v, c) in x.iter().zip(&codes) {
                    let back = format.decode(*c) * scale;
                    let bound = match format {
                        Kv8Format::Int8 => amax / 254.0,
                        Kv8Format::E4m3 => v.abs() / 16.0 + amax / 28672.0,
                        Kv8Format::E5m2 => v.abs() / 8.0 + amax / 1e8,
                    };
                    assert!(
                        (back - v).abs() <= bound * 1.0001,
                        "{format:?}: {v} -> {back}"
                    );
                }
            }
            let mut codes = [9u8; 3];
            assert_eq!(format.quantize_row(&[0.0; 3], &mut codes), 0.0);
            assert_eq!(codes, [0; 3]);
        }
    }

    #[test]
    fn an_8_bit_cache_writes_gathers_and_copies_blocks() -> Result<()> {
        for dtype in EIGHT {
            let mut cache = KvCache::with_dtype(&spec(), 4, 2, dtype)?;
            assert!(cache.format().is_some());
            let k = ((Tensor::arange(0f32, 18., &Device::Cpu)? - 9.0)?.reshape((3, 2, 3)))?;
            let v = (&k * -0.5)?;
            let runs = [
                SlotRun {
                    token_start: 0,
                    slot_start: 6,
                    len: 2,
                },
                SlotRun {
                    token_start: 2,
                    slot_start: 2,
                    len: 1,
                },
            ];
            cache.write(1, &k, &v, &runs)?;
            let idx = Tensor::new(&[6u32, 7, 2], &Device::Cpu)?;
            let (gk, gv) = cache.gather(1, &Gather::Slots(idx))?;
            let want = k.transpose(0, 1)?.contiguous()?;
            let err = |a: &Tensor, b: &Tensor| -> Result<f32> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
            };
            // each row's step: its largest magnitude (at most 8) over the format's resolution
            assert!(err(&gk, &want)? <= 8.0 / 8.0, "{dtype:?}");
            assert!(err(&gv, &(&want * -0.5)?)? <= 4.0 / 8.0, "{dtype:?}");
            if dtype == KvCacheDtype::Int8 {
                // small integers with row maxima that divide 127 well enough: near exact
                assert!(err(&gk, &want)? < 0.04, "{dtype:?}");
            }
            // copy-on-write of block 3 (slots 6, 7) into block 0
            cache.copy_block(3, 0)?;
            let (a, b) = (
                cache.gather(1, &Gather::Range { start: 6, len: 2 })?,
                cache.gather(1, &Gather::Range { start: 0, len: 2 })?,
            );
            assert_eq!(a.0.to_vec3::<f32>()?, b.0.to_vec3::<f32>()?);
            assert_eq!(a.1.to_vec3::<f32>()?, b.1.to_vec3::<f32>()?);
            // layer 0 untouched
            let (k0, _) = cache.gather(0, &Gather::Range { start: 6, len: 2 })?;
            assert!(k0.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| *x == 0.));
            assert!(cache.layer_tensors(0).is_err());
            assert!(cache.copy_block(0, 4).is_err());
        }
        Ok(())
    }
}
