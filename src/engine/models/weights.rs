//! Memory-mapped safetensors (single file or sharded), converted to the compute dtype on the device as
//! each tensor is taken.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

pub struct Weights {
    files: MmapedSafetensors,
    dtype: DType,
    device: Device,
}

impl Weights {
    pub fn open(paths: &[PathBuf], dtype: DType, device: &Device) -> anyhow::Result<Self> {
        // SAFETY: the files are mapped read-only and not modified while the model is loaded.
        let files = unsafe { MmapedSafetensors::multi(paths) }.context("opening safetensors")?;
        Ok(Self {
            files,
            dtype,
            device: device.clone(),
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.files.get(name).is_ok()
    }

    pub fn get(&self, name: &str) -> anyhow::Result<Tensor> {
        let t = self
            .files
            .load(name, &Device::Cpu)
            .with_context(|| format!("weight '{name}' is missing from the checkpoint"))?;
        Ok(t.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    pub fn opt(&self, name: &str) -> anyhow::Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

/// The safetensors files of a model folder: the shards named by `model.safetensors.index.json`, or the
/// single `model.safetensors`.
pub fn safetensors_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index)?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", index.display()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            bail!("shard {} named by the index is missing", missing.display());
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    bail!(
        "no model.safetensors or model.safetensors.index.json in {}",
        dir.display()
    )
}
