//! The `cin` binary as a user runs it: a child process against a real POP, its
//! stdout, stderr and exit status checked. URL mistakes and a missing POP say
//! what to fix; upload, download (continued from a partial file), metadata and
//! delete; `--json` progress, results and errors; `--resume` of a finished
//! upload; apps that require security; a full disk waited for; Ctrl-C.
//!
//! The binary is `target/<profile>/cin`, beside this test binary's `deps/`
//! directory. `cargo nextest run --workspace` (and `cargo test --workspace`)
//! builds it, because cin-client has integration tests that run it; a run of
//! only these tests needs `cargo build -p cin-client --bin cin` first, and a
//! binary older than the client's sources is refused. `CIN_TEST_CIN_BINARY`
//! runs another build instead.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use cin_edge::auth::sign_policy;
use cin_edge::config::AppConfig;
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::fault_proxy::{FaultProxy, Faults};
use crate::support::{
    random_bytes, sha256_hex, spawn_app, spawn_app_in, spawn_app_with, SmallFs, TestApp, MIB,
};

/// Guards the waits for a child's output; never reached when things work.
const DEADLINE: Duration = Duration::from_secs(120);

/// The `cin` binary, checked to be newer than every source file of the client.
fn cin_binary() -> PathBuf {
    if let Some(binary) = std::env::var_os("CIN_TEST_CIN_BINARY") {
        return binary.into();
    }
    let exe = std::env::current_exe().expect("test binary");
    // target/<profile>/deps/e2e-HASH -> target/<profile>/cin
    let binary = exe
        .parent()
        .and_then(Path::parent)
        .expect("the test binary's directory")
        .join("cin");
    let built = std::fs::metadata(&binary)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "{} is missing: build it with `cargo build -p cin-client --bin cin` \
                 (`cargo nextest run --workspace` builds it)",
                binary.display()
            )
        });
    let client = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cin-client");
    let mut sources = vec![client.join("Cargo.toml")];
    for entry in std::fs::read_dir(client.join("src")).expect("cin-client sources") {
        sources.push(entry.expect("source entry").path());
    }
    for source in sources {
        let changed = std::fs::metadata(&source)
            .and_then(|m| m.modified())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        assert!(
            changed <= built,
            "{} is older than {}: rebuild it with `cargo build -p cin-client --bin cin`",
            binary.display(),
            source.display()
        );
    }
    binary
}

/// A place for one test's files, and `cin` commands that see only it: no
/// config file or upload state of the machine's user, no CIN_* variables.
struct Work {
    dir: TempDir,
}

impl Work {
    fn new() -> Work {
        Work {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.path(name);
        std::fs::write(&path, bytes).expect("write file");
        path.to_str().expect("utf-8 path").to_owned()
    }

    fn cin(&self, args: &[&str]) -> Command {
        let mut command = Command::new(cin_binary());
        command
            .args(args)
            .env("HOME", self.dir.path())
            .env("XDG_CONFIG_HOME", self.path("config"))
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        for var in [
            "CIN_POP",
            "CIN_CONFIG",
            "CIN_APIKEY",
            "CIN_POLICY",
            "CIN_SIGNATURE",
            "CIN_SECRET",
            "CIN_STATE_DIR",
            "RUST_LOG",
        ] {
            command.env_remove(var);
        }
        command
    }

    /// Runs `cin` to completion off the async runtime.
    async fn run(&self, args: &[&str]) -> Run {
        self.run_command(self.cin(args)).await
    }

    /// Runs `command` to completion within [`DEADLINE`].
    async fn run_command(&self, command: Command) -> Run {
        Running::spawn(command).finish().await
    }
}

/// What a finished `cin` printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn ok(self) -> Run {
        assert_eq!(
            self.code,
            Some(0),
            "cin failed\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    fn failed(self, code: i32) -> Run {
        assert_eq!(
            self.code,
            Some(code),
            "cin should fail with {code}\nstdout: {}\nstderr: {}",
            self.stdout,
            self.stderr
        );
        self
    }

