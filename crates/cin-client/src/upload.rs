//! The upload engine: start (nearest POP first, failing over), send every part in
//! adaptive chunks with several parts in flight, complete, and record every
//! acknowledged chunk so an interrupted upload resumes where it stopped. Parts
//! are not committed one by one: `complete` takes every part its chunks cover
//! whole, which saves a round trip per part and one at the end.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::adaptive::{
    AnswerWait, BackoffPolicy, ChunkPolicy, ChunkSizer, Concurrency, ConcurrencyPolicy,
    FailureStats, Throughput, TimeoutPolicy, MIB,
};
use crate::clock::Clock;
use crate::error::{ClientError, Failure, TransportError};
use crate::pop::{rank_pops, PopRtt, ProbePolicy};
use crate::ranges::RangeSet;
use crate::source::ByteSource;
use crate::state::{
    Checkpoint, CompletedUpload, FileIdentity, StateDir, UploadState, STATE_VERSION,
};
use crate::transport::{
    ChunkRequest, CompleteRequest, StartRequest, StoreOptions, Transport, CHECK_BLOCK,
};

/// Every knob of the algorithm. `Default` is intelligent ingestion as `cin` runs it.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadOptions {
    /// Bytes per part (filestack's FII uses 8 MiB).
    pub part_size: u64,
    pub chunks: ChunkPolicy,
    pub backoff: BackoffPolicy,
    pub timeouts: TimeoutPolicy,
    pub concurrency: ConcurrencyPolicy,
    /// How long a part keeps retrying without any acknowledged byte before the
    /// upload gives up. There is no retry count: a flaky link gets all this time.
    pub retry_deadline: Duration,
    pub probe: ProbePolicy,
    /// Seeds backoff jitter, for reproducible runs; `None` draws from the OS.
    pub seed: Option<u64>,
}

impl Default for UploadOptions {
    fn default() -> Self {
        UploadOptions {
            part_size: 8 * MIB,
            chunks: ChunkPolicy::default(),
            backoff: BackoffPolicy::default(),
            timeouts: TimeoutPolicy::default(),
            concurrency: ConcurrencyPolicy::default(),
            retry_deadline: Duration::from_secs(15 * 60),
            probe: ProbePolicy::default(),
            seed: None,
        }
    }
}

impl UploadOptions {
    /// A classic chunked client for comparison (today's filestack-js): fixed chunks
    /// of `chunk` bytes that never shrink, a fixed number of parts in flight.
    pub fn fixed(chunk: u64, parts_in_flight: usize) -> Self {
        let defaults = UploadOptions::default();
        UploadOptions {
            chunks: ChunkPolicy {
                initial: chunk,
                floor: chunk,
                ceiling: chunk.max(defaults.part_size),
                adaptive: false,
                follow_hint: false,
                ..ChunkPolicy::default()
            },
            concurrency: ConcurrencyPolicy {
                initial: parts_in_flight,
                max: parts_in_flight,
                adaptive: false,
            },
            ..defaults
        }
    }
}

