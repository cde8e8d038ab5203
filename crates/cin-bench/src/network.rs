//! `network`: three POPs on loopback (`aa`, `bb`, `cc`) sharing one final store,
//! s3s-fs, which the origin `aa` reaches through a link capped at the
//! final-store bandwidth.
//!
//! 1. What forwarding costs: a read of a file in transit at another POP (proxied
//!    from its origin) against the same read at the origin, and a read of a
//!    stored file at another POP (from final storage, through its manifest).
//! 2. The model of docs/scale_model.py, checked: uploads of one size arrive at
//!    `aa` as a Poisson process; each file is read a few times, each read at a
//!    POP picked at random, after an exponential delay. Measured: the time in
//!    transit and the reads (and bytes) forwarded, beside the command that
//!    gives the model's figures for the same inputs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::task::JoinSet;

use crate::fault_proxy::{FaultProxy, Faults};
use crate::pop::{Pop, S3Profile};
use crate::report::{latency_rows, Row};
use crate::s3::{self, S3Server};
use crate::scenarios::Ctx;
use crate::source::MIB;

const BUCKET: &str = "cin-bench";
const IDS: [&str; 3] = ["aa", "bb", "cc"];
const SECRET: &str = "cin-bench network secret, 32+ chars";
/// Reads per file in the model check, each at a POP picked at random.
const READS_PER_FILE: usize = 3;

pub async fn network(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    if ctx.args.target.is_some() {
        bail!("network starts its own three POPs; it does not run with --target");
    }
    let bin = s3::s3s_fs_binary(ctx.args.s3s_fs.as_deref())?;
    let server = S3Server::start(&bin, &ctx.work).await?;
    server
        .client()
        .await
        .create_bucket()
        .bucket(BUCKET)
        .send()
        .await
        .context("CreateBucket")?;
    let cap = ctx.args.network_cap_mb * 1_000_000;
    // Refuses connections until pointed at the store: the origin's files stay
    // in transit for the first part.
    let link = FaultProxy::start(Faults {
        bandwidth: Some(cap),
        ..Faults::default()
    })
    .await;
    let pops = start_pops(ctx, &server.endpoint, &link.url()).await?;
    let http = crate::scenarios::http_client()?;
    let mut rows = Vec::new();

    // ---- 1. forwarding overhead
    let mut rng = StdRng::seed_from_u64(0x0C1_4E7);
    let small = random_bytes(&mut rng, 16 * 1024);
    let big = random_bytes(&mut rng, ctx.args.network_read_mib * MIB);
    let small_handle = store(&http, &pops[0], "small.bin", small.clone()).await?;
    let big_handle = store(&http, &pops[0], "big.bin", big.clone()).await?;
    for handle in [&small_handle, &big_handle] {
        let status = pops[0].metadata(&http, handle).await?["status"].clone();
        if status != "InTransit" {
            bail!("{handle} is {status} at its origin, not InTransit");
        }
    }
    let reads = ctx.args.network_reads;
    let big_label = format!("{} MiB", ctx.args.network_read_mib);
    for (pop, where_) in [
        (&pops[0], "in transit, at its origin"),
        (&pops[1], "in transit, at another POP (proxied)"),
    ] {
        let latencies = read_latencies(&http, pop, &small_handle, &small, reads).await?;
        rows.extend(latency_rows(
            "network",
            &format!("read 16 KiB {where_}"),
            latencies,
            0,
        ));
        let rate = read_rate(&http, pop, &big_handle, &big).await?;
        rows.push(Row::new(
            "network",
            format!("read {big_label} {where_}"),
            rate,
            "MB/s",
        ));
    }
    link.set_upstream(&server.endpoint);
    for handle in [&small_handle, &big_handle] {
        pops[0]
            .wait_stored(&http, handle, Duration::from_secs(600))
            .await?;
    }
    let where_ = "stored, at another POP (from final storage)";
    let latencies = read_latencies(&http, &pops[1], &small_handle, &small, reads).await?;
    rows.extend(latency_rows(
        "network",
        &format!("read 16 KiB {where_}"),
        latencies,
        0,
    ));
    let rate = read_rate(&http, &pops[1], &big_handle, &big).await?;
    rows.push(Row::new(
        "network",
        format!("read {big_label} {where_}"),
        rate,
        "MB/s",
    ));

    // ---- 2. the model's transit and forwarding figures
    rows.extend(model_check(ctx, &http, &pops, cap, &mut rng).await?);
    for pop in pops {
        pop.stop().await;
    }
    Ok(rows)
}

