//! A simulated POP and a fake clock: the upload engine's unit tests run whole
//! uploads, faults and hours of backoff in milliseconds, without a network.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use crate::adaptive::{BackoffPolicy, KIB, MIB};
use crate::clock::{Clock, Sleep};
use crate::error::{ClientError, TransportError};
use crate::ranges::RangeSet;
use crate::source::MemorySource;
use crate::state::{FileIdentity, StateDir};
use crate::transport::{
    ChunkAck, ChunkDeadlines, ChunkRequest, CompleteRequest, Completed, StartRequest, Started,
    StoreOptions, Transport, CHECK_BLOCK,
};
use crate::upload::{Quiet, ResumePlan, UploadJob, UploadOptions, Uploader};

/// Time moves only when something sleeps or the simulated network "takes" time.
#[derive(Default)]
pub struct FakeClock {
    now: Mutex<Duration>,
    pub sleeps: Mutex<Vec<Duration>>,
}

impl FakeClock {
    pub fn advance(&self, by: Duration) {
        *self.now.lock().unwrap() += by;
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        *self.now.lock().unwrap()
    }

    fn sleep(&self, duration: Duration) -> Sleep {
        self.advance(duration);
        self.sleeps.lock().unwrap().push(duration);
        Box::pin(async {})
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// The connection breaks halfway through the body; the POP keeps nothing.
    Reset,
    /// The connection breaks after this many body bytes reached the POP, which
    /// keeps the whole checked blocks among them.
    ResetAfter(u64),
    /// No answer until the request's deadline.
    Timeout,
    /// The connection stops moving bytes halfway through the body, without a reset.
    Stall,
    Status(u16, &'static str),
    /// A refusal whose `Retry-After` asks the client to wait this long.
    StatusRetryAfter(u16, &'static str, Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub part: u32,
    pub offset: u64,
    pub size: u64,
    pub timeout: Duration,
    pub stall: Duration,
    pub fault: Option<Fault>,
}

type Script = Box<dyn FnMut(&Call, usize) -> Option<Fault> + Send>;

/// A POP on a link of `bandwidth` bytes/s and `latency` per request, whose chunk
/// answers follow `script` (called with each call and its index).
pub struct SimPop {
    clock: Arc<FakeClock>,
    pub bandwidth: f64,
    pub latency: Duration,
    pub hint: Option<u64>,
    script: Mutex<Script>,
    pub calls: Mutex<Vec<Call>>,
    /// Bytes the POP holds, per part, and which ranges it acknowledged.
    stored: Mutex<BTreeMap<u32, (Vec<u8>, RangeSet)>>,
    pub rtt: HashMap<String, Duration>,
    pub refuse_start: HashSet<String>,
    /// Answers for the next start calls, before any succeeds.
    pub start_errors: Mutex<VecDeque<TransportError>>,
    pub starts: Mutex<Vec<String>>,
    pub completed: Mutex<u32>,
    /// The `status` its metadata reports for a completed file.
    pub file_status: Mutex<&'static str>,
    in_flight: AtomicUsize,
    pub max_in_flight: AtomicUsize,
}

impl SimPop {
    pub fn new(clock: Arc<FakeClock>) -> Self {
        SimPop {
            clock,
            bandwidth: (10 * MIB) as f64,
            latency: Duration::from_millis(20),
            hint: None,
            script: Mutex::new(Box::new(|_, _| None)),
            calls: Mutex::new(Vec::new()),
            stored: Mutex::new(BTreeMap::new()),
            rtt: HashMap::new(),
            refuse_start: HashSet::new(),
            start_errors: Mutex::new(VecDeque::new()),
            starts: Mutex::new(Vec::new()),
            completed: Mutex::new(0),
            file_status: Mutex::new("InTransit"),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        }
    }

    pub fn script(
        self,
        script: impl FnMut(&Call, usize) -> Option<Fault> + Send + 'static,
    ) -> Self {
        *self.script.lock().unwrap() = Box::new(script);
        self
    }

    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The file as the POP would serve it.
    pub fn file(&self) -> Vec<u8> {
        let stored = self.stored.lock().unwrap();
        let mut file = Vec::new();
        for (bytes, _) in stored.values() {
            file.extend_from_slice(bytes);
        }
        file
    }

    pub fn acked(&self, part: u32) -> RangeSet {
        let stored = self.stored.lock().unwrap();
        stored
            .get(&part)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }
}

#[async_trait]
impl Transport for SimPop {
    async fn start(&self, pop: &str, _req: &StartRequest) -> Result<Started, TransportError> {
        self.starts.lock().unwrap().push(pop.to_owned());
        if self.refuse_start.contains(pop) {
            return Err(TransportError::Network("connection reset by peer".into()));
        }
        if let Some(error) = self.start_errors.lock().unwrap().pop_front() {
            self.clock.advance(self.latency);
            return Err(error);
        }
        Ok(Started {
            upload_id: "up1".into(),
            handle: "HANDLE".into(),
            url: format!("{pop}/HANDLE"),
            location_url: pop.into(),
            upload_grant: None,
        })
    }

    async fn send_chunk(
        &self,
        _pop: &str,
        chunk: &ChunkRequest,
        deadlines: ChunkDeadlines,
    ) -> Result<ChunkAck, TransportError> {
        let timeout = deadlines.total;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        // Let other part tasks run, as a real request would.
        tokio::task::yield_now().await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let size = chunk.body.len() as u64;
        let mut call = Call {
            part: chunk.part,
            offset: chunk.offset,
            size,
            timeout,
            stall: deadlines.stall,
            fault: None,
        };
        let index = self.calls.lock().unwrap().len();
        call.fault = (self.script.lock().unwrap())(&call, index);
        self.calls.lock().unwrap().push(call.clone());
        let transfer = Duration::from_secs_f64(size as f64 / self.bandwidth);
        match call.fault {
            None => {
                self.clock.advance(self.latency + transfer);
                let mut stored = self.stored.lock().unwrap();
                let (bytes, acked) = stored.entry(chunk.part).or_default();
                let end = (chunk.offset + size) as usize;
                if bytes.len() < end {
                    bytes.resize(end, 0);
                }
                bytes[chunk.offset as usize..end].copy_from_slice(&chunk.body);
                acked.insert(chunk.offset, chunk.offset + size);
                Ok(ChunkAck {
                    size_hint: self.hint,
                    answer_wait: Some(self.latency),
                })
            }
            Some(Fault::Reset) => {
                self.clock.advance(self.latency + transfer / 2);
                Err(TransportError::Network("connection reset by peer".into()))
            }
            Some(Fault::ResetAfter(arrived)) => {
                let kept = (arrived.min(size) / CHECK_BLOCK) * CHECK_BLOCK;
                self.clock.advance(
                    self.latency + Duration::from_secs_f64(arrived as f64 / self.bandwidth),
                );
                if kept > 0 {
                    let mut stored = self.stored.lock().unwrap();
                    let (bytes, acked) = stored.entry(chunk.part).or_default();
                    let end = (chunk.offset + kept) as usize;
                    if bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    bytes[chunk.offset as usize..end].copy_from_slice(&chunk.body[..kept as usize]);
                    acked.insert(chunk.offset, chunk.offset + kept);
                }
                Err(TransportError::Network("connection reset by peer".into()))
            }
            Some(Fault::Timeout) => {
                self.clock.advance(timeout);
                Err(TransportError::Timeout(timeout))
            }
            Some(Fault::Stall) => {
                self.clock
                    .advance(self.latency + transfer / 2 + deadlines.stall);
                Err(TransportError::Stalled(deadlines.stall))
            }
            Some(Fault::Status(status, code)) => {
                self.clock.advance(self.latency);
                Err(TransportError::Status {
                    status,
                    code: code.into(),
                    message: "simulated".into(),
                    retry_after: None,
                })
            }
            Some(Fault::StatusRetryAfter(status, code, wait)) => {
                self.clock.advance(self.latency);
                Err(TransportError::Status {
                    status,
                    code: code.into(),
                    message: "simulated".into(),
                    retry_after: Some(wait),
                })
            }
        }
    }

    async fn received(
        &self,
        _: &str,
        _: &str,
        part: u32,
        _: Duration,
    ) -> Result<Vec<(u64, u64)>, TransportError> {
        self.clock.advance(self.latency);
        let stored = self.stored.lock().unwrap();
        Ok(stored
            .get(&part)
            .map(|(_, acked)| acked.ranges().iter().map(|&[s, e]| (s, e)).collect())
            .unwrap_or_default())
    }

    async fn complete(&self, pop: &str, _: &CompleteRequest) -> Result<Completed, TransportError> {
        *self.completed.lock().unwrap() += 1;
        Ok(Completed {
            handle: "HANDLE".into(),
            url: format!("{pop}/HANDLE"),
            status: "InTransit".into(),
        })
    }

    async fn metadata(&self, _: &str, _: &str) -> Result<Value, TransportError> {
        Ok(json!({"status": *self.file_status.lock().unwrap()}))
    }

    async fn probe(&self, pop: &str, timeout: Duration) -> Result<(), TransportError> {
        match self.rtt.get(pop) {
            Some(rtt) if *rtt <= timeout => {
                self.clock.advance(*rtt);
                Ok(())
            }
            _ => {
                self.clock.advance(timeout);
                Err(TransportError::Timeout(timeout))
            }
        }
    }
}

fn data(len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn options() -> UploadOptions {
    let mut options = UploadOptions {
        seed: Some(42),
        ..UploadOptions::default()
    };
    // Chunks start smaller than the part, so that halving and growing show in a
    // few megabytes.
    options.chunks.initial = MIB;
    options
}

fn job(bytes: &Bytes, pops: &[&str]) -> UploadJob {
    UploadJob {
        source: Arc::new(MemorySource(bytes.clone())),
        filename: "f.bin".into(),
        mimetype: "application/octet-stream".into(),
        store: StoreOptions::s3(),
        pops: pops.iter().map(|p| p.to_string()).collect(),
        resume: None,
    }
}

fn uploader(pop: &Arc<SimPop>, clock: &Arc<FakeClock>, options: UploadOptions) -> Uploader {
    Uploader::new(pop.clone(), clock.clone(), options, Arc::new(Quiet))
}

fn sizes(calls: &[Call], part: u32) -> Vec<u64> {
    calls
        .iter()
        .filter(|c| c.part == part)
        .map(|c| c.size)
        .collect()
}

#[tokio::test]
async fn a_clean_link_delivers_every_byte_and_chunks_grow_to_the_part_size() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    // The default policy scaled down 8x (128 KiB start, 1 MiB parts).
    let mut opts = options();
    opts.part_size = MIB;
    opts.chunks.initial = 128 * KIB;
    opts.chunks.ceiling = MIB;
    let bytes = data(12 * MIB as usize + 12345);
    let report = uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    assert_eq!(report.handle, "HANDLE");
    assert_eq!(report.sent_bytes, bytes.len() as u64);
    assert_eq!(report.failed_requests, 0);
    assert_eq!(*pop.completed.lock().unwrap(), 1);
    // Part 1: one chunk at the start size; the link carried it so fast that
    // the next is the rest of the part.
    assert_eq!(sizes(&pop.calls(), 1), [128 * KIB, MIB - 128 * KIB]);
    // Later parts start where the previous one ended, up to the part size.
    assert!(pop.calls().iter().all(|c| c.size <= MIB));
    assert!(
        pop.calls().iter().any(|c| c.size == MIB),
        "{:?}",
        pop.calls()
    );
}

#[tokio::test]
async fn failures_halve_the_chunk_and_only_the_missing_range_is_resent() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()).script(|call, _| {
        (call.part == 1 && call.offset == MIB && call.size > 128 * KIB).then_some(Fault::Reset)
    }));
    let bytes = data(3 * MIB as usize);
    let mut opts = options();
    opts.concurrency.initial = 1;
    // Halving on its own: no jump to what the link carries after the first chunk.
    opts.chunks.target_time = Duration::ZERO;
    let report = uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls: Vec<(u64, u64)> = pop.calls().iter().map(|c| (c.offset, c.size)).collect();
    assert_eq!(
        calls[..5],
        [
            (0, MIB),
            (MIB, MIB),       // reset
            (MIB, 512 * KIB), // reset
            (MIB, 256 * KIB), // reset
            (MIB, 128 * KIB), // goes through
        ]
    );
    assert_eq!(report.failed_requests, 3);
    // No acknowledged byte was sent twice.
    let mut seen = RangeSet::new();
    for c in pop.calls().iter().filter(|c| c.fault.is_none()) {
        assert_eq!(seen.overlap(c.offset, c.offset + c.size), 0);
        seen.insert(c.offset, c.offset + c.size);
    }
}

