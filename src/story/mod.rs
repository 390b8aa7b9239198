//! Stories: a batch that names a `story_id` also publishes the story's manifest and
//! storyboard page beside its images (docs/design.md §2).
//!
//! - `manifest`: the manifest format, the checks on every entry read, and the merge.
//! - `gallery`: the storyboard page (`index.html`), self-contained static HTML.
//! - `thumbnail`: the small PNG stored for every image, which keeps the page light.
//!
//! ## Why concurrent batches lose nothing
//!
//! The stores have plain PUT, GET, LIST and DELETE, and no conditional write that every
//! server honours (Qiniu and Garage ignore `If-None-Match`), so [`publish_story`] never edits
//! `manifest.json` in place:
//!
//! 1. The batch PUTs its entries as a new fragment, `stories/{id}/batches/{ms}-{random}.json`
//!    (a key no other batch picks).
//! 2. A **round**: it LISTs the fragments with the store's times, GETs `manifest.json` as the
//!    base (checked like a fragment; it records for each entry the fragment and store time
//!    it came from), merges base and fragments (`manifest::Merge`), and PUTs the
//!    manifest, then the page. The merge depends only on what it reads.
//! 3. It LISTs again. If a fragment appeared that it did not see, it goes back to 2.
//!
//! Take the manifest PUT that the store applied last, by batch Z, and any fragment F.
//! If F's PUT finished before Z's final LIST began, that LIST shows F (S3 and the
//! filesystem list what was written before), so Z saw nothing new only because its
//! round already held F. Otherwise F finished after that LIST began, which is after
//! Z's last manifest PUT finished; F's batch then PUTs a manifest after F, so later still,
//! and Z's would not be the last. So the surviving manifest holds every fragment whose
//! batch completed step 1, whatever the interleaving. The page is covered by the same
//! argument, since each round writes it before its final LIST. A batch that dies after
//! step 1 leaves a fragment that the next batch of the story merges.
//!
//! ## Why compaction loses nothing either
//!
//! Fragments would pile up (every batch would read them all), so once merged they are
//! deleted — with no conditional writes, only under two rules (`PublishSettings`):
//!
//! - **A slow round writes nothing.** A round that has run longer than `round_limit`
//!   (T_MAX, 2 minutes) since its first LIST does not PUT the manifest; it starts over.
//! - **Only old fragments go, and only after.** After a successful round (its final LIST
//!   showed nothing unseen), the batch deletes the merged fragments whose store time is
//!   more than `grace` (30 minutes) older than the store time of its own new fragment —
//!   "now" by the store's clock — after the manifest holding them was written. A failed
//!   delete is logged, never fails the batch: a later batch deletes it.
//!
//! Suppose D deletes F, and some manifest PUT afterwards lacks F; take the first such PUT,
//! by W. D wrote manifest M_D, holding F, before deleting. If W's round began (its first
//! LIST) after F existed: either F was still there, and W read and merged it (a listed
//! fragment that has vanished by its GET makes the round start over: its deleter wrote a
//! newer manifest, which the next round reads), or F was gone, so W's LIST came after the
//! delete, after M_D; the base W then read is M_D or a manifest PUT after it and before W's,
//! which holds F — M_D does, and a later one lacking F would come before W's, which was the
//! first. Either way W's merge keeps F's entries (an entry only ever gives way to a newer
//! one of the same scene). If W's round began before F existed, W PUTs after F was deleted,
//! which is more than `grace` after F was stored: its round ran longer than T_MAX and wrote
//! nothing. `grace` must cover T_MAX, the longest a manifest PUT can take once sent (three
//! tries of at most a minute each, `src/storage/s3.rs`), and the clocks' disagreement:
//! 30 minutes does.
//!
//! Counted this way, a story holds only the fragments of the last `grace`, and a batch reads
//! the manifest plus those. Every read is bounded: fragments larger than
//! `MAX_FRAGMENT_BYTES` are skipped unread, documents are parsed entry by entry, and the
//! story keeps at most [`manifest::MAX_STORY_SCENES`] scenes.

mod cast;
mod gallery;
mod manifest;
mod plan;
mod thumbnail;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::{self, StreamExt};

pub(crate) use cast::put_cast;
pub use cast::CastMember;
pub use gallery::PageLinks;
pub(crate) use manifest::MANIFEST_FORMAT;
pub use manifest::{
    Manifest, ManifestEntry, SceneEntry, SceneStatus, StoryScene, StoryTotals, MAX_STORY_SCENES,
};
pub(crate) use plan::{read_plan, StoredPlan};
#[cfg(feature = "sqs")]
pub(crate) use plan::{write_plan, StoryPlan};
pub use plan::{FailedScene, StoryProgress};
pub use thumbnail::thumbnail_key;
pub(crate) use thumbnail::{
    encode_thumbnail, make_thumbnail, put_thumbnail, store_thumbnail, THUMBNAIL_MAX_SIDE,
};

use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::retry::RetryPolicy;
use crate::schema::{validate_story_id, BatchAnswer, StoryError, StoryLinks};
use crate::storage::{Fetched, ObjectMeta, ObjectStore};
use crate::urls::UrlPolicy;
use manifest::{
    check_entry, header_problem, is_fragment_name, read_document, Checked, Merge, Stamp,
    FRAGMENT_FORMAT, MAX_FRAGMENT_ENTRIES,
};

/// The storyboard page: read by browsers straight from the bucket or CDN, and rewritten by
/// every batch, so never cached for long.
pub(crate) const GALLERY_META: ObjectMeta = ObjectMeta {
    content_type: "text/html; charset=utf-8",
    cache_control: "no-cache",
};

/// Rounds of merge-and-check before giving up; each extra round needs another batch of
/// the same story to have published in between (or a round that ran too long).
const MAX_ROUNDS: usize = 8;
// A lagging listing may pause the story between any two of its rounds.
const _: () = assert!(RetryPolicy::STORY_LISTING.max_retries as usize + 1 == MAX_ROUNDS);
/// Fragments fetched at once: each may hold up to [`MAX_FRAGMENT_BYTES`] in memory.
const FETCH_CONCURRENCY: usize = 4;
/// Merged fragments deleted at once.
const DELETE_CONCURRENCY: usize = 8;
/// The largest fragment read: a batch's fragments are at most this (a 500-scene batch is
/// about 1 MB); anything bigger was not written by us, and is skipped unread.
pub(crate) const MAX_FRAGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// The largest `manifest.json` read back as a base: above what this code can write
/// ([`manifest::MAX_STORY_BYTES`] of entries, plus indentation).
pub(crate) const MAX_MANIFEST_BYTES: u64 = 32 * 1024 * 1024;
/// The largest manifest `stage3 gallery` reads (streamed from the file, entry by entry).
const MAX_GALLERY_MANIFEST_BYTES: u64 = 64 * 1024 * 1024;
/// Room kept in a fragment for everything but its entries.
const FRAGMENT_ENVELOPE_BYTES: usize = 1024;

