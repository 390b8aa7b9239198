//! Character consistency: reference images reach the provider and shape the cache key.

use crate::suite::support::config::TestConfig;
use crate::suite::support::scripted_openrouter::{noisy_image, Reply, ScriptedOpenRouter};
use image::ImageFormat;
use stage3::{GenerationRequest, Stage2Output};

const FOX: &str = "https://cdn.example.com/characters/fox.png";

fn scene(characters: &[&str], extra_references: &[&str]) -> GenerationRequest {
    let mut request: GenerationRequest = Stage2Output {
        scene_id: "scene_fox".into(),
        image_prompt: "The fox crosses the frozen river".into(),
        negative_prompt: String::new(),
        style_tags: vec![],
        characters_in_scene: characters.iter().map(|c| c.to_string()).collect(),
    }
    .into();
    request.reference_images = extra_references.iter().map(|r| r.to_string()).collect();
    request
}

#[tokio::test]
async fn characters_in_scene_pull_in_their_reference_images() {
    let server = ScriptedOpenRouter::start(|_, _| {
        Reply::image(&noisy_image(256, 256, ImageFormat::Png), "image/png")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("characters.json");
    std::fs::write(&refs, format!(r#"{{"char_fox": "{FOX}"}}"#)).unwrap();
    let service = TestConfig::new()
        .openrouter(&server.base_url, "sk-or-v1-test")
        .out(&dir.path().join("images"))
        .set("STAGE3_CHARACTER_REFERENCES", refs.to_str().unwrap())
        .service()
        .await;

    let inline = "data:image/png;base64,iVBORw0KGgo=";
    let with_fox = service
        .generate_scene_image(scene(&["char_fox", "char_unknown"], &[inline]))
        .await
        .unwrap();
    let sent = &server.requests()[0].body["input_references"];
    let urls: Vec<&str> = sent
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["image_url"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(
        urls,
        vec![inline, FOX],
        "the request's own first, then its characters'"
    );
    let recorded = &with_fox.generation_params.reference_images;
    assert_eq!(recorded[1], FOX);
    assert!(
        recorded[0].starts_with("data:image/png;sha256,"),
        "inline images are recorded by hash"
    );

    // Without the character, the request is a different one: a new key, a new image.
    let without = service
        .generate_scene_image(scene(&[], &[inline]))
        .await
        .unwrap();
    assert_ne!(
        with_fox.generation_params.request_hash,
        without.generation_params.request_hash
    );
    assert!(server.requests()[1].body.get("input_references").is_some());
    assert_eq!(server.total_calls(), 2);
}
