//! The SAM template's IAM policy against the AWS calls the code makes.
//!
//! Local stores and stand-ins check no IAM, so a permission the function lacks passes every
//! other test and fails only in AWS: without `s3:DeleteObject` every claim release failed
//! there, and claims blocked retries for their whole lifetime. So this test reads the
//! operations each AWS client is called with out of its source, checks them against the
//! list the module keeps next to the calls (`IAM_ACTIONS`), and checks that
//! infra/template.yaml grants each action to the function on the resource the code uses,
//! under the condition that turns the feature on, and grants nothing more. It also checks
//! that infra/README.md's table names each call with the statement that allows it.
//!
//! The template is read as text, with a small reader for the block-style YAML its policies
//! are written in: a YAML crate would need CloudFormation's tags (`!Sub`, `!If`) taught to
//! it anyway, and this reader fails loudly on anything it does not understand.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use stage3::events::dead_letter::DeadLetterQueue;
use stage3::events::EventBridgeSink;
use stage3::queue::RequestQueue;
use stage3::storage::S3Store;

fn repository_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- The calls in the code -------------------------------------------------------------

/// `put_object` → `PutObject`, `list_objects_v2` → `ListObjectsV2`: the SDK's method name
/// as the API operation.
fn operation_name(method: &str) -> String {
    method
        .split('_')
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect()
}

/// Every operation called on `.client` in the non-test code of `source`: the SDK's fluent
/// builders, `self.client.put_object()` however it is wrapped over lines. Any other use of
/// the client fails the test, since the scan could not tell what it calls.
fn client_calls(source: &str) -> BTreeSet<String> {
    let code = source.split("#[cfg(test)]").next().unwrap_or(source);
    let compact: String = code.chars().filter(|c| !c.is_whitespace()).collect();
    let mut calls = BTreeSet::new();
    for (at, _) in compact.match_indices(".client") {
        let rest = &compact[at + ".client".len()..];
        let method: String = rest
            .strip_prefix('.')
            .map(|after| {
                after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            !method.is_empty() && rest[1 + method.len()..].starts_with("()"),
            "a use of the client this scan cannot read: {}",
            rest.chars().take(60).collect::<String>()
        );
        calls.insert(operation_name(&method));
    }
    calls
}

/// The operations an `IAM_ACTIONS` list names.
fn listed(actions: &[(&str, &str)]) -> BTreeSet<String> {
    actions.iter().map(|(op, _)| op.to_string()).collect()
}

#[test]
fn every_aws_call_in_the_code_is_in_its_modules_iam_list() {
    for (file, actions) in [
        ("src/storage/s3.rs", S3Store::IAM_ACTIONS),
        ("src/events/eventbridge.rs", EventBridgeSink::IAM_ACTIONS),
        ("src/events/dead_letter.rs", DeadLetterQueue::IAM_ACTIONS),
        ("src/queue.rs", RequestQueue::IAM_ACTIONS),
    ] {
        let calls = client_calls(&repository_file(file));
        assert!(!calls.is_empty(), "{file}: no client call found");
        assert_eq!(
            calls,
            listed(actions),
            "{file}: the calls it makes and its IAM_ACTIONS differ"
        );
    }
}

#[test]
fn the_call_scan_reads_wrapped_chains_and_refuses_what_it_cannot_read() {
    let source = "let a = self\n    .client\n    .list_objects_v2()\n    .send();\n\
                  self.client.put_object().send();\n#[cfg(test)]\nstore.client.config();";
    assert_eq!(
        client_calls(source),
        BTreeSet::from(["ListObjectsV2".to_string(), "PutObject".to_string()])
    );
    let unreadable = std::panic::catch_unwind(|| client_calls("let c = &self.client; c.x();"));
    assert!(unreadable.is_err());
}

// ---- The template ----------------------------------------------------------------------

/// One meaningful line of YAML: its indentation and its text, comments and blanks dropped.
#[derive(Debug, Clone, Copy)]
struct Line<'a> {
    indent: usize,
    text: &'a str,
}

