//! Isolation attacks, run from inside real native sandboxes with an
//! ordinary owner key (and, for the `host` image, an admin key), the way
//! issue 9 found them. Every test checks the host afterwards, not just the
//! answer inside: host sysctls unchanged (a changed one is restored and the
//! test fails), no host file written, no host secret read, root inside is
//! not root outside.

use std::os::unix::fs::MetadataExt;

use serde_json::{Value, json};
use stacyvm::auth::Role;

use crate::support::{TestServer, docker_image, key, native_server};

/// What root in a sandbox tries against the kernel: host sysctls, sysrq,
/// undoing the read-only and masked mounts, new namespaces, devices,
/// chroot, the network.
const KERNEL_ATTACKS: &[&str] = &[
    "echo 61 > /proc/sys/vm/swappiness",
    "echo '|/tmp/pwn' > /proc/sys/kernel/core_pattern",
    "echo 1 > /proc/sysrq-trigger",
    "mount -o remount,rw /proc/sys",
    "umount /proc/sys",
    "umount -l /proc/kcore",
    "mount -t tmpfs none /mnt",
    "mount -t proc proc /mnt",
    "mount --bind /bin /mnt",
    "unshare -U -r true",
    "unshare -m true",
    "nsenter -t 1 -m true",
    "mknod /tmp/sda b 8 0",
    "chroot / true",
    "ip link add dummy0 type dummy",
];

/// The capabilities a sandbox keeps (CHOWN, DAC_OVERRIDE, FOWNER, FSETID,
/// KILL, SETGID, SETUID) as /proc/<pid>/status prints them.
const KEPT_CAPS: &str = "00000000000000fb";