#[tokio::test]
async fn after_a_reset_only_what_the_pop_did_not_keep_is_sent_again() {
    let clock = Arc::new(FakeClock::default());
    // The second chunk breaks after 600 KiB reached the POP: it keeps two
    // whole checked blocks (512 KiB) of them.
    let pop = Arc::new(SimPop::new(clock.clone()).script(|call, index| {
        (index == 1)
            .then_some(Fault::ResetAfter(600 * KIB))
            .filter(|_| call.offset == MIB)
    }));
    let bytes = data(2 * MIB as usize);
    let mut opts = options();
    opts.concurrency.initial = 1;
    opts.concurrency.adaptive = false;
    let report = uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls: Vec<(u64, u64)> = pop.calls().iter().map(|c| (c.offset, c.size)).collect();
    let kept = 2 * CHECK_BLOCK;
    assert_eq!(calls[..2], [(0, MIB), (MIB, MIB)]);
    // The retry starts where the kept blocks end and, since what got through
    // was kept, the chunk did not shrink: the rest goes in one request.
    assert_eq!(calls[2..], [(MIB + kept, MIB - kept)], "{calls:?}");
    assert_eq!(report.failed_requests, 1);
}

#[tokio::test]
async fn below_the_floor_it_keeps_retrying_with_backoff_until_the_deadline() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()).script(|_, _| Some(Fault::Reset)));
    let bytes = data(MIB as usize);
    let mut opts = options();
    opts.retry_deadline = Duration::from_secs(30 * 60);
    let err = uploader(&pop, &clock, opts.clone())
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap_err();
    let ClientError::GaveUp {
        attempts, stalled, ..
    } = err
    else {
        panic!("expected GaveUp, got {err}");
    };
    assert!(stalled >= opts.retry_deadline);
    // Not a fixed retry count: with a 20 s backoff cap, half an hour is many attempts.
    assert!(attempts > 50, "{attempts}");
    let calls = pop.calls();
    assert!(
        calls.iter().skip(5).all(|c| c.size == 32 * KIB),
        "stuck at the floor"
    );
    // Every wait within its full-jitter bound, and it waited about the deadline in all.
    let sleeps = clock.sleeps.lock().unwrap().clone();
    for (i, sleep) in sleeps.iter().enumerate() {
        assert!(
            *sleep <= opts.backoff.ceiling(i as u32 + 1),
            "sleep {i}: {sleep:?}"
        );
    }
    assert!(clock.now() >= opts.retry_deadline);
    assert!(clock.now() < opts.retry_deadline + Duration::from_secs(60));
}