/// What happened, for the user and for whoever watches the upload.
pub trait Observer: Send + Sync {
    fn session(&self, _info: &SessionInfo) {}
    fn acked(&self, _bytes: u64) {}
    fn retrying(&self, _part: u32, _error: &TransportError, _next_chunk: u64, _delay: Duration) {}
    /// No POP could start the upload now, and one asked to be tried again
    /// (`Retry-After`, e.g. a full disk): the start is tried again after `delay`.
    fn start_retrying(&self, _pop: &str, _error: &TransportError, _delay: Duration) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;
impl Observer for Quiet {}

#[derive(Debug, Clone, Serialize)]
pub struct SessionInfo {
    pub pop: String,
    pub upload_id: String,
    pub handle: String,
    pub url: String,
    pub size: u64,
    /// Bytes acknowledged by an earlier run (resume); not sent again.
    pub already_acked: u64,
    pub resumed: bool,
    /// Round trips measured when choosing the POP (empty with one POP or on resume).
    pub ranking: Vec<PopRtt>,
}

/// The outcome of one upload.
#[derive(Debug, Clone, Serialize)]
pub struct UploadReport {
    pub handle: String,
    pub url: String,
    pub status: String,
    pub size: u64,
    pub pop: String,
    pub upload_id: String,
    pub resumed: bool,
    /// Bytes acknowledged by an earlier run and skipped by this one.
    pub skipped_bytes: u64,
    /// Chunk bytes this run put on the wire, failed attempts included.
    pub sent_bytes: u64,
    pub failed_requests: u64,
    pub elapsed_ms: u64,
    /// `--resume` of a file whose upload had completed: nothing was sent, and
    /// this is the earlier upload's file.
    pub already_uploaded: bool,
}

/// One upload to do.
pub struct UploadJob {
    pub source: Arc<dyn ByteSource>,
    pub filename: String,
    pub mimetype: String,
    pub store: StoreOptions,
    /// Candidate POPs; the nearest that accepts the upload gets it.
    pub pops: Vec<String>,
    /// Where to record progress, and whether to pick up an earlier run's.
    pub resume: Option<ResumePlan>,
}

#[derive(Debug, Clone)]
pub struct ResumePlan {
    pub dir: StateDir,
    pub identity: FileIdentity,
    /// Continue the recorded upload of this file if there is one (else start anew,
    /// still recording).
    pub resume: bool,
}

pub struct Uploader {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    options: UploadOptions,
    observer: Arc<dyn Observer>,
}

/// One upload's fixed facts, shared by its part tasks.
struct Session {
    pop: String,
    upload_id: String,
    url: String,
}

struct Counters {
    acked: AtomicU64,
    sent: AtomicU64,
    failures: AtomicU64,
    timeouts: AtomicU64,
    /// How long the latest acknowledged chunk took, in microseconds.
    last_chunk_micros: AtomicU64,
    /// Parts whose latest chunk failed and that have not had one acknowledged
    /// since: they wait (backoff) or retry on a connection that may die again.
    retrying: AtomicUsize,
}

/// What part tasks share. Chunk sizes and throughput stay per part; only the POP's
/// hint and a starting point for the next part pass between them.
struct Shared {
    transport: Arc<dyn Transport>,
    clock: Arc<dyn Clock>,
    options: UploadOptions,
    observer: Arc<dyn Observer>,
    source: Arc<dyn ByteSource>,
    session: Session,
    checkpoint: Option<Checkpoint>,
    /// Signalled when a part starts retrying: another part may start meanwhile.
    part_failing: Notify,
    /// A failed state write fails the upload (--resume asked for it) or only warns.
    strict_checkpoint: bool,
    warned_checkpoint: std::sync::atomic::AtomicBool,
    counters: Counters,
    /// The POP's latest chunk size hint.
    hint: Mutex<Option<u64>>,
    /// How failures depend on chunk size on this link (all parts share the link).
    failures: Mutex<FailureStats>,
    /// Answer waits and chunk throughput over every part: what a part that has
    /// measured nothing yet sets its deadlines from.
    answers: Mutex<AnswerWait>,
    link_rate: Mutex<Throughput>,
    /// Chunk sizing and rate where the last finished part ended: the next part
    /// starts there (its own copy), so growth carries across short parts.
    handoff: Mutex<Option<(ChunkSizer, Option<f64>)>>,
    seeds: Mutex<StdRng>,
}

impl Shared {
    fn recorded(&self, result: Result<(), ClientError>) -> Result<(), ClientError> {
        match result {
            Err(e) if !self.strict_checkpoint => {
                if !self.warned_checkpoint.swap(true, Ordering::Relaxed) {
                    tracing::warn!("upload state not recorded, --resume may re-send: {e}");
                }
                Ok(())
            }
            other => other,
        }
    }
}

/// How this run of an upload began.
struct HowStarted {
    /// Round trips measured when choosing the POP.
    ranking: Vec<PopRtt>,
    resumed: bool,
    /// How long the start call took: a first idea of how long answers take,
    /// before any chunk was timed.
    start_took: Option<Duration>,
}

struct PartJob {
    number: u32,
    /// Offset of the part in the file.
    start: u64,
    len: u64,
    acked: RangeSet,
}

/// Measurement windows shorter than this are noise; a window also spans at
/// least two chunk exchanges, since acknowledgments come a chunk at a time.
const WINDOW: Duration = Duration::from_millis(250);

impl Uploader {
    pub fn new(
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
        options: UploadOptions,
        observer: Arc<dyn Observer>,
    ) -> Self {
        Uploader {
            transport,
            clock,
            options,
            observer,
        }
    }

