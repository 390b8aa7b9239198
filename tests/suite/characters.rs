//! Character modes against the OpenRouter stand-in: which page waits for which, how many
//! references each call carries, what sheets cost, and that a rerun costs nothing.
//!
//! Order is asserted on the stand-in's own record of when each call arrived and when its
//! answer was written, never on wall-clock durations: every call takes a real latency, so
//! a page that waited for another starts after that page's answer, and pages that did not
//! wait overlap.

use std::time::{Duration, Instant};

use crate::suite::support::config::TestConfig;
use crate::suite::support::noisy_png;
use crate::suite::support::scripted_openrouter::{
    Catalogue, CatalogueModel, Received, Reply, ScriptedOpenRouter,
};
use serde_json::{json, Value};
use stage3::BatchOptions;
use stage3::Stage3Service;
use stage3::{parse_submission, BatchAnswer, Stage3Output};

/// Long enough that pages started together are certainly in flight together.
const LATENCY: Duration = Duration::from_millis(300);

/// Four pages: the fox on 1, 3 and 4, the owl on 2 and 4. Each prompt carries its marker.
fn story(mode: &str, described: bool) -> Value {
    let page = |id: &str, marker: &str, cast: &[&str]| {
        json!({"scene_id": id, "image_prompt": format!("{marker} in the winter forest"),
               "style_tags": ["watercolor"], "characters_in_scene": cast})
    };
    let mut batch = json!({
        "story_id": "winter",
        "character_mode": mode,
        "scenes": [
            page("p1", "PAGE1 the fox wakes", &["fox"]),
            page("p2", "PAGE2 the owl hoots", &["owl"]),
            page("p3", "PAGE3 the fox runs", &["fox"]),
            page("p4", "PAGE4 the fox meets the owl", &["fox", "owl"]),
        ]
    });
    if described {
        batch["characters"] = json!({
            "fox": {"name": "Rufus", "description": "SHEETFOX a small red fox with a white-tipped tail"},
            "owl": {"name": "Hoot", "description": "SHEETOWL a grey owl with round spectacles"},
        });
    }
    batch
}

async fn stand_in(
    script: impl Fn(&Received) -> Reply + Send + Sync + 'static,
) -> ScriptedOpenRouter {
    ScriptedOpenRouter::start(move |received, _| script(received).after(LATENCY)).await
}

/// A picture of its own for every prompt: a new sheet is a new image.
fn image_for(received: &Received) -> Reply {
    let seed = received
        .prompt()
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    Reply::image(&noisy_png(256, 256, seed), "image/png")
}

async fn service(server: &ScriptedOpenRouter, dir: &std::path::Path) -> Stage3Service {
    TestConfig::new()
        .openrouter(&server.base_url, "sk-or-v1-characters")
        .out(dir)
        .service()
        .await
}

async fn run(service: &Stage3Service, batch: Value) -> BatchAnswer {
    let submission = parse_submission(batch, 100).unwrap();
    service
        .run(submission, &BatchOptions::default(), &())
        .await
        .unwrap()
        .answer
}

/// The call whose prompt carries `marker`: when it started and when it was answered.
fn span(server: &ScriptedOpenRouter, marker: &str) -> (Instant, Instant, Value) {
    let spans = server.spans();
    let matching: Vec<_> = spans
        .iter()
        .filter(|(r, _)| r.prompt().contains(marker))
        .collect();
    assert_eq!(matching.len(), 1, "one call for {marker}");
    let (request, end) = matching[0];
    (request.at, end.expect("answered"), request.body.clone())
}

fn references_sent(body: &Value) -> usize {
    body["input_references"].as_array().map_or(0, Vec::len)
}

fn result<'a>(answer: &'a BatchAnswer, scene_id: &str) -> &'a Stage3Output {
    answer
        .results
        .iter()
        .find(|r| r.scene_id == scene_id)
        .unwrap_or_else(|| panic!("{scene_id} in {answer:#?}"))
}