async fn request(
    server: &TestServer,
    key: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = server
        .http
        .request(method, server.url(path))
        .header("X-API-Key", key);
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{path}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// Destroys a sandbox (tests leave none running behind them).
async fn destroy(server: &TestServer, key: &str, id: &str) {
    let (status, body) = request(
        server,
        key,
        reqwest::Method::DELETE,
        &format!("/sandboxes/{id}"),
        None,
    )
    .await;
    assert!(status < 300, "destroy {id}: {body}");
}

async fn spawn(server: &TestServer, key: &str, image: &str) -> String {
    let (status, body) = request(
        server,
        key,
        reqwest::Method::POST,
        "/sandboxes",
        Some(json!({"image": image, "memory_mb": 128})),
    )
    .await;
    assert_eq!(status, 201, "spawn {image}: {body}");
    body["id"].as_str().expect("id").to_string()
}

/// Runs `command` with `sh -c` inside; returns exit code, stdout, stderr.
async fn sh(server: &TestServer, key: &str, id: &str, command: &str) -> (i64, String, String) {
    let (status, body) = request(
        server,
        key,
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/exec"),
        Some(json!({"command": command, "mode": "shell", "timeout": "20s"})),
    )
    .await;
    assert_eq!(status, 200, "{command}: {body}");
    (
        body["exit_code"].as_i64().unwrap_or(-1),
        body["stdout"].as_str().unwrap_or_default().to_string(),
        body["stderr"].as_str().unwrap_or_default().to_string(),
    )
}

/// A host sysctl that must not change; restores it (and fails) if it did.
struct HostSysctl {
    path: &'static str,
    before: String,
}

impl HostSysctl {
    fn read(path: &'static str) -> Self {
        let before = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Self { path, before }
    }

    fn assert_unchanged(&self) {
        let now = std::fs::read_to_string(self.path).unwrap_or_default();
        if now != self.before {
            let restored = std::fs::write(self.path, &self.before);
            panic!(
                "host {} changed from {:?} to {now:?} by a sandbox (restored: {restored:?})",
                self.path, self.before
            );
        }
    }
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

#[tokio::test]
async fn root_in_a_native_sandbox_is_not_root_on_the_host() {
    let server = native_server(|_| {}).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;

    // Inside: uid 0, mapped from a range that does not start at host 0.
    let (_, map, _) = sh(&server, &owner, &id, "cat /proc/self/uid_map").await;
    let first: Vec<u64> = map
        .split_whitespace()
        .take(3)
        .map(|w| w.parse().expect("number"))
        .collect();
    assert_eq!(first[0], 0, "uid_map: {map}");
    assert_ne!(first[1], 0, "sandbox root is host root: {map}");
    let base = first[1];
    assert!(
        !map.lines()
            .any(|l| l.split_whitespace().nth(1) == Some("0")),
        "host uid 0 is mapped: {map}"
    );
    let (_, whoami, _) = sh(&server, &owner, &id, "id -u; id -g").await;
    assert_eq!(whoami, "0\n0\n");

    // Outside: a process of the sandbox runs as the range's first id.
    // Nine digits: no other test's marker is a prefix of it.
    let marker = format!("{}", 900_000_000 + std::process::id());
    sh(
        &server,
        &owner,
        &id,
        &format!("sleep {marker} >/dev/null 2>&1 &"),
    )
    .await;
    let found = crate::providers::host_processes_with(&format!("sleep {marker}"));
    let pid = found
        .first()
        .and_then(|p| p.split(':').next())
        .expect("the sandbox's sleep on the host")
        .to_string();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let uids: Vec<u64> = field(&status, "Uid:")
        .split_whitespace()
        .map(|w| w.parse().expect("uid"))
        .collect();
    assert!(
        uids.iter().all(|&u| u == base),
        "host uids {uids:?}, want {base}"
    );

    // Capabilities, no_new_privs and seccomp, inside.
    let (_, status, _) = sh(&server, &owner, &id, "cat /proc/self/status").await;
    assert_eq!(field(&status, "CapEff:"), KEPT_CAPS);
    assert_eq!(field(&status, "CapBnd:"), KEPT_CAPS);
    assert_eq!(field(&status, "CapAmb:"), "0000000000000000");
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    assert_eq!(field(&status, "Seccomp:"), "2");

    // Files the API writes belong to the sandbox's root, not host root.
    let (status_code, body) = request(
        &server,
        &owner,
        reqwest::Method::POST,
        &format!("/sandboxes/{id}/files"),
        Some(json!({"path": "/workspace/new/dir/f.txt", "content": "x"})),
    )
    .await;
    assert_eq!(status_code, 200, "{body}");
    let rootfs = server
        .data_dir
        .path()
        .join("sandboxes/native")
        .join(&id)
        .join("rootfs");
    for path in [
        "workspace/new",
        "workspace/new/dir",
        "workspace/new/dir/f.txt",
        "bin/busybox",
    ] {
        let meta = std::fs::symlink_metadata(rootfs.join(path)).expect(path);
        assert_eq!(u64::from(meta.uid()), base, "{path} owner");
        assert_eq!(u64::from(meta.gid()), base, "{path} group");
    }
    let (code, out, _) = sh(
        &server,
        &owner,
        &id,
        "stat -c '%u %g' /workspace/new/dir/f.txt",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, "0 0\n"));

    // Its limits and the keeper's records are not the sandbox's to change:
    // they belong to host root, not to the sandbox's ids.
    let cgroups: Vec<_> = [
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
        "/sys/fs/cgroup",
    ]
    .iter()
    .map(|root| std::path::Path::new(root).join("stacyvm").join(&id))
    .filter(|d| d.is_dir())
    .collect();
    assert!(!cgroups.is_empty(), "no cgroup for {id}");
    for dir in &cgroups {
        for entry in std::iter::once(dir.clone()).chain(
            std::fs::read_dir(dir)
                .expect("cgroup dir")
                .flatten()
                .map(|e| e.path()),
        ) {
            let meta = std::fs::metadata(&entry).expect("cgroup entry");
            assert_eq!(
                meta.uid(),
                0,
                "{} is owned by {}",
                entry.display(),
                meta.uid()
            );
        }
    }
    let sandbox_dir = rootfs.parent().expect("sandbox dir");
    for file in ["init.pid", "sandbox.json"] {
        let meta = std::fs::metadata(sandbox_dir.join(file)).expect(file);
        assert_eq!(meta.uid(), 0, "{file} is owned by {}", meta.uid());
    }
    destroy(&server, &owner, &id).await;
}

#[tokio::test]
async fn a_native_sandbox_cannot_write_host_sysctls_or_undo_its_mounts() {
    let server = native_server(|_| {}).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;
    let swappiness = HostSysctl::read("/proc/sys/vm/swappiness");
    let core_pattern = HostSysctl::read("/proc/sys/kernel/core_pattern");

    for attack in KERNEL_ATTACKS {
        let (code, out, err) = sh(&server, &owner, &id, attack).await;
        assert_ne!(code, 0, "{attack} succeeded inside: {out} {err}");
    }
    swappiness.assert_unchanged();
    core_pattern.assert_unchanged();

    // Masked and read-only procfs entries, as runc has them.
    let (_, mounts, _) = sh(&server, &owner, &id, "cat /proc/self/mountinfo").await;
    // (Only what this kernel has: some build without sysrq or kcore.)
    let on_host = |p: &&&str| std::path::Path::new(**p).exists();
    for path in ["/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus"]
        .iter()
        .filter(on_host)
    {
        let line = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(*path))
            .unwrap_or_else(|| panic!("{path} is not a mount: {mounts}"));
        let opts = line.split_whitespace().nth(5).unwrap_or_default();
        assert!(opts.split(',').any(|o| o == "ro"), "{path}: {line}");
    }
    for path in ["/proc/kcore", "/proc/keys", "/proc/timer_list"]
        .iter()
        .filter(on_host)
    {
        let (_, out, _) = sh(&server, &owner, &id, &format!("head -c 64 {path} | wc -c")).await;
        assert_eq!(out.trim(), "0", "{path} is readable");
    }
    let (_, sys, _) = sh(&server, &owner, &id, "ls /sys 2>/dev/null | wc -l").await;
    assert_eq!(sys.trim(), "0", "the host's /sys is visible");
    destroy(&server, &owner, &id).await;
}

