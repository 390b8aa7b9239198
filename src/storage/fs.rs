//! The local filesystem backend, for development, tests and single-machine runs.
//!
//! Writes go to a temporary file in the destination directory, are flushed to disk, then
//! renamed (or, for [`ObjectStore::put_new`], hard-linked, which fails if the name exists)
//! into place: a crash or an error leaves either the old object or the new one, never half of
//! one. Keys are checked so no path leaves the output directory, and reads refuse symbolic
//! links, so a planted link cannot make us serve `/etc/shadow` as an image.
//!
//! Files get the permissions of any file written normally: `0666` less the process's umask
//! (and a directory's default ACL), so `umask 077` keeps the unlabelled `sources/` and the
//! records private to their owner.
//!
//! A process that dies mid-write leaves a temporary file. The store clears them when it
//! opens, but only what it can prove is its own: a name of its exact temporary pattern, in
//! one of the directories it writes, below its own root. A store opened on a directory
//! shared with others (a home, `/tmp`) must never delete someone else's file.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Created, Fetched, Listed, ObjectInfo, ObjectMeta, ObjectStore};
use crate::error::{Result, Stage3Error};

/// Temporary files are named `.stage3-XXXXXX.part`; one older than this belongs to a
/// process that died mid-write (a write takes milliseconds) and is removed at start-up.
const STALE_TEMP_AGE: Duration = Duration::from_secs(15 * 60);
/// A temporary file's name: this prefix, [`TEMP_RANDOM_CHARS`] ASCII letters and digits
/// (tempfile's alphabet), this suffix. `stage3 gallery` (src/story/mod.rs) writes its page
/// the same way, with tempfile's default of six.
const TEMP_PREFIX: &str = ".stage3-";
const TEMP_SUFFIX: &str = ".part";
const TEMP_RANDOM_CHARS: usize = 6;
/// The directories below the root that the service writes (besides the root itself, which
/// holds images, records and claims): the unlabelled sources (src/labels.rs), thumbnails
/// (src/story/thumbnail.rs), and per story its manifest and page and, below that, its
/// batch fragments (src/story/mod.rs).
const SUBDIRECTORIES: &[&str] = &["sources", "thumbnails"];
const STORIES: &str = "stories";
const STORY_FRAGMENTS: &str = "batches";

#[derive(Debug, Clone)]
pub struct FsStore {
    root: PathBuf,
}

impl FsStore {
    /// A store rooted at `root`, created if missing. The root is made absolute, so every
    /// `image_path` it reports is right from any working directory. Temporary files left in
    /// its own directories by a process that died mid-write are removed (nothing else).
    pub fn new(root: &Path) -> Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| {
            Stage3Error::storage(
                format!("cannot create output directory {}: {e}", root.display()),
                false,
            )
        })?;
        let root = std::fs::canonicalize(root).map_err(|e| {
            Stage3Error::storage(
                format!("cannot resolve output directory {}: {e}", root.display()),
                false,
            )
        })?;
        remove_stale_temp_files(&root, STALE_TEMP_AGE);
        Ok(FsStore { root })
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

/// Whether an object of this kind is flushed to disk before it takes its name. A claim is
/// not: it only tells other workers to wait, and after a crash its holder is gone anyway;
/// the flush cost every scene a synchronous disk write before its provider call.
fn is_durable(meta: ObjectMeta) -> bool {
    meta != ObjectMeta::CLAIM
}

/// A temporary file beside `path`, holding `bytes` (flushed to disk when `durable`), with
/// the permissions of a file written normally.
fn write_temporary(path: &Path, bytes: &[u8], durable: bool) -> Result<tempfile::NamedTempFile> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| io_error("create directory", dir, e))?;
    let mut builder = tempfile::Builder::new();
    builder
        .prefix(TEMP_PREFIX)
        .suffix(TEMP_SUFFIX)
        .rand_bytes(TEMP_RANDOM_CHARS);
    // tempfile creates owner-only files. Asking for 0666 instead lets the kernel apply the
    // umask (or the directory's default ACL) as it creates the file, as for any file written
    // normally: a web server may read the images under umask 022, nobody else under 077.
    // Reading the umask ourselves would race with other threads (umask(2) sets it to read
    // it) and would miss ACLs.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut temp = builder
        .tempfile_in(dir)
        .map_err(|e| io_error("create a temporary file in", dir, e))?;
    temp.write_all(bytes)
        .and_then(|()| match durable {
            true => temp.as_file().sync_all(),
            false => Ok(()),
        })
        .map_err(|e| io_error("write", temp.path(), e))?;
    if durable && bytes.len() >= DROP_BEHIND_FROM_BYTES {
        drop_behind(temp.as_file());
    }
    Ok(temp)
}