fn yaml_lines(yaml: &str) -> Vec<Line<'_>> {
    yaml.lines()
        .filter_map(|raw| {
            let text = raw.trim();
            (!text.is_empty() && !text.starts_with('#')).then(|| Line {
                indent: raw.len() - raw.trim_start().len(),
                text,
            })
        })
        .collect()
}

/// The lines nested under `lines[at]`: those after it, up to the next line indented no
/// deeper than it.
fn children<'a>(lines: &'a [Line<'a>], at: usize) -> &'a [Line<'a>] {
    let indent = lines[at].indent;
    let end = lines[at + 1..]
        .iter()
        .position(|line| line.indent <= indent)
        .map_or(lines.len(), |n| at + 1 + n);
    &lines[at + 1..end]
}

/// The index of the one line reading `text`, at `indent` when given.
fn find(lines: &[Line], text: &str, indent: Option<usize>) -> usize {
    let found: Vec<usize> = (0..lines.len())
        .filter(|&i| lines[i].text == text && indent.is_none_or(|n| lines[i].indent == n))
        .collect();
    assert_eq!(found.len(), 1, "{text:?} found {} times", found.len());
    found[0]
}

/// A scalar as the template writes it, quotes removed: `!GetAtt ImageBucket.Arn`,
/// `!Sub ${ImageBucket.Arn}/${KeyPrefix}*`, `s3:GetObject`.
fn scalar(raw: &str) -> String {
    let raw = raw.trim();
    let (tag, value) = match raw.split_once(' ') {
        Some((tag, value)) if tag.starts_with('!') => (Some(tag), value.trim()),
        _ => (None, raw),
    };
    let value = value.trim_matches('"').trim_matches('\'');
    assert!(
        !value.starts_with('[') && !value.starts_with('{'),
        "flow collections are beyond this reader: {raw}"
    );
    match tag {
        Some(tag) => format!("{tag} {value}"),
        None => value.to_string(),
    }
}

/// One statement of the function's policies.
#[derive(Debug, Clone)]
struct Statement {
    sid: String,
    effect: String,
    actions: Vec<String>,
    resources: Vec<String>,
    has_condition: bool,
    /// The template condition of the `!If` the statement's policy sits in, if any.
    when: Option<String>,
}

/// The value of `key` among a statement's fields (`fields` are the lines under its `- Sid:`
/// line, at `indent`): a scalar on the line, or a list below it.
fn field(fields: &[Line], indent: usize, key: &str) -> Vec<String> {
    let prefix = format!("{key}:");
    let Some(at) = fields
        .iter()
        .position(|line| line.indent == indent && line.text.starts_with(&prefix))
    else {
        return Vec::new();
    };
    let inline = fields[at].text[prefix.len()..].trim();
    if !inline.is_empty() {
        return vec![scalar(inline)];
    }
    children(fields, at)
        .iter()
        .map(|line| {
            let item = line
                .text
                .strip_prefix("- ")
                .unwrap_or_else(|| panic!("{key}: expected a list item, got {:?}", line.text));
            scalar(item)
        })
        .collect()
}

/// The template condition of the innermost `- !If` enclosing `lines[at]`.
fn enclosing_if(lines: &[Line], at: usize) -> Option<String> {
    let mut indent = lines[at].indent;
    for i in (0..at).rev() {
        if lines[i].indent < indent {
            indent = lines[i].indent;
            if lines[i].text == "- !If" {
                let condition = lines.get(i + 1)?.text.strip_prefix("- ")?;
                return Some(condition.to_string());
            }
        }
    }
    None
}

/// Every statement of `Stage3Function`'s `Policies`.
fn function_statements(template: &str) -> Vec<Statement> {
    let lines = yaml_lines(template);
    let function = find(&lines, "Stage3Function:", Some(2));
    let body = children(&lines, function);
    let policies = find(body, "Policies:", None);
    let policies = children(body, policies);
    let mut statements = Vec::new();
    for (at, line) in policies.iter().enumerate() {
        let Some(sid) = line.text.strip_prefix("- Sid: ") else {
            continue;
        };
        let fields = children(policies, at);
        let indent = line.indent + 2;
        let effect = field(fields, indent, "Effect");
        statements.push(Statement {
            sid: scalar(sid),
            effect: effect.first().cloned().unwrap_or_default(),
            actions: field(fields, indent, "Action"),
            resources: field(fields, indent, "Resource"),
            has_condition: fields
                .iter()
                .any(|f| f.indent == indent && f.text.starts_with("Condition:")),
            when: enclosing_if(policies, at),
        });
    }
    // A statement without a Sid would be skipped above: refuse it instead.
    for (at, line) in policies.iter().enumerate() {
        if line.text == "Statement:" {
            let items = children(policies, at);
            let item_indent = items.first().map_or(0, |item| item.indent);
            for item in items.iter().filter(|item| item.indent == item_indent) {
                assert!(
                    item.text.starts_with("- Sid: "),
                    "every statement needs a Sid first: {:?}",
                    item.text
                );
            }
        }
    }
    assert!(!statements.is_empty(), "no statement found");
    statements
}

const OBJECTS: &str = "!Sub ${ImageBucket.Arn}/${KeyPrefix}*";
const BUCKET: &str = "!GetAtt ImageBucket.Arn";
const BUS: &str =
    "!Sub arn:${AWS::Partition}:events:${AWS::Region}:${AWS::AccountId}:event-bus/${EventBusName}";
const DEAD_LETTER_QUEUE: &str = "!GetAtt DeadLetterQueue.Arn";

/// What the function needs: per IAM action, the resource the code calls it on and the
/// template condition under which the code can call it.
fn needed() -> BTreeMap<&'static str, (&'static str, Option<&'static str>)> {
    let mut needed = BTreeMap::new();
    for (_, action) in S3Store::IAM_ACTIONS {
        // `s3:ListBucket` is a bucket action; the others act on objects, all under the
        // key prefix. With an external bucket the function signs with that bucket's keys,
        // so its role gets no S3 permission at all.
        let resource = if *action == "s3:ListBucket" {
            BUCKET
        } else {
            OBJECTS
        };
        needed.insert(*action, (resource, Some("CreateBucket")));
    }
    for (_, action) in EventBridgeSink::IAM_ACTIONS {
        needed.insert(*action, (BUS, Some("HasEventBus")));
    }
    for (_, action) in DeadLetterQueue::IAM_ACTIONS {
        // The template always creates the dead-letter queue and names it to the function.
        needed.insert(*action, (DEAD_LETTER_QUEUE, None));
    }
    needed
}

