//! A SeaweedFS cluster on loopback, as a network's distributed final store: one
//! master, three volume servers, a filer with its S3 gateway, every file kept
//! twice (replication `001`: a second copy on another server of the same rack).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::support::{create_bucket, s3_client, s3_profile, S3_ACCESS_KEY, S3_SECRET_KEY};

pub struct SeaweedCluster {
    pub endpoint: String,
    dir: TempDir,
    master: Option<Child>,
    volumes: Vec<Option<Child>>,
    filer: Option<Child>,
}

fn weed_binary() -> PathBuf {
    if let Ok(path) = std::env::var("CIN_TEST_WEED") {
        return PathBuf::from(path);
    }
    let installed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/weed");
    assert!(
        installed.exists(),
        "the SeaweedFS tests need weed: run scripts/test (it installs it), or set CIN_TEST_WEED"
    );
    installed
}

/// A port free together with the one 10000 above it, which SeaweedFS takes for
/// the server's gRPC by default (and other servers derive from the address).
fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    loop {
        let port: u16 = rng.gen_range(20_000..30_000);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}

impl SeaweedCluster {
    pub async fn start() -> SeaweedCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = |name: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).expect("cluster dir");
            p.display().to_string()
        };
        let log = |name: &str| {
            std::fs::File::create(dir.path().join(format!("{name}.log"))).expect("log file")
        };
        let spawn = |args: Vec<String>, name: &str| {
            Command::new(weed_binary())
                .args(args)
                // The filer keeps its own store in the working directory.
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(log(name))
                .spawn()
                .expect("start weed")
        };
        let master_port = free_port();
        let master = format!("127.0.0.1:{master_port}");
        let loopback = || vec!["-ip=127.0.0.1".to_owned(), "-ip.bind=127.0.0.1".to_owned()];
        let mut args = vec![
            "master".to_owned(),
            format!("-port={master_port}"),
            format!("-mdir={}", path("master")),
            "-defaultReplication=001".into(),
            "-volumeSizeLimitMB=64".into(),
        ];
        args.extend(loopback());
        let master_child = spawn(args, "master");
        let mut volumes = Vec::new();
        for i in 0..3 {
            let mut args = vec![
                "volume".to_owned(),
                format!("-port={}", free_port()),
                format!("-dir={}", path(&format!("volume{i}"))),
                format!("-mserver={master}"),
                "-max=20".into(),
            ];
            args.extend(loopback());
            volumes.push(Some(spawn(args, &format!("volume{i}"))));
        }
        let s3_port = free_port();
        let config = dir.path().join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{
                "name": "cin",
                "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": S3_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }]})
            .to_string(),
        )
        .expect("s3 identities");
        let mut args = vec![
            "filer".to_owned(),
            format!("-port={}", free_port()),
            format!("-master={master}"),
            "-s3".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.config={}", config.display()),
            // Catalog servers on fixed ports: not wanted, and they would collide.
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
        ];
        args.extend(loopback());
        let filer = spawn(args, "filer");
        let cluster = SeaweedCluster {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            dir,
            master: Some(master_child),
            volumes,
            filer: Some(filer),
        };
        cluster.wait_until_it_stores().await;
        cluster
    }

    /// The gateway answers, and the volume servers have registered: a bucket
    /// can be made and an object written to it.
    async fn wait_until_it_stores(&self) {
        let client = self.client().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            // An earlier try may have made the bucket already.
            let _ = client.create_bucket().bucket("cin-probe").send().await;
            let stored = client
                .put_object()
                .bucket("cin-probe")
                .key("probe")
                .body(b"probe".to_vec().into())
                .send()
                .await;
            let Err(error) = stored else {
                return;
            };
            if tokio::time::Instant::now() >= deadline {
                let logs: String = ["master", "volume0", "filer"]
                    .iter()
                    .map(|name| {
                        let text =
                            std::fs::read_to_string(self.dir.path().join(format!("{name}.log")))
                                .unwrap_or_default();
                        let tail: Vec<&str> = text.lines().rev().take(5).collect();
                        format!("--- {name}:\n{}\n", tail.join("\n"))
                    })
                    .collect();
                panic!("the SeaweedFS cluster did not start: {error:?}\n{logs}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills volume server `i` outright, as a crashed machine would go.
    pub fn kill_volume(&mut self, i: usize) {
        if let Some(mut child) = self.volumes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn client(&self) -> aws_sdk_s3::Client {
        s3_client(&self.endpoint).await
    }

    pub async fn create_bucket(&self, bucket: &str) {
        create_bucket(&self.endpoint, bucket).await;
    }

    /// A storage profile delivering to `bucket` on this cluster.
    pub fn profile(&self, bucket: &str) -> cin_edge::config::StorageProfile {
        s3_profile(&self.endpoint, bucket)
    }
}

/// SIGTERM first; SeaweedFS can hang on it, so SIGKILL follows.
fn stop(child: &mut Option<Child>) {
    let Some(mut child) = child.take() else {
        return;
    };
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on a child this process started and has not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Drop for SeaweedCluster {
    fn drop(&mut self) {
        stop(&mut self.filer);
        for volume in &mut self.volumes {
            stop(volume);
        }
        stop(&mut self.master);
    }
}
