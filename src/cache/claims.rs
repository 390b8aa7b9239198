//! Claims: one worker pays for a scene, the others wait for its result.
//!
//! Before generating, a worker creates `{scene}-{hash16}.claim` with an atomic create
//! ([`claim`]); a worker that finds it taken waits for the holder's record
//! ([`Shelf::claim_or_wait`]). The holder renews its short lease while it works and releases
//! it when done ([`Shelf::while_held`]). A lapsed claim, or one whose holder is known to be
//! gone, is taken over. Stores that ignore conditional writes (Garage, Qiniu) let both
//! workers generate, which costs money but never correctness.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{ResultKeys, Shelf, MAX_RECORD_BYTES};
use crate::batch_stop::BatchStop;
use crate::error::{Result, Stage3Error};
use crate::storage::{self, Created, Fetched, ObjectMeta, ObjectStore};

/// How often a waiting worker looks for the holder's result.
const CLAIM_POLL: Duration = Duration::from_secs(1);

/// How long a claim holds, and how often its holder renews it while it works.
///
/// The lease is short and renewed, rather than sized to a worst case: a generation's
/// length has no useful bound (fallback models, Retry-After pauses, waits for a permit),
/// and a short lease lets a dead worker's scene be taken over within minutes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimTiming {
    pub ttl: Duration,
    pub renew_every: Duration,
}

impl Default for ClaimTiming {
    fn default() -> Self {
        ClaimTiming {
            ttl: Duration::from_secs(120),
            renew_every: Duration::from_secs(40),
        }
    }
}

/// The furthest expiry a claim may state: the longest lease any version of stage3 wrote
/// (30 minutes) plus a minute of clock skew. A claim that says later is garbage — a
/// neighbour's edit or a broken clock — and would otherwise block its scene for good.
pub(crate) const MAX_CLAIM_EXPIRY: Duration = Duration::from_secs(31 * 60);

/// A worker's claim on a request it is generating.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClaimBody {
    owner: String,
    expires_at_ms: u64,
    /// The machine (its boot id), PID namespace, host name and process that hold the
    /// claim, so a run in the same process table can see that the holder died (an aborted
    /// CLI run) instead of waiting out the lease.
    #[serde(default)]
    boot_id: Option<String>,
    #[serde(default)]
    pid_namespace: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
}

impl ClaimBody {
    fn new(owner: &str, ttl: Duration) -> Self {
        let here = Holder::here();
        ClaimBody {
            owner: owner.to_owned(),
            expires_at_ms: now_ms().saturating_add(ttl.as_millis() as u64),
            boot_id: here.boot_id.clone(),
            pid_namespace: here.pid_namespace.clone(),
            host: here.host.clone(),
            pid: Some(std::process::id()),
        }
    }

    fn to_bytes(&self) -> Bytes {
        // A struct of strings and numbers always serialises.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// Whether the holder is known to be gone: it ran in this very process table (same
    /// boot, same PID namespace, same host name) and its process no longer exists.
    /// Containers on one host share the boot id and may reuse PIDs, so without all three
    /// the holder is presumed alive.
    fn holder_is_gone(&self) -> bool {
        let here = Holder::here();
        let same_table = |theirs: &Option<String>, ours: &Option<String>| matches!((theirs, ours), (Some(theirs), Some(ours)) if theirs == ours);
        if !(same_table(&self.boot_id, &here.boot_id)
            && same_table(&self.pid_namespace, &here.pid_namespace)
            && same_table(&self.host, &here.host))
        {
            return false;
        }
        match self.pid {
            Some(pid) => pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists(),
            None => false,
        }
    }

    /// Whether the claim still holds at `now_ms`: unexpired, and its expiry no further
    /// away than any lease we grant (see [`MAX_CLAIM_EXPIRY`]).
    fn holds_at(&self, now_ms: u64) -> bool {
        let furthest = now_ms.saturating_add(MAX_CLAIM_EXPIRY.as_millis() as u64);
        self.expires_at_ms > now_ms && self.expires_at_ms <= furthest
    }
}

/// Where this process runs, as far as Linux tells: each part is `None` elsewhere.
struct Holder {
    boot_id: Option<String>,
    pid_namespace: Option<String>,
    host: Option<String>,
}

impl Holder {
    /// Read once per process: every claim, renewal and check of a holder asks, and none
    /// of the three changes while the process runs.
    fn here() -> &'static Holder {
        static HERE: std::sync::OnceLock<Holder> = std::sync::OnceLock::new();
        HERE.get_or_init(Holder::read)
    }

