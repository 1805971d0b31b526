//! Whether an open image can still be trusted: a panic while a thread holds one of a driver's
//! locks (or is in the middle of changing the image) marks the image failed, and every later
//! call gets [`ErrorKind::Failed`] instead of working on half-updated state.

use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::error::{Error, ErrorKind, Result};

/// The health of one open layer. Drivers take their locks through it.
#[derive(Debug, Default)]
pub struct Health {
    failed: AtomicBool,
}

/// A lock guard (or a plain marker) that marks its [`Health`] failed when the thread holding
/// it panics.
#[derive(Debug)]
pub struct Held<'a, G> {
    guard: G,
    health: &'a Health,
}

impl Health {
    /// A healthy layer.
    pub fn new() -> Health {
        Health::default()
    }

    /// `Ok` while the layer is healthy.
    pub fn check(&self) -> Result<()> {
        if self.failed.load(Ordering::Acquire) {
            Err(failed())
        } else {
            Ok(())
        }
    }

    /// Whether the layer was marked failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Mark the layer failed.
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Share `lock`, unless the layer has failed (or a panic poisoned the lock).
    pub fn read<'a, T>(&'a self, lock: &'a RwLock<T>) -> Result<Held<'a, RwLockReadGuard<'a, T>>> {
        self.check()?;
        let guard = lock.read().map_err(|_| self.fail())?;
        Ok(Held { guard, health: self })
    }

    /// Take `lock` exclusively, unless the layer has failed (or a panic poisoned the lock).
    pub fn write<'a, T>(&'a self, lock: &'a RwLock<T>) -> Result<Held<'a, RwLockWriteGuard<'a, T>>> {
        self.check()?;
        let guard = lock.write().map_err(|_| self.fail())?;
        Ok(Held { guard, health: self })
    }

    /// Take `mutex`, unless the layer has failed (or a panic poisoned the mutex).
    pub fn lock<'a, T>(&'a self, mutex: &'a Mutex<T>) -> Result<Held<'a, MutexGuard<'a, T>>> {
        self.check()?;
        let guard = mutex.lock().map_err(|_| self.fail())?;
        Ok(Held { guard, health: self })
    }

    /// A marker for a change made without holding a lock (data being written, metadata being
    /// written out): a panic while it is alive marks the layer failed.
    pub fn changing(&self) -> Result<Held<'_, ()>> {
        self.check()?;
        Ok(Held {
            guard: (),
            health: self,
        })
    }

    fn fail(&self) -> Error {
        self.mark_failed();
        failed()
    }
}

/// The error every call on a failed layer gets.
pub(crate) fn failed() -> Error {
    Error::new(
        ErrorKind::Failed,
        "the image is marked failed: a thread panicked while using it, so nothing more is read \
         or written through this open image; close it and open it again (check qcow2 images \
         with `diskkit check`)",
    )
}

impl<G: Deref> Deref for Held<'_, G> {
    type Target = G::Target;
    fn deref(&self) -> &G::Target {
        &self.guard
    }
}

impl<G: DerefMut> DerefMut for Held<'_, G> {
    fn deref_mut(&mut self) -> &mut G::Target {
        &mut self.guard
    }
}

impl<G> Drop for Held<'_, G> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.health.mark_failed();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_under_a_lock_marks_the_layer_failed() {
        let health = Health::new();
        let lock = RwLock::new(1u32);
        assert_eq!(*health.read(&lock).unwrap(), 1);
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let mut g = health.write(&lock).unwrap();
                *g = 2;
                panic!("in the middle of a change");
            })
            .join()
        });
        assert!(r.is_err());
        assert!(health.is_failed());
        assert_eq!(health.read(&lock).unwrap_err().kind(), ErrorKind::Failed);
        let mutex = Mutex::new(());
        assert_eq!(health.lock(&mutex).unwrap_err().kind(), ErrorKind::Failed);
    }

    #[test]
    fn a_panic_while_changing_without_a_lock_marks_it_too() {
        let health = Health::new();
        let r = std::thread::scope(|s| {
            s.spawn(|| {
                let _changing = health.changing().unwrap();
                panic!("while writing data");
            })
            .join()
        });
        assert!(r.is_err());
        assert_eq!(health.check().unwrap_err().kind(), ErrorKind::Failed);
    }
}
