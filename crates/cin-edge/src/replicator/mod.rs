//! The replicator: a background worker that delivers complete files from local
//! parts to their final store and only then marks them `Stored`. Jobs live in the
//! metadata store, so a restart picks up every pending one (and its checkpoint).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cin_domain::{FileStatus, Handle, MultipartCheckpoint, ReplicationJob, Transition};
use cin_storage::{
    FinalStoreError, JobChange, LocalObject, MetadataStore, ObjectToStore, PartStore, PutJournal,
    StorageError,
};
use rand::Rng;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;

use crate::config::ReplicatorConfig;
use crate::destinations::Destinations;
use crate::network::manifest::Manifest;
use crate::observability::names;
use crate::upload::{now_ms, Lifecycle, UploadError};
use crate::webhooks::Webhooks;
use crate::worker::{Worker, WorkerState};

/// Jobs read from the queue at a time.
const JOB_PAGE: usize = 64;

/// Longest idle wait before the job list is looked at again.
const IDLE_POLL: Duration = Duration::from_secs(30);

pub struct Replicator {
    meta: Arc<dyn MetadataStore>,
    parts: PartStore,
    destinations: Arc<Destinations>,
    wakeup: Arc<Notify>,
    config: ReplicatorConfig,
    in_flight: Mutex<HashSet<Handle>>,
    /// The last job dispatched: the next scan of the queue starts after it.
    cursor: Mutex<Option<Handle>>,
    /// Set on shutdown: deliveries stop after their current part.
    stopping: Arc<AtomicBool>,
    lifecycle: Arc<Lifecycle>,
    webhooks: Arc<Webhooks>,
    /// In a network of POPs: each delivered file's manifest goes to the default
    /// store, so every POP can answer for it once it is `Stored`.
    write_manifests: bool,
}

impl Replicator {
    pub fn new(
        meta: Arc<dyn MetadataStore>,
        parts: PartStore,
        destinations: Arc<Destinations>,
        wakeup: Arc<Notify>,
        config: ReplicatorConfig,
        lifecycle: Arc<Lifecycle>,
        webhooks: Arc<Webhooks>,
    ) -> Self {
        Replicator {
            meta,
            parts,
            destinations,
            wakeup,
            config,
            in_flight: Mutex::new(HashSet::new()),
            cursor: Mutex::new(None),
            stopping: Arc::new(AtomicBool::new(false)),
            lifecycle,
            webhooks,
            write_manifests: false,
        }
    }

    /// Stores a manifest beside every file delivered (see [`Manifest`]).
    pub fn writing_manifests(mut self, on: bool) -> Self {
        self.write_manifests = on;
        self
    }

    /// The background worker that dispatches due jobs to delivery tasks.
    pub fn worker(self: Arc<Self>) -> ReplicationWorker {
        ReplicationWorker {
            permits: Arc::new(Semaphore::new(self.config.workers)),
            running: JoinSet::new(),
            replicator: self,
        }
    }

