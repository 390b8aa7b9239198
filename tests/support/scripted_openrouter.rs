//! A scripted OpenRouter stand-in: a real HTTP/1.1 server on loopback whose every answer
//! is chosen by the test — an image, an error status with or without `Retry-After`, a
//! dropped connection, a hang, a broken body.
//!
//! wiremock covers the happy paths; faults such as a connection dropped mid-request need
//! a server that can misbehave on purpose, so this one speaks HTTP by hand.
//!
//! It also serves OpenRouter's image catalogue (`GET /images/models` and
//! `GET /images/models/{id}/endpoints`), shaped exactly like the documented answers
//! (docs/design.md §3), from a [`Catalogue`] the test chooses — by default a few current
//! models with their real parameter sets. Catalogue requests are counted apart from
//! generation calls, which are what `total_calls` and `calls_for` count.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use image::{ImageBuffer, ImageFormat, Rgb};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::tls::TestCa;

/// What the stand-in does with one request.
#[derive(Debug, Clone)]
pub enum Reply {
    /// An HTTP answer.
    Http {
        status: u16,
        headers: Vec<(String, String)>,
        /// Shared, so a multi-megabyte answer costs the stand-in no copy per request.
        body: Bytes,
    },
    /// Close the connection without answering.
    Drop,
    /// Answer nothing for this long, then close.
    Hang(Duration),
    /// Wait (provider latency), then give the inner reply.
    After(Duration, Box<Reply>),
    /// The inner reply's status line and headers at once, its body this much later (an
    /// answer still downloading).
    SlowBody(Duration, Box<Reply>),
}

impl Reply {
    pub fn json(status: u16, body: Value) -> Reply {
        Reply::Http {
            status,
            headers: vec![("Content-Type".into(), "application/json".into())],
            body: Bytes::from(body.to_string()),
        }
    }

    /// A successful Image API answer carrying `bytes`, labelled `media_type`.
    pub fn image(bytes: &[u8], media_type: &str) -> Reply {
        Reply::json(
            200,
            json!({
                "created": 1_764_000_000,
                "data": [{
                    "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                    "media_type": media_type,
                }],
                "usage": {"cost": 0.04},
            }),
        )
    }

    /// OpenRouter's typed error body (`error.metadata.error_type`), as the error reference
    /// documents it.
    pub fn typed_error(status: u16, error_type: &str, message: &str) -> Reply {
        Reply::json(
            status,
            json!({"error": {"code": status, "message": message,
                "metadata": {"error_type": error_type, "provider_name": "Google"}}}),
        )
    }

    /// A model-availability error, in the documented shape: `error_type` and `http_status`
    /// directly in `error`, plus the `availability` object.
    pub fn availability(
        status: u16,
        error_type: &str,
        code: &str,
        retryable: bool,
        model: &str,
        fallback_models: &[&str],
    ) -> Reply {
        let mut availability = json!({
            "code": code,
            "retryable": retryable,
            "requested_models": [model],
            "docs_url": format!("https://openrouter.ai/docs/errors#{code}"),
        });
        if !fallback_models.is_empty() {
            availability["fallback_models"] = json!(fallback_models);
        }
        Reply::json(
            status,
            json!({"error": {"message": format!("{model} cannot be served ({code})"),
                "error_type": error_type, "http_status": status,
                "availability": availability}}),
        )
    }

    /// A chat answer that refused: HTTP 200, no image, a safety `finish_reason`, the prompt
    /// billed (docs/design.md §3, "Chat-path refusals").
    pub fn chat_refusal(finish_reason: &str, native_finish_reason: &str) -> Reply {
        Reply::json(
            200,
            json!({
                "id": "gen-refused",
                "choices": [{
                    "finish_reason": finish_reason,
                    "native_finish_reason": native_finish_reason,
                    "message": {"role": "assistant", "content": "I can't create that image."}
                }],
                "usage": {"prompt_tokens": 20, "completion_tokens": 0, "cost": 0.0002}
            }),
        )
    }

