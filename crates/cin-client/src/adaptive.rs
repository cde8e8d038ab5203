//! The adaptive pieces of intelligent ingestion, as small state machines with no I/O
//! so each rule is unit-tested on its own: chunk sizing, backoff, request timeouts
//! and the number of parts in flight.

use std::time::Duration;

use rand::Rng;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// How chunk sizes move.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkPolicy {
    /// First chunk size when neither the POP nor an earlier part suggested one.
    /// The part size: a chunk that breaks loses nothing (the POP keeps its
    /// checked blocks, whatever ended it), while each request is one more
    /// chance to meet a dead connection.
    pub initial: u64,
    /// Chunks never shrink below this (filestack's FII floor: 32 KiB).
    pub floor: u64,
    /// Chunks never grow above this (the part size).
    pub ceiling: u64,
    /// Halve on failures and double after successes; `false` keeps `initial` forever.
    pub adaptive: bool,
    /// Consecutive acknowledged chunks before the size doubles.
    pub grow_after: u32,
    /// Start from, and never exceed, the POP's `chunk_size_hint`. Off by
    /// default: the hint keeps chunks small enough that a lost one costs
    /// little, but `cin`'s chunks lose nothing when they break (the POP keeps
    /// their checked blocks), and on a link where requests die at random the
    /// smaller chunks only mean more requests to die.
    pub follow_hint: bool,
    /// Once a chunk's throughput is measured, chunks grow at once to what the
    /// connection carries in this long: every request is a chance to meet a
    /// dead connection, so the link is known to carry the bigger size, the
    /// fewer requests the better. Doubling streaks cover the rest.
    pub target_time: Duration,
}

impl Default for ChunkPolicy {
    fn default() -> Self {
        ChunkPolicy {
            initial: 8 * MIB,
            floor: 32 * KIB,
            ceiling: 8 * MIB,
            adaptive: true,
            grow_after: 3,
            follow_hint: false,
            target_time: Duration::from_secs(2),
        }
    }
}

/// The chunk size of one part. Each part owns one, so a part stuck on a bad
/// connection shrinks without dragging the others down.
#[derive(Debug, Clone)]
pub struct ChunkSizer {
    policy: ChunkPolicy,
    current: u64,
    hint: Option<u64>,
    streak: u32,
    failed: bool,
}

impl ChunkSizer {
    /// `seed` is where an earlier part left off; `hint` the POP's last hint.
    pub fn new(policy: ChunkPolicy, seed: Option<u64>, hint: Option<u64>) -> Self {
        let hint = hint.filter(|_| policy.follow_hint);
        let start = seed.or(hint).unwrap_or(policy.initial);
        let mut sizer = ChunkSizer {
            policy,
            current: start,
            hint,
            streak: 0,
            failed: false,
        };
        sizer.current = sizer.clamp(start);
        sizer
    }

    pub fn current(&self) -> u64 {
        self.current
    }

    pub fn at_floor(&self) -> bool {
        self.current <= self.policy.floor
    }

    /// The largest size allowed now: the part size, lowered by the POP's hint.
    pub fn ceiling(&self) -> u64 {
        let ceiling = match self.hint {
            Some(hint) => self.policy.ceiling.min(hint),
            None => self.policy.ceiling,
        };
        ceiling.max(self.policy.floor)
    }

    fn clamp(&self, size: u64) -> u64 {
        size.clamp(self.policy.floor.min(self.ceiling()), self.ceiling())
    }

    pub fn on_success(&mut self, hint: Option<u64>) {
        if let Some(hint) = hint.filter(|&h| h > 0 && self.policy.follow_hint) {
            let first = self.hint.is_none();
            self.hint = Some(hint);
            // The first hint is the POP's opinion of a good size: start from it,
            // unless this part already learnt the link is worse than that.
            if first && !self.failed {
                self.current = hint;
            }
        }
        self.current = self.clamp(self.current);
        if !self.policy.adaptive {
            return;
        }
        self.streak += 1;
        if self.streak >= self.policy.grow_after {
            self.streak = 0;
            self.current = self.clamp(self.current.saturating_mul(2));
        }
    }