    /// Starts every due job there is a worker for; returns how long to wait for the next one.
    fn dispatch_due(
        self: &Arc<Self>,
        permits: &Arc<Semaphore>,
        running: &mut JoinSet<()>,
    ) -> Duration {
        let now = now_ms();
        let mut wait = IDLE_POLL;
        // Read the queue a page at a time and only while a worker is free: a long
        // queue costs a page per dispatch, not a decode of every job. The scan
        // goes on from where the last one stopped, so no job waits behind others.
        let started_after = self.lock_cursor().clone();
        let mut after = started_after.clone();
        let mut wrapped = started_after.is_none();
        while permits.available_permits() > 0 {
            let page = match self.meta.jobs_after(after.as_ref(), JOB_PAGE) {
                Ok(page) => page,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the replication queue");
                    return Duration::from_secs(1);
                }
            };
            let full_page = page.len() == JOB_PAGE;
            for job in page {
                if wrapped && started_after.as_ref().is_some_and(|s| job.handle > *s) {
                    return wait;
                }
                after = Some(job.handle.clone());
                if parked(&self.config, &job) {
                    continue;
                }
                if job.not_before_ms > now {
                    wait = wait.min(Duration::from_millis(job.not_before_ms - now));
                    continue;
                }
                if self.lock_in_flight().contains(&job.handle) {
                    continue;
                }
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    return wait;
                };
                self.lock_in_flight().insert(job.handle.clone());
                *self.lock_cursor() = Some(job.handle.clone());
                let this = self.clone();
                running.spawn(async move {
                    let handle = job.handle.clone();
                    this.replicate(job).await;
                    this.lock_in_flight().remove(&handle);
                    drop(permit);
                });
            }
            if !full_page {
                if wrapped {
                    return wait;
                }
                wrapped = true;
                after = None;
            }
        }
        wait
    }

    fn lock_cursor(&self) -> std::sync::MutexGuard<'_, Option<Handle>> {
        self.cursor.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<Handle>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn replicate(&self, job: ReplicationJob) {
        let handle = job.handle.clone();
        if let Err(e) = self.try_replicate(job).await {
            tracing::error!(%handle, error = %e, "replication bookkeeping failed; the job stays queued");
        }
    }

    async fn try_replicate(&self, mut job: ReplicationJob) -> Result<(), UploadError> {
        // Only an operator's retry changes it while this attempt runs.
        let picked_not_before_ms = job.not_before_ms;
        let Some(mut file) = self.meta.get_file(&job.handle)? else {
            tracing::warn!(handle = %job.handle, "dropping a replication job for a file that no longer exists");
            return self.drop_job(&job.handle).await;
        };
        if job.remove {
            return self.remove_deleted(job, file).await;
        }
        if file.status != FileStatus::InTransit {
            // Stored already, or (after a crash between the two writes) not complete:
            // completing it writes a new job.
            return self.drop_job(&job.handle).await;
        }
        let started = std::time::Instant::now();
        // An error, and whether it is a definitive mismatch (counted towards giving up).
        let result = match self.destinations.get(&file.profile) {
            None => {
                let reason = format!(
                    "storage profile {:?} is not configured on this POP any more; add it back to deliver this file",
                    file.profile
                );
                Err((reason, false))
            }
            Some(destination) => {
                let source = LocalObject {
                    parts: self.parts.clone(),
                    segments: file.segments.clone(),
                    size: file.size,
                };
                let journal = JobJournal {
                    stopping: self.stopping.clone(),
                    meta: self.meta.clone(),
                    lifecycle: self.lifecycle.clone(),
                    upload_id: file.upload_id.clone(),
                    handle: job.handle.clone(),
                    resume_from: job.checkpoint.clone(),
                };
                let object = ObjectToStore {
                    container: &file.container,
                    key: &file.key,
                    source: &source,
                    filename: &file.filename,
                    mimetype: &file.mimetype,
                    acl: file
                        .store
                        .access
                        .as_deref()
                        .or(Some(destination.profile.acl.as_str()).filter(|a| !a.is_empty())),
                };
                let stored = destination.store.put(&object, &journal).await;
                // What says something about the store, not about this file's bytes.
                match &stored {
                    Ok(_) => destination.record(Ok(())),
                    Err(e @ FinalStoreError::Unreachable(_)) => destination.record(Err(e)),
                    Err(_) => {}
                }
                let stored = stored.map_err(|e| {
                    let mismatch = matches!(e, FinalStoreError::Mismatch { .. });
                    (e.to_string(), mismatch)
                });
                match stored {
                    // Stored only once the manifest is: other POPs find the file by it.
                    Ok(outcome) if self.write_manifests => {
                        Manifest::of(&file, &outcome.sha256, now_ms())
                            .store(&self.destinations)
                            .await
                            .map_err(|e| (e, false))
                            .map(|()| outcome)
                    }
                    other => other,
                }
            }
        };
        job.attempts += 1;
        file.replication_attempts = job.attempts;
        metrics::counter!(names::REPLICATION_ATTEMPTS).increment(1);
        match result {
            Ok(outcome) => {
                let guard = self.lifecycle.lock(&file.upload_id).await;
                file = self.lifecycle.current(&guard, &file.handle)?;
                if file.status == FileStatus::Deleted {
                    // Deleted while it was written: its removal job (queued in
                    // this job's place, run once this attempt is over) takes
                    // the object out again.
                    return Ok(());
                }
                metrics::counter!(names::REPLICATED_BYTES).increment(file.size);
                metrics::histogram!(names::REPLICATION_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                file.replication_attempts = job.attempts;
                file.sha256 = Some(outcome.sha256);
                file.last_error = None;
                self.lifecycle
                    .transition(&guard, &mut file, Transition::Store, JobChange::Remove)
                    .await?;
                drop(guard);
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    handle = %file.handle,
                    profile = %file.profile,
                    key = %file.key,
                    bytes = file.size,
                    seconds = format_args!("{secs:.2}"),
                    mb_per_s = format_args!("{:.2}", file.size as f64 / 1e6 / secs.max(1e-9)),
                    "stored"
                );
            }
            Err((error, mismatch)) => {
                metrics::counter!(names::REPLICATION_FAILURES).increment(1);
                if mismatch {
                    job.mismatched_attempts += 1;
                }
                let delay = backoff(&self.config, job.attempts);
                job.not_before_ms = now_ms() + delay.as_millis() as u64;
                job.last_error = Some(error.clone());
                let guard = self.lifecycle.lock(&file.upload_id).await;
                file = self.lifecycle.current(&guard, &file.handle)?;
                if file.status == FileStatus::Deleted {
                    // Its removal job stands in this job's place now.
                    return Ok(());
                }
                // What was written while this attempt ran stands: a checkpoint it
                // saved, and an operator's cancel or retry (a retry makes the job
                // due at once and forgets earlier mismatches, this one's too).
                if let Some(stored) = self.meta.get_job(&job.handle)? {
                    job.checkpoint = stored.checkpoint;
                    job.cancelled_at_ms = stored.cancelled_at_ms;
                    if stored.not_before_ms != picked_not_before_ms {
                        job.not_before_ms = stored.not_before_ms;
                        job.mismatched_attempts = stored.mismatched_attempts;
                    }
                }
                let gives_up = mismatch && given_up(&self.config, &job);
                file.replication_attempts = job.attempts;
                file.last_error = Some(error.clone());
                let failing_for = now_ms().saturating_sub(file.completed_at_ms.unwrap_or(0));
                if !job.failing_reported
                    && failing_for >= self.webhooks.replication_failing_after().as_millis() as u64
                {
                    self.webhooks.enqueue(&file, "replication_failing")?;
                    job.failing_reported = true;
                }
                if gives_up {
                    self.webhooks.enqueue(&file, "replication_failed")?;
                }
                self.lifecycle
                    .update(&guard, &file, JobChange::Upsert(job.clone()))
                    .await?;
                drop(guard);
                if gives_up {
                    metrics::counter!(names::REPLICATION_GIVEN_UP).increment(1);
                    tracing::error!(
                        handle = %file.handle,
                        attempts = job.attempts,
                        mismatched_attempts = job.mismatched_attempts,
                        %error,
                        "replication given up: final storage keeps answering with other bytes; the file stays here, servable"
                    );
                } else if job.cancelled_at_ms.is_some() {
                    tracing::warn!(
                        handle = %file.handle,
                        attempts = job.attempts,
                        %error,
                        "replication failed; cancelled by an operator meanwhile, no more attempts"
                    );
                } else {
                    tracing::warn!(
                        handle = %file.handle,
                        attempts = job.attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        %error,
                        "replication failed; will retry"
                    );
                }
            }
        }
        Ok(())
    }

    /// Takes a deleted file's object, and its manifest, out of final storage;
    /// retried with backoff while final storage does not answer.
    async fn remove_deleted(
        &self,
        mut job: ReplicationJob,
        file: cin_domain::FileRecord,
    ) -> Result<(), UploadError> {
        let removed = async {
            match self.destinations.get(&file.profile) {
                Some(destination) => {
                    match destination.store.delete(&file.container, &file.key).await {
                        Ok(()) | Err(FinalStoreError::NotFound { .. }) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
                None => tracing::warn!(
                    handle = %file.handle,
                    profile = %file.profile,
                    "a deleted file's storage profile is not configured any more; its object, if any, stays"
                ),
            }
            if self.write_manifests {
                Manifest::remove(&self.destinations, &file.handle).await?;
            }
            Ok(())
        }
        .await;
        match removed {
            Ok(()) => {
                metrics::counter!(names::FINAL_REMOVALS).increment(1);
                tracing::info!(handle = %file.handle, key = %file.key, "deleted file removed from final storage");
                self.drop_job(&file.handle).await
            }
            Err(error) => {
                job.attempts += 1;
                let delay = backoff(&self.config, job.attempts);
                job.not_before_ms = now_ms() + delay.as_millis() as u64;
                job.last_error = Some(error.clone());
                let guard = self.lifecycle.lock(&file.upload_id).await;
                let file = self.lifecycle.current(&guard, &file.handle)?;
                self.lifecycle
                    .update(&guard, &file, JobChange::Upsert(job))
                    .await?;
                tracing::warn!(handle = %file.handle, retry_in_ms = delay.as_millis() as u64, %error, "removing a deleted file from final storage failed; will retry");
                Ok(())
            }
        }
    }

    async fn drop_job(&self, handle: &Handle) -> Result<(), UploadError> {
        self.meta.remove_job(handle)?;
        Ok(self.meta.flush().await?)
    }
}

/// True once final storage answered `max_mismatch_attempts` attempts with a
/// definitive mismatch: the job is parked, not retried (a restart does not
/// resume it; raising the limit and restarting gives it that many more).
pub fn given_up(config: &ReplicatorConfig, job: &ReplicationJob) -> bool {
    config.max_mismatch_attempts > 0 && job.mismatched_attempts >= config.max_mismatch_attempts
}

/// True when no attempt is due until an operator retries: given up, or
/// cancelled by an operator (`POST /api/files/{handle}/replication/cancel`).
pub fn parked(config: &ReplicatorConfig, job: &ReplicationJob) -> bool {
    job.cancelled_at_ms.is_some() || given_up(config, job)
}

/// Why replication of a file stopped, for people; None while it goes on.
pub fn failure_message(config: &ReplicatorConfig, job: &ReplicationJob) -> Option<String> {
    if let Some(at) = job.cancelled_at_ms {
        return Some(format!(
            "replication cancelled by an operator at {at} (ms since the epoch): no more attempts; \
             the file stays InTransit and is served from this POP. \
             POST /api/files/{}/replication/retry (cin-edge admin retry {}) resumes it",
            job.handle, job.handle
        ));
    }
    given_up(config, job).then(|| {
        format!(
            "replication given up: final storage answered {} attempts with an object that is not this file's bytes; \
             the file stays InTransit and is served from this POP. Retry it (POST /api/files/{}/replication/retry, \
             cin-edge admin retry {}), or raise replicator.max_mismatch_attempts and restart",
            job.mismatched_attempts, job.handle, job.handle
        )
    })
}

/// Runs deliveries, `replicator.workers` at a time.
pub struct ReplicationWorker {
    replicator: Arc<Replicator>,
    permits: Arc<Semaphore>,
    running: JoinSet<()>,
}

#[async_trait]
impl Worker for ReplicationWorker {
    fn name(&self) -> &'static str {
        "replicator"
    }

    async fn work(&mut self) -> WorkerState {
        WorkerState::Idle(
            self.replicator
                .dispatch_due(&self.permits, &mut self.running),
        )
    }

    async fn wait_for_work(&mut self, idle: Duration) {
        tokio::select! {
            _ = self.replicator.wakeup.notified() => {}
            _ = tokio::time::sleep(idle) => {}
            Some(_) = self.running.join_next(), if !self.running.is_empty() => {}
        }
    }

    /// Deliveries stop after their current part (progress is journaled); one
    /// still running at the deadline is cancelled with the worker.
    async fn drain(&mut self) {
        self.replicator.stopping.store(true, Ordering::SeqCst);
        while self.running.join_next().await.is_some() {}
        tracing::info!("replicator stopped");
    }
}