#[tokio::test]
async fn backoff_grows_with_consecutive_failures_and_resets_after_success() {
    let clock = Arc::new(FakeClock::default());
    // Six failures, then a clean link.
    let pop = Arc::new(SimPop::new(clock.clone()).script(|_, i| (i < 6).then_some(Fault::Reset)));
    let mut opts = options();
    opts.backoff = BackoffPolicy {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(10),
    };
    uploader(&pop, &clock, opts.clone())
        .upload(job(&data(MIB as usize), &["http://pop"]))
        .await
        .unwrap();
    let sleeps = clock.sleeps.lock().unwrap().clone();
    assert_eq!(sleeps.len(), 6);
    for (i, s) in sleeps.iter().enumerate() {
        assert!(*s <= opts.backoff.ceiling(i as u32 + 1));
    }
    // The later waits may be far longer than the first ceiling (exponential growth).
    assert!(
        sleeps[3..].iter().any(|s| *s > Duration::from_millis(100)),
        "{sleeps:?}"
    );
}

#[tokio::test]
async fn the_server_hint_sets_start_and_ceiling() {
    let clock = Arc::new(FakeClock::default());
    let mut sim = SimPop::new(clock.clone());
    sim.hint = Some(2 * MIB);
    let pop = Arc::new(sim);
    let bytes = data(24 * MIB as usize);
    let mut opts = options();
    opts.chunks.follow_hint = true;
    uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls = pop.calls();
    assert!(
        calls.iter().all(|c| c.size <= 2 * MIB),
        "never above the hint"
    );
    assert_eq!(sizes(&calls, 1)[..2], [MIB, 2 * MIB], "jumps to the hint");
}

