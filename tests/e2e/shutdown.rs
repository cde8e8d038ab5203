//! Shutdown is bounded: whatever a webhook receiver, a final store or a client
//! does, SIGTERM ends the process with 0 within the grace period plus the
//! workers' deadline.

use std::io::Write;
use std::time::{Duration, Instant};

use crate::support::{random_bytes, PopProcess};

const GRACE_SECS: u64 = 2;
const WORKER_STOP_SECS: u64 = 2;

#[tokio::test]
async fn sigterm_exits_0_in_bounded_time_with_black_holed_peers() {
    // Accepts connections (the kernel does, into the backlog) and never answers.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole = black_hole.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[server]
shutdown_grace_secs = {GRACE_SECS}
worker_stop_secs = {WORKER_STOP_SECS}

[apps.demo]
apikey = "demo-key"
secret = "demo-secret"
webhooks = ["http://{hole}/hook"]

[storage]
default_profile = "stalled"

[storage.profiles.stalled]
kind = "s3"
bucket = "stalled"
endpoint = "http://{hole}"
force_path_style = true
access_key_id = "key"
secret_access_key = "secret"
"#
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let mut command = PopProcess::command(&data, &[]);
    command.arg("--config").arg(&config);
    let pop = PopProcess::try_spawn(command).unwrap_or_else(|e| panic!("{e}"));

    // A complete file: its webhook and its replication now wait on the black hole.
    let bytes = random_bytes(200_000, 9);
    let handle = pop
        .store_raw("/api/store/s3?key=demo-key&filename=a.bin", bytes.clone())
        .await;
    assert_eq!(pop.metadata(&handle).await["status"], "InTransit");

    // And a client that stalls mid-body, holding its request open.
    let addr = pop.base.trim_start_matches("http://").to_owned();
    let mut stalled = std::net::TcpStream::connect(&addr).unwrap();
    stalled
        .write_all(
            b"POST /api/store/s3?key=demo-key&filename=b.bin HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n0123456789",
        )
        .unwrap();
    // The POP has the request once the upload is counted as started.
    pop.wait_metric("cin_uploads_started_total", 2.0, Duration::from_secs(10))
        .await;

    let started = Instant::now();
    let bound = Duration::from_secs(GRACE_SECS + WORKER_STOP_SECS + 3);
    assert!(pop.terminate(bound), "cin-edge exited with an error");
    let took = started.elapsed();
    println!("shutdown took {took:?} (bound {bound:?})");
    assert!(took < bound, "shutdown took {took:?}");
    drop(stalled);
    drop(black_hole);
}
