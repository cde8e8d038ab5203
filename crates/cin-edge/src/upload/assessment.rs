//! Server-side assessment of each upload session's network: how fast chunk bodies
//! arrive and how often they fail or arrive truncated. It yields a chunk size hint
//! that clients use as their starting point and ceiling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use cin_domain::UploadId;

/// Clients should need about this long per chunk: long enough to amortise a
/// request's overhead, short enough that a lost chunk costs little.
const TARGET_CHUNK_TIME: Duration = Duration::from_secs(4);
pub const MIN_HINT: u64 = 32 * 1024;
pub const MAX_HINT: u64 = 8 * 1024 * 1024;
/// At most this many halvings for recent failures (a factor of 8).
const MAX_HALVINGS: u32 = 3;
/// The hint before anything was measured.
pub const INITIAL_HINT: u64 = 1024 * 1024;

/// Sessions tracked at once; beyond it the one idle longest is forgotten (its
/// hint starts over), so ids sent by clients cannot grow the map without end.
const MAX_SESSIONS: usize = 10_000;

#[derive(Clone, Debug, Default)]
struct SessionStats {
    /// When a chunk of the session last ended, in the assessment's own ticks.
    touched: u64,
    /// Exponentially weighted goodput of successful chunk bodies, bytes per second.
    goodput: Option<f64>,
    /// Recent failures; each halves the hint, two successes in a row forgive one.
    penalty: u32,
    successes_in_row: u32,
}

impl SessionStats {
    fn hint(&self) -> u64 {
        let base = match self.goodput {
            Some(rate) => (rate * TARGET_CHUNK_TIME.as_secs_f64()) as u64,
            None => INITIAL_HINT,
        };
        // Failures that come at random cost the same share of bytes whatever the
        // chunk size, so shrinking without end would only multiply requests:
        // a few halvings answer breaks that do depend on size.
        let halved = base >> self.penalty.min(MAX_HALVINGS);
        // Whole multiples of the floor keep chunk boundaries tidy.
        (halved.clamp(MIN_HINT, MAX_HINT) / MIN_HINT) * MIN_HINT
    }
}

#[derive(Default)]
pub struct Assessment {
    sessions: Mutex<HashMap<UploadId, SessionStats>>,
    ticks: AtomicU64,
}

impl Assessment {
    fn with<T>(&self, upload: &UploadId, f: impl FnOnce(&mut SessionStats) -> T) -> T {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.len() >= MAX_SESSIONS && !sessions.contains_key(upload) {
            let idlest = sessions
                .iter()
                .min_by_key(|(_, s)| s.touched)
                .map(|(id, _)| id.clone());
            if let Some(idlest) = idlest {
                sessions.remove(&idlest);
            }
        }
        let stats = sessions.entry(upload.clone()).or_default();
        stats.touched = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        f(stats)
    }

    pub fn record_success(&self, upload: &UploadId, bytes: u64, elapsed: Duration) {
        self.with(upload, |s| {
            // Tiny or instantaneous bodies say little about the network.
            if bytes >= MIN_HINT && elapsed >= Duration::from_millis(1) {
                let rate = bytes as f64 / elapsed.as_secs_f64();
                s.goodput = Some(match s.goodput {
                    Some(old) => 0.7 * old + 0.3 * rate,
                    None => rate,
                });
            }
            s.successes_in_row += 1;
            if s.successes_in_row >= 2 && s.penalty > 0 {
                s.penalty -= 1;
                s.successes_in_row = 0;
            }
        })
    }

    /// A chunk body that broke off, timed out or arrived truncated.
    pub fn record_failure(&self, upload: &UploadId) {
        self.with(upload, |s| {
            s.penalty += 1;
            s.successes_in_row = 0;
        })
    }

    /// Asking records nothing: only chunks that were written make a session.
    pub fn hint(&self, upload: &UploadId) -> u64 {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(upload)
            .map_or_else(|| SessionStats::default().hint(), SessionStats::hint)
    }

    pub fn forget(&self, upload: &UploadId) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(upload);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_bounded_and_asking_records_nothing() {
        let a = Assessment::default();
        for _ in 0..100 {
            a.hint(&UploadId::generate());
        }
        assert_eq!(a.sessions.lock().unwrap().len(), 0);
        let first = UploadId::generate();
        a.record_failure(&first);
        for _ in 0..MAX_SESSIONS {
            a.record_failure(&UploadId::generate());
        }
        let sessions = a.sessions.lock().unwrap();
        assert_eq!(sessions.len(), MAX_SESSIONS);
        assert!(
            !sessions.contains_key(&first),
            "the idlest session went first"
        );
    }

    #[test]
    fn failures_halve_and_successes_recover() {
        let a = Assessment::default();
        let u = UploadId::generate();
        assert_eq!(a.hint(&u), INITIAL_HINT);
        // 1 MiB/s measured: about four seconds' worth.
        a.record_success(&u, 1 << 20, Duration::from_secs(1));
        assert_eq!(a.hint(&u), 4 << 20);
        a.record_failure(&u);
        assert_eq!(a.hint(&u), 2 << 20);
        a.record_failure(&u);
        assert_eq!(a.hint(&u), 1 << 20);
        for _ in 0..4 {
            a.record_success(&u, 1 << 20, Duration::from_secs(1));
        }
        assert_eq!(a.hint(&u), 4 << 20);
        for _ in 0..20 {
            a.record_failure(&u);
        }
        assert_eq!(
            a.hint(&u),
            (4 << 20) >> MAX_HALVINGS,
            "shrinking is bounded"
        );
        let slow = Assessment::default();
        slow.record_success(&u, 64 * 1024, Duration::from_secs(10));
        assert_eq!(slow.hint(&u), MIN_HINT, "a slow link gets the floor");
        a.record_success(&u, 1 << 30, Duration::from_millis(10));
        assert!(a.hint(&u) <= MAX_HINT);
    }
}