    /// Every stdout line, each of which must be a JSON object.
    fn json(&self) -> Vec<Value> {
        json_lines(&self.stdout)
    }
}

#[track_caller]
fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A running `cin` whose stderr lines arrive on a channel as it prints them.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    fn spawn(mut command: Command) -> Running {
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start cin");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Lossy: a line that is not UTF-8 must not stop the reading.
            for line in BufReader::new(stderr).split(b'\n').map_while(Result::ok) {
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        });
        Running {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (off the runtime) for the first stderr line `wanted` accepts.
    async fn wait_for_line(&mut self, wanted: impl Fn(&str) -> bool) -> String {
        loop {
            let next = tokio::task::block_in_place(|| self.lines.recv_timeout(DEADLINE));
            match next {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "cin never printed the line waited for; it printed:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (off the runtime, within [`DEADLINE`]) for the exit; returns what
    /// it printed (stderr: every line).
    async fn finish(self) -> Run {
        tokio::task::spawn_blocking(move || self.wait_blocking())
            .await
            .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }

    fn wait_blocking(mut self) -> Run {
        let mut stdout = self.child.stdout.take().expect("stdout");
        let (tx, out) = mpsc::channel();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = tx.send(stdout.read_to_end(&mut bytes).map(|_| bytes));
        });
        // Its stdout closes when cin exits; a cin that hangs is killed (on drop).
        let stdout = match out.recv_timeout(DEADLINE) {
            Ok(read) => read.expect("read cin's stdout"),
            Err(_) => self.ran_out(),
        };
        let status = self.child.wait().expect("wait for cin");
        loop {
            match self.lines.recv_timeout(DEADLINE) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => self.ran_out(),
            }
        }
        Run {
            code: status.code(),
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: self.seen.join("\n"),
        }
    }

    fn ran_out(&mut self) -> ! {
        self.seen.extend(self.lines.try_iter());
        panic!(
            "cin did not finish within {DEADLINE:?}; its stderr:\n{}",
            self.seen.join("\n")
        )
    }
}