#[tokio::test]
async fn timeouts_follow_measured_throughput_and_a_timeout_halves_the_chunk() {
    let clock = Arc::new(FakeClock::default());
    let mut sim = SimPop::new(clock.clone()).script(|_, i| (i == 6).then_some(Fault::Timeout));
    // A slow link: 32 KiB/s.
    sim.bandwidth = (32 * KIB) as f64;
    sim.latency = Duration::from_millis(1);
    let pop = Arc::new(sim);
    let mut opts = options();
    opts.concurrency.initial = 1;
    opts.concurrency.adaptive = false;
    opts.chunks.initial = 256 * KIB;
    uploader(&pop, &clock, opts.clone())
        .upload(job(&data(8 * MIB as usize), &["http://pop"]))
        .await
        .unwrap();
    let calls = pop.calls();
    // 256 KiB at a measured 32 KiB/s takes 8 s: the deadline is 4x that, not a fixed value.
    let t = calls[1].timeout.as_secs_f64();
    assert!((31.0..=33.0).contains(&t), "{t}");
    // A bigger chunk gets proportionally more time.
    let big = calls.iter().find(|c| c.size == 512 * KIB).unwrap();
    assert!(
        big.timeout > calls[1].timeout * 2 - Duration::from_secs(1),
        "{big:?}"
    );
    assert_eq!(calls[6].size, MIB);
    assert_eq!(calls[7].size, 512 * KIB, "a timeout halves like a reset");
}