/// Flushed files of this size and more (images, not records or thumbnails, which lookups
/// read back) leave the page cache once they are on disk.
const DROP_BEHIND_FROM_BYTES: usize = 1 << 20;

/// Gives the pages of a file just flushed back to the kernel. This process will not read
/// the image again (a later run's lookup reads it from disk: about 1.7 ms more for 3 MB),
/// and writing the next one into pages the kernel has already handed out is far cheaper
/// than into memory never touched: on a Firecracker VM like our CI machine, 3 MB into
/// fresh page cache costs 5.7 ms of CPU, into recycled pages 0.4 ms (docs/performance.md).
/// Only advice: a failure changes nothing stored.
fn drop_behind(file: &std::fs::File) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: the descriptor is open for the duration of the call; the advice only
        // drops clean cached pages of this file.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = file;
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename over the old one.
fn write_atomically(path: &Path, bytes: &[u8], durable: bool) -> Result<()> {
    let temp = write_temporary(path, bytes, durable)?;
    // If persisting fails, dropping the temporary file removes it: nothing partial remains.
    temp.persist(path)
        .map_err(|e| io_error("move into place", path, e.error))?;
    Ok(())
}

/// Writes `bytes` to `path` only if nothing is there: the hard link from the finished
/// temporary file fails atomically when the name is taken.
fn create_atomically(path: &Path, bytes: &[u8], durable: bool) -> Result<bool> {
    let temp = write_temporary(path, bytes, durable)?;
    match std::fs::hard_link(temp.path(), path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_error("link into place", path, e)),
    }
    // The temporary name is removed when `temp` drops; the link keeps the data.
}

/// Every file under `start` whose key (its path below `root`, `/`-separated) starts with
/// `prefix`. Hidden names are skipped: they are never keys, and the temporary files of
/// writes in progress are hidden, so a half-written object is never listed. Each comes with
/// its modification time: a write renames a finished file into place, so that is when the
/// object was stored.
fn list_files(root: &Path, start: &Path, prefix: &str) -> Result<Vec<Listed>> {
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
                // `DirEntry::metadata` does not follow links, and only plain files get here.
                let meta = match entry.metadata() {
                    Ok(meta) => meta,
                    // Removed since the directory was read: no longer there to list.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("list", &path, e)),
                };
                let last_modified = meta.modified().map_err(|e| io_error("list", &path, e))?;
                keys.push(Listed {
                    key,
                    last_modified,
                    size: meta.len(),
                });
            }
        }
    }
    keys.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(keys)
}

/// Opens `path` for reading unless it is a symbolic link (checked on the opened file, so a
/// link swapped in between cannot slip through). `None` when there is no such file.
///
/// A file replaced between the check and the open is also a different file: a writer
/// renaming a new version into place (two publishers of one story) does that. It is
/// looked at again, a few times; a link is refused whenever it is seen.
fn open_no_symlink(path: &Path) -> std::io::Result<Option<(std::fs::File, u64)>> {
    const LOOKS: usize = 4;
    for _ in 0..LOOKS {
        let link_meta = match std::fs::symlink_metadata(path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if !link_meta.file_type().is_file() {
            return Err(std::io::Error::other(
                "not a regular file (symbolic links are not followed)",
            ));
        }
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            // Removed since the check: as if it had not been there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::MetadataExt;
            if (meta.dev(), meta.ino()) != (link_meta.dev(), link_meta.ino()) {
                continue;
            }
        }
        return Ok(Some((file, meta.len())));
    }
    Err(std::io::Error::other("the file changed while being opened"))
}

