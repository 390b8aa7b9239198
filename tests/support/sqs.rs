//! SQS events as Lambda delivers them, for the handler's tests.

use serde_json::{json, Value};

/// One record of a first delivery from the stage's request queue, `body` as is.
pub fn sqs_record(message_id: &str, body: &str) -> Value {
    json!({
        "messageId": message_id,
        "receiptHandle": format!("handle-{message_id}"),
        "body": body,
        "attributes": {"ApproximateReceiveCount": "1"},
        "messageAttributes": {},
        "eventSource": "aws:sqs",
        "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:stage3-requests",
        "awsRegion": "us-east-1"
    })
}

/// An SQS event carrying `records`.
pub fn sqs_event(records: Vec<Value>) -> Value {
    json!({ "Records": records })
}