#[tokio::test]
async fn a_conflict_is_fatal_at_once() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(
        SimPop::new(clock.clone()).script(|_, _| Some(Fault::Status(409, "chunk_conflict"))),
    );
    let err = uploader(&pop, &clock, options())
        .upload(job(&data(MIB as usize), &["http://pop"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("chunk_conflict"), "{err}");
    assert_eq!(pop.calls().len(), 1);
}

#[tokio::test]
async fn server_errors_are_retried_and_shrink() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(
        SimPop::new(clock.clone())
            .script(|_, i| (i == 0).then_some(Fault::Status(503, "storage_error"))),
    );
    uploader(&pop, &clock, options())
        .upload(job(&data(MIB as usize), &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(sizes(&pop.calls(), 1)[..2], [MIB, 512 * KIB]);
}

#[tokio::test]
async fn a_stalled_chunk_is_abandoned_in_seconds_and_the_upload_goes_on() {
    let clock = Arc::new(FakeClock::default());
    // A slow link (64 KiB/s) where every third chunk stalls.
    let mut sim = SimPop::new(clock.clone()).script(|_, i| (i % 3 == 2).then_some(Fault::Stall));
    sim.bandwidth = (64 * KIB) as f64;
    sim.latency = Duration::from_millis(1);
    let pop = Arc::new(sim);
    let bytes = data(4 * MIB as usize);
    let mut opts = options();
    opts.concurrency.initial = 1;
    opts.concurrency.adaptive = false;
    opts.chunks.initial = 512 * KIB;
    let began = clock.now();
    uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls = pop.calls();
    let stalled: Vec<&Call> = calls
        .iter()
        .filter(|c| c.fault == Some(Fault::Stall))
        .collect();
    assert!(stalled.len() >= 2, "{calls:?}");
    for call in &stalled {
        // 64 KiB at 64 KiB/s takes 1 s: abandoned after 8 s, not after the
        // chunk's whole deadline (4x its transfer time, 32 s for 512 KiB).
        let stall = call.stall.as_secs_f64();
        assert!((7.9..=8.2).contains(&stall), "{call:?}");
        assert!(call.timeout > call.stall * 3, "{call:?}");
    }
    // A stall is a dead connection, not a sign the chunk was too big: the retry
    // sends the same chunk.
    let first = calls
        .iter()
        .position(|c| c.fault == Some(Fault::Stall))
        .unwrap();
    assert_eq!(calls[first + 1].size, calls[first].size);
    // The file's 64 s at 64 KiB/s, and per stall the stall time, the half chunk
    // lost and a backoff: not the 64 s whole deadline of a 1 MiB chunk.
    let took = clock.now() - began;
    let bound = Duration::from_secs(64)
        + stalled
            .iter()
            .map(|c| {
                c.stall
                    + Duration::from_secs_f64(c.size as f64 / 2.0 / (64 * KIB) as f64)
                    + Duration::from_secs(2)
            })
            .sum::<Duration>();
    assert!(took < bound, "{took:?} >= {bound:?}");
}

#[tokio::test]
async fn several_parts_go_at_once_within_the_limit() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    let bytes = data(32 * MIB as usize);
    let mut opts = options();
    opts.concurrency.max = 4;
    uploader(&pop, &clock, opts)
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let max = pop.max_in_flight.load(Ordering::SeqCst);
    assert!((2..=4).contains(&max), "{max}");
}

#[tokio::test]
async fn the_nearest_pop_is_chosen_and_a_failed_start_fails_over() {
    let clock = Arc::new(FakeClock::default());
    let mut sim = SimPop::new(clock.clone());
    sim.rtt = HashMap::from([
        ("http://far".to_string(), Duration::from_millis(120)),
        ("http://near".to_string(), Duration::from_millis(5)),
        ("http://mid".to_string(), Duration::from_millis(40)),
    ]);
    let pop = Arc::new(sim);
    let pops = ["http://far", "http://down", "http://near", "http://mid"];
    let report = uploader(&pop, &clock, options())
        .upload(job(&data(1000), &pops))
        .await
        .unwrap();
    assert_eq!(report.pop, "http://near");

    let mut sim = SimPop::new(clock.clone());
    sim.rtt = pop.rtt.clone();
    sim.refuse_start = HashSet::from(["http://near".to_string()]);
    let pop = Arc::new(sim);
    let report = uploader(&pop, &clock, options())
        .upload(job(&data(1000), &pops))
        .await
        .unwrap();
    assert_eq!(report.pop, "http://mid");
    assert_eq!(*pop.starts.lock().unwrap(), ["http://near", "http://mid"]);
}

#[tokio::test]
async fn an_interrupted_upload_resumes_without_resending_acknowledged_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::default());
    let bytes = data(20 * MIB as usize);
    // The first run dies (a fatal answer stands in for a kill) after 3 chunks,
    // some of the 20 MiB file's 4 or more.
    let pop = Arc::new(
        SimPop::new(clock.clone())
            .script(|_, i| (i >= 3).then_some(Fault::Status(400, "simulated_kill"))),
    );
    let mut opts = options();
    // One part at a time: the kill then falls between two chunks, deterministically.
    opts.concurrency.initial = 1;
    opts.concurrency.adaptive = false;
    let plan = ResumePlan {
        dir: StateDir::new(dir.path()),
        identity: FileIdentity {
            path: "/data/f.bin".into(),
            size: bytes.len() as u64,
            mtime_secs: 1,
            mtime_nanos: 0,
        },
        resume: true,
    };
    let mut first = job(&bytes, &["http://pop"]);
    first.resume = Some(plan.clone());
    assert!(uploader(&pop, &clock, opts).upload(first).await.is_err());
    let recorded = StateDir::load(&plan.dir.file_for(&plan.identity))
        .unwrap()
        .unwrap();
    let acked_before: u64 = recorded.acked_bytes();
    assert!(acked_before > 0);
    for (part, progress) in &recorded.parts {
        assert_eq!(
            progress.acked,
            pop.acked(*part),
            "the state matches the POP"
        );
    }

    // The second run, on the same simulated POP, now healthy.
    *pop.script.lock().unwrap() = Box::new(|_, _| None);
    let before = pop.calls().len();
    let mut second = job(&bytes, &["http://pop"]);
    second.resume = Some(plan.clone());
    let report = uploader(&pop, &clock, options())
        .upload(second)
        .await
        .unwrap();
    assert!(report.resumed);
    assert_eq!(report.skipped_bytes, acked_before);
    assert_eq!(report.sent_bytes, bytes.len() as u64 - acked_before);
    for call in &pop.calls()[before..] {
        let acked = recorded
            .parts
            .get(&call.part)
            .map(|p| p.acked.clone())
            .unwrap_or_default();
        assert_eq!(
            acked.overlap(call.offset, call.offset + call.size),
            0,
            "{call:?} re-sent"
        );
    }
    assert_eq!(pop.file(), bytes.to_vec());
    assert_eq!(
        *pop.starts.lock().unwrap(),
        ["http://pop"],
        "no second start"
    );
    assert!(
        !plan.dir.file_for(&plan.identity).exists(),
        "state removed when done"
    );
}

