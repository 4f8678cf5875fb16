//! The compute threads of this engine's own CPU kernels (the decode and quantized products): a shared
//! cursor over chunks of work, the calling thread working alongside. Unlike a barrier pool, the caller
//! never waits for a worker that has not started: a worker the OS has not scheduled (another process
//! holds its core) simply finds the work done when it wakes, and the caller does it all itself.
//! The caller waits only for chunks already being computed. Idle workers spin briefly (the next product
//! of a decode step follows within microseconds), then park.

use std::any::Any;
use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins for the next job before parking.
const WORKER_SPIN: Duration = Duration::from_micros(100);
/// How long the caller spins for running chunks to finish before yielding its core.
const CALLER_SPIN: Duration = Duration::from_micros(20);

type Trampoline = unsafe fn(*const (), Range<usize>);

#[derive(Clone, Copy)]
struct Task {
    data: *const (),
    call: Trampoline,
    n_items: usize,
    chunk: usize,
}

struct Shared {
    /// Bumped for every job; workers wake on a change.
    generation: AtomicUsize,
    /// The generation of the job workers may join, 0 when none is open.
    open: AtomicUsize,
    /// Workers inside a job (joined, not yet left).
    active: AtomicUsize,
    cursor: AtomicUsize,
    /// Written by the caller only while no job is open and no worker is active.
    task: UnsafeCell<Task>,
    threads: OnceLock<Vec<Thread>>,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `task` is written only by the caller holding `Pool::lock`, while `open` is 0 and `active`
// is 0 (no worker can read it then: a worker reads it only after joining an open job).
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: &'static Shared,
    workers: usize,
    lock: Mutex<()>,
}

thread_local! {
    static IN_POOL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

unsafe fn trampoline<F: Fn(Range<usize>) + Sync>(data: *const (), range: Range<usize>) {
    // SAFETY: `data` points to the `F` the caller keeps alive until every worker has left the job.
    let f = unsafe { &*(data as *const F) };
    f(range)
}

impl Pool {
    fn new(threads: usize) -> Self {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            generation: AtomicUsize::new(0),
            open: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            task: UnsafeCell::new(Task {
                data: std::ptr::null(),
                call: trampoline::<fn(Range<usize>)>,
                n_items: 0,
                chunk: 1,
            }),
            threads: OnceLock::new(),
            panic: Mutex::new(None),
        }));
        let workers = threads.saturating_sub(1);
        let handles: Vec<Thread> = (0..workers)
            .filter_map(|i| {
                std::thread::Builder::new()
                    .name(format!("kernel-{i}"))
                    .spawn(move || worker(shared))
                    .ok()
                    .map(|h| h.thread().clone())
            })
            .collect();
        let workers = handles.len();
        let _ = shared.threads.set(handles);
        Self {
            shared,
            workers,
            lock: Mutex::new(()),
        }
    }

    /// Calls `f` on chunks covering `0..n_items`, on the calling thread and the workers, and returns
    /// when every chunk is done. Panics in `f` resume on the caller.
    pub fn run<F: Fn(Range<usize>) + Sync>(&self, n_items: usize, f: F) {
        if n_items == 0 {
            return;
        }
        if self.workers == 0 || n_items == 1 || IN_POOL.with(|p| p.get()) {
            f(0..n_items);
            return;
        }
        let Ok(_guard) = self.lock.lock() else {
            f(0..n_items);
            return;
        };
        let s = self.shared;
        let chunk = n_items.div_ceil((self.workers + 1) * 4).max(1);
        // SAFETY: no job is open and no worker is active (the previous `run` waited for both).
        unsafe {
            *s.task.get() = Task {
                data: &f as *const F as *const (),
                call: trampoline::<F>,
                n_items,
                chunk,
            };
        }
        s.cursor.store(0, Ordering::Relaxed);
        let generation = s.generation.load(Ordering::Relaxed).wrapping_add(1).max(1);
        s.generation.store(generation, Ordering::SeqCst);
        s.open.store(generation, Ordering::SeqCst);
        if let Some(threads) = s.threads.get() {
            for t in threads {
                t.unpark();
            }
        }
        IN_POOL.with(|p| p.set(true));
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_chunks(s, &f, n_items, chunk)
        }));
        IN_POOL.with(|p| p.set(false));
        // Every chunk is taken: close the job, then wait for the workers still computing theirs.
        s.open.store(0, Ordering::SeqCst);
        let start = Instant::now();
        while s.active.load(Ordering::SeqCst) != 0 {
            if start.elapsed() < CALLER_SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        let theirs = s.panic.lock().ok().and_then(|mut p| p.take());
        if let Some(p) = theirs {
            std::panic::resume_unwind(p);
        }
    }
}