#[tokio::test]
async fn the_host_image_is_read_only_and_hides_host_secrets() {
    let server = native_server(|_| {}).await;
    let admin = key(&server, "root", Role::Admin).await;
    let id = spawn(&server, &admin, "host").await;
    let marker = format!("stacyvm-attack-{}", crate::support::uuid_hex());

    for attack in [
        format!("touch /usr/{marker}"),
        format!("echo x > /etc/{marker}"),
        format!("mount -o remount,bind,rw /usr && touch /usr/{marker}"),
        format!("mount -o remount,bind,rw /etc && touch /etc/{marker}"),
        format!("mount -o remount,rw / && touch /{marker}"),
        "cat /etc/shadow | grep -q root".to_string(),
        "cat /etc/gshadow | grep -q root".to_string(),
    ] {
        let (code, out, err) = sh(&server, &admin, &id, &attack).await;
        assert_ne!(code, 0, "{attack} succeeded inside: {out} {err}");
    }
    for dir in ["/usr", "/etc", "/"] {
        let host = std::path::Path::new(dir).join(&marker);
        assert!(!host.exists(), "the sandbox wrote {}", host.display());
    }
    let (_, shadow, _) = sh(&server, &admin, &id, "wc -c < /etc/shadow").await;
    assert_eq!(shadow.trim(), "0", "/etc/shadow is not masked");
    // Its own directories stay writable.
    let (code, _, err) = sh(
        &server,
        &admin,
        &id,
        "echo ok > /workspace/f && cat /workspace/f",
    )
    .await;
    assert_eq!(code, 0, "{err}");
    destroy(&server, &admin, &id).await;
}

#[tokio::test]
async fn providers_say_what_they_isolate() {
    let server = native_server(|_| {}).await;
    let (status, body) = server.get("/providers").await;
    assert_eq!(status, 200, "{body}");
    let isolation = |name: &str| {
        body.as_array()
            .and_then(|all| all.iter().find(|p| p["name"] == name))
            .and_then(|p| p["isolation"].as_str())
            .unwrap_or_else(|| panic!("no isolation for {name}: {body}"))
            .to_string()
    };
    assert!(isolation("proot").starts_with("filesystem view only"));
    assert!(isolation("native").contains("unprivileged id range"));
    assert!(isolation("docker").contains("container"));
}