/// The timing of publishing rounds and of compaction (see the module notes). The defaults
/// are what the service uses; tests shorten them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PublishSettings {
    /// T_MAX: a round that has run longer than this since its first LIST writes nothing
    /// and starts over.
    pub round_limit: Duration,
    /// Merged fragments stored longer than this before the batch's own are deleted. Must
    /// exceed `round_limit` plus the longest a PUT can take plus clock disagreement.
    pub grace: Duration,
    /// How far past the store time of the batch's own fragment a time may be: anything
    /// later is in the future, forged or from a broken clock, and is skipped.
    pub skew: Duration,
    /// The most fragments one round merges (the oldest, plus the batch's own); later ones
    /// wait for a later batch, after compaction made room.
    pub max_fragments: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            round_limit: Duration::from_secs(120),
            grace: Duration::from_secs(30 * 60),
            skew: Duration::from_secs(120),
            max_fragments: 1_000,
        }
    }
}

/// `stories/{story_id}/manifest.json`.
pub(crate) fn manifest_key(story_id: &str) -> String {
    format!("stories/{story_id}/manifest.json")
}

/// `stories/{story_id}/index.html`.
pub(crate) fn gallery_key(story_id: &str) -> String {
    format!("stories/{story_id}/index.html")
}

/// Where a story's batch fragments live.
pub(crate) fn fragments_prefix(story_id: &str) -> String {
    format!("stories/{story_id}/batches/")
}

/// The manifest entries of a batch answer, in the order of `scenes`.
pub(crate) fn entries_from_answer(
    scenes: &[StoryScene],
    answer: &BatchAnswer,
) -> Vec<ManifestEntry> {
    scenes
        .iter()
        .filter_map(|scene| {
            if let Some(output) = answer.results.iter().find(|r| r.scene_id == scene.scene_id) {
                return Some(ManifestEntry::succeeded(scene, output));
            }
            answer
                .failures
                .iter()
                .find(|f| f.scene_id == scene.scene_id)
                .map(|f| ManifestEntry::failed(scene, f.error_type.as_str(), &f.message))
        })
        .collect()
}

/// The manifest entries of scenes and their outcomes, as [`crate::service::Stage3Service::run_scenes`]
/// returns them (one outcome per scene, same order).
#[cfg(feature = "lambda")]
pub(crate) fn entries_from_outcomes(
    scenes: &[StoryScene],
    outcomes: &[std::result::Result<crate::schema::Stage3Output, Stage3Error>],
) -> Vec<ManifestEntry> {
    let mut seen = HashSet::new();
    scenes
        .iter()
        .zip(outcomes)
        .filter(|(scene, _)| seen.insert(scene.scene_id.clone()))
        .map(|(scene, outcome)| match outcome {
            Ok(output) => ManifestEntry::succeeded(scene, output),
            Err(e) => ManifestEntry::failed(scene, e.error_type().as_str(), &e.to_string()),
        })
        .collect()
}

/// [`publish_story`], with a failure (or running past `deadline`) turned into
/// [`StoryLinks::story_error`] and logged: a story never fails its batch.
pub(crate) async fn publish_or_report(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    entries: Vec<ManifestEntry>,
    deadline: Deadline,
) -> StoryLinks {
    let settings = PublishSettings::default();
    let publishing = publish_story_within(store, urls, story_id, entries, &settings, deadline);
    let outcome = deadline.within(publishing).await.unwrap_or_else(|| {
        Err(Stage3Error::DeadlineExceeded(
            "the invocation deadline came before the story was published; the next batch \
             of the story merges this one"
                .into(),
        ))
    });
    match outcome {
        Ok(links) => links,
        Err(error) => {
            tracing::warn!(
                story_id,
                error_type = %error.error_type(),
                error = %error,
                "the story's manifest and page could not be published; the scenes are stored"
            );
            StoryLinks {
                story_id: story_id.to_string(),
                story_error: Some(StoryError {
                    error_type: error.error_type(),
                    message: error.to_string(),
                }),
                ..StoryLinks::default()
            }
        }
    }
}

/// Adds `entries` to the story's manifest and rewrites the manifest and the storyboard page,
/// safely beside any other batch of the same story doing the same (see the module notes),
/// with the service's timing. Returns where both are.
pub async fn publish_story(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    entries: Vec<ManifestEntry>,
) -> Result<StoryLinks> {
    publish_story_with(store, urls, story_id, entries, &PublishSettings::default()).await
}

/// [`publish_story`] with the rounds and compaction timed by `settings`.
pub(crate) async fn publish_story_with(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    entries: Vec<ManifestEntry>,
    settings: &PublishSettings,
) -> Result<StoryLinks> {
    publish_story_within(store, urls, story_id, entries, settings, Deadline::NONE).await
}

/// [`publish_story_with`] for a caller with a deadline: a store call that failed, or a
/// listing that lags, is waited for only while the wait ends before `deadline`, so the
/// story fails with the store's own error rather than sleep through the time left. The
/// caller still bounds the whole (`Deadline::within`): nothing here cuts a call short.
pub(crate) async fn publish_story_within(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    entries: Vec<ManifestEntry>,
    settings: &PublishSettings,
    deadline: Deadline,
) -> Result<StoryLinks> {
    validate_story_id(story_id)?;
    let own: HashSet<String> = write_fragments(store, story_id, &entries, deadline)
        .await?
        .into_iter()
        .collect();
    drop(entries);

    for round in 0..MAX_ROUNDS {
        match publish_round(store, urls, story_id, &own, settings, round, deadline).await? {
            Round::Again => continue,
            Round::Published {
                deletable,
                now_ms,
                scenes,
                batches,
            } => {
                tracing::info!(
                    story_id,
                    scenes,
                    batches,
                    "story manifest and page published"
                );
                compact(
                    store,
                    story_id,
                    deletable,
                    &own,
                    now_ms,
                    settings.grace,
                    deadline,
                )
                .await;
                return links(store, urls, story_id).await;
            }
        }
    }
    Err(Stage3Error::storage(
        format!(
            "story {story_id:?}: other batches kept publishing through {MAX_ROUNDS} rounds \
             (or every round ran too long); this batch's fragment is stored and the next \
             batch of the story will merge it"
        ),
        true,
    ))
}