    /// Whether `pop` still has the file `handle` of an upload recorded as
    /// completed (not deleted or expired since). Any doubt means no: the file
    /// is then uploaded afresh rather than reported as there.
    async fn still_stored(&self, pop: &str, handle: &str) -> bool {
        match self.transport.metadata(pop, handle).await {
            Ok(meta) => !meta["status"].as_str().is_some_and(|s| {
                s.eq_ignore_ascii_case("deleted") || s.eq_ignore_ascii_case("expired")
            }),
            Err(e) => {
                tracing::warn!(error = %e, %handle, "cannot confirm the recorded upload's file");
                false
            }
        }
    }

    pub async fn upload(&self, job: UploadJob) -> Result<UploadReport, ClientError> {
        if job.pops.is_empty() {
            return Err(ClientError::NoPop);
        }
        if self.options.part_size == 0 {
            return Err(ClientError::Invalid(
                "part size must be at least 1 byte".into(),
            ));
        }
        let began = self.clock.now();
        let recorded = match &job.resume {
            Some(plan) if plan.resume => self.recorded_upload(plan)?,
            _ => None,
        };
        if let (None, Some(plan)) = (&recorded, &job.resume) {
            let done = plan
                .resume
                .then(|| plan.dir.completed(&plan.identity))
                .flatten();
            if let Some(done) = done {
                if self.still_stored(&done.pop, &done.handle).await {
                    return Ok(UploadReport {
                        handle: done.handle,
                        url: done.url,
                        status: done.status,
                        size: done.size,
                        pop: done.pop,
                        upload_id: done.upload_id,
                        resumed: true,
                        skipped_bytes: done.size,
                        sent_bytes: 0,
                        failed_requests: 0,
                        elapsed_ms: 0,
                        already_uploaded: true,
                    });
                }
                tracing::warn!(handle = %done.handle, "the recorded upload's file is gone from its POP; uploading it afresh");
            }
        }
        let resumed = recorded.is_some();
        let result = match recorded {
            Some((state, path)) => {
                let how = HowStarted {
                    ranking: Vec::new(),
                    resumed: true,
                    start_took: None,
                };
                let result = self.run(&job, state, path, how, began).await;
                match result {
                    // The POP no longer knows the upload (expired, or its data was
                    // wiped): the recorded ranges are worthless, start over.
                    Err(ClientError::Request { ref source, .. })
                        if source.code() == Some("upload_not_found") =>
                    {
                        tracing::warn!("the recorded upload is gone from its POP; starting anew");
                        self.fresh(&job, began).await
                    }
                    other => other,
                }
            }
            None => self.fresh(&job, began).await,
        };
        result.map(|mut report| {
            report.resumed = resumed;
            report
        })
    }

    /// The recorded upload of this very file (same path, size and mtime), if any.
    fn recorded_upload(
        &self,
        plan: &ResumePlan,
    ) -> Result<Option<(UploadState, PathBuf)>, ClientError> {
        let path = plan.dir.file_for(&plan.identity);
        match StateDir::load(&path)? {
            Some(state) if state.file == plan.identity => Ok(Some((state, path))),
            Some(_) => {
                tracing::warn!(
                    "{} changed since its upload was interrupted; starting anew",
                    plan.identity.path.display()
                );
                Ok(None)
            }
            None => Ok(None),
        }
    }

