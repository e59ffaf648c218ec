//! Configuration: built-in defaults, then `stacyvm.yaml` (or
//! `~/.stacyvm/config.yaml`), then `STACYVM_*` environment variables, then
//! command-line flags, then validation. Key names follow the original
//! StacyVM server wherever the feature exists.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Yaml};
use serde::{Deserialize, Serialize};

use crate::duration::GoDuration;

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// The whole configuration of a StacyVM server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the embedded database, image store and native sandboxes live.
    pub data_dir: PathBuf,
    pub server: ServerConfig,
    pub providers: ProvidersConfig,
    pub defaults: DefaultsConfig,
    pub database: DatabaseConfig,
    pub lifecycle: LifecycleConfig,
    pub logging: LoggingConfig,
    pub auth: AuthConfig,
    pub rate_limit: crate::service::RateLimitConfig,
    /// Who may use which providers and images (see `service::policy`).
    pub policy: PolicyConfig,
    /// The execution plane: the in-process worker, and what a `stacyvm
    /// worker` process uses.
    pub worker: WorkerConfig,
    /// Several `serve` replicas on one PostgreSQL database.
    pub cluster: ClusterConfig,
    /// How long audit events are kept.
    pub audit: AuditConfig,
    /// Warm pools: sandboxes spawned ahead and handed out on spawn.
    pub pool: PoolConfig,
}

/// `pool`: warm pools. A pool keeps sandboxes of one recipe running,
/// owned by the server, and a spawn asking for exactly that recipe claims
/// one instead of waiting for a runtime. `size` is the pool of spawns that
/// name no template (the `defaults`); a template's own `pool_size` is its
/// pool. Warm sandboxes count against nobody until claimed; `max_warm`
/// bounds them all together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Warm sandboxes for spawns without a template (0: none).
    pub size: u32,
    /// The most warm sandboxes over all pools (0: pools are off).
    pub max_warm: u32,
    /// A warm sandbox unclaimed this long is replaced by a fresh one.
    pub max_age: GoDuration,
    /// How often the pools are topped up (also right after each claim).
    pub refill_interval: GoDuration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            size: 0,
            max_warm: 16,
            max_age: secs(3600),
            refill_interval: secs(1),
        }
    }
}

/// `audit`: the audit trail's retention. The leader prunes it every
/// `prune_interval`; an event goes when it is older than `max_age` or when
/// more than `max_events` newer ones exist.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// 0: kept whatever their age.
    pub max_age: GoDuration,
    /// 0: kept however many there are.
    pub max_events: u64,
    pub prune_interval: GoDuration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            max_age: secs(90 * 24 * 3600),
            max_events: 1_000_000,
            prune_interval: secs(60),
        }
    }
}

/// `cluster`: what replicas sharing one database need from each other.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// The URL other replicas reach this one at (`http://HOST:PORT`), to
    /// follow the live output of commands it runs. Empty: the address it
    /// listens on, unless that is every address (then followers on other
    /// replicas are refused with 409).
    pub advertise_url: String,
    /// The secret replicas sign their calls to each other with; `new,old`
    /// rotates it. Empty: derived from the key pepper, which replicas share
    /// anyway.
    pub secret: String,
    /// A replica silent this long is gone: the leader finishes or fails
    /// the steps it was driving and another replica takes over leadership.
    pub replica_stale_after: GoDuration,
}

impl std::fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("advertise_url", &self.advertise_url)
            .field("secret", &if self.secret.is_empty() { "" } else { "***" })
            .field("replica_stale_after", &self.replica_stale_after)
            .finish()
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            advertise_url: String::new(),
            secret: String::new(),
            replica_stale_after: secs(15),
        }
    }
}

/// `worker`: `local` for `serve`; the rest for `stacyvm worker`.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Whether `serve` runs a worker in its own process (off: a control
    /// plane whose sandboxes all live on `stacyvm worker` processes).
    pub local: bool,
    /// The worker's id (`stacyvm worker`); it must have a token in the
    /// control plane's `auth.worker_tokens`.
    pub id: String,
    /// Where the worker's RPC listens, `HOST:PORT`.
    pub listen: String,
    /// The URL the control plane reaches the RPC at; empty: `http://` +
    /// `listen`.
    pub advertise: String,
    /// The control plane's base URL.
    pub control_plane: String,
    /// The token shared with the control plane (both directions).
    pub token: String,
    /// Providers the worker offers; empty: all of this host's.
    pub providers: Vec<String>,
    /// What the worker is, for spawns that ask (`--label zone=a`).
    pub labels: BTreeMap<String, String>,
    /// Most live sandboxes the worker takes; 0: no limit.
    pub max_sandboxes: u32,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            local: true,
            id: String::new(),
            listen: "127.0.0.1:7424".into(),
            advertise: String::new(),
            control_plane: "http://127.0.0.1:7423".into(),
            token: String::new(),
            providers: Vec::new(),
            labels: BTreeMap::new(),
            max_sandboxes: 0,
        }
    }
}

