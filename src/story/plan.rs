//! A story's plan, `stories/{story_id}/plan.json`: the scenes a submission put on the
//! request queue (`stage3 submit`), in story order. The manifest says what happened to
//! each scene; the plan says what is still to come, so `stage3 status` and the storyboard
//! page can count and show the scenes no batch has reported yet as **pending**.
//!
//! A scene of the plan is pending until the story holds an entry for it that is no older
//! than the plan itself, both times by the store's own clock (the plan's store time, the
//! entry's fragment's store time). So a story submitted again — a few fixed scenes, or the
//! whole of it — shows its resubmitted scenes pending until their new outcome arrives,
//! never their old one. Scenes the manifest holds that the plan does not name (an earlier
//! submission, a `stage3 generate` run of the same story) follow the plan's, as they are.
//!
//! The plan is written by the store's `put`, all or nothing like every object; it is
//! replaced by the next submission of the story. Read back, it is checked like any
//! document from a shared store: bounded, of this story, every id a valid scene id.

use std::collections::{BTreeMap, HashMap, HashSet};

#[cfg(any(feature = "sqs", test))]
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::manifest::{self, Manifest, SceneEntry, SceneStatus, MAX_STORY_SCENES};
use crate::deadline::Deadline;
use crate::error::{Result, Stage3Error};
use crate::retry::RetryPolicy;
use crate::schema::{validate_scene_id, validate_story_id};
#[cfg(any(feature = "sqs", test))]
use crate::storage::ObjectMeta;
use crate::storage::ObjectStore;

/// The format of `plan.json`.
pub(crate) const PLAN_FORMAT: u32 = 1;
/// The largest plan read: 10,000 ids of at most 128 characters, with room to spare.
pub(crate) const MAX_PLAN_BYTES: u64 = 4 * 1024 * 1024;

/// `stories/{story_id}/plan.json`.
pub(crate) fn plan_key(story_id: &str) -> String {
    format!("stories/{story_id}/plan.json")
}

/// What a submission put on the queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StoryPlan {
    pub format: u32,
    pub story_id: String,
    /// When it was submitted, by the submitter's clock (RFC 3339 UTC): for people. Pending
    /// is judged by the store's time of `plan.json`, never by this.
    pub submitted_at: String,
    /// How many scenes: `scene_ids.len()`.
    pub scenes: usize,
    /// The scenes in story order, each once.
    pub scene_ids: Vec<String>,
}

impl StoryPlan {
    /// The plan of `scene_ids` (an id given twice is kept once, where it first came),
    /// submitted `at`.
    #[cfg(any(feature = "sqs", test))]
    pub(crate) fn new(story_id: &str, scene_ids: Vec<String>, at: std::time::SystemTime) -> Self {
        let mut seen = HashSet::new();
        let scene_ids: Vec<String> = scene_ids
            .into_iter()
            .filter(|id| seen.insert(id.clone()))
            .collect();
        StoryPlan {
            format: PLAN_FORMAT,
            story_id: story_id.to_string(),
            submitted_at: manifest::format_millis(manifest::millis(at)),
            scenes: scene_ids.len(),
            scene_ids,
        }
    }

    /// Checks a plan read from a store: the problem, if it is not a usable plan of
    /// `story_id`.
    fn problem(&self, story_id: &str) -> Option<String> {
        if self.format > PLAN_FORMAT {
            return Some(format!(
                "format {}, newer than this stage3 reads ({PLAN_FORMAT})",
                self.format
            ));
        }
        if self.story_id != story_id {
            return Some("another story's plan".into());
        }
        if self.scene_ids.len() > MAX_STORY_SCENES {
            return Some(format!("more than {MAX_STORY_SCENES} scenes"));
        }
        if self.scenes != self.scene_ids.len() {
            return Some(format!(
                "says {} scenes but names {}",
                self.scenes,
                self.scene_ids.len()
            ));
        }
        let mut seen = HashSet::new();
        for id in &self.scene_ids {
            if let Err(e) = validate_scene_id(id) {
                return Some(e.to_string());
            }
            if !seen.insert(id.as_str()) {
                return Some(format!("scene_id {id:?} twice"));
            }
        }
        None
    }
}

