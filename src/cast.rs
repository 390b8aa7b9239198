//! Character consistency: the same fox on every page (`STAGE3_CHARACTER_MODE`).
//!
//! Image models keep a character's look when they are shown it: a scene is sent its
//! characters' reference images. Registered references (`STAGE3_CHARACTER_REFERENCES`, a
//! cast's `reference_images`) are the user's and always win. For the other characters of a
//! batch this module makes the references itself, in one of two modes:
//!
//! - **`first-appearance`**: the first scene, in input order, that shows a character is
//!   drawn without a reference for it; its stored image is the reference of every later
//!   scene that shows the character. No extra call. A scene waits only for the first
//!   appearances of its own characters, so pages without a common character run together.
//!   If a first appearance fails, the next scene with the character takes its place.
//! - **`sheet`**: a character with a `description` gets a character sheet (full body,
//!   front and side, plain background, no text), drawn, checked, labelled, stored and
//!   cached like a scene, under `characters/{story_id or "batch"}/{id}-{hash}.png`; every
//!   scene that shows the character is sent it. A character without a description falls
//!   back to its first appearance, and so does one whose sheet failed.
//!
//! How the pieces meet the service: [`Stage3Service::cast_batch`] plans a batch —
//! sheets put in front of the scenes as scenes of their own (so they are looked up,
//! estimated, budgeted, claimed and run like any scene) and each scene's waits noted in a
//! [`Casting`]. The batch's cache lookup skips the scenes that wait: their key is known
//! only once their references are. While the batch runs, the service asks the casting to
//! [`Casting::release`] a waiting scene (which blocks until its references are stored and
//! returns the scene with them attached, and its request hash with their SHA-256s) and
//! tells it each outcome ([`Casting::finished`]).
//!
//! Why no batch can deadlock: a scene waits only for a character whose first appearance is
//! owned by a sheet or by an earlier scene of the batch, and the batch starts scenes in
//! input order with sheets first — so the owner of anything waited for has started, and
//! the chain of waits always ends at a scene that waits for nothing.
//!
//! References travel as the stored image's `https://` URL when the store gives one, and
//! otherwise as a `data:` URL of a copy at most [`MAX_REFERENCE_SIDE`] pixels on its long
//! side and [`MAX_REFERENCE_BYTES`] long. They are hashed by content, never by URL, so a
//! presigned URL that changes on every run keeps the scene's cache key. A model that takes
//! no image input is sent no generated reference (one warning per batch), and its scenes
//! wait for nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use base64::Engine;
use sha2::{Digest, Sha256};
use tokio::sync::{watch, OnceCell};

use crate::cache::{self, ResultKeys};
use crate::error::{Result, Stage3Error};
use crate::image_spec::ImageSpec;
use crate::schema::{
    Cast, CharacterMode, GenerationRequest, ReferenceUsed, Stage3Output, MAX_REFERENCE_IMAGES,
};
use crate::service::{CacheLookup, PreparedScene, RunOptions, SceneOrder, Stage3Service};
use crate::storage::Fetched;

/// The longest side of a reference sent inline: models work from about 1 megapixel, and a
/// request carries every reference of its scene.
pub(crate) const MAX_REFERENCE_SIDE: u32 = 1024;
/// The most bytes of a reference sent inline (the PNG, before base64).
pub(crate) const MAX_REFERENCE_BYTES: usize = 1536 * 1024;
/// Where sheets are stored: `characters/{story_id or "batch"}/{id}-{hash}.png`.
pub(crate) const SHEETS_FOLDER: &str = "characters/";
/// The folder of a batch's sheets when it names no story.
const UNNAMED_STORY: &str = "batch";

/// The part of a batch one submission makes: its scenes (that many, in order) and its
/// cast. An SQS invocation's records are several; their characters never mix.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CastGroup<'a> {
    pub(crate) scenes: usize,
    pub(crate) cast: Option<&'a Cast>,
    pub(crate) story_id: Option<&'a str>,
}

/// The characters of a running batch: who waits for whom, and the references made so far.
#[derive(Debug)]
pub(crate) struct Casting {
    /// Per position in the batch (sheets first): the characters the scene is sent a
    /// generated reference of, by index into `characters`.
    waits: Vec<Vec<usize>>,
    characters: Vec<CharacterPlan>,
    sheets: usize,
    state: Mutex<Progress>,
    changed: watch::Sender<u64>,
}