/// Where a story stands, as `stage3 status` reports it: [`read_story`] counted against the
/// story's plan ([`StoryProgress::of`]). `None` when the store holds nothing of the story.
pub(crate) async fn story_progress(
    store: &dyn ObjectStore,
    story_id: &str,
    deadline: Deadline,
) -> Result<Option<StoryProgress>> {
    validate_story_id(story_id)?;
    let plan = read_plan(store, story_id, deadline).await?;
    let manifest = read_story(store, story_id, deadline).await?;
    let manifest = match (manifest, &plan) {
        (Some(manifest), _) => manifest,
        (None, Some(_)) => Merge::new().finish(story_id, Vec::new()),
        (None, None) => return Ok(None),
    };
    Ok(Some(StoryProgress::of(&manifest, plan.as_ref())))
}

/// The story's manifest as the next publishing round would write it: `manifest.json`
/// merged with every fragment not merged yet, read and never written (no manifest, no
/// page, no compaction), so it is what the storyboard shows even while a batch's
/// publishing is still to come. `None` when the store holds neither.
pub(crate) async fn read_story(
    store: &dyn ObjectStore,
    story_id: &str,
    deadline: Deadline,
) -> Result<Option<Manifest>> {
    validate_story_id(story_id)?;
    let settings = PublishSettings::default();
    for round in 0..MAX_ROUNDS {
        let listing = list_fragments(store, story_id, deadline).await?;
        let newest = listing.iter().map(|f| f.at_ms).max().unwrap_or(0);
        let now = manifest::millis(SystemTime::now());
        let not_after_ms = newest.max(now).saturating_add(millis_of(settings.skew));
        let base = read_base(store, story_id, not_after_ms, deadline).await?;
        if base.is_none() && listing.is_empty() {
            return Ok(None);
        }
        let chosen: Vec<&Listing> = listing
            .iter()
            .filter(|f| f.at_ms <= not_after_ms)
            .take(settings.max_fragments)
            .collect();
        match fold(store, story_id, base, chosen, deadline).await? {
            Fold::Done(folded) => return Ok(Some(folded.merge.finish(story_id, Vec::new()))),
            // Compacted meanwhile: the manifest now holds it. Read again.
            Fold::Vanished(_) => wait_for_listing(story_id, round, deadline).await?,
        }
    }
    Err(Stage3Error::storage(
        format!("story {story_id:?}: its fragments kept being compacted while it was read"),
        true,
    ))
}

/// Writes the batch's entries as fragments — one, unless they exceed what a reader takes
/// from one fragment — and returns their keys.
async fn write_fragments(
    store: &dyn ObjectStore,
    story_id: &str,
    entries: &[ManifestEntry],
    deadline: Deadline,
) -> Result<Vec<String>> {
    let now = manifest::millis(SystemTime::now());
    let written_at = manifest::format_millis(now);
    let mut chunks: Vec<Vec<SceneEntry>> = Vec::new();
    let mut current: Vec<SceneEntry> = Vec::new();
    let mut bytes = FRAGMENT_ENVELOPE_BYTES;
    for entry in entries {
        let entry = entry.to_scene_entry();
        let size = manifest::json_size(&entry) + 1;
        if !current.is_empty()
            && (current.len() >= MAX_FRAGMENT_ENTRIES || (bytes + size) as u64 > MAX_FRAGMENT_BYTES)
        {
            chunks.push(std::mem::take(&mut current));
            bytes = FRAGMENT_ENVELOPE_BYTES;
        }
        bytes += size;
        current.push(entry);
    }
    chunks.push(current);

    // The low 16 bits number the batch's fragments: written one after another, they sort
    // in their order by store time and, within one tick of the store's clock, by key.
    let random = fastrand::u64(..) & !0xffff;
    let prefix = fragments_prefix(story_id);
    let mut keys = Vec::with_capacity(chunks.len());
    for (number, scenes) in chunks.iter().enumerate() {
        let key = format!(
            "{prefix}{now:013}-{:016x}.json",
            random | (number as u64 & 0xffff)
        );
        let fragment = manifest::Fragment {
            format: FRAGMENT_FORMAT,
            story_id,
            written_at: &written_at,
            scenes,
        };
        let body = Bytes::from(serde_json::to_vec(&fragment).map_err(|e| {
            Stage3Error::storage(format!("cannot encode a story fragment: {e}"), false)
        })?);
        RetryPolicy::STORY_STORE
            .run(deadline, "writing a story fragment", || {
                store.put(&key, body.clone(), ObjectMeta::RECORD)
            })
            .await?;
        keys.push(key);
    }
    Ok(keys)
}

/// A listed fragment: its key, its name under `batches/`, and what the store says of it.
#[derive(Debug, Clone)]
struct Listing {
    key: String,
    name: String,
    at_ms: u64,
    size: u64,
}

/// How a round ended.
enum Round {
    /// The manifest and page are written and nothing unseen appeared.
    Published {
        /// Fragments this round merged or found useless, with their store times.
        deletable: Vec<(String, u64)>,
        /// The store time of the batch's own fragment.
        now_ms: u64,
        scenes: usize,
        batches: usize,
    },
    /// Something changed or took too long: run another round.
    Again,
}