/// Whether `name` is one this store gives its temporary files: `.stage3-`, six ASCII
/// letters or digits, `.part`.
fn is_temporary_name(name: &std::ffi::OsStr) -> bool {
    name.to_str()
        .and_then(|name| name.strip_prefix(TEMP_PREFIX))
        .and_then(|rest| rest.strip_suffix(TEMP_SUFFIX))
        .is_some_and(|random| {
            random.len() == TEMP_RANDOM_CHARS && random.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

/// Whether `path` is a directory itself, not a symbolic link to one: the cleanup never
/// follows a link out of the root.
fn is_real_directory(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_dir())
}

/// The directories below `root` that the service writes into, which exist: the root,
/// [`SUBDIRECTORIES`], and `stories/{story_id}/` and `stories/{story_id}/batches/` for
/// every valid story id. Nothing else, and no symbolic link.
fn own_directories(root: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![root.to_path_buf()];
    dirs.extend(
        SUBDIRECTORIES
            .iter()
            .map(|name| root.join(name))
            .filter(|dir| is_real_directory(dir)),
    );
    let stories = root.join(STORIES);
    if !is_real_directory(&stories) {
        return dirs;
    }
    let Ok(entries) = std::fs::read_dir(&stories) else {
        return dirs;
    };
    for entry in entries.flatten() {
        let is_story = entry.file_type().is_ok_and(|kind| kind.is_dir())
            && entry
                .file_name()
                .to_str()
                .is_some_and(|id| crate::schema::validate_story_id(id).is_ok());
        if is_story {
            let story = entry.path();
            let fragments = story.join(STORY_FRAGMENTS);
            dirs.push(story);
            if is_real_directory(&fragments) {
                dirs.push(fragments);
            }
        }
    }
    dirs
}

/// Removes, in the store's own directories only ([`own_directories`]), the regular files
/// named like its temporary files ([`is_temporary_name`]) and older than `age`. Best effort:
/// a file it cannot remove stays.
fn remove_stale_temp_files(root: &Path, age: Duration) {
    for dir in own_directories(root) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // The entry's own type: a symbolic link is never taken for the file it names.
            let is_file = entry.file_type().is_ok_and(|kind| kind.is_file());
            if !is_file || !is_temporary_name(&entry.file_name()) {
                continue;
            }
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|modified| SystemTime::now().duration_since(modified).ok())
                .is_some_and(|elapsed| elapsed >= age);
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                tracing::info!(path = %entry.path().display(), "removed a stale temporary file");
            }
        }
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Stage3Error::storage(format!("storage task failed: {e}"), true))?
}