    fn read() -> Holder {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|text| !text.is_empty())
        };
        Holder {
            boot_id: read("/proc/sys/kernel/random/boot_id"),
            // `pid:[4026531836]`: the namespace's inode, distinct per container.
            pid_namespace: std::fs::read_link("/proc/self/ns/pid")
                .ok()
                .map(|link| link.to_string_lossy().into_owned()),
            host: read("/proc/sys/kernel/hostname"),
        }
    }
}

/// The proof that this worker holds a claim: its random owner token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClaimLease {
    owner: String,
}

/// The answer to [`claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Claim {
    /// This worker holds the claim and generates the scene.
    Owned(ClaimLease),
    /// Another worker does; its claim lapses in `expires_in` unless it finishes first.
    HeldElsewhere { expires_in: Duration },
}

/// Tries to become the one worker generating this request. A lapsed claim (its worker died),
/// or one whose expiry is further than any lease we grant, is taken over.
pub(crate) async fn claim(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    ttl: Duration,
) -> Result<Claim> {
    let lease = ClaimLease {
        owner: format!("{:016x}", fastrand::u64(..)),
    };
    let body = ClaimBody::new(&lease.owner, ttl);
    if let Created::Created(_) = store
        .put_new(&keys.claim, body.to_bytes(), ObjectMeta::CLAIM)
        .await?
    {
        return Ok(Claim::Owned(lease));
    }
    let now = now_ms();
    match read_claim(store, keys).await? {
        Some(other) if other.holds_at(now) && !other.holder_is_gone() => Ok(Claim::HeldElsewhere {
            expires_in: Duration::from_millis(other.expires_at_ms.saturating_sub(now)),
        }),
        _ => {
            // Lapsed, its holder died, released in between, or garbage: take it. Two
            // workers doing this at once both generate, which costs money, never
            // correctness.
            store
                .put(&keys.claim, body.to_bytes(), ObjectMeta::CLAIM)
                .await?;
            Ok(Claim::Owned(lease))
        }
    }
}

