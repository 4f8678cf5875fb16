//! LoRA adapters loaded and unloaded while the engine runs (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`):
//! `Engine::load_adapter` / `unload_adapter`, the messages the engine thread takes beside requests,
//! and how it applies them to its executor.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::request::Submission;
use super::Engine;
use crate::engine::error::EngineError;
use crate::engine::lora::AdapterInfo;
use crate::engine::parts::Executor;
use crate::engine::scheduler::Scheduler;

/// What the engine thread receives.
pub(crate) enum Inbox {
    Request(Box<Submission>),
    Adapter(AdapterChange),
}

/// A change to the executor's adapters; the reply is the adapter's rank (load) or nothing (unload),
/// or why not.
pub(crate) enum AdapterChange {
    Load {
        id: u32,
        path: PathBuf,
        max_rank: usize,
        reply: oneshot::Sender<Result<usize, String>>,
    },
    Unload {
        id: u32,
        reply: oneshot::Sender<Result<(), String>>,
    },
}

/// Applies `change`; `loaded` is the set of adapter ids the executor holds.
pub(crate) fn apply(
    change: AdapterChange,
    executor: &mut dyn Executor,
    sched: &Scheduler,
    loaded: &mut Vec<u32>,
) {
    match change {
        AdapterChange::Load {
            id,
            path,
            max_rank,
            reply,
        } => {
            let result = executor
                .load_adapter(id, &path, max_rank)
                .map_err(|e| format!("{e:#}"));
            if result.is_ok() {
                loaded.push(id);
            }
            let _ = reply.send(result);
        }
        AdapterChange::Unload { id, reply } => {
            let using = sched.sequences_of_adapter(id);
            let result = if using > 0 {
                Err(format!(
                    "the adapter is in use by {using} running or waiting sequences; unload it \
                     when its requests have finished"
                ))
            } else {
                executor.unload_adapter(id);
                loaded.retain(|&a| a != id);
                Ok(())
            };
            let _ = reply.send(result);
        }
    }
}

impl Engine {
    /// Loads the LoRA adapter in the folder `path` as `name` while serving
    /// (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`).
    pub async fn load_adapter(&self, name: &str, path: &Path) -> Result<AdapterInfo, EngineError> {
        let max_rank = self.runtime_lora()?;
        if name.is_empty() || name == self.inner.info.served_model_name {
            return Err(EngineError::invalid(
                "lora_name",
                format!("`{name}` cannot name an adapter: it is empty or the base model's name"),
            ));
        }
        if self.with_adapter(name).is_some() {
            return Err(EngineError::invalid(
                "lora_name",
                format!("The lora adapter '{name}' has already been loaded."),
            ));
        }
        let id = self.inner.next_adapter.fetch_add(1, Ordering::Relaxed);
        let (reply, answer) = oneshot::channel();
        self.send(Inbox::Adapter(AdapterChange::Load {
            id,
            path: path.to_path_buf(),
            max_rank,
            reply,
        }))?;
        let rank = answer
            .await
            .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))?
            .map_err(|e| EngineError::invalid("lora_path", e))?;
        let info = AdapterInfo {
            id,
            name: name.to_string(),
            path: path.to_path_buf(),
            rank,
        };
        let mut adapters = self
            .inner
            .adapters
            .write()
            .unwrap_or_else(|e| e.into_inner());
        adapters.push(info.clone());
        Ok(info)
    }

    /// Unloads the LoRA adapter `name` (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`); refused while requests
    /// use it.
    pub async fn unload_adapter(&self, name: &str) -> Result<(), EngineError> {
        self.runtime_lora()?;
        let Some(id) = self.with_adapter(name).map(|e| e.adapter) else {
            return Err(EngineError::invalid(
                "lora_name",
                format!("The lora adapter '{name}' cannot be found."),
            ));
        };
        let (reply, answer) = oneshot::channel();
        self.send(Inbox::Adapter(AdapterChange::Unload { id, reply }))?;
        answer
            .await
            .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))?
            .map_err(|e| EngineError::invalid("lora_name", e))?;
        let mut adapters = self
            .inner
            .adapters
            .write()
            .unwrap_or_else(|e| e.into_inner());
        adapters.retain(|a| a.id != id);
        Ok(())
    }

    /// `MAX_LORA_RANK`, when adapters may be loaded at run time.
    fn runtime_lora(&self) -> Result<usize, EngineError> {
        match self.inner.lora {
            Some((max_rank, true)) => Ok(max_rank),
            _ => Err(EngineError::Unsupported(
                "loading LoRA adapters at run time needs ENABLE_LORA=1 and \
                 VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
                    .into(),
            )),
        }
    }

    fn send(&self, msg: Inbox) -> Result<(), EngineError> {
        let Some(submit) = &self.inner.submit else {
            return Err(EngineError::Unsupported(format!(
                "the model {} cannot generate text",
                self.inner.info.served_model_name
            )));
        };
        submit
            .send(msg)
            .map_err(|_| EngineError::Unavailable("the engine has stopped".into()))
    }
}
