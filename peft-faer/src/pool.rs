//! The helper threads that split [`crate::stored`]'s products by rows.
//!
//! A decode step is about a hundred products of well under a millisecond
//! each, with serial work (norms, attention) between them. rayon's
//! `join` costs about 15 us when its worker is awake and about 70 us when
//! the worker fell asleep during a 100 us gap (measured on the 2-core
//! machines these benches run on): more than a split product saves. Here
//! each helper spins on its job counter for a while ([`SPIN`] rounds, a
//! few hundred microseconds) before it parks on a condition variable, so
//! a step's next product finds it awake; a post costs one atomic store.
//!
//! The pool is process-wide and made on first use, with one helper per
//! available core but the caller's. One caller uses it at a time; a
//! second caller meanwhile (another thread's product) runs its parts
//! itself, so results never depend on who ran what: each part is computed
//! whole by one thread.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Spin rounds (each a `spin_loop` hint and two loads) a helper waits for
/// its next job before it parks.
const SPIN: u32 = 1 << 14;

/// A job: called with a part index.
type Job<'a> = &'a (dyn Fn(usize) + Sync);

/// One helper thread's mailbox.
struct Helper {
    /// The job's address: a pointer to a [`Job`] on the poster's stack,
    /// valid until `done` reaches `posted`.
    job: AtomicPtr<()>,
    /// Jobs posted and finished so far.
    posted: AtomicUsize,
    done: AtomicUsize,
    /// The part count and the helper's stride of the current job.
    parts: AtomicUsize,
    stride: AtomicUsize,
    /// Whether the job panicked (the poster re-raises it).
    panicked: AtomicBool,
    /// Set while parked; the poster then wakes it through `wake`.
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// The process-wide pool: its helpers, and the lock one poster holds.
struct Pool {
    helpers: Vec<Arc<Helper>>,
    busy: Mutex<()>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let mut helpers = Vec::new();
        for id in 1..cores {
            let h = Arc::new(Helper {
                job: AtomicPtr::new(core::ptr::null_mut()),
                posted: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                parts: AtomicUsize::new(0),
                stride: AtomicUsize::new(1),
                panicked: AtomicBool::new(false),
                parked: AtomicBool::new(false),
                lock: Mutex::new(()),
                wake: Condvar::new(),
            });
            let mine = Arc::clone(&h);
            // Helper `id` is `helpers[id - 1]`: a helper that cannot be
            // started ends the list (its parts run on the caller).
            match std::thread::Builder::new().name(format!("peft-faer-{id}")).spawn(move || serve(&mine, id)) {
                Ok(_) => helpers.push(h),
                Err(_) => break,
            }
        }
        Pool { helpers, busy: Mutex::new(()) }
    })
}

/// A helper's loop: wait for a job (spinning, then parked), run parts
/// `id, id + stride, ...`, report.
fn serve(h: &Helper, id: usize) {
    let mut seen = 0usize;
    loop {
        let mut spins = 0u32;
        while h.posted.load(Ordering::Acquire) == seen {
            if spins < SPIN {
                spins += 1;
                core::hint::spin_loop();
                continue;
            }
            let guard = h.lock.lock().unwrap_or_else(|e| e.into_inner());
            h.parked.store(true, Ordering::SeqCst);
            let mut guard = guard;
            while h.posted.load(Ordering::SeqCst) == seen {
                guard = h.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            h.parked.store(false, Ordering::SeqCst);
            drop(guard);
        }
        seen = h.posted.load(Ordering::Acquire);
        let ptr = h.job.load(Ordering::Acquire).cast_const().cast::<Job<'static>>();
        let (parts, stride) = (h.parts.load(Ordering::Acquire), h.stride.load(Ordering::Acquire));
        // SAFETY: the poster stored a pointer to a live `Job` before it
        // advanced `posted` (Release; loaded with Acquire above), and it
        // does not return, unwind past the job or post again until `done`
        // reaches `seen` (the `Wait` guard in `run`). The `'static` is
        // erased, never relied on: the job is used only before `done` is
        // stored below.
        let job: Job<'_> = unsafe { *ptr };
        let ok = catch_unwind(AssertUnwindSafe(|| (id..parts).step_by(stride).for_each(job))).is_ok();
        if !ok {
            h.panicked.store(true, Ordering::Relaxed);
        }
        h.done.store(seen, Ordering::Release);
    }
}

/// Waits, when dropped, until every posted helper finished (so that the
/// job outlives their use of it, even if the caller's own parts panic).
struct Wait<'p> {
    helpers: &'p [Arc<Helper>],
    seqs: Vec<usize>,
}

