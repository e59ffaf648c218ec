//! Runtime certification: the host checks the architecture reference asks
//! for before a provider runs strangers' code (`stacyvm certify`).
//!
//! Each provider is taken through what a sandbox's life needs, one timed
//! check at a time: its backend answers (binary, daemon, kernel), the
//! host checks it adds itself ([`Provider::host_checks`]: KVM access for
//! the microVMs), a spawn (for a VM: a boot to its agent's handshake), an
//! exec, a binary-safe file round trip, network isolation (a server on
//! the host's loopback that the sandbox must not reach), and a destroy
//! that leaves no runtime and no host process behind. A provider is
//! certified when every required check passed. The result is kept in the
//! data dir (`certification.json`, per provider) and shown by
//! `/api/v1/providers`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::{Capability, ExecExit, ExecSpec, Provider, RuntimeStatus, SpawnSpec};

/// The file certifications are kept in, in the data dir.
pub const FILE: &str = "certification.json";

/// What is checked.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The backend answers: its binary runs, its daemon or kernel is there.
    Health,
    /// The runtime's binary runs: its path and version (microVMs).
    Binary,
    /// `/dev/kvm` opens and guests may use it (microVMs).
    Kvm,
    /// The guest kernel, its modules and the initramfs (microVMs).
    Kernel,
    /// An image to certify with.
    Image,
    /// A sandbox is made (a VM boots to its agent).
    Spawn,
    Exec,
    /// Binary content written and read back unchanged.
    Files,
    /// A server on the host's loopback is not reached from inside.
    NetworkIsolation,
    /// Nothing is left: no runtime in the inventory, no host process.
    Destroy,
    /// A spawn restored from a snapshot.
    SnapshotRestore,
}

impl CheckKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckKind::Health => "health",
            CheckKind::Binary => "binary",
            CheckKind::Kvm => "kvm",
            CheckKind::Kernel => "kernel",
            CheckKind::Image => "image",
            CheckKind::Spawn => "spawn",
            CheckKind::Exec => "exec",
            CheckKind::Files => "files",
            CheckKind::NetworkIsolation => "network_isolation",
            CheckKind::Destroy => "destroy",
            CheckKind::SnapshotRestore => "snapshot_restore",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum CheckStatus {
    Pass,
    Fail,
    /// Not run: not offered by this provider, or an earlier step failed.
    Skip,
}

/// One check and how it went.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Check {
    pub check: CheckKind,
    pub status: CheckStatus,
    /// Whether a failure denies the certification.
    pub required: bool,
    pub millis: u64,
    pub detail: String,
}

impl Check {
    pub fn new(
        check: CheckKind,
        required: bool,
        took: Duration,
        result: Result<String, String>,
    ) -> Check {
        let (status, detail) = match result {
            Ok(detail) => (CheckStatus::Pass, detail),
            Err(detail) => (CheckStatus::Fail, detail),
        };
        Check {
            check,
            status,
            required,
            millis: took.as_millis() as u64,
            detail,
        }
    }

    fn skip(check: CheckKind, detail: impl Into<String>) -> Check {
        Check {
            check,
            status: CheckStatus::Skip,
            required: false,
            millis: 0,
            detail: detail.into(),
        }
    }
}

/// One provider's certification.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Certification {
    pub provider: String,
    /// Every required check passed.
    pub certified: bool,
    pub at: DateTime<Utc>,
    pub checks: Vec<Check>,
}

impl Certification {
    /// The required checks that did not pass.
    pub fn failed(&self) -> Vec<CheckKind> {
        self.checks
            .iter()
            .filter(|c| c.required && c.status != CheckStatus::Pass)
            .map(|c| c.check)
            .collect()
    }
}

