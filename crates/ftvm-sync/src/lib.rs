//! Locking that ignores poisoning, for every crate of the workspace.
//!
//! A `std::sync::Mutex` is poisoned when a thread panics while holding it. ftvm's shared
//! state (figures, queues, flags) stays consistent under a panic (every update is one store
//! or one push), and a panicked thread already ends its session through its own error path,
//! so a second panic in whoever locks next would only hide the first. [`lock`] therefore
//! takes the guard whether or not the mutex is poisoned, and [`unpoisoned`] does the same for
//! any other `LockResult` (a `Condvar` wait, an `RwLock`).
//!
//! (parking_lot's locks do not poison either, but its `Condvar` takes `&mut guard` and would
//! change every wait in the workspace; std's locks are futex-based and fast enough here.)

use std::sync::{LockResult, Mutex, MutexGuard, PoisonError};

/// Locks `m`, taking the guard even if a holder panicked (the mutex is poisoned).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    unpoisoned(m.lock())
}

/// The guard of any lock result, poisoned or not: `unpoisoned(cv.wait_timeout(g, d)).0`.
pub fn unpoisoned<G>(r: LockResult<G>) -> G {
    r.unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar};
    use std::time::Duration;

    fn poisoned(value: u32) -> Arc<Mutex<u32>> {
        let m = Arc::new(Mutex::new(value));
        let m2 = m.clone();
        let r = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g += 1;
            panic!("poisoning the mutex on purpose");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        m
    }

    #[test]
    fn locks_a_healthy_mutex() {
        let m = Mutex::new(vec![1]);
        lock(&m).push(2);
        assert_eq!(*lock(&m), vec![1, 2]);
        assert!(!m.is_poisoned());
    }

    #[test]
    fn locks_a_poisoned_mutex_and_sees_its_data() {
        let m = poisoned(41);
        // The panicking holder's write stands.
        assert_eq!(*lock(&m), 42);
        *lock(&m) = 7;
        assert_eq!(*lock(&m), 7);
        // std keeps the flag; only the guard is taken regardless.
        assert!(m.is_poisoned());
    }

    #[test]
    fn unpoisoned_takes_a_condvar_wait_on_a_poisoned_mutex() {
        let m = poisoned(0);
        let cv = Condvar::new();
        let (g, timeout) = unpoisoned(cv.wait_timeout(lock(&m), Duration::from_millis(1)));
        assert!(timeout.timed_out());
        assert_eq!(*g, 1);
    }

    #[test]
    fn works_on_unsized_contents() {
        let m: Box<Mutex<[u8]>> = Box::new(Mutex::new([1u8, 2, 3]));
        lock(&m)[0] = 9;
        assert_eq!(&*lock(&m), &[9, 2, 3]);
    }
}