impl std::fmt::Debug for WorkerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConfig")
            .field("local", &self.local)
            .field("id", &self.id)
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("control_plane", &self.control_plane)
            .field("token", &if self.token.is_empty() { "" } else { "***" })
            .field("providers", &self.providers)
            .field("labels", &self.labels)
            .field("max_sandboxes", &self.max_sandboxes)
            .finish()
    }
}

/// `policy`: allow and deny lists per role and per tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// By role name (admin, operator, viewer, owner).
    pub roles: std::collections::BTreeMap<String, PolicyRules>,
    /// By tenant id.
    pub tenants: std::collections::BTreeMap<String, PolicyRules>,
}

/// The rules of one role or tenant.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyRules {
    /// Provider names.
    pub providers: AllowDeny,
    /// Image names; a trailing `*` matches any suffix (`alpine:*`).
    pub images: AllowDeny,
}

/// An allow and a deny list: deny wins; an empty allow list allows all.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AllowDeny {
    pub allow: Vec<String>,
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Loopback by default: exposing StacyVM is a decision, not an accident.
    pub host: String,
    pub port: u16,
    /// Domain used to build preview URLs (`<port>-<id>.<domain>`).
    pub preview_domain: String,
    /// Largest accepted request body; file writes are bounded by it.
    pub max_body_bytes: usize,
    /// Whether GraphQL introspection (schema discovery) is allowed.
    pub graphql_introspection: bool,
    /// Most TCP connections open at once; one more is closed at once.
    pub max_connections: usize,
    /// A request's headers must arrive within this, and an idle
    /// keep-alive connection is closed after it.
    pub header_read_timeout: GoDuration,
    /// A GraphQL WebSocket that sends no `connection_init` within this is
    /// closed with 4408.
    pub websocket_init_timeout: GoDuration,
    /// Most GraphQL WebSockets one credential may hold open (0: no limit).
    pub max_websockets_per_credential: usize,
    /// Most GraphQL WebSockets open at once.
    pub max_websockets: usize,
    /// Most requests one credential may have in flight at once (a streamed
    /// answer counts until it ends); 0: no limit.
    pub max_requests_per_credential: usize,
    /// Requests refused for their credentials, per source address: past
    /// this rate they are answered 429 and no longer audited.
    pub refused_rate_limit: crate::service::RateLimitConfig,
    /// `Host` names (or `host:port`) this server answers besides
    /// `localhost` and IP addresses, where it checks them (a guard against
    /// DNS rebinding): `/mcp` always, the rest of the API in the open mode
    /// (no credentials). The names clients and reverse proxies use.
    pub allowed_hosts: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProvidersConfig {
    /// `auto` picks docker when its daemon answers, else native.
    pub default: String,
    pub docker: DockerConfig,
    pub native: NativeConfig,
    pub proot: ProotConfig,
    /// MicroVM sandboxes under QEMU (`-M microvm`).
    pub qemu: QemuConfig,
    /// MicroVM sandboxes under Firecracker (a KVM host).
    pub firecracker: FirecrackerConfig,
    /// Records without runtimes, for benchmarks of the control plane.
    pub memory: MemoryConfig,
    /// Runtimes behind StacyVM's HTTP provider contract, by the name
    /// sandboxes are spawned on (`providers.custom.<name>: {url, api_key}`).
    pub custom: BTreeMap<String, CustomProviderConfig>,
}

/// The providers this build has, by the names sandboxes are spawned on
/// (a custom provider may take none of them, nor `auto`).
pub const BUILT_IN_PROVIDERS: [&str; 6] =
    ["docker", "native", "proot", "qemu", "firecracker", "memory"];

/// How QEMU runs a guest's CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` opens and this host is not itself a virtual
    /// machine (nested guests are unreliable), else TCG.
    Auto,
    Kvm,
    /// QEMU's emulator: slow, but runs anywhere.
    Tcg,
}

/// The `qemu` provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QemuConfig {
    pub binary: PathBuf,
    /// The guest kernel; empty: the newest `/boot/vmlinuz-*`.
    pub kernel: PathBuf,
    /// Its modules; empty: `lib/modules/<release>` beside the kernel's
    /// `boot/`, else `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
    pub accel: Accel,
    /// How long a VM has to boot to its agent before the spawn fails.
    pub boot_timeout: GoDuration,
    /// The static `stacyvm-agent` binary (the guest's `/init`); empty
    /// means beside the running `stacyvm` executable.
    pub agent_binary: PathBuf,
}