/// Three in-process POPs listing one another, sharing the store at `endpoint`;
/// the first reaches it through `origin_endpoint`.
async fn start_pops(ctx: &Ctx, endpoint: &str, origin_endpoint: &str) -> anyhow::Result<Vec<Pop>> {
    let listeners = IDS
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()?;
    let mut table = Vec::new();
    for (id, listener) in IDS.iter().zip(&listeners) {
        table.push(cin_edge::config::NetworkPop {
            id: (*id).into(),
            url: format!("http://{}", listener.local_addr()?),
        });
    }
    let mut pops = Vec::new();
    for (id, listener) in IDS.iter().zip(listeners) {
        let profile = S3Profile {
            name: "default".into(),
            bucket: BUCKET.into(),
            endpoint: if *id == "aa" {
                origin_endpoint.into()
            } else {
                endpoint.into()
            },
            access_key: s3::ACCESS_KEY.into(),
            secret_key: s3::SECRET_KEY.into(),
            part_size: 16 * MIB,
            concurrency: 4,
        };
        let table = table.clone();
        let pop = Pop::in_process_on(listener, &ctx.work, |config| {
            profile.apply(config);
            config.server.pop_id = (*id).into();
            config.network.secret = SECRET.into();
            config.network.pops = table;
            // A paused link is tried again soon after it opens.
            config.replicator.retry_cap_ms = 500;
        })
        .await?;
        pops.push(pop);
    }
    Ok(pops)
}

fn random_bytes(rng: &mut StdRng, len: u64) -> Bytes {
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    rng.fill(&mut bytes[..]);
    Bytes::from(bytes)
}

/// `/api/store` of `bytes` at `pop`: the handle.
async fn store(
    http: &reqwest::Client,
    pop: &Pop,
    name: &str,
    bytes: Bytes,
) -> anyhow::Result<String> {
    let resp = http
        .post(format!("{}/api/store/s3?filename={name}", pop.base))
        .body(bytes)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("store of {name}: {}", resp.status());
    }
    let body: serde_json::Value = resp.json().await?;
    body["handle"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no handle in {body}"))
}

/// Reads `handle` at `pop` whole, checking its bytes: the POP that answered
/// (`Cin-Pop`, when it was proxied) and the byte count.
async fn read(
    http: &reqwest::Client,
    pop: &Pop,
    handle: &str,
    expected: &Bytes,
) -> anyhow::Result<(Option<String>, u64)> {
    let mut resp = http.get(format!("{}/{handle}", pop.base)).send().await?;
    if !resp.status().is_success() {
        bail!("read of {handle} at {}: {}", pop.base, resp.status());
    }
    let answered_by = resp
        .headers()
        .get("cin-pop")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut at = 0usize;
    while let Some(chunk) = resp.chunk().await? {
        if expected.get(at..at + chunk.len()) != Some(&chunk[..]) {
            bail!("read of {handle} at {}: bytes differ at {at}", pop.base);
        }
        at += chunk.len();
    }
    if at != expected.len() {
        bail!("read of {handle}: {at} bytes, not {}", expected.len());
    }
    Ok((answered_by, at as u64))
}

/// `count` sequential reads, after a few to warm connections: each in ms.
async fn read_latencies(
    http: &reqwest::Client,
    pop: &Pop,
    handle: &str,
    expected: &Bytes,
    count: usize,
) -> anyhow::Result<Vec<f64>> {
    for _ in 0..10 {
        read(http, pop, handle, expected).await?;
    }
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let began = Instant::now();
        read(http, pop, handle, expected).await?;
        latencies.push(began.elapsed().as_secs_f64() * 1e3);
    }
    Ok(latencies)
}