/// One round: LIST, GET the base, merge, PUT the manifest and the page, LIST again.
async fn publish_round(
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
    story_id: &str,
    own: &HashSet<String>,
    settings: &PublishSettings,
    round: usize,
    deadline: Deadline,
) -> Result<Round> {
    let started = tokio::time::Instant::now();
    let listing = list_fragments(store, story_id, deadline).await?;
    let own_times: Vec<u64> = listing
        .iter()
        .filter(|f| own.contains(&f.key))
        .map(|f| f.at_ms)
        .collect();
    let Some(now_ms) = own_times
        .iter()
        .copied()
        .max()
        .filter(|_| own_times.len() == own.len())
    else {
        // Not listed yet: a store whose listings lag behind writes. Wait and look again.
        tracing::info!(
            story_id,
            round,
            "own fragment not listed yet; listing again"
        );
        wait_for_listing(story_id, round, deadline).await?;
        return Ok(Round::Again);
    };
    let not_after_ms = now_ms.saturating_add(millis_of(settings.skew));
    let seen: HashSet<&str> = listing.iter().map(|f| f.key.as_str()).collect();

    // The oldest fragments up to the cap, and the batch's own whatever the cap.
    let (current, future): (Vec<&Listing>, Vec<&Listing>) =
        listing.iter().partition(|f| f.at_ms <= not_after_ms);
    if !future.is_empty() {
        tracing::warn!(
            story_id,
            fragments = future.len(),
            "fragments stored in the future by the store's own clock; skipping them"
        );
    }
    if current.len() > settings.max_fragments {
        tracing::warn!(
            story_id,
            listed = current.len(),
            merged = settings.max_fragments,
            "more fragments than a round merges; the newest wait for a later batch"
        );
    }
    let mut chosen: Vec<&Listing> = current
        .iter()
        .take(settings.max_fragments)
        .copied()
        .collect();
    for fragment in &current {
        if own.contains(&fragment.key) && !chosen.iter().any(|c| c.key == fragment.key) {
            chosen.push(fragment);
        }
    }

    let base = read_base(store, story_id, not_after_ms, deadline).await?;
    let Folded {
        merge,
        counted,
        deletable,
    } = match fold(store, story_id, base, chosen, deadline).await? {
        Fold::Done(folded) => folded,
        Fold::Vanished(key) => {
            // Its deleter wrote a manifest holding it first, maybe after our base.
            tracing::info!(
                story_id,
                round,
                key,
                "a listed fragment was compacted meanwhile; reading the manifest again"
            );
            // A listing may lag behind a delete, as behind a write: give it a moment.
            wait_for_listing(story_id, round, deadline).await?;
            return Ok(Round::Again);
        }
    };

    let names: HashSet<&str> = listing.iter().map(|f| f.name.as_str()).collect();
    let mut still_stored: Vec<String> = counted
        .into_iter()
        .filter(|name| names.contains(name.as_str()))
        .collect();
    still_stored.sort();
    let mut manifest = merge.finish(story_id, still_stored);
    manifest.cast = cast::read_cast(store, story_id).await?;
    let plan = plan_for_page(store, story_id, deadline).await;
    if let Some(stored) = &plan {
        plan::order_by_plan(&mut manifest, &stored.plan);
    }
    add_lasting_urls(&mut manifest, store, urls).await?;
    let page_links = page_links(&manifest, store, urls).await?;
    let page = Bytes::from(gallery::render(&manifest, &page_links, plan.as_ref()));
    drop(plan);
    drop(page_links);
    let manifest_json = Bytes::from(serde_json::to_vec_pretty(&manifest).map_err(|e| {
        Stage3Error::storage(format!("cannot encode the story manifest: {e}"), false)
    })?);
    let (scenes, batches) = (manifest.totals.scenes, manifest.batches);
    drop(manifest);

    if started.elapsed() > settings.round_limit {
        tracing::warn!(
            story_id,
            round,
            limit_secs = settings.round_limit.as_secs_f64(),
            "the round ran too long to write safely; starting over"
        );
        return Ok(Round::Again);
    }
    let (manifest_at, page_at) = (manifest_key(story_id), gallery_key(story_id));
    RetryPolicy::STORY_STORE
        .run(deadline, "writing the story manifest", || {
            store.put(&manifest_at, manifest_json.clone(), ObjectMeta::RECORD)
        })
        .await?;
    drop(manifest_json);
    RetryPolicy::STORY_STORE
        .run(deadline, "writing the storyboard page", || {
            store.put(&page_at, page.clone(), GALLERY_META)
        })
        .await?;
    drop(page);

    let after = list_fragments(store, story_id, deadline).await?;
    if after.iter().any(|f| !seen.contains(f.key.as_str())) {
        tracing::info!(
            story_id,
            round,
            "another batch of the story published meanwhile; merging again"
        );
        return Ok(Round::Again);
    }
    Ok(Round::Published {
        deletable,
        now_ms,
        scenes,
        batches,
    })
}

/// The story's plan for its page, if it has one that can be read: a plan that cannot be
/// read costs the page its pending scenes, never the story its manifest.
async fn plan_for_page(
    store: &dyn ObjectStore,
    story_id: &str,
    deadline: Deadline,
) -> Option<StoredPlan> {
    match read_plan(store, story_id, deadline).await {
        Ok(plan) => plan,
        Err(error) => {
            tracing::warn!(
                story_id,
                error = %error,
                "the story's plan.json cannot be read; the page shows no pending scenes"
            );
            None
        }
    }
}

/// Offers every entry to the merge (moved, never copied); how many a cap refused.
fn offer_all(merge: &mut Merge, entries: Vec<Checked>) -> usize {
    let mut refused = 0;
    for checked in entries {
        if !merge.offer(checked) {
            refused += 1;
        }
    }
    refused
}

fn millis_of(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Waits before the round after `round` (0-based) when the store's listing lags behind a
/// write or a delete ([`RetryPolicy::STORY_LISTING`]). Refused when the wait would outlast
/// `deadline`: sleeping through the time left would publish nothing either.
async fn wait_for_listing(story_id: &str, round: usize, deadline: Deadline) -> Result<()> {
    if round + 1 >= MAX_ROUNDS {
        // No round follows: the story gives up without waiting.
        return Ok(());
    }
    let attempt = u32::try_from(round + 1).unwrap_or(u32::MAX);
    if RetryPolicy::STORY_LISTING
        .wait_to_retry(attempt, deadline)
        .await
    {
        return Ok(());
    }
    Err(Stage3Error::DeadlineExceeded(format!(
        "story {story_id:?}: the store's listing lags behind its writes and the deadline \
         leaves no time to wait for it; this batch's fragment is stored and the next batch \
         of the story will merge it"
    )))
}

/// The story's fragments, by store time then key. Only keys directly under the story's
/// `batches/` with a fragment's name are fragments; anything else there is not read.
async fn list_fragments(
    store: &dyn ObjectStore,
    story_id: &str,
    deadline: Deadline,
) -> Result<Vec<Listing>> {
    let prefix = fragments_prefix(story_id);
    let mut fragments: Vec<Listing> = RetryPolicy::STORY_STORE
        .run(deadline, "listing the story's fragments", || {
            store.list_objects(&prefix)
        })
        .await?
        .into_iter()
        .filter_map(|listed| {
            let name = listed.key.strip_prefix(&prefix)?;
            is_fragment_name(name).then(|| Listing {
                name: name.to_string(),
                at_ms: manifest::millis(listed.last_modified),
                size: listed.size,
                key: listed.key.clone(),
            })
        })
        .collect();
    fragments.sort_by(|a, b| (a.at_ms, &a.key).cmp(&(b.at_ms, &b.key)));
    Ok(fragments)
}

/// What reading a listed fragment gave.
enum FragmentRead {
    /// A fragment of this story: its entries that passed the checks.
    Merged(Vec<Checked>),
    /// Never mergeable (too large, not JSON, another story's): deleted like a merged one.
    Useless,
    /// Written by a newer version of this code: left alone.
    Kept,
    /// Gone since it was listed.
    Vanished,
}

async fn read_listed<'a>(
    store: &dyn ObjectStore,
    story_id: &str,
    fragment: &'a Listing,
    deadline: Deadline,
) -> (&'a Listing, Result<FragmentRead>) {
    (
        fragment,
        read_fragment(store, story_id, fragment, deadline).await,
    )
}