    /// A chunk was acknowledged at `rate` bytes per second: grows to what the
    /// connection carries in the target time. Only for links where no failure
    /// said size matters (see [`FailureStats::any_failed`]): there, halving and
    /// doubling streaks find the size instead.
    pub fn on_rate(&mut self, rate: f64) {
        if !self.policy.adaptive || !rate.is_finite() {
            return;
        }
        let carried = (rate * self.policy.target_time.as_secs_f64()).min(u64::MAX as f64) as u64;
        self.current = self.clamp(self.current.max(carried));
    }

    /// Doubles the size at once (within the ceiling), whatever the streak.
    pub fn grow(&mut self) {
        if self.policy.adaptive {
            self.streak = 0;
            self.current = self.clamp(self.current.saturating_mul(2));
        }
    }

    pub fn on_failure(&mut self) {
        self.streak = 0;
        self.failed = true;
        if self.policy.adaptive {
            self.current = self.clamp(self.current / 2);
        }
    }

    /// A failure that smaller chunks would not have avoided: the streak restarts,
    /// the size stays.
    pub fn on_failure_kept(&mut self) {
        self.streak = 0;
        self.failed = true;
    }
}

/// Attempts and failures by chunk size (power-of-two classes), to tell a link that
/// breaks with the bytes sent (half-size chunks fail less: halving pays) from
/// one that fails requests whatever their size (halving only adds overhead).
#[derive(Debug, Clone, Default)]
pub struct FailureStats {
    /// log2(size) -> (attempts, failures), decayed so old samples fade.
    classes: std::collections::BTreeMap<u32, (f64, f64)>,
}

impl FailureStats {
    /// Samples a size class needs before its failure rate is trusted.
    const MIN_SAMPLES: f64 = 8.0;
    /// Beyond this many samples per class, older ones weigh less.
    const WINDOW: f64 = 64.0;
    /// Half-size chunks must fail at most this share as often for halving to pay.
    const MARGIN: f64 = 0.75;

    fn class(size: u64) -> u32 {
        63 - size.max(1).leading_zeros()
    }

    pub fn record(&mut self, size: u64, failed: bool) {
        let (attempts, failures) = self.classes.entry(Self::class(size)).or_default();
        if *attempts >= Self::WINDOW {
            *attempts *= 0.5;
            *failures *= 0.5;
        }
        *attempts += 1.0;
        if failed {
            *failures += 1.0;
        }
    }

    /// Whether any chunk failed in a way a smaller one might have avoided.
    pub fn any_failed(&self) -> bool {
        self.classes.values().any(|&(_, failures)| failures > 0.0)
    }

    /// Whether chunks smaller than `size` fail markedly less often than chunks
    /// of its size and above. Classes are pooled on each side, so a part that
    /// shrank into sizes nobody tried yet still learns from the rest. Without
    /// enough samples on both sides the answer is yes: halving is the safe default.
    pub fn halving_helps(&self, size: u64) -> bool {
        let class = Self::class(size);
        let pooled = |range: &mut dyn Iterator<Item = (&u32, &(f64, f64))>| {
            range.fold((0.0, 0.0), |(a, f), (_, &(ca, cf))| (a + ca, f + cf))
        };
        let (a1, f1) = pooled(&mut self.classes.range(class..));
        let (a0, f0) = pooled(&mut self.classes.range(..class));
        if a1 < Self::MIN_SAMPLES || a0 < Self::MIN_SAMPLES {
            return true;
        }
        f0 / a0 < Self::MARGIN * (f1 / a1)
    }
}

/// Exponential backoff with full jitter (AWS architecture blog's "Full Jitter"):
/// retries of many clients spread out instead of arriving in waves.
#[derive(Debug, Clone, PartialEq)]
pub struct BackoffPolicy {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(20),
        }
    }
}

