//! `cin-bench`: a CIN edge POP against this machine's own ceilings, scenario by
//! scenario. Run by hand (not part of the test suite); see BENCHMARKS.md.
//!
//! ```text
//! cargo build --release -p cin-bench -p cin-edge
//! target/release/cin-bench                      # every scenario, full sizes
//! target/release/cin-bench single small --size-mib 64 --count 1000 --json
//! ```

mod connections;
// The e2e tests' fault-injecting proxy, shared rather than copied.
#[path = "../../../tests/e2e/fault_proxy.rs"]
mod fault_proxy;
mod hostile;
mod network;
mod pop;
mod report;
mod s3;
mod scenarios;
mod source;

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use report::Row;
use scenarios::{Ctx, SmallPath};

const SCENARIOS: [&str; 10] = [
    "limit",
    "single",
    "complete-latency",
    "concurrent",
    "memory",
    "small",
    "replicate",
    "connections",
    "hostile",
    "network",
];

/// Benchmarks a CIN edge POP (started in-process on a temporary data directory
/// unless --target) against this machine's own write+fsync and loopback ceilings.
#[derive(Parser, Debug, Clone)]
#[command(version, about)]
pub struct Args {
    /// Scenarios to run, in order: limit, single, complete-latency, concurrent,
    /// memory, small, replicate, connections, hostile, network, or all.
    #[arg(default_value = "all")]
    scenarios: Vec<String>,

    /// A running POP to measure instead of starting one (replicate cannot run so).
    #[arg(long, value_name = "URL")]
    target: Option<String>,
    /// With --target: the POP's process id, to read its peak RSS.
    #[arg(long, value_name = "PID")]
    target_pid: Option<u32>,
    /// Where the POP runs: auto (a child process for concurrent and memory, which
    /// report its RSS; in this process otherwise), in-process, or child.
    #[arg(long, default_value = "auto", value_parser = ["auto", "in-process", "child"])]
    pop: String,
    /// The cin-edge binary for child POPs [default: beside cin-bench, else target/release, target/debug].
    #[arg(long, value_name = "PATH")]
    pop_bin: Option<PathBuf>,
    /// The s3s-fs binary [default: $CIN_TEST_S3S_FS, else target/test-tools/bin/s3s-fs].
    #[arg(long, value_name = "PATH")]
    s3s_fs: Option<PathBuf>,
    /// Directory for the temporary work directory (POP data, files, the disk ceiling):
    /// put it on the filesystem to measure [default: the system temp dir].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// The API key sent with uploads.
    #[arg(long, default_value = "cin-bench")]
    apikey: String,

    /// Big-file size: limit, single, replicate, and the largest complete-latency file.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// memory's file size [default: 4 x --size-mib].
    #[arg(long)]
    memory_size_mib: Option<u64>,
    /// complete-latency's file sizes, comma-separated [default: 1,64,--size-mib].
    #[arg(long, value_delimiter = ',')]
    complete_sizes_mib: Option<Vec<u64>>,
    /// complete-latency's uploads per size (the median is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// small's number of uploads (and limit's loopback requests).
    #[arg(long, default_value_t = 10_000)]
    count: u64,
    /// small's upload size.
    #[arg(long, default_value_t = 16)]
    small_size_kib: u64,
    /// small's uploads in flight (and the threads of its new file + fsync ceiling).
    #[arg(long, default_value_t = 64)]
    in_flight: usize,
    /// small's ways of uploading, comma-separated, each measured in turn on the same POP.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_values = ["store", "chunked", "tus", "multipart"]
    )]
    small_paths: Vec<SmallPath>,
    /// concurrent's number of simultaneous uploads.
    #[arg(long, default_value_t = 200)]
    concurrent: u64,
    /// concurrent's upload size.
    #[arg(long, default_value_t = 4)]
    concurrent_size_mib: u64,
    /// replicate: multipart part size, for the POP's profile and the direct upload alike.
    #[arg(long, default_value_t = 16)]
    replicate_part_mib: u64,
    /// replicate: parts in flight, for the POP's profile and the direct upload alike.
    #[arg(long, default_value_t = 4)]
    replicate_concurrency: usize,

    /// hostile: file size per upload.
    #[arg(long, default_value_t = 128)]
    hostile_size_mib: u64,
    /// hostile: the link's cap, in MB/s (10^6 bytes), shared by every connection.
    #[arg(long, default_value_t = 40)]
    hostile_cap_mb: u64,
    /// hostile: round-trip time the proxy adds (half each way).
    #[arg(long, default_value_t = 100)]
    hostile_rtt_ms: u64,
    /// hostile: runs per link and client, each with its own seed.
    #[arg(long, default_value_t = 3)]
    hostile_seeds: u64,
    /// hostile: only the links whose names contain one of these words (e.g.
    /// `clean,resets`); every link when empty.
    #[arg(long, value_delimiter = ',')]
    hostile_links: Vec<String>,
    /// hostile: a run not finished by then counts as not completed.
    #[arg(long, default_value_t = 300)]
    hostile_limit_s: u64,

    /// network: size of the file read to measure forwarding's throughput.
    #[arg(long, default_value_t = 256)]
    network_read_mib: u64,
    /// network: reads of a 16 KiB file per latency figure.
    #[arg(long, default_value_t = 500)]
    network_reads: usize,
    /// network: the origin's link to final storage, in MB/s (10^6 bytes).
    #[arg(long, default_value_t = 40)]
    network_cap_mb: u64,
    /// network model check: uploads per second at the origin (Poisson).
    #[arg(long, default_value_t = 4.0)]
    network_rate: f64,
    /// network model check: size of each upload.
    #[arg(long, default_value_t = 4)]
    network_file_mib: u64,
    /// network model check: mean delay of a read after its upload (exponential).
    #[arg(long, default_value_t = 2.0)]
    network_read_delay_s: f64,
    /// network model check: how long uploads arrive.
    #[arg(long, default_value_t = 60)]
    network_duration_s: u64,

    /// A scenario with no request finishing for this long is reported as stalled.
    #[arg(long, default_value_t = 60)]
    stall_s: u64,
    /// Longest a scenario may run before it is abandoned.
    #[arg(long, default_value_t = 1200)]
    timeout_s: u64,

    /// Print the results as JSON on stdout (the table then goes to stderr).
    #[arg(long)]
    json: bool,
}

