//! Lease fencing on the worker side.
//!
//! The control plane holds one lease per sandbox in its store (holder
//! worker, generation, expiry; see `store::leases`). Every runtime
//! operation it sends carries the lease's generation, and the worker keeps
//! the newest generation it has seen per sandbox: an operation carrying an
//! older one comes from a manager that lost the lease (a control plane
//! that was partitioned, a retry delayed past a reclaim) and is refused
//! with [`ProviderError::Fenced`]. Reclaiming a sandbox bumps the
//! generation, so after one operation at the new generation nothing from
//! before can touch the runtime again.
//!
//! What the worker has seen is kept in its data dir, one small file per
//! sandbox (`<generation>` or `<generation> retired <unix secs>`), so a
//! worker restarted with `kill -9` still refuses stale operations. A
//! destroyed sandbox leaves a tombstone for [`TOMBSTONE_KEEP`], so a
//! delayed spawn of it cannot bring the runtime back; tombstones older than
//! that are pruned, so the table is bounded by the live sandboxes plus an
//! hour of destroyed ones.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::provider::ProviderError;

/// How long a destroyed sandbox's generation is remembered. Longer than
/// any call's timeout (a spawn's is ten minutes), so no request sent
/// before the destroy can still arrive after its tombstone is gone.
pub const TOMBSTONE_KEEP: Duration = Duration::from_secs(3600);

/// Tombstones are pruned every this many retirements.
const PRUNE_EVERY: u64 = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    generation: u64,
    /// When the sandbox was destroyed here (a tombstone).
    retired_at: Option<SystemTime>,
}

/// What kind of operation asks to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Makes the runtime: refused on a tombstone unless the generation is
    /// newer than the one it was destroyed at.
    Spawn,
    /// Anything on an existing runtime (destroy included).
    Runtime,
}

/// The newest lease generation seen per sandbox.
#[derive(Debug)]
pub struct Fence {
    dir: Option<PathBuf>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    seen: HashMap<String, Seen>,
    retirements: u64,
}

