//! The S3-compatible test server (s3s-fs, as the e2e tests run it) and the SDK's
//! own direct multipart upload, the reference replication is compared with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;
use tempfile::TempDir;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "cinbenchkey";
pub const SECRET_KEY: &str = "cinbenchsecret";

pub struct S3Server {
    pub endpoint: String,
    child: Child,
    _root: TempDir,
}

/// s3s-fs: `explicit`, else `$CIN_TEST_S3S_FS`, else target/test-tools/bin/s3s-fs
/// (installed by scripts/test).
pub fn s3s_fs_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_owned());
    }
    if let Some(path) = std::env::var_os("CIN_TEST_S3S_FS") {
        return Ok(PathBuf::from(path));
    }
    let installed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/test-tools/bin/s3s-fs");
    if installed.is_file() {
        Ok(installed)
    } else {
        Err(anyhow!(
            "replicate needs s3s-fs: run scripts/test once (it installs it), or pass --s3s-fs"
        ))
    }
}

impl S3Server {
    /// Starts s3s-fs on a free port with its own directory under `work`.
    pub async fn start(bin: &Path, work: &Path) -> anyhow::Result<S3Server> {
        let root = tempfile::Builder::new().prefix("s3.").tempdir_in(work)?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let server = S3Server {
            endpoint: format!("http://127.0.0.1:{port}"),
            child,
            _root: root,
        };
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return Ok(server);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("s3s-fs did not start on port {port}")
    }

    /// An SDK client with its defaults (checksums included) but for the endpoint.
    pub async fn client(&self) -> aws_sdk_s3::Client {
        let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_sdk_s3::config::Region::new("us-east-1"))
            .endpoint_url(&self.endpoint)
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "cin-bench",
            ))
            .load()
            .await;
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&shared)
                .force_path_style(true)
                .build(),
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Uploads `path` as `bucket/key` with CreateMultipartUpload, `concurrency` UploadPart
/// calls of `part_size` bytes in flight (each part read from the file just before
/// it is sent) and CompleteMultipartUpload.
pub async fn direct_multipart(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    path: &Path,
    part_size: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let file = Arc::new(std::fs::File::open(path)?);
    let size = file.metadata()?.len();
    let created = client
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .context("CreateMultipartUpload")?;
    let upload_id = created
        .upload_id()
        .ok_or_else(|| anyhow!("no upload id"))?
        .to_owned();
    let parts = size.div_ceil(part_size).max(1);
    let mut running = JoinSet::new();
    let mut done = Vec::with_capacity(parts as usize);
    for index in 0..parts {
        while running.len() >= concurrency.max(1) {
            done.push(running.join_next().await.expect("running")??);
        }
        let (client, file) = (client.clone(), file.clone());
        let (bucket, key, upload_id) = (bucket.to_owned(), key.to_owned(), upload_id.clone());
        running.spawn(async move {
            let start = index * part_size;
            let len = part_size.min(size - start);
            let bytes = tokio::task::spawn_blocking(move || -> std::io::Result<Bytes> {
                let mut buf = vec![0u8; len as usize];
                std::os::unix::fs::FileExt::read_exact_at(&*file, &mut buf, start)?;
                Ok(Bytes::from(buf))
            })
            .await??;
            let number = i32::try_from(index + 1)?;
            let answer = client
                .upload_part()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(ByteStream::from(bytes))
                .send()
                .await
                .with_context(|| format!("UploadPart {number}"))?;
            Ok::<_, anyhow::Error>(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(answer.e_tag().map(str::to_owned))
                    .set_checksum_crc32(answer.checksum_crc32().map(str::to_owned))
                    .build(),
            )
        });
    }
    while let Some(part) = running.join_next().await {
        done.push(part??);
    }
    done.sort_by_key(|p| p.part_number());
    client
        .complete_multipart_upload()
        .bucket(bucket)
        .key(key)
        .upload_id(upload_id)
        .multipart_upload(
            CompletedMultipartUpload::builder()
                .set_parts(Some(done))
                .build(),
        )
        .send()
        .await
        .context("CompleteMultipartUpload")?;
    Ok(())
}
