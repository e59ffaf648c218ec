//! What a caller may ask for: size bounds (memory, vCPUs, disk) and the
//! provider and image policy (the host image; allow and deny lists per role
//! and per tenant).
//!
//! [`Service::check_sandbox_rules`] is the one place these rules are
//! applied; spawns (direct and from a template, REST and GraphQL, and the
//! admission preflight) and template saves all call it, before any record
//! exists.

use crate::auth::{Caller, Role};
use crate::config::{AllowDeny, Config, PolicyConfig};
use crate::provider::native::HOST_IMAGE;

use super::{Error, Result, Service};

/// The configuration key that lets non-admins spawn the host image.
pub const ALLOW_HOST_IMAGE_KEY: &str = "providers.native.allow_host_image";
/// The configuration key that lets non-admins use the proot provider.
pub const ALLOW_PROOT_KEY: &str = "providers.proot.allow_non_admins";

/// What is admin-only unless configuration opens it to everyone: the host
/// image, and the proot provider (which isolates the filesystem view
/// only: its commands run as the server's user, root when StacyVM is).
#[derive(Debug, Clone, Copy, Default)]
pub struct Openings {
    pub host_image: bool,
    pub proot: bool,
}

impl Openings {
    pub fn from_config(config: &Config) -> Self {
        Openings {
            host_image: config.providers.native.allow_host_image,
            proot: config.providers.proot.allow_non_admins,
        }
    }
}

/// What a spawn or a template asks for, with defaults applied.
#[derive(Debug, Clone, Copy)]
pub struct SandboxAsk<'a> {
    /// The provider that would run it (the default when none was named).
    pub provider: &'a str,
    pub image: &'a str,
    pub memory_mb: u32,
    pub vcpus: u32,
    pub disk_mb: u32,
}

/// Where a bound comes from, for the refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BoundSource {
    /// The configuration key `defaults.max_<name>`.
    Config,
    /// The owner's quota override (set by an admin).
    Quota,
    /// The host has less than the configured (or overridden) bound.
    Host,
}

/// One size bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub max: u32,
    pub source: BoundSource,
}

/// The largest sandbox one owner may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpawnBounds {
    pub memory_mb: Bound,
    pub vcpus: Bound,
    pub disk_mb: Bound,
}

/// What the host has, read once at start-up; no bound goes beyond it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostCapacity {
    /// `MemTotal` of `/proc/meminfo`, in MiB.
    pub memory_mb: Option<u32>,
    /// `std::thread::available_parallelism`.
    pub cpus: Option<u32>,
}

impl HostCapacity {
    pub fn probe() -> HostCapacity {
        HostCapacity {
            memory_mb: host_memory_mb(),
            cpus: std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok()),
        }
    }
}

/// The configured bound, or the owner's override of it, capped by the host.
fn bound(configured: u32, overridden: Option<i32>, host: Option<u32>) -> Bound {
    let wanted = match overridden.and_then(|o| u32::try_from(o).ok()) {
        Some(o) if o > 0 => Bound {
            max: o,
            source: BoundSource::Quota,
        },
        _ => Bound {
            max: configured,
            source: BoundSource::Config,
        },
    };
    match host {
        Some(h) if h < wanted.max => Bound {
            max: h.max(1),
            source: BoundSource::Host,
        },
        _ => wanted,
    }
}

/// The host's memory in MiB (`MemTotal` of `/proc/meminfo`).
fn host_memory_mb() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    u32::try_from(kib / 1024).ok()
}

impl SpawnBounds {
    /// The configured bounds, capped by this host's memory and CPUs. The
    /// disk bound is the configured one only (free space changes).
    pub fn for_host(config: &Config) -> SpawnBounds {
        SpawnBounds::new(config, None, HostCapacity::probe())
    }

    /// The bounds for an owner: its quota overrides where it has them,
    /// else the configuration; never beyond `host`.
    pub fn new(
        config: &Config,
        owner: Option<&entity::owner::Model>,
        host: HostCapacity,
    ) -> SpawnBounds {
        let d = &config.defaults;
        SpawnBounds {
            memory_mb: bound(
                d.max_memory_mb,
                owner.and_then(|o| o.max_memory_mb),
                host.memory_mb,
            ),
            vcpus: bound(d.max_vcpus, owner.and_then(|o| o.max_vcpus), host.cpus),
            disk_mb: bound(d.max_disk_mb, owner.and_then(|o| o.max_disk_mb), None),
        }
    }