#[async_trait]
impl ObjectStore for FsStore {
    async fn put(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<ObjectInfo> {
        let path = self.path_of(key)?;
        let size = bytes.len() as u64;
        let durable = is_durable(meta);
        blocking(move || write_atomically(&path, &bytes, durable)).await?;
        Ok(ObjectInfo { size, etag: None })
    }

    async fn put_new(&self, key: &str, bytes: Bytes, meta: ObjectMeta) -> Result<Created> {
        let path = self.path_of(key)?;
        let size = bytes.len() as u64;
        let durable = is_durable(meta);
        let created = blocking(move || create_atomically(&path, &bytes, durable)).await?;
        Ok(if created {
            Created::Created(ObjectInfo { size, etag: None })
        } else {
            Created::AlreadyExists
        })
    }

    async fn get(&self, key: &str, limit: u64) -> Result<Fetched> {
        let path = self.path_of(key)?;
        blocking(move || {
            let Some((file, size)) =
                open_no_symlink(&path).map_err(|e| io_error("read", &path, e))?
            else {
                return Ok(Fetched::Missing);
            };
            if size > limit {
                return Ok(Fetched::TooLarge { size });
            }
            let mut bytes = Vec::with_capacity(size as usize);
            // `take` also bounds a file that grows while it is read.
            file.take(limit + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| io_error("read", &path, e))?;
            if bytes.len() as u64 > limit {
                return Ok(Fetched::TooLarge {
                    size: bytes.len() as u64,
                });
            }
            Ok(Fetched::Found(Bytes::from(bytes)))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path_of(key)?;
        blocking(move || {
            Ok(open_no_symlink(&path)
                .map_err(|e| io_error("check", &path, e))?
                .map(|(_, size)| ObjectInfo { size, etag: None }))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let path = self.path_of(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove", &path, e)),
        }
    }

    fn location(&self, key: &str) -> String {
        self.root.join(key).to_string_lossy().into_owned()
    }

    fn public_key(&self, key: &str) -> String {
        key.to_string()
    }

    async fn presigned_url(&self, _key: &str) -> Result<Option<String>> {
        Ok(None)
    }

    async fn list_objects(&self, prefix: &str) -> Result<Vec<Listed>> {
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
    async fn an_object_dropped_from_the_page_cache_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let big: Bytes = (0..DROP_BEHIND_FROM_BYTES + 4099)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        store
            .put("big.png", big.clone(), ObjectMeta::PNG)
            .await
            .unwrap();
        let created = store.put_new("new.png", big.clone(), ObjectMeta::PNG).await;
        assert!(matches!(created, Ok(Created::Created(_))), "{created:?}");
        for key in ["big.png", "new.png"] {
            assert_eq!(
                store.get(key, big.len() as u64).await.unwrap(),
                Fetched::Found(big.clone())
            );
        }
    }

    #[tokio::test]
    async fn put_get_and_exists_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        assert!(!store.exists("a.png").await.unwrap());
        assert_eq!(store.get("a.png", 1024).await.unwrap(), Fetched::Missing);

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
            store.get("a.png", 1024).await.unwrap(),
            Fetched::Found(Bytes::from_static(b"two"))
        );
        assert_eq!(
            store.location("a.png"),
            dir.path()
                .canonicalize()
                .unwrap()
                .join("a.png")
                .to_string_lossy()
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
    async fn listed_objects_carry_the_files_own_time_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        store
            .put(
                "b/new.json",
                Bytes::from_static(b"12345"),
                ObjectMeta::RECORD,
            )
            .await
            .unwrap();
        store
            .put("b/old.json", Bytes::from_static(b"1"), ObjectMeta::RECORD)
            .await
            .unwrap();
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(dir.path().join("b/old.json"))
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();

        let listed = store.list_objects("b/").await.unwrap();
        let keys: Vec<&str> = listed.iter().map(|l| l.key.as_str()).collect();
        assert_eq!(keys, ["b/new.json", "b/old.json"], "in key order");
        assert_eq!((listed[0].size, listed[1].size), (5, 1));
        assert_eq!(listed[1].last_modified, an_hour_ago);
        let age = SystemTime::now()
            .duration_since(listed[0].last_modified)
            .unwrap_or_default();
        assert!(age < Duration::from_secs(60), "{age:?}");
        assert_eq!(store.list("b/").await.unwrap(), keys);
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

    #[tokio::test]
    async fn put_new_never_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        let first = store
            .put_new("a.png", Bytes::from_static(b"one"), ObjectMeta::PNG)
            .await
            .unwrap();
        assert!(matches!(
            first,
            Created::Created(ObjectInfo { size: 3, .. })
        ));
        let second = store
            .put_new("a.png", Bytes::from_static(b"two"), ObjectMeta::PNG)
            .await
            .unwrap();
        assert_eq!(second, Created::AlreadyExists);
        assert_eq!(
            store.get("a.png", 10).await.unwrap(),
            Fetched::Found(Bytes::from_static(b"one"))
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["a.png".to_string()]);
    }

    #[tokio::test]
    async fn reads_are_capped_and_refuse_symbolic_links() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        store
            .put(
                "big.json",
                Bytes::from(vec![b'x'; 2048]),
                ObjectMeta::RECORD,
            )
            .await
            .unwrap();
        assert_eq!(
            store.get("big.json", 1024).await.unwrap(),
            Fetched::TooLarge { size: 2048 }
        );

        let secret = dir.path().join("secret.txt");
        std::fs::write(&secret, b"top secret").unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&secret, dir.path().join("link.png")).unwrap();
            assert!(store.get("link.png", 1024).await.is_err());
            assert!(store.head("link.png").await.is_err());
        }
    }

    #[tokio::test]
    async fn a_relative_root_reports_absolute_paths() {
        let store = FsStore::new(Path::new(".")).unwrap();
        assert!(Path::new(&store.location("a.png")).is_absolute());
    }

    /// Sets `path`'s modification time an hour back: older than any write in progress.
    fn age(path: &Path) {
        let an_hour_ago = SystemTime::now() - Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(an_hour_ago)
            .unwrap();
    }

    #[test]
    fn stale_temporary_files_are_removed_and_fresh_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let stale = dir.path().join(".stage3-AbC123.part");
        let fresh = dir.path().join("sources/.stage3-XyZ789.part");
        std::fs::create_dir_all(fresh.parent().unwrap()).unwrap();
        std::fs::write(&stale, b"x").unwrap();
        std::fs::write(&fresh, b"x").unwrap();
        age(&stale);
        FsStore::new(dir.path()).unwrap();
        assert!(!stale.exists());
        assert!(fresh.exists());
    }