impl Default for QemuConfig {
    fn default() -> Self {
        QemuConfig {
            binary: PathBuf::from("qemu-system-x86_64"),
            kernel: PathBuf::new(),
            modules_dir: PathBuf::new(),
            accel: Accel::Auto,
            boot_timeout: GoDuration(std::time::Duration::from_secs(60)),
            agent_binary: PathBuf::new(),
        }
    }
}

/// The `firecracker` provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirecrackerConfig {
    /// The `firecracker` binary (no distribution packages it: a release
    /// from its project, or a build of its sources).
    pub binary: PathBuf,
    /// The guest kernel: an uncompressed vmlinux, or a bzImage with an
    /// LZ4 payload (Debian's), which is extracted once; empty: the newest
    /// `/boot/vmlinuz-*`.
    pub kernel: PathBuf,
    /// Its modules; empty: `lib/modules/<release>` beside the kernel's
    /// `boot/`, else `/lib/modules/<release>`.
    pub modules_dir: PathBuf,
    /// How long a VM has to boot to its agent before the spawn fails.
    pub boot_timeout: GoDuration,
    /// The static `stacyvm-agent` binary (the guest's `/init`); empty
    /// means beside the running `stacyvm` executable.
    pub agent_binary: PathBuf,
    /// Firecracker's own seccomp filters. Off only for a build that has
    /// none for this target (`--no-seccomp`).
    pub seccomp: bool,
    /// Snapshots of booted VMs kept (one per image and shape; each holds
    /// a VM's memory and disk); the least recently used go first. 0: none
    /// are kept, every spawn boots.
    pub max_snapshots: usize,
}

impl Default for FirecrackerConfig {
    fn default() -> Self {
        FirecrackerConfig {
            binary: PathBuf::from("firecracker"),
            kernel: PathBuf::new(),
            modules_dir: PathBuf::new(),
            boot_timeout: GoDuration(std::time::Duration::from_secs(30)),
            agent_binary: PathBuf::new(),
            seccomp: true,
            max_snapshots: 8,
        }
    }
}

/// `providers.custom.<name>`: where a custom provider answers and the key
/// StacyVM sends it (`Authorization: Bearer`; empty: none).
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CustomProviderConfig {
    pub url: String,
    pub api_key: String,
}

impl std::fmt::Debug for CustomProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomProviderConfig")
            .field("url", &self.url)
            .field("api_key", &if self.api_key.is_empty() { "" } else { "***" })
            .finish()
    }
}

/// `providers.memory`: a provider whose sandboxes are entries in a map and
/// run nothing (exec and files answer "not supported"): the control plane
/// measured alone (`stacyvm bench --scale`). Off unless enabled, never
/// the default, and spawned on only when asked for by name.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemoryConfig {
    pub enabled: bool,
    /// The most such sandboxes at once.
    pub max_sandboxes: usize,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            enabled: false,
            max_sandboxes: 100_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DockerConfig {
    /// Docker socket or URL; empty means the usual local defaults.
    pub host: String,
    /// Maximum number of processes inside one container.
    pub pids_limit: i64,
    /// Docker network mode for sandboxes (`none` isolates them from the network).
    pub network: String,
    /// How a sandbox's `disk_mb` is enforced.
    pub disk_limit: DockerDiskLimit,
    /// Run commands through the in-sandbox agent (`stacyvm-agent` as the
    /// container's PID 1, reached over a Unix socket) instead of the
    /// Engine API's three exec calls. Needs a local daemon and a server
    /// that may read the containers' `/proc/<pid>/root` (root); without
    /// them, or with `false`, exec uses the Engine API.
    pub direct_exec: bool,
    /// The static `stacyvm-agent` binary; empty means beside the running
    /// `stacyvm` executable.
    pub agent_binary: PathBuf,
    /// The OCI runtime containers run under (the daemon's name for it);
    /// empty: the daemon's default (runc). `runsc` is gVisor: a kernel in
    /// user space between the sandbox and the host's kernel, registered
    /// with the daemon (`runtimes` in daemon.json, with `runtimeArgs:
    /// ["--network=none"]` for sandboxes without network; see README).
    pub runtime: String,
}

/// How the docker provider caps a sandbox's disk (`providers.docker.disk_limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DockerDiskLimit {
    /// The storage driver's `size` option where the daemon supports it
    /// (overlay2 on XFS mounted with `pquota`), learned from the first
    /// spawn; a tmpfs `/tmp` otherwise.
    #[default]
    Auto,
    /// Always the `size` option: spawns fail where the daemon cannot do it.
    Size,
    /// Always a tmpfs of `disk_mb` at `/tmp` (counted in the sandbox's
    /// memory too); the rest of the writable layer is not capped.
    Tmpfs,
}

