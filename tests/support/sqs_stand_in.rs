//! A real HTTP stand-in in front of moto's SQS, for what moto never does: fail one entry
//! of a `SendMessageBatch` call.
//!
//! It listens on loopback and forwards every request to moto unchanged, except a
//! `SendMessageBatch` call with an entry whose body contains a chosen marker: that entry is
//! taken out of the request before it is forwarded, so moto never enqueues it, and is added
//! to moto's answer under `Failed` — as SQS reports an entry it did not take. With
//! [`Fault::Once`] that happens the first time only (`SenderFault: false`, an internal
//! error: another try succeeds); with [`Fault::SenderFault`] every time (`SenderFault:
//! true`: it never will). Every `SendMessageBatch` call is noted: its entries and the bytes
//! of their bodies.
//!
//! HTTP/1.1 with `Content-Length` bodies, which is all the AWS SDK sends for SQS's JSON
//! protocol; connections are kept alive as the SDK expects.

use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the stand-in does to an entry whose body contains a marker.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Fails it once, as SQS's own trouble would (`SenderFault: false`).
    Once(String),
    /// Fails it every time as the sender's fault (`SenderFault: true`).
    SenderFault(String),
}

/// One `SendMessageBatch` call as the stand-in saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchCall {
    pub entries: usize,
    pub body_bytes: usize,
    /// Entries the stand-in failed.
    pub failed: usize,
}

#[derive(Default)]
struct State {
    faults: Vec<(Fault, bool)>,
    calls: Vec<BatchCall>,
}

pub struct SqsStandIn {
    pub url: String,
    state: Arc<Mutex<State>>,
    task: JoinHandle<()>,
}

impl Drop for SqsStandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SqsStandIn {
    /// Starts a stand-in in front of the moto server at `moto_url`.
    pub async fn start(moto_url: &str, faults: Vec<Fault>) -> SqsStandIn {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(State {
            faults: faults.into_iter().map(|f| (f, false)).collect(),
            calls: Vec::new(),
        }));
        let (moto, shared) = (moto_url.to_string(), state.clone());
        let task = tokio::spawn(async move {
            let client = reqwest::Client::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (moto, state, client) = (moto.clone(), shared.clone(), client.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, &moto, &state, &client).await;
                });
            }
        });
        SqsStandIn { url, state, task }
    }

    /// Every `SendMessageBatch` call so far.
    pub fn calls(&self) -> Vec<BatchCall> {
        self.state.lock().unwrap().calls.clone()
    }
}

/// Serves one connection, request after request.
async fn serve(
    mut stream: TcpStream,
    moto: &str,
    state: &Mutex<State>,
    client: &reqwest::Client,
) -> std::io::Result<()> {
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let header_end = loop {
            if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        };
        let head = String::from_utf8_lossy(&buffer[..header_end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
        let headers: Vec<(String, String)> = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.clone())
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buffer.len() < header_end + length {
            let mut chunk = [0u8; 8192];
            let read = stream.read(&mut chunk).await?;
            if read == 0 {
                return Ok(());
            }
            buffer.extend_from_slice(&chunk[..read]);
        }
        let body = buffer[header_end..header_end + length].to_vec();
        buffer.drain(..header_end + length);

        let target = header("x-amz-target").unwrap_or_default();
        let (body, failed) = if target == "AmazonSQS.SendMessageBatch" {
            take_out_faults(&body, state)
        } else {
            (body, Vec::new())
        };
        if !failed.is_empty() && body.is_empty() {
            // Every entry failed: moto would refuse an empty batch, SQS answers this.
            let answer = serde_json::to_vec(&json!({"Successful": [], "Failed": failed})).unwrap();
            let reply = format!(
                "HTTP/1.1 200 Stand-in\r\ncontent-type: application/x-amz-json-1.0\r\ncontent-length: {}\r\n\r\n",
                answer.len()
            );
            stream.write_all(reply.as_bytes()).await?;
            stream.write_all(&answer).await?;
            continue;
        }
        let mut forward = client.post(format!("{moto}{path}")).body(body);
        for name in [
            "x-amz-target",
            "content-type",
            "authorization",
            "x-amz-date",
        ] {
            if let Some(value) = header(name) {
                forward = forward.header(name, value);
            }
        }
        let (status, content_type, mut answer) = match forward.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let content_type = response
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("application/x-amz-json-1.0")
                    .to_string();
                (
                    status,
                    content_type,
                    response.bytes().await.unwrap_or_default().to_vec(),
                )
            }
            Err(_) => (502, "text/plain".to_string(), b"moto unreachable".to_vec()),
        };
        if !failed.is_empty() && status == 200 {
            if let Ok(mut value) = serde_json::from_slice::<Value>(&answer) {
                let list = value
                    .as_object_mut()
                    .unwrap()
                    .entry("Failed")
                    .or_insert_with(|| json!([]));
                list.as_array_mut().unwrap().extend(failed);
                answer = serde_json::to_vec(&value).unwrap();
            }
        }
        let reply = format!(
            "HTTP/1.1 {status} Stand-in\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
            answer.len()
        );
        stream.write_all(reply.as_bytes()).await?;
        stream.write_all(&answer).await?;
    }
}

/// Removes the entries a fault applies to from a `SendMessageBatch` body; answers the body
/// to forward and the `Failed` entries to report for them. Notes the call.
fn take_out_faults(body: &[u8], state: &Mutex<State>) -> (Vec<u8>, Vec<Value>) {
    let Ok(mut request) = serde_json::from_slice::<Value>(body) else {
        return (body.to_vec(), Vec::new());
    };
    let entries = request["Entries"].as_array().cloned().unwrap_or_default();
    let mut state = state.lock().unwrap();
    let mut kept = Vec::new();
    let mut failed = Vec::new();
    let body_bytes = entries
        .iter()
        .map(|e| e["MessageBody"].as_str().unwrap_or_default().len())
        .sum();
    for entry in &entries {
        let text = entry["MessageBody"].as_str().unwrap_or_default();
        let mut report = None;
        for (fault, used) in state.faults.iter_mut() {
            match fault {
                Fault::Once(marker) if !*used && text.contains(marker.as_str()) => {
                    *used = true;
                    report = Some((false, "InternalError", "the stand-in failed it once"));
                }
                Fault::SenderFault(marker) if text.contains(marker.as_str()) => {
                    report = Some((true, "InvalidMessageContents", "the stand-in refuses it"));
                }
                _ => {}
            }
        }
        match report {
            Some((sender_fault, code, message)) => failed.push(json!({
                "Id": entry["Id"],
                "SenderFault": sender_fault,
                "Code": code,
                "Message": message,
            })),
            None => kept.push(entry.clone()),
        }
    }
    state.calls.push(BatchCall {
        entries: entries.len(),
        body_bytes,
        failed: failed.len(),
    });
    if failed.is_empty() {
        return (body.to_vec(), failed);
    }
    if kept.is_empty() {
        return (Vec::new(), failed);
    }
    request["Entries"] = Value::Array(kept);
    (serde_json::to_vec(&request).unwrap(), failed)
}
