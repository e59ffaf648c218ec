//! Per-sandbox limits of the native provider, enforced through cgroups:
//! a fork bomb, a memory hog, an OOM-killed init and busy loops, measured
//! from the host through the sandbox's own cgroup files (not through the
//! provider), on cgroup v2 or v1 as the host has them.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{TestServer, docker_image, native_server};

/// Where the host's cgroup hierarchy for `controller` is mounted (v2: the
/// unified root when it offers memory, pids and cpu), read independently
/// of the provider's own detection.
fn controller_root(controller: &str) -> PathBuf {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let mut v1 = None;
    for line in mountinfo.lines() {
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let point = before.split(' ').nth(4).unwrap_or_default();
        let mut after = after.split(' ');
        let fstype = after.next().unwrap_or_default();
        let options = after.nth(1).unwrap_or_default();
        if fstype == "cgroup2" {
            let available =
                std::fs::read_to_string(format!("{point}/cgroup.controllers")).unwrap_or_default();
            let available: Vec<&str> = available.split_whitespace().collect();
            if ["memory", "pids", "cpu"]
                .iter()
                .all(|c| available.contains(c))
            {
                return PathBuf::from(point);
            }
        }
        if fstype == "cgroup" && options.split(',').any(|o| o == controller) && v1.is_none() {
            v1 = Some(PathBuf::from(point));
        }
    }
    v1.unwrap_or_else(|| panic!("no cgroup hierarchy for {controller}"))
}

fn is_v2() -> bool {
    controller_root("memory")
        .join("cgroup.controllers")
        .exists()
        && controller_root("memory") == controller_root("pids")
}

/// A file of the sandbox's cgroup in `controller`'s hierarchy.
fn cgroup_file(controller: &str, id: &str, name: &str) -> PathBuf {
    controller_root(controller)
        .join("stacyvm")
        .join(id)
        .join(name)
}

fn read_number(path: &PathBuf) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {text:?}: {e}", path.display()))
}

fn read_key(path: &PathBuf, key: &str) -> u64 {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{}: no {key} in {text:?}", path.display()))
}

/// CPU time the sandbox's cgroup has used, in nanoseconds.
fn cpu_usage_ns(id: &str) -> u64 {
    if is_v2() {
        read_key(&cgroup_file("cpu", id, "cpu.stat"), "usage_usec") * 1000
    } else {
        read_number(&cgroup_file("cpuacct", id, "cpuacct.usage"))
    }
}

/// Every directory the sandbox's cgroup could have.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ["memory", "pids", "cpu", "cpuacct"]
        .iter()
        .map(|c| controller_root(c).join("stacyvm").join(id))
        .collect();
    dirs.dedup();
    dirs
}

fn assert_no_cgroup_left(id: &str) {
    for dir in cgroup_dirs(id) {
        assert!(!dir.exists(), "{} is left after destroy", dir.display());
    }
}

