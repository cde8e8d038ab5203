//! The deploy kit (deploy/, .dockerignore) checked with the real tools: the unit
//! with systemd-analyze, its sysusers and tmpfiles snippets with systemd-sysusers
//! and systemd-tmpfiles in a scratch root, the Dockerfile with hadolint, the
//! manifests with kubernetes-validate (bundled Kubernetes schemas). And the
//! command, configuration and environment that the unit, the image and the
//! StatefulSet give the POP start a real one, whose health check then passes.
//!
//! The tools come from scripts/test: Debian's systemd package, and hadolint and
//! kubernetes-validate in the venv (CIN_TEST_HADOLINT, CIN_TEST_KUBERNETES_VALIDATE).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::support::{Pop, PopProcess};

const UNIT: &str = "deploy/systemd/cin-edge.service";
const SYSUSERS: &str = "deploy/systemd/cin-edge.sysusers";
const TMPFILES: &str = "deploy/systemd/cin-edge.tmpfiles";
const DOCKERFILE: &str = "deploy/container/Dockerfile";
const MANIFEST: &str = "deploy/kubernetes/cin-edge.yaml";
const DEFAULT_CONFIG: &str = "config/default.toml";

/// Where the unit and the image expect the binary and the configuration.
const INSTALLED_BINARY: &str = "/usr/local/bin/cin-edge";
const INSTALLED_CONFIG: &str = "/etc/cin-edge/config.toml";

/// Background workers a POP may run (crates/cin-edge/src/app.rs `start_workers`:
/// replication, webhooks, eviction, sweep, store probes, disk watch, certificate
/// watch); at shutdown each gets server.worker_stop_secs, one after another.
const MAX_WORKERS: u64 = 7;

/// Exposure (systemd-analyze security, tenths: 35 is 3.5 "OK") the unit may not
/// exceed: its hardening stays. The unit without it scores 8.5.
const MAX_EXPOSURE: &str = "35";

const HEALTHCHECK: &str = r#"HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["/usr/local/bin/cin-edge", "admin", "health", "--config", "/etc/cin-edge/config.toml"]"#;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The cin-edge binary under test, as an absolute path (systemd wants one).
fn pop_binary() -> PathBuf {
    let binary = std::env::var_os("CIN_TEST_POP_BINARY")
        .map(PathBuf::from)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_cin-edge").into());
    std::fs::canonicalize(&binary)
        .unwrap_or_else(|e| panic!("the cin-edge binary {}: {e}", binary.display()))
}

/// A tool named by `var` (scripts/test sets it), else found on PATH.
fn tool(var: Option<&str>, name: &str, installed_by: &str) -> PathBuf {
    if let Some(path) = var.and_then(std::env::var_os) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{}={} does not exist; {installed_by}",
            var.unwrap_or_default(),
            path.display()
        );
        return path;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            let set = var.map(|v| format!(" (or set {v})")).unwrap_or_default();
            panic!("{name} is not on PATH{set}; {installed_by}")
        })
}

fn systemd_tool(name: &str) -> PathBuf {
    tool(
        None,
        name,
        "it comes with Debian's systemd package, which scripts/test installs",
    )
}

fn venv_tool(var: &str, name: &str) -> PathBuf {
    tool(
        Some(var),
        name,
        "scripts/test installs it into .venv from tests/deploy/requirements.txt",
    )
}

fn python() -> PathBuf {
    let python = std::env::var_os("CIN_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        python.is_file(),
        "no Python at {} (with PyYAML): run scripts/test, or set CIN_TEST_PYTHON",
        python.display()
    );
    python
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("could not run {command:?}: {e}"))
}

/// What a command printed, both streams.
fn printed(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

// ---- systemd ----

/// The values of `key=` in a unit's text, in order.
fn unit_values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|line| line.trim().strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim().to_owned())
        .collect()
}

fn unit_value(unit: &str, key: &str) -> String {
    let values = unit_values(unit, key);
    assert_eq!(values.len(), 1, "{UNIT} must set {key}= once: {values:?}");
    values[0].clone()
}