impl BackoffPolicy {
    /// Upper bound of the wait after the `attempt`-th consecutive failure (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(30));
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// A uniformly random wait in `[0, ceiling(attempt)]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        if ceiling.is_zero() {
            return ceiling;
        }
        Duration::from_nanos(rng.gen_range(0..=ceiling.as_nanos().min(u64::MAX as u128) as u64))
    }
}

/// Per-request deadlines from measured throughput. A chunk's whole exchange gets
/// `factor` times the time it should take, never less than `min` (so a short
/// stall or a slow fsync is not a failure) and never more than `max`. Within it,
/// a body that makes no progress for the stall time is abandoned at once: that
/// is how a dead connection (no reset, no answer) shows, and waiting for the
/// whole deadline would stop the upload for minutes.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeoutPolicy {
    pub min: Duration,
    pub max: Duration,
    pub factor: f64,
    /// Bytes per second assumed before anything was measured. Optimistic: a
    /// first chunk cut short on a slower link is retried with doubled
    /// patience (see [`TimeoutPolicy::deadlines`]), while a pessimistic guess
    /// would leave the first dead connection of every part undetected for long.
    pub assumed_rate: f64,
    /// The stall time is `stall_factor` times what one body piece
    /// ([`PROGRESS_PIECE`] bytes) should take, within these bounds.
    pub stall_min: Duration,
    pub stall_max: Duration,
    pub stall_factor: f64,
    /// How long an answer may take once the request is sent (the POP makes the
    /// chunk durable before it answers), before any answer was timed. Once a
    /// body is handed to the connection, up to all of it may still sit in
    /// socket buffers: the time to send it at the measured rate is allowed on top.
    pub answer: Duration,
    /// Once answers were timed ([`AnswerWait`]): `answer_factor` times the
    /// typical wait, at least `answer_min`. A dead connection then shows in
    /// about a second or two on a healthy link, not in `answer` plus the drain.
    pub answer_min: Duration,
    pub answer_factor: f64,
    /// How long a chunk's sent bytes may go unacknowledged by the peer before
    /// its connection is dead (`TCP_USER_TIMEOUT`). A healthy path acknowledges
    /// within a round trip or a retransmission or two; a dead one never does,
    /// and only the kernel sees that before the socket buffers fill.
    pub unacknowledged: Duration,
}

/// Dead connections in a row after which a chunk goes without the kernel's
/// limit on unacknowledged bytes. Where a third of connections die by chance,
/// five in a row happen to one chunk in 400; a link that holds its bytes for
/// seconds gets there after about ten seconds of tries.
pub const KERNEL_LIMIT_LIFTED_AFTER: u32 = 5;

/// Bytes handed to the connection at a time; each one taken is progress.
pub const PROGRESS_PIECE: u64 = 64 * KIB;

impl Default for TimeoutPolicy {
    fn default() -> Self {
        TimeoutPolicy {
            min: Duration::from_secs(10),
            max: Duration::from_secs(600),
            factor: 4.0,
            assumed_rate: MIB as f64,
            stall_min: Duration::from_secs(3),
            stall_max: Duration::from_secs(30),
            stall_factor: 8.0,
            answer: Duration::from_secs(3),
            answer_min: Duration::from_millis(1500),
            answer_factor: 4.0,
            unacknowledged: Duration::from_secs(1),
        }
    }
}

/// The deadlines of one chunk exchange; see [`TimeoutPolicy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChunkDeadlines {
    /// The whole exchange.
    pub total: Duration,
    /// Longest time the body may go without progress.
    pub stall: Duration,
    /// Longest wait for an answer once a request's body is handed over.
    pub answer: Duration,
    /// How long the kernel lets sent bytes go unacknowledged before it ends the
    /// connection (`TCP_USER_TIMEOUT`). It grows like the deadlines above and is
    /// lifted (`None`) once this chunk's connections died
    /// [`KERNEL_LIMIT_LIFTED_AFTER`] times in a row: on a link whose queues hold
    /// seconds of data, only the deadlines above can let it through.
    pub kernel_limit: Option<Duration>,
}