/// Exponential backoff with equal jitter: the delay for attempt n lies in
/// `[d/2, d]` where `d = min(cap, base * 2^(n-1))`.
pub fn backoff(config: &ReplicatorConfig, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(32);
    let full = config
        .retry_base_ms
        .saturating_mul(1u64 << exp)
        .min(config.retry_cap_ms)
        .max(1);
    let half = full / 2;
    Duration::from_millis(half + rand::thread_rng().gen_range(0..=full - half))
}

/// Saves a final store's multipart progress into the file's replication job.
struct JobJournal {
    stopping: Arc<AtomicBool>,
    meta: Arc<dyn MetadataStore>,
    /// Held while the job is rewritten: an operator's cancel or retry, written
    /// under the same lock, is never overwritten by a stale copy.
    lifecycle: Arc<Lifecycle>,
    upload_id: cin_domain::UploadId,
    handle: Handle,
    resume_from: Option<MultipartCheckpoint>,
}

#[async_trait]
impl PutJournal for JobJournal {
    fn resume(&self) -> Option<MultipartCheckpoint> {
        self.resume_from.clone()
    }

    async fn record(&self, checkpoint: Option<MultipartCheckpoint>) -> Result<(), StorageError> {
        let _guard = self.lifecycle.lock(&self.upload_id).await;
        let mut job = self
            .meta
            .get_job(&self.handle)?
            .unwrap_or_else(|| ReplicationJob::new(self.handle.clone()));
        job.checkpoint = checkpoint;
        self.meta.put_job(&job)?;
        self.meta.flush().await
    }