#[test]
fn the_template_grants_the_function_every_call_the_code_makes() {
    let statements = function_statements(&repository_file("infra/template.yaml"));
    for (action, (resource, when)) in needed() {
        let granting: Vec<&Statement> = statements
            .iter()
            .filter(|s| {
                s.effect == "Allow"
                    && s.actions.iter().any(|a| a == action)
                    && s.resources.iter().any(|r| r == resource)
            })
            .collect();
        assert!(
            !granting.is_empty(),
            "no statement allows {action} on {resource}: {statements:#?}"
        );
        for statement in granting {
            assert_eq!(
                statement.when.as_deref(),
                when,
                "{}: {action} is granted under the wrong condition",
                statement.sid
            );
            // A condition could take the grant back: `s3:prefix` on ListBucket would turn
            // every cache miss (a 404 on HEAD or GET, which carry no prefix) into a 403.
            assert!(
                !statement.has_condition,
                "{}: a condition limits {action}",
                statement.sid
            );
        }
    }
}

#[test]
fn the_template_grants_the_function_nothing_the_code_does_not_call() {
    let statements = function_statements(&repository_file("infra/template.yaml"));
    let needed = needed();
    for statement in &statements {
        assert_eq!(statement.effect, "Allow", "{}", statement.sid);
        assert!(
            !statement.actions.is_empty(),
            "{}: no action",
            statement.sid
        );
        for action in &statement.actions {
            let (resource, _) = needed.get(action.as_str()).unwrap_or_else(|| {
                panic!(
                    "{}: {action} is granted, but the code never needs it",
                    statement.sid
                )
            });
            assert_eq!(
                statement.resources,
                [resource.to_string()],
                "{}: {action} on more than {resource}",
                statement.sid
            );
        }
    }
    // Object actions stay under the key prefix: nothing on `bucket/*`.
    assert!(statements
        .iter()
        .flat_map(|s| &s.resources)
        .all(|r| !r.ends_with("Arn}/*") && r != "*"));
}

