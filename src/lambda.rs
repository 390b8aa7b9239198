//! The AWS Lambda adapter: event shapes in, answers out (filled in by the Lambda issue).