async fn read_fragment(
    store: &dyn ObjectStore,
    story_id: &str,
    fragment: &Listing,
    deadline: Deadline,
) -> Result<FragmentRead> {
    let key = fragment.key.as_str();
    if fragment.size > MAX_FRAGMENT_BYTES {
        tracing::warn!(
            key,
            size = fragment.size,
            "a fragment larger than any batch writes; skipping it unread"
        );
        return Ok(FragmentRead::Useless);
    }
    let read = RetryPolicy::STORY_STORE.run(deadline, "reading a story fragment", || {
        store.get(key, MAX_FRAGMENT_BYTES)
    });
    let bytes = match read.await? {
        Fetched::Missing => return Ok(FragmentRead::Vanished),
        Fetched::TooLarge { size } => {
            tracing::warn!(
                key,
                size,
                "a fragment larger than any batch writes; skipping it unread"
            );
            return Ok(FragmentRead::Useless);
        }
        Fetched::Found(bytes) => bytes,
    };
    Ok(parse_fragment(story_id, fragment, &bytes))
}

/// A fragment's checked entries, read one at a time. A damaged or foreign fragment must not
/// stop the story from ever being published again, and a bad entry must not cost the rest.
fn parse_fragment(story_id: &str, fragment: &Listing, bytes: &[u8]) -> FragmentRead {
    let key = fragment.key.as_str();
    let stamp = Stamp::Fragment {
        name: &fragment.name,
        at_ms: fragment.at_ms,
    };
    let mut entries = Vec::new();
    let mut refused = 0usize;
    let mut reason: Option<String> = None;
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let header =
        read_document(
            &mut deserializer,
            MAX_FRAGMENT_ENTRIES,
            &mut |value| match check_entry(value, stamp) {
                Ok(checked) => entries.push(checked),
                Err(why) => {
                    refused += 1;
                    reason.get_or_insert(why);
                }
            },
        )
        .and_then(|header| deserializer.end().map(|()| header));
    let header = match header {
        Ok(header) => header,
        Err(e) => {
            tracing::warn!(key, error = %e, "an unreadable fragment; skipping it");
            return FragmentRead::Useless;
        }
    };
    if header
        .format
        .is_some_and(|format| format > u64::from(FRAGMENT_FORMAT))
    {
        tracing::warn!(
            key,
            format = header.format,
            "a fragment of a newer format; leaving it to a newer stage3"
        );
        return FragmentRead::Kept;
    }
    let accepted = u64::from(FRAGMENT_FORMAT)..=u64::from(FRAGMENT_FORMAT);
    if let Some(problem) = header_problem(&header, story_id, accepted, 1) {
        tracing::warn!(key, problem, "not a fragment of this story; skipping it");
        return FragmentRead::Useless;
    }
    if refused > 0 {
        tracing::warn!(
            key,
            refused,
            first_reason = reason.as_deref().unwrap_or_default(),
            "fragment entries failed their checks; skipped"
        );
    }
    if header.over_cap > 0 {
        tracing::warn!(
            key,
            skipped = header.over_cap,
            "a fragment with more entries than a batch writes; the rest skipped"
        );
    }
    FragmentRead::Merged(entries)
}

/// What a previous manifest brings to a round.
struct Base {
    entries: Vec<Checked>,
    batches: usize,
    fragments: Vec<String>,
    updated_ms: u64,
}

/// A story's base manifest and fragments, folded together.
struct Folded {
    merge: Merge,
    /// Names of fragments the manifest has counted in `batches` already.
    counted: HashSet<String>,
    /// The fragments a manifest holding `merge` makes deletable: merged, or never mergeable.
    deletable: Vec<(String, u64)>,
}

/// How [`fold`] ended.
enum Fold {
    Done(Folded),
    /// This fragment (its key) was gone when read: compacted since it was listed, so the
    /// manifest holds it now and must be read again.
    Vanished(String),
}

/// Folds `base` and the `chosen` fragments together: the fragments in store order, a few
/// fetched at once, each folded in as soon as it is read. Publishing and reading a story
/// (`stage3 status`) both see a story this way.
async fn fold(
    store: &dyn ObjectStore,
    story_id: &str,
    base: Option<Base>,
    chosen: Vec<&Listing>,
    deadline: Deadline,
) -> Result<Fold> {
    let mut merge = Merge::new();
    let mut counted: HashSet<String> = HashSet::new();
    if let Some(base) = base {
        merge.batches = base.batches;
        merge.saw(base.updated_ms);
        counted.extend(base.fragments);
        let refused = offer_all(&mut merge, base.entries);
        if refused > 0 {
            tracing::warn!(
                story_id,
                refused,
                "manifest entries over the story's caps; skipped"
            );
        }
    }
    let mut deletable: Vec<(String, u64)> = Vec::new();
    // Futures do nothing until polled: `buffered` starts a few at a time. (Made by an
    // `async fn` rather than a closure, so the round's future stays `Send`.)
    let pending: Vec<_> = chosen
        .into_iter()
        .map(|fragment| read_listed(store, story_id, fragment, deadline))
        .collect();
    let mut reads = stream::iter(pending).buffered(FETCH_CONCURRENCY);
    while let Some((fragment, read)) = reads.next().await {
        match read? {
            FragmentRead::Merged(entries) => {
                if counted.insert(fragment.name.clone()) {
                    merge.batches += 1;
                }
                merge.saw(fragment.at_ms);
                let refused = offer_all(&mut merge, entries);
                if refused > 0 {
                    tracing::warn!(
                        key = fragment.key,
                        refused,
                        "entries over the story's caps; skipped"
                    );
                }
                deletable.push((fragment.key.clone(), fragment.at_ms));
            }
            FragmentRead::Useless => deletable.push((fragment.key.clone(), fragment.at_ms)),
            FragmentRead::Kept => {}
            FragmentRead::Vanished => return Ok(Fold::Vanished(fragment.key.clone())),
        }
    }
    Ok(Fold::Done(Folded {
        merge,
        counted,
        deletable,
    }))
}