/// The unit as installed with the binary under test in place of /usr/local/bin/cin-edge.
fn unit_with_binary(unit: &str, binary: &Path) -> String {
    let from = format!("ExecStart={INSTALLED_BINARY} ");
    assert!(unit.contains(&from), "{UNIT} must run {INSTALLED_BINARY}");
    unit.replace(&from, &format!("ExecStart={} ", binary.display()))
}

/// `systemd-analyze verify`: it exits 0 even for unknown keys and bad values, which
/// it only prints, so anything printed fails too.
fn verify_unit(unit_text: &str, dir: &Path) -> Result<(), String> {
    let path = dir.join("cin-edge.service");
    std::fs::write(&path, unit_text).expect("write the unit");
    let output = run(Command::new(systemd_tool("systemd-analyze"))
        .arg("verify")
        .arg(&path));
    let said = printed(&output);
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("{}: {said}", output.status))
    }
}

fn security_exposure_ok(unit_text: &str, dir: &Path) -> Result<(), String> {
    let path = dir.join("cin-edge.service");
    std::fs::write(&path, unit_text).expect("write the unit");
    let output = run(Command::new(systemd_tool("systemd-analyze"))
        .args(["security", "--offline=yes", "--no-pager"])
        .arg(format!("--threshold={MAX_EXPOSURE}"))
        .arg(&path));
    let said = printed(&output);
    let overall = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_default()
        .to_owned();
    if output.status.success() {
        Ok(())
    } else {
        Err(format!("{}: {overall}\n{said}", output.status))
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    let unit = read(UNIT);
    let dir = tempfile::tempdir().unwrap();
    let installed = unit_with_binary(&unit, &pop_binary());
    if let Err(e) = verify_unit(&installed, dir.path()) {
        panic!("systemd-analyze verify {UNIT} (ExecStart on the built binary) found: {e}");
    }

    // The same check fails on broken copies: a misspelt key, a bad value, and the
    // unit as shipped where no binary is installed.
    let misspelt = installed.replacen("\nProtectSystem=", "\nProtectSytem=", 1);
    assert_ne!(misspelt, installed);
    let err = verify_unit(&misspelt, dir.path()).expect_err("a misspelt key must fail");
    assert!(err.contains("Unknown key 'ProtectSytem'"), "{err}");
    let bad_value = installed.replacen("\nProtectSystem=strict", "\nProtectSystem=strickt", 1);
    assert_ne!(bad_value, installed);
    let err = verify_unit(&bad_value, dir.path()).expect_err("a bad value must fail");
    assert!(err.contains("strickt"), "{err}");
    let missing = unit_with_binary(&unit, &dir.path().join("no-such-cin-edge"));
    let err = verify_unit(&missing, dir.path()).expect_err("a missing binary must fail");
    assert!(err.contains("is not executable"), "{err}");
}

#[test]
fn systemd_unit_keeps_its_hardening() {
    let unit = read(UNIT);
    let dir = tempfile::tempdir().unwrap();
    let installed = unit_with_binary(&unit, &pop_binary());
    if let Err(e) = security_exposure_ok(&installed, dir.path()) {
        panic!("systemd-analyze security rates {UNIT} above {MAX_EXPOSURE}: {e}");
    }
    for (key, value) in [
        ("NoNewPrivileges", "true"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "true"),
        ("PrivateTmp", "true"),
    ] {
        assert_eq!(unit_value(&unit, key), value, "{UNIT}: {key}=");
    }
    // The threshold bites: the same unit without its sandboxing fails it.
    let bare: String = installed
        .lines()
        .filter(|l| {
            ![
                "Protect",
                "Private",
                "Restrict",
                "NoNewPrivileges",
                "Capability",
            ]
            .iter()
            .any(|p| l.starts_with(p))
        })
        .map(|l| format!("{l}\n"))
        .collect();
    security_exposure_ok(&bare, dir.path())
        .expect_err("a unit without its hardening must rate above the threshold");
}

/// A user or group entry of an /etc/passwd-style file: its fields after the name.
fn account(file: &Path, name: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {}:\n{text}", file.display()))
        .split(':')
        .map(str::to_owned)
        .collect()
}

#[test]
fn sysusers_and_tmpfiles_make_the_user_and_directories_the_unit_needs() {
    let unit = read(UNIT);
    assert_eq!(unit_value(&unit, "User"), "cin-edge");
    assert_eq!(unit_value(&unit, "Group"), "cin-edge");
    assert_eq!(unit_value(&unit, "StateDirectory"), "cin-edge");
    assert!(
        unit_values(&unit, "Environment")
            .contains(&"CIN__SERVER__DATA_DIR=/var/lib/cin-edge".into()),
        "{UNIT} must point the data directory at its StateDirectory"
    );
    assert!(
        unit_value(&unit, "ExecStart").ends_with(&format!("--config {INSTALLED_CONFIG}")),
        "{UNIT} must read {INSTALLED_CONFIG}"
    );

    // A scratch root with the snippets where README.md installs them.
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let install = |from: &str, to: &str, mode: u32| {
        let to = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(repo().join(from), &to).unwrap_or_else(|e| panic!("copy {from}: {e}"));
        std::fs::set_permissions(&to, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
    };
    install(SYSUSERS, "/usr/lib/sysusers.d/cin-edge.conf", 0o644);
    install(TMPFILES, "/usr/lib/tmpfiles.d/cin-edge.conf", 0o644);
    std::fs::create_dir_all(root.join("etc")).unwrap();

    let output =
        run(Command::new(systemd_tool("systemd-sysusers"))
            .arg(format!("--root={}", root.display())));
    assert!(
        output.status.success(),
        "systemd-sysusers: {}",
        printed(&output)
    );
    let user = account(&root.join("etc/passwd"), "cin-edge");
    let group = account(&root.join("etc/group"), "cin-edge");
    let (uid, gid): (u32, u32) = (user[1].parse().unwrap(), user[2].parse().unwrap());
    assert_eq!(
        group[1].parse::<u32>().unwrap(),
        gid,
        "the user's group is cin-edge"
    );
    assert!(uid > 0 && uid < 1000, "a system user: {user:?}");
    assert_eq!(user[4], "/var/lib/cin-edge", "home");
    assert_eq!(user[5], "/usr/sbin/nologin", "shell");

    // tmpfiles, then the configuration copied carelessly (world-readable), then
    // tmpfiles again as at every boot: the secrets it may hold are the group's only.
    let tmpfiles = || {
        let output = run(Command::new(systemd_tool("systemd-tmpfiles"))
            .arg("--create")
            .arg(format!("--root={}", root.display())));
        assert!(
            output.status.success(),
            "systemd-tmpfiles (setting owners needs root, as CI has): {}",
            printed(&output)
        );
    };
    tmpfiles();
    install(DEFAULT_CONFIG, INSTALLED_CONFIG, 0o644);
    tmpfiles();
    let owned = |path: &str, mode: u32, owner: (u32, u32)| {
        let meta = std::fs::metadata(root.join(path.trim_start_matches('/')))
            .unwrap_or_else(|e| panic!("{path} not made: {e}"));
        assert_eq!(meta.mode() & 0o7777, mode, "{path} mode {:o}", meta.mode());
        assert_eq!((meta.uid(), meta.gid()), owner, "{path} owner");
    };
    owned("/etc/cin-edge", 0o750, (0, gid));
    owned(INSTALLED_CONFIG, 0o640, (0, gid));
    owned("/var/lib/cin-edge", 0o750, (uid, gid));
}

/// The budget for a clean stop: the grace period for requests, then each worker
/// in turn; the kit's timeouts give at least that.
fn stop_budget_secs() -> u64 {
    let config = cin_edge::Config::load(Some(&repo().join(DEFAULT_CONFIG)))
        .unwrap_or_else(|e| panic!("{DEFAULT_CONFIG}: {e}"));
    config.server.shutdown_grace_secs + MAX_WORKERS * config.server.worker_stop_secs
}

/// Starts the POP as `program_and_args` with `env` would, the binary under test in
/// place of the installed one and `paths` mapping installed files to the repository's.
fn start_pop(
    program_and_args: &[String],
    env: &BTreeMap<String, String>,
    paths: &BTreeMap<String, PathBuf>,
) -> PopProcess {
    assert_eq!(program_and_args[0], INSTALLED_BINARY);
    let mut command = Command::new(pop_binary());
    for arg in &program_and_args[1..] {
        match paths.get(arg) {
            Some(path) => command.arg(path),
            None => command.arg(arg),
        };
    }
    command
        .envs(env)
        .env("NO_COLOR", "1")
        // Free space is not what is tested here.
        .env("CIN__DISK__MIN_FREE_BYTES", "0")
        .env("CIN__DISK__METADATA_RESERVE_BYTES", "0");
    PopProcess::try_spawn(command)
        .unwrap_or_else(|e| panic!("{program_and_args:?} with {env:?}: {e}"))
}

/// /healthz and /readyz of a POP answer 200 with their documented bodies.
async fn assert_healthy(pop: &Pop) {
    let health = pop.http.get(pop.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), r#"{"status":"ok"}"#);
    let ready = pop.http.get(pop.url("/readyz")).send().await.unwrap();
    let status = ready.status();
    let body = ready.text().await.unwrap();
    assert_eq!(status, 200, "/readyz: {body}");
}

#[tokio::test]
async fn the_units_command_runs_a_pop_that_stops_within_its_timeout() {
    let unit = read(UNIT);
    let data = tempfile::tempdir().unwrap();
    let mut env: BTreeMap<String, String> = unit_values(&unit, "Environment")
        .iter()
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("Environment=KEY=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert_eq!(env["CIN__SERVER__DATA_DIR"], "/var/lib/cin-edge");
    env.insert(
        "CIN__SERVER__DATA_DIR".into(),
        data.path().display().to_string(),
    );
    // The configuration's own 127.0.0.1:8080 may be taken here.
    env.insert("CIN__SERVER__LISTEN".into(), "127.0.0.1:0".into());
    let exec: Vec<String> = unit_value(&unit, "ExecStart")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let paths = BTreeMap::from([(INSTALLED_CONFIG.to_owned(), repo().join(DEFAULT_CONFIG))]);
    let pop = start_pop(&exec, &env, &paths);
    assert_healthy(&pop).await;
    assert!(
        data.path().join("url-signing.key").exists(),
        "the POP keeps its state in the data directory"
    );

    let timeout: u64 = unit_value(&unit, "TimeoutStopSec")
        .parse()
        .expect("TimeoutStopSec in seconds");
    assert!(
        timeout > stop_budget_secs(),
        "TimeoutStopSec={timeout} must exceed shutdown_grace_secs + {MAX_WORKERS} x worker_stop_secs = {}",
        stop_budget_secs()
    );
    assert_eq!(unit_value(&unit, "KillSignal"), "SIGTERM");
    assert!(
        pop.terminate(Duration::from_secs(timeout)),
        "SIGTERM: exit 0"
    );
}

// ---- the container image ----

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile_instructions() -> Vec<String> {
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in read(DOCKERFILE).lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(start) => current.push_str(start),
            None => {
                current.push_str(line);
                instructions.push(std::mem::take(&mut current).trim().to_owned());
            }
        }
    }
    instructions
}

fn instructions(keyword: &str) -> Vec<String> {
    dockerfile_instructions()
        .into_iter()
        .filter_map(|i| {
            i.strip_prefix(&format!("{keyword} "))
                .map(|rest| rest.trim().to_owned())
        })
        .collect()
}

/// An exec-form array (`["a", "b"]`).
fn exec_form(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text} is not exec form: {e}"))
}