#[test]
fn the_policy_reader_finds_statements_their_fields_and_their_condition() {
    let template = "\
Resources:
  Other:
    Properties:
      Policies:
        - Sid: NotThisOne
  Stage3Function:
    Properties:
      Policies:
        - !If
          - CreateBucket
          - Version: \"2012-10-17\"
            Statement:
              # a comment
              - Sid: Objects
                Effect: Allow
                Action:
                  - s3:GetObject
                  - s3:PutObject
                Resource: !Sub \"${ImageBucket.Arn}/${KeyPrefix}*\"
          - !Ref AWS::NoValue
        - Version: \"2012-10-17\"
          Statement:
            - Sid: Queue
              Effect: Allow
              Action: sqs:SendMessage
              Resource: !GetAtt DeadLetterQueue.Arn
              Condition:
                Bool:
                  aws:SecureTransport: \"true\"
";
    let statements = function_statements(template);
    assert_eq!(statements.len(), 2, "{statements:#?}");
    let objects = &statements[0];
    assert_eq!(objects.sid, "Objects");
    assert_eq!(objects.actions, ["s3:GetObject", "s3:PutObject"]);
    assert_eq!(objects.resources, [OBJECTS]);
    assert_eq!(objects.when.as_deref(), Some("CreateBucket"));
    assert!(!objects.has_condition);
    let queue = &statements[1];
    assert_eq!(queue.actions, ["sqs:SendMessage"]);
    assert_eq!(queue.resources, [DEAD_LETTER_QUEUE]);
    assert_eq!(queue.when, None);
    assert!(queue.has_condition);
}

#[test]
fn the_infra_readme_names_each_call_with_the_statement_that_allows_it() {
    let statements = function_statements(&repository_file("infra/template.yaml"));
    let readme = repository_file("infra/README.md");
    let rows: Vec<&str> = readme.lines().filter(|l| l.starts_with('|')).collect();
    for (operation, action) in S3Store::IAM_ACTIONS
        .iter()
        .chain(EventBridgeSink::IAM_ACTIONS)
        .chain(DeadLetterQueue::IAM_ACTIONS)
    {
        let sid = &statements
            .iter()
            .find(|s| s.actions.iter().any(|a| a == action))
            .unwrap_or_else(|| panic!("no statement grants {action}"))
            .sid;
        assert!(
            rows.iter()
                .any(|row| row.contains(&format!("`{operation}`"))
                    && row.contains(&format!("`{action}`"))
                    && row.contains(&format!("`{sid}`"))),
            "infra/README.md has no row for `{operation}` with `{action}` and `{sid}`"
        );
    }
}

/// `stage3 submit` runs with a person's or a pipeline's keys, not the function's role: the
/// template offers them `SubmitterPolicy`, which must allow each call `src/queue.rs` makes
/// on the request queue (and the function's own policies need none of it).
#[test]
fn the_submitter_policy_allows_every_call_a_submission_makes() {
    let template = repository_file("infra/template.yaml");
    let lines = yaml_lines(&template);
    let policy = find(&lines, "SubmitterPolicy:", Some(2));
    let body = children(&lines, policy);
    let readme = repository_file("infra/README.md");
    for (operation, action) in RequestQueue::IAM_ACTIONS {
        let granted = body.windows(4).any(|window| {
            window[0].text.starts_with("- Sid: ")
                && window[1].text == "Effect: Allow"
                && window[2].text == format!("Action: {action}")
                && window[3].text == "Resource: !GetAtt RequestQueue.Arn"
        });
        assert!(
            granted,
            "SubmitterPolicy does not allow {action} on the request queue"
        );
        assert!(
            readme.lines().any(|row| row.starts_with('|')
                && row.contains(&format!("`{operation}`"))
                && row.contains(&format!("`{action}`"))
                && row.contains("`SubmitterPolicy`")),
            "infra/README.md has no row for `{operation}` with `{action}` and `SubmitterPolicy`"
        );
    }
}