    fn should_stop(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let config = ReplicatorConfig {
            workers: 1,
            retry_base_ms: 100,
            retry_cap_ms: 1_000,
            max_mismatch_attempts: 3,
        };
        for _ in 0..100 {
            let first = backoff(&config, 1).as_millis();
            assert!((50..=100).contains(&first), "{first}");
            let third = backoff(&config, 3).as_millis();
            assert!((200..=400).contains(&third), "{third}");
            let late = backoff(&config, 40).as_millis();
            assert!((500..=1_000).contains(&late), "{late}");
        }
    }

    #[test]
    fn a_job_is_given_up_after_the_configured_mismatches_only() {
        let mut config = ReplicatorConfig::default();
        let mut job = ReplicationJob::new(Handle::generate());
        job.attempts = 10;
        assert!(!given_up(&config, &job), "other failures never give up");
        job.mismatched_attempts = config.max_mismatch_attempts - 1;
        assert!(!given_up(&config, &job));
        assert!(failure_message(&config, &job).is_none());
        job.mismatched_attempts = config.max_mismatch_attempts;
        assert!(given_up(&config, &job));
        assert!(failure_message(&config, &job).is_some_and(|m| m.contains("given up")));
        config.max_mismatch_attempts += 1;
        assert!(
            !given_up(&config, &job),
            "a raised limit gives it another attempt"
        );
        config.max_mismatch_attempts = 0;
        job.mismatched_attempts = 100;
        assert!(!given_up(&config, &job), "0 never gives up");
    }

    #[test]
    fn a_cancelled_job_is_parked_until_it_is_retried() {
        let config = ReplicatorConfig::default();
        let mut job = ReplicationJob::new(Handle::generate());
        job.attempts = 4;
        assert!(!parked(&config, &job));
        job.cancelled_at_ms = Some(1);
        assert!(parked(&config, &job));
        assert!(!given_up(&config, &job), "a cancel is not a give-up");
        assert!(failure_message(&config, &job).is_some_and(|m| m.contains("cancelled")));
        job.cancelled_at_ms = None;
        assert!(!parked(&config, &job));
        assert!(failure_message(&config, &job).is_none());
    }
}
