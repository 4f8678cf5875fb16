//! Stored responses (`/v1/responses` with `store: true`): each response's conversation (its input
//! items and its output, as chat messages) kept in the worker's memory so a later request can name
//! it as `previous_response_id`, and its response object for `GET /v1/responses/{id}`. Bounded: at
//! most `RESPONSES_STORE_MAX_COUNT` responses and `RESPONSES_STORE_MAX_BYTES` of JSON, none older
//! than `RESPONSES_STORE_MAX_AGE` (see [`configure`]; the defaults below); the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Most responses kept by default (the same bound as the finished jobs `serve` keeps for `/status`).
pub(crate) const MAX_ENTRIES: usize = 10_000;
/// Most bytes of stored conversations (as JSON text).
pub(crate) const MAX_BYTES: usize = 64 << 20;
/// How long a stored response can be continued.
pub(crate) const MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);

struct Entry {
    messages: Vec<Value>,
    object: Value,
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
    pub(crate) fn put(&mut self, id: &str, messages: Vec<Value>, object: Value, now: Instant) {
        let bytes =
            messages.iter().map(|m| m.to_string().len()).sum::<usize>() + object.to_string().len();
        if bytes > self.max_bytes || self.max_entries == 0 {
            return;
        }
        self.remove(id);
        self.bytes += bytes;
        self.entries.insert(
            id.to_string(),
            Entry {
                messages,
                object,
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

    /// The response object of a stored response that is still kept.
    pub(crate) fn retrieve(&mut self, id: &str, now: Instant) -> Option<Value> {
        self.evict(now);
        self.entries.get(id).map(|e| e.object.clone())
    }

    /// Forgets a stored response; whether it was kept.
    pub(crate) fn delete(&mut self, id: &str, now: Instant) -> bool {
        self.evict(now);
        self.remove(id)
    }

    /// New bounds, applied at once.
    fn set_bounds(&mut self, max_entries: usize, max_bytes: usize, max_age: Duration) {
        self.max_entries = max_entries;
        self.max_bytes = max_bytes;
        self.max_age = max_age;
        self.evict(Instant::now());
    }

    fn remove(&mut self, id: &str) -> bool {
        let Some(old) = self.entries.remove(id) else {
            return false;
        };
        self.bytes -= old.bytes;
        self.order.retain(|k| k != id);
        true
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

/// Sets the store's bounds (`RESPONSES_STORE_MAX_COUNT`, `_MAX_BYTES`, `_MAX_AGE`).
pub(crate) fn configure(max_entries: usize, max_bytes: usize, max_age: Duration) {
    store().set_bounds(max_entries, max_bytes, max_age);
}

pub(crate) fn put(id: &str, messages: Vec<Value>, object: Value) {
    store().put(id, messages, object, Instant::now());
}

pub(crate) fn retrieve(id: &str) -> Option<Value> {
    store().retrieve(id, Instant::now())
}

pub(crate) fn delete(id: &str) -> bool {
    store().delete(id, Instant::now())
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
            store.put(id, conversation(id), Value::Null, now);
        }
        assert_eq!(store.len(), 2);
        assert!(store.get("a", now).is_none());
        assert_eq!(store.get("c", now), Some(conversation("c")));

        let one = conversation("x")
            .iter()
            .map(|m| m.to_string().len())
            .sum::<usize>()
            + Value::Null.to_string().len();
        let mut store = Store::new(100, 2 * one, MAX_AGE);
        for id in ["a", "b", "c"] {
            store.put(id, conversation("x"), Value::Null, now);
        }
        assert_eq!(store.len(), 2);
        assert!(store.get("a", now).is_none() && store.get("b", now).is_some());
        store.put("huge", conversation(&"y".repeat(3 * one)), Value::Null, now);
        assert!(store.get("huge", now).is_none());
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn stored_objects_are_retrieved_until_deleted() {
        let now = Instant::now();
        let mut store = Store::new(10, 1 << 20, MAX_AGE);
        let object = json!({"id": "a", "object": "response"});
        store.put("a", conversation("a"), object.clone(), now);
        assert_eq!(store.retrieve("a", now), Some(object));
        assert!(store.delete("a", now));
        assert!(!store.delete("a", now));
        assert!(store.retrieve("a", now).is_none() && store.get("a", now).is_none());
        assert_eq!(store.bytes, 0);
    }

    #[test]
    fn old_responses_expire() {
        let now = Instant::now();
        let mut store = Store::new(10, 1 << 20, Duration::from_secs(60));
        store.put("a", conversation("a"), Value::Null, now);
        assert!(store.get("a", now + Duration::from_secs(30)).is_some());
        assert!(store.get("a", now + Duration::from_secs(61)).is_none());
        assert_eq!(store.len(), 0);
    }
}