impl Drop for Running {
    /// A test that fails midway leaves no `cin` running (after [`Running::finish`]
    /// it has exited already, and this does nothing).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A POP whose public URL (in upload URLs and filelinks) is the proxy, so every
/// byte crosses it.
async fn pop_behind(faults: Faults) -> (TestApp, FaultProxy) {
    let proxy = FaultProxy::start(faults).await;
    let url = proxy.url();
    let app = spawn_app_with(|c| c.server.public_url = url).await;
    proxy.set_upstream(&app.base);
    (app, proxy)
}

fn upload_result(run: &Run) -> Value {
    let lines = run.json();
    assert_eq!(lines.len(), 1, "one result object: {lines:?}");
    assert!(lines[0]["handle"].is_string(), "{}", lines[0]);
    lines[0].clone()
}

fn port_of(base: &str) -> &str {
    base.rsplit(':').next().expect("port")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pop_url_mistakes_and_a_missing_pop_say_what_to_fix() {
    let app = spawn_app().await;
    let work = Work::new();
    let file = work.file("a.txt", b"hello");
    let port = port_of(&app.base);

    // No scheme.
    let bare = format!("127.0.0.1:{port}");
    let run = work.run(&["--pop", &bare, "upload", &file]).await.failed(1);
    assert!(
        run.stderr.contains("add http:// or https://")
            && run.stderr.contains(&format!("http://{bare}")),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("builder error"), "{}", run.stderr);

    // https:// against a POP that speaks plain HTTP.
    let https = format!("https://127.0.0.1:{port}");
    for args in [
        vec!["upload", file.as_str()],
        vec!["status", "00AAAAAAAAAAAAAAAAAA"],
    ] {
        let run = work
            .run(&[&["--pop", &https][..], &args].concat())
            .await
            .failed(1);
        assert!(
            run.stderr.contains("the POP answered plain HTTP")
                && run.stderr.contains("use http://"),
            "{}",
            run.stderr
        );
        assert!(!run.stderr.contains("InvalidContentType"), "{}", run.stderr);
    }

    // A path the POP serves nothing at.
    let wrong = format!("{}/cin", app.base);
    let run = work
        .run(&["--pop", &wrong, "upload", &file])
        .await
        .failed(1);
    assert!(
        run.stderr
            .contains(&format!("the POP answered 404 at {wrong}/multipart/start"))
            && run.stderr.contains("is the POP URL's path right?"),
        "{}",
        run.stderr
    );
    // An unknown handle at the right URL is not a wrong path.
    let run = work
        .run(&["--pop", &app.base, "status", "00AAAAAAAAAAAAAAAAAA"])
        .await
        .failed(1);
    assert!(run.stderr.contains("404 file_not_found"), "{}", run.stderr);
    assert!(!run.stderr.contains("path right"), "{}", run.stderr);

    // No POP anywhere: every way to give one is named, with the config file's path.
    let run = work
        .run(&["status", "00AAAAAAAAAAAAAAAAAA"])
        .await
        .failed(1);
    let config_path = work.path("config").join("cin").join("config.toml");
    for needle in [
        "no POP to talk to",
        "--pop URL",
        "CIN_POP",
        config_path.to_str().expect("utf-8"),
    ] {
        assert!(run.stderr.contains(needle), "{needle:?} in {}", run.stderr);
    }
    // ...and each of them works: the variable, then the config file.
    let mut command = work.cin(&["upload", &file]);
    command.env("CIN_POP", &app.base);
    work.run_command(command).await.ok();
    std::fs::create_dir_all(config_path.parent().expect("dir")).expect("config dir");
    std::fs::write(&config_path, format!("pops = [\"{}\"]\n", app.base)).expect("config");
    let run = work.run(&["upload", &file]).await.ok();
    assert!(run.stdout.contains("handle="), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_download_metadata_and_delete() {
    let app = spawn_app().await;
    let work = Work::new();
    let bytes = random_bytes(3 * MIB + 123, 7);
    let file = work.file("movie.bin", &bytes);
    let pop = ["--pop", app.base.as_str()];

    let run = work
        .run(&[&pop[..], &["upload", &file, "--json"]].concat())
        .await
        .ok();
    let handle = upload_result(&run)["handle"]
        .as_str()
        .expect("handle")
        .to_owned();

    // Human upload output ends with the time and the speed.
    let run = work
        .run(&[&pop[..], &["upload", &file]].concat())
        .await
        .ok();
    let last = run.stderr.lines().last().unwrap_or_default();
    assert!(
        last.contains("uploaded 3.00 MiB in ") && last.ends_with("/s"),
        "{}",
        run.stderr
    );

    // The whole file, byte for byte, and where it went.
    let out = work.path("out.bin");
    let out_arg = out.to_str().expect("utf-8");
    let run = work
        .run(&[&pop[..], &["download", &handle, "-o", out_arg]].concat())
        .await
        .ok();
    assert!(
        run.stdout.contains(&format!("wrote {handle} to {out_arg}")),
        "{}",
        run.stdout
    );
    assert_eq!(
        sha256_hex(&std::fs::read(&out).expect("read")),
        sha256_hex(&bytes)
    );
    // Again: already whole, nothing fetched.
    let run = work
        .run(&[&pop[..], &["download", &handle, "-o", out_arg]].concat())
        .await
        .ok();
    assert!(run.stderr.contains("complete already"), "{}", run.stderr);

    // A partial file is continued from where it ends.
    let partial = work.path("partial.bin");
    std::fs::write(&partial, &bytes[..MIB]).expect("partial");
    let partial_arg = partial.to_str().expect("utf-8");
    let run = work
        .run(
            &[
                &pop[..],
                &["download", &handle, "-o", partial_arg, "--json"],
            ]
            .concat(),
        )
        .await
        .ok();
    let report = &run.json()[0];
    assert_eq!(report["resumed_from"], MIB, "{report}");
    assert_eq!(report["received"], bytes.len() - MIB, "{report}");
    assert_eq!(
        sha256_hex(&std::fs::read(&partial).expect("read")),
        sha256_hex(&bytes)
    );
    // A "partial" file longer than the file is none.
    std::fs::write(&partial, vec![0u8; bytes.len() + 1]).expect("too long");
    let run = work
        .run(&[&pop[..], &["download", &handle, "-o", partial_arg]].concat())
        .await
        .failed(1);
    assert!(run.stderr.contains("no partial download"), "{}", run.stderr);

    // Without -o: the file's own name, in the current directory.
    let here = work.path("here");
    std::fs::create_dir(&here).expect("dir");
    let mut command = work.cin(&[&pop[..], &["download", &handle]].concat());
    command.current_dir(&here);
    work.run_command(command).await.ok();
    assert_eq!(
        sha256_hex(&std::fs::read(here.join("movie.bin")).expect("named after the file")),
        sha256_hex(&bytes)
    );
    // A file of that name is left alone: only an explicit -o continues one.
    let mut command = work.cin(&[&pop[..], &["download", &handle]].concat());
    command.current_dir(&here);
    let run = work.run_command(command).await.failed(1);
    assert!(
        run.stderr.contains("movie.bin exists; pass -o movie.bin"),
        "{}",
        run.stderr
    );
    assert_eq!(
        sha256_hex(&std::fs::read(here.join("movie.bin")).expect("still there")),
        sha256_hex(&bytes)
    );

    // The POP's metadata, as JSON.
    let run = work
        .run(&[&pop[..], &["metadata", &handle]].concat())
        .await
        .ok();
    let meta: Value = serde_json::from_str(&run.stdout).expect("metadata JSON");
    assert_eq!(meta["handle"], handle.as_str());
    assert_eq!(meta["filename"], "movie.bin");
    assert_eq!(meta["size"], bytes.len());

    // Deleting needs the app's key; then the file is gone for every command.
    let run = work
        .run(&[&pop[..], &["delete", &handle]].concat())
        .await
        .failed(1);
    assert!(run.stderr.contains("--apikey"), "{}", run.stderr);
    let run = work
        .run(&[&pop[..], &["delete", &handle, "--apikey", "k"]].concat())
        .await
        .ok();
    assert_eq!(run.stdout.trim(), format!("deleted {handle}"));
    for command in ["metadata", "download", "status"] {
        let mut args = vec!["--pop", app.base.as_str(), command, handle.as_str()];
        if command == "download" {
            args.extend(["-o", out_arg]);
        }
        let run = work.run(&args).await.failed(1);
        assert!(
            run.stderr.contains("404 deleted") && run.stderr.contains("was deleted"),
            "{command}: {}",
            run.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_help_and_argument_checks() {
    let work = Work::new();
    for shell in ["bash", "zsh", "fish"] {
        let run = work.run(&["completions", shell]).await.ok();
        for word in ["upload", "download", "delete", "metadata", "wait", "pop"] {
            assert!(run.stdout.contains(word), "{shell}: {word}");
        }
    }
    // Rejected when parsed, before any POP is asked (there is none here).
    let run = work
        .run(&[
            "--pop",
            "http://127.0.0.1:9",
            "wait",
            "00AAAAAAAAAAAAAAAAAA",
            "--until",
            "Bogus",
        ])
        .await
        .failed(2);
    assert!(
        run.stderr.contains("invalid value 'Bogus'")
            && run.stderr.contains("Uploading, InTransit, Stored"),
        "{}",
        run.stderr
    );
    let run = work.run(&["download", "--help"]).await.ok();
    assert!(run.stdout.contains("Where to write it"), "{}", run.stdout);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_has_progress_lines_a_result_and_coded_errors() {
    // A capped link, so the upload takes a few seconds and reports as it goes.
    let (app, proxy) = pop_behind(Faults {
        bandwidth: Some(4 * MIB as u64),
        ..Faults::default()
    })
    .await;
    let work = Work::new();
    let bytes = random_bytes(10 * MIB, 10);
    let file = work.file("big.bin", &bytes);
    let pop = proxy.url();
    let run = work
        .run(&["--pop", &pop, "--json", "upload", &file])
        .await
        .ok();
    let result = upload_result(&run);
    assert_eq!(result["size"], bytes.len());
    assert_eq!(result["file"], file.as_str());
    let progress: Vec<Value> = json_lines(&run.stderr)
        .into_iter()
        .filter(|l| l["type"] == "progress")
        .collect();
    assert!(progress.len() >= 3, "{progress:?}");
    for line in &progress {
        assert_eq!(line["total"], bytes.len(), "{line}");
        assert_eq!(line["handle"], result["handle"], "{line}");
        assert!(line["sent"].is_u64() && line["rate"].is_u64(), "{line}");
    }
    assert_eq!(progress.last().expect("last")["sent"], bytes.len());
    assert!(progress.iter().any(|l| l["rate"].as_u64() > Some(0)));
    // At most one line every 500 ms, but for the first and the last.
    let inner = &progress[1..progress.len() - 1];
    for pair in inner.windows(2) {
        let gap = pair[1]["elapsed_ms"].as_u64().unwrap() - pair[0]["elapsed_ms"].as_u64().unwrap();
        assert!(gap >= 499, "{pair:?}");
    }
    assert_eq!(
        sha256_hex(&app.download(result["handle"].as_str().unwrap()).await),
        sha256_hex(&bytes)
    );

    // Failures: an error object with a stable code, and the message.
    let missing = work.path("missing.bin");
    let run = work
        .run(&["--pop", &pop, "--json", "upload", missing.to_str().unwrap()])
        .await
        .failed(1);
    let error = &run.json()[0];
    assert_eq!(error["error"]["code"], "io", "{error}");
    assert!(error["error"]["message"]
        .as_str()
        .unwrap()
        .contains("missing.bin"));
    let wrong = format!("{pop}/nope");
    let run = work
        .run(&["--pop", &wrong, "--json", "upload", &file])
        .await
        .failed(1);
    assert_eq!(
        run.json()[0]["error"]["code"],
        "wrong_path",
        "{}",
        run.stdout
    );
    let run = work.run(&["--json", "status", "x"]).await.failed(1);
    assert_eq!(run.json()[0]["error"]["code"], "no_pop", "{}", run.stdout);
    let run = work
        .run(&["--pop", "localhost:1", "--json", "status", "x"])
        .await
        .failed(1);
    assert_eq!(
        run.json()[0]["error"]["code"],
        "bad_pop_url",
        "{}",
        run.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_a_finished_upload_prints_its_handle_and_sends_nothing() {
    let app = spawn_app().await;
    let work = Work::new();
    let bytes = random_bytes(2 * MIB, 2);
    let file = work.file("done.bin", &bytes);
    let state = work.path("state");
    let state_arg = state.to_str().expect("utf-8");
    let args = [
        "--pop",
        app.base.as_str(),
        "--json",
        "upload",
        &file,
        "--state-dir",
        state_arg,
    ];
    let first = upload_result(&work.run(&args).await.ok());
    let started = app.metric("cin_uploads_started_total").await;

    let run = work.run(&[&args[..], &["--resume"]].concat()).await.ok();
    let again = upload_result(&run);
    assert_eq!(again["handle"], first["handle"]);
    assert_eq!(again["url"], first["url"]);
    assert_eq!(again["already_uploaded"], true);
    assert_eq!(again["sent_bytes"], 0);
    assert_eq!(
        app.metric("cin_uploads_started_total").await,
        started,
        "no upload started"
    );
    // People are told so.
    let run = work
        .run(&[
            "--pop",
            &app.base,
            "upload",
            &file,
            "--state-dir",
            state_arg,
            "--resume",
        ])
        .await
        .ok();
    let handle = first["handle"].as_str().unwrap();
    assert!(
        run.stderr.contains("was uploaded already") && run.stderr.contains(handle),
        "{}",
        run.stderr
    );
    assert!(
        run.stdout.contains(&format!("handle={handle}")),
        "{}",
        run.stdout
    );

    // A changed file is another file: uploaded anew.
    std::fs::write(&file, random_bytes(MIB, 3)).expect("rewrite");
    let changed = upload_result(&work.run(&[&args[..], &["--resume"]].concat()).await.ok());
    assert_ne!(changed["handle"], first["handle"]);
    assert_eq!(changed["already_uploaded"], false);
}

const SECRET: &str = "cli-app-secret";

fn in_an_hour() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 3600
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_that_require_security_work_with_a_secret_or_a_signed_policy() {
    let app = spawn_app_with(|c| {
        c.apps.insert(
            "secure".into(),
            AppConfig {
                apikey: "SECUREKEY".into(),
                secret: SECRET.into(),
                require_security: true,
                ..Default::default()
            },
        );
    })
    .await;
    let work = Work::new();
    let bytes = random_bytes(MIB + 5, 11);
    let file = work.file("secret.bin", &bytes);
    let base = ["--pop", app.base.as_str(), "--apikey", "SECUREKEY"];

    // Without a policy: refused, saying how to give one.
    let run = work
        .run(&[&base[..], &["upload", &file]].concat())
        .await
        .failed(1);
    assert!(
        run.stderr.contains("this app requires a security policy")
            && run.stderr.contains("--secret")
            && run.stderr.contains("--policy"),
        "{}",
        run.stderr
    );
    // A wrong secret: the POP says the signature does not match.
    let run = work
        .run(&[&base[..], &["--secret", "wrong", "upload", &file]].concat())
        .await
        .failed(1);
    assert!(
        run.stderr.contains("signature does not match"),
        "{}",
        run.stderr
    );

    // With the secret every command signs the policy it needs.
    let secret = [&base[..], &["--secret", SECRET]].concat();
    let run = work
        .run(&[&secret[..], &["--json", "upload", &file]].concat())
        .await
        .ok();
    let handle = upload_result(&run)["handle"].as_str().unwrap().to_owned();
    let run = work
        .run(&[&secret[..], &["status", &handle]].concat())
        .await
        .ok();
    assert!(
        run.stdout.contains(&format!("size={}", bytes.len())),
        "{}",
        run.stdout
    );
    work.run(&[&secret[..], &["metadata", &handle]].concat())
        .await
        .ok();
    let run = work
        .run(
            &[
                &secret[..],
                &["wait", &handle, "--until", "InTransit", "--timeout", "30"],
            ]
            .concat(),
        )
        .await
        .ok();
    assert!(run.stdout.contains(&handle), "{}", run.stdout);
    let out = work.path("secret.out");
    let out_arg = out.to_str().unwrap();
    work.run(&[&secret[..], &["download", &handle, "-o", out_arg]].concat())
        .await
        .ok();
    assert_eq!(
        sha256_hex(&std::fs::read(&out).unwrap()),
        sha256_hex(&bytes)
    );
    // Without it, reading is refused too.
    let run = work
        .run(&[&base[..], &["metadata", &handle]].concat())
        .await
        .failed(1);
    assert!(
        run.stderr.contains("requires a security policy"),
        "{}",
        run.stderr
    );

    // A policy signed elsewhere, from the variables, for what it allows.
    let policy = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"expiry": in_an_hour(), "call": ["store", "stat", "read"]}).to_string());
    let signature = sign_policy(SECRET, &policy);
    let mut command = work.cin(&[&base[..], &["--json", "upload", &file]].concat());
    command
        .env("CIN_POLICY", &policy)
        .env("CIN_SIGNATURE", &signature);
    let second = upload_result(&work.run_command(command).await.ok());
    let second = second["handle"].as_str().unwrap().to_owned();
    let signed = [&base[..], &["--policy", &policy, "--signature", &signature]].concat();
    let run = work
        .run(&[&signed[..], &["metadata", &second]].concat())
        .await
        .ok();
    assert!(run.stdout.contains("secret.bin"), "{}", run.stdout);
    // This policy does not allow remove: refused, and said so.
    let run = work
        .run(&[&signed[..], &["delete", &second]].concat())
        .await
        .failed(1);
    assert!(run.stderr.contains("not \"remove\""), "{}", run.stderr);

    // The config file's keys: the secret deletes.
    let config = work.path("cin.toml");
    std::fs::write(
        &config,
        format!(
            "pops = [\"{}\"]\napikey = \"SECUREKEY\"\nsecret = \"{SECRET}\"\n",
            app.base
        ),
    )
    .unwrap();
    let config_arg = config.to_str().unwrap();
    let run = work
        .run(&["--config", config_arg, "delete", &second])
        .await
        .ok();
    assert_eq!(run.stdout.trim(), format!("deleted {second}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_waited_for_as_the_pop_asks() {
    let Some(fs) = SmallFs::mount(64) else {
        return;
    };
    let origin = tempfile::tempdir().expect("origin");
    let origin_path = origin.path().to_path_buf();
    let app = spawn_app_in(&fs.path().join("data"), move |c| {
        if let Some(p) = c.storage.profiles.get_mut("default") {
            p.path = origin_path;
        }
        c.disk.retry_after_secs = 1;
    })
    .await;
    let work = Work::new();
    let bytes = random_bytes(4 * MIB, 4);
    let file = work.file("wait.bin", &bytes);
    let filler = fs.fill_leaving(MIB as u64);

    let mut cin = Running::spawn(work.cin(&["--pop", &app.base, "--json", "upload", &file]));
    // The POP answered 507 with Retry-After: cin says it waits, rather than give up.
    let waiting = cin
        .wait_for_line(|l| l.contains("\"type\":\"waiting\""))
        .await;
    let waiting: Value = serde_json::from_str(&waiting).expect("JSON line");
    assert_eq!(waiting["code"], "insufficient_storage", "{waiting}");
    assert_eq!(waiting["delay_ms"], 1000, "{waiting}");
    filler.remove();

    let run = cin.finish().await.ok();
    let result = upload_result(&run);
    assert_eq!(
        sha256_hex(&app.download(result["handle"].as_str().unwrap()).await),
        sha256_hex(&bytes)
    );
    // One POP: there is no "next POP" to try.
    assert!(!run.stderr.contains("next POP"), "{}", run.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_says_how_to_resume_and_the_command_does() {
    let (app, proxy) = pop_behind(Faults {
        bandwidth: Some(4 * MIB as u64),
        ..Faults::default()
    })
    .await;
    let work = Work::new();
    // One part at a time: after the first part's acknowledgment the next one
    // takes seconds, so the interruption surely comes mid-upload.
    let bytes = random_bytes(24 * MIB, 16);
    let file = work.file("long.bin", &bytes);
    let state = work.path("state");
    let pop = proxy.url();
    let mut cin = Running::spawn(work.cin(&[
        "--pop",
        &pop,
        "--json",
        "upload",
        &file,
        "--state-dir",
        state.to_str().unwrap(),
        "--max-parallel",
        "1",
    ]));
    let line = cin
        .wait_for_line(|l| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["type"] == "progress" && v["sent"].as_u64() > Some(0))
        })
        .await;
    let progress: Value = serde_json::from_str(&line).unwrap();
    let pid = i32::try_from(cin.child.id()).expect("pid");
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let run = cin.finish().await.failed(130);
    let error = &run.json()[0];
    assert_eq!(error["error"]["code"], "interrupted", "{error}");
    let resume = error["resume"].as_str().expect("resume command");
    assert_eq!(
        resume,
        format!(
            "cin --pop {pop} upload --resume --state-dir {} {file}",
            state.display()
        )
    );
    assert!(error["error"]["message"].as_str().unwrap().contains(resume));

    // The printed command continues the same upload.
    let words: Vec<&str> = resume.split(' ').collect();
    let run = work.run(&words[1..]).await.ok();
    assert!(
        run.stdout
            .contains(&format!("handle={}", progress["handle"].as_str().unwrap())),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("sent before"), "{}", run.stderr);
    assert_eq!(
        sha256_hex(&app.download(progress["handle"].as_str().unwrap()).await),
        sha256_hex(&bytes)
    );
}