    /// Refuses an ask beyond a bound, naming the bound.
    pub fn check(&self, ask: &SandboxAsk<'_>) -> Result<()> {
        for (name, value, bound) in [
            ("memory_mb", ask.memory_mb, self.memory_mb),
            ("vcpus", ask.vcpus, self.vcpus),
            ("disk_mb", ask.disk_mb, self.disk_mb),
        ] {
            if value > bound.max {
                let source = match bound.source {
                    BoundSource::Config => format!("defaults.max_{name}"),
                    BoundSource::Quota => format!("the owner's quota max_{name}"),
                    BoundSource::Host => match name {
                        "memory_mb" => "the host's memory".to_string(),
                        _ => "the host's CPUs".to_string(),
                    },
                };
                return Err(Error::BadRequest(format!(
                    "{name} {value} exceeds the limit of {} ({source})",
                    bound.max
                )));
            }
        }
        Ok(())
    }
}

/// What a policy rule governs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject {
    Provider,
    Image,
}

impl Subject {
    fn as_str(self) -> &'static str {
        match self {
            Subject::Provider => "provider",
            Subject::Image => "image",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Subject::Provider => "providers",
            Subject::Image => "images",
        }
    }
}

/// Whose rules refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Role(Role),
    Tenant(String),
}

impl Scope {
    /// The configuration path of the rules, e.g. `policy.roles.owner`.
    fn path(&self) -> String {
        match self {
            Scope::Role(role) => format!("policy.roles.{role}"),
            Scope::Tenant(tenant) => format!("policy.tenants.{tenant}"),
        }
    }
}

/// Why the policy refused a provider or image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error(
        "the host image is only for admins; set {ALLOW_HOST_IMAGE_KEY}: true to allow it to others"
    )]
    HostImage,
    #[error(
        "the proot provider isolates the filesystem view only and is for admins; set {ALLOW_PROOT_KEY}: true to allow it to others"
    )]
    Proot,
    #[error("{} {value:?} is denied by {}.{}.deny", .subject.as_str(), .scope.path(), .subject.key())]
    Denied {
        subject: Subject,
        value: String,
        scope: Scope,
    },
    #[error("{} {value:?} is not in {}.{}.allow", .subject.as_str(), .scope.path(), .subject.key())]
    NotAllowed {
        subject: Subject,
        value: String,
        scope: Scope,
    },
}

impl From<PolicyRefusal> for Error {
    fn from(e: PolicyRefusal) -> Self {
        Error::Forbidden(e.to_string())
    }
}

/// Does `pattern` match `value`? A trailing `*` matches any suffix.
fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

fn check_list(
    list: &AllowDeny,
    subject: Subject,
    value: &str,
    scope: &Scope,
) -> std::result::Result<(), PolicyRefusal> {
    if list.deny.iter().any(|p| matches(p, value)) {
        return Err(PolicyRefusal::Denied {
            subject,
            value: value.to_string(),
            scope: scope.clone(),
        });
    }
    if !list.allow.is_empty() && !list.allow.iter().any(|p| matches(p, value)) {
        return Err(PolicyRefusal::NotAllowed {
            subject,
            value: value.to_string(),
            scope: scope.clone(),
        });
    }
    Ok(())
}