/// The `native` provider.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeConfig {
    /// The `stacyvm` binary whose hidden helpers start sandbox inits and
    /// run commands in them; empty means the running executable.
    pub helper_binary: PathBuf,
    /// Host uid/gid ranges for sandboxes' user namespaces.
    pub ids: NativeIdsConfig,
    /// Maximum number of processes (and threads) in one sandbox, enforced
    /// by its `pids` cgroup; 0 means unlimited.
    pub pids_limit: u64,
    /// Whether callers other than admins may spawn the `host` image (the
    /// host's root, read-only). Off by default.
    pub allow_host_image: bool,
    /// Run commands through the in-sandbox agent (`stacyvm-agent` as the
    /// sandbox's PID 1) instead of starting the exec helper per command.
    /// The `host` image always uses the helper.
    pub direct_exec: bool,
    /// The static `stacyvm-agent` binary; empty means beside the running
    /// `stacyvm` executable.
    pub agent_binary: PathBuf,
}

impl Default for NativeConfig {
    fn default() -> Self {
        NativeConfig {
            helper_binary: PathBuf::new(),
            ids: NativeIdsConfig::default(),
            pids_limit: crate::provider::native::DEFAULT_PIDS_LIMIT,
            allow_host_image: false,
            direct_exec: true,
            agent_binary: PathBuf::new(),
        }
    }
}

/// An `/etc/subuid`-style block of host ids, `start .. start + size *
/// count`, cut into one range of `size` ids per native sandbox (used when
/// StacyVM runs as root; an unprivileged server maps only its own uid).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NativeIdsConfig {
    pub start: u32,
    pub size: u32,
    pub count: u32,
}

