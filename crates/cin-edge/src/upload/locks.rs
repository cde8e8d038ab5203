//! Keyed async locks. The locks that are held while a request body streams can
//! be taken over: a peer that stopped sending without closing its connection
//! must not keep its retry (on a new connection) waiting, so a newer request for
//! the same bytes tells the holder to stop, and every wait is bounded.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cin_storage::BodyError;
use futures_util::Stream;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// One async mutex per key, created on demand and dropped when nobody holds or waits on it.
pub struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Arc<Slot>>>,
}

#[derive(Default)]
struct Slot {
    mutex: Arc<AsyncMutex<()>>,
    holder: Mutex<Option<Holder>>,
}

/// Who holds a slot: what it claims and how to tell it to stop.
struct Holder {
    claim: Option<u64>,
    stop: CancellationToken,
}

/// When a lock is held, whether the newcomer takes it over.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Takeover {
    /// The newer request always wins (tus: one client, one request at a time).
    Always,
    /// The holder stops only if it claims the same thing (the same chunk offset).
    SameClaim(u64),
    /// Wait for the holder to finish.
    Never,
}

/// The lock stayed held for the whole wait.
#[derive(Debug)]
pub struct LockBusy;

/// Holds a key's lock; releasing it forgets the key when it was the last user.
pub struct KeyedGuard<'a, K: Eq + Hash + Clone> {
    owner: &'a KeyedLocks<K>,
    key: K,
    slot: Option<Arc<Slot>>,
    stop: CancellationToken,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub fn new() -> Self {
        KeyedLocks {
            locks: Mutex::new(HashMap::new()),
        }
    }

    fn slot(&self, key: &K) -> Arc<Slot> {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(key.clone()).or_default().clone()
    }

    /// Waits for the key's lock as long as it takes (for locks held briefly).
    pub async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        let slot = self.slot(&key);
        let guard = slot.mutex.clone().lock_owned().await;
        self.held(key, slot, guard, None)
    }

    /// Takes the key's lock for a request that streams a body: a holder that
    /// `takeover` says yields to us is told to stop, and the wait ends after
    /// `wait` with [`LockBusy`].
    pub async fn acquire(
        &self,
        key: K,
        takeover: Takeover,
        wait: Duration,
    ) -> Result<KeyedGuard<'_, K>, LockBusy> {
        let slot = self.slot(&key);
        let guard = match slot.mutex.clone().try_lock_owned() {
            Ok(guard) => guard,
            Err(_) => {
                if let Some(holder) = slot
                    .holder
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                {
                    let yields = match takeover {
                        Takeover::Always => true,
                        Takeover::SameClaim(claim) => holder.claim == Some(claim),
                        Takeover::Never => false,
                    };
                    if yields {
                        holder.stop.cancel();
                    }
                }
                let waited = tokio::time::timeout(wait, slot.mutex.clone().lock_owned()).await;
                match waited {
                    Ok(guard) => guard,
                    Err(_) => {
                        self.forget_if_unused(&key, slot);
                        return Err(LockBusy);
                    }
                }
            }
        };
        let claim = match takeover {
            Takeover::SameClaim(claim) => Some(claim),
            Takeover::Always | Takeover::Never => None,
        };
        Ok(self.held(key, slot, guard, claim))
    }

    fn held(
        &self,
        key: K,
        slot: Arc<Slot>,
        guard: OwnedMutexGuard<()>,
        claim: Option<u64>,
    ) -> KeyedGuard<'_, K> {
        let stop = CancellationToken::new();
        *slot.holder.lock().unwrap_or_else(|p| p.into_inner()) = Some(Holder {
            claim,
            stop: stop.clone(),
        });
        KeyedGuard {
            owner: self,
            key,
            slot: Some(slot),
            stop,
            guard: Some(guard),
        }
    }

    fn forget_if_unused(&self, key: &K, slot: Arc<Slot>) {
        let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        drop(slot);
        // Only the map itself still refers to the slot: nobody holds or awaits it.
        if map.get(key).is_some_and(|s| Arc::strong_count(s) == 1) {
            map.remove(key);
        }
    }
}

impl<K: Eq + Hash + Clone> KeyedGuard<'_, K> {
    /// `body`, ending with [`BodyError::Superseded`] once a newer request takes
    /// this lock over.
    pub fn until_taken_over<S>(&self, body: S) -> UntilTakenOver<S> {
        UntilTakenOver {
            inner: body,
            stop: Box::pin(self.stop.clone().cancelled_owned()),
            ended: false,
        }
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyedGuard<'_, K> {
    fn drop(&mut self) {
        let Some(slot) = self.slot.take() else {
            return;
        };
        slot.holder.lock().unwrap_or_else(|p| p.into_inner()).take();
        self.guard.take();
        self.owner.forget_if_unused(&self.key, slot);
    }
}

/// A body stream that a lock takeover cuts short.
pub struct UntilTakenOver<S> {
    inner: S,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    ended: bool,
}

impl<S, E> Stream for UntilTakenOver<S>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Into<BodyError>,
{
    type Item = Result<Bytes, BodyError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.ended {
            return Poll::Ready(None);
        }
        if self.stop.as_mut().poll(cx).is_ready() {
            self.ended = true;
            return Poll::Ready(Some(Err(BodyError::Superseded)));
        }
        Pin::new(&mut self.inner)
            .poll_next(cx)
            .map(|item| item.map(|r| r.map_err(Into::into)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[tokio::test]
    async fn a_newer_claim_on_the_same_chunk_stops_the_holder() {
        let locks = KeyedLocks::new();
        let first = locks
            .acquire(1u8, Takeover::SameClaim(0), Duration::from_secs(5))
            .await
            .unwrap();
        let mut body =
            first.until_taken_over(futures_util::stream::pending::<Result<Bytes, BodyError>>());
        let second = async {
            locks
                .acquire(1u8, Takeover::SameClaim(0), Duration::from_secs(5))
                .await
                .map(|_| ())
        };
        let first_ends = async {
            let ended = body.next().await;
            drop(first);
            ended
        };
        let (ended, second) = tokio::join!(first_ends, second);
        assert_eq!(ended, Some(Err(BodyError::Superseded)));
        assert!(second.is_ok());
        assert!(locks.locks.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn another_claim_waits_and_the_wait_is_bounded() {
        let locks = KeyedLocks::new();
        let _first = locks
            .acquire(1u8, Takeover::SameClaim(0), Duration::from_secs(5))
            .await
            .unwrap();
        let second = locks
            .acquire(1u8, Takeover::SameClaim(10), Duration::from_millis(50))
            .await;
        assert!(second.is_err());
        let never = locks
            .acquire(1u8, Takeover::Never, Duration::from_millis(50))
            .await;
        assert!(never.is_err());
    }
}