/// Certifies `provider` with a sandbox of `image` (the first of `images`
/// it has); the sandbox is destroyed at the end whatever happened.
pub async fn certify(provider: &Arc<dyn Provider>, images: &[String]) -> Certification {
    let mut checks = Vec::new();
    let timed = Instant::now();
    let health = provider
        .health()
        .await
        .map(|()| "the backend answers".to_string())
        .map_err(|e| e.to_string());
    let healthy = health.is_ok();
    checks.push(Check::new(CheckKind::Health, true, timed.elapsed(), health));
    checks.extend(provider.host_checks().await);
    if healthy {
        run_sandbox_checks(provider, images, &mut checks).await;
    } else {
        for kind in [
            CheckKind::Image,
            CheckKind::Spawn,
            CheckKind::Exec,
            CheckKind::Files,
            CheckKind::NetworkIsolation,
            CheckKind::Destroy,
        ] {
            checks.push(Check {
                required: true,
                ..Check::skip(kind, "the backend does not answer")
            });
        }
    }
    if !checks.iter().any(|c| c.check == CheckKind::SnapshotRestore) {
        let why = if provider
            .capabilities()
            .contains(&Capability::SnapshotRestore)
        {
            "no sandbox was made to snapshot"
        } else {
            "this provider restores no snapshots"
        };
        checks.push(Check::skip(CheckKind::SnapshotRestore, why));
    }
    let certified = checks
        .iter()
        .all(|c| !c.required || c.status == CheckStatus::Pass);
    Certification {
        provider: provider.name().to_string(),
        certified,
        at: Utc::now(),
        checks,
    }
}

async fn run_sandbox_checks(
    provider: &Arc<dyn Provider>,
    images: &[String],
    checks: &mut Vec<Check>,
) {
    let started = Instant::now();
    let mut image = None;
    for candidate in images {
        if provider.image_available(candidate).await.unwrap_or(false) {
            image = Some(candidate.clone());
            break;
        }
    }
    let Some(image) = image else {
        checks.push(Check::new(
            CheckKind::Image,
            true,
            started.elapsed(),
            Err(format!(
                "none of {images:?} is available: import one (`stacyvm image import`) or pass --image"
            )),
        ));
        skip_the_rest(checks, CheckKind::Spawn, "no image to spawn from");
        return;
    };
    checks.push(Check::new(
        CheckKind::Image,
        true,
        started.elapsed(),
        Ok(image.clone()),
    ));
    let sandbox_id = format!("cert-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let spec = SpawnSpec {
        sandbox_id: sandbox_id.clone(),
        image,
        memory_mb: 256,
        vcpus: 1,
        disk_mb: 512,
    };
    let started = Instant::now();
    let runtime = match within(SPAWN_TIMEOUT, "the spawn", provider.spawn(&spec)).await {
        Ok(handle) => {
            checks.push(Check::new(
                CheckKind::Spawn,
                true,
                started.elapsed(),
                Ok(format!("runtime {}", handle.runtime_id)),
            ));
            handle.runtime_id
        }
        Err(e) => {
            checks.push(Check::new(
                CheckKind::Spawn,
                true,
                started.elapsed(),
                Err(e.to_string()),
            ));
            // Whatever a failed spawn left is the provider's to remove.
            crate::provider::best_effort(
                "removing a failed certification spawn",
                provider.destroy_by_sandbox_id(&sandbox_id).await,
            );
            skip_the_rest(checks, CheckKind::Exec, "the spawn failed");
            return;
        }
    };
    let started = Instant::now();
    let exec = run(provider, &runtime, &["echo", "stacyvm-certify"])
        .await
        .and_then(|(exit, out)| {
            if exit == ExecExit::Exited(0) && out == "stacyvm-certify\n" {
                Ok("echo ran and its output came back".to_string())
            } else {
                Err(format!("echo ended {exit:?} with {out:?}"))
            }
        });
    checks.push(Check::new(CheckKind::Exec, true, started.elapsed(), exec));
    let started = Instant::now();
    let round_trip = tokio::time::timeout(STEP_TIMEOUT, files(provider, &runtime))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the round trip did not finish within {STEP_TIMEOUT:?}"
            ))
        });
    checks.push(Check::new(
        CheckKind::Files,
        true,
        started.elapsed(),
        round_trip,
    ));
    let started = Instant::now();
    let isolated = provider
        .capabilities()
        .contains(&Capability::NetworkIsolation);
    let network = network_isolation(provider, &runtime).await;
    match network {
        Some(result) => checks.push(Check::new(
            CheckKind::NetworkIsolation,
            isolated,
            started.elapsed(),
            result,
        )),
        None => checks.push(Check::skip(
            CheckKind::NetworkIsolation,
            "the image has neither nc nor wget to try with",
        )),
    }
    let started = Instant::now();
    let destroyed = tokio::time::timeout(STEP_TIMEOUT, destroy(provider, &runtime, &sandbox_id))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "the destroy did not finish within {STEP_TIMEOUT:?}"
            ))
        });
    if destroyed.is_err() {
        // Nothing of a certification may stay behind: one more try.
        crate::provider::best_effort(
            "removing the certification's sandbox",
            within(
                STEP_TIMEOUT,
                "removing the sandbox",
                provider.destroy_by_sandbox_id(&sandbox_id),
            )
            .await,
        );
    }
    checks.push(Check::new(
        CheckKind::Destroy,
        true,
        started.elapsed(),
        destroyed,
    ));
    if provider
        .capabilities()
        .contains(&Capability::SnapshotRestore)
    {
        let started = Instant::now();
        let restored = snapshot_restore(provider, &spec).await;
        // Not required: a spawn that boots afresh is slower, not unsafe.
        checks.push(Check::new(
            CheckKind::SnapshotRestore,
            false,
            started.elapsed(),
            restored,
        ));
    }
}