impl Drop for Wait<'_> {
    fn drop(&mut self) {
        for (h, &seq) in self.helpers.iter().zip(&self.seqs) {
            while h.done.load(Ordering::Acquire) != seq {
                core::hint::spin_loop();
            }
        }
    }
}

/// Runs `f(i)` for every `i < parts` over up to `threads` threads (the
/// caller and `threads - 1` helpers), each part whole on one thread, and
/// returns when all are done. Parts run on the caller alone when
/// `threads <= 1`, there is one part, no helper exists, or another caller
/// holds the pool.
///
/// # Panics
/// When a part panicked on a helper (after every part finished).
pub(crate) fn run(threads: usize, parts: usize, f: &(dyn Fn(usize) + Sync)) {
    let pool = pool();
    let busy = match pool.busy.try_lock() {
        _ if threads <= 1 || parts <= 1 => None,
        Ok(guard) => Some(guard),
        // A caller's own part panicked while it held the pool: the lock
        // guards no data.
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    };
    let n = busy.as_ref().map_or(0, |_| (threads - 1).min(pool.helpers.len()).min(parts - 1));
    if n == 0 {
        (0..parts).for_each(f);
        return;
    }
    let helpers = &pool.helpers[..n];
    let stride = n + 1;
    let job: Job<'_> = f;
    let ptr = (&raw const job).cast::<()>().cast_mut();
    let mut wait = Wait { helpers, seqs: Vec::with_capacity(n) };
    for h in helpers {
        h.job.store(ptr, Ordering::Relaxed);
        h.parts.store(parts, Ordering::Relaxed);
        h.stride.store(stride, Ordering::Relaxed);
        let seq = h.posted.load(Ordering::Relaxed) + 1;
        wait.seqs.push(seq);
        h.posted.store(seq, Ordering::SeqCst);
        if h.parked.load(Ordering::SeqCst) {
            let _guard = h.lock.lock().unwrap_or_else(|e| e.into_inner());
            h.wake.notify_one();
        }
    }
    // The caller takes parts 0, stride, 2 stride, ...; helper k (from 1)
    // parts k, k + stride, ...
    (0..parts).step_by(stride).for_each(f);
    drop(wait);
    let panicked = helpers.iter().any(|h| h.panicked.swap(false, Ordering::Relaxed));
    drop(busy);
    assert!(!panicked, "a part of a split product panicked on a helper thread");
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Every part runs exactly once, whatever the thread and part counts,
    /// also from several callers at once (one holds the pool, the others
    /// run their parts themselves) and after the helpers parked.
    #[test]
    fn every_part_runs_once() {
        std::thread::scope(|s| {
            for caller in 0..3 {
                s.spawn(move || {
                    for round in 0..200 {
                        let parts = 1 + (round + caller) % 7;
                        let counts: Vec<AtomicUsize> = (0..parts).map(|_| AtomicUsize::new(0)).collect();
                        super::run(1 + round % 3, parts, &|i| {
                            counts[i].fetch_add(1, Ordering::Relaxed);
                        });
                        assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "round {round}");
                    }
                });
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let hits = AtomicUsize::new(0);
        super::run(2, 2, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