    /// OpenRouter's error body with `status` as both HTTP status and code.
    pub fn error(status: u16, message: &str) -> Reply {
        Reply::json(
            status,
            json!({"error": {"code": status, "message": message, "metadata": {"error_type": "test"}}}),
        )
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Reply {
        if let Reply::Http { headers, .. } = &mut self {
            headers.push((name.to_string(), value.to_string()));
        }
        self
    }

    /// This reply after `latency`, as a real provider that takes its time.
    pub fn after(self, latency: Duration) -> Reply {
        Reply::After(latency, Box::new(self))
    }

    /// This reply with its body sent `delay` after its headers.
    pub fn body_after(self, delay: Duration) -> Reply {
        Reply::SlowBody(delay, Box::new(self))
    }

    pub fn raw(status: u16, body: &[u8]) -> Reply {
        Reply::Http {
            status,
            headers: vec![("Content-Type".into(), "text/html".into())],
            body: Bytes::copy_from_slice(body),
        }
    }
}

/// A successful chat-completions answer whose one image is `url` (a `data:` URL, or an
/// `https` URL as some models give).
pub fn chat_answer(url: &str) -> Value {
    json!({
        "id": "gen-1",
        "choices": [{
            "finish_reason": "stop",
            "message": {
                "role": "assistant",
                "content": "",
                "images": [{"type": "image_url", "image_url": {"url": url}}]
            }
        }],
        "usage": {"prompt_tokens": 20, "completion_tokens": 1290, "cost": 0.0387}
    })
}

impl Reply {
    /// A chat API answer carrying the image at `url`.
    pub fn chat_image(url: &str) -> Reply {
        Reply::json(200, chat_answer(url))
    }
}

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// When the request arrived.
    pub at: std::time::Instant,
}

impl Received {
    /// The prompt sent: OpenRouter's and Ark's `prompt`, or DashScope's message text.
    pub fn prompt(&self) -> &str {
        self.body["prompt"]
            .as_str()
            .or_else(|| {
                self.body
                    .pointer("/input/messages/0/content/0/text")?
                    .as_str()
            })
            .unwrap_or_default()
    }
}

type Script = dyn Fn(&Received, usize) -> Reply + Send + Sync;

/// One model of the stand-in's catalogue.
#[derive(Debug, Clone)]
pub struct CatalogueModel {
    pub id: String,
    /// `supported_parameters`, exactly as the catalogue gives them.
    pub supported_parameters: Value,
    pub input_modalities: Vec<String>,
    /// The endpoints' `pricing` lines (one endpoint).
    pub pricing: Value,
}

impl CatalogueModel {
    pub fn new(id: &str, supported_parameters: Value, pricing: Value) -> Self {
        CatalogueModel {
            id: id.to_string(),
            supported_parameters,
            input_modalities: vec!["text".into(), "image".into()],
            pricing,
        }
    }

    fn listing(&self) -> Value {
        json!({
            "id": self.id,
            "name": self.id.split('/').nth(1).unwrap_or(&self.id),
            "description": "",
            "created": 1_760_000_000,
            "architecture": {"input_modalities": self.input_modalities, "output_modalities": ["image"]},
            "supported_parameters": self.supported_parameters,
            "supports_streaming": false,
            "endpoints": format!("/api/v1/images/models/{}/endpoints", self.id),
        })
    }

    fn endpoints(&self) -> Value {
        json!({"id": self.id, "endpoints": [{
            "provider_name": "Stand-in",
            "provider_slug": "stand-in",
            "provider_tag": "stand-in",
            "supported_parameters": self.supported_parameters,
            "allowed_passthrough_parameters": [],
            "supports_streaming": false,
            "pricing": self.pricing,
        }]})
    }
}

const ASPECT_RATIOS: [&str; 8] = ["1:1", "2:3", "3:2", "3:4", "4:3", "9:16", "16:9", "21:9"];

/// What the stand-in answers on the catalogue routes.
#[derive(Debug, Clone)]
pub enum Catalogue {
    Models(Vec<CatalogueModel>),
    /// Every catalogue request gets this status: the catalogue cannot be read.
    Status(u16),
}

impl Catalogue {
    /// Current models with their documented parameter sets and plausible prices:
    /// Gemini 3.1 Flash Image (1K/2K/4K, priced per image with `2k`/`4k` variants),
    /// gpt-image-1 (`quality` and `size`, no resolution), FLUX.2 Pro (1K only, per
    /// megapixel) and Seedream 4.5.
    pub fn standard() -> Catalogue {
        Catalogue::Models(vec![
            CatalogueModel::new(
                "google/gemini-3.1-flash-image",
                json!({
                    "resolution": {"type": "enum", "values": ["1K", "2K", "4K"]},
                    "aspect_ratio": {"type": "enum", "values": ASPECT_RATIOS},
                    "seed": {"type": "range", "min": 0, "max": 2147483647},
                    "n": {"type": "range", "min": 1, "max": 4},
                }),
                json!([
                    {"billable": "output_image", "unit": "image", "cost_usd": 0.04},
                    {"billable": "output_image", "unit": "image", "cost_usd": 0.08, "variant": "2k"},
                    {"billable": "output_image", "unit": "image", "cost_usd": 0.16, "variant": "4k"},
                    {"billable": "input_reference", "unit": "image", "cost_usd": 0.001},
                ]),
            ),
            CatalogueModel::new(
                "openai/gpt-image-1",
                json!({
                    "quality": {"type": "enum", "values": ["auto", "low", "medium", "high"]},
                    "size": {"type": "enum", "values": ["1024x1024", "1536x1024", "1024x1536", "auto"]},
                    "n": {"type": "range", "min": 1, "max": 4},
                }),
                json!([{"billable": "output_image", "unit": "image", "cost_usd": 0.167}]),
            ),
            CatalogueModel::new(
                "black-forest-labs/flux.2-pro",
                json!({
                    "resolution": {"type": "enum", "values": ["1K"]},
                    "aspect_ratio": {"type": "enum", "values": ASPECT_RATIOS},
                    "seed": {"type": "range", "min": 0, "max": 4294967295u64},
                }),
                json!([{"billable": "output_image", "unit": "megapixel", "cost_usd": 0.03}]),
            ),
            CatalogueModel::new(
                "bytedance-seed/seedream-4.5",
                json!({
                    "resolution": {"type": "enum", "values": ["1K", "2K", "4K"]},
                    "aspect_ratio": {"type": "enum", "values": ASPECT_RATIOS},
                    "seed": {"type": "range", "min": 0, "max": 2147483647},
                }),
                json!([{"billable": "output_image", "unit": "image", "cost_usd": 0.03}]),
            ),
        ])
    }

