//! A real S3 wire-protocol server for tests.
//!
//! By default every [`S3Target`] starts its own `s3s-fs` server in-process on
//! `127.0.0.1:0`, backed by a temporary directory, with SigV4 authentication on — so the
//! tests exercise real signing, real HTTP and real S3 error documents. The server can be
//! stopped mid-test to simulate the endpoint going away.
//!
//! When `STAGE3_TEST_S3_ENDPOINT` is set, the same tests run against that endpoint instead
//! (a real MinIO, Qiniu Kodo or Garage), with `STAGE3_TEST_S3_BUCKET`,
//! `STAGE3_TEST_S3_ACCESS_KEY`, `STAGE3_TEST_S3_SECRET_KEY` and optionally
//! `STAGE3_TEST_S3_REGION` (default `us-east-1`) and `STAGE3_TEST_S3_PATH_STYLE` (default
//! `1`). The bucket must exist. Every target uses its own key prefix, so tests running in
//! parallel, or runs sharing a bucket, never see each other's objects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::config::{BehaviorVersion, Credentials};
use aws_sdk_s3::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnectionBuilder;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::SimpleAuth;
use s3s::dto::{GetObjectInput, PutObjectInput};
use s3s::service::S3ServiceBuilder;
use stage3::storage::S3Settings;
use stage3::storage::S3Store;
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

const LOCAL_BUCKET: &str = "stage3-test";
const LOCAL_ACCESS_KEY: &str = "stage3-test-access-key";
const DEFAULT_REGION: &str = "us-east-1";
pub const PRESIGN_EXPIRY: Duration = Duration::from_secs(3600);

/// An S3 endpoint, bucket and credentials to test against, with a prefix of its own.
pub struct S3Target {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    secret_key: String,
    pub path_style: bool,
    /// Unique to this target, ending in `/`.
    pub prefix: String,
    server: Option<LocalServer>,
}

/// The in-process `s3s-fs` server: its accept loop, and the directory holding the data.
struct LocalServer {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    root: TempDir,
}

impl S3Target {
    /// The endpoint from `STAGE3_TEST_S3_*` when set, else a fresh in-process server.
    pub async fn start() -> S3Target {
        match std::env::var("STAGE3_TEST_S3_ENDPOINT") {
            Ok(endpoint) if !endpoint.trim().is_empty() => Self::remote(endpoint),
            _ => Self::local().await,
        }
    }

    fn remote(endpoint: String) -> S3Target {
        let required = |name: &str| {
            std::env::var(name)
                .unwrap_or_else(|_| panic!("STAGE3_TEST_S3_ENDPOINT is set, so {name} must be"))
        };
        S3Target {
            endpoint,
            bucket: required("STAGE3_TEST_S3_BUCKET"),
            region: std::env::var("STAGE3_TEST_S3_REGION")
                .unwrap_or_else(|_| DEFAULT_REGION.to_string()),
            access_key: required("STAGE3_TEST_S3_ACCESS_KEY"),
            secret_key: required("STAGE3_TEST_S3_SECRET_KEY"),
            path_style: !matches!(
                std::env::var("STAGE3_TEST_S3_PATH_STYLE").as_deref(),
                Ok("0" | "false" | "no")
            ),
            prefix: unique_prefix(),
            server: None,
        }
    }

    async fn local() -> S3Target {
        let root = tempfile::tempdir().expect("temporary directory");
        // s3s-fs maps a bucket to a directory under its root.
        std::fs::create_dir(root.path().join(LOCAL_BUCKET)).expect("bucket directory");
        let secret_key = format!("stage3-test-secret-{}", unique_suffix());

        let (address, stop, task) = serve(root.path(), &secret_key).await;
        S3Target {
            endpoint: format!("http://{address}"),
            bucket: LOCAL_BUCKET.to_string(),
            region: DEFAULT_REGION.to_string(),
            access_key: LOCAL_ACCESS_KEY.to_string(),
            secret_key,
            path_style: true,
            prefix: unique_prefix(),
            server: Some(LocalServer {
                stop: Some(stop),
                task: Some(task),
                root,
            }),
        }
    }

    /// Whether the server runs in this process (and so can be stopped).
    pub fn is_local(&self) -> bool {
        self.server.is_some()
    }

    pub fn secret_key(&self) -> &str {
        &self.secret_key
    }

    /// Stops the in-process server and waits until it has closed every connection. Returns
    /// `false`, after printing why, when the target is a remote endpoint: the caller
    /// should skip the test.
    pub async fn stop(&mut self, test: &str) -> bool {
        let Some(server) = &mut self.server else {
            println!("{test}: skipped, the S3 endpoint is remote and cannot be stopped");
            return false;
        };
        if let Some(stop) = server.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = server.task.take() {
            task.await.expect("server task");
        }
        true
    }

    /// Starts the stopped in-process server again over the same data, on a new port:
    /// clients and stores made before point at the old endpoint, so make new ones.
    pub async fn restart(&mut self) {
        let server = self.server.as_mut().expect("only a local server restarts");
        assert!(server.task.is_none(), "the server is still running");
        let (address, stop, task) = serve(server.root.path(), &self.secret_key).await;
        server.stop = Some(stop);
        server.task = Some(task);
        self.endpoint = format!("http://{address}");
    }