/// A second sandbox of the first's image and shape: its spawn restores
/// from the snapshot the first one's boot left, and it runs a command.
async fn snapshot_restore(
    provider: &Arc<dyn Provider>,
    first: &SpawnSpec,
) -> Result<String, String> {
    let sandbox_id = format!("cert-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let spec = SpawnSpec {
        sandbox_id: sandbox_id.clone(),
        ..first.clone()
    };
    let spawned = Instant::now();
    let runtime = within(SPAWN_TIMEOUT, "the second spawn", provider.spawn(&spec))
        .await
        .map_err(|e| format!("the second spawn failed: {e}"));
    let took = spawned.elapsed();
    let result = match &runtime {
        Ok(handle) => {
            let how = provider
                .logs(&handle.runtime_id, 5)
                .await
                .unwrap_or_default()
                .join("\n");
            match run(provider, &handle.runtime_id, &["echo", "restored"]).await {
                Ok((ExecExit::Exited(0), out)) if out == "restored\n" => {
                    if how.contains("restored from a snapshot") {
                        Ok(format!(
                            "a second spawn restored from the first one's snapshot in {:.2} s and ran echo",
                            took.as_secs_f64()
                        ))
                    } else {
                        Err(format!(
                            "the second spawn booted afresh (no snapshot was kept: see the server's log): {how}"
                        ))
                    }
                }
                other => Err(format!("the restored sandbox's echo ended {other:?}")),
            }
        }
        Err(e) => Err(e.clone()),
    };
    crate::provider::best_effort(
        "removing the certification's second sandbox",
        within(
            STEP_TIMEOUT,
            "removing the sandbox",
            provider.destroy_by_sandbox_id(&sandbox_id),
        )
        .await,
    );
    result
}

/// How long a spawn (a VM's boot) may take.
const SPAWN_TIMEOUT: Duration = Duration::from_secs(600);

/// How long any other step may take.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

async fn within<T>(
    limit: Duration,
    what: &str,
    step: impl std::future::Future<Output = super::ProviderResult<T>>,
) -> super::ProviderResult<T> {
    tokio::time::timeout(limit, step).await.unwrap_or_else(|_| {
        Err(super::ProviderError::Unavailable(format!(
            "{what} did not finish within {limit:?}"
        )))
    })
}

