//! Goodput and re-sent bytes of `cin`'s adaptive algorithm against a fixed-chunk
//! client (8 MiB chunks, 3 parts at once, no halving: today's filestack-js), through
//! the fault-injecting proxy of the e2e tests, against a POP started in-process.
//! Run by hand, not part of the test suite:
//!
//! ```text
//! cargo run --release -p cin-client --example bench -- [--size-mib 32] [--bandwidth-mib 32]
//!     [--latency-ms 5] [--rates 0,10,30] [--hazard-mib 4] [--reps 3] [--limit-s 60]
//! ```
//!
//! Each cell is the mean of `--reps` runs (a run that did not finish in
//! `--limit-s` counts as that long, and is reported). Clients: `cin` as shipped,
//! `cin` ignoring the POP's chunk size hint (the client algorithm alone), and the
//! fixed-chunk client.
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
    reps: u32,
    limit: Duration,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        size_mib: 32,
        bandwidth_mib: 32,
        latency_ms: 5,
        rates: vec![0, 10, 30],
        hazards_mib: vec![4],
        reps: 3,
        limit: Duration::from_secs(60),
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
            "--reps" => args.reps = num(&value)?.max(1) as u32,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(args)
}

/// The runs of one client under one fault setting.
struct Row {
    faults: String,
    client: &'static str,
    runs: u32,
    unfinished: u32,
    time: Duration,
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
    let mut no_hint = UploadOptions::default();
    no_hint.chunks.follow_hint = false;
    let clients = [
        ("cin", UploadOptions::default()),
        ("cin, POP hint ignored", no_hint),
        ("fixed 8 MiB x3", UploadOptions::fixed(8 * MIB, 3)),
    ];
    let mut rows = Vec::new();
    for (name, faults) in &scenarios {
        for (client, options) in &clients {
            let mut row = Row {
                faults: name.clone(),
                client,
                runs: 0,
                unfinished: 0,
                time: Duration::ZERO,
                puts: 0,
                resets: 0,
                sent: 0,
            };
            for rep in 0..args.reps {
                let mut options = options.clone();
                options.seed = Some(u64::from(rep));
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
                let finished = matches!(
                    tokio::time::timeout(args.limit, uploader.upload(job)).await,
                    Ok(Ok(_))
                );
                row.time += began.elapsed().min(args.limit);
                row.runs += 1;
                if !finished {
                    row.unfinished += 1;
                    // Let the abandoned run's connections drain before counting.
                    let quiet_by = Instant::now() + Duration::from_secs(10);
                    while proxy.open_connections() > 0 && Instant::now() < quiet_by {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
                let puts = &proxy.puts()[puts_before..];
                row.puts += puts.len();
                row.resets += puts.iter().filter(|p| p.reset).count();
                row.sent += puts.iter().map(|p| p.forwarded).sum::<u64>();
            }
            eprintln!("{}", format_row(&row, size));
            rows.push(row);
        }
    }
    println!();
    println!("means of {} runs per row", args.reps);
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
    let runs = f64::from(row.runs.max(1));
    let time = row.time.as_secs_f64() / runs;
    let resent = (row.sent as f64 / runs - size as f64).max(0.0);
    let unfinished = if row.unfinished > 0 {
        format!(" ({} of {} unfinished)", row.unfinished, row.runs)
    } else {
        String::new()
    };
    format!(
        "| {} | {} | {:.1} s{unfinished} | {:.1} MiB/s | {:.0} | {:.0} | {:.1} MiB | {:.0} % |",
        row.faults,
        row.client,
        time,
        size as f64 / MIB as f64 / time,
        row.puts as f64 / runs,
        row.resets as f64 / runs,
        resent / MIB as f64,
        100.0 * resent / size as f64
    )
}