/// A plan as stored, with the store's time of `plan.json` (milliseconds since the epoch).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StoredPlan {
    pub plan: StoryPlan,
    pub at_ms: u64,
}

/// Writes `plan` as the story's `plan.json`, replacing any earlier one; answers where it is.
#[cfg(any(feature = "sqs", test))]
pub(crate) async fn write_plan(
    store: &dyn ObjectStore,
    plan: &StoryPlan,
    deadline: Deadline,
) -> Result<String> {
    validate_story_id(&plan.story_id)?;
    let key = plan_key(&plan.story_id);
    let body = Bytes::from(
        serde_json::to_vec_pretty(plan)
            .map_err(|e| Stage3Error::storage(format!("cannot encode the plan: {e}"), false))?,
    );
    RetryPolicy::STORY_STORE
        .run(deadline, "writing the story plan", || {
            store.put(&key, body.clone(), ObjectMeta::RECORD)
        })
        .await?;
    Ok(store.location(&key))
}

/// The story's plan and its store time, or `None` when the story has none. A plan that
/// cannot be used (damaged, another story's, a newer format) is an error naming why.
pub(crate) async fn read_plan(
    store: &dyn ObjectStore,
    story_id: &str,
    deadline: Deadline,
) -> Result<Option<StoredPlan>> {
    validate_story_id(story_id)?;
    let key = plan_key(story_id);
    // The listing gives the store's own time of the object, which a GET does not.
    let listed = RetryPolicy::STORY_STORE
        .run(deadline, "listing the story plan", || {
            store.list_objects(&key)
        })
        .await?;
    let Some(listed) = listed.into_iter().find(|listed| listed.key == key) else {
        return Ok(None);
    };
    let fetched = RetryPolicy::STORY_STORE
        .run(deadline, "reading the story plan", || {
            store.get(&key, MAX_PLAN_BYTES)
        })
        .await?;
    let location = store.location(&key);
    let Some(bytes) = fetched.into_bytes(&location, MAX_PLAN_BYTES)? else {
        return Ok(None);
    };
    let plan = parse_plan(story_id, &bytes)
        .map_err(|why| Stage3Error::storage(format!("{location}: {why}"), false))?;
    Ok(Some(StoredPlan {
        plan,
        at_ms: manifest::millis(listed.last_modified),
    }))
}

/// Reads `plan.json` from a directory on this machine (`stage3 gallery`): its file time is
/// the store's time.
pub(crate) fn read_plan_file(story_id: &str, path: &std::path::Path) -> Result<Option<StoredPlan>> {
    let unreadable = |e: &dyn std::fmt::Display| {
        Stage3Error::invalid_request(format!("{}: {e}", path.display()))
    };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(unreadable(&e)),
    };
    let metadata = file.metadata().map_err(|e| unreadable(&e))?;
    if metadata.len() > MAX_PLAN_BYTES {
        return Err(unreadable(&format!(
            "{} bytes; a plan may be at most {MAX_PLAN_BYTES}",
            metadata.len()
        )));
    }
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_PLAN_BYTES), &mut bytes)
        .map_err(|e| unreadable(&e))?;
    let plan = parse_plan(story_id, &bytes).map_err(|why| unreadable(&why))?;
    let at = metadata.modified().map_err(|e| unreadable(&e))?;
    Ok(Some(StoredPlan {
        plan,
        at_ms: manifest::millis(at),
    }))
}

fn parse_plan(story_id: &str, bytes: &[u8]) -> std::result::Result<StoryPlan, String> {
    let plan: StoryPlan =
        serde_json::from_slice(bytes).map_err(|e| format!("not a story plan: {e}"))?;
    match plan.problem(story_id) {
        Some(problem) => Err(format!("not a usable plan: {problem}")),
        None => Ok(plan),
    }
}

// ---------------------------------------------------------------------------------------
// Progress.

/// Where a scene of a story stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SceneState {
    Succeeded,
    Failed,
    /// In the plan, with no outcome since the plan was stored.
    Pending,
}