impl TimeoutPolicy {
    pub fn for_chunk(&self, bytes: u64, measured_rate: Option<f64>) -> Duration {
        let rate = measured_rate.unwrap_or(self.assumed_rate).max(1.0);
        let secs = self.factor * bytes as f64 / rate;
        Duration::from_secs_f64(secs.min(self.max.as_secs_f64())).clamp(self.min, self.max)
    }

    /// How long a body may go without progress at `measured_rate`.
    pub fn stall(&self, measured_rate: Option<f64>) -> Duration {
        let rate = measured_rate.unwrap_or(self.assumed_rate).max(1.0);
        let secs = self.stall_factor * PROGRESS_PIECE as f64 / rate;
        Duration::from_secs_f64(secs.min(self.stall_max.as_secs_f64()))
            .clamp(self.stall_min, self.stall_max)
    }

    /// The deadlines of a chunk of `bytes`. `stalls_in_row` is how many times
    /// in a row this chunk's connection went dead: each after the first adds
    /// half to every deadline, so deadlines that turn out too tight (a link
    /// slower than measured) cannot fail the same chunk for ever, while a link
    /// whose connections just die now and then keeps finding out quickly.
    pub fn deadlines(
        &self,
        bytes: u64,
        measured_rate: Option<f64>,
        answers: &AnswerWait,
        stalls_in_row: u32,
    ) -> ChunkDeadlines {
        let total = self.for_chunk(bytes, measured_rate);
        // Most dead connections are chance: the first retry keeps the deadlines.
        let patience = 1.5f64.powi(stalls_in_row.saturating_sub(1).min(16) as i32);
        let kernel_limit = (stalls_in_row < KERNEL_LIMIT_LIFTED_AFTER)
            .then(|| self.unacknowledged.mul_f64(patience));
        // Under the kernel's limit, bytes still in buffers are the kernel's to
        // watch: the answer is only the POP's fsync and a round trip away, as
        // for any chunk, so a bigger chunk is not given longer.
        let timed = match kernel_limit {
            Some(_) => answers.expected(0),
            None => answers.expected(bytes),
        };
        let answer = match timed {
            Some(typical) => typical.mul_f64(self.answer_factor).max(self.answer_min),
            None => {
                let rate = measured_rate.unwrap_or(self.assumed_rate).max(1.0);
                self.answer
                    + Duration::from_secs_f64((bytes as f64 / rate).min(self.max.as_secs_f64()))
            }
        };
        let total = total.mul_f64(patience).min(self.max);
        let stall = self.stall(measured_rate);
        ChunkDeadlines {
            total,
            stall: stall
                .mul_f64(patience)
                .min(self.stall_max.max(stall))
                .min(total),
            answer: answer.mul_f64(patience).min(total),
            kernel_limit,
        }
    }
}

/// How long answers took once a chunk's body was all handed to the connection:
/// the POP's fsync, a round trip, and the bytes still in socket buffers.
/// Smoothed over every part (they share the link and the POP), with the sizes
/// of the chunks they were timed on smoothed alike.
#[derive(Debug, Clone, Default)]
pub struct AnswerWait {
    /// Seconds, and bytes per chunk.
    typical: Option<(f64, f64)>,
}

impl AnswerWait {
    const WEIGHT: f64 = 0.3;

    /// Starts from the time a small control call took, taken as the answer
    /// wait of a chunk of `bytes` (a chunk also waits for its fsync, and for
    /// what sits in buffers: the factor and floor of the deadline cover that).
    pub fn seeded(control_call: Option<Duration>, bytes: u64) -> Self {
        AnswerWait {
            typical: control_call.map(|took| (took.as_secs_f64(), bytes.max(1) as f64)),
        }
    }

    pub fn observe(&mut self, bytes: u64, wait: Duration) {
        let (secs, bytes) = (wait.as_secs_f64(), bytes.max(1) as f64);
        self.typical = Some(match self.typical {
            Some((old_secs, old_bytes)) => (
                old_secs + Self::WEIGHT * (secs - old_secs),
                old_bytes + Self::WEIGHT * (bytes - old_bytes),
            ),
            None => (secs, bytes),
        });
    }