fn median_late_size(calls: &[Call]) -> u64 {
    let mut late: Vec<u64> = calls[calls.len() / 2..].iter().map(|c| c.size).collect();
    late.sort_unstable();
    late[late.len() / 2]
}

#[tokio::test]
async fn random_request_failures_do_not_drive_chunks_to_the_floor() {
    use rand::{Rng, SeedableRng};
    let clock = Arc::new(FakeClock::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // 30 % of requests fail whatever their size: smaller chunks would not help.
    let pop = Arc::new(
        SimPop::new(clock.clone()).script(move |_, _| rng.gen_bool(0.3).then_some(Fault::Reset)),
    );
    let bytes = data(32 * MIB as usize);
    uploader(&pop, &clock, options())
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls = pop.calls();
    let median = median_late_size(&calls);
    eprintln!("{} calls, late median chunk {median}", calls.len());
    assert!(
        median >= 512 * KIB,
        "chunks collapsed: median {median} over {} calls",
        calls.len()
    );
}

#[tokio::test]
async fn a_link_that_breaks_with_the_bytes_sent_gets_small_chunks() {
    use rand::{Rng, SeedableRng};
    let clock = Arc::new(FakeClock::default());
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    // The link breaks every 512 KiB on average: big chunks rarely make it.
    let pop = Arc::new(SimPop::new(clock.clone()).script(move |call, _| {
        let p = 1.0 - (-(call.size as f64) / (512 * KIB) as f64).exp();
        rng.gen_bool(p).then_some(Fault::Reset)
    }));
    let bytes = data(16 * MIB as usize);
    uploader(&pop, &clock, options())
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    let calls = pop.calls();
    let median = median_late_size(&calls);
    eprintln!("{} calls, late median chunk {median}", calls.len());
    assert!(median <= 256 * KIB, "median {median}");
}

fn full_disk(retry_after: Option<u64>) -> TransportError {
    TransportError::Status {
        status: 507,
        code: "insufficient_storage".into(),
        message: "this POP is short of disk space".into(),
        retry_after: retry_after.map(Duration::from_secs),
    }
}

#[tokio::test]
async fn a_full_pop_is_waited_for_as_its_retry_after_says() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    pop.start_errors
        .lock()
        .unwrap()
        .extend([full_disk(Some(5)), full_disk(Some(5))]);
    let bytes = data(1000);
    let report = uploader(&pop, &clock, options())
        .upload(job(&bytes, &["http://pop"]))
        .await
        .unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    assert_eq!(
        *pop.starts.lock().unwrap(),
        ["http://pop", "http://pop", "http://pop"]
    );
    // Exactly as long as asked, twice.
    assert_eq!(
        clock.sleeps.lock().unwrap()[..2],
        [Duration::from_secs(5), Duration::from_secs(5)]
    );
    assert_eq!(report.handle, "HANDLE");
}

