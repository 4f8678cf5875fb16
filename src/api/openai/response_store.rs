//! Stored responses (`/v1/responses` with `store: true`): each response's conversation (its input
//! items and its output, as chat messages) kept in the worker's memory so a later request can name
//! it as `previous_response_id`. Bounded: at most [`MAX_ENTRIES`] responses and [`MAX_BYTES`] of
//! messages, none older than [`MAX_AGE`]; the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Most responses kept (the same bound as the finished jobs `serve` keeps for `/status`).
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// Most bytes of stored conversations (as JSON text).
pub(crate) const MAX_BYTES: usize = 64 << 20;
/// How long a stored response can be continued.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

struct Entry {
    messages: Vec<Value>,
    bytes: usize,
    at: Instant,
}

/// Responses by id, oldest first in `order`.
pub(crate) struct Store {
    entries: HashMap<String, Entry>,
    order: VecDeque<String>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    max_age: Duration,
}

impl Store {
    pub(crate) fn new(max_entries: usize, max_bytes: usize, max_age: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_entries,
            max_bytes,
            max_age,
        }
    }

    /// Keeps a response's conversation; one larger than the whole budget is not kept.
    pub(crate) fn put(&mut self, id: &str, messages: Vec<Value>, now: Instant) {
        let bytes = messages.iter().map(|m| m.to_string().len()).sum();
        if bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        self.remove(id);
        self.bytes += bytes;
        self.entries.insert(
            id.to_string(),
            Entry {
                messages,
                bytes,
                at: now,
            },
        );
        self.order.push_back(id.to_string());
        self.evict(now);
    }

    /// The conversation of a stored response that is still kept.
    pub(crate) fn get(&mut self, id: &str, now: Instant) -> Option<Vec<Value>> {
        self.evict(now);
        self.entries.get(id).map(|e| e.messages.clone())
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.entries.remove(id) {
            self.bytes -= old.bytes;
            self.order.retain(|k| k != id);
        }
    }

    fn evict(&mut self, now: Instant) {
        while let Some(oldest) = self.order.front() {
            let entry = &self.entries[oldest];
            let expired = now.saturating_duration_since(entry.at) > self.max_age;
            if !expired && self.entries.len() <= self.max_entries && self.bytes <= self.max_bytes {
                break;
            }
            let id = self.order.pop_front().unwrap_or_default();
            if let Some(old) = self.entries.remove(&id) {
                self.bytes -= old.bytes;
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// The worker's one store.
static STORE: LazyLock<Mutex<Store>> =
    LazyLock::new(|| Mutex::new(Store::new(MAX_ENTRIES, MAX_BYTES, MAX_AGE)));

fn store() -> std::sync::MutexGuard<'static, Store> {
    STORE.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn put(id: &str, messages: Vec<Value>) {
    store().put(id, messages, Instant::now());
}

pub(crate) fn get(id: &str) -> Option<Vec<Value>> {
    store().get(id, Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conversation(text: &str) -> Vec<Value> {
        vec![json!({"role": "user", "content": text})]
    }

    #[test]
    fn the_oldest_go_first_when_count_or_bytes_run_out() {
        let now = Instant::now();
        let mut store = Store::new(2, 1 << 20, MAX_AGE);
        for id in ["a", "b", "c"] {
            store.put(id, conversation(id), now);
        }
        assert_eq!(store.len(), 2);
        assert!(store.get("a", now).is_none());
        assert_eq!(store.get("c", now), Some(conversation("c")));

        let one = conversation("x")
            .iter()
            .map(|m| m.to_string().len())
            .sum::<usize>();
        let mut store = Store::new(100, 2 * one, MAX_AGE);
        for id in ["a", "b", "c"] {
            store.put(id, conversation("x"), now);
        }
        assert_eq!(store.len(), 2);
        assert!(store.get("a", now).is_none() && store.get("b", now).is_some());
        store.put("huge", conversation(&"y".repeat(3 * one)), now);
        assert!(store.get("huge", now).is_none());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn old_responses_expire() {
        let now = Instant::now();
        let mut store = Store::new(10, 1 << 20, Duration::from_secs(60));
        store.put("a", conversation("a"), now);
        assert!(store.get("a", now + Duration::from_secs(30)).is_some());
        assert!(store.get("a", now + Duration::from_secs(61)).is_none());
        assert_eq!(store.len(), 0);
    }
}