    #[test]
    fn stale_part_cleanup_takes_only_its_own_names_in_its_own_directories() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let plant = |relative: &str| {
            let path = root.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"someone's data").unwrap();
            age(&path);
            path
        };
        // The store's temporary names, in the directories it writes: stale, so removed.
        let ours: Vec<PathBuf> = [
            ".stage3-a1B2c3.part",
            "sources/.stage3-000000.part",
            "thumbnails/.stage3-zzzzzz.part",
            "stories/fox_tale/.stage3-Page01.part",
            "stories/fox_tale/batches/.stage3-Frag01.part",
        ]
        .into_iter()
        .map(plant)
        .collect();
        // Everything else, just as old: another name, or a directory the store never writes.
        let foreign: Vec<PathBuf> = [
            ".stage3-important.part",
            ".stage3-abc12.part",
            ".stage3-abc12!.part",
            ".stage3-abc123.part.bak",
            "x.stage3-abc123.part",
            ".stage3-abc123.tmp",
            "deep/.stage3-abc123.part",
            "deep/er/.stage3-important.part",
            "stories/.stage3-abc123.part",
            "stories/.hidden/.stage3-abc123.part",
            "stories/fox_tale/batches/old/.stage3-abc123.part",
            "stories/fox_tale/other/.stage3-abc123.part",
            "sources/nested/.stage3-abc123.part",
        ]
        .into_iter()
        .map(plant)
        .collect();
        // A directory with our name, and links that lead out of the root.
        std::fs::create_dir_all(root.join(".stage3-dirdir.part/inside")).unwrap();
        let target = outside.path().join(".stage3-target.part");
        std::fs::write(&target, b"not ours").unwrap();
        age(&target);
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&target, root.join(".stage3-link01.part")).unwrap();
            std::os::unix::fs::symlink(outside.path(), root.join("stories/linked")).unwrap();
        }

        FsStore::new(root).unwrap();

        for path in &ours {
            assert!(!path.exists(), "{} was left", path.display());
        }
        for path in &foreign {
            assert!(path.exists(), "{} was removed", path.display());
        }
        assert!(root.join(".stage3-dirdir.part/inside").is_dir());
        assert!(target.exists(), "a link was followed out of the root");
        #[cfg(unix)]
        assert!(std::fs::symlink_metadata(root.join(".stage3-link01.part")).is_ok());
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn stored_files_get_the_mode_of_a_file_written_normally() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        // A file created the ordinary way gets 0666 less the umask, whatever it is here.
        let ordinary = dir.path().join("ordinary");
        std::fs::write(&ordinary, b"x").unwrap();
        let expected = std::fs::metadata(&ordinary).unwrap().permissions().mode() & 0o777;
        store
            .put("a.png", Bytes::from_static(b"one"), ObjectMeta::PNG)
            .await
            .unwrap();
        store
            .put_new(
                "sources/b.png",
                Bytes::from_static(b"two"),
                ObjectMeta::SOURCE,
            )
            .await
            .unwrap();
        for key in ["a.png", "sources/b.png"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, expected, "{key}: {mode:o}, not {expected:o}");
        }
    }
}
