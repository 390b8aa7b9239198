//! A moto server on loopback: real EventBridge and SQS wire protocols for the event and
//! dead-letter tests (docs/design.md §3: moto speaks S3, SQS and EventBridge).
//!
//! `.ci/run` starts one and exports its URL as `STAGE3_TEST_MOTO_URL`. Without that, the
//! first test that needs it starts `moto_server` from `PATH` on a free port, once per test
//! binary; the server stops when the test binary exits (a shell holds it and kills it
//! when our end of its stdin closes). When neither works, the tests skip with a message —
//! except in CI (`CI` set), where a missing moto is a failure.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::{Credentials, Region};

/// moto's fixed account id.
pub const ACCOUNT: &str = "123456789012";
pub const REGION: &str = "us-east-1";

pub struct Moto {
    pub url: String,
    /// The shell that holds the server we started, if we started one.
    _holder: Option<Mutex<Child>>,
}

/// The moto server to use, or `None` (after saying why) when there is none outside CI.
pub fn moto() -> Option<&'static Moto> {
    static MOTO: OnceLock<Option<Moto>> = OnceLock::new();
    let moto = MOTO.get_or_init(|| match std::env::var("STAGE3_TEST_MOTO_URL") {
        Ok(url) if !url.trim().is_empty() => Some(Moto {
            url: url.trim().trim_end_matches('/').to_string(),
            _holder: None,
        }),
        _ => start(),
    });
    if moto.is_none() {
        let why = "no moto server: set STAGE3_TEST_MOTO_URL or put moto_server on PATH \
                   (pip install \"moto[server]\")";
        if std::env::var_os("CI").is_some() {
            panic!("{why}");
        }
        eprintln!("SKIPPED: {why}");
    }
    moto.as_ref()
}

fn start() -> Option<Moto> {
    let on_path = std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| dir.join("moto_server").is_file())
    });
    if !on_path {
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let log = std::env::temp_dir().join(format!("stage3-moto-{}.log", std::process::id()));
    let mut holder = Command::new("sh")
        .arg("-c")
        .arg(r#"moto_server -H 127.0.0.1 -p "$1" >"$2" 2>&1 & m=$!; read -r _; kill "$m""#)
        .arg("sh")
        .arg(port.to_string())
        .arg(&log)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let started = Instant::now();
    while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
        if started.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "moto_server did not start on {address}; its log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            let _ = holder.stdin.as_mut().map(|stdin| stdin.write_all(b"\n"));
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Some(Moto {
        url: format!("http://{address}"),
        _holder: Some(Mutex::new(holder)),
    })
}

impl Moto {
    /// The shared AWS configuration of a client of this server: its endpoint, a fixed
    /// region and moto's dummy keys.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new("testing", "testing", None, None, "moto"))
            .endpoint_url(&self.url)
            .load()
            .await
    }

    pub async fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk_config().await)
    }

    pub async fn eventbridge(&self) -> aws_sdk_eventbridge::Client {
        aws_sdk_eventbridge::Client::new(&self.sdk_config().await)
    }

    /// The environment a child process (the CLI) needs to reach this server through the
    /// standard AWS variables, with no other credential source consulted.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.url.clone()),
            ("AWS_REGION", REGION.to_string()),
            ("AWS_ACCESS_KEY_ID", "testing".to_string()),
            ("AWS_SECRET_ACCESS_KEY", "testing".to_string()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_string()),
        ]
    }
}

/// A name no other test (or earlier run against the same server) has used.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

/// Creates a queue and answers its URL and ARN.
pub async fn create_queue(sqs: &aws_sdk_sqs::Client, name: &str) -> (String, String) {
    let url = sqs
        .create_queue()
        .queue_name(name)
        .send()
        .await
        .expect("CreateQueue")
        .queue_url
        .expect("a queue URL");
    (url, format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"))
}

/// Every message the queue holds within `wait` of the last one, until `expected` arrived.
pub async fn receive_all(
    sqs: &aws_sdk_sqs::Client,
    queue_url: &str,
    expected: usize,
    wait: Duration,
) -> Vec<aws_sdk_sqs::types::Message> {
    let mut messages = Vec::new();
    let deadline = Instant::now() + wait;
    while messages.len() < expected && Instant::now() < deadline {
        let answer = sqs
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .message_attribute_names("All")
            .wait_time_seconds(1)
            .send()
            .await
            .expect("ReceiveMessage");
        messages.extend(answer.messages.unwrap_or_default());
    }
    messages
}