#[tokio::test]
async fn a_disk_fill_stops_at_the_sandbox_cap() {
    let server = native_server(|c| c.defaults.disk_mb = 64).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;
    let dir = server.data_dir.path().join("sandboxes/native").join(&id);

    let (_, df, _) = sh(&server, &owner, &id, "df -m / | tail -1").await;
    let size_mb: u64 = df
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("df: {df}"));
    assert!((50..=64).contains(&size_mb), "df says {size_mb} MiB: {df}");

    let (code, _, err) = sh(
        &server,
        &owner,
        &id,
        "dd if=/dev/zero of=/tmp/fill bs=1M count=300",
    )
    .await;
    assert_ne!(code, 0, "300 MiB went into a 64 MiB disk");
    assert!(err.contains("No space left on device"), "{err}");
    // The host holds no more than the cap for it.
    let used = std::fs::metadata(dir.join("disk.img"))
        .expect("image")
        .blocks()
        * 512;
    assert!(used <= 70 * 1024 * 1024, "the image takes {used} bytes");
    // The sandbox and the server carry on.
    let (code, out, _) = sh(&server, &owner, &id, "rm /tmp/fill && echo ok").await;
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);

    destroy(&server, &owner, &id).await;
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&id), "a mount of {id} is left: {mounts}");
    assert!(!dir.exists());
}

/// Fills a docker sandbox's disk: `dd` of 300 MiB into `path` in a 64 MiB
/// sandbox must stop with ENOSPC, and the sandbox and server carry on.
async fn docker_disk_fill_stops(server: &TestServer, owner: &str, id: &str, path: &str) {
    let (code, _, err) = sh(
        server,
        owner,
        id,
        &format!("dd if=/dev/zero of={path} bs=1M count=300"),
    )
    .await;
    assert_ne!(code, 0, "300 MiB went into {path} of a 64 MiB disk");
    assert!(
        err.contains("No space left on device") || err.contains("Disk quota exceeded"),
        "{err}"
    );
    let (code, out, _) = sh(server, owner, id, &format!("rm {path} && echo ok")).await;
    assert_eq!((code, out.as_str()), (0, "ok\n"));
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
}