/// Extends a claim this worker still holds by `ttl` from now. `false` when it is no longer
/// ours (it lapsed and another worker took it over): the caller goes on, and both pay.
pub(crate) async fn renew(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    lease: &ClaimLease,
    ttl: Duration,
) -> Result<bool> {
    match read_claim(store, keys).await? {
        Some(held) if held.owner == lease.owner => {
            let body = ClaimBody::new(&lease.owner, ttl);
            store
                .put(&keys.claim, body.to_bytes(), ObjectMeta::CLAIM)
                .await?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Gives up a claim, so waiting workers stop waiting — only while it is still this
/// worker's: a claim another worker took over after ours lapsed is theirs to release.
pub(crate) async fn release(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    lease: &ClaimLease,
) -> Result<()> {
    match read_claim(store, keys).await? {
        Some(held) if held.owner == lease.owner => store.delete(&keys.claim).await,
        _ => Ok(()),
    }
}

/// The stored claim, or `None` when there is none or it is not one of ours.
async fn read_claim(store: &dyn ObjectStore, keys: &ResultKeys) -> Result<Option<ClaimBody>> {
    Ok(match store.get(&keys.claim, MAX_RECORD_BYTES).await? {
        Fetched::Found(bytes) => serde_json::from_slice::<ClaimBody>(&bytes).ok(),
        Fetched::Missing | Fetched::TooLarge { .. } => None,
    })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// What claiming a scene came to.
pub(crate) enum Turn<T> {
    /// This worker holds the claim and generates the scene ([`Shelf::while_held`]).
    Ours(ClaimLease),
    /// Another worker's result, stored while this one waited: nothing to pay.
    Served(T),
}

impl Shelf<'_> {
    /// Claims the scene under `keys` for this worker. While another worker holds it, waits,
    /// looking for that worker's result with `look_again` every second, until the result
    /// appears, the claim lapses or is released (then it is ours), `stop` fires, or the
    /// deadline would leave less than `reserve` after the next wait: the scene is not paid
    /// for twice at the last moment.
    pub(crate) async fn claim_or_wait<T, F, Fut>(
        &self,
        keys: &ResultKeys,
        timing: ClaimTiming,
        stop: Option<&BatchStop>,
        reserve: Duration,
        mut look_again: F,
    ) -> Result<Turn<T>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        loop {
            let claimed = self
                .call("claiming the scene", || claim(self.store, keys, timing.ttl))
                .await?;
            let expires_in = match claimed {
                Claim::Owned(lease) => return Ok(Turn::Ours(lease)),
                Claim::HeldElsewhere { expires_in } => expires_in,
            };
            // A stopped batch (Ctrl-C, spent budget) does not wait either.
            if let Some(stop) = stop {
                stop.check()?;
            }
            let wait = CLAIM_POLL.min(expires_in);
            if !self.deadline.allows(wait + reserve) {
                return Err(Stage3Error::DeadlineExceeded(
                    "another worker is generating this scene and the deadline is near; \
                     not paying for it twice"
                        .into(),
                ));
            }
            tracing::info!("another worker is generating this scene; waiting for its result");
            tokio::time::sleep(wait).await;
            if let Some(result) = look_again().await? {
                return Ok(Turn::Served(result));
            }
        }
    }

    /// Runs `work` while holding the claim `lease` — renewed every `timing.renew_every`,
    /// however long the work takes (fallback models, Retry-After pauses, a wait for a
    /// permit) — then releases it so waiting workers look for the record, or, on failure,
    /// try themselves. Not past the deadline, though: an unreleased claim lapses by itself.
    pub(crate) async fn while_held<T>(
        &self,
        keys: &ResultKeys,
        lease: ClaimLease,
        timing: ClaimTiming,
        work: impl Future<Output = T>,
    ) -> T {
        let outcome = tokio::select! {
            biased;
            outcome = work => outcome,
            never = keep(self.store, keys, &lease, timing) => match never {},
        };
        let released = self
            .deadline
            .run(
                storage::CALL_TIMEOUT,
                "releasing the claim",
                release(self.store, keys, &lease),
            )
            .await;
        if let Err(e) = released {
            tracing::warn!(error = %e, "could not release the claim; it lapses by itself");
        }
        outcome
    }
}

/// Renews the claim while its work runs; runs until dropped. A claim lost to another
/// worker (ours lapsed, say while storage was unreachable) is left to it: both generate,
/// which costs money, never correctness.
async fn keep(
    store: &dyn ObjectStore,
    keys: &ResultKeys,
    lease: &ClaimLease,
    timing: ClaimTiming,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(timing.renew_every).await;
        let renewal = renew(store, keys, lease, timing.ttl);
        match tokio::time::timeout(storage::CALL_TIMEOUT.min(timing.renew_every), renewal).await {
            Ok(Ok(true)) => tracing::debug!("claim renewed"),
            Ok(Ok(false)) => {
                tracing::warn!("the claim lapsed and another worker took it over");
                return std::future::pending().await;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "could not renew the claim"),
            Err(_) => tracing::warn!("renewing the claim timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::tests::{hash, spec};

    /// The keys of the scene the tests claim (the cache tests' request).
    fn keys(prompt: &str) -> ResultKeys {
        ResultKeys::new("s", &hash(&spec(prompt)))
    }

    async fn plant(store: &crate::storage::MemoryStore, keys: &ResultKeys, body: &ClaimBody) {
        store
            .put(&keys.claim, body.to_bytes(), ObjectMeta::CLAIM)
            .await
            .unwrap();
    }

    async fn stored_claim(store: &crate::storage::MemoryStore, keys: &ResultKeys) -> ClaimBody {
        read_claim(store, keys)
            .await
            .unwrap()
            .expect("a claim is stored")
    }

    fn owned(claim: Claim) -> ClaimLease {
        match claim {
            Claim::Owned(lease) => lease,
            other => panic!("expected to own the claim, got {other:?}"),
        }
    }

    fn someone_elses(expires_at_ms: u64) -> ClaimBody {
        ClaimBody {
            owner: "elsewhere".into(),
            expires_at_ms,
            boot_id: None,
            pid_namespace: None,
            host: None,
            pid: None,
        }
    }

    #[tokio::test]
    async fn a_second_claim_waits_and_a_lapsed_one_is_taken_over() {
        let store = crate::storage::MemoryStore::new();
        let keys = keys("a");
        let ttl = Duration::from_secs(60);
        let first = owned(claim(&store, &keys, ttl).await.unwrap());
        let second = claim(&store, &keys, ttl).await.unwrap();
        assert!(matches!(second, Claim::HeldElsewhere { expires_in } if expires_in <= ttl));
        release(&store, &keys, &first).await.unwrap();
        owned(claim(&store, &keys, ttl).await.unwrap());

        // A claim whose worker died lapses.
        plant(&store, &keys, &someone_elses(now_ms() - 1)).await;
        owned(claim(&store, &keys, ttl).await.unwrap());
    }

    #[tokio::test]
    async fn a_claim_expiring_beyond_any_lease_is_garbage() {
        let store = crate::storage::MemoryStore::new();
        let keys = keys("a");
        // A year ahead: a neighbour's edit, or a writer with a broken clock.
        plant(&store, &keys, &someone_elses(now_ms() + 365 * 86_400_000)).await;
        owned(claim(&store, &keys, Duration::from_secs(60)).await.unwrap());
        // The longest lease any version granted still holds.
        let thirty_minutes = now_ms() + 30 * 60_000;
        plant(&store, &keys, &someone_elses(thirty_minutes)).await;
        let waits = claim(&store, &keys, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(waits, Claim::HeldElsewhere { .. }), "{waits:?}");
    }

    #[tokio::test]
    async fn only_the_holder_renews_or_releases_its_claim() {
        let store = crate::storage::MemoryStore::new();
        let keys = keys("a");
        let ours = owned(claim(&store, &keys, Duration::from_secs(1)).await.unwrap());
        let before = stored_claim(&store, &keys).await.expires_at_ms;
        assert!(renew(&store, &keys, &ours, Duration::from_secs(120))
            .await
            .unwrap());
        let after = stored_claim(&store, &keys).await.expires_at_ms;
        assert!(
            after >= before + 100_000,
            "renewed to {after}, was {before}"
        );

        // Our lease lapsed and another worker took the scene over: it is theirs now.
        plant(&store, &keys, &someone_elses(now_ms() + 60_000)).await;
        assert!(!renew(&store, &keys, &ours, Duration::from_secs(120))
            .await
            .unwrap());
        release(&store, &keys, &ours).await.unwrap();
        assert_eq!(stored_claim(&store, &keys).await.owner, "elsewhere");
    }

    #[tokio::test]
    async fn a_dead_holder_in_this_process_table_is_gone_at_once() {
        let store = crate::storage::MemoryStore::new();
        let keys = keys("a");
        let here = Holder::here();
        if here.boot_id.is_none() || here.pid_namespace.is_none() || here.host.is_none() {
            return; // not Linux: holders are never known to be gone
        }
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead_pid = child.id();
        child.wait().unwrap();
        let orphaned = ClaimBody {
            owner: "aborted".into(),
            expires_at_ms: now_ms() + 600_000,
            boot_id: here.boot_id.clone(),
            pid_namespace: here.pid_namespace.clone(),
            host: here.host.clone(),
            pid: Some(dead_pid),
        };
        plant(&store, &keys, &orphaned).await;
        owned(claim(&store, &keys, Duration::from_secs(60)).await.unwrap());

        // The same boot id in another container — another PID namespace, another host
        // name — says nothing about that PID here: the holder is presumed alive.
        let next_door = ClaimBody {
            pid_namespace: Some("pid:[4026532999]".into()),
            host: Some("worker-2".into()),
            ..orphaned.clone()
        };
        plant(&store, &keys, &next_door).await;
        let waits = claim(&store, &keys, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(waits, Claim::HeldElsewhere { .. }), "{waits:?}");
        // Nor does a claim from before the namespace was recorded.
        let older = ClaimBody {
            pid_namespace: None,
            host: None,
            ..orphaned
        };
        plant(&store, &keys, &older).await;
        let waits = claim(&store, &keys, Duration::from_secs(60)).await.unwrap();
        assert!(matches!(waits, Claim::HeldElsewhere { .. }), "{waits:?}");
    }
}