    async fn fresh(&self, job: &UploadJob, began: Duration) -> Result<UploadReport, ClientError> {
        let size = job.source.len();
        let ranking = rank_pops(
            self.transport.as_ref(),
            self.clock.as_ref(),
            &job.pops,
            &self.options.probe,
        )
        .await;
        let request = StartRequest {
            filename: job.filename.clone(),
            mimetype: job.mimetype.clone(),
            size,
            store: job.store.clone(),
        };
        let (pop, answer, start_took) = self.start(&ranking, &request).await?;
        let state = UploadState {
            version: STATE_VERSION,
            pop,
            upload_id: answer.upload_id,
            handle: answer.handle,
            url: answer.url,
            file: job
                .resume
                .as_ref()
                .map(|plan| plan.identity.clone())
                .unwrap_or_else(|| FileIdentity {
                    path: PathBuf::from(&job.filename),
                    size,
                    mtime_secs: 0,
                    mtime_nanos: 0,
                }),
            filename: job.filename.clone(),
            mimetype: job.mimetype.clone(),
            store: job.store.clone(),
            part_size: self.options.part_size,
            parts: BTreeMap::new(),
        };
        let path = job
            .resume
            .as_ref()
            .map(|plan| plan.dir.file_for(&plan.identity))
            .unwrap_or_default();
        let how = HowStarted {
            ranking,
            resumed: false,
            start_took: Some(start_took),
        };
        self.run(job, state, path, how, began).await
    }

    /// Starts the upload at the first POP of `ranking` that accepts it. When
    /// none does and some asked to be tried later (`Retry-After`: a full disk,
    /// overload), waits as asked and tries again, within the retry deadline.
    /// Returns the upload's origin POP, the answer and how long it took.
    async fn start(
        &self,
        ranking: &[PopRtt],
        request: &StartRequest,
    ) -> Result<(String, crate::transport::Started, Duration), ClientError> {
        let first = self.clock.now();
        loop {
            let mut errors = Vec::new();
            for (i, candidate) in ranking.iter().enumerate() {
                let asked = self.clock.now();
                match self.transport.start(&candidate.pop, request).await {
                    Ok(answer) => {
                        let took = self.clock.now().saturating_sub(asked);
                        let origin = crate::pop::origin_pop(&candidate.pop, &answer.location_url);
                        return Ok((origin, answer, took));
                    }
                    Err(e) => {
                        if i + 1 < ranking.len() {
                            tracing::warn!(pop = %candidate.pop, error = %e, "start failed; trying the next POP");
                        }
                        errors.push((candidate.pop.clone(), e));
                    }
                }
            }
            // The soonest any POP said to come back; a refusal without one is final.
            let soonest = errors
                .iter()
                .filter_map(|(pop, e)| Some((e.retry_after()?, pop, e)))
                .min_by_key(|(after, _, _)| *after);
            let waited = self.clock.now().saturating_sub(first);
            let left = self.options.retry_deadline.saturating_sub(waited);
            let Some((after, pop, error)) = soonest.filter(|_| !left.is_zero()) else {
                return Err(ClientError::AllPopsFailed(errors));
            };
            // At least a moment between rounds, even when told "0".
            let delay = after.max(Duration::from_millis(100)).min(left);
            tracing::info!(%pop, %error, ?delay, "no POP can take the upload now; trying again as asked");
            self.observer.start_retrying(pop, error, delay);
            self.clock.sleep(delay).await;
        }
    }