/// The provider and image policy for a caller of `role` in `tenant`.
///
/// The host image needs an admin or `providers.native.allow_host_image`.
/// Then the role's lists, then the tenant's: deny wins over allow, an empty
/// allow list allows everything. Admins pass the host-image rule but not
/// the lists: an explicit deny applies to them too.
pub fn check_policy(
    policy: &PolicyConfig,
    openings: Openings,
    role: Role,
    tenant: &str,
    provider: &str,
    image: &str,
) -> std::result::Result<(), PolicyRefusal> {
    if image == HOST_IMAGE && role != Role::Admin && !openings.host_image {
        return Err(PolicyRefusal::HostImage);
    }
    if provider == "proot" && role != Role::Admin && !openings.proot {
        return Err(PolicyRefusal::Proot);
    }
    let scopes = [
        (policy.roles.get(role.as_str()), Scope::Role(role)),
        (
            policy.tenants.get(tenant),
            Scope::Tenant(tenant.to_string()),
        ),
    ];
    for (rules, scope) in &scopes {
        let Some(rules) = rules else { continue };
        check_list(&rules.providers, Subject::Provider, provider, scope)?;
        check_list(&rules.images, Subject::Image, image, scope)?;
    }
    Ok(())
}

impl Service {
    /// The one check of what a caller asks for: size bounds (400
    /// BAD_REQUEST naming the bound; the bounds of `owner`, i.e. (tenant,
    /// owner id), whose quota may override them), then the provider and
    /// image policy (403 FORBIDDEN naming the rule, decided by the caller's
    /// role and tenant). Used by every spawn and every template save,
    /// before anything is recorded.
    pub(super) async fn check_sandbox_rules(
        &self,
        caller: &Caller,
        owner: (&str, &str),
        ask: &SandboxAsk<'_>,
    ) -> Result<()> {
        self.spawn_bounds_for(owner.0, owner.1).await?.check(ask)?;
        check_policy(
            &self.config().policy,
            Openings::from_config(self.config()),
            caller.role,
            &caller.tenant_id,
            ask.provider,
            ask.image,
        )?;
        Ok(())
    }