#[tokio::test]
async fn a_refusal_without_retry_after_or_past_the_deadline_is_final() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    pop.start_errors.lock().unwrap().push_back(full_disk(None));
    let err = uploader(&pop, &clock, options())
        .upload(job(&data(10), &["http://pop"]))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::AllPopsFailed(_)), "{err}");
    assert_eq!(pop.starts.lock().unwrap().len(), 1);

    // Always full: retried until the deadline, then given up.
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    pop.start_errors
        .lock()
        .unwrap()
        .extend((0..100).map(|_| full_disk(Some(30))));
    let mut opts = options();
    opts.retry_deadline = Duration::from_secs(100);
    let err = uploader(&pop, &clock, opts)
        .upload(job(&data(10), &["http://pop"]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), "insufficient_storage", "{err}");
    let starts = pop.starts.lock().unwrap().len();
    assert!(
        (4..=6).contains(&starts),
        "{starts} starts within 100 s at 30 s each"
    );
    assert!(clock.now() <= Duration::from_secs(101), "{:?}", clock.now());
}

#[tokio::test]
async fn a_chunk_refused_with_retry_after_waits_that_long_and_keeps_its_size() {
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()).script(|_, i| {
        (i == 0).then_some(Fault::StatusRetryAfter(
            507,
            "insufficient_storage",
            Duration::from_secs(7),
        ))
    }));
    let bytes = data(2 * MIB as usize);
    let uploader = Uploader::new(pop.clone(), clock.clone(), options(), Arc::new(Quiet));
    uploader.upload(job(&bytes, &["http://pop"])).await.unwrap();
    assert_eq!(pop.file(), bytes.to_vec());
    assert!(clock
        .sleeps
        .lock()
        .unwrap()
        .contains(&Duration::from_secs(7)));
    let calls = pop.calls();
    assert_eq!(calls[0].size, calls[1].size, "the chunk kept its size");
}