/// Skip rows for the required checks from `first` on.
fn skip_the_rest(checks: &mut Vec<Check>, first: CheckKind, why: &str) {
    for kind in [
        CheckKind::Spawn,
        CheckKind::Exec,
        CheckKind::Files,
        CheckKind::NetworkIsolation,
        CheckKind::Destroy,
    ]
    .into_iter()
    .skip_while(|k| *k != first)
    {
        checks.push(Check {
            required: true,
            ..Check::skip(kind, why)
        });
    }
}

async fn run(
    provider: &Arc<dyn Provider>,
    runtime: &str,
    argv: &[&str],
) -> Result<(ExecExit, String), String> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<super::OutputChunk>(16);
    let spec = ExecSpec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: Default::default(),
        workdir: None,
        timeout: Duration::from_secs(30),
    };
    let collect = async {
        let mut out = Vec::new();
        while let Some(chunk) = rx.recv().await {
            if chunk.stream == super::StreamKind::Stdout && out.len() < 1 << 20 {
                out.extend_from_slice(&chunk.data);
            }
        }
        out
    };
    let (exit, out) = tokio::join!(provider.exec(runtime, &spec, tx), collect);
    let exit = exit.map_err(|e| e.to_string())?;
    Ok((exit, String::from_utf8_lossy(&out).into_owned()))
}

async fn files(provider: &Arc<dyn Provider>, runtime: &str) -> Result<String, String> {
    let path = "/tmp/stacyvm-certify.bin";
    // Every byte value, then a random tail.
    let mut content: Vec<u8> = (0..=255u8).cycle().take(64 << 10).collect();
    content.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
    let content = Bytes::from(content);
    provider
        .write_file(runtime, path, content.clone(), 0o600)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let back = provider
        .read_file(runtime, path)
        .await
        .map_err(|e| format!("read: {e}"))?;
    if back != content {
        return Err(format!(
            "{} bytes written, {} different bytes read back",
            content.len(),
            back.len()
        ));
    }
    provider
        .delete_file(runtime, path, false)
        .await
        .map_err(|e| format!("delete: {e}"))?;
    Ok(format!(
        "{} bytes (every byte value) written, read back unchanged, deleted",
        content.len()
    ))
}