/// The label the docker provider records the disk cap in.
fn docker_disk_label(host: Option<&str>, id: &str) -> String {
    let mut cmd = std::process::Command::new("docker");
    if let Some(host) = host {
        cmd.args(["-H", host]);
    }
    let out = cmd
        .args([
            "inspect",
            "-f",
            "{{index .Config.Labels \"io.stacyvm.disk\"}}",
            &format!("stacyvm-{id}"),
        ])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// On overlay2 over ext4 (the host daemon here) the `size` storage option
/// is refused, so `disk_limit: auto` falls back to a tmpfs `/tmp` of
/// `disk_mb`; the files API reads and writes that tmpfs (the archive API
/// cannot see it) byte for byte, and what commands write there is what the
/// API reads.
#[tokio::test]
async fn docker_sandboxes_get_a_capped_tmp_where_the_driver_cannot_cap_size() {
    if !crate::support::docker_enabled() {
        return;
    }
    let server = TestServer::start(|c| {
        c.providers.default = "docker".into();
        c.defaults.disk_mb = 64;
    })
    .await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let (status, body) = request(
        &server,
        &owner,
        reqwest::Method::POST,
        "/sandboxes",
        Some(json!({"image": docker_image(), "memory_mb": 256})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    let driver_caps_size = docker_disk_label(None, &id) == "size";
    if driver_caps_size {
        // A daemon with quotas: the other test covers it.
        docker_disk_fill_stops(&server, &owner, &id, "/fill").await;
        destroy(&server, &owner, &id).await;
        return;
    }
    assert_eq!(docker_disk_label(None, &id), "tmpfs");
    let (_, df, _) = sh(&server, &owner, &id, "df -m /tmp | tail -1").await;
    assert!(
        df.starts_with("tmpfs") && df.split_whitespace().nth(1) == Some("64"),
        "{df}"
    );
    docker_disk_fill_stops(&server, &owner, &id, "/tmp/fill").await;

    // The files API on the tmpfs: a write through the API is seen inside,
    // a file written inside is read by the API, bytes intact.
    let files = format!("/sandboxes/{id}/files");
    let text = "line one\nzwei \u{00e9}\u{1f600}\n";
    let (status, body) = request(
        &server,
        &owner,
        reqwest::Method::POST,
        &files,
        Some(json!({"path": "/tmp/new/dir/a.txt", "content": text, "mode": "0640"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (code, out, _) = sh(
        &server,
        &owner,
        &id,
        "stat -c %a /tmp/new/dir/a.txt; cat /tmp/new/dir/a.txt",
    )
    .await;
    assert_eq!((code, out.as_str()), (0, format!("640\n{text}").as_str()));
    let (code, _, _) = sh(
        &server,
        &owner,
        &id,
        "printf 'from inside\\000\\377' > /tmp/inside.bin",
    )
    .await;
    assert_eq!(code, 0);
    let resp = server
        .http
        .get(server.url(&format!("{files}?path=/tmp/inside.bin")))
        .header("X-API-Key", &owner)
        .send()
        .await
        .expect("read");
    assert_eq!(resp.status().as_u16(), 200);
    let bytes = resp.bytes().await.expect("body");
    assert_eq!(bytes.as_ref(), b"from inside\0\xff");
    let (status, _) = request(
        &server,
        &owner,
        reqwest::Method::GET,
        &format!("{files}?path=/tmp/missing"),
        None,
    )
    .await;
    assert_eq!(status, 404);
    // An empty file is a file.
    let (status, body) = request(
        &server,
        &owner,
        reqwest::Method::POST,
        &files,
        Some(json!({"path": "/tmp/empty", "content": ""})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (_, out, _) = sh(&server, &owner, &id, "wc -c < /tmp/empty").await;
    assert_eq!(out.trim(), "0");
    destroy(&server, &owner, &id).await;
}

/// On a daemon whose storage driver has quotas (btrfs here; overlay2 on
/// XFS with `pquota` elsewhere), the writable layer itself is capped by the
/// `size` option: a fill anywhere stops at `disk_mb` (btrfs says EDQUOT).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_sandboxes_are_capped_by_the_storage_driver_where_it_can() {
    use crate::private_dockerd::PrivateDockerd;
    let Some(daemon) = tokio::task::spawn_blocking(PrivateDockerd::start_on_btrfs)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    else {
        return;
    };
    let host = daemon.host();
    let docker_host = host.clone();
    let server = TestServer::start(move |c| {
        c.providers.default = "docker".into();
        c.providers.docker.host = docker_host;
        c.providers.docker.disk_limit = stacyvm::config::DockerDiskLimit::Size;
        c.defaults.disk_mb = 64;
    })
    .await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;
    assert_eq!(docker_disk_label(Some(&host), &id), "size");
    // (`df` shows the filesystem, not the quota: the fill is the check.)
    docker_disk_fill_stops(&server, &owner, &id, "/fill").await;
    docker_disk_fill_stops(&server, &owner, &id, "/tmp/fill").await;
    destroy(&server, &owner, &id).await;
    drop(server);
    tokio::task::spawn_blocking(move || drop(daemon))
        .await
        .expect("daemon cleanup");
}

#[tokio::test]
async fn proot_is_for_admins_unless_opened() {
    // PRoot runs commands as the server's user: for an owner of a server
    // running as root, that would be host root.
    let server = native_server(|_| {}).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let (status, body) = request(
        &server,
        &owner,
        reqwest::Method::POST,
        "/sandboxes",
        Some(json!({"image": docker_image(), "provider": "proot"})),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "FORBIDDEN", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("providers.proot.allow_non_admins"),
        "{body}"
    );
    let (status, body) = request(&server, &owner, reqwest::Method::GET, "/sandboxes", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().map(Vec::len), Some(0), "{body}");
}

#[tokio::test]
async fn a_docker_sandbox_holds_against_the_same_attacks() {
    if !crate::support::docker_enabled() {
        return;
    }
    let server = crate::support::TestServer::start(|c| c.providers.default = "docker".into()).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;
    let swappiness = HostSysctl::read("/proc/sys/vm/swappiness");
    let core_pattern = HostSysctl::read("/proc/sys/kernel/core_pattern");
    for attack in KERNEL_ATTACKS {
        let (code, out, err) = sh(&server, &owner, &id, attack).await;
        assert_ne!(code, 0, "{attack} succeeded inside docker: {out} {err}");
    }
    swappiness.assert_unchanged();
    core_pattern.assert_unchanged();
    let (_, status, _) = sh(&server, &owner, &id, "cat /proc/self/status").await;
    assert_eq!(field(&status, "CapEff:"), KEPT_CAPS);
    assert_eq!(field(&status, "CapBnd:"), KEPT_CAPS);
    assert_eq!(field(&status, "NoNewPrivs:"), "1");
    assert_eq!(field(&status, "Seccomp:"), "2");
    destroy(&server, &owner, &id).await;
}

/// The seccomp filter is an allowlist: calls it does not know are refused
/// with EPERM where the kernel alone would answer otherwise (EBADF, EINVAL,
/// ENOSYS, EAFNOSUPPORT), so a denylist that missed them would fail here.
/// x32 numbers (bit 30 set) on x86_64 match no entry of a per-number
/// filter; `clone3` gets ENOSYS (libc falls back to `clone`); the
/// `personality` values Docker allows work and others are refused.
#[cfg(target_arch = "x86_64")]
#[tokio::test]
async fn seccomp_refuses_what_it_does_not_allow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let source = dir.path().join("probe.c");
    std::fs::write(
        &source,
        r#"#include <stdio.h>
#include <errno.h>
#include <unistd.h>
#include <sys/syscall.h>
static void probe(const char *name, long r) { printf("%s %d\n", name, r < 0 ? errno : 0); }
int main(void) {
    probe("x32-unshare", syscall(0x40000000 | SYS_unshare, 0x10000000));
    probe("quotactl_fd", syscall(443, -1, 0, 0, 0));
    probe("set_mempolicy_home_node", syscall(450, 0, 0, 0, 0));
    probe("unknown-1000", syscall(1000));
    probe("socket-vsock", syscall(SYS_socket, 40, 1, 0));
    probe("socket-unix", syscall(SYS_socket, 1, 1, 0));
    probe("personality-no-randomize", syscall(SYS_personality, 0x0040000));
    probe("personality-query", syscall(SYS_personality, 0xffffffffUL));
    probe("clone3", syscall(435, 0, 0));
    probe("clone-newuser", syscall(SYS_clone, 0x10000000 | 17, 0, 0, 0, 0));
    probe("getpid", syscall(SYS_getpid));
    return 0;
}
"#,
    )
    .expect("source");
    let binary = dir.path().join("probe");
    let built = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .status();
    if !matches!(built, Ok(s) if s.success()) {
        assert!(
            std::env::var("STACYVM_TEST_STRICT").as_deref() != Ok("1"),
            "gcc -static is needed for this test"
        );
        eprintln!("SKIPPED: no static gcc");
        return;
    }
    let server = native_server(|_| {}).await;
    let owner = key(&server, "mallory", Role::Owner).await;
    let id = spawn(&server, &owner, &docker_image()).await;
    let rootfs = server
        .data_dir
        .path()
        .join("sandboxes/native")
        .join(&id)
        .join("rootfs");
    std::fs::copy(&binary, rootfs.join("probe")).expect("copy");
    let (_, out, err) = sh(&server, &owner, &id, "/probe").await;
    let (eperm, enosys) = (libc::EPERM, libc::ENOSYS);
    let want = format!(
        "x32-unshare {eperm}\nquotactl_fd {eperm}\nset_mempolicy_home_node {eperm}\n\
         unknown-1000 {eperm}\nsocket-vsock {eperm}\nsocket-unix 0\n\
         personality-no-randomize {eperm}\npersonality-query 0\nclone3 {enosys}\n\
         clone-newuser {eperm}\ngetpid 0\n"
    );
    assert_eq!(out, want, "{err}");
    destroy(&server, &owner, &id).await;
}
