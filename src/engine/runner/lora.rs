//! LoRA adapters loaded and unloaded while the engine runs (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`):
//! the messages the engine thread takes beside requests, and how it applies them to its executor.

use std::path::PathBuf;

use tokio::sync::oneshot;

use super::request::Submission;
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