/// The host's own IPv4 addresses (loopback and every interface's: a
/// sandbox on a bridge reaches the host on its bridge address).
fn host_addresses() -> Vec<std::net::Ipv4Addr> {
    let mut found = vec![std::net::Ipv4Addr::LOCALHOST];
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below; each entry is read
    // only while the list lives.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return found;
        }
        let mut at = list;
        while !at.is_null() {
            let addr = (*at).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let v4 = &*(addr as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                if !found.contains(&ip) {
                    found.push(ip);
                }
            }
            at = (*at).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

/// `None` when the image has no tool to try with.
async fn network_isolation(
    provider: &Arc<dyn Provider>,
    runtime: &str,
) -> Option<Result<String, String>> {
    // Every address of the host: loopback is the sandbox's own in a
    // network namespace, but a bridge reaches the host's addresses.
    let listener = match std::net::TcpListener::bind("0.0.0.0:0") {
        Ok(l) => l,
        Err(e) => return Some(Err(format!("cannot listen on the host: {e}"))),
    };
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    if let Err(e) = listener.set_nonblocking(true) {
        return Some(Err(e.to_string()));
    }
    let targets: Vec<String> = host_addresses().iter().map(|ip| ip.to_string()).collect();
    // Attempts in the background (a connection that succeeds would wait
    // on our silent server), given two seconds: nc where there is one,
    // else wget.
    let script = format!(
        "if command -v nc >/dev/null; then try() {{ nc \"$1\" {port} </dev/null >/dev/null 2>&1 & pids=\"$pids $!\"; }}; \
         elif command -v wget >/dev/null; then try() {{ wget -q -O /dev/null \"http://$1:{port}/\" >/dev/null 2>&1 & pids=\"$pids $!\"; }}; \
         else echo none; exit 0; fi; \
         for a in {}; do try \"$a\"; done; sleep 2; kill $pids 2>/dev/null; echo tried",
        targets.join(" ")
    );
    let tried = match run(provider, runtime, &["sh", "-c", &script]).await {
        Ok((ExecExit::Exited(0), out)) => out,
        Ok((exit, out)) => return Some(Err(format!("the attempt ended {exit:?}: {out:?}"))),
        Err(e) => return Some(Err(format!("the attempt did not run: {e}"))),
    };
    match tried.trim() {
        "none" => return None,
        "tried" => {}
        other => return Some(Err(format!("the attempt said {other:?}"))),
    }
    let shown = targets.join(", ");
    Some(match listener.accept() {
        Ok((_, from)) => Err(format!(
            "a server on the host (port {port}) was reached from inside (from {from})"
        )),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(format!(
            "a server on the host's {shown} (port {port}) was not reached"
        )),
        Err(e) => Err(e.to_string()),
    })
}

async fn destroy(
    provider: &Arc<dyn Provider>,
    runtime: &str,
    sandbox_id: &str,
) -> Result<String, String> {
    provider.destroy(runtime).await.map_err(|e| e.to_string())?;
    match provider.inspect(runtime).await {
        Ok(RuntimeStatus::Missing) => {}
        Ok(other) => return Err(format!("after destroy the runtime is {other:?}")),
        Err(e) => return Err(format!("after destroy: {e}")),
    }
    let listed = provider.inventory().await.map_err(|e| e.to_string())?;
    if listed.iter().any(|i| i.sandbox_id == sandbox_id) {
        return Err("after destroy the runtime is still in the inventory".into());
    }
    // Host processes that name the sandbox (its init, its VMM) go too.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = processes_naming(sandbox_id);
        if left.is_empty() {
            return Ok("gone from the inventory; no host process names the sandbox".into());
        }
        if Instant::now() > deadline {
            return Err(format!("host processes left: {}", left.join(", ")));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Host processes whose command line contains `needle` (pids).
fn processes_naming(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            if !pid.bytes().all(|b| b.is_ascii_digit()) || pid == me {
                return None;
            }
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// What `/api/v1/providers` shows of a provider's certification.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct CertificationSummary {
    pub certified: bool,
    pub at: DateTime<Utc>,
    /// The required checks that did not pass.
    pub failed: Vec<CheckKind>,
}

impl From<&Certification> for CertificationSummary {
    fn from(c: &Certification) -> Self {
        CertificationSummary {
            certified: c.certified,
            at: c.at,
            failed: c.failed(),
        }
    }
}

/// The certifications kept in `data_dir`, by provider.
pub fn load(data_dir: &Path) -> BTreeMap<String, Certification> {
    let path = data_dir.join(FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return BTreeMap::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the certifications");
            return BTreeMap::new();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "the certifications file is corrupt; read as none");
        BTreeMap::new()
    })
}

/// Records `results` in `data_dir`, beside those of other providers (the
/// caller holds the data dir's lock), durably: written aside, synced,
/// renamed over.
pub fn store(data_dir: &Path, results: &[Certification]) -> std::io::Result<()> {
    use std::io::Write;
    let mut all = load(data_dir);
    for result in results {
        all.insert(result.provider.clone(), result.clone());
    }
    let bytes = serde_json::to_vec_pretty(&all).map_err(std::io::Error::other)?;
    let mut tmp = tempfile::NamedTempFile::new_in(data_dir)?;
    tmp.write_all(&bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(data_dir.join(FILE)).map_err(|e| e.error)?;
    std::fs::File::open(data_dir)?.sync_all()
}
