//! A network namespace of its own for a test: its own loopback (so a POP can
//! listen on 127.0.0.1:443 beside other tests doing the same) and its own
//! `/etc/hosts` (so clients reach the POP at names like `upload.cin.test`,
//! unchanged). Needs root, as CI has.

use std::path::PathBuf;
use std::process::Command;

pub struct Netns {
    name: String,
}

fn ip(args: &[&str]) {
    let output = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2) runs");
    assert!(
        output.status.success(),
        "ip {}: {} (network namespaces need root)",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

impl Netns {
    /// A new namespace with loopback up, where `names` resolve to 127.0.0.1.
    pub fn create(names: &[&str]) -> Netns {
        let name = format!("cin-test-{}-{}", std::process::id(), rand::random::<u32>());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        // `ip netns exec` mounts /etc/netns/NAME/hosts over /etc/hosts.
        std::fs::create_dir_all(ns.etc()).expect("/etc/netns dir");
        std::fs::write(
            ns.etc().join("hosts"),
            format!("127.0.0.1 localhost {}\n", names.join(" ")),
        )
        .expect("hosts file");
        ns
    }

    fn etc(&self) -> PathBuf {
        PathBuf::from("/etc/netns").join(&self.name)
    }

    /// Runs `f` on a thread that lives in the namespace: sockets it (and the
    /// threads it starts) opens are the namespace's.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).expect("namespace file");
            // SAFETY: setns only reads the descriptor; it moves this thread alone.
            let entered =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
            assert_eq!(entered, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }

    /// `program` run inside the namespace, with its `/etc/hosts`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(self.etc());
    }
}