#[derive(Debug)]
struct CharacterPlan {
    id: String,
    /// The position of the character's sheet, in `sheet` mode with a description.
    sheet: Option<usize>,
    /// The positions of the scenes that show it, in input order.
    candidates: Vec<usize>,
}

#[derive(Debug, Default)]
struct Progress {
    references: Vec<RefState>,
    /// The positions finished, with the stored image when they succeeded.
    finished: HashMap<usize, Option<Arc<Reference>>>,
}

#[derive(Debug, Clone)]
enum RefState {
    /// The sheet, or the scene at this position, is making the reference.
    Sheet,
    Scene(usize),
    Ready(Arc<Reference>),
    /// Every scene that could have made it failed.
    None,
}

/// A stored image that is a character's reference.
#[derive(Debug)]
struct Reference {
    sha256: String,
    /// `sheet` or `scene:<scene_id>`.
    source: String,
    image_key: String,
    /// How it travels, made the first time a scene needs it.
    url: OnceCell<String>,
}

impl Stage3Service {
    /// Plans the characters of a batch made of `groups` (in order, covering `scenes`):
    /// returns the batch's scenes with any sheets in front, and the [`Casting`] that runs
    /// them — `None` when no group asks for a character mode, or none of its characters
    /// needs a generated reference (then the scenes come back as they were, with their
    /// registered references noted). A sheet whose request cannot be made (a description
    /// too long for the prompt limit, say) is left out with a warning: its character falls
    /// back to its first appearance.
    pub(crate) async fn cast_batch(
        &self,
        scenes: Vec<PreparedScene>,
        groups: &[CastGroup<'_>],
    ) -> (Vec<PreparedScene>, Option<Casting>) {
        let mut characters: Vec<CharacterPlan> = Vec::new();
        let mut waits: Vec<Vec<usize>> = vec![Vec::new(); scenes.len()];
        let mut registered: Vec<Vec<ReferenceUsed>> = vec![Vec::new(); scenes.len()];
        let mut sheets: Vec<(usize, PreparedScene)> = Vec::new();
        let mut no_image_input: Vec<&str> = Vec::new();
        let mut takes_cache: HashMap<String, bool> = HashMap::new();
        let mut seen: HashSet<(&str, &str)> = HashSet::new();
        let mut start = 0;
        for group in groups {
            let range = start..(start + group.scenes).min(scenes.len());
            start = range.end;
            let mode = group
                .cast
                .and_then(|cast| cast.mode)
                .unwrap_or(self.config().character_mode);
            if mode == CharacterMode::Off {
                continue;
            }
            let empty = Cast::default();
            let cast = group.cast.unwrap_or(&empty);
            let mut by_id: BTreeMap<&str, usize> = BTreeMap::new();
            for position in range {
                let scene = &scenes[position];
                // An identical repeat runs once, as its first.
                if !seen.insert((scene.scene_id(), scene.request_hash.as_str())) {
                    continue;
                }
                let model_key = scene.spec.model.to_string();
                let takes = match takes_cache.get(&model_key) {
                    Some(takes) => *takes,
                    None => {
                        let takes = self.takes_references(&scene.spec).await;
                        takes_cache.insert(model_key, takes);
                        takes
                    }
                };
                let mut in_scene: Vec<&str> = Vec::new();
                for character in &scene.request.characters_in_scene {
                    if in_scene.contains(&character.as_str()) {
                        continue;
                    }
                    in_scene.push(character);
                    let urls = self.registered_references(cast, character);
                    if !urls.is_empty() {
                        registered[position].extend(urls.iter().map(|url| ReferenceUsed {
                            character: character.clone(),
                            sha256: inline_sha256(url),
                            source: "registered".into(),
                        }));
                        continue;
                    }
                    let index = *by_id.entry(character.as_str()).or_insert_with(|| {
                        characters.push(CharacterPlan {
                            id: character.clone(),
                            sheet: None,
                            candidates: Vec::new(),
                        });
                        characters.len() - 1
                    });
                    characters[index].candidates.push(position);
                    if takes {
                        waits[position].push(index);
                    } else if !no_image_input.contains(&scene.scene_id()) {
                        no_image_input.push(scene.scene_id());
                    }
                }
            }
            if mode == CharacterMode::Sheet {
                for (id, &index) in &by_id {
                    let plan = &characters[index];
                    // A sheet no scene can be sent is money for nothing.
                    let Some(&first) = plan
                        .candidates
                        .iter()
                        .find(|&&position| waits[position].contains(&index))
                    else {
                        continue;
                    };
                    let Some(character) = cast.characters.get(*id) else {
                        continue;
                    };
                    let Some(description) = &character.description else {
                        continue;
                    };
                    let folder = group.story_id.unwrap_or(UNNAMED_STORY);
                    match self.prepare_sheet(
                        folder,
                        id,
                        character.name.as_deref(),
                        description,
                        &scenes[first],
                        &style_tags(&scenes, &characters[index].candidates),
                    ) {
                        Ok(sheet) => sheets.push((index, sheet)),
                        Err(e) => tracing::warn!(
                            character = %id,
                            error = %e,
                            "no sheet for this character; its first appearance is its reference"
                        ),
                    }
                }
            }
            // A first appearance without a sheet before it waits for nobody.
            for &index in by_id.values() {
                if sheets.iter().any(|(with_sheet, _)| *with_sheet == index) {
                    continue;
                }
                if let Some(&first) = characters[index].candidates.first() {
                    waits[first].retain(|&waited| waited != index);
                }
            }
        }
        if !no_image_input.is_empty() {
            tracing::warn!(
                scenes = %no_image_input.iter().take(5).copied().collect::<Vec<_>>().join(", "),
                count = no_image_input.len(),
                "the model of these scenes takes no image input: they are sent no generated \
                 character reference"
            );
        }
        if characters.is_empty() || waits.iter().all(Vec::is_empty) {
            // Nothing to wait for; registered references are still recorded.
            let scenes = scenes
                .into_iter()
                .zip(registered)
                .map(|(mut scene, references)| {
                    scene.references = references;
                    scene
                })
                .collect();
            return (scenes, None);
        }

        // Sheets go first: positions shift by their number.
        let offset = sheets.len();
        let mut batch: Vec<PreparedScene> = Vec::with_capacity(offset + scenes.len());
        let mut references = Vec::with_capacity(characters.len());
        for plan in &mut characters {
            plan.candidates.iter_mut().for_each(|p| *p += offset);
        }
        for (position, (index, sheet)) in sheets.into_iter().enumerate() {
            characters[index].sheet = Some(position);
            batch.push(sheet);
        }
        for plan in &characters {
            references.push(match (plan.sheet, plan.candidates.first()) {
                (Some(_), _) => RefState::Sheet,
                (None, Some(&first)) => RefState::Scene(first),
                (None, None) => RefState::None,
            });
        }
        for (mut scene, own) in scenes.into_iter().zip(registered) {
            scene.references = own;
            batch.push(scene);
        }
        let mut all_waits = vec![Vec::new(); offset];
        all_waits.extend(waits);
        let casting = Casting {
            waits: all_waits,
            characters,
            sheets: offset,
            state: Mutex::new(Progress {
                references,
                finished: HashMap::new(),
            }),
            changed: watch::channel(0).0,
        };
        (batch, Some(casting))
    }

    /// Whether the model of `spec` takes image input, per its catalogue entry or its
    /// provider's table; unknown counts as yes (the provider's check decides later).
    async fn takes_references(&self, spec: &ImageSpec) -> bool {
        let Ok(provider) = self.providers().get(spec.model.provider) else {
            return true;
        };
        match provider.check(spec, &spec.model.model).await {
            Ok(check) => check.takes_references.unwrap_or(true),
            Err(_) => true,
        }
    }

    /// A character's registered references: `STAGE3_CHARACTER_REFERENCES`, then the cast's.
    fn registered_references(&self, cast: &Cast, character: &str) -> Vec<String> {
        let mut urls: Vec<String> = self
            .config()
            .character_references
            .get(character)
            .cloned()
            .into_iter()
            .collect();
        for url in cast.references_of(character) {
            if !urls.contains(url) {
                urls.push(url.clone());
            }
        }
        urls
    }

    /// The sheet of character `id`, as a scene of its own stored under
    /// `characters/{folder}/{id}-…`, drawn by the model of its first scene (`first`).
    fn prepare_sheet(
        &self,
        folder: &str,
        id: &str,
        name: Option<&str>,
        description: &str,
        first: &PreparedScene,
        style_tags: &[String],
    ) -> Result<PreparedScene> {
        let request = GenerationRequest {
            scene_id: id.to_string(),
            image_prompt: sheet_prompt(name, description),
            negative_prompt: "text, letters, captions, labels, watermark, scenery, other \
                              characters"
                .into(),
            style_tags: style_tags.to_vec(),
            characters_in_scene: Vec::new(),
            size: None,
            quality: Some(first.spec.quality),
            seed: None,
            model: Some(first.spec.model.to_string()),
            reference_images: Vec::new(),
        };
        let mut sheet = self.prepare(request).map_err(|e| match e {
            Stage3Error::InvalidRequest(message) => {
                Stage3Error::InvalidRequest(format!("characters.{id} (its sheet): {message}"))
            }
            other => other,
        })?;
        sheet.request.scene_id = format!("{SHEETS_FOLDER}{folder}/{id}");
        sheet.keys = ResultKeys::new(&sheet.request.scene_id, &sheet.request_hash);
        Ok(sheet)
    }
}

impl Casting {
    /// How many of the batch's scenes, at its front, are sheets.
    #[cfg(feature = "lambda")]
    pub(crate) fn sheets(&self) -> usize {
        self.sheets
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Progress> {
        // A panic while holding it leaves plain data behind: carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Stage3Service {
    /// [`Stage3Service::look_up`] for a cast batch: only the scenes whose key is known now
    /// (sheets, and scenes that wait for nobody); the others look when they are released.
    pub(crate) async fn look_up_cast(
        &self,
        scenes: &[PreparedScene],
        casting: Option<&Casting>,
        options: &RunOptions,
    ) -> CacheLookup {
        let Some(casting) = casting else {
            return self.look_up(scenes, options).await;
        };
        let known: Vec<usize> = (0..scenes.len()).filter(|&p| !casting.waits(p)).collect();
        let subset: Vec<PreparedScene> = known.iter().map(|&p| scenes[p].clone()).collect();
        let lookup = self.look_up(&subset, options).await;
        CacheLookup::placed(lookup, &known, scenes.len())
    }
}

#[async_trait::async_trait]
impl SceneOrder for Casting {
    /// Whether the scene at `position` waits for references, and so is looked up only
    /// when they are stored.
    fn waits(&self, position: usize) -> bool {
        self.waits.get(position).is_some_and(|w| !w.is_empty())
    }

    /// Waits until every reference the scene at `position` is sent is stored (or every
    /// scene that could have made one failed, or the scene itself is to make it), and
    /// returns the scene with them attached: in `spec.references` (after the registered
    /// ones) as they travel, in `references` as recorded, and in its request hash by
    /// content.
    async fn release(
        &self,
        service: &Stage3Service,
        scene: &PreparedScene,
        position: usize,
        options: &RunOptions,
    ) -> Result<PreparedScene> {
        let mut ready: Vec<(usize, Arc<Reference>)> = Vec::new();
        let mut receiver = self.changed.subscribe();
        for &character in self.waits.get(position).into_iter().flatten() {
            loop {
                let state = self.lock().references[character].clone();
                match state {
                    RefState::Ready(reference) => {
                        ready.push((character, reference));
                        break;
                    }
                    RefState::Scene(owner) if owner == position => break,
                    RefState::None => break,
                    RefState::Sheet | RefState::Scene(_) => {}
                }
                if let Some(stop) = &options.stop {
                    stop.check()?;
                }
                if receiver.changed().await.is_err() {
                    break;
                }
            }
        }
        if ready.is_empty() {
            return Ok(scene.clone());
        }
        let room = MAX_REFERENCE_IMAGES.saturating_sub(scene.spec.references.len());
        if ready.len() > room {
            tracing::warn!(
                scene_id = %scene.scene_id(),
                dropped = ready.len() - room,
                "more character references than a request carries; the last are not sent"
            );
            ready.truncate(room);
        }
        let mut spec = ImageSpec::clone(&scene.spec);
        let mut references = scene.references.clone();
        let mut hashes = Vec::with_capacity(ready.len());
        for (character, reference) in &ready {
            let url = reference
                .url
                .get_or_try_init(|| transport(service, &reference.image_key, options))
                .await?;
            spec.references.push(url.clone());
            hashes.push(reference.sha256.clone());
            references.push(ReferenceUsed {
                character: self.characters[*character].id.clone(),
                sha256: Some(reference.sha256.clone()),
                source: reference.source.clone(),
            });
        }
        let identity = service.providers().identity(scene.spec.model.provider);
        let request_hash = cache::request_hash_with_characters(identity, &scene.spec, &hashes);
        Ok(PreparedScene {
            keys: ResultKeys::new(scene.scene_id(), &request_hash),
            request: scene.request.clone(),
            spec: Arc::new(spec),
            request_hash,
            references,
        })
    }

    /// Notes how the scene at `position` ended: a stored image becomes the reference of
    /// the characters it was to make one for; a failure hands them to the next scene that
    /// shows them.
    fn finished(&self, position: usize, outcome: &Result<Stage3Output>) {
        let made = outcome.as_ref().ok().map(|output| {
            let sha256 = output.generation_params.content_sha256.clone();
            Arc::new(Reference {
                image_key: cache::image_key(&output.scene_id, &sha256),
                sha256,
                source: if position < self.sheets {
                    "sheet".into()
                } else {
                    format!("scene:{}", output.scene_id)
                },
                url: OnceCell::new(),
            })
        });
        let mut state = self.lock();
        state.finished.insert(position, made.clone());
        let mut changed = false;
        for (index, plan) in self.characters.iter().enumerate() {
            let owned = match state.references[index] {
                RefState::Sheet => plan.sheet == Some(position),
                RefState::Scene(owner) => owner == position,
                _ => false,
            };
            if !owned {
                continue;
            }
            changed = true;
            state.references[index] = match &made {
                Some(reference) => RefState::Ready(reference.clone()),
                None => {
                    if plan.sheet == Some(position) {
                        tracing::warn!(
                            character = %plan.id,
                            "the character's sheet failed; its first appearance is its reference"
                        );
                    }
                    hand_over(plan, position, &state.finished)
                }
            };
        }
        drop(state);
        if changed {
            self.changed.send_modify(|version| *version += 1);
        }
    }
}

/// The next maker of a character's reference after `failed`: the next scene that shows it,
/// or, when that scene has already finished, its image (or the one after it).
fn hand_over(
    plan: &CharacterPlan,
    failed: usize,
    finished: &HashMap<usize, Option<Arc<Reference>>>,
) -> RefState {
    let after_sheet = plan.sheet == Some(failed);
    let mut next = plan
        .candidates
        .iter()
        .copied()
        .filter(|&p| after_sheet || p > failed);
    for position in next.by_ref() {
        match finished.get(&position) {
            None => return RefState::Scene(position),
            Some(Some(reference)) => return RefState::Ready(reference.clone()),
            Some(None) => continue,
        }
    }
    RefState::None
}

/// The stored image at `key` as a provider can read it: its `https://` URL when the store
/// gives one, else a `data:` URL of a copy within [`MAX_REFERENCE_SIDE`] and
/// [`MAX_REFERENCE_BYTES`].
async fn transport(service: &Stage3Service, key: &str, options: &RunOptions) -> Result<String> {
    if let Some(url) = service.urls().url(service.store(), key).await? {
        if url.starts_with("https://") {
            return Ok(url);
        }
    }
    let limit = service.config().max_stored_image_bytes();
    let fetched = options
        .deadline
        .run(
            crate::storage::CALL_TIMEOUT,
            "reading a character reference",
            service.store().get(key, limit),
        )
        .await?;
    let Fetched::Found(png) = fetched else {
        return Err(Stage3Error::storage(
            format!("the character reference {key} is not in the store"),
            false,
        ));
    };
    let encoded = tokio::task::spawn_blocking(move || inline_copy(&png))
        .await
        .map_err(|e| Stage3Error::InvalidImage(format!("shrinking a reference panicked: {e}")))??;
    Ok(encoded)
}

/// A `data:image/png;base64,…` URL of `png`, shrunk until it fits the limits.
fn inline_copy(png: &[u8]) -> Result<String> {
    for side in [MAX_REFERENCE_SIDE, 768, 512, 384] {
        let small = crate::story::make_thumbnail(png, side)?;
        if small.len() <= MAX_REFERENCE_BYTES {
            return Ok(format!(
                "data:image/png;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(&small)
            ));
        }
    }
    Err(Stage3Error::InvalidImage(format!(
        "a character reference does not fit {MAX_REFERENCE_BYTES} bytes even at 384 pixels"
    )))
}

/// The SHA-256 of an inline reference's image bytes; `None` for a URL.
fn inline_sha256(url: &str) -> Option<String> {
    let (_, payload) = url.strip_prefix("data:")?.split_once(";base64,")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(payload)
        .ok()?;
    Some(hex::encode(Sha256::digest(bytes)))
}

/// A sheet's prompt: a clean reference of the character, nothing else in the picture.
pub(crate) fn sheet_prompt(name: Option<&str>, description: &str) -> String {
    let who = match name {
        Some(name) if !name.trim().is_empty() => format!("{}, {}", name.trim(), description.trim()),
        _ => description.trim().to_string(),
    };
    format!(
        "Character reference sheet of {who}. The same character twice, full body: once from \
         the front and once from the side, standing on a plain white background, evenly \
         lit. No text, no labels, no other characters."
    )
}

/// The style tags of the scenes at `positions`, in order, each once: the batch's style as
/// far as the character is concerned.
fn style_tags(scenes: &[PreparedScene], positions: &[usize]) -> Vec<String> {
    let mut tags: Vec<String> = Vec::new();
    for scene in positions.iter().filter_map(|&p| scenes.get(p)) {
        for tag in &scene.request.style_tags {
            if !tags.contains(tag) {
                tags.push(tag.clone());
            }
        }
    }
    tags
}

/// Moves the sheets out of a batch's results into its cast (`characters`): a sheet is
/// not a scene. Its failure stays in `failures`, under its `characters/…` id.
pub(crate) fn take_sheets(answer: &mut crate::schema::BatchAnswer) {
    let (sheets, scenes): (Vec<Stage3Output>, Vec<Stage3Output>) =
        std::mem::take(&mut answer.results)
            .into_iter()
            .partition(|output| output.scene_id.starts_with(SHEETS_FOLDER));
    answer.results = scenes;
    answer.characters = sheets;
    answer.summarize();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sheet_prompt_names_the_character_and_asks_for_a_clean_reference() {
        let prompt = sheet_prompt(Some("Mimi"), "an orange tabby cat with a torn left ear");
        assert!(prompt.starts_with("Character reference sheet of Mimi, an orange tabby"));
        assert!(prompt.contains("plain white background"));
        assert!(prompt.contains("No text"));
        assert!(sheet_prompt(None, " a fox ").contains("sheet of a fox."));
    }

    #[test]
    fn an_inline_reference_is_hashed_by_its_bytes_and_a_url_not_at_all() {
        let url = format!(
            "data:image/png;base64,{}",
            base64::engine::general_purpose::STANDARD.encode(b"png")
        );
        assert_eq!(
            inline_sha256(&url).as_deref(),
            Some(hex::encode(Sha256::digest(b"png")).as_str())
        );
        assert_eq!(inline_sha256("https://cdn.example.com/fox.png"), None);
    }

    fn reference(source: &str) -> Arc<Reference> {
        Arc::new(Reference {
            sha256: "0".repeat(64),
            source: source.into(),
            image_key: "k.png".into(),
            url: OnceCell::new(),
        })
    }

    #[test]
    fn a_failed_first_appearance_hands_over_to_the_next_scene_or_its_image() {
        let plan = CharacterPlan {
            id: "fox".into(),
            sheet: Some(0),
            candidates: vec![1, 3, 4],
        };
        let mut finished = HashMap::new();
        // The sheet failed: the first scene is next.
        assert!(matches!(hand_over(&plan, 0, &finished), RefState::Scene(1)));
        // Scene 1 failed, scene 3 already stored its image: that is the reference.
        finished.insert(1, None);
        finished.insert(3, Some(reference("scene:p3")));
        assert!(
            matches!(hand_over(&plan, 1, &finished), RefState::Ready(r) if r.source == "scene:p3")
        );
        // Scene 3 failed too: scene 4 draws it; after 4, nobody.
        finished.insert(3, None);
        assert!(matches!(hand_over(&plan, 1, &finished), RefState::Scene(4)));
        assert!(matches!(hand_over(&plan, 4, &finished), RefState::None));
    }
}