fn run_chunks<F: Fn(Range<usize>)>(s: &Shared, f: &F, n_items: usize, chunk: usize) {
    loop {
        let start = s.cursor.fetch_add(chunk, Ordering::Relaxed);
        if start >= n_items {
            return;
        }
        f(start..(start + chunk).min(n_items));
    }
}

fn worker(s: &'static Shared) {
    IN_POOL.with(|p| p.set(true));
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || since.elapsed() < WORKER_SPIN {
                std::hint::spin_loop();
            } else {
                // an unpark before this park makes it return at once
                std::thread::park();
                since = Instant::now();
            }
        };
        seen = generation;
        s.active.fetch_add(1, Ordering::SeqCst);
        if s.open.load(Ordering::SeqCst) == generation {
            // SAFETY: the job is open, so the caller wrote `task` before opening it and keeps `f`
            // alive until this worker leaves (`active` back to 0).
            let task = unsafe { *s.task.get() };
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| loop {
                let start = s.cursor.fetch_add(task.chunk, Ordering::Relaxed);
                if start >= task.n_items {
                    break;
                }
                // SAFETY: as above.
                unsafe { (task.call)(task.data, start..(start + task.chunk).min(task.n_items)) };
            }));
            if let Err(p) = ran {
                if let Ok(mut slot) = s.panic.lock() {
                    slot.get_or_insert(p);
                }
            }
        }
        s.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `y = x · Wᵀ` (`[m, n]`) computed by blocks of `block` weight rows on the pool: `f(rows, buf)`
/// fills `buf` (`[rows.len(), m]`, weight-row-major) for one block, whose results then go to their
/// columns of `y`. Each block owns its columns, so no two threads write the same element.
pub fn by_weight_rows<F>(m: usize, n: usize, block: usize, f: F) -> Vec<f32>
where
    F: Fn(Range<usize>, &mut [f32]) + Sync,
{
    let mut y = vec![0f32; m * n];
    let out = y.as_mut_ptr() as usize;
    pool().run(n.div_ceil(block), |tasks| {
        let mut small = [0f32; 256];
        let mut large = Vec::new();
        for task in tasks {
            let rows = task * block..((task + 1) * block).min(n);
            let len = rows.len() * m;
            let buf: &mut [f32] = if len <= small.len() {
                &mut small[..len]
            } else {
                large.resize(len, 0.0);
                &mut large[..]
            };
            f(rows.clone(), buf);
            for i in 0..m {
                for (jj, j) in rows.clone().enumerate() {
                    // SAFETY: `i < m`, `j < n`: inside `y`, which outlives `run`; column `j` belongs
                    // to this task alone.
                    unsafe { *(out as *mut f32).add(i * n + j) = buf[jj * m + i] };
                }
            }
        }
    });
    y
}

/// The pool, sized by the compute threads (`NUM_THREADS`) on first use.
pub fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool::new(rayon::current_num_threads().max(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_item_is_done_once() {
        let pool = Pool::new(3);
        for n in [1usize, 2, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.run(n, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                hits.iter().all(|h| h.load(Ordering::Relaxed) == 1),
                "n = {n}"
            );
        }
    }

    #[test]
    fn back_to_back_jobs_lose_nothing() {
        let pool = Pool::new(2);
        let sum = AtomicUsize::new(0);
        for _ in 0..200 {
            pool.run(16, |r| {
                sum.fetch_add(r.len(), Ordering::Relaxed);
            });
        }
        assert_eq!(sum.load(Ordering::Relaxed), 3200);
    }

    #[test]
    fn panics_reach_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(64, |r| {
                if r.contains(&40) {
                    panic!("boom")
                }
            })
        }));
        assert!(r.is_err());
        let n = AtomicUsize::new(0);
        pool.run(10, |r| {
            n.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }
}
