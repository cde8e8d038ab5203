//! `hostile`: `cin` against a fixed-chunk client (8 MiB chunks, 3 parts at once,
//! the same retries and deadlines) through a fault-injecting proxy that caps the
//! link (shared by every connection), delays each direction (a pipeline delay,
//! not a pause per read), and resets or stalls connections or blacks the link
//! out. Goodput is reported as a share of the cap, with bytes sent over the file
//! size and how many runs completed, over several seeds.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cin_client::upload::{Quiet, UploadJob, UploadOptions, Uploader};
use cin_client::{HttpTransport, MemorySource, StoreOptions, TokioClock};

use crate::fault_proxy::{FaultProxy, Faults};
use crate::report::{Goal, Row};
use crate::scenarios::Ctx;
use crate::source::MIB;

const SCENARIO: &str = "hostile";

/// One kind of bad network, and what `cin` must reach on it.
struct Link {
    name: &'static str,
    faults: Faults,
    /// A blackout of this long, once a fifth of the file went through.
    blackout: Option<Duration>,
    /// Least goodput (share of the cap) and most bytes sent per file byte.
    goodput_target: Option<f64>,
    sent_target: Option<f64>,
}

#[derive(Default)]
struct Runs {
    done: u32,
    runs: u32,
    /// Seconds of the runs that completed.
    seconds: f64,
    /// Request-body bytes of chunk PUTs that reached the POP.
    sent: u64,
}