/// The median rate of three whole reads, in MB/s.
async fn read_rate(
    http: &reqwest::Client,
    pop: &Pop,
    handle: &str,
    expected: &Bytes,
) -> anyhow::Result<f64> {
    let mut rates = Vec::new();
    for _ in 0..3 {
        let began = Instant::now();
        let (_, bytes) = read(http, pop, handle, expected).await?;
        rates.push(bytes as f64 / 1e6 / began.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    Ok(rates[1])
}

/// An exponential delay with this mean.
fn exponential(rng: &mut StdRng, mean_s: f64) -> Duration {
    let u: f64 = rng.gen_range(0.0..1.0);
    Duration::from_secs_f64(-(1.0 - u).ln() * mean_s)
}

async fn model_check(
    ctx: &Ctx,
    http: &reqwest::Client,
    pops: &[Pop],
    cap: u64,
    rng: &mut StdRng,
) -> anyhow::Result<Vec<Row>> {
    let rate = ctx.args.network_rate;
    let size = ctx.args.network_file_mib * MIB;
    let read_delay = ctx.args.network_read_delay_s;
    let duration = Duration::from_secs(ctx.args.network_duration_s);
    let body = random_bytes(rng, size);
    let bases: Arc<Vec<Pop>> =
        Arc::new(pops.iter().map(|p| Pop::external(&p.base, None)).collect());
    let began = tokio::time::Instant::now();
    let mut next = began;
    let mut files = JoinSet::new();
    let mut index = 0;
    loop {
        next += exponential(rng, 1.0 / rate);
        if next > began + duration {
            break;
        }
        tokio::time::sleep_until(next).await;
        index += 1;
        let (http, bases, body) = (http.clone(), bases.clone(), body.clone());
        let delays: Vec<(Duration, usize)> = (0..READS_PER_FILE)
            .map(|_| (exponential(rng, read_delay), rng.gen_range(0..IDS.len())))
            .collect();
        files.spawn(async move {
            let handle = store(&http, &bases[0], &format!("m{index}.bin"), body.clone()).await?;
            let done = tokio::time::Instant::now();
            let mut reads = JoinSet::new();
            for (delay, at) in delays {
                let (http, bases, body, handle) =
                    (http.clone(), bases.clone(), body.clone(), handle.clone());
                reads.spawn(async move {
                    tokio::time::sleep_until(done + delay).await;
                    let started_ms = unix_ms();
                    let (answered_by, bytes) = read(&http, &bases[at], &handle, &body).await?;
                    anyhow::Ok(ReadOutcome {
                        elsewhere: at != 0,
                        started_ms,
                        // Proxied from the origin.
                        forwarded: at != 0 && answered_by.as_deref() == Some("aa"),
                        bytes,
                    })
                });
            }
            let mut outcomes = Vec::new();
            while let Some(outcome) = reads.join_next().await {
                outcomes.push(outcome??);
            }
            anyhow::Ok((handle, outcomes))
        });
    }
    let mut outcomes = Vec::new();
    while let Some(file) = files.join_next().await {
        outcomes.push(file??);
    }
    let mut transit = Vec::new();
    let mut tally = Tally::default();
    for (handle, reads) in &outcomes {
        let meta = pops[0]
            .wait_stored(http, handle, Duration::from_secs(600))
            .await?;
        let replication = &meta["replication"];
        let (Some(from), Some(to)) = (
            replication["completed_at"].as_u64(),
            replication["stored_at"].as_u64(),
        ) else {
            bail!("no replication times in {meta}");
        };
        transit.push(to.saturating_sub(from) as f64 / 1e3);
        for read in reads {
            tally.add(read, to);
        }
    }
    let files = outcomes.len() as f64;
    let mean_transit = transit.iter().sum::<f64>() / files.max(1.0);
    let measured_rate = files / duration.as_secs_f64();
    eprintln!(
        "  the model for these inputs: python3 docs/scale_model.py check --pops 3 --rate {measured_rate:.3} --size {size} --bandwidth {cap} --read-delay-mean {read_delay} --reads-per-file {READS_PER_FILE} --p-local 0.3333 --duration {}",
        duration.as_secs()
    );
    let inputs = format!(
        "{:.2} files/s of {} MiB, link {} MB/s, reads x{READS_PER_FILE} after {read_delay} s mean",
        measured_rate, ctx.args.network_file_mib, ctx.args.network_cap_mb
    );
    Ok(vec![
        Row::new(
            "network",
            format!("model check: files ({inputs})"),
            files,
            "",
        ),
        Row::new(
            "network",
            "model check: mean time in transit",
            mean_transit,
            "s",
        ),
        // A file that found the link free: its size over the cap, plus what a
        // replication costs besides (the model's t0).
        Row::new(
            "network",
            "model check: shortest time in transit",
            transit.iter().copied().fold(f64::INFINITY, f64::min),
            "s",
        ),
        Row::new(
            "network",
            "model check: reads at another POP while in transit",
            tally.elsewhere_in_transit as f64 / (tally.reads as f64).max(1.0) * 100.0,
            "% of reads",
        ),
        Row::new("network", "model check: reads", tally.reads as f64, ""),
        Row::new(
            "network",
            "model check: bytes forwarded for reads while in transit",
            tally.forwarded_in_transit_bytes as f64 / 1e6,
            "MB",
        ),
        Row::new(
            "network",
            "model check: bytes forwarded after Stored (a missing manifest is believed 2 s)",
            tally.forwarded_after_bytes as f64 / 1e6,
            "MB",
        ),
    ])
}

struct ReadOutcome {
    /// At a POP other than the origin.
    elsewhere: bool,
    started_ms: u64,
    forwarded: bool,
    bytes: u64,
}

#[derive(Default)]
struct Tally {
    reads: u64,
    elsewhere_in_transit: u64,
    forwarded_in_transit_bytes: u64,
    forwarded_after_bytes: u64,
}

impl Tally {
    /// Counts a read of a file stored at `stored_ms` (the POPs' clock is this one).
    fn add(&mut self, read: &ReadOutcome, stored_ms: u64) {
        self.reads += 1;
        let in_transit = read.started_ms < stored_ms;
        if read.elsewhere && in_transit {
            self.elsewhere_in_transit += 1;
        }
        if read.forwarded {
            if in_transit {
                self.forwarded_in_transit_bytes += read.bytes;
            } else {
                self.forwarded_after_bytes += read.bytes;
            }
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
