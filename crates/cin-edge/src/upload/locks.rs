use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// One async mutex per key, created on demand and dropped when nobody holds or waits on it.
pub struct KeyedLocks<K> {
    locks: Mutex<HashMap<K, Arc<AsyncMutex<()>>>>,
}

/// Holds a key's lock; releasing it forgets the key when it was the last user.
pub struct KeyedGuard<'a, K: Eq + Hash + Clone> {
    owner: &'a KeyedLocks<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Eq + Hash + Clone> KeyedLocks<K> {
    pub fn new() -> Self {
        KeyedLocks {
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub async fn lock(&self, key: K) -> KeyedGuard<'_, K> {
        let lock = {
            let mut map = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            map.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        KeyedGuard {
            owner: self,
            key,
            guard: Some(guard),
        }
    }
}

impl<K: Eq + Hash + Clone> Drop for KeyedGuard<'_, K> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self.owner.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map itself still refers to the mutex: nobody holds or awaits it.
        if map
            .get(&self.key)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.key);
        }
    }
}
