//! A story's cast: the character sheets of `sheet` mode (see `crate::cast`), shown above
//! the storyboard's pages and listed in its manifest.
//!
//! The cast is its own object, `stories/{story_id}/cast.json`, written whole by the batch
//! that drew or found its sheets, and read back (checked like a fragment entry) each time
//! the manifest and page are published. It stays out of the fragment merge: a story's
//! sheets follow from its characters' descriptions, so every batch that has any writes
//! the same ones, and the last writer's are the story's.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Result, Stage3Error};
use crate::schema::{validate_scene_id, Stage3Output};
use crate::storage::{Fetched, ObjectMeta, ObjectStore};

/// The most characters a cast lists, and the most bytes its object may have.
const MAX_CAST: usize = 64;
const MAX_CAST_BYTES: u64 = 256 * 1024;

/// One character of a story's cast.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CastMember {
    /// The character's id, as scenes' `characters_in_scene` name it.
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The sheet: `characters/{story_id}/{id}-{hash}.png`.
    pub image_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail_key: Option<String>,
}

/// `stories/{story_id}/cast.json`.
pub(crate) fn cast_key(story_id: &str) -> String {
    format!("stories/{story_id}/cast.json")
}

impl CastMember {
    /// The cast entry of a stored sheet (`characters/{story_id}/{id}`), named `name`.
    pub(crate) fn of_sheet(sheet: &Stage3Output, name: Option<String>) -> Option<CastMember> {
        let id = sheet.scene_id.rsplit('/').next()?.to_string();
        let image_key =
            crate::cache::image_key(&sheet.scene_id, &sheet.generation_params.content_sha256);
        Some(CastMember {
            id,
            name,
            thumbnail_key: sheet
                .thumbnail_path
                .as_ref()
                .map(|_| super::thumbnail_key(&image_key)),
            image_key,
        })
    }

    /// Whether the entry is one this service writes for `story_id`: keys under the
    /// story's own sheet folder, nothing that walks a path.
    fn check(&self, story_id: &str) -> std::result::Result<(), String> {
        validate_scene_id(&self.id).map_err(|e| e.to_string())?;
        let stem = format!("characters/{story_id}/{}", self.id);
        if !super::manifest::is_image_key_of(&stem, &self.image_key) {
            return Err(format!("{}: an image key that is not its sheet's", self.id));
        }
        if let Some(key) = &self.thumbnail_key {
            if *key != super::thumbnail_key(&self.image_key) {
                return Err(format!(
                    "{}: a thumbnail key that is not its sheet's",
                    self.id
                ));
            }
        }
        if self.name.as_ref().is_some_and(|n| n.chars().count() > 200) {
            return Err(format!("{}: a name over 200 characters", self.id));
        }
        Ok(())
    }
}

/// Writes the story's cast (`cast.json`), replacing the one before.
pub(crate) async fn put_cast(
    store: &dyn ObjectStore,
    story_id: &str,
    cast: &[CastMember],
) -> Result<()> {
    let body = serde_json::to_vec_pretty(cast)
        .map_err(|e| Stage3Error::storage(format!("cannot encode the cast: {e}"), false))?;
    store
        .put(&cast_key(story_id), Bytes::from(body), ObjectMeta::RECORD)
        .await?;
    Ok(())
}

/// The story's cast as stored, each entry checked; empty when there is none. An entry that
/// does not check out is left out, with a warning; a store failure is the caller's.
pub(crate) async fn read_cast(store: &dyn ObjectStore, story_id: &str) -> Result<Vec<CastMember>> {
    let bytes = match store.get(&cast_key(story_id), MAX_CAST_BYTES).await? {
        Fetched::Found(bytes) => bytes,
        Fetched::Missing => return Ok(Vec::new()),
        Fetched::TooLarge { size } => {
            tracing::warn!(story_id, size, "ignoring an oversized cast");
            return Ok(Vec::new());
        }
    };
    Ok(checked_cast(story_id, &bytes))
}

/// [`read_cast`] from a story's directory on this machine (`stage3 gallery`).
pub(crate) fn read_cast_file(story_id: &str, path: &std::path::Path) -> Vec<CastMember> {
    let read = std::fs::File::open(path).and_then(|file| {
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(file, MAX_CAST_BYTES), &mut bytes)
            .map(|_| bytes)
    });
    match read {
        Ok(bytes) => checked_cast(story_id, &bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            tracing::warn!(story_id, error = %e, "ignoring an unreadable cast");
            Vec::new()
        }
    }
}

/// The entries of a stored cast that check out.
fn checked_cast(story_id: &str, bytes: &[u8]) -> Vec<CastMember> {
    let Ok(entries) = serde_json::from_slice::<Vec<CastMember>>(bytes) else {
        tracing::warn!(story_id, "ignoring an unreadable cast");
        return Vec::new();
    };
    entries
        .into_iter()
        .filter(|member| match member.check(story_id) {
            Ok(()) => true,
            Err(why) => {
                tracing::warn!(story_id, why, "skipping a cast entry");
                false
            }
        })
        .take(MAX_CAST)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, key: &str) -> CastMember {
        CastMember {
            id: id.into(),
            name: Some("Rufus".into()),
            image_key: key.into(),
            thumbnail_key: None,
        }
    }

    #[test]
    fn only_the_story_s_own_sheets_are_cast() {
        let good = member("fox", "characters/winter/fox-0123456789abcdef.png");
        assert!(good.check("winter").is_ok());
        assert!(good.check("summer").is_err(), "another story's sheet");
        for bad in [
            "characters/winter/owl-0123456789abcdef.png",
            "characters/winter/fox-../../x.png",
            "https://evil.example/fox.png",
        ] {
            assert!(member("fox", bad).check("winter").is_err(), "{bad}");
        }
        assert!(
            member("../fox", "characters/winter/../fox-0123456789abcdef.png")
                .check("winter")
                .is_err()
        );
    }
}