/// The story's `manifest.json` as a base, checked entry by entry. `None` when there is
/// none, or none usable: one from before compaction (format 1, whose fragments are all still
/// stored), or a damaged one — whose entries whose fragments were deleted are then lost, but
/// the story is published again. A manifest of a newer format is never overwritten.
async fn read_base(
    store: &dyn ObjectStore,
    story_id: &str,
    not_after_ms: u64,
    deadline: Deadline,
) -> Result<Option<Base>> {
    let key = manifest_key(story_id);
    let read = RetryPolicy::STORY_STORE.run(deadline, "reading the story manifest", || {
        store.get(&key, MAX_MANIFEST_BYTES)
    });
    let bytes = match read.await? {
        Fetched::Missing => return Ok(None),
        Fetched::TooLarge { size } => {
            tracing::warn!(
                key,
                size,
                "manifest.json is larger than any this code writes; rebuilding from fragments"
            );
            return Ok(None);
        }
        Fetched::Found(bytes) => bytes,
    };
    let mut entries = Vec::new();
    let mut refused = 0usize;
    let mut reason: Option<String> = None;
    let stamp = Stamp::Recorded { not_after_ms };
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let header = read_document(
        &mut deserializer,
        MAX_STORY_SCENES,
        &mut |value| match check_entry(value, stamp) {
            Ok(checked) => entries.push(checked),
            Err(why) => {
                refused += 1;
                reason.get_or_insert(why);
            }
        },
    )
    .and_then(|header| deserializer.end().map(|()| header));
    drop(bytes);
    let header = match header {
        Ok(header) => header,
        Err(e) => {
            tracing::warn!(key, error = %e, "an unreadable manifest.json; rebuilding from fragments");
            return Ok(None);
        }
    };
    let format = header.format.unwrap_or(1);
    if format > u64::from(MANIFEST_FORMAT) {
        return Err(Stage3Error::storage(
            format!(
                "{}: format {format}, newer than this stage3 writes ({MANIFEST_FORMAT}); \
                 not replacing it",
                store.location(&key)
            ),
            false,
        ));
    }
    if format < u64::from(MANIFEST_FORMAT) {
        tracing::info!(
            key,
            format,
            "a manifest from before compaction: its fragments are all stored, so not needed"
        );
        return Ok(None);
    }
    let accepted = u64::from(MANIFEST_FORMAT)..=u64::from(MANIFEST_FORMAT);
    if let Some(problem) = header_problem(&header, story_id, accepted, 1) {
        tracing::warn!(
            key,
            problem,
            "manifest.json is not this story's; rebuilding from fragments"
        );
        return Ok(None);
    }
    if refused > 0 {
        tracing::warn!(
            key,
            refused,
            first_reason = reason.as_deref().unwrap_or_default(),
            "manifest entries failed their checks; skipped"
        );
    }
    let updated_ms = header
        .updated_at
        .as_deref()
        .and_then(manifest::parse_millis)
        .filter(|ms| *ms <= not_after_ms)
        .unwrap_or(0);
    Ok(Some(Base {
        entries,
        batches: header
            .batches
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(0),
        fragments: header.fragments,
        updated_ms,
    }))
}

/// Deletes the fragments merged (or found useless) that were stored more than `grace` before
/// the batch's own: after the manifest holding them was written, and never the batch's own.
/// Failures are logged; a later batch tries again.
async fn compact(
    store: &dyn ObjectStore,
    story_id: &str,
    deletable: Vec<(String, u64)>,
    own: &HashSet<String>,
    now_ms: u64,
    grace: Duration,
    deadline: Deadline,
) {
    let grace_ms = millis_of(grace);
    let old: Vec<String> = deletable
        .into_iter()
        .filter(|(key, at_ms)| !own.contains(key) && at_ms.saturating_add(grace_ms) < now_ms)
        .map(|(key, _)| key)
        .collect();
    if old.is_empty() {
        return;
    }
    let pending: Vec<_> = old
        .into_iter()
        .map(|key| delete_fragment(store, key, deadline))
        .collect();
    let outcomes: Vec<bool> = stream::iter(pending)
        .buffer_unordered(DELETE_CONCURRENCY)
        .collect()
        .await;
    let deleted = outcomes.iter().filter(|ok| **ok).count();
    tracing::info!(
        story_id,
        deleted,
        failed = outcomes.len() - deleted,
        "merged fragments compacted into the manifest"
    );
}

/// Deletes one merged fragment; whether it went.
async fn delete_fragment(store: &dyn ObjectStore, key: String, deadline: Deadline) -> bool {
    let deleting = RetryPolicy::STORY_STORE.run(deadline, "deleting a merged fragment", || {
        store.delete(&key)
    });
    match deleting.await {
        Ok(()) => true,
        Err(error) => {
            tracing::warn!(
                key,
                error = %error,
                "a merged fragment could not be deleted; a later batch will"
            );
            false
        }
    }
}

/// With a CDN that needs no signature, each entry's lasting URLs, rebuilt from its keys.
/// Signed and presigned URLs expire, so a file kept for months carries none.
async fn add_lasting_urls(
    manifest: &mut Manifest,
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
) -> Result<()> {
    if !matches!(urls, UrlPolicy::Cdn { signer: None, .. }) {
        return Ok(());
    }
    for entry in &mut manifest.scenes {
        if let Some(key) = &entry.image_key {
            entry.image_url = urls.url(store, key).await?;
        }
        if let Some(key) = &entry.thumbnail_key {
            entry.thumbnail_url = urls.url(store, key).await?;
        }
    }
    Ok(())
}

/// How the page links: relative, and images only from itself, without a CDN; with one,
/// images also from its origin, and with CDN signing, every link signed now (so the page's
/// links expire with the signature, and every batch writes fresh ones).
async fn page_links(
    manifest: &Manifest,
    store: &dyn ObjectStore,
    urls: &UrlPolicy,
) -> Result<PageLinks> {
    let UrlPolicy::Cdn { base, signer } = urls else {
        return Ok(PageLinks::default());
    };
    let image_origin = gallery::image_origin(base);
    if image_origin.is_none() {
        tracing::warn!(
            base,
            "the CDN base is not a plain origin; the page allows images from its own origin only"
        );
    }
    let signed = match signer {
        None => None,
        Some(_) => {
            let mut signed = HashMap::new();
            let mut keys = vec![manifest_key(&manifest.story_id)];
            for entry in &manifest.scenes {
                keys.extend(entry.image_key.iter().cloned());
                keys.extend(entry.thumbnail_key.iter().cloned());
            }
            for member in &manifest.cast {
                keys.push(member.image_key.clone());
                keys.extend(member.thumbnail_key.iter().cloned());
            }
            for key in keys {
                if let Some(url) = urls.url(store, &key).await? {
                    signed.insert(key, url);
                }
            }
            Some(signed)
        }
    };
    Ok(PageLinks {
        image_origin,
        signed,
    })
}

async fn links(store: &dyn ObjectStore, urls: &UrlPolicy, story_id: &str) -> Result<StoryLinks> {
    // Signed and presigned URLs are made fresh for each answer, like the images' own.
    let url = |key: String| async move { urls.url(store, &key).await };
    Ok(StoryLinks {
        story_id: story_id.to_string(),
        manifest_url: url(manifest_key(story_id)).await?,
        manifest_path: Some(store.location(&manifest_key(story_id))),
        gallery_url: url(gallery_key(story_id)).await?,
        gallery_path: Some(store.location(&gallery_key(story_id))),
        story_error: None,
    })
}

