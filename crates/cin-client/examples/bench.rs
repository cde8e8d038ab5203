//! Goodput and re-sent bytes of `cin`'s adaptive algorithm against a fixed-chunk
//! client (8 MiB chunks, 3 parts at once, no halving: today's filestack-js), through
//! the fault-injecting proxy of the e2e tests, against a POP started in-process.
//! Run by hand, not part of the test suite:
//!
//! ```text
//! cargo run --release -p cin-client --example bench -- [--size-mib 64] [--bandwidth-mib 32]
//!     [--latency-ms 5] [--rates 0,10,30] [--hazard-mib 4] [--limit-s 120]
//! ```
//!
//! `--rates`: percent of chunk PUTs reset after a random share of their body.
//! `--hazard-mib`: a link that breaks every N MiB of request body on average.

#[path = "../../../tests/e2e/fault_proxy.rs"]
mod fault_proxy;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cin_client::upload::{Quiet, UploadJob, UploadOptions, Uploader};
use cin_client::{HttpTransport, MemorySource, StoreOptions, TokioClock};
use fault_proxy::{FaultProxy, Faults};
use rand::{RngCore, SeedableRng};

const MIB: u64 = 1024 * 1024;

struct Args {
    size_mib: u64,
    bandwidth_mib: u64,
    latency_ms: u64,
    rates: Vec<u32>,
    hazards_mib: Vec<u64>,
    limit: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size_mib: 64,
        bandwidth_mib: 32,
        latency_ms: 5,
        rates: vec![0, 10, 30],
        hazards_mib: vec![4],
        limit: Duration::from_secs(120),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| v.parse::<u64>().map_err(|e| format!("{flag} {v}: {e}"));
        let list = |v: &str| -> Result<Vec<u64>, String> {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().map_err(|e| format!("{flag} {s}: {e}")))
                .collect()
        };
        match flag.as_str() {
            "--size-mib" => args.size_mib = num(&value)?,
            "--bandwidth-mib" => args.bandwidth_mib = num(&value)?,
            "--latency-ms" => args.latency_ms = num(&value)?,
            "--rates" => args.rates = list(&value)?.into_iter().map(|r| r as u32).collect(),
            "--hazard-mib" => args.hazards_mib = list(&value)?,
            "--limit-s" => args.limit = Duration::from_secs(num(&value)?),
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

struct Row {
    faults: String,
    client: &'static str,
    outcome: Result<Duration, String>,
    puts: usize,
    resets: usize,
    sent: u64,
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(args).await {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let data_dir = tempfile::tempdir()?;
    let proxy = FaultProxy::start(Faults::default()).await;
    let mut config = cin_edge::Config::default();
    config.server.data_dir = data_dir.path().to_path_buf();
    config.server.public_url = proxy.url();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pop_base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cin_edge::run(listener, config, async move {
        let _ = stopped.await;
    }));
    proxy.set_upstream(&pop_base);

    let size = args.size_mib * MIB;
    let mut bytes = vec![0u8; size as usize];
    rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut bytes);
    let bytes = bytes::Bytes::from(bytes);

    let base = Faults {
        latency: Duration::from_millis(args.latency_ms),
        bandwidth: Some(args.bandwidth_mib * MIB).filter(|b| *b > 0),
        seed: 7,
        ..Faults::default()
    };
    let mut scenarios: Vec<(String, Faults)> = args
        .rates
        .iter()
        .map(|&rate| {
            (
                format!("{rate}% of PUTs reset"),
                Faults {
                    reset_share: f64::from(rate) / 100.0,
                    ..base.clone()
                },
            )
        })
        .collect();
    for &mib in &args.hazards_mib {
        scenarios.push((
            format!("reset every ~{mib} MiB"),
            Faults {
                reset_every: Some(mib * MIB),
                ..base.clone()
            },
        ));
    }

    eprintln!(
        "file {} MiB, link {} MiB/s, +{} ms each way, POP in-process at {pop_base}, limit {:?} per run",
        args.size_mib, args.bandwidth_mib, args.latency_ms, args.limit
    );
    let mut rows = Vec::new();
    for (name, faults) in &scenarios {
        for (client, mut options) in [
            ("cin (adaptive)", UploadOptions::default()),
            ("fixed 8 MiB x3", UploadOptions::fixed(8 * MIB, 3)),
        ] {
            options.seed = Some(3);
            options.retry_deadline = args.limit;
            proxy.set_faults(faults.clone());
            let puts_before = proxy.puts().len();
            let uploader = Uploader::new(
                Arc::new(HttpTransport::new("bench")?),
                Arc::new(TokioClock::new()),
                options,
                Arc::new(Quiet),
            );
            let job = UploadJob {
                source: Arc::new(MemorySource(bytes.clone())),
                filename: "bench.bin".into(),
                mimetype: "application/octet-stream".into(),
                store: StoreOptions::s3(),
                pops: vec![proxy.url()],
                resume: None,
            };
            let began = Instant::now();
            let outcome = match tokio::time::timeout(args.limit, uploader.upload(job)).await {
                Ok(Ok(_)) => Ok(began.elapsed()),
                Ok(Err(e)) => Err(format!("failed: {e}")),
                Err(_) => Err(format!("unfinished after {:?}", args.limit)),
            };
            // Let the proxy drain connections of an abandoned run before counting.
            let quiet_by = Instant::now() + Duration::from_secs(10);
            while proxy.open_connections() > 0 && outcome.is_err() && Instant::now() < quiet_by {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let puts = proxy.puts()[puts_before..].to_vec();
            let row = Row {
                faults: name.clone(),
                client,
                outcome,
                puts: puts.len(),
                resets: puts.iter().filter(|p| p.reset).count(),
                sent: puts.iter().map(|p| p.forwarded).sum(),
            };
            eprintln!("{}", format_row(&row, size));
            rows.push(row);
        }
    }
    println!();
    println!(
        "| faults | client | time | goodput | chunk PUTs | resets | re-sent | re-sent / file |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for row in &rows {
        println!("{}", format_row(row, size));
    }
    let _ = stop.send(());
    let _ = server.await;
    Ok(())
}

fn format_row(row: &Row, size: u64) -> String {
    let resent = row.sent.saturating_sub(size);
    let (time, goodput) = match &row.outcome {
        Ok(t) => (
            format!("{:.1} s", t.as_secs_f64()),
            format!("{:.1} MiB/s", size as f64 / MIB as f64 / t.as_secs_f64()),
        ),
        Err(e) => (e.clone(), "-".into()),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {:.1} MiB | {:.0} % |",
        row.faults,
        row.client,
        time,
        goodput,
        row.puts,
        row.resets,
        resent as f64 / MIB as f64,
        100.0 * resent as f64 / size as f64
    )
}