impl Default for NativeIdsConfig {
    fn default() -> Self {
        NativeIdsConfig {
            start: 1_000_000_000,
            size: 65536,
            count: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProotConfig {
    pub binary: PathBuf,
    /// Whether callers other than admins may use proot (off by default:
    /// it is not a security boundary).
    pub allow_non_admins: bool,
}

/// Defaults and limits applied to every request that does not say otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultsConfig {
    pub ttl: GoDuration,
    pub max_ttl: GoDuration,
    pub image: String,
    pub memory_mb: u32,
    pub vcpus: u32,
    /// Size of a sandbox's writable disk, in MiB, where the provider can
    /// cap it (native: a loop-mounted filesystem; docker: its `/tmp`).
    pub disk_mb: u32,
    /// The most memory (MiB) one sandbox may ask for; never more than the
    /// host's memory.
    pub max_memory_mb: u32,
    /// The most vCPUs one sandbox may ask for; never more than the host has.
    pub max_vcpus: u32,
    /// The largest disk (MiB) one sandbox may ask for.
    pub max_disk_mb: u32,
    pub exec_timeout: GoDuration,
    pub max_exec_timeout: GoDuration,
    /// Global cap on live sandboxes; 0 means unlimited.
    pub max_sandboxes: u32,
    /// Per-owner cap on live sandboxes; 0 means unlimited.
    pub max_sandboxes_per_owner: u32,
    /// Bytes of each output stream an exec answer carries before truncation.
    pub max_exec_output_bytes: usize,
    /// What a spawn over a sandbox cap does: `reject` (429) or `queue`
    /// (wait for capacity, bounded by the two settings below).
    pub spawn_overflow: String,
    pub spawn_queue_size: usize,
    pub spawn_queue_timeout: GoDuration,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://...` or `postgres://...`; empty means `<data_dir>/stacyvm.db`.
    pub url: String,
}

/// The `auth` section of the configuration.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// A shared key (sent as `X-API-Key`): callers act as owner `default`
    /// and may name their pool-mode user with `X-User-ID`.
    pub api_key: String,
    /// A shared admin key (sent as `X-Admin-API-Key`).
    pub admin_api_key: String,
    /// The secret stored keys are hashed with. Empty: on SQLite a random
    /// one kept in `<data_dir>/key_pepper`; on PostgreSQL one kept in the
    /// database and shared by every replica (configure it to keep it apart
    /// from the hashes it protects).
    pub key_pepper: String,
    /// Earlier peppers, still accepted: a key hashed under one is rehashed
    /// under `key_pepper` when it is next used, so the pepper rotates
    /// without downtime.
    pub previous_key_peppers: Vec<String>,
    pub jwt: crate::auth::jwt::JwtConfig,
    /// Remote workers allowed to register: worker id → its token (the
    /// worker's `--token`).
    pub worker_tokens: std::collections::BTreeMap<String, String>,
    /// How worker secrets travel, on both ends: `signed` (short-lived
    /// JWTs, the default) or `static` (the secret as a bearer token).
    pub worker_auth: crate::worker::token::WorkerAuth,
    /// Run open again (anonymous callers are admins) when every stored key
    /// is revoked or expired. Off: once a key has existed the server never
    /// runs open again. Loopback only.
    pub allow_open: bool,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mask = |s: &str| if s.is_empty() { "" } else { "***" };
        f.debug_struct("AuthConfig")
            .field("api_key", &mask(&self.api_key))
            .field("admin_api_key", &mask(&self.admin_api_key))
            .field("key_pepper", &mask(&self.key_pepper))
            .field("previous_key_peppers", &self.previous_key_peppers.len())
            .field("jwt", &self.jwt)
            .field(
                "worker_tokens",
                &self.worker_tokens.keys().collect::<Vec<_>>(),
            )
            .field("worker_auth", &self.worker_auth)
            .field("allow_open", &self.allow_open)
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LifecycleConfig {
    /// How often the reaper looks for sandboxes whose TTL has passed.
    pub reaper_interval: GoDuration,
    /// How often provider health is probed.
    pub health_interval: GoDuration,
    /// How often the local worker records a heartbeat.
    pub heartbeat_interval: GoDuration,
    /// How often the reconciler compares records with runtimes (and so
    /// how quickly a sandbox killed from outside is reported).
    pub reconcile_interval: GoDuration,
    /// How often a reconcile pass reads every live record of its worker;
    /// the passes between read only the records that changed. Bounds how
    /// long a change the incremental reads missed (a replica's clock far
    /// behind) goes unseen.
    pub reconcile_full_interval: GoDuration,
    /// How long a runtime without a live record is left alone before the
    /// reconciler destroys it (at start-up it is destroyed at once).
    pub orphan_grace: GoDuration,
    /// A remote worker silent this long is unreachable: its usable
    /// sandboxes turn `unhealthy` ("worker W unreachable since T").
    pub worker_stale_after: GoDuration,
    /// A remote worker silent this long has lost its sandboxes: they turn
    /// `error` and are destroyed once it answers again.
    pub worker_lost_after: GoDuration,
    /// Consecutive failed observations before `running` turns `unhealthy`.
    pub unhealthy_after: u32,
    /// Consecutive good observations before `unhealthy` turns `running`.
    pub healthy_after: u32,
    /// On SIGTERM/Ctrl-C, how long running commands may go on before
    /// they are cut off.
    pub shutdown_timeout: GoDuration,
    /// Destroy every sandbox on shutdown instead of leaving them for the
    /// next start to adopt.
    pub destroy_on_shutdown: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// A tracing filter such as `info` or `stacyvm=debug,info`.
    pub level: String,
}

fn secs(s: u64) -> GoDuration {
    GoDuration(std::time::Duration::from_secs(s))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            server: ServerConfig::default(),
            providers: ProvidersConfig::default(),
            defaults: DefaultsConfig::default(),
            database: DatabaseConfig::default(),
            lifecycle: LifecycleConfig::default(),
            logging: LoggingConfig::default(),
            auth: AuthConfig::default(),
            rate_limit: Default::default(),
            policy: PolicyConfig::default(),
            worker: WorkerConfig::default(),
            cluster: ClusterConfig::default(),
            audit: AuditConfig::default(),
            pool: PoolConfig::default(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 7423,
            preview_domain: "localhost".into(),
            max_body_bytes: 32 * 1024 * 1024,
            graphql_introspection: true,
            max_connections: 4096,
            header_read_timeout: secs(20),
            websocket_init_timeout: secs(10),
            max_websockets_per_credential: 100,
            max_websockets: 2048,
            max_requests_per_credential: 256,
            refused_rate_limit: crate::service::RateLimitConfig {
                enabled: true,
                requests_per_minute: 60,
                burst: 30,
            },
            allowed_hosts: Vec::new(),
        }
    }
}

impl Default for ProvidersConfig {
    fn default() -> Self {
        ProvidersConfig {
            default: "auto".into(),
            docker: DockerConfig::default(),
            native: NativeConfig::default(),
            proot: ProotConfig::default(),
            qemu: QemuConfig::default(),
            firecracker: FirecrackerConfig::default(),
            memory: MemoryConfig::default(),
            custom: BTreeMap::new(),
        }
    }
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            host: String::new(),
            pids_limit: 512,
            network: "none".into(),
            disk_limit: DockerDiskLimit::Auto,
            direct_exec: true,
            agent_binary: PathBuf::new(),
            runtime: String::new(),
        }
    }
}

impl Default for ProotConfig {
    fn default() -> Self {
        ProotConfig {
            binary: PathBuf::from("proot"),
            allow_non_admins: false,
        }
    }
}