    /// The configuration the service would read from `STAGE3_S3_*` for this target.
    pub fn s3_config(&self) -> S3Settings {
        S3Settings {
            bucket: self.bucket.clone(),
            endpoint: Some(self.endpoint.clone()),
            region: self.region.clone(),
            prefix: self.prefix.clone(),
            force_path_style: self.path_style,
            presign_expiry: PRESIGN_EXPIRY,
            credentials: None,
        }
    }

    /// The `STAGE3_*` variables that select this target, for `Config::from_lookup`.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("STAGE3_STORAGE".into(), "s3".into()),
            ("STAGE3_S3_BUCKET".into(), self.bucket.clone()),
            ("STAGE3_S3_ENDPOINT".into(), self.endpoint.clone()),
            ("STAGE3_S3_REGION".into(), self.region.clone()),
            ("STAGE3_S3_PREFIX".into(), self.prefix.clone()),
            (
                "STAGE3_S3_FORCE_PATH_STYLE".into(),
                if self.path_style { "1" } else { "0" }.into(),
            ),
        ]
    }

    /// A client with the production settings and this target's credentials, passed
    /// explicitly: tests run in parallel, so process environment variables are off limits.
    pub fn client(&self) -> Client {
        self.client_with_secret(&self.secret_key)
    }

    /// A client that signs with `secret_key` instead of the right one.
    pub fn client_with_secret(&self, secret_key: &str) -> Client {
        let credentials =
            Credentials::new(&self.access_key, secret_key, None, None, "stage3-tests");
        let builder = aws_sdk_s3::config::Builder::new()
            .behavior_version(BehaviorVersion::latest())
            .credentials_provider(credentials);
        Client::from_conf(S3Store::configure(builder, &self.s3_config()).build())
    }

    /// The store under test, over this target's bucket and prefix.
    pub fn store(&self) -> S3Store {
        S3Store::new(self.client(), &self.bucket, &self.prefix, PRESIGN_EXPIRY)
    }

    /// A store whose bucket is `bucket` (e.g. one that does not exist).
    pub fn store_in_bucket(&self, bucket: &str) -> S3Store {
        S3Store::new(self.client(), bucket, &self.prefix, PRESIGN_EXPIRY)
    }

    /// A store that signs with the wrong secret key.
    pub fn store_with_secret(&self, secret_key: &str) -> S3Store {
        S3Store::new(
            self.client_with_secret(secret_key),
            &self.bucket,
            &self.prefix,
            PRESIGN_EXPIRY,
        )
    }

    /// The full object key of `key` under this target's prefix.
    pub fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }
}

/// Serves `root` over S3 on a fresh loopback port until the returned sender fires.
async fn serve(root: &Path, secret_key: &str) -> (SocketAddr, oneshot::Sender<()>, JoinHandle<()>) {
    let filesystem = s3s_fs::FileSystem::new(root).expect("s3s-fs root");
    let mut builder = S3ServiceBuilder::new(filesystem);
    builder.set_auth(SimpleAuth::from_single(
        LOCAL_ACCESS_KEY,
        secret_key.to_string(),
    ));
    builder.set_access(RealBucketRules {
        root: root.to_path_buf(),
    });
    let service = builder.build();

    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let address = listener.local_addr().expect("local address");
    let (stop, mut stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let http = ConnectionBuilder::new(TokioExecutor::new());
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    let Ok((socket, _)) = accepted else { continue };
                    let (http, service) = (http.clone(), service.clone());
                    connections.spawn(async move {
                        let _ = http.serve_connection(TokioIo::new(socket), service).await;
                    });
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // Closing the listener refuses new connections; aborting the open ones cuts the
        // client's pooled keep-alive connections too, as a crashed server would.
        drop(listener);
        connections.shutdown().await;
    });
    (address, stop, task)
}

/// Makes `s3s-fs` refuse what real servers refuse. Left alone, it lets unsigned requests
/// through the access check only when no auth is set (we set one), its PutObject creates a
/// missing bucket on the fly and its GetObject calls a missing bucket `NoSuchKey`, where S3,
/// MinIO and Qiniu answer `NoSuchBucket`.
struct RealBucketRules {
    root: PathBuf,
}

impl RealBucketRules {
    fn bucket_must_exist(&self, bucket: &str) -> s3s::S3Result<()> {
        // s3s has validated the name, so it is one plain path component.
        if self.root.join(bucket).is_dir() {
            Ok(())
        } else {
            Err(s3s::s3_error!(NoSuchBucket))
        }
    }
}

#[async_trait::async_trait]
impl S3Access for RealBucketRules {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> s3s::S3Result<()> {
        // The default rule: every request must carry a valid signature.
        match cx.credentials() {
            Some(_) => Ok(()),
            None => Err(s3s::s3_error!(AccessDenied, "Signature is required")),
        }
    }

    async fn put_object(&self, req: &mut s3s::S3Request<PutObjectInput>) -> s3s::S3Result<()> {
        self.bucket_must_exist(&req.input.bucket)
    }

    async fn get_object(&self, req: &mut s3s::S3Request<GetObjectInput>) -> s3s::S3Result<()> {
        self.bucket_must_exist(&req.input.bucket)
    }
}

fn unique_suffix() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!(
        "{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn unique_prefix() -> String {
    format!("stage3-test-{}/", unique_suffix())
}
