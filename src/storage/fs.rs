//! The local filesystem backend, for development, tests and single-machine runs.
//!
//! Writes go to a temporary file in the destination directory, are flushed to disk, then
//! renamed over the final name: a crash or an error leaves either the old object or the new
//! one, never half of one. Keys are checked so no path leaves the output directory.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{ObjectMeta, ObjectStore};
use crate::error::{Result, Stage3Error};

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root`, created if missing.
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| {
            Stage3Error::storage(
                format!("cannot create output directory {}: {e}", root.display()),
                false,
            )
        })?;
        Ok(FsStore {
            root: root.to_path_buf(),
        })
    }

    /// The file behind `key`, refusing anything that could point outside the root.
    fn path_of(&self, key: &str) -> Result<PathBuf> {
        let relative = Path::new(key);
        let safe = !key.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(part) if !part.to_string_lossy().starts_with('.')));
        if !safe {
            return Err(Stage3Error::storage(
                format!("refusing unsafe key {key:?}"),
                false,
            ));
        }
        Ok(self.root.join(relative))
    }
}

fn io_error(action: &str, path: &Path, e: std::io::Error) -> Stage3Error {
    // A full disk or a permission problem will not fix itself between retries; an
    // interrupted or timed-out write might.
    let transient = matches!(
        e.kind(),
        std::io::ErrorKind::Interrupted
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::WouldBlock
    );
    Stage3Error::storage(
        format!("cannot {action} {}: {e}", path.display()),
        transient,
    )
}

/// Writes `bytes` to `path` atomically: temporary file in the same directory, fsync, rename.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, e))?;
    let mut temp = tempfile::Builder::new()
        .prefix(".stage3-")
        .suffix(".part")
        .tempfile_in(dir)
        .map_err(|e| io_error("create a temporary file in", dir, e))?;
    // Temporary files are created owner-only; a published image is for everyone to read
    // (a web server, the next pipeline stage), as any file written normally would be.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        temp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(|e| io_error("set permissions on", temp.path(), e))?;
    }
    temp.write_all(bytes)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| io_error("write", temp.path(), e))?;
    // If persisting fails, dropping the temporary file removes it: nothing partial remains.
    temp.persist(path)
        .map_err(|e| io_error("move into place", path, e.error))?;
    Ok(())
}

/// Every file under `start` whose key (its path below `root`, `/`-separated) starts with
/// `prefix`. Hidden names are skipped: they are never keys, and the temporary files of
/// writes in progress are hidden, so a half-written object is never listed.
fn list_files(root: &Path, start: &Path, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut pending = vec![start.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_error("list", &dir, e)),
        };
        for entry in entries {
            let entry = entry.map_err(|e| io_error("list", &dir, e))?;
            let path = entry.path();
            let Some(key) = path
                .strip_prefix(root)
                .ok()
                .and_then(|relative| {
                    relative
                        .components()
                        .map(|c| c.as_os_str().to_str())
                        .collect::<Option<Vec<_>>>()
                })
                .map(|parts| parts.join("/"))
            else {
                continue; // not UTF-8: no key names it
            };
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry.file_type().map_err(|e| io_error("list", &path, e))?;
            if kind.is_dir() {
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    pending.push(path);
                }
            } else if kind.is_file() && key.starts_with(prefix) {
                keys.push(key);
            }
        }
    }
    keys.sort();
    Ok(keys)
}

#[async_trait]
impl ObjectStore for FsStore {
    async fn put(&self, key: &str, bytes: Bytes, _meta: ObjectMeta) -> Result<()> {
        let path = self.path_of(key)?;
        tokio::task::spawn_blocking(move || write_atomically(&path, &bytes))
            .await
            .map_err(|e| Stage3Error::storage(format!("write task failed: {e}"), true))?
    }

    async fn get(&self, key: &str) -> Result<Option<Bytes>> {
        let path = self.path_of(key)?;
        match tokio::fs::read(&path).await {
            Ok(bytes) => Ok(Some(Bytes::from(bytes))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error("read", &path, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path_of(key)?;
        tokio::fs::try_exists(&path)
            .await
            .map_err(|e| io_error("check", &path, e))
    }

    fn location(&self, key: &str) -> String {
        self.root.join(key).to_string_lossy().into_owned()
    }

    fn public_key(&self, key: &str) -> String {
        key.to_string()
    }

    async fn signed_url(&self, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        // Only the directory of the prefix's last `/` can hold matching keys.
        let start = match prefix.rsplit_once('/') {
            Some((dir, _)) if !dir.is_empty() => self.path_of(dir)?,
            _ => self.root.clone(),
        };
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || list_files(&root, &start, &prefix))
            .await
            .map_err(|e| Stage3Error::storage(format!("list task failed: {e}"), true))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_and_exists_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        assert!(!store.exists("a.png").await.unwrap());
        assert_eq!(store.get("a.png").await.unwrap(), None);

        store
            .put("a.png", Bytes::from_static(b"one"), ObjectMeta::PNG)
            .await
            .unwrap();
        store
            .put("a.png", Bytes::from_static(b"two"), ObjectMeta::PNG)
            .await
            .unwrap();
        assert!(store.exists("a.png").await.unwrap());
        assert_eq!(
            store.get("a.png").await.unwrap().unwrap(),
            Bytes::from_static(b"two")
        );
        assert_eq!(
            store.location("a.png"),
            dir.path().join("a.png").to_string_lossy()
        );

        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            leftovers,
            vec!["a.png".to_string()],
            "no temporary files remain"
        );
    }

    #[tokio::test]
    async fn list_finds_keys_by_prefix_in_order_and_skips_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        for key in [
            "stories/a/batches/2.json",
            "stories/a/batches/1.json",
            "stories/a/manifest.json",
            "stories/ab/batches/1.json",
            "top.png",
        ] {
            store
                .put(key, Bytes::from_static(b"x"), ObjectMeta::RECORD)
                .await
                .unwrap();
        }
        // A write in progress: a hidden temporary file beside the fragments.
        std::fs::write(dir.path().join("stories/a/batches/.stage3-x.part"), b"half").unwrap();

        assert_eq!(
            store.list("stories/a/batches/").await.unwrap(),
            ["stories/a/batches/1.json", "stories/a/batches/2.json"]
        );
        assert_eq!(
            store.list("stories/a").await.unwrap(),
            [
                "stories/a/batches/1.json",
                "stories/a/batches/2.json",
                "stories/a/manifest.json",
                "stories/ab/batches/1.json"
            ]
        );
        assert_eq!(store.list("").await.unwrap().len(), 5);
        assert!(store.list("stories/none/").await.unwrap().is_empty());
        assert!(store.list("../").await.is_err());
    }

    #[tokio::test]
    async fn keys_cannot_escape_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(&dir.path().join("images")).unwrap();
        for key in ["../x.png", "/etc/passwd", "a/../../x", ".hidden", ""] {
            let err = store
                .put(key, Bytes::new(), ObjectMeta::PNG)
                .await
                .unwrap_err();
            assert_eq!(err.error_type(), crate::error::ErrorType::Storage, "{key}");
        }
        assert!(!dir.path().join("x.png").exists());
    }

    #[tokio::test]
    async fn a_failed_write_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        // A directory where the file should go makes the final rename fail.
        std::fs::create_dir(dir.path().join("taken.png")).unwrap();
        std::fs::write(dir.path().join("taken.png").join("keep"), b"x").unwrap();
        assert!(store
            .put("taken.png", Bytes::from_static(b"png"), ObjectMeta::PNG)
            .await
            .is_err());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["taken.png".to_string()]);
    }
}