// The same allocator as the cin-edge binary, for POPs started in this process.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    // Quiet unless RUST_LOG asks (e.g. `RUST_LOG=cin_client=debug` shows every
    // chunk decision of the hostile scenario).
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
    if let Err(e) = run(args).await {
        eprintln!("cin-bench: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    let mut selected = Vec::new();
    for name in &args.scenarios {
        match name.as_str() {
            "all" => selected.extend(SCENARIOS),
            other => match SCENARIOS.iter().find(|s| **s == other) {
                Some(s) => selected.push(*s),
                None => anyhow::bail!(
                    "unknown scenario {other:?}; known: {} or all",
                    SCENARIOS.join(", ")
                ),
            },
        }
    }
    let base = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = tempfile::Builder::new()
        .prefix("cin-bench.")
        .tempdir_in(&base)?;
    let machine = report::machine(work.path());
    eprintln!("machine: {machine}");
    let settings = json!({
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "scenarios": selected,
        "target": args.target,
        "pop": args.pop,
        "size_mib": args.size_mib,
        "memory_size_mib": args.memory_size_mib.unwrap_or(4 * args.size_mib),
        "complete_sizes_mib": args.complete_sizes_mib,
        "reps": args.reps,
        "count": args.count,
        "small_size_kib": args.small_size_kib,
        "in_flight": args.in_flight,
        "small_paths": args.small_paths.iter().map(|p| p.name()).collect::<Vec<_>>(),
        "concurrent": args.concurrent,
        "concurrent_size_mib": args.concurrent_size_mib,
        "replicate_part_mib": args.replicate_part_mib,
        "replicate_concurrency": args.replicate_concurrency,
        "stall_s": args.stall_s,
    });
    let json_out = args.json;
    let mut ctx = Ctx {
        args,
        work: work.path().to_owned(),
        pattern: source::Pattern::new(0x00C1_4BE4),
        http: scenarios::http_client()?,
        disk_limit: None,
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut loads = Vec::new();
    for name in selected {
        eprintln!("== {name}");
        let began = Instant::now();
        let load_before = report::loadavg();
        let timeout = std::time::Duration::from_secs(ctx.args.timeout_s);
        let scenario = async {
            match name {
                "limit" => scenarios::limit(&mut ctx).await,
                "single" => scenarios::single(&mut ctx).await,
                "complete-latency" => scenarios::complete_latency(&mut ctx).await,
                "concurrent" => scenarios::concurrent(&mut ctx).await,
                "memory" => scenarios::memory(&mut ctx).await,
                "small" => scenarios::small(&mut ctx).await,
                "replicate" => scenarios::replicate(&mut ctx).await,
                "connections" => connections::connections(&mut ctx).await,
                "hostile" => hostile::hostile(&mut ctx).await,
                "network" => network::network(&mut ctx).await,
                _ => unreachable!("checked above"),
            }
        };
        let result = tokio::time::timeout(timeout, scenario)
            .await
            .unwrap_or_else(|_| Err(anyhow::anyhow!("did not finish in {timeout:?}")));
        loads.push(json!({"scenario": name, "before": load_before, "after": report::loadavg()}));
        match result {
            Ok(new) => {
                eprint!(
                    "{}",
                    report::table(&new)
                        .lines()
                        .skip(2)
                        .map(|l| format!("  {l}\n"))
                        .collect::<String>()
                );
                rows.extend(new);
            }
            Err(e) => {
                eprintln!("  {name} failed: {e:#}");
                rows.push(Row::new(name, format!("FAILED: {e:#}"), f64::NAN, ""));
            }
        }
        eprintln!("  ({:.1} s)", began.elapsed().as_secs_f64());
        scenarios::sync_disks();
    }
    let table = report::table(&rows);
    let mut settings = settings;
    settings["load_average_1min"] = json!(loads);
    if json_out {
        eprintln!("\n{table}");
        println!(
            "{}",
            serde_json::to_string_pretty(&report::json(&rows, &machine, settings))?
        );
    } else {
        println!("\n{table}");
    }
    Ok(())
}