/// One scene as status and the page show it: its state, and its latest entry (for a
/// pending scene, an outcome older than the plan, if there is one).
#[derive(Debug, Clone, Copy)]
pub(crate) struct SceneView<'a> {
    pub scene_id: &'a str,
    pub state: SceneState,
    pub entry: Option<&'a SceneEntry>,
}

/// The story's scenes in order: the plan's first, then the manifest's others as the
/// manifest orders them (see the module notes).
pub(crate) fn scene_views<'a>(
    manifest: &'a Manifest,
    plan: Option<&'a StoredPlan>,
) -> Vec<SceneView<'a>> {
    let entries: HashMap<&str, &SceneEntry> = manifest
        .scenes
        .iter()
        .map(|entry| (entry.scene_id.as_str(), entry))
        .collect();
    let state_of = |entry: &SceneEntry| match entry.status {
        SceneStatus::Succeeded => SceneState::Succeeded,
        SceneStatus::Failed => SceneState::Failed,
    };
    let mut views = Vec::with_capacity(manifest.scenes.len());
    let mut planned: HashSet<&str> = HashSet::new();
    if let Some(stored) = plan {
        for id in &stored.plan.scene_ids {
            planned.insert(id.as_str());
            let entry = entries.get(id.as_str()).copied();
            let fresh = entry.filter(|entry| entry_ms(entry) >= stored.at_ms);
            views.push(SceneView {
                scene_id: id,
                state: fresh.map_or(SceneState::Pending, state_of),
                entry,
            });
        }
    }
    for entry in &manifest.scenes {
        if !planned.contains(entry.scene_id.as_str()) {
            views.push(SceneView {
                scene_id: &entry.scene_id,
                state: state_of(entry),
                entry: Some(entry),
            });
        }
    }
    views
}

/// The store time an entry came from (0 when it names none).
fn entry_ms(entry: &SceneEntry) -> u64 {
    manifest::parse_millis(&entry.updated_at).unwrap_or(0)
}

/// Puts the manifest's scenes in the plan's order; scenes the plan does not name follow,
/// as they were.
pub(crate) fn order_by_plan(manifest: &mut Manifest, plan: &StoryPlan) {
    let position: HashMap<&str, usize> = plan
        .scene_ids
        .iter()
        .enumerate()
        .map(|(at, id)| (id.as_str(), at))
        .collect();
    // A stable sort: the others keep their order after the plan's.
    manifest.scenes.sort_by_key(|entry| {
        position
            .get(entry.scene_id.as_str())
            .copied()
            .unwrap_or(usize::MAX)
    });
}

/// A failed scene, as status reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedScene {
    pub scene_id: String,
    pub error_type: String,
    pub message: String,
}

/// A story at a glance: what `stage3 status` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoryProgress {
    pub story_id: String,
    pub total: usize,
    pub succeeded: usize,
    pub failed: usize,
    pub pending: usize,
    /// What the story's stored images cost to generate, in USD, so far.
    pub cost_usd: f64,
    /// Failed scenes by `error_type`.
    pub error_types: BTreeMap<String, usize>,
    pub failures: Vec<FailedScene>,
    pub pending_scene_ids: Vec<String>,
    /// The plan's `submitted_at`, when the story has a plan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_at: Option<String>,
    /// The store time of the newest outcome, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<String>,
}