    async fn run(
        &self,
        job: &UploadJob,
        state: UploadState,
        state_path: PathBuf,
        how: HowStarted,
        began: Duration,
    ) -> Result<UploadReport, ClientError> {
        let HowStarted {
            ranking,
            resumed,
            start_took,
        } = how;
        let size = job.source.len();
        let part_size = state.part_size.max(1);
        let already_acked = state.acked_bytes();
        self.observer.session(&SessionInfo {
            pop: state.pop.clone(),
            upload_id: state.upload_id.clone(),
            handle: state.handle.clone(),
            url: state.url.clone(),
            size,
            already_acked,
            resumed,
            ranking,
        });
        let mut jobs = VecDeque::new();
        let parts = size.div_ceil(part_size);
        for index in 0..parts {
            let number = u32::try_from(index + 1).map_err(|_| {
                ClientError::Invalid(format!(
                    "{size} bytes make more parts of {part_size} bytes than the protocol numbers"
                ))
            })?;
            let start = index * part_size;
            let progress = state.parts.get(&number).cloned().unwrap_or_default();
            jobs.push_back(PartJob {
                number,
                start,
                len: part_size.min(size - start),
                acked: progress.acked,
            });
        }
        // Recording is what --resume relies on; otherwise it is a courtesy for a
        // later --resume and must not fail the upload (say, a read-only cache dir).
        let strict = job.resume.as_ref().is_some_and(|plan| plan.resume);
        let checkpoint = match &job.resume {
            Some(_) => match Checkpoint::create(state_path, state.clone()).await {
                Ok(checkpoint) => Some(checkpoint),
                Err(e) if !strict => {
                    tracing::warn!(
                        "not recording upload state (a later --resume cannot continue it): {e}"
                    );
                    None
                }
                Err(e) => return Err(e),
            },
            None => None,
        };
        let seed = self
            .options
            .seed
            .unwrap_or_else(|| rand::thread_rng().next_u64());
        let shared = Arc::new(Shared {
            transport: self.transport.clone(),
            clock: self.clock.clone(),
            options: self.options.clone(),
            observer: self.observer.clone(),
            source: job.source.clone(),
            session: Session {
                pop: state.pop.clone(),
                upload_id: state.upload_id.clone(),
                url: state.url.clone(),
            },
            checkpoint,
            part_failing: Notify::new(),
            strict_checkpoint: strict,
            warned_checkpoint: std::sync::atomic::AtomicBool::new(false),
            counters: Counters {
                acked: AtomicU64::new(0),
                sent: AtomicU64::new(0),
                failures: AtomicU64::new(0),
                timeouts: AtomicU64::new(0),
                last_chunk_micros: AtomicU64::new(0),
                retrying: AtomicUsize::new(0),
            },
            hint: Mutex::new(None),
            failures: Mutex::new(FailureStats::default()),
            answers: Mutex::new(AnswerWait::seeded(start_took, self.options.chunks.initial)),
            link_rate: Mutex::new(Throughput::default()),
            handoff: Mutex::new(None),
            seeds: Mutex::new(StdRng::seed_from_u64(seed)),
        });

        match run_parts(&shared, jobs).await {
            Ok(()) => {}
            // Already completed (an earlier run got that far): completing again is
            // idempotent and returns the file.
            Err(ClientError::Request { ref source, .. })
                if source.code() == Some("upload_complete") => {}
            Err(e) => return Err(e),
        }
        job.source.check_unchanged()?;
        let complete = CompleteRequest {
            upload_id: state.upload_id.clone(),
            filename: state.filename.clone(),
            mimetype: state.mimetype.clone(),
            size,
            store: state.store.clone(),
        };
        let done = retrying(&shared, "complete", 0, || {
            shared.transport.complete(&shared.session.pop, &complete)
        })
        .await?;
        if let Some(plan) = &job.resume {
            let record = CompletedUpload {
                version: STATE_VERSION,
                file: plan.identity.clone(),
                pop: shared.session.pop.clone(),
                upload_id: shared.session.upload_id.clone(),
                handle: done.handle.clone(),
                url: if done.url.is_empty() {
                    shared.session.url.clone()
                } else {
                    done.url.clone()
                },
                status: done.status.clone(),
                size,
            };
            // Only a courtesy for a later --resume: the upload itself is done.
            if let Err(e) = plan.dir.record_completed(&record) {
                tracing::warn!("the finished upload is not recorded (a later --resume would upload the file again): {e}");
            }
        }
        if let Some(checkpoint) = &shared.checkpoint {
            shared.recorded(checkpoint.remove().await)?;
        }
        let elapsed = self.clock.now().saturating_sub(began);
        Ok(UploadReport {
            handle: done.handle,
            url: if done.url.is_empty() {
                shared.session.url.clone()
            } else {
                done.url
            },
            status: done.status,
            size,
            pop: shared.session.pop.clone(),
            upload_id: shared.session.upload_id.clone(),
            resumed,
            skipped_bytes: already_acked,
            sent_bytes: shared.counters.sent.load(Ordering::Relaxed),
            failed_requests: shared.counters.failures.load(Ordering::Relaxed),
            elapsed_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            already_uploaded: false,
        })
    }
}

/// Runs the parts with an adaptive number in flight; the first fatal error stops all.
/// A part that is retrying (its connection died, it backs off) sends nothing, so
/// it does not hold a place: another part starts beside it, up to twice the limit.
async fn run_parts(
    shared: &Arc<Shared>,
    mut pending: VecDeque<PartJob>,
) -> Result<(), ClientError> {
    let mut concurrency = Concurrency::new(shared.options.concurrency.clone());
    let mut running = JoinSet::new();
    let mut window_start = shared.clock.now();
    let mut window_acked = 0;
    let mut window_timeouts = 0;
    loop {
        loop {
            let retrying = shared.counters.retrying.load(Ordering::Relaxed);
            let sending = running.len().saturating_sub(retrying);
            if sending >= concurrency.limit() || running.len() >= 2 * concurrency.limit() {
                break;
            }
            let Some(job) = pending.pop_front() else {
                break;
            };
            running.spawn(run_part(shared.clone(), job));
        }
        let finished = tokio::select! {
            finished = running.join_next() => finished,
            () = shared.part_failing.notified() => continue,
        };
        let Some(finished) = finished else {
            return Ok(());
        };
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                running.abort_all();
                return Err(e);
            }
            Err(e) => {
                running.abort_all();
                return Err(ClientError::Invalid(format!("a part task failed: {e}")));
            }
        }
        let now = shared.clock.now();
        let span = now.saturating_sub(window_start);
        let chunk_time =
            Duration::from_micros(shared.counters.last_chunk_micros.load(Ordering::Relaxed));
        if span >= WINDOW.max(2 * chunk_time) {
            let acked = shared.counters.acked.load(Ordering::Relaxed);
            let timeouts = shared.counters.timeouts.load(Ordering::Relaxed);
            let goodput = (acked - window_acked) as f64 / span.as_secs_f64();
            concurrency.on_window(goodput, (timeouts - window_timeouts) as u32);
            tracing::debug!(goodput, parts_in_flight = concurrency.limit(), "window");
            window_start = now;
            window_acked = acked;
            window_timeouts = timeouts;
        }
    }
}