async fn spawn(server: &TestServer, memory_mb: u32, vcpus: u32) -> String {
    let (status, body) = server
        .post(
            "/sandboxes",
            json!({"image": docker_image(), "memory_mb": memory_mb, "vcpus": vcpus}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    for dir in cgroup_dirs(&id) {
        assert!(dir.is_dir(), "{} missing after spawn", dir.display());
    }
    id
}

async fn exec(server: &TestServer, id: &str, command: &str, timeout: &str) -> (u16, Value) {
    server
        .post(
            &format!("/sandboxes/{id}/exec"),
            json!({"command": command, "mode": "shell", "timeout": timeout}),
        )
        .await
}

async fn destroy(server: &TestServer, id: &str) {
    let (status, body) = server.delete(&format!("/sandboxes/{id}")).await;
    assert!(status == 200 || status == 204, "{status} {body}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while cgroup_dirs(id).iter().any(|d| d.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_cgroup_left(id);
}

/// Processes on the host running exactly `argv` (other tests run at the
/// same time, so the host's total says nothing).
fn processes_running(argv: &[&str]) -> usize {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .filter(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c == wanted))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_is_held_to_the_pids_limit() {
    const LIMIT: u64 = 100;
    let server = native_server(|c| c.providers.native.pids_limit = LIMIT).await;
    let bombed = spawn(&server, 256, 1).await;
    let other = spawn(&server, 256, 1).await;
    let pids_max = cgroup_file("pids", &bombed, "pids.max");
    assert_eq!(read_number(&pids_max), LIMIT);
    // The bomb's processes, as the host sees them (73: no other test
    // sleeps that long).
    let bomb = ["sleep", "73"];
    assert_eq!(processes_running(&bomb), 0);

    // Watch the sandbox's process count from the host while the bomb runs.
    let current = cgroup_file("pids", &bombed, "pids.current");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(text) = std::fs::read_to_string(&current)
                    && let Ok(n) = text.trim().parse::<u64>()
                {
                    peak = peak.max(n);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        })
    };
    let (status, body) = exec(
        &server,
        &bombed,
        "for i in $(seq 2000); do sleep 73 & done; echo launched",
        "20s",
    )
    .await;
    eprintln!("fork bomb exec: {status} {:.300}", body.to_string());
    // The sandbox is full (its sleeps live on), yet the server and another
    // sandbox keep working.
    assert_eq!(server.shell(&other, "echo alive").await.trim(), "alive");
    let (status, body) = server.get("/health").await;
    assert_eq!(status, 200, "{body}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = watcher.join().expect("watcher");
    assert!(
        peak <= LIMIT,
        "{peak} processes in a sandbox limited to {LIMIT}"
    );
    // It did run into the limit: the bound held, not a lack of trying.
    assert!(peak >= LIMIT - 5, "the bomb only reached {peak} processes");
    let failcnt = cgroup_file("pids", &bombed, "pids.events");
    if failcnt.exists() {
        eprintln!("pids.events: {:?}", std::fs::read_to_string(&failcnt));
    }

    destroy(&server, &bombed).await;
    // Every process of the bomb is gone.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = processes_running(&bomb);
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} of the bomb's processes left after destroy"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    destroy(&server, &other).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_is_oom_killed_within_the_sandbox_limit() {
    let server = native_server(|_| {}).await;
    let id = spawn(&server, 64, 1).await;
    let limit: u64 = 64 * 1024 * 1024;
    let (memory, peak) = if is_v2() {
        ("memory.max", "memory.peak")
    } else {
        ("memory.limit_in_bytes", "memory.max_usage_in_bytes")
    };
    assert_eq!(read_number(&cgroup_file("memory", &id, memory)), limit);
    // Eight processes each holding 20 MB (busybox tail keeps its one
    // newline-free "line" in memory until EOF); the command reports the
    // worst end among them.
    let hog = "pids=''; \
        for i in 1 2 3 4 5 6 7 8; do { head -c 20m /dev/zero; sleep 3; } | tail >/dev/null & pids=\"$pids $!\"; done; \
        rc=0; for p in $pids; do wait $p || rc=$?; done; exit $rc";
    let (status, body) = exec(&server, &id, hog, "60s").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["exit_code"], 137, "{body}");
    let stderr = body["stderr"].as_str().unwrap_or_default();
    assert!(
        stderr.contains(
            "stacyvm: the command was killed by the OOM killer (sandbox memory limit 64 MiB)"
        ),
        "{body}"
    );
    let peak_bytes = read_number(&cgroup_file("memory", &id, peak));
    assert!(
        peak_bytes <= limit,
        "peak {peak_bytes} over the limit {limit}"
    );
    // Without swap to spill into, not with swap either.
    let memsw = cgroup_file("memory", &id, "memory.memsw.limit_in_bytes");
    if memsw.exists() {
        assert_eq!(read_number(&memsw), limit);
    }
    // The provider log says so too.
    let (status, logs) = server.get(&format!("/sandboxes/{id}/logs")).await;
    assert_eq!(status, 200, "{logs}");
    assert!(logs.to_string().contains("OOM killer"), "{logs}");
    // A command that fits still runs, with its address space unlimited
    // (no RLIMIT_AS: reserving is not using).
    assert_eq!(
        server
            .shell(&id, "ulimit -v; head -c 10m /dev/zero | wc -c")
            .await
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["unlimited", "10485760"]
    );
    destroy(&server, &id).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_init_killed_by_the_oom_killer_is_the_sandbox_cause() {
    let server = native_server(|c| {
        c.lifecycle.reconcile_interval = stacyvm::duration::GoDuration(Duration::from_millis(300));
    })
    .await;
    let id = spawn(&server, 63, 1).await;
    let record_file = server
        .data_dir
        .path()
        .join("sandboxes/native")
        .join(&id)
        .join("init.pid");
    let record: Value =
        serde_json::from_slice(&std::fs::read(&record_file).expect("init.pid")).expect("json");
    let pid = record["pid"].as_i64().expect("pid");
    // 63 MiB is 16128 pages: oom_score_adj 1000 adds 1000 * (16128 /
    // 1000, integer division) = 16000 to PID 1's badness, and with its
    // own few hundred pages that is more than any process inside can hold
    // once the command drops its own bias (commands start at 500, so that
    // normally they, not PID 1, are the OOM killer's choice). At 64 MiB
    // (16384 pages, the same 16000) a small PID 1 such as the agent loses.
    std::fs::write(format!("/proc/{pid}/oom_score_adj"), "1000").expect("oom_score_adj");
    let (status, body) = exec(
        &server,
        &id,
        // Into the sandbox's tmpfs: charged to its memory cgroup but to no
        // process's RSS, so the OOM killer's choice is PID 1, by its bias,
        // not a race between PID 1 and a growing process.
        "echo 0 > /proc/self/oom_score_adj && head -c 200m /dev/zero > /dev/hog",
        "60s",
    )
    .await;
    eprintln!("exec during the init's OOM kill: {status} {body}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let record = server
            .app_service
            .store()
            .get_sandbox(&id)
            .await
            .expect("store")
            .expect("record");
        if let Some(reason) = record.state_reason.clone().filter(|r| r.contains("OOM")) {
            break reason;
        }
        assert!(
            Instant::now() < deadline,
            "no OOM cause: {} ({:?}) {:?}",
            record.state,
            record.state_reason,
            record_file
                .parent()
                .map(|d| std::fs::read_to_string(d.join("init.exit")))
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        reason.contains(
            "its init was killed by the kernel OOM killer (the memory limit of 63 MiB was reached)"
        ),
        "{reason}"
    );
    // The reconciler fails and destroys the sandbox: nothing is left.
    server
        .wait_for_state(&id, "destroyed", Duration::from_secs(20))
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cgroup_dirs(&id).iter().any(|d| d.exists()) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_no_cgroup_left(&id);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_loops_get_no_more_cpu_than_the_sandbox_vcpus() {
    let server = native_server(|_| {}).await;
    let id = spawn(&server, 128, 1).await;
    if is_v2() {
        let max = std::fs::read_to_string(cgroup_file("cpu", &id, "cpu.max")).expect("cpu.max");
        assert_eq!(max.trim(), "100000 100000");
    } else {
        assert_eq!(
            read_number(&cgroup_file("cpu", &id, "cpu.cfs_quota_us")),
            100_000
        );
        assert_eq!(
            read_number(&cgroup_file("cpu", &id, "cpu.cfs_period_us")),
            100_000
        );
    }
    let used_before = cpu_usage_ns(&id);
    let started = Instant::now();
    let (status, body) = exec(
        &server,
        &id,
        "timeout 3 sh -c 'while :; do :; done' & timeout 3 sh -c 'while :; do :; done' & wait",
        "30s",
    )
    .await;
    let wall = started.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{body}");
    let used = (cpu_usage_ns(&id) - used_before) as f64 / 1e9;
    eprintln!(
        "two busy loops with vcpus 1: {used:.2} CPU-s in {wall:.2} s; cpu.stat: {:?}",
        std::fs::read_to_string(cgroup_file("cpu", &id, "cpu.stat")).unwrap_or_default()
    );
    // One CPU's worth per second at most, with a margin for the period
    // boundaries and the exec's own start-up.
    assert!(
        used <= 1.2 * wall,
        "{used:.2} CPU-s in {wall:.2} s with vcpus 1"
    );
    assert!(used >= 0.5, "the loops barely ran: {used:.2} CPU-s");
    // Stats read the cgroup: the sandbox's init (and nothing else once the
    // killed loops have been reaped, which may take a moment).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, stats) = loop {
        let (status, stats) = server.get(&format!("/sandboxes/{id}/stats")).await;
        if stats["pids"] == 1 || Instant::now() > deadline {
            break (status, stats);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["supported"], true, "{stats}");
    assert_eq!(stats["pids"], 1, "{stats}");
    assert_eq!(stats["mem_limit_bytes"], 128u64 << 20, "{stats}");
    assert!(
        // Read from the cgroup, so at most its limit; it may be 0 once the
        // loops are gone (PID 1's pages were charged before it moved in).
        stats["mem_bytes"]
            .as_u64()
            .is_some_and(|b| b <= 128u64 << 20),
        "{stats}"
    );
    destroy(&server, &id).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_up_removes_cgroups_of_sandboxes_that_are_gone() {
    // An empty cgroup of a sandbox this server never had, old enough not
    // to be a keeper's about to receive its PID 1.
    let orphan = format!("gone-{}", crate::support::uuid_hex());
    for dir in cgroup_dirs(&orphan) {
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
        let old = std::process::Command::new("touch")
            .args(["-d", "2 hours ago"])
            .arg(&dir)
            .status()
            .expect("touch");
        assert!(old.success());
    }
    // A fresh one (a spawn in progress elsewhere) is left alone.
    let fresh = format!("fresh-{}", crate::support::uuid_hex());
    for dir in cgroup_dirs(&fresh) {
        std::fs::create_dir_all(&dir).expect("mkdir cgroup");
    }
    let server = native_server(|_| {}).await;
    assert_no_cgroup_left(&orphan);
    assert!(cgroup_dirs(&fresh).iter().all(|d| d.is_dir()));
    for dir in cgroup_dirs(&fresh) {
        std::fs::remove_dir(&dir).expect("rmdir");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_whose_cgroup_cannot_be_set_up_fails_to_spawn_and_leaves_nothing() {
    // More than the kernel's PID_MAX_LIMIT: pids.max refuses it (the
    // config loader would too; this server's config is built in process).
    let server = native_server(|c| c.providers.native.pids_limit = 5_000_000).await;
    let (status, body) = server
        .post("/sandboxes", json!({"image": docker_image()}))
        .await;
    assert!(status >= 400, "{status} {body}");
    let all = server
        .app_service
        .store()
        .list_sandboxes(&stacyvm::store::SandboxFilter {
            owner_id: None,
            states: Some(stacyvm::lifecycle::SandboxState::ALL.to_vec()),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 1, "{all:?}");
    let record = &all[0];
    let reason = record.state_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("cannot limit the sandbox through cgroups") && reason.contains("pids.max"),
        "{} {reason:?} / {body}",
        record.state
    );
    assert_no_cgroup_left(&record.id);
    let dirs = std::fs::read_dir(server.data_dir.path().join("sandboxes/native"))
        .map(|d| d.flatten().count())
        .unwrap_or(0);
    assert_eq!(dirs, 0, "sandbox directories left behind");
    assert!(crate::providers::host_processes_with(&record.id).is_empty());
    server.stop().await;
}