impl Fence {
    /// A fence that forgets with the process (tests).
    pub fn in_memory() -> Fence {
        Fence {
            dir: None,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// The fence kept in `dir`, loading what a previous process saw and
    /// pruning old tombstones.
    pub fn open(dir: PathBuf) -> std::io::Result<Fence> {
        std::fs::create_dir_all(&dir)?;
        let mut seen = HashMap::new();
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !crate::ids::is_sandbox_id(&name) {
                continue; // a temporary file of an interrupted write
            }
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            match parse(&text) {
                Some(s) => {
                    seen.insert(name, s);
                }
                None => {
                    tracing::warn!(file = %entry.path().display(), "unreadable lease fence entry; ignored")
                }
            }
        }
        let fence = Fence {
            dir: Some(dir),
            inner: Mutex::new(Inner {
                seen,
                retirements: 0,
            }),
        };
        fence.prune(SystemTime::now());
        Ok(fence)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Lets an operation at `generation` pass, remembering the generation
    /// when it is the newest, or refuses it as fenced off. `Ok(true)` when
    /// this generation was seen before (by this process or an earlier one).
    pub fn admit(
        &self,
        sandbox_id: &str,
        generation: u64,
        operation: Operation,
    ) -> Result<bool, ProviderError> {
        check_id(sandbox_id)?;
        let mut inner = self.lock();
        let previous = inner.seen.get(sandbox_id).copied();
        if let Some(seen) = previous {
            if generation < seen.generation {
                return Err(ProviderError::Fenced(format!(
                    "lease generation {generation} of sandbox {sandbox_id} is stale: this worker has seen generation {}",
                    seen.generation
                )));
            }
            if operation == Operation::Spawn
                && seen.retired_at.is_some()
                && generation == seen.generation
            {
                return Err(ProviderError::Fenced(format!(
                    "sandbox {sandbox_id} was destroyed on this worker at lease generation {generation}"
                )));
            }
            if generation == seen.generation {
                return Ok(true);
            }
        }
        let now = Seen {
            generation,
            retired_at: None,
        };
        inner.seen.insert(sandbox_id.to_string(), now);
        // Written under the lock: two admits racing must not leave the
        // older generation on disk.
        self.persist(sandbox_id, now);
        drop(inner);
        Ok(false)
    }

    /// Records that the sandbox's runtime was destroyed at `generation`.
    pub fn retire(&self, sandbox_id: &str, generation: u64) {
        if check_id(sandbox_id).is_err() {
            return;
        }
        let now = SystemTime::now();
        let mut inner = self.lock();
        let generation = inner
            .seen
            .get(sandbox_id)
            .map_or(generation, |s| s.generation.max(generation));
        let seen = Seen {
            generation,
            retired_at: Some(now),
        };
        inner.seen.insert(sandbox_id.to_string(), seen);
        inner.retirements += 1;
        let prune = inner.retirements.is_multiple_of(PRUNE_EVERY);
        self.persist(sandbox_id, seen);
        drop(inner);
        if prune {
            self.prune(now);
        }
    }

    /// The newest generation seen for a sandbox.
    pub fn generation(&self, sandbox_id: &str) -> Option<u64> {
        self.lock().seen.get(sandbox_id).map(|s| s.generation)
    }

    /// How many sandboxes the fence remembers (live and tombstones).
    pub fn len(&self) -> usize {
        self.lock().seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets tombstones older than [`TOMBSTONE_KEEP`] at `now`.
    fn prune(&self, now: SystemTime) {
        let old: Vec<String> = {
            let mut inner = self.lock();
            let old: Vec<String> = inner
                .seen
                .iter()
                .filter(|(_, s)| {
                    s.retired_at.is_some_and(|at| {
                        now.duration_since(at).unwrap_or_default() >= TOMBSTONE_KEEP
                    })
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in &old {
                inner.seen.remove(id);
            }
            old
        };
        if let Some(dir) = &self.dir {
            for id in old {
                if let Err(e) = std::fs::remove_file(dir.join(&id)) {
                    tracing::warn!(sandbox = %id, error = %e, "cannot remove an old lease tombstone (best effort)");
                }
            }
        }
    }

    /// Writes one entry (temporary file and rename, so a crash leaves the
    /// old entry or the new one). Called with the lock held, so writes of
    /// one entry never interleave. Best effort: a failure is logged, and
    /// the fence in memory still holds for this process.
    fn persist(&self, sandbox_id: &str, seen: Seen) {
        let Some(dir) = &self.dir else { return };
        let text = match seen.retired_at {
            None => format!("{}\n", seen.generation),
            Some(at) => format!(
                "{} retired {}\n",
                seen.generation,
                at.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
            ),
        };
        let tmp = dir.join(format!(".{sandbox_id}.tmp"));
        let result =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, dir.join(sandbox_id)));
        if let Err(e) = result {
            tracing::warn!(sandbox = %sandbox_id, error = %e, "cannot persist the lease generation (best effort)");
        }
    }
}

fn check_id(sandbox_id: &str) -> Result<(), ProviderError> {
    if crate::ids::is_sandbox_id(sandbox_id) {
        Ok(())
    } else {
        Err(ProviderError::InvalidRequest(format!(
            "not a sandbox id: {:?}",
            sandbox_id.chars().take(64).collect::<String>()
        )))
    }
}

fn parse(text: &str) -> Option<Seen> {
    let mut words = text.split_whitespace();
    let generation = words.next()?.parse().ok()?;
    let retired_at = match (words.next(), words.next()) {
        (None, _) => None,
        (Some("retired"), Some(secs)) => Some(UNIX_EPOCH + Duration::from_secs(secs.parse().ok()?)),
        _ => return None,
    };
    Some(Seen {
        generation,
        retired_at,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> String {
        let mut id = crate::ids::sandbox();
        id.pop();
        id.push(char::from(b'a' + n));
        id
    }

    #[test]
    fn an_older_generation_is_refused_and_a_newer_one_moves_the_fence() {
        let fence = Fence::in_memory();
        let sb = id(0);
        assert!(!fence.admit(&sb, 1, Operation::Spawn).unwrap());
        assert!(fence.admit(&sb, 1, Operation::Runtime).unwrap());
        assert!(!fence.admit(&sb, 3, Operation::Runtime).unwrap());
        let err = fence.admit(&sb, 2, Operation::Runtime).unwrap_err();
        assert!(matches!(err, ProviderError::Fenced(_)), "{err:?}");
        assert!(err.to_string().contains("generation 3"), "{err}");
        assert_eq!(fence.generation(&sb), Some(3));
        // Other sandboxes are not affected.
        fence.admit(&id(1), 1, Operation::Runtime).unwrap();
    }

    #[test]
    fn a_destroyed_sandbox_refuses_a_late_spawn_at_its_generation() {
        let fence = Fence::in_memory();
        let sb = id(2);
        fence.admit(&sb, 1, Operation::Spawn).unwrap();
        fence.retire(&sb, 2);
        let late = fence.admit(&sb, 1, Operation::Spawn).unwrap_err();
        assert!(matches!(late, ProviderError::Fenced(_)), "{late:?}");
        let same = fence.admit(&sb, 2, Operation::Spawn).unwrap_err();
        assert!(same.to_string().contains("destroyed"), "{same}");
        // A retried destroy at the same generation passes (idempotent).
        fence.admit(&sb, 2, Operation::Runtime).unwrap();
    }

    #[test]
    fn what_was_seen_survives_a_restart_and_old_tombstones_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let (live, gone, old) = (id(3), id(4), id(5));
        {
            let fence = Fence::open(dir.path().to_path_buf()).unwrap();
            fence.admit(&live, 4, Operation::Spawn).unwrap();
            fence.admit(&gone, 1, Operation::Spawn).unwrap();
            fence.retire(&gone, 1);
        }
        // A tombstone from two hours ago, as a previous process left it.
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        let secs = two_hours_ago.duration_since(UNIX_EPOCH).unwrap().as_secs();
        std::fs::write(dir.path().join(&old), format!("7 retired {secs}\n")).unwrap();
        std::fs::write(dir.path().join("junk"), "x").unwrap();

        let fence = Fence::open(dir.path().to_path_buf()).unwrap();
        assert!(matches!(
            fence.admit(&live, 3, Operation::Runtime),
            Err(ProviderError::Fenced(_))
        ));
        assert!(matches!(
            fence.admit(&gone, 1, Operation::Spawn),
            Err(ProviderError::Fenced(_))
        ));
        assert_eq!(fence.generation(&old), None, "old tombstone kept");
        assert!(!dir.path().join(&old).exists());
        assert_eq!(fence.len(), 2);
    }

    #[test]
    fn a_path_is_not_a_sandbox_id() {
        let fence = Fence::in_memory();
        let err = fence
            .admit("../../etc/passwd", 1, Operation::Spawn)
            .unwrap_err();
        assert!(matches!(err, ProviderError::InvalidRequest(_)), "{err:?}");
    }
}