/// Sends one part's missing ranges chunk by chunk.
async fn run_part(shared: Arc<Shared>, mut job: PartJob) -> Result<(), ClientError> {
    let options = &shared.options;
    let handoff = lock(&shared.handoff).clone();
    let hint = *lock(&shared.hint);
    let (mut sizer, rate) =
        handoff.unwrap_or_else(|| (ChunkSizer::new(options.chunks.clone(), None, hint), None));
    let mut throughput = Throughput::starting_at(rate);
    let mut rng = StdRng::seed_from_u64(lock(&shared.seeds).next_u64());
    let mut attempts = 0u32;
    let mut stalls_in_row = 0u32;
    // Counted in `retrying` from a failure until the next acknowledgment.
    let mut failing = Failing::new(&shared);
    let mut last_progress = shared.clock.now();

    while let Some((gap_start, gap_end)) = job.acked.first_gap(job.len) {
        let gap = gap_end - gap_start;
        // A gap a little over the chunk size goes whole: a sliver of a chunk
        // after it would cost a request (and its chances to fail) for little.
        let size = if gap <= sizer.current().saturating_add(sizer.current() / 4) {
            gap.min(options.chunks.ceiling.max(sizer.current()))
        } else {
            sizer.current()
        };
        let body = shared.source.read_at(job.start + gap_start, size).await?;
        let request = ChunkRequest::new(
            shared.session.upload_id.clone(),
            job.number,
            gap_start,
            body,
        );
        let rate = throughput.rate().or_else(|| lock(&shared.link_rate).rate());
        let answers = lock(&shared.answers).clone();
        let deadlines = options
            .timeouts
            .deadlines(size, rate, &answers, stalls_in_row);
        let sent_at = shared.clock.now();
        shared.counters.sent.fetch_add(size, Ordering::Relaxed);
        match shared
            .transport
            .send_chunk(&shared.session.pop, &request, deadlines)
            .await
        {
            Ok(ack) => {
                let took = shared.clock.now().saturating_sub(sent_at);
                tracing::debug!(
                    part = job.number,
                    offset = gap_start,
                    size,
                    ?took,
                    "chunk acknowledged"
                );
                shared.counters.last_chunk_micros.store(
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                lock(&shared.failures).record(size, false);
                throughput.observe(size, took);
                lock(&shared.link_rate).observe(size, took);
                if let Some(wait) = ack.answer_wait {
                    lock(&shared.answers).observe(size, wait);
                }
                stalls_in_row = 0;
                failing.stop();
                if let Some(h) = ack.size_hint {
                    *lock(&shared.hint) = Some(h);
                }
                sizer.on_success(ack.size_hint);
                if let Some(rate) = throughput
                    .rate()
                    .filter(|_| !lock(&shared.failures).any_failed())
                {
                    sizer.on_rate(rate);
                }
                // Where bigger chunks are known to fail no more often (the
                // failures come whatever the size), growing need not wait.
                if !lock(&shared.failures).halving_helps(sizer.current().saturating_mul(2)) {
                    sizer.grow();
                }
                acknowledge(&shared, &mut job, gap_start, gap_start + size).await?;
                attempts = 0;
                last_progress = shared.clock.now();
            }
            Err(error) => {
                // A connection that broke, or was given up, may have delivered
                // whole blocks of the chunk: the POP kept them, and only the
                // rest goes again.
                let kept = if matches!(
                    error,
                    TransportError::Network(_)
                        | TransportError::Stalled(_)
                        | TransportError::Timeout(_)
                ) {
                    take_kept_blocks(&shared, &mut job, gap_start, size, deadlines.answer).await?
                } else {
                    0
                };
                match error.classify() {
                    Failure::Fatal => {
                        return Err(ClientError::Request {
                            what: "chunk upload",
                            pop: shared.session.pop.clone(),
                            source: error,
                        })
                    }
                    // What got through was kept: a smaller chunk would have
                    // broken as soon, in bytes, and saved nothing.
                    Failure::Shrink if kept > 0 => sizer.on_failure_kept(),
                    Failure::Shrink => {
                        let mut failures = lock(&shared.failures);
                        failures.record(size, true);
                        if failures.halving_helps(size) {
                            sizer.on_failure();
                        } else {
                            sizer.on_failure_kept();
                        }
                    }
                    Failure::Retry => {}
                }
                if matches!(error, TransportError::Timeout(_)) {
                    shared.counters.timeouts.fetch_add(1, Ordering::Relaxed);
                }
                if matches!(error, TransportError::Stalled(_)) {
                    stalls_in_row += 1;
                }
                failing.start();
                shared.counters.failures.fetch_add(1, Ordering::Relaxed);
                attempts += 1;
                let stalled = shared.clock.now().saturating_sub(last_progress);
                if stalled >= options.retry_deadline {
                    return Err(ClientError::GaveUp {
                        part: job.number,
                        attempts,
                        stalled,
                        last: error,
                    });
                }
                // A dead connection is no sign of an overloaded POP: the retry
                // on a fresh one need not wait longer each time.
                let backoff_attempt = if matches!(error, TransportError::Stalled(_)) {
                    1
                } else {
                    attempts
                };
                // The POP said when to come back (a full disk, overload): then,
                // not sooner.
                let delay = error
                    .retry_after()
                    .unwrap_or_else(|| options.backoff.delay(backoff_attempt, &mut rng))
                    .min(options.retry_deadline - stalled);
                tracing::debug!(part = job.number, %error, next_chunk = sizer.current(), ?delay, "chunk failed; retrying");
                shared
                    .observer
                    .retrying(job.number, &error, sizer.current(), delay);
                shared.clock.sleep(delay).await;
            }
        }
    }

    *lock(&shared.handoff) = Some((sizer, throughput.rate()));
    Ok(())
}

/// Asks which bytes of the chunk `[start, start + size)` of `job`'s part the POP
/// kept after the chunk broke off, counts them as acknowledged and says how
/// many were new. A failed question only means the whole chunk goes again.
async fn take_kept_blocks(
    shared: &Shared,
    job: &mut PartJob,
    start: u64,
    size: u64,
    timeout: Duration,
) -> Result<u64, ClientError> {
    if size <= CHECK_BLOCK {
        return Ok(0);
    }
    let received = match shared
        .transport
        .received(
            &shared.session.pop,
            &shared.session.upload_id,
            job.number,
            timeout,
        )
        .await
    {
        Ok(received) => received,
        Err(error) => {
            tracing::debug!(part = job.number, %error, "could not ask what the POP kept");
            return Ok(0);
        }
    };
    let mut kept = 0;
    for (kept_start, kept_end) in received {
        // Only this chunk's range: the rest of the part is known already.
        let (from, to) = (
            kept_start.max(start),
            kept_end.min(start + size).min(job.len),
        );
        if from >= to {
            continue;
        }
        let new = acknowledge(shared, job, from, to).await?;
        if new == 0 {
            continue;
        }
        kept += new;
        tracing::debug!(
            part = job.number,
            from,
            to,
            "the POP kept part of a broken chunk"
        );
    }
    Ok(kept)
}

/// Counts `[from, to)` of `job`'s part as acknowledged (recorded for --resume,
/// counted, reported) and says how many of its bytes were new.
async fn acknowledge(
    shared: &Shared,
    job: &mut PartJob,
    from: u64,
    to: u64,
) -> Result<u64, ClientError> {
    let new = (to - from) - job.acked.overlap(from, to);
    if new == 0 {
        return Ok(0);
    }
    job.acked.insert(from, to);
    if let Some(checkpoint) = &shared.checkpoint {
        shared.recorded(checkpoint.acked(job.number, from, to).await)?;
    }
    shared.counters.acked.fetch_add(new, Ordering::Relaxed);
    shared.observer.acked(new);
    Ok(new)
}

/// Whether a part counts among the retrying ones; it stops counting when dropped.
struct Failing<'a> {
    shared: &'a Shared,
    counted: bool,
}