impl Default for DefaultsConfig {
    fn default() -> Self {
        DefaultsConfig {
            ttl: secs(30 * 60),
            max_ttl: secs(24 * 3600),
            image: "alpine:latest".into(),
            memory_mb: 1024,
            vcpus: 1,
            disk_mb: 1024,
            max_memory_mb: 8192,
            max_vcpus: 4,
            max_disk_mb: 10240,
            exec_timeout: secs(5 * 60),
            max_exec_timeout: secs(10 * 60),
            max_sandboxes: 0,
            max_sandboxes_per_owner: 0,
            max_exec_output_bytes: 16 * 1024 * 1024,
            spawn_overflow: "reject".into(),
            spawn_queue_size: 100,
            spawn_queue_timeout: secs(30),
        }
    }
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            reaper_interval: secs(10),
            health_interval: secs(5),
            heartbeat_interval: secs(10),
            reconcile_interval: secs(2),
            reconcile_full_interval: secs(60),
            orphan_grace: secs(60),
            worker_stale_after: secs(30),
            worker_lost_after: secs(300),
            unhealthy_after: 2,
            healthy_after: 2,
            shutdown_timeout: secs(30),
            destroy_on_shutdown: false,
        }
    }
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            level: "info".into(),
        }
    }
}

/// Top-level sections; an environment variable is read only when it names
/// one of them, so unrelated `STACYVM_*` variables (e.g. test settings) are
/// not mistaken for configuration.
const SECTIONS: [&str; 11] = [
    "audit",
    "cluster",
    "server",
    "providers",
    "defaults",
    "database",
    "lifecycle",
    "logging",
    "auth",
    "rate_limit",
    "worker",
];

/// Maps `STACYVM_AUTH_API_KEY` style names to `auth.api_key`: the first
/// segment is the section, the rest is the key with underscores kept.
/// Provider blocks nest one level deeper (`STACYVM_PROVIDERS_DOCKER_HOST`).
fn env_key(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    if lower == "data_dir" {
        return Some(lower);
    }
    let section = SECTIONS
        .iter()
        .find(|s| lower.starts_with(&format!("{s}_")))?;
    let rest = &lower[section.len() + 1..];
    let nested: &[&str] = match *section {
        "providers" => &["docker", "native", "proot", "qemu", "firecracker"],
        "auth" => &["jwt"],
        _ => &[],
    };
    for block in nested {
        if let Some(key) = rest.strip_prefix(&format!("{block}_")) {
            return Some(format!("{section}.{block}.{key}"));
        }
    }
    Some(format!("{section}.{rest}"))
}