    /// The standard catalogue plus `model`.
    pub fn with(model: CatalogueModel) -> Catalogue {
        match Catalogue::standard() {
            Catalogue::Models(mut models) => {
                models.push(model);
                Catalogue::Models(models)
            }
            other => other,
        }
    }

    /// Answers a catalogue path, or `None` when `path` is not one.
    fn answer(&self, path: &str) -> Option<Reply> {
        let rest = path.strip_prefix("/api/v1/images/models")?;
        let models = match self {
            Catalogue::Status(status) => {
                return Some(Reply::error(*status, "catalogue unavailable"))
            }
            Catalogue::Models(models) => models,
        };
        if rest.is_empty() || rest == "/" {
            let data: Vec<Value> = models.iter().map(CatalogueModel::listing).collect();
            return Some(Reply::json(200, json!({ "data": data })));
        }
        let id = rest.strip_prefix('/')?.strip_suffix("/endpoints")?;
        Some(match models.iter().find(|m| m.id == id) {
            Some(model) => Reply::json(200, model.endpoints()),
            None => Reply::typed_error(404, "not_found", "no such model"),
        })
    }
}

/// What the stand-in's connections share.
struct State {
    script: Box<Script>,
    catalogue: Mutex<Catalogue>,
    /// Catalogue requests, apart from the generation calls in `received`.
    catalogue_received: Mutex<Vec<Received>>,
    received: Mutex<Vec<Received>>,
    /// When each generation call's answer was written, by its place in `received`.
    answered: Mutex<HashMap<usize, std::time::Instant>>,
    /// How many requests each prompt has had, for the script's `n`.
    per_prompt: Mutex<HashMap<String, usize>>,
    /// Requests read but not yet fully answered, and the most there ever were.
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

pub struct ScriptedOpenRouter {
    pub base_url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl ScriptedOpenRouter {
    /// Starts the stand-in; `script(request, n)` chooses the answer to the `n`-th request
    /// (0-based) whose prompt is the same as this one's — so each scene follows its own
    /// script however the batch interleaves.
    pub async fn start(script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_with(None, script).await
    }

    /// The same stand-in behind HTTPS, with a certificate from `ca` (see `support::tls`);
    /// `base_url` starts with `https://127.0.0.1`.
    pub async fn start_tls(
        ca: &TestCa,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        Self::start_with(Some(ca.acceptor.clone()), script).await
    }

    async fn start_with(
        tls: Option<TlsAcceptor>,
        script: impl Fn(&Received, usize) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let base_url = format!("{scheme}://{}/api/v1", listener.local_addr().unwrap());
        let state = Arc::new(State {
            script: Box::new(script),
            catalogue: Mutex::new(Catalogue::standard()),
            catalogue_received: Mutex::default(),
            received: Mutex::default(),
            answered: Mutex::default(),
            per_prompt: Mutex::default(),
            in_flight: AtomicUsize::new(0),
            max_in_flight: AtomicUsize::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (state, tls) = (shared.clone(), tls.clone());
                tokio::spawn(async move {
                    let _ = match tls {
                        // A refused handshake (an untrusting client) just ends here.
                        Some(tls) => match tls.accept(stream).await {
                            Ok(stream) => serve(stream, &state).await,
                            Err(_) => Ok(()),
                        },
                        None => serve(stream, &state).await,
                    };
                });
            }
        });
        ScriptedOpenRouter {
            base_url,
            state,
            task,
        }
    }

    /// `scheme://host:port`, without the OpenRouter path: for stand-ins of other providers
    /// (`{origin}/api/v3` for Ark) and image hosts.
    pub fn origin(&self) -> String {
        self.base_url.trim_end_matches("/api/v1").to_string()
    }