impl<'a> Failing<'a> {
    fn new(shared: &'a Shared) -> Self {
        Failing {
            shared,
            counted: false,
        }
    }

    fn start(&mut self) {
        if !self.counted {
            self.counted = true;
            self.shared
                .counters
                .retrying
                .fetch_add(1, Ordering::Relaxed);
            self.shared.part_failing.notify_one();
        }
    }

    fn stop(&mut self) {
        if self.counted {
            self.counted = false;
            self.shared
                .counters
                .retrying
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Failing<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A small control call (complete), retried like chunks but without sizes.
async fn retrying<T, F, Fut>(
    shared: &Shared,
    what: &'static str,
    part: u32,
    mut call: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TransportError>>,
{
    let first = shared.clock.now();
    let mut rng = StdRng::seed_from_u64(lock(&shared.seeds).next_u64());
    let mut attempts = 0;
    loop {
        let error = match call().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        attempts += 1;
        let stalled = shared.clock.now().saturating_sub(first);
        if error.classify() == Failure::Fatal {
            return Err(ClientError::Request {
                what,
                pop: shared.session.pop.clone(),
                source: error,
            });
        }
        if stalled >= shared.options.retry_deadline {
            return Err(ClientError::GaveUp {
                part,
                attempts,
                stalled,
                last: error,
            });
        }
        shared.counters.failures.fetch_add(1, Ordering::Relaxed);
        let delay = error
            .retry_after()
            .unwrap_or_else(|| shared.options.backoff.delay(attempts, &mut rng))
            .min(shared.options.retry_deadline - stalled);
        tracing::debug!(what, part, %error, ?delay, "retrying");
        shared.clock.sleep(delay).await;
    }
}

/// A poisoned lock only means another part task panicked; its data is still sound.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}