    /// The wait to expect for a chunk of `bytes`: scaled up for a bigger chunk
    /// than those timed (more of it may sit in buffers), never down.
    pub fn expected(&self, bytes: u64) -> Option<Duration> {
        let (secs, timed_bytes) = self.typical?;
        let scale = (bytes as f64 / timed_bytes).max(1.0);
        Some(Duration::from_secs_f64((secs * scale).min(3600.0)))
    }
}

/// Exponentially weighted throughput of acknowledged chunks, in bytes per second.
#[derive(Debug, Clone, Default)]
pub struct Throughput {
    rate: Option<f64>,
}

impl Throughput {
    const WEIGHT: f64 = 0.3;

    /// Starts from an earlier measurement (another part's) when there is one.
    pub fn starting_at(rate: Option<f64>) -> Self {
        Throughput { rate }
    }

    pub fn observe(&mut self, bytes: u64, elapsed: Duration) {
        // Sub-millisecond exchanges say more about timer resolution than the link.
        let secs = elapsed.as_secs_f64().max(0.001);
        let sample = bytes as f64 / secs;
        self.rate = Some(match self.rate {
            Some(rate) => rate + Self::WEIGHT * (sample - rate),
            None => sample,
        });
    }

    pub fn rate(&self) -> Option<f64> {
        self.rate
    }
}

/// How many parts go at once.
#[derive(Debug, Clone, PartialEq)]
pub struct ConcurrencyPolicy {
    pub initial: usize,
    pub max: usize,
    /// Adapt to goodput; `false` keeps `initial`.
    pub adaptive: bool,
}

impl Default for ConcurrencyPolicy {
    fn default() -> Self {
        ConcurrencyPolicy {
            initial: 3,
            max: 6,
            adaptive: true,
        }
    }
}

/// AIMD on goodput: one more part in flight while that raises goodput, half as
/// many when requests time out (the link is saturated). A window whose goodput
/// fell only holds the number: dead connections make goodput fall too, and
/// fewer parts would leave the link idler while they are found out.
#[derive(Debug, Clone)]
pub struct Concurrency {
    policy: ConcurrencyPolicy,
    current: usize,
    previous: Option<f64>,
}

impl Concurrency {
    pub fn new(policy: ConcurrencyPolicy) -> Self {
        let current = policy.initial.clamp(1, policy.max.max(1));
        Concurrency {
            policy,
            current,
            previous: None,
        }
    }

    pub fn limit(&self) -> usize {
        self.current
    }