    /// Replaces the catalogue the stand-in serves.
    pub fn set_catalogue(&self, catalogue: Catalogue) {
        *self.state.catalogue.lock().unwrap() = catalogue;
    }

    /// The catalogue requests received (`GET /images/models…`).
    pub fn catalogue_requests(&self) -> Vec<Received> {
        self.state.catalogue_received.lock().unwrap().clone()
    }

    /// Generation calls (everything but the catalogue), in arrival order.
    pub fn requests(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// How many requests carried a prompt containing `marker`.
    pub fn calls_for(&self, marker: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.prompt().contains(marker))
            .count()
    }

    /// Each generation call, in arrival order, with when its answer was written (`None`
    /// while it is still being answered): the start and end of every call, for tests of
    /// what ran before what.
    pub fn spans(&self) -> Vec<(Received, Option<std::time::Instant>)> {
        let answered = self.state.answered.lock().unwrap().clone();
        self.requests()
            .into_iter()
            .enumerate()
            .map(|(index, request)| (request, answered.get(&index).copied()))
            .collect()
    }

    pub fn total_calls(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// The most requests that were ever being answered at the same time.
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }
}

impl Drop for ScriptedOpenRouter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a request as in flight for as long as it lives.
struct InFlight<'a>(&'a State);

impl<'a> InFlight<'a> {
    fn begin(state: &'a State) -> Self {
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    state: &State,
) -> std::io::Result<()> {
    let Some(request) = read_request(&mut stream).await? else {
        return Ok(());
    };
    let catalogue_reply = state.catalogue.lock().unwrap().answer(&request.path);
    if let Some(reply) = catalogue_reply {
        state.catalogue_received.lock().unwrap().push(request);
        return write_reply(&mut stream, reply).await;
    }
    let _in_flight = InFlight::begin(state);
    let nth = {
        let mut counts = state.per_prompt.lock().unwrap();
        let count = counts.entry(request.prompt().to_string()).or_insert(0);
        *count += 1;
        *count - 1
    };
    let index = {
        let mut received = state.received.lock().unwrap();
        received.push(request.clone());
        received.len() - 1
    };
    let reply = (state.script)(&request, nth);
    let written = write_reply(&mut stream, reply).await;
    state
        .answered
        .lock()
        .unwrap()
        .insert(index, std::time::Instant::now());
    written
}

async fn write_reply(
    stream: &mut (impl AsyncWrite + Unpin),
    mut reply: Reply,
) -> std::io::Result<()> {
    while let Reply::After(latency, inner) = reply {
        tokio::time::sleep(latency).await;
        reply = *inner;
    }
    let mut body_delay = Duration::ZERO;
    while let Reply::SlowBody(delay, inner) = reply {
        body_delay += delay;
        reply = *inner;
    }
    match reply {
        Reply::After(..) | Reply::SlowBody(..) => unreachable!("unwrapped above"),
        Reply::Drop => Ok(()),
        Reply::Hang(duration) => {
            tokio::time::sleep(duration).await;
            Ok(())
        }
        Reply::Http {
            status,
            headers,
            body,
        } => {
            let mut head = format!("HTTP/1.1 {status} {}\r\n", reason(status));
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str(&format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            ));
            stream.write_all(head.as_bytes()).await?;
            if !body_delay.is_zero() {
                stream.flush().await?;
                tokio::time::sleep(body_delay).await;
            }
            stream.write_all(&body).await?;
            stream.shutdown().await
        }
    }
}

async fn read_request(stream: &mut (impl AsyncRead + Unpin)) -> std::io::Result<Option<Received>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let header_end = loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
    let mut lines = head.split("\r\n");
    let path = lines
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    while buffer.len() < header_end + length {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    let body = serde_json::from_slice(&buffer[header_end..]).unwrap_or(Value::Null);
    Ok(Some(Received {
        path,
        headers,
        body,
        at: std::time::Instant::now(),
    }))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// A photo-like (noisy, so not "blank") image of the given size, encoded as `format`.
pub fn noisy_image(width: u32, height: u32, format: ImageFormat) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let image = ImageBuffer::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state & 0x3f) as u8;
        Rgb([
            (x * 255 / width) as u8 / 2 + noise,
            (y * 255 / height) as u8 / 2 + noise,
            128u8.wrapping_add(noise),
        ])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, format)
        .expect("encode test image");
    bytes.into_inner()
}

/// A uniform grey image: valid, decodable, and blank.
pub fn blank_png(width: u32, height: u32) -> Vec<u8> {
    let image = ImageBuffer::from_pixel(width, height, Rgb([127u8, 127, 127]));
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, ImageFormat::Png)
        .expect("encode blank image");
    bytes.into_inner()
}