pub async fn hostile(ctx: &mut Ctx) -> anyhow::Result<Vec<Row>> {
    let size = ctx.args.hostile_size_mib * MIB;
    let cap = ctx.args.hostile_cap_mb * 1_000_000;
    let one_way = Duration::from_millis(ctx.args.hostile_rtt_ms / 2);
    let seeds = ctx.args.hostile_seeds.max(1);
    let limit = Duration::from_secs(ctx.args.hostile_limit_s);

    let proxy = FaultProxy::start(Faults::default()).await;
    let data = tempfile::tempdir_in(&ctx.work)?;
    let mut config = cin_edge::Config::default();
    config.server.data_dir = data.path().to_path_buf();
    config.server.public_url = proxy.url();
    config.disk.min_free_bytes = 0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let pop_base = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(cin_edge::run(listener, config, async move {
        let _ = stopped.await;
    }));
    proxy.set_upstream(&pop_base);

    let base = Faults {
        latency: one_way,
        bandwidth: Some(cap),
        ..Faults::default()
    };
    let links = [
        Link {
            name: "clean",
            faults: base.clone(),
            blackout: None,
            goodput_target: Some(0.85),
            sent_target: None,
        },
        Link {
            name: "resets, mean 4 MiB apart",
            faults: Faults {
                reset_every: Some(4 * MIB),
                ..base.clone()
            },
            blackout: None,
            goodput_target: Some(0.50),
            sent_target: Some(1.3),
        },
        Link {
            name: "30 % of requests stall",
            faults: Faults {
                stall_share: 0.3,
                ..base.clone()
            },
            blackout: None,
            goodput_target: Some(0.40),
            sent_target: None,
        },
        Link {
            name: "a 5 s blackout",
            faults: base.clone(),
            blackout: Some(Duration::from_secs(5)),
            goodput_target: None,
            sent_target: None,
        },
    ];
    let clients = [
        ("cin", UploadOptions::default()),
        ("fixed 8 MiB x3", UploadOptions::fixed(8 * MIB, 3)),
    ];
    let bytes = ctx.pattern.bytes(0, size);
    eprintln!(
        "  {} MiB per upload through a {} MB/s link with {} ms round trips, {seeds} seeds, {limit:?} per run",
        ctx.args.hostile_size_mib, ctx.args.hostile_cap_mb, ctx.args.hostile_rtt_ms
    );

    let mut rows = Vec::new();
    let chosen = |link: &Link| {
        let wanted = &ctx.args.hostile_links;
        wanted.is_empty() || wanted.iter().any(|w| link.name.contains(w.as_str()))
    };
    for link in links.iter().filter(|l| chosen(l)) {
        for (client, options) in &clients {
            let mut runs = Runs::default();
            for seed in 0..seeds {
                proxy.set_faults(Faults {
                    seed: seed + 1,
                    ..link.faults.clone()
                });
                let mut options = options.clone();
                options.seed = Some(seed);
                options.retry_deadline = limit;
                let uploader = Uploader::new(
                    Arc::new(HttpTransport::new(ctx.args.apikey.clone())?),
                    Arc::new(TokioClock::new()),
                    options,
                    Arc::new(Quiet),
                );
                let job = UploadJob {
                    source: Arc::new(MemorySource(bytes.clone())),
                    filename: "hostile.bin".into(),
                    mimetype: "application/octet-stream".into(),
                    store: StoreOptions::s3(),
                    pops: vec![proxy.url()],
                    resume: None,
                };
                let sent_before = proxy.put_body_bytes();
                let before = (proxy.puts().len() as u64, proxy.stalls(), proxy.resets());
                let began = Instant::now();
                let upload = uploader.upload(job);
                tokio::pin!(upload);
                let mut blackout = link.blackout;
                let finished = loop {
                    tokio::select! {
                        done = &mut upload => break done.is_ok(),
                        _ = tokio::time::sleep(Duration::from_millis(20)), if blackout.is_some() => {
                            if proxy.put_body_bytes() - sent_before >= size / 5 {
                                if let Some(d) = blackout.take() {
                                    proxy.black_out(d);
                                }
                            }
                        }
                        _ = tokio::time::sleep_until((began + limit).into()) => break false,
                    }
                };
                let (puts, stalls, resets) =
                    (proxy.puts().len() as u64, proxy.stalls(), proxy.resets());
                eprintln!(
                    "  {}: {client}, seed {seed}: {} in {:.1} s, {} chunk PUTs, {} stalled, {} reset",
                    link.name,
                    if finished { "done" } else { "NOT done" },
                    began.elapsed().as_secs_f64(),
                    puts - before.0,
                    stalls - before.1,
                    resets - before.2,
                );
                runs.runs += 1;
                runs.sent += proxy.put_body_bytes() - sent_before;
                if finished {
                    runs.done += 1;
                    runs.seconds += began.elapsed().as_secs_f64();
                }
            }
            let goodput = if runs.done > 0 {
                size as f64 * f64::from(runs.done) / runs.seconds / cap as f64
            } else {
                0.0
            };
            let sent = runs.sent as f64 / (size as f64 * f64::from(runs.runs));
            let mine = *client == "cin";
            let what = format!("{}: {client}", link.name);
            let mut row = Row::new(
                SCENARIO,
                format!("{what}, goodput"),
                100.0 * goodput,
                "% of cap",
            );
            if let (true, Some(target)) = (mine, link.goodput_target) {
                row = row.with_target(
                    format!(">= {:.0} % of the cap", 100.0 * target),
                    Goal::AtLeast(100.0 * target),
                    100.0 * goodput,
                );
            }
            rows.push(row);
            let mut row = Row::new(SCENARIO, format!("{what}, bytes sent / file"), sent, "x");
            if let (true, Some(target)) = (mine, link.sent_target) {
                row = row.with_target(format!("<= {target}x"), Goal::AtMost(target), sent);
            }
            rows.push(row);
            let mut row = Row::new(
                SCENARIO,
                format!("{what}, uploads completed of {}", runs.runs),
                f64::from(runs.done),
                "",
            );
            if mine {
                row = row.with_target(
                    "all",
                    Goal::AtLeast(f64::from(runs.runs)),
                    f64::from(runs.done),
                );
            }
            rows.push(row);
        }
    }
    let _ = stop.send(());
    let _ = server.await;
    Ok(rows)
}