#[tokio::test]
async fn a_completed_upload_is_not_uploaded_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    let bytes = data(3000);
    let plan = ResumePlan {
        dir: StateDir::new(dir.path()),
        identity: FileIdentity {
            path: "/data/done.bin".into(),
            size: bytes.len() as u64,
            mtime_secs: 1,
            mtime_nanos: 0,
        },
        resume: false,
    };
    let mut first = job(&bytes, &["http://pop"]);
    first.resume = Some(plan.clone());
    let done = uploader(&pop, &clock, options())
        .upload(first)
        .await
        .unwrap();
    assert!(!done.already_uploaded);

    let mut again = job(&bytes, &["http://pop"]);
    again.resume = Some(ResumePlan {
        resume: true,
        ..plan.clone()
    });
    let before = pop.calls().len();
    let report = uploader(&pop, &clock, options())
        .upload(again)
        .await
        .unwrap();
    assert!(report.already_uploaded);
    assert_eq!(report.handle, done.handle);
    assert_eq!(report.url, done.url);
    assert_eq!(pop.calls().len(), before, "nothing sent");
    assert_eq!(pop.starts.lock().unwrap().len(), 1, "no second start");

    // The same path with other contents is another file: uploaded anew.
    let mut changed = job(&data(3001), &["http://pop"]);
    changed.resume = Some(ResumePlan {
        resume: true,
        identity: FileIdentity {
            size: 3001,
            ..plan.identity.clone()
        },
        ..plan
    });
    let report = uploader(&pop, &clock, options())
        .upload(changed)
        .await
        .unwrap();
    assert!(!report.already_uploaded);
    assert_eq!(pop.starts.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn a_completed_upload_whose_file_is_gone_is_uploaded_again_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(FakeClock::default());
    let pop = Arc::new(SimPop::new(clock.clone()));
    let bytes = data(3000);
    let plan = ResumePlan {
        dir: StateDir::new(dir.path()),
        identity: FileIdentity {
            path: "/data/gone.bin".into(),
            size: bytes.len() as u64,
            mtime_secs: 1,
            mtime_nanos: 0,
        },
        resume: false,
    };
    let mut first = job(&bytes, &["http://pop"]);
    first.resume = Some(plan.clone());
    uploader(&pop, &clock, options())
        .upload(first)
        .await
        .unwrap();

    // Deleted on the POP since: the record of its upload no longer holds.
    *pop.file_status.lock().unwrap() = "Deleted";
    let mut again = job(&bytes, &["http://pop"]);
    again.resume = Some(ResumePlan {
        resume: true,
        ..plan
    });
    let report = uploader(&pop, &clock, options())
        .upload(again)
        .await
        .unwrap();
    assert!(!report.already_uploaded);
    assert_eq!(report.sent_bytes, bytes.len() as u64);
    assert_eq!(pop.starts.lock().unwrap().len(), 2, "a second start");
}