fn overlap(a: (Instant, Instant), b: (Instant, Instant)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

#[tokio::test]
async fn first_appearance_pages_wait_only_for_their_own_characters() {
    let server = stand_in(image_for).await;
    let dir = tempfile::tempdir().unwrap();
    let service = service(&server, dir.path()).await;

    let answer = run(&service, story("first-appearance", false)).await;
    assert!(answer.failures.is_empty(), "{:#?}", answer.failures);
    assert_eq!(server.total_calls(), 4, "no extra call");
    assert!(answer.characters.is_empty(), "no sheet in this mode");

    let (p1_start, p1_end, p1) = span(&server, "PAGE1");
    let (p2_start, p2_end, p2) = span(&server, "PAGE2");
    let (p3_start, _, p3) = span(&server, "PAGE3");
    let (p4_start, _, p4) = span(&server, "PAGE4");
    assert!(
        overlap((p1_start, p1_end), (p2_start, p2_end)),
        "pages 1 and 2 share no character and run together"
    );
    assert!(
        p3_start > p1_end,
        "page 3 starts after page 1's image came back"
    );
    assert!(
        p4_start > p1_end && p4_start > p2_end,
        "page 4 waits for both first appearances"
    );
    assert_eq!(
        [p1, p2, p3, p4]
            .iter()
            .map(references_sent)
            .collect::<Vec<_>>(),
        [0, 0, 1, 2]
    );

    // Page 4's references are pages 1 and 2 as stored, recorded by hash and source.
    let fox = &result(&answer, "p1").generation_params.content_sha256;
    let owl = &result(&answer, "p2").generation_params.content_sha256;
    let recorded =
        serde_json::to_value(&result(&answer, "p4").generation_params.references).unwrap();
    assert_eq!(
        recorded,
        json!([
            {"character": "fox", "sha256": fox, "source": "scene:p1"},
            {"character": "owl", "sha256": owl, "source": "scene:p2"},
        ])
    );
    assert!(result(&answer, "p1")
        .generation_params
        .references
        .is_empty());

    // The rerun: every page from the store, first appearances rebuilt from their images.
    let again = run(&service, story("first-appearance", false)).await;
    assert_eq!(server.total_calls(), 4, "a cached rerun makes no call");
    assert_eq!(again.summary.from_cache, 4);
    assert_eq!(
        result(&again, "p4").generation_params.request_hash,
        result(&answer, "p4").generation_params.request_hash
    );
}

#[tokio::test]
async fn sheet_mode_draws_one_sheet_per_described_character_before_its_pages() {
    let server = stand_in(image_for).await;
    let dir = tempfile::tempdir().unwrap();
    let service = service(&server, dir.path()).await;

    // `stage3 validate`'s estimate counts the sheets, and calls nobody.
    let check = service
        .check(parse_submission(story("sheet", true), 100).unwrap())
        .await
        .unwrap();
    let estimate = check.plan.estimated_cost_usd.unwrap();
    assert!((estimate - 6.0 * 0.04).abs() < 1e-9, "{estimate}");
    assert_eq!(server.total_calls(), 0);

    let answer = run(&service, story("sheet", true)).await;
    assert!(answer.failures.is_empty(), "{:#?}", answer.failures);
    assert_eq!(server.total_calls(), 6, "four pages and two sheets");
    assert_eq!(answer.results.len(), 4, "sheets are not scenes");
    assert_eq!(answer.characters.len(), 2);
    assert_eq!(answer.summary.scenes, 4);

    let (_, fox_end, fox_sheet) = span(&server, "SHEETFOX");
    let (_, owl_end, _) = span(&server, "SHEETOWL");
    let sheet_prompt = fox_sheet["prompt"].as_str().unwrap();
    assert!(sheet_prompt.contains("Rufus") && sheet_prompt.contains("watercolor"));
    assert!(
        sheet_prompt.contains("plain white background"),
        "{sheet_prompt}"
    );
    for (page, waits_for) in [
        ("PAGE1", vec![fox_end]),
        ("PAGE2", vec![owl_end]),
        ("PAGE3", vec![fox_end]),
        ("PAGE4", vec![fox_end, owl_end]),
    ] {
        let (start, _, body) = span(&server, page);
        assert!(
            waits_for.iter().all(|end| start > *end),
            "{page} starts after its characters' sheets"
        );
        assert_eq!(references_sent(&body), waits_for.len(), "{page}");
    }

    let fox = answer
        .characters
        .iter()
        .find(|c| c.scene_id == "characters/winter/fox")
        .expect("the fox's sheet");
    let key = format!(
        "characters/winter/fox-{}.png",
        &fox.generation_params.content_sha256[..16]
    );
    assert!(dir.path().join(&key).is_file(), "{key} stored");
    let p4 = &result(&answer, "p4").generation_params.references;
    assert_eq!(p4[0].source, "sheet");
    assert_eq!(
        p4[0].sha256.as_ref(),
        Some(&fox.generation_params.content_sha256)
    );
    let cost = answer.summary.cost_usd;
    assert!(
        (cost - 6.0 * 0.04).abs() < 1e-9,
        "sheets are paid for: {cost}"
    );

    // The rerun: sheets and pages from the store, at no call.
    let again = run(&service, story("sheet", true)).await;
    assert_eq!(server.total_calls(), 6, "a cached rerun makes no call");
    assert_eq!(again.summary.from_cache, 4);
    assert!(again.characters.iter().all(|c| c.from_cache));
    assert_eq!(again.summary.cost_usd, 0.0);

    // A new description is a new sheet, and so new pages for its character only.
    let mut changed = story("sheet", true);
    changed["characters"]["owl"]["description"] = json!("SHEETOWL a white snowy owl");
    let third = run(&service, changed).await;
    assert_eq!(
        server.total_calls(),
        6 + 3,
        "the owl's sheet, page 2 and page 4"
    );
    assert!(result(&third, "p1").from_cache && result(&third, "p3").from_cache);
}

#[tokio::test]
async fn a_failed_first_appearance_hands_the_character_to_the_next_page() {
    let server = stand_in(|received| {
        if received.prompt().contains("PAGE1") {
            Reply::typed_error(400, "content_policy_violation", "refused")
        } else {
            image_for(received)
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let service = service(&server, dir.path()).await;

    let answer = run(&service, story("first-appearance", false)).await;
    assert_eq!(answer.failures.len(), 1, "{:#?}", answer.failures);
    assert_eq!(answer.failures[0].scene_id, "p1");
    assert_eq!(server.total_calls(), 4, "a refusal is not retried");

    let (_, p1_end, _) = span(&server, "PAGE1");
    let (p3_start, p3_end, p3) = span(&server, "PAGE3");
    let (p4_start, _, p4) = span(&server, "PAGE4");
    assert!(
        p3_start > p1_end,
        "page 3 waited for page 1, then drew the fox itself"
    );
    assert_eq!(
        references_sent(&p3),
        0,
        "page 3 is the fox's first appearance now"
    );
    assert!(p4_start > p3_end);
    assert_eq!(references_sent(&p4), 2);
    let sources: Vec<&str> = result(&answer, "p4")
        .generation_params
        .references
        .iter()
        .map(|r| r.source.as_str())
        .collect();
    assert_eq!(sources, ["scene:p3", "scene:p2"]);
}

#[tokio::test]
async fn a_model_without_image_input_gets_no_generated_references_and_no_sheet() {
    let mut text_only = CatalogueModel::new(
        "acme/text-only-image",
        json!({
            "resolution": {"type": "enum", "values": ["1K"]},
            "aspect_ratio": {"type": "enum", "values": ["1:1", "16:9", "9:16"]},
        }),
        json!([{"billable": "output_image", "unit": "image", "cost_usd": 0.02}]),
    );
    text_only.input_modalities = vec!["text".into()];
    let server = stand_in(image_for).await;
    server.set_catalogue(Catalogue::with(text_only));
    let dir = tempfile::tempdir().unwrap();
    let service = TestConfig::new()
        .openrouter(&server.base_url, "sk-or-v1-characters")
        .set("STAGE3_MODEL", "acme/text-only-image")
        .out(dir.path())
        .service()
        .await;

    for mode in ["first-appearance", "sheet"] {
        let answer = run(&service, story(mode, true)).await;
        assert!(answer.failures.is_empty(), "{mode}: {:#?}", answer.failures);
        assert!(
            answer.characters.is_empty(),
            "{mode}: no sheet it could be sent"
        );
    }
    assert_eq!(server.total_calls(), 4, "four pages once, nothing else");
    assert!(server
        .requests()
        .iter()
        .all(|r| r.body.get("input_references").is_none()));
}

#[tokio::test]
async fn mode_off_sends_nothing_new_and_keeps_the_keys() {
    let server = stand_in(image_for).await;
    let dir = tempfile::tempdir().unwrap();
    let service = service(&server, dir.path()).await;
    let mut plain = story("off", true);
    plain.as_object_mut().unwrap().remove("character_mode");
    let off = run(&service, plain).await;
    assert_eq!(server.total_calls(), 4);
    assert!(off.characters.is_empty());
    assert!(off
        .results
        .iter()
        .all(|r| r.generation_params.references.is_empty()));
    // The same batch without a cast is the same requests: served from the store.
    let mut bare = story("off", false);
    bare.as_object_mut().unwrap().remove("character_mode");
    let again = run(&service, bare).await;
    assert_eq!(again.summary.from_cache, 4);
    assert_eq!(server.total_calls(), 4);
}

/// The CLI end to end, offline: `--character-mode sheet` over a story with a cast. The
/// placeholder draws the references it was given, so the sheets and pages show the chain;
/// the storyboard shows the cast above the pages. `STAGE3_CHARACTERS_KEEP=DIR` keeps the
/// images and the page's screenshot for a person to look at.
#[tokio::test]
async fn the_cli_draws_sheets_first_and_the_storyboard_shows_the_cast() {
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("images");
    let mut batch = story("off", true);
    batch.as_object_mut().unwrap().remove("character_mode");
    let input = work.path().join("story.json");
    std::fs::write(&input, serde_json::to_vec(&batch).unwrap()).unwrap();
    let run = |mode: &'static str| {
        let (work, input, out) = (work.path().to_path_buf(), input.clone(), out.clone());
        tokio::task::spawn_blocking(move || {
            crate::suite::support::stage3_command(&work)
                .env("STAGE3_PROVIDER", "placeholder")
                .args(["generate", input.to_str().unwrap(), "--out"])
                .arg(&out)
                .args(["--character-mode", mode])
                .output()
                .unwrap()
        })
    };
    let output = run("sheet").await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        answer["characters"].as_array().unwrap().len(),
        2,
        "{answer}"
    );
    assert_eq!(
        answer["results"][3]["generation_params"]["references"][1]["source"],
        "sheet"
    );

    let manifest: Value =
        serde_json::from_slice(&std::fs::read(out.join("stories/winter/manifest.json")).unwrap())
            .unwrap();
    let cast = manifest["cast"]
        .as_array()
        .expect("the manifest lists the cast");
    assert_eq!(cast[0]["id"], "fox");
    assert_eq!(cast[0]["name"], "Rufus");
    assert!(out.join(cast[0]["image_key"].as_str().unwrap()).is_file());
    let page = out.join("stories/winter/index.html");
    let html = std::fs::read_to_string(&page).unwrap();
    assert!(html.contains(r#"<section class="cast""#) && html.contains("Hoot"));

    // `stage3 gallery` rebuilds the same page from the story's files, cast row included.
    std::fs::remove_file(&page).unwrap();
    let story_dir = out.join("stories/winter");
    let rebuilt = tokio::task::spawn_blocking(move || {
        crate::suite::support::stage3_command(&story_dir)
            .args(["gallery", "."])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        rebuilt.status.success(),
        "{}",
        String::from_utf8_lossy(&rebuilt.stderr)
    );
    assert_eq!(std::fs::read_to_string(&page).unwrap(), html);

    // The rerun is served from the store, sheets included.
    let again = run("sheet").await.unwrap();
    let answer: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(answer["summary"]["from_cache"], 4, "{answer}");
    assert!(answer["characters"]
        .as_array()
        .unwrap()
        .iter()
        .all(|sheet| sheet["from_cache"] == true));

    let keep = std::env::var("STAGE3_CHARACTERS_KEEP").ok();
    if let Some(keep) = &keep {
        let keep = std::path::Path::new(keep);
        std::fs::create_dir_all(keep).unwrap();
        let sheet = out.join(cast[0]["image_key"].as_str().unwrap());
        std::fs::copy(&sheet, keep.join("sheet-fox.png")).unwrap();
        let p4 = answer["results"][3]["image_path"].as_str().unwrap();
        std::fs::copy(p4, keep.join("page-p4.png")).unwrap();
    }
    if let Some(chromium) = crate::suite::story::chromium("the_cli_draws_sheets_first") {
        let screenshot = work.path().join("storyboard.png");
        crate::suite::story::run_chromium(
            &chromium,
            &page,
            &[
                format!("--screenshot={}", screenshot.display()),
                "--window-size=1280,1000".into(),
                "--virtual-time-budget=10000".into(),
            ],
        )
        .await;
        assert!(image::open(&screenshot).is_ok());
        if let Some(keep) = &keep {
            std::fs::copy(
                &screenshot,
                std::path::Path::new(keep).join("storyboard-cast.png"),
            )
            .unwrap();
        }
    }
}