impl StoryProgress {
    /// Counts `views` of the story `manifest` (with its `plan`, if any).
    pub(crate) fn of(manifest: &Manifest, plan: Option<&StoredPlan>) -> Self {
        let views = scene_views(manifest, plan);
        let mut progress = StoryProgress {
            story_id: manifest.story_id.clone(),
            total: views.len(),
            succeeded: 0,
            failed: 0,
            pending: 0,
            cost_usd: 0.0,
            error_types: BTreeMap::new(),
            failures: Vec::new(),
            pending_scene_ids: Vec::new(),
            submitted_at: plan.map(|stored| stored.plan.submitted_at.clone()),
            updated_at: Some(manifest.updated_at.clone()).filter(|at| !at.is_empty()),
        };
        let mut cost = 0.0;
        for view in views {
            match view.state {
                SceneState::Succeeded => {
                    progress.succeeded += 1;
                    cost += view.entry.and_then(|entry| entry.cost).unwrap_or(0.0);
                }
                SceneState::Failed => {
                    progress.failed += 1;
                    let entry = view.entry;
                    let error_type = entry
                        .and_then(|e| e.error_type.clone())
                        .unwrap_or_else(|| "failed".into());
                    *progress.error_types.entry(error_type.clone()).or_default() += 1;
                    progress.failures.push(FailedScene {
                        scene_id: view.scene_id.to_string(),
                        error_type,
                        message: entry.and_then(|e| e.message.clone()).unwrap_or_default(),
                    });
                }
                SceneState::Pending => {
                    progress.pending += 1;
                    progress.pending_scene_ids.push(view.scene_id.to_string());
                }
            }
        }
        // Rounded as the manifest's total is: sums of binary fractions drift.
        progress.cost_usd = (cost * 1e9).round() / 1e9;
        progress
    }

    /// Nothing is pending.
    pub(crate) fn is_settled(&self) -> bool {
        self.pending == 0
    }
}

/// Failed and pending scenes a person's report names; the JSON has them all.
const SCENES_NAMED: usize = 10;