    /// A measurement window ended with `goodput` acknowledged bytes per second,
    /// during which `timeouts` requests timed out.
    pub fn on_window(&mut self, goodput: f64, timeouts: u32) {
        if !self.policy.adaptive {
            return;
        }
        let max = self.policy.max.max(1);
        match self.previous {
            _ if timeouts > 0 => self.current = (self.current / 2).max(1),
            // A plateau or a fall: more parts would not help.
            Some(prev) if goodput < prev * 1.05 => {}
            _ => self.current = (self.current + 1).min(max),
        }
        self.previous = Some(goodput);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    /// The default policy starting from 1 MiB, so that halving and doubling
    /// both show.
    fn small_start() -> ChunkPolicy {
        ChunkPolicy {
            initial: MIB,
            ..ChunkPolicy::default()
        }
    }

    fn sizer() -> ChunkSizer {
        ChunkSizer::new(small_start(), None, None)
    }

    #[test]
    fn starts_at_the_part_size_without_a_hint() {
        let default = ChunkSizer::new(ChunkPolicy::default(), None, None);
        assert_eq!(default.current(), 8 * MIB);
    }

    #[test]
    fn halves_on_each_failure_down_to_the_floor() {
        let mut s = sizer();
        let mut seen = vec![s.current()];
        for _ in 0..10 {
            s.on_failure();
            seen.push(s.current());
        }
        assert_eq!(
            seen[..7],
            [
                MIB,
                512 * KIB,
                256 * KIB,
                128 * KIB,
                64 * KIB,
                32 * KIB,
                32 * KIB
            ]
        );
        assert!(s.at_floor());
        assert_eq!(s.current(), 32 * KIB);
    }

    #[test]
    fn doubles_after_consecutive_successes_up_to_the_part_size() {
        let mut s = sizer();
        s.on_failure(); // 512 KiB
        s.on_success(None);
        s.on_success(None);
        assert_eq!(s.current(), 512 * KIB, "two successes are not enough");
        s.on_success(None);
        assert_eq!(s.current(), MIB);
        for _ in 0..30 {
            s.on_success(None);
        }
        assert_eq!(s.current(), 8 * MIB);
    }

    #[test]
    fn a_measured_rate_grows_chunks_to_the_target_time() {
        let mut s = sizer();
        s.on_success(None);
        s.on_rate(2.0 * MIB as f64);
        assert_eq!(s.current(), 4 * MIB, "2 s at 2 MiB/s");
        s.on_rate(100.0 * MIB as f64);
        assert_eq!(s.current(), 8 * MIB, "never above the part size");
        s.on_rate(KIB as f64);
        assert_eq!(s.current(), 8 * MIB, "a slow chunk does not shrink");
        let mut hinted = ChunkSizer::new(hinted_policy(), None, None);
        hinted.on_success(Some(2 * MIB));
        hinted.on_rate(100.0 * MIB as f64);
        assert_eq!(hinted.current(), 2 * MIB, "never above a followed hint");
    }

    fn hinted_policy() -> ChunkPolicy {
        ChunkPolicy {
            follow_hint: true,
            ..small_start()
        }
    }

    #[test]
    fn a_failure_breaks_the_success_streak() {
        let mut s = sizer();
        s.on_success(None);
        s.on_success(None);
        s.on_failure();
        s.on_success(None);
        s.on_success(None);
        assert_eq!(s.current(), 512 * KIB);
    }

    #[test]
    fn the_hint_is_the_start_and_the_ceiling() {
        let mut s = ChunkSizer::new(hinted_policy(), None, None);
        s.on_success(Some(2 * MIB));
        assert_eq!(s.current(), 2 * MIB, "starts from the first hint");
        for _ in 0..20 {
            s.on_success(Some(2 * MIB));
        }
        assert_eq!(s.current(), 2 * MIB, "never above the hint");
        let seeded = ChunkSizer::new(hinted_policy(), None, Some(256 * KIB));
        assert_eq!(seeded.current(), 256 * KIB);
        assert_eq!(seeded.ceiling(), 256 * KIB);
        let unfollowed = ChunkSizer::new(ChunkPolicy::default(), None, Some(256 * KIB));
        assert_eq!(
            unfollowed.ceiling(),
            8 * MIB,
            "cin does not follow hints by default"
        );
    }

    #[test]
    fn a_part_that_failed_does_not_jump_to_the_hint() {
        let mut s = sizer();
        s.on_failure();
        s.on_success(Some(4 * MIB));
        assert_eq!(s.current(), 512 * KIB);
    }

    #[test]
    fn fixed_policy_never_moves() {
        let policy = ChunkPolicy {
            initial: 8 * MIB,
            adaptive: false,
            follow_hint: false,
            ..Default::default()
        };
        let mut s = ChunkSizer::new(policy, None, Some(MIB));
        s.on_failure();
        s.on_success(Some(MIB));
        assert_eq!(s.current(), 8 * MIB);
    }

    #[test]
    fn failures_that_grow_with_size_say_halve_and_random_ones_say_hold() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // A link breaking every 2 MiB on average: failure odds grow with size.
        let mut link = FailureStats::default();
        // Requests failing 30 % of the time whatever their size.
        let mut random = FailureStats::default();
        for _ in 0..64 {
            for size in [512 * KIB, MIB] {
                let p = 1.0 - (-(size as f64) / (2 * MIB) as f64).exp();
                link.record(size, rng.gen_bool(p));
                random.record(size, rng.gen_bool(0.3));
            }
        }
        assert!(link.halving_helps(MIB));
        assert!(!random.halving_helps(MIB));
        // Too few samples of the smaller size: halve, the safe default.
        assert!(random.halving_helps(2 * MIB));
        assert!(FailureStats::default().halving_helps(MIB));
    }

