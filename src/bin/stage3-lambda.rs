//! `stage3-lambda`: the AWS Lambda function (filled in by the Lambda issue).

fn main() {}