impl std::fmt::Display for StoryProgress {
    /// `stage3 status` for a person: the counts and cost, then the failed scenes with their
    /// types and the pending ones, the first few of each.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "story {}: {} scene(s): {} succeeded, {} failed, {} pending; cost ${:.4}",
            self.story_id, self.total, self.succeeded, self.failed, self.pending, self.cost_usd
        )?;
        if !self.error_types.is_empty() {
            let types: Vec<String> = self
                .error_types
                .iter()
                .map(|(error_type, count)| format!("{error_type} {count}"))
                .collect();
            writeln!(f, "failed: {}", types.join(", "))?;
            for failure in self.failures.iter().take(SCENES_NAMED) {
                let FailedScene {
                    scene_id,
                    error_type,
                    message,
                } = failure;
                writeln!(f, "  {scene_id} [{error_type}] {message}")?;
            }
            if self.failures.len() > SCENES_NAMED {
                let more = self.failures.len() - SCENES_NAMED;
                writeln!(f, "  … {more} more (--json lists them all)")?;
            }
        }
        if !self.pending_scene_ids.is_empty() {
            let shown: Vec<&str> = self
                .pending_scene_ids
                .iter()
                .take(SCENES_NAMED)
                .map(String::as_str)
                .collect();
            let more = self.pending_scene_ids.len() - shown.len();
            let more = if more > 0 {
                format!(", … {more} more")
            } else {
                String::new()
            };
            writeln!(f, "pending: {}{more}", shown.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::story::manifest::{Checked, ManifestEntry, Merge, StoryScene};
    use std::time::SystemTime;

    fn scene(id: &str) -> StoryScene {
        StoryScene {
            scene_id: id.into(),
            prompt: format!("prompt of {id}"),
            size: "1024x1024".into(),
            model: "m".into(),
        }
    }

    /// A manifest whose entries came from fragments stored at the given times.
    fn manifest(entries: &[(&str, bool, u64)]) -> Manifest {
        let mut merge = Merge::new();
        for (id, ok, at_ms) in entries {
            let mut entry = ManifestEntry::failed(&scene(id), "content_policy", "refused");
            if *ok {
                entry.status = SceneStatus::Succeeded;
                entry.error_type = None;
                entry.message = None;
                entry.cost = Some(0.039);
            }
            let mut entry = entry.to_scene_entry();
            entry.updated_at = manifest::format_millis(*at_ms);
            assert!(merge.offer(Checked {
                entry,
                at_ms: *at_ms
            }));
        }
        merge.finish("fox", Vec::new())
    }

    fn plan(ids: &[&str], at_ms: u64) -> StoredPlan {
        StoredPlan {
            plan: StoryPlan::new(
                "fox",
                ids.iter().map(|id| id.to_string()).collect(),
                SystemTime::UNIX_EPOCH,
            ),
            at_ms,
        }
    }

    #[test]
    fn a_plan_counts_scenes_without_an_outcome_since_it_as_pending() {
        let manifest = manifest(&[("b", true, 2_000), ("a", false, 2_000), ("old", true, 500)]);
        let plan = plan(&["a", "b", "c", "old"], 1_000);
        let progress = StoryProgress::of(&manifest, Some(&plan));
        assert_eq!(
            (
                progress.total,
                progress.succeeded,
                progress.failed,
                progress.pending
            ),
            (4, 1, 1, 2)
        );
        assert_eq!(progress.pending_scene_ids, ["c", "old"]);
        assert_eq!(progress.error_types.get("content_policy"), Some(&1));
        assert_eq!(progress.failures[0].scene_id, "a");
        assert!((progress.cost_usd - 0.039).abs() < 1e-12);
        assert!(!progress.is_settled());
        let order: Vec<&str> = scene_views(&manifest, Some(&plan))
            .iter()
            .map(|v| v.scene_id)
            .collect();
        assert_eq!(order, ["a", "b", "c", "old"]);
    }

    #[test]
    fn without_a_plan_the_manifest_is_the_story_and_nothing_is_pending() {
        let manifest = manifest(&[("b", true, 2_000), ("a", false, 2_000)]);
        let progress = StoryProgress::of(&manifest, None);
        assert_eq!((progress.total, progress.pending), (2, 0));
        assert_eq!(progress.succeeded, manifest.totals.succeeded);
        assert_eq!(progress.cost_usd, manifest.totals.cost_usd);
        assert!(progress.is_settled());
    }

    #[test]
    fn scenes_outside_the_plan_follow_it_and_order_by_plan_is_stable() {
        let mut manifest = manifest(&[
            ("x", true, 1),
            ("b", true, 9),
            ("y", true, 1),
            ("a", true, 9),
        ]);
        let plan = plan(&["a", "b"], 5);
        let order: Vec<&str> = scene_views(&manifest, Some(&plan))
            .iter()
            .map(|v| v.scene_id)
            .collect();
        assert_eq!(order, ["a", "b", "x", "y"]);
        order_by_plan(&mut manifest, &plan.plan);
        let ids: Vec<&str> = manifest
            .scenes
            .iter()
            .map(|e| e.scene_id.as_str())
            .collect();
        assert_eq!(ids, ["a", "b", "x", "y"]);
    }

    #[test]
    fn plans_read_back_are_checked() {
        let good = StoryPlan::new(
            "fox",
            vec!["a".into(), "b".into(), "a".into()],
            SystemTime::now(),
        );
        assert_eq!(good.scene_ids, ["a", "b"]);
        assert_eq!(good.scenes, 2);
        let bytes = serde_json::to_vec(&good).unwrap();
        assert_eq!(parse_plan("fox", &bytes).unwrap(), good);
        assert!(parse_plan("owl", &bytes)
            .unwrap_err()
            .contains("another story"));
        let mut bad = good.clone();
        bad.scene_ids.push("../x".into());
        bad.scenes = 3;
        assert!(parse_plan("fox", &serde_json::to_vec(&bad).unwrap())
            .unwrap_err()
            .contains("scene_id"));
        let mut newer = good.clone();
        newer.format = PLAN_FORMAT + 1;
        assert!(parse_plan("fox", &serde_json::to_vec(&newer).unwrap())
            .unwrap_err()
            .contains("newer"));
        assert!(parse_plan("fox", b"[1,2]")
            .unwrap_err()
            .contains("not a story plan"));
    }

    #[tokio::test]
    async fn a_plan_is_written_and_read_back_with_the_store_s_time() {
        let store = crate::storage::MemoryStore::new();
        assert_eq!(
            read_plan(&store, "fox", Deadline::NONE).await.unwrap(),
            None
        );
        let plan = StoryPlan::new("fox", vec!["a".into()], SystemTime::now());
        write_plan(&store, &plan, Deadline::NONE).await.unwrap();
        let stored = read_plan(&store, "fox", Deadline::NONE)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.plan, plan);
        assert!(stored.at_ms > 0);
    }
}