    /// The bounds in force for an owner (tenant, owner id).
    pub async fn spawn_bounds_for(&self, tenant: &str, owner: &str) -> Result<SpawnBounds> {
        let record = self.store().get_owner(tenant, owner).await?;
        Ok(SpawnBounds::new(
            self.config(),
            record.as_ref(),
            self.inner.host,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyRules;

    fn lists(allow: &[&str], deny: &[&str]) -> AllowDeny {
        AllowDeny {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn example() -> PolicyConfig {
        let mut p = PolicyConfig::default();
        p.roles.insert(
            "owner".into(),
            PolicyRules {
                providers: lists(&["docker"], &[]),
                images: lists(&[], &["host"]),
            },
        );
        p.tenants.insert(
            "acme".into(),
            PolicyRules {
                providers: lists(&[], &["native"]),
                images: lists(&["alpine:*", "busybox:*"], &[]),
            },
        );
        p
    }

    #[test]
    fn proot_needs_an_admin_or_the_key() {
        let p = PolicyConfig::default();
        let refused = check_policy(&p, Openings::default(), Role::Owner, "t", "proot", "x");
        assert_eq!(refused, Err(PolicyRefusal::Proot));
        assert!(PolicyRefusal::Proot.to_string().contains(ALLOW_PROOT_KEY));
        assert!(check_policy(&p, Openings::default(), Role::Admin, "t", "proot", "x").is_ok());
        let open = Openings {
            host_image: false,
            proot: true,
        };
        assert!(check_policy(&p, open, Role::Owner, "t", "proot", "x").is_ok());
        assert!(check_policy(&p, Openings::default(), Role::Owner, "t", "native", "x").is_ok());
    }

    #[test]
    fn the_host_image_needs_an_admin_or_the_key() {
        let p = PolicyConfig::default();
        assert_eq!(
            check_policy(
                &p,
                Openings::default(),
                Role::Owner,
                "default",
                "native",
                "host"
            ),
            Err(PolicyRefusal::HostImage)
        );
        assert!(
            PolicyRefusal::HostImage
                .to_string()
                .contains(ALLOW_HOST_IMAGE_KEY)
        );
        assert_eq!(
            check_policy(
                &p,
                Openings::default(),
                Role::Operator,
                "default",
                "native",
                "host"
            ),
            Err(PolicyRefusal::HostImage)
        );
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Admin,
                "default",
                "native",
                "host"
            )
            .is_ok()
        );
        assert!(
            check_policy(
                &p,
                Openings {
                    host_image: true,
                    proot: false
                },
                Role::Owner,
                "default",
                "native",
                "host"
            )
            .is_ok()
        );
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Owner,
                "default",
                "native",
                "alpine:3"
            )
            .is_ok()
        );
    }

    #[test]
    fn role_and_tenant_lists_deny_wins_and_empty_allow_allows_all() {
        let p = example();
        // Owners: only docker.
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Owner,
                "default",
                "docker",
                "x"
            )
            .is_ok()
        );
        let refusal = check_policy(
            &p,
            Openings::default(),
            Role::Owner,
            "default",
            "native",
            "x",
        )
        .unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "provider \"native\" is not in policy.roles.owner.providers.allow"
        );
        // Operators have no role rules.
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Operator,
                "default",
                "native",
                "x"
            )
            .is_ok()
        );
        // Owners with the key still hit their explicit image deny.
        assert_eq!(
            check_policy(
                &p,
                Openings {
                    host_image: true,
                    proot: false
                },
                Role::Owner,
                "default",
                "docker",
                "host"
            )
            .unwrap_err()
            .to_string(),
            "image \"host\" is denied by policy.roles.owner.images.deny"
        );
        // The tenant's lists apply to every role, admins included.
        assert_eq!(
            check_policy(
                &p,
                Openings::default(),
                Role::Admin,
                "acme",
                "native",
                "alpine:3"
            )
            .unwrap_err()
            .to_string(),
            "provider \"native\" is denied by policy.tenants.acme.providers.deny"
        );
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Admin,
                "acme",
                "docker",
                "alpine:3.20"
            )
            .is_ok()
        );
        assert!(
            check_policy(
                &p,
                Openings::default(),
                Role::Admin,
                "acme",
                "docker",
                "busybox:latest"
            )
            .is_ok()
        );
        assert_eq!(
            check_policy(
                &p,
                Openings::default(),
                Role::Admin,
                "acme",
                "docker",
                "ubuntu:24.04"
            )
            .unwrap_err()
            .to_string(),
            "image \"ubuntu:24.04\" is not in policy.tenants.acme.images.allow"
        );
        // Deny wins over allow.
        let mut p = PolicyConfig::default();
        p.tenants.insert(
            "t".into(),
            PolicyRules {
                providers: lists(&["*"], &["docker"]),
                images: AllowDeny::default(),
            },
        );
        assert!(matches!(
            check_policy(&p, Openings::default(), Role::Owner, "t", "docker", "x"),
            Err(PolicyRefusal::Denied { .. })
        ));
        assert!(check_policy(&p, Openings::default(), Role::Owner, "t", "native", "x").is_ok());
    }

    #[test]
    fn bounds_name_their_source() {
        let bounds = SpawnBounds {
            memory_mb: bound(8192, None, Some(4096)),
            vcpus: bound(4, None, Some(16)),
            disk_mb: bound(10240, None, None),
        };
        // An override replaces the configured bound, up or down, but never
        // goes beyond the host.
        assert_eq!(
            bound(8192, Some(16384), Some(65536)),
            Bound {
                max: 16384,
                source: BoundSource::Quota
            }
        );
        assert_eq!(
            bound(8192, Some(16384), Some(12000)).source,
            BoundSource::Host
        );
        assert_eq!(bound(8192, Some(0), None).source, BoundSource::Config);
        let ask = |memory_mb, vcpus, disk_mb| SandboxAsk {
            provider: "docker",
            image: "x",
            memory_mb,
            vcpus,
            disk_mb,
        };
        assert!(bounds.check(&ask(4096, 4, 10240)).is_ok());
        let msg = |a| bounds.check(&a).unwrap_err().to_string();
        assert_eq!(
            msg(ask(4097, 1, 1)),
            "memory_mb 4097 exceeds the limit of 4096 (the host's memory)"
        );
        assert_eq!(
            msg(ask(1, 5, 1)),
            "vcpus 5 exceeds the limit of 4 (defaults.max_vcpus)"
        );
        assert_eq!(
            msg(ask(1, 1, 10241)),
            "disk_mb 10241 exceeds the limit of 10240 (defaults.max_disk_mb)"
        );
    }
}