    #[test]
    fn backoff_ceilings_grow_exponentially_to_the_cap() {
        let b = BackoffPolicy {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(7), Duration::from_secs(5));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn backoff_jitter_stays_within_bounds_and_spreads() {
        let b = BackoffPolicy::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for attempt in 1..12 {
            let delays: Vec<Duration> = (0..200).map(|_| b.delay(attempt, &mut rng)).collect();
            let ceiling = b.ceiling(attempt);
            assert!(delays.iter().all(|d| *d <= ceiling));
            // Full jitter: both halves of the range get used.
            assert!(delays.iter().any(|d| *d < ceiling / 2));
            assert!(delays.iter().any(|d| *d > ceiling / 2));
        }
    }

    #[test]
    fn timeouts_follow_throughput_and_chunk_size_within_bounds() {
        let t = TimeoutPolicy::default();
        assert_eq!(t.for_chunk(32 * KIB, Some(100.0 * MIB as f64)), t.min);
        // 8 MiB at 64 KiB/s takes 128 s; four times that is 512 s.
        assert_eq!(
            t.for_chunk(8 * MIB, Some(64.0 * KIB as f64)),
            Duration::from_secs(512)
        );
        assert!(
            t.for_chunk(2 * MIB, Some(64.0 * KIB as f64))
                < t.for_chunk(4 * MIB, Some(64.0 * KIB as f64))
        );
        assert_eq!(t.for_chunk(8 * MIB, Some(1.0)), t.max);
        // Unmeasured: 8 MiB at the assumed 1 MiB/s, x4.
        assert_eq!(t.for_chunk(8 * MIB, None), Duration::from_secs(32));
    }

    #[test]
    fn stalls_are_detected_in_seconds_whatever_the_chunk() {
        let t = TimeoutPolicy::default();
        // A fast link: the floor.
        assert_eq!(t.stall(Some(40.0 * MIB as f64)), t.stall_min);
        // 64 KiB at 64 KiB/s takes 1 s; eight times that.
        assert_eq!(t.stall(Some(64.0 * KIB as f64)), Duration::from_secs(8));
        assert_eq!(t.stall(Some(1.0)), t.stall_max);
        // However big the chunk, a stall is found long before its whole deadline.
        let d = t.deadlines(8 * MIB, Some(64.0 * KIB as f64), &AnswerWait::default(), 0);
        assert_eq!(d.total, Duration::from_secs(512));
        assert_eq!(d.stall, Duration::from_secs(8));
    }

    #[test]
    fn once_answers_were_timed_a_dead_connection_shows_in_a_few_of_them() {
        let t = TimeoutPolicy::default();
        let rate = Some(10.0 * MIB as f64);
        // Nothing timed yet: the fixed allowance plus the time to drain the chunk.
        let blind = t.deadlines(8 * MIB, rate, &AnswerWait::default(), 0);
        assert_eq!(blind.answer, t.answer + Duration::from_secs_f64(0.8));
        let mut answers = AnswerWait::default();
        answers.observe(8 * MIB, Duration::from_millis(800));
        let timed = t.deadlines(8 * MIB, rate, &answers, 0);
        let typical = Duration::from_millis(800);
        assert_eq!(timed.answer, typical.mul_f64(t.answer_factor));
        // Under the kernel's limit a bigger chunk than the one timed waits as
        // long; without it, more of it may sit in buffers, and it waits longer.
        assert_eq!(
            t.deadlines(16 * MIB, rate, &answers, 0).answer,
            timed.answer
        );
        let patient = t.deadlines(16 * MIB, rate, &answers, KERNEL_LIMIT_LIFTED_AFTER);
        let patience = 1.5f64.powi(KERNEL_LIMIT_LIFTED_AFTER as i32 - 1);
        assert_eq!(
            patient.answer,
            typical.mul_f64(2.0 * t.answer_factor * patience)
        );
        // A start call's time stands in until a chunk was timed.
        let seeded = AnswerWait::seeded(Some(typical), 8 * MIB);
        assert_eq!(t.deadlines(8 * MIB, rate, &seeded, 0).answer, timed.answer);
        // A small chunk timed after big ones does not make the next big one
        // look many times slower: the sizes are smoothed with the waits.
        let mut mixed = answers.clone();
        mixed.observe(MIB, Duration::from_millis(700));
        let expected = mixed.expected(8 * MIB).unwrap_or_default();
        assert!(expected < Duration::from_millis(1200), "{expected:?}");
        let mut quick = AnswerWait::default();
        quick.observe(8 * MIB, Duration::from_millis(10));
        assert_eq!(t.deadlines(MIB, rate, &quick, 0).answer, t.answer_min);
    }

    #[test]
    fn each_stall_in_a_row_after_the_first_adds_half_to_the_patience_within_bounds() {
        let t = TimeoutPolicy::default();
        let rate = Some(10.0 * MIB as f64);
        let mut answers = AnswerWait::default();
        answers.observe(MIB, Duration::from_millis(500));
        let first = t.deadlines(MIB, rate, &answers, 0);
        assert_eq!(t.deadlines(MIB, rate, &answers, 1), first);
        let third = t.deadlines(MIB, rate, &answers, 2);
        assert_eq!(third.answer, first.answer.mul_f64(1.5));
        assert_eq!(third.stall, first.stall.mul_f64(1.5));
        assert_eq!(third.total, first.total.mul_f64(1.5));
        assert_eq!(first.kernel_limit, Some(t.unacknowledged));
        assert_eq!(third.kernel_limit, Some(t.unacknowledged.mul_f64(1.5)));
        let last = t.deadlines(MIB, rate, &answers, KERNEL_LIMIT_LIFTED_AFTER - 1);
        assert_eq!(
            last.kernel_limit,
            Some(t.unacknowledged.mul_f64(1.5f64.powi(3)))
        );
        let lifted = t.deadlines(MIB, rate, &answers, KERNEL_LIMIT_LIFTED_AFTER);
        assert_eq!(lifted.kernel_limit, None);
        let many = t.deadlines(MIB, rate, &answers, 40);
        assert!(many.stall <= t.stall_max);
        assert!(many.answer <= many.total);
    }

    #[test]
    fn throughput_is_smoothed() {
        let mut tp = Throughput::default();
        assert_eq!(tp.rate(), None);
        tp.observe(MIB, Duration::from_secs(1));
        assert_eq!(tp.rate(), Some(MIB as f64));
        tp.observe(2 * MIB, Duration::from_secs(1));
        let rate = tp.rate().unwrap_or_default();
        assert!(rate > MIB as f64 && rate < 2.0 * MIB as f64);
    }

    #[test]
    fn concurrency_grows_while_goodput_grows_holds_when_it_falls_and_halves_on_timeouts() {
        let mut c = Concurrency::new(ConcurrencyPolicy {
            initial: 2,
            max: 5,
            adaptive: true,
        });
        c.on_window(10.0, 0);
        assert_eq!(c.limit(), 3);
        c.on_window(15.0, 0);
        assert_eq!(c.limit(), 4);
        c.on_window(15.2, 0);
        assert_eq!(c.limit(), 4, "a plateau holds");
        c.on_window(30.0, 0);
        c.on_window(60.0, 0);
        assert_eq!(c.limit(), 5, "capped at max");
        c.on_window(60.0, 2);
        assert_eq!(c.limit(), 2, "timeouts halve");
        c.on_window(10.0, 0);
        assert_eq!(c.limit(), 2, "falling goodput holds");
        c.on_window(1.0, 3);
        assert_eq!(c.limit(), 1);
        c.on_window(1.0, 3);
        assert_eq!(c.limit(), 1, "never below one");
    }
}
