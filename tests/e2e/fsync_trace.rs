//! Acknowledgments follow fsyncs, seen in the system calls. The POP runs under
//! `strace -f`; for each probed request (chunk PUTs, one retried after a cut-off
//! first attempt, a tus PATCH, small and large `/api/store` calls), the trace must
//! show, before the first byte of the 2xx answer is written to the socket:
//! - an fsync/fdatasync of every data file the request wrote, after its last write;
//! - an fsync/fdatasync of the metadata store's log (`metadata/db`) after the
//!   request's first write to it, and of every other metadata file (`conf`,
//!   `blobs/*`) after its last write, whenever that was;
//! - an fsync of the parent directory of every file and directory created so far
//!   (still there), after its creation.
//!
//! `sync_file_range` does not count: it flushes neither the drive's cache nor the
//! file's metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::power_cut::Client;
use crate::support::{random_bytes, PopProcess, MIB};

const TRACED: &str = "fsync,fdatasync,sync_file_range,sync,syncfs,\
    write,writev,pwrite64,pwritev,pwritev2,sendto,sendmsg,\
    open,openat,creat,mkdir,mkdirat,rename,renameat,renameat2,unlink,unlinkat,rmdir";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cut_strace_shows_fsyncs_before_every_acknowledgment() {
    let strace = which("strace").expect(
        "the fsync trace test needs strace (scripts/test installs Debian's strace package)",
    );
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let data = data.canonicalize().unwrap();
    let trace = tmp.path().join("trace.txt");

    let pop_command = PopProcess::command(&data, &[]);
    let mut command = Command::new(strace);
    command
        .args(["-f", "-qq", "-y", "-ttt", "-s", "16", "--seccomp-bpf"])
        .args(["-e", &format!("trace={TRACED}")])
        .arg("-o")
        .arg(&trace)
        .arg("--")
        .arg(pop_command.get_program())
        .args(pop_command.get_args());
    for (key, value) in pop_command.get_envs() {
        if let Some(value) = value {
            command.env(key, value);
        }
    }
    let pop = PopProcess::try_spawn(command).unwrap_or_else(|e| panic!("{e}"));
    let client = Client::new(pop.base.clone());
    let mut probes = Vec::new();

    // Regular multipart: a chunk into a new part file, then a part whose first
    // attempt breaks off (it creates the file) and whose retry succeeds.
    let bytes = random_bytes(2 * 512 * 1024, 900);
    let start = client
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "t.bin", "size": bytes.len(), "store": {"location": "s3"}}),
        )
        .await
        .unwrap();
    let upload_id = start["upload_id"].as_str().unwrap().to_owned();
    let (first, second) = bytes.split_at(512 * 1024);
    let answer = client.chunk_url(&upload_id, 1, None, first).await.unwrap();
    probes.push(Probe::now("chunk PUT (regular part 1, a new part file)"));
    client.put_chunk(&answer, first).await.unwrap();
    client
        .cut_off_chunk(&upload_id, 2, None, second)
        .await
        .unwrap();
    // The broken request may still hold the part for a moment: retry until the
    // retry goes through, and judge the attempt that did.
    let deadline = Instant::now() + Duration::from_secs(10);
    let retried = loop {
        let answer = client.chunk_url(&upload_id, 2, None, second).await.unwrap();
        let probe = Probe::now("chunk PUT retried after a cut-off first attempt (regular part 2)");
        match client.put_chunk(&answer, second).await {
            Ok(_) => break probe,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the retry never went through: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    probes.push(retried);

    // Intelligent ingestion: the first chunk of a part, then one more into the same file.
    let bytes = random_bytes(MIB, 901);
    let start = client
        .post_json(
            "/multipart/start",
            json!({"apikey": "k", "filename": "f.bin", "size": bytes.len(), "store": {"location": "s3"}, "fii": true}),
        )
        .await
        .unwrap();
    let fii_id = start["upload_id"].as_str().unwrap().to_owned();
    for (offset, what) in [
        (
            0,
            "intelligent-ingestion chunk PUT (part 1 at 0, a new part file)",
        ),
        (
            256 * 1024,
            "intelligent-ingestion chunk PUT (part 1 at 256 KiB)",
        ),
    ] {
        let chunk = &bytes[offset..offset + 256 * 1024];
        let answer = client
            .chunk_url(&fii_id, 1, Some(offset as u64), chunk)
            .await
            .unwrap();
        probes.push(Probe::now(what));
        client.put_chunk(&answer, chunk).await.unwrap();
    }

    // tus: a PATCH that does not complete the upload.
    let bytes = random_bytes(700 * 1024, 902);
    let (path, _) = client.tus_create(bytes.len()).await.unwrap();
    probes.push(Probe::now("tus PATCH (first 300 KiB)"));
    client
        .tus_patch(&path, 0, &bytes[..300 * 1024])
        .await
        .unwrap();

    // Whole files: a small one (the shared log), then a large one (a file of its own).
    probes.push(Probe::now("/api/store of 100 KiB (small-file log)"));
    client.store(random_bytes(100 * 1024, 903)).await.unwrap();
    probes.push(Probe::now("/api/store of 1.5 MiB (a file of its own)"));
    client.store(random_bytes(3 * MIB / 2, 904)).await.unwrap();

    // One more answer before the kill: strace reports a call when it returns,
    // and a POP killed just after writing the last 2xx may leave that write
    // as `= ?` in the trace, though the client got it.
    let health = reqwest::get(format!("{}/healthz", pop.base)).await.unwrap();
    assert!(health.status().is_success());
    // Kill the traced POP (not strace, which then writes out the rest and exits).
    let strace_pid = pop.pid();
    let pop_pid = traced_child(strace_pid).expect("the POP under strace");
    // SAFETY: sends a signal to a process this test started.
    unsafe {
        libc::kill(pop_pid, libc::SIGKILL);
    }
    wait_until_exited(strace_pid, Duration::from_secs(30));
    drop(pop);

    let text = std::fs::read_to_string(&trace).unwrap();
    let events = parse_trace(&text);
    let mut report = Vec::new();
    for probe in &probes {
        let problems = check(&events, &data, probe);
        if !problems.is_empty() {
            report.push(format!("{}:\n    {}", probe.what, problems.join("\n    ")));
        }
    }
    if report.is_empty() {
        return;
    }
    // Kept for a look: the line numbers below point into it.
    let kept = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fsync-trace.txt");
    let _ = std::fs::copy(&trace, &kept);
    panic!(
        "{} of {} acknowledgments were sent before what they promise was synced \
         (paths relative to the data directory {}; line numbers of {}):\n  {}",
        report.len(),
        probes.len(),
        data.display(),
        kept.display(),
        report.join("\n  ")
    );
}

/// A request sent at a moment: its answer is the first 2xx written after it.
struct Probe {
    what: &'static str,
    sent_at: f64,
}

impl Probe {
    fn now(what: &'static str) -> Probe {
        Probe {
            what,
            sent_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs_f64(),
        }
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

fn traced_child(strace_pid: u32) -> Option<i32> {
    let children =
        std::fs::read_to_string(format!("/proc/{strace_pid}/task/{strace_pid}/children")).ok()?;
    children.split_whitespace().next()?.parse().ok()
}

/// Waits until `pid` (a child of this process) has exited: gone or a zombie.
fn wait_until_exited(pid: u32, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return,
            Ok(stat) => {
                let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
                if state.starts_with('Z') || state.starts_with('X') {
                    return;
                }
            }
        }
        assert!(Instant::now() < deadline, "strace did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One system call that succeeded, with the lines where it started and ended.
#[derive(Debug)]
struct Event {
    start: usize,
    end: usize,
    ts: f64,
    name: String,
    args: String,
    ret: String,
}

impl Event {
    /// The path strace (`-y`) printed for the first argument, a descriptor.
    fn fd_path(&self) -> Option<&str> {
        let rest = self.args.trim_start();
        let open = rest.find('<')?;
        if !rest[..open].chars().all(|c| c.is_ascii_digit()) || open == 0 {
            return None;
        }
        let close = rest[open..]
            .find(">,")
            .or_else(|| rest[open..].rfind('>'))?;
        Some(&rest[open + 1..open + close])
    }

    /// The n-th quoted string among the arguments.
    fn string_arg(&self, n: usize) -> Option<&str> {
        let mut rest = self.args.as_str();
        for i in 0..=n {
            let open = rest.find('"')?;
            let after = &rest[open + 1..];
            let close = after.find('"')?;
            if i == n {
                return Some(&after[..close]);
            }
            rest = &after[close + 1..];
        }
        None
    }

    /// The path of the descriptor returned (`= 9</path>`).
    fn returned_path(&self) -> Option<&str> {
        let open = self.ret.find('<')?;
        let close = self.ret.rfind('>')?;
        (close > open).then(|| &self.ret[open + 1..close])
    }

    fn is_sync(&self) -> bool {
        matches!(self.name.as_str(), "fsync" | "fdatasync")
    }

    fn syncs_everything(&self) -> bool {
        matches!(self.name.as_str(), "sync" | "syncfs")
    }

    fn is_file_write(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "writev" | "pwrite64" | "pwritev" | "pwritev2"
        )
    }

    /// A 2xx answer starting on a TCP socket.
    fn is_ok_answer(&self) -> bool {
        matches!(
            self.name.as_str(),
            "write" | "writev" | "sendto" | "sendmsg"
        ) && self
            .fd_path()
            .is_some_and(|p| p.starts_with("socket:") || p.starts_with("TCP"))
            && self
                .string_arg(0)
                .is_some_and(|s| s.starts_with("HTTP/1.1 2"))
    }
}

/// Parses `strace -f -ttt -y` output; calls split by other threads
/// (`<unfinished ...>` / `<... resumed>`) are joined.
fn parse_trace(text: &str) -> Vec<Event> {
    let mut pending: HashMap<&str, (usize, f64, String, String)> = HashMap::new();
    let mut events = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        let line_no = line_no + 1;
        // strace pads the pid column ("1571  1796..." but "15744 1796..."), so
        // fields are split at runs of spaces, not at each one.
        let Some((pid, after_pid)) = line.split_once(' ') else {
            continue;
        };
        let Some((ts, rest)) = after_pid.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else {
            continue;
        };
        if let Some(call) = rest.strip_suffix(" <unfinished ...>") {
            if let Some((name, args)) = call.split_once('(') {
                pending.insert(pid, (line_no, ts, name.to_owned(), args.to_owned()));
            }
            continue;
        }
        let (start, ts, name, call) = if let Some(resumed) = rest.strip_prefix("<... ") {
            let Some((name, tail)) = resumed.split_once(" resumed>") else {
                continue;
            };
            match pending.remove(pid) {
                Some((start, ts, _, head)) => (start, ts, name.to_owned(), format!("{head}{tail}")),
                None => continue,
            }
        } else {
            let Some((name, args)) = rest.split_once('(') else {
                continue;
            };
            (line_no, ts, name.to_owned(), args.to_owned())
        };
        let Some(eq) = call.rfind(") = ") else {
            continue;
        };
        let ret = call[eq + 4..].to_owned();
        if ret.starts_with('-') || ret.starts_with('?') {
            continue;
        }
        events.push(Event {
            start,
            end: line_no,
            ts,
            name,
            args: call[..eq].to_owned(),
            ret,
        });
    }
    events.sort_by_key(|e| e.start);
    events
}

/// What a creation made: a path, and the line it was done by.
struct Created {
    path: String,
    line: usize,
}

/// The rules of the module documentation, for one probe.
fn check(events: &[Event], data: &Path, probe: &Probe) -> Vec<String> {
    let data = data.to_string_lossy().into_owned();
    let origin = format!("{data}/origin");
    let in_scope = |p: &str| p.starts_with(&format!("{data}/")) && !p.starts_with(&origin);
    let rel = |p: &str| p.strip_prefix(&format!("{data}/")).unwrap_or(p).to_owned();
    let Some(window) = events
        .iter()
        .find(|e| e.ts >= probe.sent_at)
        .map(|e| e.start)
    else {
        return vec!["no system call after the request was sent".into()];
    };
    let Some(answer) = events
        .iter()
        .find(|e| e.start >= window && e.is_ok_answer())
    else {
        return vec!["no 2xx answer found in the trace".into()];
    };
    let before = |e: &&Event| e.end < answer.start;
    let synced_after = |path: &str, line: usize| {
        events.iter().filter(before).any(|s| {
            s.start > line && (s.syncs_everything() || (s.is_sync() && s.fd_path() == Some(path)))
        })
    };
    let only_range_synced = |path: &str, line: usize| {
        events
            .iter()
            .filter(before)
            .any(|s| s.start > line && s.name == "sync_file_range" && s.fd_path() == Some(path))
    };
    let hint = |path: &str, line: usize| {
        if only_range_synced(path, line) {
            " (only sync_file_range)"
        } else {
            ""
        }
    };
    let mut problems = Vec::new();

    // Data files and metadata files: the last write of each, and for the
    // metadata log the first write of the request.
    let mut last_write: HashMap<&str, usize> = HashMap::new();
    let mut first_db_write_in_window = None;
    let db = format!("{data}/metadata/db");
    for e in events.iter().filter(before).filter(|e| e.is_file_write()) {
        let Some(path) = e.fd_path().filter(|p| in_scope(p)) else {
            continue;
        };
        if path == db {
            if e.start >= window && first_db_write_in_window.is_none() {
                first_db_write_in_window = Some(e.end);
            }
            continue;
        }
        let is_metadata = path.starts_with(&format!("{data}/metadata/"));
        if is_metadata || e.start >= window {
            last_write.insert(path, e.end);
        }
    }
    // The files this answer depends on: what the request wrote, and the metadata store.
    let mut needed: Vec<String> = last_write.keys().map(|p| p.to_string()).collect();
    needed.push(db.clone());
    let mut written: Vec<_> = last_write.into_iter().collect();
    written.sort();
    for (path, line) in written {
        if !synced_after(path, line) {
            problems.push(format!(
                "{} written (line {line}), not fsync'd after that before the answer (line {}){}",
                rel(path),
                answer.start,
                hint(path, line)
            ));
        }
    }
    match first_db_write_in_window {
        None => problems.push(format!(
            "metadata/db: not written during the request: the metadata it recorded was not flushed \
             before the answer (line {})",
            answer.start
        )),
        Some(line) if !synced_after(&db, line) => problems.push(format!(
            "metadata/db written (line {line}), not fsync'd after that before the answer (line {}){}",
            answer.start,
            hint(&db, line)
        )),
        Some(_) => {}
    }

    // Directory entries: everything created during the request, every file and
    // directory leading to what it depends on, and the metadata store's own, as
    // long as they are still there.
    let mut created: Vec<Created> = Vec::new();
    fn removed(created: &mut Vec<Created>, path: &str) {
        created.retain(|c| c.path != path);
    }
    for e in events.iter().filter(before) {
        match e.name.as_str() {
            "mkdir" | "mkdirat" => {
                if let Some(path) = e.string_arg(0).filter(|p| in_scope(p)) {
                    created.push(Created {
                        path: path.to_owned(),
                        line: e.end,
                    });
                }
            }
            "open" | "openat" | "creat" if e.name == "creat" || e.args.contains("O_CREAT") => {
                if let Some(path) = e.returned_path().filter(|p| in_scope(p)) {
                    if !created.iter().any(|c| c.path == path) {
                        created.push(Created {
                            path: path.to_owned(),
                            line: e.end,
                        });
                    }
                }
            }
            "rename" | "renameat" | "renameat2" => {
                if let (Some(from), Some(to)) = (e.string_arg(0), e.string_arg(1)) {
                    removed(&mut created, from);
                    if in_scope(to) {
                        removed(&mut created, to);
                        created.push(Created {
                            path: to.to_owned(),
                            line: e.end,
                        });
                    }
                }
            }
            "unlink" | "unlinkat" | "rmdir" => {
                if let Some(path) = e.string_arg(0) {
                    removed(&mut created, path);
                }
            }
            _ => {}
        }
    }
    let metadata_dir = format!("{data}/metadata");
    let leads_to = |c: &Created| {
        needed.iter().any(|n| {
            n == &c.path
                || n.strip_prefix(&c.path)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
    };
    created.retain(|c| {
        c.line >= window
            || c.path == metadata_dir
            || c.path.starts_with(&format!("{metadata_dir}/"))
            || leads_to(c)
    });
    for c in &created {
        let parent = Path::new(&c.path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !synced_after(&parent, c.line) {
            let parent_name = if parent == data {
                "the data directory".to_owned()
            } else {
                rel(&parent)
            };
            problems.push(format!(
                "{} created (line {}), but {parent_name} was not fsync'd after that before the answer (line {})",
                rel(&c.path),
                c.line,
                answer.start
            ));
        }
    }
    problems
}
