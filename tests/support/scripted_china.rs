//! Answers shaped exactly like Volcengine Ark's and DashScope's documented ones
//! (docs/design.md §3), for the scripted stand-in server ([`super::scripted_openrouter`]):
//! successes with an inline image or an image URL, and the error bodies with their codes.

use base64::Engine;
use serde_json::{json, Value};

use super::scripted_openrouter::{Received, Reply};

/// Ark's base URL on the stand-in at `origin`.
pub fn ark_base_url(origin: &str) -> String {
    format!("{origin}/api/v3")
}

/// DashScope's base URL on the stand-in at `origin`.
pub fn dashscope_base_url(origin: &str) -> String {
    format!("{origin}/api/v1")
}

/// The `WxH` (Ark) or `W*H` (DashScope) size a request asked for.
pub fn requested_size(request: &Received) -> (u32, u32) {
    let size = request.body["size"]
        .as_str()
        .or_else(|| request.body.pointer("/parameters/size")?.as_str())
        .expect("a size in the request");
    let (w, h) = size.split_once(['x', '*']).expect("WxH or W*H");
    (w.parse().unwrap(), h.parse().unwrap())
}

fn ark_answer(datum: Value) -> Reply {
    let size = datum["size"].as_str().unwrap_or("2048x2048");
    let (w, h) = size.split_once('x').unwrap_or(("2048", "2048"));
    let pixels: u64 = w.parse::<u64>().unwrap_or(0) * h.parse::<u64>().unwrap_or(0);
    Reply::json(
        200,
        json!({
            "model": "doubao-seedream-4-5-251128",
            "created": 1_764_000_000,
            "data": [datum],
            "usage": {"generated_images": 1, "output_tokens": pixels / 256, "total_tokens": pixels / 256},
        }),
    )
}

/// Ark's answer with the image inline (`response_format: "b64_json"`), sized `w`x`h`.
pub fn ark_image(jpeg: &[u8], (w, h): (u32, u32)) -> Reply {
    ark_answer(json!({
        "b64_json": base64::engine::general_purpose::STANDARD.encode(jpeg),
        "size": format!("{w}x{h}"),
    }))
}

/// Ark's answer naming the image by URL, as a gateway that ignores `response_format` does.
pub fn ark_image_url(url: &str, (w, h): (u32, u32)) -> Reply {
    ark_answer(json!({"url": url, "size": format!("{w}x{h}")}))
}

/// Ark's error body: `{"error": {"code", "message", "param", "type"}}`.
pub fn ark_error(status: u16, code: &str) -> Reply {
    let kind = match status {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        429 => "TooManyRequests",
        _ => "InternalServerError",
    };
    Reply::json(
        status,
        json!({"error": {
            "code": code,
            "message": format!("{code} (stand-in). Request id: 021764000000000abc"),
            "param": "",
            "type": kind,
        }}),
    )
    .with_header("x-request-id", "021764000000000abc")
}

/// DashScope's synchronous answer: the image as an OSS URL.
pub fn dashscope_image_url(url: &str, (w, h): (u32, u32)) -> Reply {
    Reply::json(
        200,
        json!({
            "output": {
                "choices": [{
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": [{"image": url}]},
                }],
                "task_metric": {"TOTAL": 1, "SUCCEEDED": 1, "FAILED": 0},
            },
            "usage": {"width": w, "height": h, "image_count": 1},
            "request_id": "d0250a3d-b07f-49e1-bdc8-6793f4929abc",
        }),
    )
}

/// DashScope's error body: `{"request_id", "code", "message"}`.
pub fn dashscope_error(status: u16, code: &str) -> Reply {
    Reply::json(
        status,
        json!({
            "request_id": "43d18007-0000-0000-0000-000000000000",
            "code": code,
            "message": format!("{code} (stand-in)"),
        }),
    )
}