impl Config {
    /// Loads the layers. `file` overrides the search for a config file;
    /// `overrides` are values from command-line flags (highest priority).
    pub fn load(file: Option<&Path>, overrides: Figment) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            Some(path) => {
                if !path.exists() {
                    return Err(ConfigError::Invalid(format!(
                        "config file {} does not exist",
                        path.display()
                    )));
                }
                figment = figment.merge(Yaml::file_exact(path));
            }
            None => {
                // Both files are optional; the local one wins.
                let home = std::env::var_os("HOME")
                    .map(|home| Path::new(&home).join(".stacyvm/config.yaml"));
                for candidate in home.into_iter().chain([PathBuf::from("stacyvm.yaml")]) {
                    if candidate.exists() {
                        figment = figment.merge(Yaml::file_exact(candidate));
                    }
                }
            }
        }
        figment = figment
            .merge(
                Env::prefixed("STACYVM_").filter_map(|key| env_key(key.as_str()).map(Into::into)),
            )
            .merge(overrides);
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Cross-field checks that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let d = &self.defaults;
        if self.pool.size > self.pool.max_warm {
            return Err(ConfigError::Invalid(format!(
                "pool.size ({}) must be at most pool.max_warm ({})",
                self.pool.size, self.pool.max_warm
            )));
        }
        if self.pool.max_age.0.is_zero() || self.pool.refill_interval.0.is_zero() {
            return Err(ConfigError::Invalid(
                "pool.max_age and pool.refill_interval must be positive".into(),
            ));
        }
        if d.ttl.0.is_zero() || d.ttl > d.max_ttl {
            return Err(ConfigError::Invalid(format!(
                "defaults.ttl must be positive and at most defaults.max_ttl ({})",
                crate::duration::format(d.max_ttl.0)
            )));
        }
        if d.exec_timeout.0.is_zero() || d.exec_timeout > d.max_exec_timeout {
            return Err(ConfigError::Invalid(
                "defaults.exec_timeout must be positive and at most defaults.max_exec_timeout"
                    .into(),
            ));
        }
        if d.memory_mb == 0 || d.vcpus == 0 || d.disk_mb == 0 {
            return Err(ConfigError::Invalid(
                "defaults.memory_mb, defaults.vcpus and defaults.disk_mb must be positive".into(),
            ));
        }
        for (name, default, max) in [
            ("memory_mb", d.memory_mb, d.max_memory_mb),
            ("vcpus", d.vcpus, d.max_vcpus),
            ("disk_mb", d.disk_mb, d.max_disk_mb),
        ] {
            if default > max {
                return Err(ConfigError::Invalid(format!(
                    "defaults.{name} ({default}) must be at most defaults.max_{name} ({max})"
                )));
            }
        }
        // Replicas renew their leadership and heartbeat every
        // min(heartbeat_interval, 2 s); a shorter staleness would make live
        // replicas look dead (and leadership flap).
        let tick = self
            .lifecycle
            .heartbeat_interval
            .0
            .min(std::time::Duration::from_secs(2));
        if self.cluster.replica_stale_after.0 < tick * 3 {
            return Err(ConfigError::Invalid(format!(
                "cluster.replica_stale_after must be at least 3 times min(lifecycle.heartbeat_interval, 2s) ({})",
                crate::duration::format(tick * 3)
            )));
        }
        for role in self.policy.roles.keys() {
            role.parse::<crate::auth::Role>()
                .map_err(|e| ConfigError::Invalid(format!("policy.roles: {e}")))?;
        }
        // A misspelt provider would silently match nothing.
        let scoped = self
            .policy
            .roles
            .iter()
            .map(|(k, r)| (format!("policy.roles.{k}"), r))
            .chain(
                self.policy
                    .tenants
                    .iter()
                    .map(|(k, r)| (format!("policy.tenants.{k}"), r)),
            );
        for (path, rules) in scoped {
            let lists = [&rules.providers.allow, &rules.providers.deny];
            if let Some(bad) = lists
                .into_iter()
                .flatten()
                // `memory` runs nothing: no policy offers it.
                .find(|p| {
                    let p = p.as_str();
                    !(p == "*" || (BUILT_IN_PROVIDERS.contains(&p) && p != "memory"))
                })
            {
                return Err(ConfigError::Invalid(format!(
                    "{path}.providers: unknown provider {bad:?} ({})",
                    BUILT_IN_PROVIDERS.join(", ")
                )));
            }
        }
        if !["reject", "queue"].contains(&d.spawn_overflow.as_str()) {
            return Err(ConfigError::Invalid(format!(
                "defaults.spawn_overflow must be reject or queue, not {:?}",
                d.spawn_overflow
            )));
        }
        if self.audit.prune_interval.0.is_zero() {
            return Err(ConfigError::Invalid(
                "audit.prune_interval must be positive".into(),
            ));
        }
        let srv = &self.server;
        if srv.max_connections == 0 || srv.max_websockets == 0 {
            return Err(ConfigError::Invalid(
                "server.max_connections and server.max_websockets must be positive".into(),
            ));
        }
        if srv.header_read_timeout.0.is_zero() || srv.websocket_init_timeout.0.is_zero() {
            return Err(ConfigError::Invalid(
                "server.header_read_timeout and server.websocket_init_timeout must be positive"
                    .into(),
            ));
        }
        for (name, custom) in &self.providers.custom {
            let plain = !name.is_empty()
                && name.len() <= 32
                && name.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                });
            if !plain || name == "auto" || BUILT_IN_PROVIDERS.contains(&name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "providers.custom.{name}: a custom provider's name is 1 to 32 of a-z, 0-9, - and _, and not a built-in provider's"
                )));
            }
            if custom.url.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "providers.custom.{name}.url is required"
                )));
            }
        }
        let l = &self.lifecycle;
        if [
            l.reaper_interval,
            l.health_interval,
            l.heartbeat_interval,
            l.reconcile_interval,
            l.reconcile_full_interval,
        ]
        .iter()
        .any(|d| d.0.is_zero())
        {
            return Err(ConfigError::Invalid(
                "lifecycle intervals must be positive".into(),
            ));
        }
        if l.unhealthy_after == 0 || l.healthy_after == 0 {
            return Err(ConfigError::Invalid(
                "lifecycle.unhealthy_after and lifecycle.healthy_after must be at least 1".into(),
            ));
        }
        let ids = &self.providers.native.ids;
        let end = u64::from(ids.size) * u64::from(ids.count) + u64::from(ids.start);
        if ids.start == 0 || ids.size < 2 || ids.count == 0 || end > u64::from(u32::MAX) {
            return Err(ConfigError::Invalid(
                "providers.native.ids needs start > 0, size >= 2, count >= 1 and start + size * count below 2^32".into(),
            ));
        }
        // `memory` is never the default: it runs nothing.
        let default = self.providers.default.as_str();
        let allowed = default == "auto"
            || (BUILT_IN_PROVIDERS.contains(&default) && default != "memory")
            || self.providers.custom.contains_key(default);
        if !allowed {
            return Err(ConfigError::Invalid(format!(
                "providers.default must be auto, docker, native, proot, qemu, firecracker or a custom provider's name, not {:?}",
                self.providers.default
            )));
        }
        // The kernel's PID_MAX_LIMIT: pids.max takes nothing larger.
        if self.providers.native.pids_limit > 4_194_304 {
            return Err(ConfigError::Invalid(
                "providers.native.pids_limit must be at most 4194304 (0: unlimited)".into(),
            ));
        }
        Ok(())
    }

    /// The database URL in use: the configured one, or the embedded SQLite file.
    pub fn database_url(&self) -> String {
        if self.database.url.is_empty() {
            format!(
                "sqlite://{}?mode=rwc",
                self.data_dir.join("stacyvm.db").display()
            )
        } else {
            self.database.url.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Custom providers are named as sandboxes are spawned on them: plain
    /// names that are no built-in's, each with a URL; one may be the default.
    #[test]
    fn custom_providers_need_a_plain_new_name_and_a_url() {
        let with = |name: &str, url: &str, default: &str| {
            let mut c = Config::default();
            c.providers.custom.insert(
                name.to_string(),
                CustomProviderConfig {
                    url: url.to_string(),
                    api_key: String::new(),
                },
            );
            c.providers.default = default.to_string();
            c.validate()
        };
        assert!(with("gpu-pool", "http://10.0.0.7:7480", "auto").is_ok());
        assert!(with("gpu-pool", "http://10.0.0.7:7480", "gpu-pool").is_ok());
        assert!(with("gpu-pool", "http://10.0.0.7:7480", "elsewhere").is_err());
        assert!(with("docker", "http://10.0.0.7:7480", "auto").is_err());
        assert!(with("Bad Name", "http://10.0.0.7:7480", "auto").is_err());
        assert!(with(&"x".repeat(33), "http://10.0.0.7:7480", "auto").is_err());
        assert!(with("gpu-pool", "", "auto").is_err());
        // The built-ins that can run a sandbox may be the default; `memory` not.
        assert!(with("gpu-pool", "http://10.0.0.7:7480", "native").is_ok());
        assert!(with("gpu-pool", "http://10.0.0.7:7480", "memory").is_err());
        assert!(with("memory", "http://10.0.0.7:7480", "auto").is_err());
    }

    #[test]
    fn env_names_map_to_sections() {
        assert_eq!(env_key("SERVER_PORT").as_deref(), Some("server.port"));
        assert_eq!(
            env_key("DEFAULTS_MAX_TTL").as_deref(),
            Some("defaults.max_ttl")
        );
        assert_eq!(
            env_key("PROVIDERS_DOCKER_PIDS_LIMIT").as_deref(),
            Some("providers.docker.pids_limit")
        );
        assert_eq!(
            env_key("PROVIDERS_NATIVE_HELPER_BINARY").as_deref(),
            Some("providers.native.helper_binary")
        );
        assert_eq!(
            env_key("PROVIDERS_NATIVE_PIDS_LIMIT").as_deref(),
            Some("providers.native.pids_limit")
        );
        assert_eq!(env_key("TEST_ROOTFS"), None);
        assert_eq!(env_key("AUTH_API_KEY").as_deref(), Some("auth.api_key"));
        assert_eq!(
            env_key("AUTH_JWT_HS256_SECRET").as_deref(),
            Some("auth.jwt.hs256_secret")
        );
    }

    #[test]
    fn the_policy_block_of_the_readme_loads() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("stacyvm.yaml");
        std::fs::write(
            &path,
            r#"
providers:
  native:
    allow_host_image: true
defaults:
  max_memory_mb: 4096
policy:
  roles:
    owner: { providers: { allow: [docker] }, images: { deny: ["host"] } }
  tenants:
    acme: { providers: { deny: [native] }, images: { allow: ["alpine:*", "busybox:*"] } }
"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let c = Config::load(Some(&path), Figment::new()).unwrap_or_else(|e| panic!("{e}"));
        assert!(c.providers.native.allow_host_image);
        assert_eq!(c.defaults.max_memory_mb, 4096);
        assert_eq!(c.policy.roles["owner"].providers.allow, ["docker"]);
        assert_eq!(c.policy.roles["owner"].images.deny, ["host"]);
        assert_eq!(c.policy.tenants["acme"].providers.deny, ["native"]);
        assert_eq!(
            c.policy.tenants["acme"].images.allow,
            ["alpine:*", "busybox:*"]
        );
    }

    #[test]
    fn defaults_validate() {
        assert!(Config::default().validate().is_ok());
        let mut c = Config::default();
        c.defaults.ttl = secs(48 * 3600);
        assert!(c.validate().is_err());
        let mut c = Config::default();
        assert_eq!(c.providers.native.pids_limit, 512);
        c.providers.native.pids_limit = 5_000_000;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.defaults.memory_mb = c.defaults.max_memory_mb + 1;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.policy.roles.insert("root".into(), PolicyRules::default());
        assert!(c.validate().is_err());
        let mut c = Config::default();
        let mut rules = PolicyRules::default();
        rules.providers.deny.push("dockr".into());
        c.policy.tenants.insert("acme".into(), rules);
        assert!(c.validate().is_err());
    }
}
