//! Entries this replica has handed to the background writer that Redis has not
//! answered for yet. A lookup that finds Redis without such a key waits for the
//! write (within the read's deadline) and asks Redis again: a replica's own fill is
//! a hit from the moment it is stored, and Redis stays the shared truth (an
//! invalidation that refused the write, or removed it since, still wins).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use crate::key::{CacheKey, KeyMap};

/// Keys with writes in the writer's hands, each with how many and who waits.
#[derive(Default)]
pub(crate) struct PendingWrites {
    keys: Mutex<KeyMap<(u32, Arc<Notify>)>>,
}

impl PendingWrites {
    /// A write of `key` was queued.
    pub(crate) fn add(&self, key: CacheKey) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        keys.entry(key).or_default().0 += 1;
    }

    /// Writes of these keys were answered (written, refused, failed) or dropped; the
    /// lookups waiting on a key with none left are woken.
    pub(crate) fn done<'a>(&self, done: impl IntoIterator<Item = &'a CacheKey>) {
        let mut keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        for key in done {
            let finished = match keys.get_mut(key) {
                Some((count, _)) => {
                    *count = count.saturating_sub(1);
                    *count == 0
                }
                None => false,
            };
            if finished {
                if let Some((_, waiting)) = keys.remove(key) {
                    waiting.notify_waiters();
                }
            }
        }
    }

    /// A wake-up for when `key`'s writes are all answered; `None` when it has none.
    /// Registered before the lock is let go, so no wake-up is missed.
    pub(crate) fn wait_for(&self, key: &CacheKey) -> Option<Pin<Box<OwnedNotified>>> {
        let keys = self.keys.lock().unwrap_or_else(PoisonError::into_inner);
        let (_, waiting) = keys.get(key)?;
        let mut notified = Box::pin(Arc::clone(waiting).notified_owned());
        notified.as_mut().enable();
        Some(notified)
    }

    /// How many keys have writes pending.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.keys
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the wake-up has come, polled once.
    fn woken(waiter: &mut Pin<Box<OwnedNotified>>) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        std::future::Future::poll(waiter.as_mut(), &mut cx).is_ready()
    }

    #[test]
    fn a_waiter_wakes_when_the_last_write_of_its_key_is_answered() {
        let pending = PendingWrites::default();
        let key = CacheKey::from_bytes([1; 32]);
        assert!(pending.wait_for(&key).is_none());
        pending.add(key);
        pending.add(key);
        let mut waiter = pending.wait_for(&key).unwrap();
        pending.done([&key]);
        // One write is still out: no wake-up yet.
        assert!(!woken(&mut waiter));
        pending.done([&key]);
        assert!(woken(&mut waiter));
        assert_eq!(pending.len(), 0);
        // An answer for a key never added changes nothing.
        pending.done([&CacheKey::from_bytes([2; 32])]);
        assert_eq!(pending.len(), 0);
    }
}