/// Runs a store call with [`RetryPolicy::STORY_STORE`] and no deadline, for a caller that
/// has none to give: the thumbnail upload, whose callers pass none down.
pub(crate) async fn retrying<T, F, Fut>(operation: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    RetryPolicy::STORY_STORE
        .run(Deadline::NONE, "story storage", operation)
        .await
}

/// `stage3 gallery`: rewrites `index.html` beside a manifest on the filesystem from the
/// manifest alone. `path` is the manifest file or the story's directory. Returns the page.
///
/// The manifest is read like any document from the store: entry by entry, each checked,
/// the totals recomputed (a damaged total — `null`, infinite — is never read), a manifest
/// from before compaction accepted. Links are relative: there is no CDN to sign them for.
/// The page gets the permissions of any new file (`0666` less the umask): with umask 077
/// it is the owner's alone.
pub fn rebuild_gallery(path: &Path) -> Result<PathBuf> {
    let manifest_path = if path.is_dir() {
        path.join("manifest.json")
    } else {
        path.to_path_buf()
    };
    let unreadable = |e: &dyn std::fmt::Display| {
        Stage3Error::invalid_request(format!("{}: {e}", manifest_path.display()))
    };
    let file = std::fs::File::open(&manifest_path).map_err(|e| unreadable(&e))?;
    let size = file.metadata().map_err(|e| unreadable(&e))?.len();
    if size > MAX_GALLERY_MANIFEST_BYTES {
        return Err(unreadable(&format!(
            "{size} bytes; a manifest may be at most {MAX_GALLERY_MANIFEST_BYTES}"
        )));
    }
    let not_after_ms = manifest::millis(SystemTime::now() + PublishSettings::default().skew);
    let stamp = Stamp::Loose { not_after_ms };
    let mut merge = Merge::new();
    let mut refused = 0usize;
    let mut deserializer = serde_json::Deserializer::from_reader(std::io::BufReader::new(
        std::io::Read::take(file, size),
    ));
    let header = read_document(&mut deserializer, MAX_STORY_SCENES, &mut |value| {
        let taken = check_entry(value, stamp).is_ok_and(|checked| merge.offer(checked));
        if !taken {
            refused += 1;
        }
    })
    .and_then(|header| deserializer.end().map(|()| header))
    .map_err(|e| unreadable(&format!("not a story manifest: {e}")))?;
    let Some(story_id) = header.story_id.as_deref() else {
        return Err(unreadable(&"not a story manifest: no story_id"));
    };
    validate_story_id(story_id)?;
    let format = header.format.unwrap_or(1);
    if format > u64::from(MANIFEST_FORMAT) {
        return Err(unreadable(&format!(
            "format {format}, newer than this stage3 reads ({MANIFEST_FORMAT})"
        )));
    }
    if refused > 0 {
        tracing::warn!(
            path = %manifest_path.display(),
            refused,
            "manifest entries failed their checks; left off the page"
        );
    }
    if let Some(ms) = header
        .updated_at
        .as_deref()
        .and_then(manifest::parse_millis)
        .filter(|ms| *ms <= not_after_ms)
    {
        merge.saw(ms);
    }
    merge.batches = header
        .batches
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let mut manifest = merge.finish(story_id, header.fragments.clone());

    let dir = manifest_path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let plan = plan::read_plan_file(story_id, &dir.join("plan.json"))?;
    manifest.cast = cast::read_cast_file(story_id, &dir.join("cast.json"));
    let page_path = dir.join("index.html");
    let write_error = |e: &dyn std::fmt::Display| {
        Stage3Error::storage(format!("cannot write {}: {e}", page_path.display()), false)
    };
    let mut builder = tempfile::Builder::new();
    builder.prefix(".stage3-").suffix(".part");
    // Created as any file is (`0666` masked by the umask), not tempfile's owner-only 0600,
    // and never forced wider than the umask allows.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut temp = builder.tempfile_in(dir).map_err(|e| write_error(&e))?;
    std::io::Write::write_all(
        &mut temp,
        gallery::render(&manifest, &PageLinks::default(), plan.as_ref()).as_bytes(),
    )
    .map_err(|e| write_error(&e))?;
    temp.persist(&page_path)
        .map_err(|e| write_error(&e.error))?;
    Ok(page_path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorType;

    #[test]
    fn a_batch_answer_names_its_story_at_the_top_level_or_not_at_all() {
        let mut answer = BatchAnswer::default();
        let plain = serde_json::to_value(&answer).unwrap();
        assert!(plain.get("story_id").is_none(), "{plain}");
        assert_eq!(
            serde_json::from_value::<BatchAnswer>(plain).unwrap(),
            answer
        );

        answer.story = Some(StoryLinks {
            story_id: "fox".into(),
            manifest_path: Some("out/stories/fox/manifest.json".into()),
            gallery_path: Some("out/stories/fox/index.html".into()),
            ..StoryLinks::default()
        });
        let json = serde_json::to_value(&answer).unwrap();
        assert_eq!(json["story_id"], "fox");
        assert_eq!(json["manifest_path"], "out/stories/fox/manifest.json");
        assert_eq!(json["gallery_path"], "out/stories/fox/index.html");
        assert!(json.get("manifest_url").is_none() && json.get("story_error").is_none());
        assert_eq!(serde_json::from_value::<BatchAnswer>(json).unwrap(), answer);
    }

    #[test]
    fn story_ids_follow_the_scene_id_rules_and_say_so() {
        validate_story_id("fox-and-owl_2.v1").unwrap();
        let err = validate_story_id("../up").unwrap_err();
        assert!(err.to_string().contains("story_id:"), "{err}");
    }

    #[tokio::test]
    async fn publishing_refuses_an_unsafe_story_id_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::storage::FsStore::new(dir.path()).unwrap();
        let err = publish_story(&store, &UrlPolicy::Store, "a/b", Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn a_store_that_cannot_list_fails_the_story_not_the_batch() {
        /// A store with no `list`: the trait's default.
        struct NoList(crate::storage::FsStore);
        #[async_trait::async_trait]
        impl ObjectStore for NoList {
            async fn put(
                &self,
                key: &str,
                bytes: Bytes,
                meta: ObjectMeta,
            ) -> Result<crate::storage::ObjectInfo> {
                self.0.put(key, bytes, meta).await
            }
            async fn put_new(
                &self,
                key: &str,
                bytes: Bytes,
                meta: ObjectMeta,
            ) -> Result<crate::storage::Created> {
                self.0.put_new(key, bytes, meta).await
            }
            async fn get(&self, key: &str, limit: u64) -> Result<crate::storage::Fetched> {
                self.0.get(key, limit).await
            }
            async fn head(&self, key: &str) -> Result<Option<crate::storage::ObjectInfo>> {
                self.0.head(key).await
            }
            async fn delete(&self, key: &str) -> Result<()> {
                self.0.delete(key).await
            }
            fn location(&self, key: &str) -> String {
                self.0.location(key)
            }
            fn public_key(&self, key: &str) -> String {
                self.0.public_key(key)
            }
            async fn presigned_url(&self, key: &str) -> Result<Option<String>> {
                self.0.presigned_url(key).await
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let store = NoList(crate::storage::FsStore::new(dir.path()).unwrap());
        let err = publish_story(&store, &UrlPolicy::Store, "fox", Vec::new())
            .await
            .unwrap_err();
        assert_eq!(err.error_type(), ErrorType::Storage);
        assert!(err.to_string().contains("cannot list"), "{err}");
    }

    #[test]
    fn the_gallery_command_rewrites_the_page_from_a_manifest_file_or_directory() {
        let dir = tempfile::tempdir().unwrap();
        let story_dir = dir.path().join("stories/fox");
        std::fs::create_dir_all(&story_dir).unwrap();
        let manifest = Merge::new().finish("fox", Vec::new());
        std::fs::write(
            story_dir.join("manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        )
        .unwrap();
        let page = rebuild_gallery(&story_dir).unwrap();
        assert_eq!(page, story_dir.join("index.html"));
        assert_eq!(
            std::fs::read_to_string(&page).unwrap(),
            gallery::render(&manifest, &PageLinks::default(), None)
        );
        assert_eq!(
            rebuild_gallery(&story_dir.join("manifest.json")).unwrap(),
            page
        );

        std::fs::write(
            story_dir.join("manifest.json"),
            b"{\"not\": \"a manifest\"}",
        )
        .unwrap();
        let err = rebuild_gallery(&story_dir).unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
        assert!(err.to_string().contains("not a story manifest"), "{err}");
        let err = rebuild_gallery(&dir.path().join("missing")).unwrap_err();
        assert_eq!(err.error_type(), ErrorType::InvalidRequest);
    }

    /// A memory store with one fault: every PUT fails transiently, or the listing never
    /// shows what was written (a listing that lags for good).
    struct Faulty {
        inner: crate::storage::MemoryStore,
        fault: Fault,
        puts: std::sync::atomic::AtomicUsize,
    }

    #[derive(PartialEq)]
    enum Fault {
        FailingPuts,
        LaggingListing,
    }

    impl Faulty {
        fn new(fault: Fault) -> Self {
            Faulty {
                inner: crate::storage::MemoryStore::new(),
                fault,
                puts: Default::default(),
            }
        }

        fn puts(&self) -> usize {
            self.puts.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Faulty {
        async fn put(
            &self,
            key: &str,
            bytes: Bytes,
            meta: ObjectMeta,
        ) -> Result<crate::storage::ObjectInfo> {
            self.puts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if self.fault == Fault::FailingPuts {
                return Err(Stage3Error::storage("SlowDown", true));
            }
            self.inner.put(key, bytes, meta).await
        }
        async fn put_new(
            &self,
            key: &str,
            bytes: Bytes,
            meta: ObjectMeta,
        ) -> Result<crate::storage::Created> {
            self.inner.put_new(key, bytes, meta).await
        }
        async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
            self.inner.get(key, limit).await
        }
        async fn head(&self, key: &str) -> Result<Option<crate::storage::ObjectInfo>> {
            self.inner.head(key).await
        }
        async fn delete(&self, key: &str) -> Result<()> {
            self.inner.delete(key).await
        }
        fn location(&self, key: &str) -> String {
            self.inner.location(key)
        }
        fn public_key(&self, key: &str) -> String {
            self.inner.public_key(key)
        }
        async fn presigned_url(&self, key: &str) -> Result<Option<String>> {
            self.inner.presigned_url(key).await
        }
        async fn list_objects(&self, prefix: &str) -> Result<Vec<crate::storage::Listed>> {
            if self.fault == Fault::LaggingListing {
                return Ok(Vec::new());
            }
            self.inner.list_objects(prefix).await
        }
    }

    async fn publish_within(store: &Faulty, deadline: Deadline) -> Result<StoryLinks> {
        let settings = PublishSettings::default();
        publish_story_within(
            store,
            &UrlPolicy::Store,
            "fox",
            Vec::new(),
            &settings,
            deadline,
        )
        .await
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_store_call_is_retried_only_while_the_deadline_allows() {
        let store = Faulty::new(Fault::FailingPuts);
        let err = publish_within(&store, Deadline::NONE).await.unwrap_err();
        assert!(err.is_transient(), "the store's own error: {err}");
        let attempts = RetryPolicy::STORY_STORE.max_retries as usize + 1;
        assert_eq!(store.puts(), attempts);

        let store = Faulty::new(Fault::FailingPuts);
        let started = tokio::time::Instant::now();
        let deadline = Deadline::after(Duration::from_millis(150));
        let err = publish_within(&store, deadline).await.unwrap_err();
        assert!(err.is_transient(), "the store's own error: {err}");
        assert!(started.elapsed() <= Duration::from_millis(150));
        assert!((1..=attempts).contains(&store.puts()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_listing_is_waited_for_only_while_the_deadline_allows() {
        let store = Faulty::new(Fault::LaggingListing);
        let started = tokio::time::Instant::now();
        let err = publish_within(&store, Deadline::NONE).await.unwrap_err();
        assert_eq!(err.error_type(), ErrorType::Storage);
        assert!(err.to_string().contains("rounds"), "{err}");
        // One pause between each two rounds, each under its ceiling: 100 ms doubling to 1.6 s.
        let ceilings: u64 = (1..MAX_ROUNDS as u32)
            .map(|retry| (100u64 << (retry - 1)).min(1600))
            .sum();
        assert!(started.elapsed() <= Duration::from_millis(ceilings));

        // The first pause alone may take up to 100 ms, and all seven fitting in 100 ms is
        // next to impossible: the story stops early, saying why.
        let started = tokio::time::Instant::now();
        let deadline = Deadline::after(Duration::from_millis(100));
        let err = publish_within(&store, deadline).await.unwrap_err();
        assert_eq!(err.error_type(), ErrorType::DeadlineExceeded, "{err}");
        assert!(err.to_string().contains("listing lags"), "{err}");
        assert!(started.elapsed() <= Duration::from_millis(100));
    }
}
