//! What each cargo feature brings into the build, and what `cargo lambda build` is asked
//! for.
//!
//! `stage3-lambda` is built with `--no-default-features --features lambda`: the command
//! line's crates (argument parsing, progress bars, `.env` loading) belong to the `cli`
//! feature, and a Lambda build must not compile them. The linker already drops their code
//! from the binary, so only this check notices when one of them creeps back into the
//! Lambda build, as a non-optional dependency or through a feature that turns it on. The
//! last test checks that `cargo lambda build`, which `sam build` runs, asks for that build.
//!
//! It asks `cargo tree` rather than reading Cargo.toml: the resolved tree also sees a
//! crate that arrives as another dependency's dependency, and it needs no TOML parser
//! (none is in the build). `--offline --locked` keeps it to the crates `cargo test`
//! already fetched and the lock file as it is; each call takes well under a second.

use std::collections::BTreeSet;
use std::process::Command;

use serde_json::{json, Value};

/// The crates only the `stage3` command line uses.
const CLI_ONLY: [&str; 3] = ["clap", "indicatif", "dotenvy"];

/// What `cargo ARGS --offline --locked` prints for this package.
fn cargo(args: &[&str]) -> String {
    // Under `cargo test`, CARGO is the cargo that runs the tests.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let output = Command::new(cargo)
        .args(args)
        .args(["--offline", "--locked", "--manifest-path", manifest])
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("cargo prints UTF-8")
}

/// The names of the crates a build with `features` compiles for the host, dev- and
/// build-dependencies left out.
fn normal_dependencies(features: &[&str]) -> BTreeSet<String> {
    let tree = cargo(&[&["tree", "-e", "normal", "--prefix", "none"], features].concat());
    // Each line is `name vVERSION`, maybe followed by ` (proc-macro)`, a path or ` (*)`.
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_lambda_build_compiles_none_of_the_command_lines_crates() {
    let crates = normal_dependencies(&["--no-default-features", "--features", "lambda"]);
    assert!(
        crates.contains("lambda_runtime"),
        "not the Lambda build's tree: {crates:?}"
    );
    let cli_crates: Vec<&str> = CLI_ONLY
        .into_iter()
        .filter(|name| crates.contains(*name))
        .collect();
    assert!(
        cli_crates.is_empty(),
        "the Lambda build compiles {cli_crates:?}: make them optional, under `cli`"
    );
}

/// The same question with the `cli` feature on finds all three: the answer above is not
/// the parsing missing them.
#[test]
fn the_default_build_compiles_the_command_lines_crates() {
    let crates = normal_dependencies(&[]);
    for name in CLI_ONLY {
        assert!(crates.contains(name), "{name} missing from {crates:?}");
    }
}

/// `sam build` runs `cargo lambda build --release --bin stage3-lambda` and cannot add cargo
/// flags to it: cargo-lambda takes them from the binary's package metadata instead.
#[test]
fn cargo_lambda_builds_the_function_with_the_lambda_feature_alone() {
    let metadata: Value =
        serde_json::from_str(&cargo(&["metadata", "--no-deps", "--format-version", "1"]))
            .expect("cargo metadata prints JSON");
    let package = &metadata["packages"][0];
    assert_eq!(package["name"], "stage3");
    assert_eq!(
        package["metadata"]["lambda"]["bin"]["stage3-lambda"]["build"],
        json!({"no_default_features": true, "features": ["lambda"]}),
        "Cargo.toml's [package.metadata.lambda.bin.stage3-lambda.build]"
    );
}

/// Left unnamed, `panic` is "unwind" for cargo but "abort" for `cargo lambda build`, which
/// adds it to a release profile that names none: a handler's panic would then kill the
/// sandbox instead of failing one invocation. Read as text: no TOML parser is in the build.
#[test]
fn the_release_profile_keeps_unwinding_under_cargo_lambda() {
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .expect("Cargo.toml");
    let (_, release) = manifest
        .split_once("\n[profile.release]\n")
        .expect("a [profile.release] section");
    let section = release.split("\n[").next().unwrap_or(release);
    assert!(
        section
            .lines()
            .any(|line| line.trim() == r#"panic = "unwind""#),
        "[profile.release] must say panic = \"unwind\": {section}"
    );
}