/// The image's ENV, as set by `ENV K=V \ K=V`.
fn image_env() -> BTreeMap<String, String> {
    instructions("ENV")
        .iter()
        .flat_map(|i| i.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
        .map(|kv| {
            let (k, v) = kv.split_once('=').expect("ENV KEY=VALUE");
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// What the image COPYs from the build context: (the repository's file or
/// folder, where it goes in the image).
fn image_copies() -> Vec<(PathBuf, String)> {
    instructions("COPY")
        .iter()
        .filter(|i| !i.starts_with("--from="))
        .flat_map(|i| {
            let parts: Vec<&str> = i.split_whitespace().collect();
            let (to, from) = parts.split_last().expect("COPY SRC... DEST");
            from.iter()
                .map(|f| (repo().join(f), to.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Files in the image that come from the repository, by their path in the image.
fn image_files() -> BTreeMap<String, PathBuf> {
    image_copies()
        .into_iter()
        .filter(|(from, to)| from.is_file() && !to.ends_with('/'))
        .map(|(from, to)| (to, from))
        .collect()
}

/// The image's user and group, numeric.
fn image_uid_gid() -> (u64, u64) {
    let users = instructions("USER");
    assert_eq!(users.len(), 1, "one USER: {users:?}");
    let (uid, gid) = users[0]
        .split_once(':')
        .unwrap_or_else(|| panic!("USER UID:GID, numeric, not {}", users[0]));
    let parse = |n: &str| {
        n.parse::<u64>().unwrap_or_else(|_| {
            panic!(
                "USER must be numeric (runAsNonRoot checks it): {}",
                users[0]
            )
        })
    };
    (parse(uid), parse(gid))
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = venv_tool("CIN_TEST_HADOLINT", "hadolint");
    let lint = |path: &Path| {
        // In a directory of its own: no .hadolint.yaml but the defaults.
        let output = run(Command::new(&hadolint)
            .current_dir(path.parent().unwrap())
            .args(["--no-color", "--failure-threshold", "style"])
            .arg(path));
        (output.status.success(), printed(&output))
    };
    let (ok, said) = lint(&repo().join(DOCKERFILE));
    assert!(
        ok && said.trim().is_empty(),
        "hadolint {DOCKERFILE}:\n{said}"
    );

    // It does lint: an unpinned base image fails.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("Dockerfile");
    let text = read(DOCKERFILE);
    let from = instructions("FROM").pop().expect("a FROM");
    std::fs::write(&broken, text.replace(&from, "debian:latest")).unwrap();
    let (ok, said) = lint(&broken);
    assert!(
        !ok && said.contains("DL3007"),
        "hadolint passed debian:latest:\n{said}"
    );
}

#[test]
fn image_runs_as_a_fixed_non_root_user_with_a_healthcheck_and_pinned_bases() {
    let (uid, gid) = image_uid_gid();
    assert!(uid != 0 && gid != 0, "not root");
    let run_lines = instructions("RUN").join("\n");
    assert!(
        run_lines.contains(&format!("groupadd --system --gid {gid} cin-edge")),
        "{run_lines}"
    );
    assert!(
        run_lines.contains(&format!("useradd --system --uid {uid} --gid {gid}")),
        "{run_lines}"
    );
    assert!(
        run_lines.contains(&format!("chown {uid}:{gid} /var/lib/cin-edge")),
        "{run_lines}"
    );

    let healthchecks: Vec<String> = dockerfile_instructions()
        .into_iter()
        .filter(|i| i.starts_with("HEALTHCHECK"))
        .collect();
    assert_eq!(healthchecks, [HEALTHCHECK]);

    for from in instructions("FROM") {
        let image = from.split_whitespace().next().unwrap_or_default();
        let tag = image.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        assert!(
            !tag.is_empty()
                && tag != "latest"
                && tag.chars().next().is_some_and(|c| c.is_ascii_digit()),
            "FROM {image}: pin the base image by a version tag"
        );
    }
    let entrypoint = exec_form(&instructions("ENTRYPOINT").pop().expect("ENTRYPOINT"));
    assert_eq!(
        entrypoint,
        [INSTALLED_BINARY, "serve", "--config", INSTALLED_CONFIG]
    );
    for (from, to) in image_copies() {
        assert!(from.exists(), "COPY {} {to}: no such file", from.display());
    }
    assert_eq!(
        image_files().get(INSTALLED_CONFIG),
        Some(&repo().join(DEFAULT_CONFIG))
    );
}

/// Whether Docker leaves `path` (relative to the context) out of the build context:
/// the last .dockerignore pattern matching it or one of its parent folders decides.
fn docker_ignores(patterns: &[String], path: &str) -> bool {
    fn glob(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.first(), path.first()) {
            (None, None) => true,
            (Some(&"**"), _) => {
                glob(&pattern[1..], path) || (!path.is_empty() && glob(pattern, &path[1..]))
            }
            (Some(p), Some(s)) => segment(p, s) && glob(&pattern[1..], &path[1..]),
            _ => false,
        }
    }
    fn segment(p: &str, s: &str) -> bool {
        match p.split_once('*') {
            None => p == s,
            Some((before, after)) => {
                s.starts_with(before)
                    && (0..=s.len() - before.len()).any(|i| {
                        s.is_char_boundary(before.len() + i)
                            && segment(after, &s[before.len() + i..])
                    })
            }
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    let mut ignored = false;
    for pattern in patterns {
        let (keep, pattern) = match pattern.strip_prefix('!') {
            Some(p) => (true, p),
            None => (false, pattern.as_str()),
        };
        let pattern: Vec<&str> = pattern.trim_matches('/').split('/').collect();
        if (1..=parts.len()).any(|n| glob(&pattern, &parts[..n])) {
            ignored = !keep;
        }
    }
    ignored
}

fn files_under(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files_under(&path, found);
        } else {
            found.push(path);
        }
    }
}

#[test]
fn dockerignore_sends_what_the_build_copies_and_nothing_of_target_venv_or_data() {
    let patterns: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for left_out in [
        "target/release/cin-edge",
        ".venv/bin/python",
        "data/url-signing.key",
        "tests/tus/node_modules/tus-js-client/package.json",
        "node_modules/x",
        ".git/HEAD",
        "dev-cert/key.pem",
        "crates/cin-edge/target/debug/cin-edge",
        "crates/cin-edge/data/parts/x",
    ] {
        assert!(
            docker_ignores(&patterns, left_out),
            ".dockerignore sends {left_out}"
        );
    }
    // Every file the build COPYs from the context is sent.
    let mut sent = 0;
    for (from, _) in image_copies() {
        let mut files = Vec::new();
        if from.is_dir() {
            files_under(&from, &mut files);
        } else {
            files.push(from);
        }
        for file in files {
            let rel = file.strip_prefix(repo()).expect("in the repository");
            let rel = rel.to_string_lossy();
            assert!(
                !docker_ignores(&patterns, &rel),
                ".dockerignore leaves out {rel}, which the build copies"
            );
            sent += 1;
        }
    }
    assert!(sent > 10, "the build copies the workspace: {sent} files");
    assert!(!docker_ignores(
        &patterns,
        "crates/cin-edge/assets/page/index.html"
    ));
}

/// Runs the image's ENTRYPOINT with its ENV (plus `extra`, e.g. a manifest's env),
/// listening on 0.0.0.0 as in the image but on a free port, then its HEALTHCHECK.
async fn run_image(extra: &[(String, String)]) {
    let data = tempfile::tempdir().unwrap();
    let mut env = image_env();
    assert_eq!(env["CIN__SERVER__DATA_DIR"], "/var/lib/cin-edge");
    env.insert(
        "CIN__SERVER__DATA_DIR".into(),
        data.path().display().to_string(),
    );
    env.extend(extra.iter().cloned());
    let listen = env["CIN__SERVER__LISTEN"].clone();
    let (host, _) = listen
        .rsplit_once(':')
        .expect("CIN__SERVER__LISTEN host:port");
    assert_eq!(host, "0.0.0.0", "the image listens on every interface");
    env.insert("CIN__SERVER__LISTEN".into(), format!("{host}:0"));
    let copies = image_files();
    let entrypoint = exec_form(&instructions("ENTRYPOINT").pop().expect("ENTRYPOINT"));
    let pop = start_pop(&entrypoint, &env, &copies);
    let port = pop
        .base
        .rsplit_once(':')
        .map(|(_, p)| p.to_owned())
        .expect("a port");
    let local = Pop::new(format!("http://127.0.0.1:{port}"));
    assert_healthy(&local).await;

    // The HEALTHCHECK's command, in the same environment, asks the POP that runs.
    let healthcheck = instructions("HEALTHCHECK")
        .pop()
        .unwrap_or_else(|| panic!("{DOCKERFILE} has no HEALTHCHECK"));
    let check = healthcheck
        .split_once("CMD ")
        .expect("HEALTHCHECK ... CMD")
        .1;
    env.insert("CIN__SERVER__LISTEN".into(), format!("{host}:{port}"));
    let health = |env: BTreeMap<String, String>| {
        let check = exec_form(check);
        assert_eq!(check[0], INSTALLED_BINARY);
        let mut command = Command::new(pop_binary());
        for arg in &check[1..] {
            match copies.get(arg) {
                Some(path) => command.arg(path),
                None => command.arg(arg),
            };
        }
        command.envs(env).env("NO_COLOR", "1");
        run(&mut command)
    };
    let up = health(env.clone());
    assert!(
        up.status.success(),
        "the HEALTHCHECK fails on a healthy POP: {}",
        printed(&up)
    );
    assert!(
        pop.terminate(Duration::from_secs(stop_budget_secs() + 10)),
        "SIGTERM: exit 0"
    );
    let down = health(env);
    assert!(
        !down.status.success(),
        "the HEALTHCHECK passes with no POP: {}",
        printed(&down)
    );
}

#[tokio::test]
async fn the_images_entrypoint_runs_a_pop_and_its_healthcheck_passes() {
    run_image(&[]).await;
}

// ---- Kubernetes ----

/// The manifest's documents, parsed by PyYAML.
fn manifest() -> Vec<Value> {
    let output = run(Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout)",
        ])
        .arg(repo().join(MANIFEST)));
    assert!(
        output.status.success(),
        "parsing {MANIFEST}: {}",
        printed(&output)
    );
    serde_json::from_slice(&output.stdout).expect("JSON from the YAML")
}

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn statefulset(docs: &[Value]) -> &Value {
    let sets = kind(docs, "StatefulSet");
    assert_eq!(sets.len(), 1, "one StatefulSet in {MANIFEST}");
    sets[0]
}

#[test]
fn kubernetes_manifests_validate_against_the_kubernetes_schemas() {
    let validate = venv_tool("CIN_TEST_KUBERNETES_VALIDATE", "kubernetes-validate");
    let check = |path: &Path, version: &str| {
        let output = run(Command::new(&validate)
            .args(["--strict", "--quiet", "-k", version])
            .arg(path));
        (output.status.success(), printed(&output))
    };
    // The oldest and the newest Kubernetes the kit is checked for.
    for version in ["1.30", "1.37"] {
        let (ok, said) = check(&repo().join(MANIFEST), version);
        assert!(
            ok && said.trim().is_empty(),
            "{MANIFEST} against Kubernetes {version}:\n{said}"
        );
    }
    // It does check: a misspelt field and a wrong type fail.
    let dir = tempfile::tempdir().unwrap();
    let text = read(MANIFEST);
    for (from, to, expect) in [
        (
            "readinessProbe:",
            "readinesProbe:",
            "'readinesProbe' was unexpected",
        ),
        ("fsGroup: 10001", "fsGroup: ten", "is not of type 'integer'"),
    ] {
        assert!(text.contains(from), "{MANIFEST} has no {from}");
        let broken = dir.path().join("broken.yaml");
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let (ok, said) = check(&broken, "1.37");
        assert!(!ok && said.contains(expect), "{to}: {said}");
    }
}

#[test]
fn kubernetes_statefulset_fits_the_image_and_the_pop() {
    let docs = manifest();
    let set = statefulset(&docs);
    let pod = &set["spec"]["template"]["spec"];
    let labels = &set["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&set["spec"]["selector"]["matchLabels"], labels);
    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let container = &containers[0];

    // The image: pinned to this release.
    let image = container["image"].as_str().expect("image");
    let (_, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("{image}: no tag"));
    assert_eq!(tag, env!("CARGO_PKG_VERSION"), "{image}: tag the release");

    // The port the image listens on, by name.
    let image_port: u64 = image_env()["CIN__SERVER__LISTEN"]
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .expect("the image's listen port");
    let ports = container["ports"].as_array().expect("ports");
    let http = ports
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a port named http");
    assert_eq!(http["containerPort"], image_port);
    let resolves = |port: &Value| port == &http["name"] || port == &http["containerPort"];

    // Probes: started, alive and ready by the POP's own endpoints.
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(resolves(&get["port"]), "{probe} port {}", get["port"]);
    }

    // Runs as the image's user; a fresh volume is made the group's.
    let (uid, gid) = image_uid_gid();
    let security = &pod["securityContext"];
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["runAsUser"], uid);
    assert_eq!(security["runAsGroup"], gid);
    assert_eq!(security["fsGroup"], gid);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );

    // The volume holds the data directory.
    let data_dir = &image_env()["CIN__SERVER__DATA_DIR"];
    let mounts = container["volumeMounts"].as_array().expect("volumeMounts");
    let mount = mounts
        .iter()
        .find(|m| m["mountPath"] == data_dir.as_str())
        .unwrap_or_else(|| panic!("no volume at {data_dir}"));
    let claims = set["spec"]["volumeClaimTemplates"]
        .as_array()
        .expect("volumeClaimTemplates");
    assert!(claims
        .iter()
        .any(|c| c["metadata"]["name"] == mount["name"]));

    let requests = &container["resources"]["requests"];
    assert!(
        requests["cpu"].is_string() && requests["memory"].is_string(),
        "resource requests: {requests}"
    );

    // Time to stop cleanly, as the unit has.
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("terminationGracePeriodSeconds");
    assert!(
        grace > stop_budget_secs(),
        "terminationGracePeriodSeconds {grace}"
    );
    assert_eq!(grace.to_string(), unit_value(&read(UNIT), "TimeoutStopSec"));

    // Services: the headless one governs the StatefulSet, another serves clients.
    let services = kind(&docs, "Service");
    let selects_pods = |s: &Value| {
        let selector = s["spec"]["selector"].as_object().expect("selector");
        !selector.is_empty() && selector.iter().all(|(k, v)| &labels[k] == v)
    };
    let headless = services
        .iter()
        .find(|s| s["metadata"]["name"] == set["spec"]["serviceName"])
        .expect("the Service named by serviceName");
    assert_eq!(
        headless["spec"]["clusterIP"], "None",
        "serviceName's Service is headless"
    );
    let clients: Vec<_> = services
        .iter()
        .filter(|s| s["spec"]["clusterIP"] != "None")
        .collect();
    assert_eq!(clients.len(), 1, "one client-facing Service");
    for service in [headless, clients[0]] {
        assert!(
            selects_pods(service),
            "{} selects the pods",
            service["metadata"]["name"]
        );
        for port in service["spec"]["ports"].as_array().expect("ports") {
            assert!(
                resolves(&port["targetPort"]),
                "targetPort {}",
                port["targetPort"]
            );
        }
    }
}

#[tokio::test]
async fn the_statefulsets_environment_runs_a_pop_from_the_image() {
    let docs = manifest();
    let container = &statefulset(&docs)["spec"]["template"]["spec"]["containers"][0];
    let env: Vec<(String, String)> = container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = e["value"]
                .as_str()
                .unwrap_or_else(|| panic!("{name}: a value"))
                .to_owned();
            (name, value)
        })
        .collect();
    run_image(&env).await;
}

// ---- README ----

#[test]
fn readme_deploying_names_files_that_exist() {
    let readme = read("README.md");
    let start = readme
        .find("### Deploying")
        .expect("README.md: a ### Deploying section");
    let section = &readme[start..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut named = Vec::new();
    for word in section.split(|c: char| c.is_whitespace() || "`()[],;\"'".contains(c)) {
        let word = word.trim_end_matches(['.', ':']);
        if ["deploy/", "config/", "scripts/"]
            .iter()
            .any(|p| word.starts_with(p))
        {
            assert!(
                repo().join(word).exists(),
                "README.md names {word}, which does not exist"
            );
            named.push(word.to_owned());
        }
    }
    for needed in [
        UNIT,
        SYSUSERS,
        TMPFILES,
        DOCKERFILE,
        MANIFEST,
        DEFAULT_CONFIG,
    ] {
        assert!(
            named.iter().any(|n| n == needed),
            "README.md's Deploying section must name {needed}"
        );
    }
}
