//! The `cin` binary itself, without a POP: what it says when it has none to
//! talk to. Having an integration test also makes `cargo test`/`cargo nextest`
//! build `target/<profile>/cin`, the binary the end-to-end tests
//! (`tests/e2e/cli.rs`) run against real POPs.

use std::process::{Command, Stdio};

#[test]
fn without_a_pop_it_says_every_way_to_give_one() {
    let home = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_cin"))
        .args(["status", "00AAAAAAAAAAAAAAAAAA"])
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env_remove("CIN_POP")
        .env_remove("CIN_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run cin");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let config = home.path().join("config").join("cin").join("config.toml");
    for needle in [
        "no POP to talk to",
        "--pop URL",
        "CIN_POP",
        config.to_str().expect("utf-8 path"),
    ] {
        assert!(stderr.contains(needle), "{needle:?} in {stderr}");
    }
}

#[test]
fn help_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_cin"))
        .arg("--help")
        .output()
        .expect("run cin");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    // The first word of each line of the `Commands:` section, up to `Options:`.
    let listed: Vec<&str> = help
        .lines()
        .skip_while(|l| l.trim() != "Commands:")
        .skip(1)
        .take_while(|l| l.trim() != "Options:")
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for command in [
        "upload",
        "status",
        "wait",
        "metadata",
        "download",
        "delete",
        "completions",
    ] {
        assert!(listed.contains(&command), "{command} listed in {help}");
    }
}
