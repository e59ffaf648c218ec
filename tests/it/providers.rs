//! Provider conformance: one set of cases, written once against
//! `Arc<dyn Provider>`, run for every provider.
//!
//! Each case spawns its own sandbox, so cases are independent and run in
//! parallel. To add a provider, write a fixture function returning a
//! [`Fixture`] and add one line: `conformance_tests!(name, fixture().await);` (the fixture
//! expression yields `Option<Fixture>`; `None` skips, e.g. without Docker).
//!
//! Providers that run image tarballs read the rootfs from the env var
//! `STACYVM_TEST_ROOTFS` (default `/tmp/rootfs.tar`): a busybox tree.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use stacyvm::provider::docker::DockerProvider;
use stacyvm::provider::image_store::ImageStore;
use stacyvm::provider::native::NativeProvider;
use stacyvm::provider::proot::ProotProvider;
use stacyvm::provider::{
    ExecExit, ExecSpec, OutputChunk, Provider, ProviderError, SpawnSpec, StreamKind,
};
use tokio::sync::mpsc;

/// The image name the busybox tarball is imported under.
const TEST_IMAGE: &str = "stacyvm-test:busybox";

/// A provider under test and what the cases need to know about it.
pub struct Fixture {
    pub provider: Arc<dyn Provider>,
    /// An image with busybox (`sh`, `echo`, `sleep`, `ln`, `cat`, ...).
    pub image: String,
    /// Where the provider keeps per-sandbox state on the host, if it does;
    /// used to check that destroy and failed spawns leave nothing.
    pub sandboxes_dir: Option<PathBuf>,
    /// Whether a command killed by a signal is reported as 128 + signal.
    /// proot cannot: it exits 255 and says so on stderr.
    pub reports_signal_deaths: bool,
    /// Keeps the temporary data dir alive for the test's duration.
    pub _data: Option<tempfile::TempDir>,
    /// A server process the provider talks to, killed with the fixture.
    pub _process: Option<tokio::process::Child>,
}

fn rootfs_tarball() -> PathBuf {
    std::env::var_os("STACYVM_TEST_ROOTFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/rootfs.tar"))
}

/// A fresh data dir with the test image imported.
fn data_dir_with_image() -> (tempfile::TempDir, ImageStore) {
    let data = tempfile::tempdir().expect("tempdir");
    let store = ImageStore::new(data.path().join("images"));
    let tarball = rootfs_tarball();
    store.import(TEST_IMAGE, &tarball).unwrap_or_else(|e| {
        panic!(
            "importing {} failed ({e}); set STACYVM_TEST_ROOTFS to a busybox rootfs tarball",
            tarball.display()
        )
    });
    (data, store)
}

/// A native provider using the real `stacyvm` binary for its helpers (the
/// test binary cannot serve as one).
/// Commands go through the in-sandbox agent (built by
/// scripts/build-agent.sh; its absence fails the tests).
fn native_provider(store: ImageStore, dir: PathBuf) -> NativeProvider {
    native_provider_with(store, dir, true)
}

/// `direct`: commands through the agent, else through the exec helper.
fn native_provider_with(store: ImageStore, dir: PathBuf, direct: bool) -> NativeProvider {
    let provider = NativeProvider::new(store, dir)
        .with_helper_binary(env!("CARGO_BIN_EXE_stacyvm").into())
        .with_agent(direct, Path::new(""));
    if direct && let Err(why) = provider.exec_path() {
        panic!("the direct exec path is off: {why}");
    }
    provider
}

pub async fn native_fixture() -> Fixture {
    native_fixture_with(true).await
}

pub async fn native_fixture_with(direct: bool) -> Fixture {
    let (data, store) = data_dir_with_image();
    let dir = data.path().join("sandboxes/native");
    Fixture {
        provider: Arc::new(native_provider_with(store, dir.clone(), direct)),
        image: TEST_IMAGE.into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: true,
        _data: Some(data),
        _process: None,
    }
}

pub async fn proot_fixture() -> Fixture {
    let (data, store) = data_dir_with_image();
    let dir = data.path().join("sandboxes/proot");
    let proot = std::env::var_os("STACYVM_TEST_PROOT").unwrap_or_else(|| "proot".into());
    Fixture {
        provider: Arc::new(ProotProvider::new(store, dir.clone(), proot.into())),
        image: TEST_IMAGE.into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: false,
        _data: Some(data),
        _process: None,
    }
}

/// The Docker provider against the local daemon, when docker tests are
/// on; `direct` says whether exec takes the in-sandbox agent's path (its
/// binary is built by scripts/build-agent.sh) or the Engine API's.
pub async fn docker_provider(direct: bool) -> Option<Arc<DockerProvider>> {
    if !crate::support::docker_enabled() {
        return None;
    }
    let config = stacyvm::config::DockerConfig {
        direct_exec: direct,
        ..Default::default()
    };
    let provider =
        DockerProvider::connect(&config, &format!("in-test-{}", crate::support::uuid_hex()))
            .await
            .unwrap_or_else(|e| panic!("docker: {e}"));
    if direct {
        // Never a silent pass on the Engine API path.
        if let Err(why) = provider.exec_path() {
            panic!("the direct exec path is off: {why}");
        }
    }
    Some(Arc::new(provider))
}

pub async fn docker_fixture(direct: bool) -> Option<Fixture> {
    Some(Fixture {
        provider: docker_provider(direct).await?,
        image: crate::support::docker_image(),
        sandboxes_dir: None,
        reports_signal_deaths: true,
        _data: None,
        _process: None,
    })
}

/// The docker provider with containers under gVisor (`runtime: runsc`),
/// where the daemon has it (`STACYVM_TEST_RUNSC=1`, scripts/test-env.sh);
/// exec takes the Engine API (the agent's socket is out of the host's
/// view under gVisor).
pub async fn docker_runsc_fixture() -> Option<Fixture> {
    if !crate::support::docker_enabled() {
        return None;
    }
    crate::support::require_env("STACYVM_TEST_RUNSC")?;
    let config = stacyvm::config::DockerConfig {
        runtime: "runsc".into(),
        ..Default::default()
    };
    let provider =
        DockerProvider::connect(&config, &format!("in-test-{}", crate::support::uuid_hex()))
            .await
            .unwrap_or_else(|e| panic!("docker: {e}"));
    assert!(provider.exec_path().is_err(), "no direct path under gVisor");
    Some(Fixture {
        provider: Arc::new(provider),
        image: crate::support::docker_image(),
        sandboxes_dir: None,
        reports_signal_deaths: true,
        _data: None,
        _process: None,
    })
}

/// The custom provider (the HTTP contract's client) against `stacyvm
/// custom-provider --provider native` in a process of its own: the
/// contract's reference server, with a key, on a loopback port.
/// `stacyvm custom-provider --provider native` on `port` over `data`,
/// answering once this returns.
async fn start_reference_server(
    data: &Path,
    port: u16,
    key: &str,
) -> (
    tokio::process::Child,
    stacyvm::provider::custom::CustomProvider,
) {
    let process = tokio::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("--data-dir")
        .arg(data)
        .args(["custom-provider", "--provider", "native", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .env("STACYVM_CUSTOM_PROVIDER_KEY", key)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("start stacyvm custom-provider");
    let url = format!("http://127.0.0.1:{port}");
    let provider = stacyvm::provider::custom::CustomProvider::new("custom-test", &url, key)
        .expect("custom provider");
    let started = Instant::now();
    while provider.health().await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stacyvm custom-provider did not answer at {url}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (process, provider)
}

fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    probe.local_addr().expect("addr").port()
}

pub async fn custom_fixture() -> Fixture {
    let (data, _store) = data_dir_with_image();
    let port = free_port();
    let key = crate::support::uuid_hex();
    let (process, provider) = start_reference_server(data.path(), port, &key).await;
    let url = format!("http://127.0.0.1:{port}");
    // Without the key, nothing.
    let stranger = stacyvm::provider::custom::CustomProvider::new("stranger", &url, "wrong")
        .expect("custom provider");
    assert!(stranger.health().await.is_err(), "a wrong key was let in");
    let dir = data.path().join("sandboxes/native");
    Fixture {
        provider: Arc::new(provider),
        image: TEST_IMAGE.into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: true,
        _data: Some(data),
        _process: Some(process),
    }
}

/// The qemu provider with the test kernel (`STACYVM_TEST_KERNEL`, a
/// vmlinuz with its modules in `../lib/modules/<release>`, as unpacked
/// from Debian's linux-image-cloud-amd64 by scripts/test-env.sh). Skipped
/// without one, unless `STACYVM_TEST_STRICT=1` (scripts/test.sh) makes
/// that a failure.
pub async fn qemu_fixture() -> Option<Fixture> {
    let kernel = PathBuf::from(crate::support::require_env("STACYVM_TEST_KERNEL")?);
    let (data, store) = data_dir_with_image();
    let config = stacyvm::config::QemuConfig {
        kernel,
        // Many VMs boot at once under TCG in the suite.
        boot_timeout: stacyvm::duration::GoDuration(Duration::from_secs(180)),
        ..Default::default()
    };
    let dir = data.path().join("sandboxes/qemu");
    let provider = stacyvm::provider::microvm::qemu::QemuProvider::new(
        store,
        dir.clone(),
        data.path().join("vm"),
        config,
    );
    Some(Fixture {
        provider: Arc::new(provider),
        image: TEST_IMAGE.into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: true,
        _data: Some(data),
        _process: None,
    })
}

/// Expand every conformance case into a `#[tokio::test]` for one provider.
macro_rules! conformance_tests {
    ($provider:ident, $fixture:expr) => {
        mod $provider {
            use super::*;
            conformance_tests!(@cases $fixture;
                health_and_image_available,
                exec_stdout_stderr_and_logs,
                exit_codes,
                argv_is_passed_intact,
                env_and_workdir,
                output_streams_before_exit,
                timeout_kills_the_process_tree,
                file_operations,
                delete_recursive,
                read_missing_file,
                path_escapes_are_contained,
                destroy_is_idempotent_and_complete,
                unknown_image_leaves_nothing,
                inventory_and_inspect_follow_the_runtime
            );
        }
    };
    (@cases $fixture:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let Some(fixture) = $fixture else { return };
                cases::$case(&fixture).await;
            }
        )*
    };
}

conformance_tests!(native, Some(native_fixture().await));
conformance_tests!(native_exec_helper, Some(native_fixture_with(false).await));
conformance_tests!(proot, Some(proot_fixture().await));
conformance_tests!(docker, docker_fixture(true).await);
conformance_tests!(docker_engine_api, docker_fixture(false).await);
conformance_tests!(custom, Some(custom_fixture().await));
conformance_tests!(qemu, qemu_fixture().await);
conformance_tests!(docker_runsc, docker_runsc_fixture().await);

/// The reference server restarted on its data dir (as after an upgrade)
/// still holds the sandboxes it made: they are in its inventory under the
/// same ids and run commands; nothing was lost or duplicated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_reference_server_keeps_its_sandboxes_across_a_restart() {
    let (data, _store) = data_dir_with_image();
    let port = free_port();
    let key = crate::support::uuid_hex();
    let (mut process, p) = start_reference_server(data.path(), port, &key).await;
    let handle = p
        .spawn(&SpawnSpec {
            sandbox_id: "sb-c0ffee01".into(),
            image: TEST_IMAGE.into(),
            memory_mb: 128,
            vcpus: 1,
            disk_mb: 64,
        })
        .await
        .expect("spawn");
    process.kill().await.expect("kill the reference server");
    let (_process, p) = start_reference_server(data.path(), port, &key).await;
    let listed: Vec<_> = p
        .inventory()
        .await
        .expect("inventory")
        .into_iter()
        .map(|i| (i.sandbox_id, i.runtime_id))
        .collect();
    assert_eq!(
        listed,
        vec![("sb-c0ffee01".to_string(), handle.runtime_id.clone())]
    );
    let p: Arc<dyn Provider> = Arc::new(p);
    let r = run(&p, &handle.runtime_id, spec(&["echo", "still here"])).await;
    assert_eq!(r.stdout, "still here\n");
    p.destroy(&handle.runtime_id).await.expect("destroy");
}

/// What one exec produced.
struct Run {
    exit: ExecExit,
    stdout: String,
    stderr: String,
    /// Each chunk with the time it was received.
    chunks: Vec<(Instant, OutputChunk)>,
    /// When `exec` returned.
    ended: Instant,
    started: Instant,
}

fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|a| a.to_string()).collect(),
        env: BTreeMap::new(),
        workdir: None,
        timeout: Duration::from_secs(20),
    }
}

async fn run(p: &Arc<dyn Provider>, id: &str, spec: ExecSpec) -> Run {
    try_run(p, id, spec).await.expect("exec")
}

async fn try_run(p: &Arc<dyn Provider>, id: &str, spec: ExecSpec) -> Result<Run, ProviderError> {
    let (tx, mut rx) = mpsc::channel(16);
    let started = Instant::now();
    let (p2, id2) = (p.clone(), id.to_string());
    let exec = tokio::spawn(async move {
        let result = p2.exec(&id2, &spec, tx).await;
        (result, Instant::now())
    });
    let mut chunks = Vec::new();
    while let Some(chunk) = rx.recv().await {
        chunks.push((Instant::now(), chunk));
    }
    let (result, ended) = exec.await.expect("exec task");
    let text = |kind: StreamKind| {
        let bytes: Vec<u8> = chunks
            .iter()
            .filter(|(_, c)| c.stream == kind)
            .flat_map(|(_, c)| c.data.to_vec())
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    Ok(Run {
        exit: result?,
        stdout: text(StreamKind::Stdout),
        stderr: text(StreamKind::Stderr),
        chunks,
        ended,
        started,
    })
}

async fn spawn(fx: &Fixture) -> String {
    spawn_with_id(fx).await.1
}

/// MicroVMs booting at once in the suite: under TCG each boot takes a
/// core for a second or two, and a dozen at once starve the suite's
/// timing-sensitive tests on a small machine.
static VM_BOOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// Spawns a sandbox; returns (sandbox id, runtime id).
async fn spawn_with_id(fx: &Fixture) -> (String, String) {
    let _boot = match fx.provider.name() {
        "qemu" => Some(VM_BOOTS.acquire().await.expect("semaphore")),
        _ => None,
    };
    let id = format!("t-{}", uuid::Uuid::new_v4().as_simple());
    let handle = fx
        .provider
        .spawn(&SpawnSpec {
            sandbox_id: id.clone(),
            image: fx.image.clone(),
            memory_mb: 256,
            vcpus: 1,
            disk_mb: 512,
        })
        .await
        .expect("spawn");
    (id, handle.runtime_id)
}

fn dir_entries(dir: &Path) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Host processes whose command line contains `marker`.
pub(crate) fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in dir_entries(Path::new("/proc")) {
        if let Ok(cmdline) = std::fs::read(format!("/proc/{entry}/cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(marker) {
                found.push(format!("{entry}: {cmdline}"));
            }
        }
    }
    found
}

mod cases {
    use super::*;

    pub async fn health_and_image_available(fx: &Fixture) {
        fx.provider.health().await.expect("healthy");
        assert!(fx.provider.image_available(&fx.image).await.expect("check"));
        assert!(
            !fx.provider
                .image_available("stacyvm-test:never-imported")
                .await
                .expect("check")
        );
    }

    pub async fn exec_stdout_stderr_and_logs(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        let r = run(p, &id, spec(&["echo", "hello"])).await;
        assert_eq!(r.exit, ExecExit::Exited(0));
        assert_eq!(r.stdout, "hello\n");
        assert_eq!(r.stderr, "");

        let r = run(p, &id, spec(&["sh", "-c", "echo out; echo err >&2"])).await;
        assert_eq!(r.exit, ExecExit::Exited(0));
        assert_eq!((r.stdout.as_str(), r.stderr.as_str()), ("out\n", "err\n"));

        let r = run(p, &id, spec(&["no-such-command-xyz"])).await;
        assert_eq!(r.exit, ExecExit::Exited(127));
        assert!(r.stderr.contains("not found"), "{}", r.stderr);

        let logs = p.logs(&id, 100).await.expect("logs");
        assert!(logs.iter().any(|l| l.contains("spawned")), "{logs:?}");
        assert!(logs.iter().any(|l| l.contains("\"hello\"")), "{logs:?}");
        let last = p.logs(&id, 1).await.expect("logs");
        assert_eq!(last.len(), 1);
        assert!(last[0].contains("no-such-command-xyz"), "{last:?}");
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn exit_codes(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        let r = run(p, &id, spec(&["sh", "-c", "exit 3"])).await;
        assert_eq!(r.exit, ExecExit::Exited(3));
        let r = run(p, &id, spec(&["false"])).await;
        assert_eq!(r.exit, ExecExit::Exited(1));
        // A signal death is 128 + signal.
        let r = run(p, &id, spec(&["sh", "-c", "kill -9 $$"])).await;
        let expected = if fx.reports_signal_deaths { 137 } else { 255 };
        assert_eq!(r.exit, ExecExit::Exited(expected));
        // The command is not PID 1: default signal handling applies.
        let r = run(p, &id, spec(&["sh", "-c", "kill -TERM $$; sleep 5"])).await;
        let expected = if fx.reports_signal_deaths { 143 } else { 255 };
        assert_eq!(r.exit, ExecExit::Exited(expected));
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn argv_is_passed_intact(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        let argv = ["printf", "%s|", "a b", "", "c  d", "$HOME", "'q'", "*"];
        let r = run(p, &id, spec(&argv)).await;
        assert_eq!(r.exit, ExecExit::Exited(0));
        assert_eq!(r.stdout, "a b||c  d|$HOME|'q'|*|");
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn env_and_workdir(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        let mut s = spec(&["sh", "-c", "echo \"$FOO\"; pwd; env"]);
        s.env.insert("FOO".into(), "bar baz".into());
        s.workdir = Some("/tmp".into());
        let r = run(p, &id, s).await;
        assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
        let mut lines = r.stdout.lines();
        assert_eq!(lines.next(), Some("bar baz"));
        assert_eq!(lines.next(), Some("/tmp"));
        let env: Vec<&str> = lines.collect();
        assert!(env.iter().any(|l| l.starts_with("PATH=")), "{env:?}");
        // The host's environment (cargo sets plenty) must not leak in.
        assert!(!env.iter().any(|l| l.starts_with("CARGO")), "{env:?}");

        // The default workdir is /, and an explicit PATH replaces the default.
        let mut s = spec(&["/bin/sh", "-c", "pwd; echo $PATH"]);
        s.env.insert("PATH".into(), "/bin".into());
        let r = run(p, &id, s).await;
        assert_eq!(r.stdout, "/\n/bin\n");

        let mut s = spec(&["pwd"]);
        s.workdir = Some("/does/not/exist".into());
        assert!(matches!(
            try_run(p, &id, s).await,
            Err(ProviderError::InvalidRequest(_))
        ));
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn output_streams_before_exit(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        let r = run(
            p,
            &id,
            spec(&[
                "sh",
                "-c",
                "echo one; sleep 1; echo two >&2; sleep 1; echo three",
            ]),
        )
        .await;
        assert_eq!(r.exit, ExecExit::Exited(0));
        let texts: Vec<(StreamKind, String)> = r
            .chunks
            .iter()
            .map(|(_, c)| (c.stream, String::from_utf8_lossy(&c.data).into_owned()))
            .collect();
        assert_eq!(
            texts,
            vec![
                (StreamKind::Stdout, "one\n".to_string()),
                (StreamKind::Stderr, "two\n".to_string()),
                (StreamKind::Stdout, "three\n".to_string()),
            ]
        );
        // "one" was delivered while the command was still sleeping.
        let first = r.chunks[0].0;
        assert!(
            r.ended.duration_since(first) >= Duration::from_millis(1500),
            "first chunk arrived only {:?} before exit",
            r.ended.duration_since(first)
        );
        assert!(first.duration_since(r.started) < Duration::from_millis(1000));
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn timeout_kills_the_process_tree(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        // A unique duration marks the processes so they can be found on the host.
        let marker = format!("{}", 3000 + rand_u16() % 5000);
        let script = format!("echo started; sleep {marker} & sleep {marker}; echo never");
        let mut s = spec(&["sh", "-c", &script]);
        s.timeout = Duration::from_secs(1);
        let r = run(p, &id, s).await;
        let took = r.ended.duration_since(r.started);
        assert_eq!(r.exit, ExecExit::TimedOut);
        assert!(took < Duration::from_secs(3), "took {took:?}");
        assert_eq!(r.stdout, "started\n");
        // Neither the command nor its background child survives.
        let mut left = host_processes_with(&format!("sleep {marker}"));
        for _ in 0..20 {
            if left.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            left = host_processes_with(&format!("sleep {marker}"));
        }
        assert!(left.is_empty(), "left running: {left:?}");
        // Nor inside, where the sandbox has a kernel of its own (a VM,
        // gVisor) and the host does not see its processes.
        let inside = || async {
            let ps = run(p, &id, spec(&["ps", "-o", "args"])).await;
            assert_eq!(ps.exit, ExecExit::Exited(0), "ps: {}", ps.stderr);
            ps.stdout
                .lines()
                .filter(|l| l.contains(&format!("sleep {marker}")))
                .count()
        };
        let mut seen = inside().await;
        for _ in 0..20 {
            if seen == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            seen = inside().await;
        }
        assert_eq!(seen, 0, "left running inside the sandbox");
        // The sandbox is still usable.
        let r = run(p, &id, spec(&["echo", "ok"])).await;
        assert_eq!(r.stdout, "ok\n");
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn file_operations(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        p.write_file(
            &id,
            "/workspace/dir/a.txt",
            Bytes::from_static(b"alpha"),
            0o640,
        )
        .await
        .expect("write");
        // What the files API writes, commands see, and the other way round.
        let r = run(p, &id, spec(&["cat", "/workspace/dir/a.txt"])).await;
        assert_eq!(r.stdout, "alpha");
        run(
            p,
            &id,
            spec(&["sh", "-c", "echo beta > /workspace/dir/b.txt"]),
        )
        .await;
        let data = p
            .read_file(&id, "/workspace/dir/b.txt")
            .await
            .expect("read");
        assert_eq!(&data[..], b"beta\n");

        let st = p
            .stat_file(&id, "/workspace/dir/a.txt")
            .await
            .expect("stat");
        assert_eq!(st.path, "/workspace/dir/a.txt");
        assert_eq!(st.name, "a.txt");
        assert_eq!((st.size, st.mode.as_str(), st.is_dir), (5, "640", false));
        assert!(
            chrono::DateTime::parse_from_rfc3339(&st.mod_time).is_ok(),
            "{}",
            st.mod_time
        );
        assert!(
            p.stat_file(&id, "/workspace/dir")
                .await
                .expect("stat")
                .is_dir
        );

        let listing = p.list_files(&id, "/workspace/dir").await.expect("list");
        let names: Vec<_> = listing.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(names, vec!["/workspace/dir/a.txt", "/workspace/dir/b.txt"]);

        p.move_file(&id, "/workspace/dir/a.txt", "/workspace/c.txt")
            .await
            .expect("move");
        assert!(matches!(
            p.read_file(&id, "/workspace/dir/a.txt").await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert_eq!(
            &p.read_file(&id, "/workspace/c.txt").await.expect("read")[..],
            b"alpha"
        );

        p.chmod_file(&id, "/workspace/c.txt", 0o755)
            .await
            .expect("chmod");
        assert_eq!(
            p.stat_file(&id, "/workspace/c.txt")
                .await
                .expect("stat")
                .mode,
            "755"
        );
        let r = run(p, &id, spec(&["stat", "-c", "%a", "/workspace/c.txt"])).await;
        assert_eq!(r.stdout.trim(), "755");

        let found = p
            .glob_files(&id, "/workspace/**/*.txt")
            .await
            .expect("glob");
        assert_eq!(found, vec!["/workspace/c.txt", "/workspace/dir/b.txt"]);
        let found = p.glob_files(&id, "/workspace/*/b.*").await.expect("glob");
        assert_eq!(found, vec!["/workspace/dir/b.txt"]);

        p.delete_file(&id, "/workspace/c.txt", false)
            .await
            .expect("delete");
        assert!(matches!(
            p.stat_file(&id, "/workspace/c.txt").await,
            Err(ProviderError::FileNotFound(_))
        ));
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn delete_recursive(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        for f in ["/workspace/t/a", "/workspace/t/s/b", "/workspace/t/s/u/c"] {
            p.write_file(&id, f, Bytes::from_static(b"x"), 0o644)
                .await
                .expect("write");
        }
        assert!(matches!(
            p.delete_file(&id, "/workspace/t", false).await,
            Err(ProviderError::InvalidRequest(_))
        ));
        assert!(
            p.read_file(&id, "/workspace/t/s/u/c").await.is_ok(),
            "a refused delete removed something"
        );
        p.delete_file(&id, "/workspace/t", true)
            .await
            .expect("delete");
        assert!(matches!(
            p.stat_file(&id, "/workspace/t").await,
            Err(ProviderError::FileNotFound(_))
        ));
        // An empty directory goes without `recursive`.
        p.write_file(&id, "/workspace/e/x", Bytes::new(), 0o644)
            .await
            .expect("write");
        p.delete_file(&id, "/workspace/e/x", false)
            .await
            .expect("delete");
        p.delete_file(&id, "/workspace/e", false)
            .await
            .expect("delete empty dir");
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn read_missing_file(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        assert!(matches!(
            p.read_file(&id, "/workspace/nope.txt").await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert!(matches!(
            p.list_files(&id, "/nope").await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert!(matches!(
            p.delete_file(&id, "/nope", true).await,
            Err(ProviderError::FileNotFound(_))
        ));
        assert!(matches!(
            p.move_file(&id, "/nope", "/nope2").await,
            Err(ProviderError::FileNotFound(_))
        ));
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn path_escapes_are_contained(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        // A host file the sandbox must never reach.
        let host = tempfile::tempdir().expect("tempdir");
        let secret = host.path().join("secret");
        std::fs::write(&secret, "host secret").expect("write");
        let secret_path = secret.to_string_lossy().into_owned();
        let host_dir = host.path().to_string_lossy().into_owned();

        // `..` stops at the sandbox root.
        p.write_file(
            &id,
            "/../../../../..//tmp/escape-probe",
            Bytes::from_static(b"x"),
            0o644,
        )
        .await
        .expect("write");
        assert!(!Path::new("/tmp/escape-probe").exists());
        assert!(p.read_file(&id, "/tmp/escape-probe").await.is_ok());
        assert!(
            p.read_file(&id, &format!("/../../..{secret_path}"))
                .await
                .is_err()
        );

        // Links planted by code inside the sandbox.
        let script = format!(
            "ln -s {secret_path} /abs && ln -s {host_dir} /absdir && \
             ln -s ../../../../../../../../.. /up"
        );
        let r = run(p, &id, spec(&["sh", "-c", &script])).await;
        assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
        for path in [
            "/abs".to_string(),
            "/absdir/secret".to_string(),
            format!("/up{secret_path}"),
        ] {
            // Each link resolves inside the sandbox, where nothing is there.
            let read = p.read_file(&id, &path).await;
            assert!(
                matches!(read, Err(ProviderError::FileNotFound(_))),
                "{path}: {read:?}"
            );
        }
        for path in ["/absdir/pwned".to_string(), format!("/up{host_dir}/pwned")] {
            let _ = p
                .write_file(&id, &path, Bytes::from_static(b"pwned"), 0o644)
                .await;
        }
        let _ = p.chmod_file(&id, "/abs", 0o777).await;
        let _ = p.delete_file(&id, "/absdir/secret", true).await;
        let _ = p
            .move_file(&id, &format!("/up{secret_path}"), "/stolen")
            .await;
        assert_eq!(
            std::fs::read_to_string(&secret).expect("secret still there"),
            "host secret"
        );
        assert_eq!(dir_entries(host.path()), vec!["secret".to_string()]);
        let listed = p.list_files(&id, "/up").await.expect("list");
        assert!(
            listed.iter().any(|e| e.name == "abs"),
            "/up is the sandbox root"
        );
        assert!(
            !p.glob_files(&id, "/**/secret")
                .await
                .expect("glob")
                .iter()
                .any(|m| m.ends_with("/secret")),
        );
        p.destroy(&id).await.expect("destroy");
    }

    pub async fn destroy_is_idempotent_and_complete(fx: &Fixture) {
        let p = &fx.provider;
        let id = spawn(fx).await;
        p.write_file(&id, "/workspace/f", Bytes::from_static(b"x"), 0o644)
            .await
            .expect("write");
        p.destroy(&id).await.expect("destroy");
        p.destroy(&id).await.expect("destroy again");
        assert!(matches!(
            try_run(p, &id, spec(&["true"])).await,
            Err(ProviderError::RuntimeNotFound(_))
        ));
        assert!(matches!(
            p.read_file(&id, "/workspace/f").await,
            Err(ProviderError::RuntimeNotFound(_))
        ));
        assert!(matches!(
            p.logs(&id, 10).await,
            Err(ProviderError::RuntimeNotFound(_))
        ));
        if let Some(dir) = &fx.sandboxes_dir {
            assert_eq!(dir_entries(dir), Vec::<String>::new());
        }
        // Destroying something never spawned is fine too.
        p.destroy("t-never-existed").await.expect("destroy unknown");
    }

    pub async fn inventory_and_inspect_follow_the_runtime(fx: &Fixture) {
        use stacyvm::provider::RuntimeStatus;
        let p = &fx.provider;
        let (a_id, a) = spawn_with_id(fx).await;
        let (b_id, b) = spawn_with_id(fx).await;
        let listed = |items: &[stacyvm::provider::InventoryItem]| {
            let mut v: Vec<(String, String, RuntimeStatus)> = items
                .iter()
                .map(|i| (i.sandbox_id.clone(), i.runtime_id.clone(), i.status.clone()))
                .collect();
            v.sort_by(|x, y| x.0.cmp(&y.0));
            v
        };
        let mut expected = vec![
            (a_id.clone(), a.clone(), RuntimeStatus::Running),
            (b_id.clone(), b.clone(), RuntimeStatus::Running),
        ];
        expected.sort_by(|x, y| x.0.cmp(&y.0));
        let inventory = p.inventory().await.expect("inventory");
        assert_eq!(listed(&inventory), expected);
        assert!(inventory.iter().all(|i| i.created_at.is_some()));
        assert_eq!(
            p.inspect(&a).await.expect("inspect"),
            RuntimeStatus::Running
        );

        p.destroy(&a).await.expect("destroy");
        assert_eq!(
            p.inspect(&a).await.expect("inspect"),
            RuntimeStatus::Missing
        );
        let inventory = p.inventory().await.expect("inventory");
        assert_eq!(
            listed(&inventory),
            vec![(b_id, b.clone(), RuntimeStatus::Running)]
        );
        p.destroy(&b).await.expect("destroy");
        assert!(p.inventory().await.expect("inventory").is_empty());
    }

    pub async fn unknown_image_leaves_nothing(fx: &Fixture) {
        let p = &fx.provider;
        let id = format!("t-{}", uuid::Uuid::new_v4().as_simple());
        let err = p
            .spawn(&SpawnSpec {
                sandbox_id: id.clone(),
                image: "stacyvm-test:never-imported".into(),
                memory_mb: 256,
                vcpus: 1,
                disk_mb: 512,
            })
            .await
            .expect_err("spawn of an unknown image");
        match err {
            ProviderError::ImageNotFound { image, reason } => {
                assert_eq!(image, "stacyvm-test:never-imported");
                assert!(!reason.is_empty());
            }
            other => panic!("expected ImageNotFound, got {other:?}"),
        }
        if let Some(dir) = &fx.sandboxes_dir {
            assert_eq!(dir_entries(dir), Vec::<String>::new());
        }
        assert!(matches!(
            try_run(p, &id, spec(&["true"])).await,
            Err(ProviderError::RuntimeNotFound(_))
        ));
    }
}

/// A qemu provider on a fresh data dir with `tweak` applied to the test
/// configuration; `None` without a test kernel.
fn qemu_provider_with(
    tweak: impl FnOnce(&mut stacyvm::config::QemuConfig),
) -> Option<(
    stacyvm::provider::microvm::qemu::QemuProvider,
    tempfile::TempDir,
)> {
    let kernel = PathBuf::from(crate::support::require_env("STACYVM_TEST_KERNEL")?);
    let (data, store) = data_dir_with_image();
    let mut config = stacyvm::config::QemuConfig {
        kernel,
        boot_timeout: stacyvm::duration::GoDuration(Duration::from_secs(180)),
        ..Default::default()
    };
    tweak(&mut config);
    let provider = stacyvm::provider::microvm::qemu::QemuProvider::new(
        store,
        data.path().join("sandboxes/qemu"),
        data.path().join("vm"),
        config,
    );
    Some((provider, data))
}

fn vm_spec(image: &str) -> SpawnSpec {
    SpawnSpec {
        sandbox_id: format!("t-{}", uuid::Uuid::new_v4().as_simple()),
        image: image.into(),
        memory_mb: 256,
        vcpus: 1,
        disk_mb: 512,
    }
}

/// A VM that cannot boot fails its spawn with a clear reason (the
/// console's last lines when it started at all) and leaves no process,
/// socket or disk behind; a missing QEMU or kernel module is a clear
/// health error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_boot_failures_are_clear_and_leave_nothing() {
    // Too little time to boot: the console says how far it got.
    let Some((p, data)) = qemu_provider_with(|c| {
        c.boot_timeout = stacyvm::duration::GoDuration(Duration::from_millis(300));
    }) else {
        return;
    };
    let spec = vm_spec(TEST_IMAGE);
    let err = p.spawn(&spec).await.expect_err("a boot in 300 ms");
    let text = err.to_string();
    assert!(text.contains("did not boot"), "{text}");
    assert!(text.contains("console"), "{text}");
    assert_eq!(
        dir_entries(&data.path().join("sandboxes/qemu")),
        Vec::<String>::new()
    );
    assert!(host_processes_with(&spec.sandbox_id).is_empty());
    assert!(matches!(
        p.exec(&spec.sandbox_id, &spec_of(&["true"]), mpsc::channel(1).0)
            .await,
        Err(ProviderError::RuntimeNotFound(_))
    ));

    // Not a kernel: QEMU refuses, and says so.
    let real = PathBuf::from(std::env::var("STACYVM_TEST_KERNEL").expect("kernel"));
    let release = real
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .expect("vmlinuz-<release>")
        .to_string();
    let test_modules = real
        .parent()
        .and_then(Path::parent)
        .expect("<root>/boot")
        .join("lib/modules")
        .join(release);
    let bogus = data.path().join("vmlinuz-bogus");
    std::fs::write(&bogus, "not a kernel").expect("write");
    let Some((p, data)) = qemu_provider_with(|c| {
        c.kernel = bogus.clone();
        c.modules_dir = test_modules.clone();
    }) else {
        return;
    };
    let spec = vm_spec(TEST_IMAGE);
    let err = p
        .spawn(&spec)
        .await
        .expect_err("a spawn with a bogus kernel");
    assert!(err.to_string().contains("QEMU"), "{err}");
    assert_eq!(
        dir_entries(&data.path().join("sandboxes/qemu")),
        Vec::<String>::new()
    );
    assert!(host_processes_with(&spec.sandbox_id).is_empty());

    // No QEMU: unhealthy, with the package to install.
    let (p, _data) = qemu_provider_with(|c| c.binary = "/nonexistent/qemu".into()).expect("kernel");
    let err = p.health().await.expect_err("health without QEMU");
    assert!(err.to_string().contains("qemu-system-x86"), "{err}");

    // Modules missing: unhealthy, naming the module.
    let empty = tempfile::tempdir().expect("tempdir");
    let (p, _data) =
        qemu_provider_with(|c| c.modules_dir = empty.path().to_path_buf()).expect("kernel");
    let err = p.health().await.expect_err("health without modules");
    assert!(err.to_string().contains("virtio"), "{err}");
    let err = p
        .spawn(&vm_spec(TEST_IMAGE))
        .await
        .expect_err("spawn without modules");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
}

fn spec_of(argv: &[&str]) -> ExecSpec {
    spec(argv)
}

/// From inside a VM: no network but its own loopback, no host process or
/// file, no disk but its own, and the memory and CPUs it was given.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_guest_sees_nothing_of_the_host() {
    let Some((p, _data)) = qemu_provider_with(|_| {}) else {
        return;
    };
    let p: Arc<dyn Provider> = Arc::new(p);
    let mut two_cpus = vm_spec(TEST_IMAGE);
    two_cpus.vcpus = 2;
    let id = p.spawn(&two_cpus).await.expect("spawn").runtime_id;
    // A server on the host's loopback that the guest must not reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    // A host process the guest must not see.
    // Starts with 9: never a prefix of the timeout case's markers (3000-7999).
    let marker = format!("9{}.{}", rand_u16(), rand_u16());
    struct Reaped(std::process::Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _gone = self.0.kill();
            let _reaped = self.0.wait();
        }
    }
    let _host_sleep = Reaped(
        std::process::Command::new("sleep")
            .arg(&marker)
            .spawn()
            .expect("sleep"),
    );
    // A pattern that does not match its own command line.
    let (first, rest) = marker.split_at(1);
    let script = format!(
        "ls /sys/class/net; echo --; ls /sys/block; echo --; cat /proc/1/cmdline; echo; echo --; \
         nproc; grep MemTotal /proc/meminfo; echo --; \
         ps -o args | grep -c '[{first}]{rest}'; echo --; \
         (nc -w 2 127.0.0.1 {port} </dev/null && echo reached) 2>&1 | grep -c reached"
    );
    let r = run(&p, &id, spec(&["sh", "-c", &script])).await;
    let parts: Vec<&str> = r.stdout.split("--\n").collect();
    assert_eq!(parts[0], "lo\n", "network devices: {}", r.stdout);
    assert_eq!(parts[1], "vda\n", "disks: {}", r.stdout);
    assert_eq!(
        parts[2].trim().trim_end_matches('\0'),
        "/init",
        "{}",
        r.stdout
    );
    let mut limits = parts[3].lines();
    assert_eq!(limits.next(), Some("2"), "{}", r.stdout);
    let mem_kb: u64 = limits
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(
        mem_kb <= 256 * 1024 && mem_kb > 128 * 1024,
        "MemTotal {mem_kb} kB"
    );
    // None of the host's processes (grep finds only itself).
    assert_eq!(parts[4], "0\n", "a host process is visible: {}", r.stdout);
    assert!(
        parts[5].starts_with("0\n"),
        "the host's loopback was reached: {}",
        r.stdout
    );
    assert!(listener.accept().is_err(), "a connection reached the host");
    // Its identity and clock come from the host (the agent's `Setup`), not
    // from its kernel's command line (a snapshot's is another VM's).
    let r = run(
        &p,
        &id,
        spec(&["sh", "-c", "hostname; date +%s; cat /proc/cmdline"]),
    )
    .await;
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some(id.as_str()), "{}", r.stdout);
    let guest_now: i64 = lines.next().and_then(|l| l.parse().ok()).expect("date");
    assert!(
        (guest_now - chrono::Utc::now().timestamp()).abs() <= 5,
        "the guest's clock is {guest_now}: {}",
        r.stdout
    );
    assert!(!r.stdout.contains(&format!("={id}")), "{}", r.stdout);
    // What the VM costs the host: its QEMU's memory, within what it asked.
    let stats = p.stats(&id).await.expect("stats");
    assert!(stats.supported);
    assert_eq!(stats.mem_limit_bytes, 256 << 20);
    assert!(stats.mem_bytes > 0, "{stats:?}");
    p.destroy(&id).await.expect("destroy");
}

/// An image without a shell still boots (the agent is the VM's init);
/// commands it lacks are 127 with the shell's words, as elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_image_without_a_shell_boots_and_says_what_is_missing() {
    let Some((p, data)) = qemu_provider_with(|_| {}) else {
        return;
    };
    let tree = data.path().join("bare");
    std::fs::create_dir_all(tree.join("etc")).expect("mkdir");
    std::fs::write(tree.join("etc/motd"), "bare\n").expect("write");
    let tarball = data.path().join("bare.tar");
    let status = std::process::Command::new("tar")
        .args(["-cf"])
        .arg(&tarball)
        .args(["-C"])
        .arg(&tree)
        .arg("etc")
        .status()
        .expect("tar");
    assert!(status.success());
    ImageStore::new(data.path().join("images"))
        .import("stacyvm-test:bare", &tarball)
        .expect("import");
    let p: Arc<dyn Provider> = Arc::new(p);
    let id = p
        .spawn(&vm_spec("stacyvm-test:bare"))
        .await
        .expect("spawn")
        .runtime_id;
    let r = run(&p, &id, spec(&["sh", "-c", "true"])).await;
    assert_eq!(r.exit, ExecExit::Exited(127));
    assert!(r.stderr.contains("sh: command not found"), "{}", r.stderr);
    assert_eq!(
        &p.read_file(&id, "/etc/motd").await.expect("read")[..],
        b"bare\n"
    );
    p.destroy(&id).await.expect("destroy");
}

/// A small random number without pulling in a RNG crate.
fn rand_u16() -> u16 {
    let id = uuid::Uuid::new_v4();
    u16::from_le_bytes([id.as_bytes()[0], id.as_bytes()[1]])
}

/// Native exec latency: `echo hi` joining the sandbox's namespaces must cost
/// tens of milliseconds at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_exec_latency() {
    let fx = native_fixture().await;
    let id = spawn(&fx).await;
    // Warm up (page cache, first fork).
    run(&fx.provider, &id, spec(&["echo", "hi"])).await;
    let rounds = 20;
    let started = Instant::now();
    for _ in 0..rounds {
        let r = run(&fx.provider, &id, spec(&["echo", "hi"])).await;
        assert_eq!(r.stdout, "hi\n");
    }
    let each = started.elapsed() / rounds;
    eprintln!("native exec of `echo hi`: {each:?} per exec");
    assert!(each < Duration::from_millis(100), "{each:?} per exec");
    fx.provider.destroy(&id).await.expect("destroy");
}

/// The native-only `host` image: the host's root read-only, with private
/// writable /workspace and /tmp.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_host_image() {
    let fx = native_fixture().await;
    let p = &fx.provider;
    assert!(p.image_available("host").await.expect("check"));
    let id = p
        .spawn(&SpawnSpec {
            sandbox_id: format!("t-{}", uuid::Uuid::new_v4().as_simple()),
            image: "host".into(),
            memory_mb: 0,
            vcpus: 1,
            disk_mb: 512,
        })
        .await
        .expect("spawn host")
        .runtime_id;
    let probe = format!("/usr/stacyvm-probe-{id}");
    let script = format!(
        "echo hi > /workspace/x && echo t > /tmp/y && hostname; \
         touch {probe} 2>/dev/null && echo WROTE; \
         mount -o remount,rw /usr 2>/dev/null; touch {probe} 2>/dev/null && echo REMOUNTED; true"
    );
    let r = run(p, &id, spec(&["sh", "-c", &script])).await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert!(r.stdout.starts_with(&format!("{id}\n")), "{}", r.stdout);
    assert!(!Path::new(&probe).exists(), "wrote to the host's /usr");
    assert!(!r.stdout.contains("WROTE"), "{}", r.stdout);
    assert_eq!(
        &p.read_file(&id, "/workspace/x").await.expect("read")[..],
        b"hi\n"
    );
    assert_eq!(&p.read_file(&id, "/tmp/y").await.expect("read")[..], b"t\n");
    assert!(matches!(
        p.read_file(&id, "/etc/passwd").await,
        Err(ProviderError::InvalidRequest(_))
    ));
    p.destroy(&id).await.expect("destroy");
    if let Some(dir) = &fx.sandboxes_dir {
        assert_eq!(dir_entries(dir), Vec::<String>::new());
    }
}

/// Polls `check` every 100 ms until it holds or `limit` passes.
async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A native sandbox has an init: a background process outlives the exec
/// that started it, and dies with the sandbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_background_processes_live_until_destroy() {
    let fx = native_fixture().await;
    let p = &fx.provider;
    let id = spawn(&fx).await;
    let marker = format!("{}", 3000 + rand_u16() % 5000);
    let script = format!("sleep {marker} >/dev/null 2>&1 & echo $! > /tmp/bg");
    let r = run(p, &id, spec(&["sh", "-c", &script])).await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    let r = run(
        p,
        &id,
        spec(&["sh", "-c", "kill -0 $(cat /tmp/bg) && echo alive"]),
    )
    .await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert_eq!(r.stdout, "alive\n");
    // Orphans are reaped by the init: `ps` shows it as PID 1.
    let r = run(
        p,
        &id,
        spec(&["sh", "-c", "cat /proc/1/status | grep PPid"]),
    )
    .await;
    assert_eq!(r.stdout.trim(), "PPid:\t0");
    assert!(!host_processes_with(&format!("sleep {marker}")).is_empty());
    p.destroy(&id).await.expect("destroy");
    let gone = eventually(Duration::from_secs(5), || {
        host_processes_with(&format!("sleep {marker}")).is_empty()
            && host_processes_with(&id).is_empty()
    })
    .await;
    assert!(
        gone,
        "left running: {:?} {:?}",
        host_processes_with(&format!("sleep {marker}")),
        host_processes_with(&id)
    );
    if let Some(dir) = &fx.sandboxes_dir {
        assert_eq!(dir_entries(dir), Vec::<String>::new());
    }
}

/// `kill 1` inside a native sandbox stops it, as in Docker: the provider
/// reports it stopped with the cause, refuses commands, and still destroys it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_kill_1_stops_the_sandbox() {
    use stacyvm::provider::RuntimeStatus;
    let fx = native_fixture().await;
    let p = &fx.provider;
    let id = spawn(&fx).await;
    assert_eq!(
        p.inspect(&id).await.expect("inspect"),
        RuntimeStatus::Running
    );
    // The exec itself dies with the namespace; how it is reported does not
    // matter here.
    let _ = try_run(p, &id, spec(&["sh", "-c", "kill 1; sleep 5"])).await;
    // Between PID 1's end and its keeper's record of it, inspect gives no
    // verdict (an error); then the cause.
    let mut status = p.inspect(&id).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    while !matches!(&status, Ok(RuntimeStatus::Stopped { cause }) if cause.contains("SIGTERM"))
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
        status = p.inspect(&id).await;
    }
    match &status {
        Ok(RuntimeStatus::Stopped { cause }) => assert!(cause.contains("SIGTERM"), "{cause}"),
        other => panic!("expected Stopped, got {other:?}"),
    }
    let listed = p.inventory().await.expect("inventory");
    assert!(
        listed
            .iter()
            .any(|i| i.sandbox_id == id && matches!(i.status, RuntimeStatus::Stopped { .. })),
        "{listed:?}"
    );
    match try_run(p, &id, spec(&["true"])).await {
        Err(ProviderError::Runtime(why)) => {
            assert!(why.contains("init is not running"), "{why}")
        }
        other => panic!("expected a runtime error, got {:?}", other.map(|r| r.exit)),
    }
    p.destroy(&id).await.expect("destroy");
    assert_eq!(
        p.inspect(&id).await.expect("inspect"),
        RuntimeStatus::Missing
    );
    if let Some(dir) = &fx.sandboxes_dir {
        assert_eq!(dir_entries(dir), Vec::<String>::new());
    }
    assert!(
        eventually(Duration::from_secs(5), || host_processes_with(&id)
            .is_empty())
        .await,
        "{:?}",
        host_processes_with(&id)
    );
}

/// The init outlives its provider: a new provider over the same directory
/// (a restarted server) finds the sandbox running, with its processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_init_survives_the_provider() {
    use stacyvm::provider::RuntimeStatus;
    let (data, store) = data_dir_with_image();
    let dir = data.path().join("sandboxes/native");
    let first: Arc<dyn Provider> = Arc::new(native_provider(store.clone(), dir.clone()));
    let id = format!("t-{}", uuid::Uuid::new_v4().as_simple());
    first
        .spawn(&SpawnSpec {
            sandbox_id: id.clone(),
            image: TEST_IMAGE.into(),
            memory_mb: 256,
            vcpus: 1,
            disk_mb: 512,
        })
        .await
        .expect("spawn");
    let r = run(
        &first,
        &id,
        spec(&["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $! > /tmp/bg"]),
    )
    .await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    drop(first);

    let second: Arc<dyn Provider> = Arc::new(native_provider(store, dir.clone()));
    assert_eq!(
        second.inspect(&id).await.expect("inspect"),
        RuntimeStatus::Running
    );
    let r = run(
        &second,
        &id,
        spec(&["sh", "-c", "kill -0 $(cat /tmp/bg) && hostname"]),
    )
    .await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert_eq!(r.stdout, format!("{id}\n"));
    second.destroy(&id).await.expect("destroy");
    assert_eq!(dir_entries(&dir), Vec::<String>::new());
    assert!(
        eventually(Duration::from_secs(5), || host_processes_with(&id)
            .is_empty())
        .await,
        "{:?}",
        host_processes_with(&id)
    );
}

/// A keeper never outlives its sandbox directory: deleting the tree behind
/// the provider's back ends the sandbox's processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_keeper_exits_when_its_directory_goes() {
    let fx = native_fixture().await;
    let p = &fx.provider;
    let id = spawn(&fx).await;
    let marker = format!("sleep {}", 3000 + rand_u16() % 5000);
    let script = format!("{marker} >/dev/null 2>&1 &");
    let r = run(p, &id, spec(&["sh", "-c", &script])).await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert!(!host_processes_with(&id).is_empty(), "no keeper found");
    assert!(
        !host_processes_with(&marker).is_empty(),
        "no background process"
    );
    let dir = fx
        .sandboxes_dir
        .as_ref()
        .expect("native has a dir")
        .join(&id);
    // Its own filesystem is mounted at rootfs/: detach it (what `umount
    // -l` does) so that the tree can be deleted, as an operator would.
    let rootfs = dir.join("rootfs");
    let status = std::process::Command::new("umount")
        .arg("-l")
        .arg(&rootfs)
        .status()
        .expect("umount");
    assert!(status.success(), "umount -l {}", rootfs.display());
    std::fs::remove_dir_all(&dir).expect("remove the sandbox dir");
    let gone = eventually(Duration::from_secs(10), || {
        host_processes_with(&id).is_empty() && host_processes_with(&marker).is_empty()
    })
    .await;
    assert!(
        gone,
        "left running: {:?} {:?}",
        host_processes_with(&id),
        host_processes_with(&marker)
    );
}

/// The command's environment reaches the command only: the exec helper
/// starts on the host, where the dynamic loader must not obey a request's
/// `LD_PRELOAD`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_request_env_never_reaches_the_host_loader() {
    let fx = native_fixture().await;
    let p = &fx.provider;
    let id = spawn(&fx).await;
    let mut s = spec(&["sh", "-c", "echo \"$LD_PRELOAD\""]);
    s.env
        .insert("LD_PRELOAD".into(), "/nonexistent-stacyvm-probe.so".into());
    let r = run(p, &id, s).await;
    assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert_eq!(r.stdout, "/nonexistent-stacyvm-probe.so\n");
    assert_eq!(r.stderr, "", "the host loader saw the request's LD_PRELOAD");
    p.destroy(&id).await.expect("destroy");
}

/// Without its helper binary the native provider is unhealthy, and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_without_its_helper_binary_is_unhealthy() {
    let (data, store) = data_dir_with_image();
    let provider = NativeProvider::new(store, data.path().join("sandboxes/native"))
        .with_helper_binary(data.path().join("no-such-stacyvm"));
    match provider.health().await {
        Err(ProviderError::Unavailable(why)) => {
            assert!(why.contains("helper binary"), "{why}");
            assert!(why.contains("no-such-stacyvm"), "{why}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

/// What a command sees of itself, which must not depend on the exec path:
/// environment, identity, working directory, capabilities, the
/// no-new-privileges flag, seccomp, cgroups and limits.
/// `text` with the `SigIgn:` mask cut to the standard signals (1-31):
/// glibc keeps its internal real-time signals 32 and 33 to itself, and
/// whether a runtime's helper ignores them says nothing about the
/// command. SIGPIPE (13) and the rest must match.
fn standard_signals(text: &str) -> String {
    text.lines()
        .map(|line| match line.strip_prefix("SigIgn:") {
            Some(hex) => {
                let mask = u64::from_str_radix(hex.trim(), 16).unwrap_or(u64::MAX);
                format!("SigIgn:\t{:016x}", mask & 0x7fff_ffff)
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

const SELF_PORTRAIT: &str = "env | sort; id; pwd; \
    grep -E '^(Cap|NoNewPrivs|Seccomp|Sig(Ign|Blk))' /proc/self/status; cat /proc/self/cgroup; ulimit -a; \
    ls /proc/self/fd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_direct_exec_matches_the_engine_api() {
    let (Some(direct), Some(engine)) = (docker_provider(true).await, docker_provider(false).await)
    else {
        return;
    };
    let direct: Arc<dyn Provider> = direct;
    let engine: Arc<dyn Provider> = engine;
    let fx = Fixture {
        provider: direct.clone(),
        image: crate::support::docker_image(),
        sandboxes_dir: None,
        reports_signal_deaths: true,
        _data: None,
        _process: None,
    };
    let (id, runtime) = spawn_with_id(&fx).await;
    let mut probes = vec![spec(&["sh", "-c", SELF_PORTRAIT])];
    let mut with_env = spec(&["sh", "-c", SELF_PORTRAIT]);
    with_env.env = BTreeMap::from([
        ("PATH".to_string(), "/bin:/usr/bin".to_string()),
        ("HOME".to_string(), "/tmp".to_string()),
        ("STACYVM_PROBE".to_string(), "a b=c".to_string()),
    ]);
    with_env.workdir = Some("/tmp".into());
    probes.push(with_env);
    probes.push(spec(&["no-such-program"]));
    probes.push(spec(&["/etc/passwd"]));
    probes.push(spec(&["sh", "-c", "exit 7"]));
    probes.push(spec(&["sh", "-c", "kill -TERM $$"]));
    for probe in probes {
        let a = try_run(&direct, &runtime, probe.clone()).await;
        let b = try_run(&engine, &runtime, probe.clone()).await;
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.exit, b.exit, "{:?}", probe.argv);
                assert_eq!(
                    standard_signals(&a.stdout),
                    standard_signals(&b.stdout),
                    "{:?}",
                    probe.argv
                );
                // The runtime's own words for a program that cannot run
                // differ ("permission denied" from runc, the agent's
                // errno text); both say why on stderr.
                if a.exit == ExecExit::Exited(126) {
                    assert!(!a.stderr.is_empty() && !b.stderr.is_empty());
                } else {
                    assert_eq!(a.stderr, b.stderr, "{:?}", probe.argv);
                }
            }
            (a, b) => panic!(
                "{:?}: direct {:?} vs engine {:?}",
                probe.argv,
                a.map(|r| r.exit),
                b.map(|r| r.exit)
            ),
        }
    }
    // A missing workdir is the same client error on both.
    let mut missing = spec(&["pwd"]);
    missing.workdir = Some("/no/such/dir".into());
    for p in [&direct, &engine] {
        match try_run(p, &runtime, missing.clone()).await {
            Err(ProviderError::InvalidRequest(m)) => assert!(m.contains("/no/such/dir"), "{m}"),
            other => panic!("missing workdir: {:?}", other.map(|r| r.exit)),
        }
    }
    // The direct path really was taken: PID 1 is the agent.
    let r = run(&direct, &runtime, spec(&["cat", "/proc/1/cmdline"])).await;
    assert_eq!(
        r.stdout.trim_end_matches('\0'),
        stacyvm::provider::agent::AGENT_PATH
    );
    direct.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_agent_socket_cannot_be_redirected_to_the_host() {
    let Some(fx) = docker_fixture(true).await else {
        return;
    };
    let p = fx.provider.clone();
    // A host socket the sandbox would like the server to talk to (the
    // Docker daemon's, in a real attack).
    let dir = tempfile::tempdir().unwrap();
    let trap_path = dir.path().join("trap.sock");
    let trap = std::os::unix::net::UnixListener::bind(&trap_path).unwrap();
    trap.set_nonblocking(true).unwrap();
    let trap_text = trap_path.display().to_string();
    let relative = format!("../../../../../../../..{trap_text}");
    for target in [trap_text.as_str(), relative.as_str()] {
        let (id, runtime) = spawn_with_id(&fx).await;
        // The sandbox's root swaps the agent's socket for a link.
        let plant =
            format!("rm -f /.stacyvm/run/agent.sock && ln -s {target} /.stacyvm/run/agent.sock");
        let r = run(&p, &runtime, spec(&["sh", "-c", &plant])).await;
        assert_eq!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
        // Later commands still run (through the Engine API) ...
        let r = run(&p, &runtime, spec(&["echo", "still here"])).await;
        assert_eq!(r.stdout, "still here\n");
        // ... and the host socket was never connected to.
        match trap.accept() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!("the server followed the sandbox's link: {other:?}"),
        }
        p.destroy(&id).await.expect("destroy");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_agent_mounts_are_sealed() {
    let Some(fx) = docker_fixture(true).await else {
        return;
    };
    let p = fx.provider.clone();
    let (id, runtime) = spawn_with_id(&fx).await;
    // The agent binary is read-only, even to the sandbox's root.
    let r = run(
        &p,
        &runtime,
        spec(&["sh", "-c", "echo x > /.stacyvm/agent"]),
    )
    .await;
    assert_ne!(r.exit, ExecExit::Exited(0));
    // The socket directory is a tiny tmpfs: no way around the disk cap.
    let r = run(
        &p,
        &runtime,
        spec(&[
            "sh",
            "-c",
            "dd if=/dev/zero of=/.stacyvm/run/fill bs=1k count=1024",
        ]),
    )
    .await;
    assert_ne!(r.exit, ExecExit::Exited(0), "{}", r.stderr);
    assert!(r.stderr.contains("space"), "{}", r.stderr);
    // Only the sandbox's root may connect.
    let r = run(
        &p,
        &runtime,
        spec(&["stat", "-c", "%a %u", "/.stacyvm/run/agent.sock"]),
    )
    .await;
    assert_eq!(r.stdout, "600 0\n");
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_direct_exec_ends_when_the_caller_leaves() {
    let Some(fx) = docker_fixture(true).await else {
        return;
    };
    let p = fx.provider.clone();
    let (id, runtime) = spawn_with_id(&fx).await;
    let marker = format!("{}", 3000 + rand_u16() % 5000);
    let script = format!("setsid sleep {marker} & sleep {marker}");
    let (tx, _rx) = mpsc::channel(16);
    let (p2, runtime2) = (p.clone(), runtime.clone());
    let exec =
        tokio::spawn(async move { p2.exec(&runtime2, &spec(&["sh", "-c", &script]), tx).await });
    let pattern = format!("sleep {marker}");
    assert!(
        eventually(Duration::from_secs(5), || host_processes_with(&pattern)
            .len()
            == 2)
        .await,
        "the command never started: {:?}",
        host_processes_with(&pattern)
    );
    exec.abort();
    assert!(
        eventually(Duration::from_secs(5), || host_processes_with(&pattern)
            .is_empty())
        .await,
        "left running after the caller left: {:?}",
        host_processes_with(&pattern)
    );
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_agent_exec_matches_the_exec_helper() {
    let (data, store) = data_dir_with_image();
    let dir = data.path().join("sandboxes/native");
    let direct: Arc<dyn Provider> =
        Arc::new(native_provider_with(store.clone(), dir.clone(), true));
    // The same sandboxes, commands through the helper.
    let helper: Arc<dyn Provider> = Arc::new(native_provider_with(store, dir.clone(), false));
    let fx = Fixture {
        provider: direct.clone(),
        image: TEST_IMAGE.into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: true,
        _data: None,
        _process: None,
    };
    let (id, runtime) = spawn_with_id(&fx).await;
    let portrait = format!("{SELF_PORTRAIT}; cat /proc/self/oom_score_adj");
    let mut probes = vec![spec(&["sh", "-c", &portrait])];
    let mut with_env = spec(&["sh", "-c", &portrait]);
    with_env.env = BTreeMap::from([
        ("PATH".to_string(), "/bin".to_string()),
        ("STACYVM_PROBE".to_string(), "a b=c".to_string()),
    ]);
    with_env.workdir = Some("/tmp".into());
    probes.push(with_env);
    probes.push(spec(&["sh", "-c", "exit 7"]));
    probes.push(spec(&["sh", "-c", "kill -TERM $$"]));
    for probe in probes {
        let a = run(&direct, &runtime, probe.clone()).await;
        let b = run(&helper, &runtime, probe.clone()).await;
        assert_eq!(a.exit, b.exit, "{:?}", probe.argv);
        // No descriptor of PID 1 or of a helper reaches the command.
        assert_eq!(
            standard_signals(&a.stdout),
            standard_signals(&b.stdout),
            "{:?}",
            probe.argv
        );
        // SIGPIPE is not ignored: a writer into a closed pipe dies of it.
        if let Some(hex) = a.stdout.lines().find_map(|l| l.strip_prefix("SigIgn:")) {
            let mask = u64::from_str_radix(hex.trim(), 16).expect("SigIgn");
            assert_eq!(
                mask & (1 << (libc::SIGPIPE - 1)),
                0,
                "SIGPIPE ignored: {hex}"
            );
        }
        assert_eq!(a.stderr, b.stderr, "{:?}", probe.argv);
    }
    // A missing program and workdir fail the same way on both.
    for p in [&direct, &helper] {
        let r = run(p, &runtime, spec(&["no-such-program"])).await;
        assert_eq!(r.exit, ExecExit::Exited(127));
        let mut missing = spec(&["pwd"]);
        missing.workdir = Some("/no/such/dir".into());
        assert!(matches!(
            try_run(p, &runtime, missing).await,
            Err(ProviderError::InvalidRequest(_))
        ));
    }
    // The direct path really was taken: PID 1 is the agent.
    let r = run(&direct, &runtime, spec(&["cat", "/proc/1/cmdline"])).await;
    assert_eq!(
        r.stdout.trim_end_matches('\0'),
        stacyvm::provider::agent::AGENT_PATH
    );
    direct.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_agent_mount_points_never_follow_the_trees_links() {
    // An image whose /.stacyvm is a link to a host directory: the keeper
    // must not create the agent's mount points there, and the sandbox
    // still works (its commands take the exec helper).
    let (data, store) = data_dir_with_image();
    let outside = tempfile::tempdir().expect("tempdir");
    let planted = data.path().join("planted.tar");
    {
        let mut builder = tar::Builder::new(std::fs::File::create(&planted).expect("create"));
        let mut original =
            tar::Archive::new(std::fs::File::open(rootfs_tarball()).expect("rootfs"));
        for entry in original.entries().expect("entries") {
            let mut entry = entry.expect("entry");
            let header = entry.header().clone();
            builder.append(&header, &mut entry).expect("append");
        }
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_size(0);
        link.set_mode(0o777);
        link.set_uid(0);
        link.set_gid(0);
        link.set_mtime(0);
        builder
            .append_link(&mut link, ".stacyvm", outside.path())
            .expect("link");
        builder.finish().expect("finish");
    }
    store
        .import("stacyvm-test:planted", &planted)
        .expect("import");
    let dir = data.path().join("sandboxes/native");
    let p: Arc<dyn Provider> = Arc::new(native_provider(store, dir.clone()));
    let fx = Fixture {
        provider: p.clone(),
        image: "stacyvm-test:planted".into(),
        sandboxes_dir: Some(dir),
        reports_signal_deaths: true,
        _data: None,
        _process: None,
    };
    let (id, runtime) = spawn_with_id(&fx).await;
    let r = run(&p, &runtime, spec(&["cat", "/proc/1/cmdline"])).await;
    assert_ne!(
        r.stdout.trim_end_matches('\0'),
        stacyvm::provider::agent::AGENT_PATH
    );
    let r = run(&p, &runtime, spec(&["echo", "ok"])).await;
    assert_eq!(r.stdout, "ok\n");
    assert_eq!(dir_entries(outside.path()), Vec::<String>::new());
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_agent_survives_malformed_and_oversized_requests() {
    use stacyvm_agent::{Exec, Frame, MAX_FRAME};
    use std::io::{Read, Write};
    let Some(fx) = docker_fixture(true).await else {
        return;
    };
    let p = fx.provider.clone();
    let (id, runtime) = spawn_with_id(&fx).await;
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &runtime])
        .output()
        .expect("docker inspect");
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    // What anything in the sandbox can reach: the agent's socket.
    let socket = format!("/proc/{pid}/root/.stacyvm/run/agent.sock");
    let connect = || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let hello = Frame::read_from(&mut s).expect("hello").expect("hello");
        assert!(matches!(hello, Frame::Hello { .. }), "{hello:?}");
        s
    };
    // What the agent answers before it hangs up.
    let answer = |mut s: std::os::unix::net::UnixStream, bytes: &[u8]| {
        s.write_all(bytes).expect("write");
        let mut rest = Vec::new();
        // EOF (or a reset) ends it; the agent must never hang.
        let _ = s.read_to_end(&mut rest);
        Frame::read_from(&mut rest.as_slice()).ok().flatten()
    };
    // An exec frame claiming more than the agent takes: dropped unread.
    let mut oversized = vec![1u8];
    oversized.extend_from_slice(&(MAX_FRAME as u32 + 1).to_be_bytes());
    assert_eq!(answer(connect(), &oversized), None);
    // Not the protocol at all.
    assert_eq!(
        answer(connect(), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        None
    );
    // An exec frame with a field the protocol does not know.
    assert_eq!(answer(connect(), &[1, 0, 0, 0, 5, b'z', 0, 0, 0, 0]), None);
    // Commands the agent cannot run: said, not crashed on.
    for exec in [
        Exec::default(),
        Exec {
            argv: vec![b"echo\0x".to_vec()],
            ..Default::default()
        },
        Exec {
            argv: vec![b"echo".to_vec()],
            env: vec![b"NO_EQUALS_SIGN".to_vec()],
            ..Default::default()
        },
    ] {
        let failed = answer(connect(), &Frame::Exec(exec.clone()).encode());
        assert!(
            matches!(failed, Some(Frame::Failed { .. })),
            "{exec:?}: {failed:?}"
        );
    }
    // Clients that connect and say nothing do not block others.
    let idle: Vec<_> = (0..8).map(|_| connect()).collect();
    let r = run(&p, &runtime, spec(&["echo", "ok"])).await;
    assert_eq!(r.stdout, "ok\n");
    drop(idle);
    // PID 1 is still the agent, and still serves.
    let r = run(&p, &runtime, spec(&["cat", "/proc/1/cmdline"])).await;
    assert_eq!(
        r.stdout.trim_end_matches('\0'),
        stacyvm::provider::agent::AGENT_PATH
    );
    p.destroy(&id).await.expect("destroy");
}

/// `stacyvm certify` takes a provider through a sandbox's life, one timed
/// check per line; the server on that data dir shows the verdict; a
/// provider that cannot run is not certified and the command exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certify_reports_each_check_and_the_server_shows_it() {
    let (dir, _store) = data_dir_with_image();
    let data = dir.path().to_path_buf();
    let certify = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"));
        cmd.arg("--data-dir").arg(&data).arg("certify").args(args);
        cmd
    };
    let out = certify(&["--provider", "native", "--json", "--image", TEST_IMAGE])
        .output()
        .await
        .expect("certify");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let native = &results[0];
    assert_eq!(native["provider"], "native", "{native}");
    assert_eq!(native["certified"], true, "{native}");
    let status_of = |name: &str| {
        native["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap_or_default().to_string())
    };
    for check in [
        "health",
        "image",
        "spawn",
        "exec",
        "files",
        "network_isolation",
        "destroy",
    ] {
        assert_eq!(
            status_of(check).as_deref(),
            Some("pass"),
            "{check}: {native}"
        );
    }
    assert_eq!(status_of("snapshot_restore").as_deref(), Some("skip"));
    // Nothing of the certification's sandbox is left.
    assert_eq!(
        dir_entries(&data.join("sandboxes/native"))
            .into_iter()
            .filter(|n| n.starts_with("cert-"))
            .count(),
        0
    );

    // A server on that data dir shows it.
    let server = crate::support::TestServer::start_in(dir, |c| {
        c.providers.default = "native".into();
    })
    .await;
    // While it runs, certify refuses the data dir (their sandboxes would
    // share id ranges; its reconciler would remove certify's).
    let out = certify(&["--provider", "native"])
        .output()
        .await
        .expect("certify");
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("certify with the server stopped"), "{said}");
    let (status, providers) = server.get("/providers").await;
    assert_eq!(status, 200);
    let shown = providers
        .as_array()
        .expect("providers")
        .iter()
        .find(|p| p["name"] == "native")
        .expect("native")
        .clone();
    assert_eq!(shown["certification"]["certified"], true, "{shown}");
    assert_eq!(shown["certification"]["failed"], serde_json::json!([]));

    // A provider whose backend is missing: not certified, exit 1, and the
    // table says which check failed.
    let (other, _store) = data_dir_with_image();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("--data-dir")
        .arg(other.path())
        .args(["certify", "--provider", "qemu"])
        .env("STACYVM_PROVIDERS_QEMU_BINARY", "/nonexistent/qemu")
        .output()
        .await
        .expect("certify");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{table}");
    assert!(table.contains("NOT certified (failed: health"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("qemu") && l.contains("health") && l.contains("FAIL")),
        "{table}"
    );
}

/// A firecracker provider on a fresh data dir with the test kernel and
/// the Firecracker build beside the repository (`STACYVM_TEST_FIRECRACKER`),
/// `tweak` applied; `None`, said so, without them.
fn firecracker_provider_with(
    tweak: impl FnOnce(&mut stacyvm::config::FirecrackerConfig),
) -> Option<(
    stacyvm::provider::microvm::firecracker::FirecrackerProvider,
    tempfile::TempDir,
)> {
    let kernel = PathBuf::from(crate::support::require_env("STACYVM_TEST_KERNEL")?);
    // Not required even in strict runs: nothing can install Firecracker.
    let Some(binary) = std::env::var_os("STACYVM_TEST_FIRECRACKER").filter(|b| !b.is_empty())
    else {
        eprintln!("SKIPPED: no Firecracker binary (STACYVM_TEST_FIRECRACKER)");
        return None;
    };
    let (data, store) = data_dir_with_image();
    let mut config = stacyvm::config::FirecrackerConfig {
        binary: binary.into(),
        kernel,
        boot_timeout: stacyvm::duration::GoDuration(Duration::from_secs(10)),
        // The build beside the repository has seccomp filters for musl
        // only (its README).
        seccomp: false,
        ..Default::default()
    };
    tweak(&mut config);
    let provider = stacyvm::provider::microvm::firecracker::FirecrackerProvider::new(
        store,
        data.path().join("sandboxes/firecracker"),
        data.path().join("vm"),
        config,
    );
    Some((provider, data))
}

/// Host processes whose working directory is under `dir` (Firecracker
/// runs in its sandbox's directory).
fn processes_in(dir: &Path) -> Vec<String> {
    dir_entries(Path::new("/proc"))
        .into_iter()
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|cwd| cwd.starts_with(dir))
        })
        .collect()
}

/// The real Firecracker: its version, the kernel extracted from Debian's
/// bzImage, the API conversation of a boot. Where KVM runs guests the VM
/// boots to its agent over vsock and serves commands and files; on a host
/// that is itself a VM (this one: its guests do not reach init) the spawn
/// fails with Firecracker's output and leaves nothing. Either way destroy
/// leaves no process, socket or disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_speaks_the_real_api_and_boots_where_kvm_works() {
    use stacyvm::provider::certify::{CheckKind, CheckStatus};
    let Some((p, data)) = firecracker_provider_with(|_| {}) else {
        return;
    };
    p.health().await.expect("healthy");
    let checks = p.host_checks().await;
    let binary = checks
        .iter()
        .find(|c| c.check == CheckKind::Binary)
        .expect("a binary check");
    assert_eq!(binary.status, CheckStatus::Pass, "{binary:?}");
    assert!(binary.detail.contains("Firecracker v"), "{binary:?}");
    let kernel = checks
        .iter()
        .find(|c| c.check == CheckKind::Kernel)
        .expect("a kernel check");
    assert_eq!(kernel.status, CheckStatus::Pass, "{kernel:?}");
    // The vmlinux taken out of the bzImage: an ELF file of tens of MiB.
    let kernels = data.path().join("vm/kernels");
    let extracted = dir_entries(&kernels);
    assert_eq!(extracted.len(), 1, "{extracted:?}");
    let vmlinux = std::fs::read(kernels.join(&extracted[0])).expect("vmlinux");
    assert_eq!(&vmlinux[..4], b"\x7fELF");
    assert!(vmlinux.len() > 20 << 20, "{} bytes", vmlinux.len());
    assert!(kernel.detail.contains(&extracted[0]), "{kernel:?}");

    let p: Arc<dyn Provider> = Arc::new(p);
    let spec = vm_spec(TEST_IMAGE);
    let sandboxes = data.path().join("sandboxes/firecracker");
    match p.spawn(&spec).await {
        Ok(handle) => {
            let id = handle.runtime_id;
            let r = run(
                &p,
                &id,
                spec_of(&["sh", "-c", "echo hi; cat /proc/1/cmdline"]),
            )
            .await;
            assert_eq!(r.exit, ExecExit::Exited(0));
            assert!(r.stdout.starts_with("hi\n/init"), "{}", r.stdout);
            let content = Bytes::from((0..=255u8).cycle().take(300_000).collect::<Vec<_>>());
            p.write_file(&id, "/workspace/blob", content.clone(), 0o644)
                .await
                .expect("write");
            assert_eq!(
                p.read_file(&id, "/workspace/blob").await.expect("read"),
                content
            );
            assert_eq!(dir_entries(&sandboxes), vec![id.clone()]);
            p.destroy(&id).await.expect("destroy");
        }
        Err(e) => {
            assert!(
                stacyvm::provider::microvm::machine::host_is_a_vm(),
                "on a host that is not itself a VM the guest must boot: {e}"
            );
            let text = e.to_string();
            eprintln!("this host is a VM; the spawn failed as it should:\n{text}");
            assert!(text.contains("did not boot to its agent"), "{text}");
            // Firecracker's own log lines, as the console's last lines.
            assert!(text.contains("[anonymous-instance:"), "{text}");
        }
    }
    assert_eq!(dir_entries(&sandboxes), Vec::<String>::new());
    assert_eq!(processes_in(data.path()), Vec::<String>::new());
    assert!(matches!(
        p.inspect(&spec.sandbox_id).await,
        Ok(stacyvm::provider::RuntimeStatus::Missing)
    ));
}

/// What Firecracker or its configuration refuses is a clear error, and a
/// refused VM leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firecracker_configuration_errors_are_clear_and_leave_nothing() {
    // A machine Firecracker refuses: its own words, through its API.
    let Some((p, data)) = firecracker_provider_with(|_| {}) else {
        return;
    };
    let mut spec = vm_spec(TEST_IMAGE);
    spec.memory_mb = 0;
    let err = p.spawn(&spec).await.expect_err("no memory");
    assert!(matches!(err, ProviderError::Unavailable(_)), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("Firecracker refused PUT /machine-config") && text.contains("memory size"),
        "{text}"
    );
    assert_eq!(
        dir_entries(&data.path().join("sandboxes/firecracker")),
        Vec::<String>::new()
    );
    assert_eq!(processes_in(data.path()), Vec::<String>::new());

    // No binary, or one that is not Firecracker: unhealthy, saying which
    // setting to change; a spawn fails the same way and leaves nothing.
    let (p, data) =
        firecracker_provider_with(|c| c.binary = "/nonexistent/firecracker".into()).expect("fc");
    let err = p.health().await.expect_err("no binary");
    assert!(
        err.to_string().contains("providers.firecracker.binary"),
        "{err}"
    );
    let err = p.spawn(&vm_spec(TEST_IMAGE)).await.expect_err("no binary");
    assert!(
        err.to_string().contains("providers.firecracker.binary"),
        "{err}"
    );
    assert_eq!(
        dir_entries(&data.path().join("sandboxes/firecracker")),
        Vec::<String>::new()
    );
    let (p, _data) = firecracker_provider_with(|c| c.binary = "/bin/true".into()).expect("fc");
    let err = p.health().await.expect_err("not firecracker");
    assert!(
        err.to_string().contains("does not say it is Firecracker"),
        "{err}"
    );

    // A kernel that is neither an ELF nor an LZ4 bzImage.
    let bogus = tempfile::tempdir().expect("tempdir");
    let (p, _data) = firecracker_provider_with(|c| {
        let real = c.kernel.clone();
        let release = real.file_name().expect("name").to_owned();
        std::fs::write(bogus.path().join(&release), "not a kernel").expect("write");
        c.modules_dir = real
            .parent()
            .and_then(Path::parent)
            .expect("<root>/boot")
            .join("lib/modules")
            .join(
                release
                    .to_string_lossy()
                    .strip_prefix("vmlinuz-")
                    .expect("vmlinuz-<release>"),
            );
        c.kernel = bogus.path().join(release);
    })
    .expect("fc");
    let err = p.health().await.expect_err("bogus kernel");
    assert!(err.to_string().contains("uncompressed vmlinux"), "{err}");
}

/// A terminal straight on the provider: the command's output on a PTY of
/// the size asked, typed input reaching it, a resize it sees, and its
/// exit. The same agent code serves docker, native and the microVMs.
async fn terminal_case(fx: &Fixture) {
    use stacyvm::provider::{Terminal, TerminalInput, TerminalSize};
    let p = &fx.provider;
    let id = p
        .spawn(&vm_spec(&fx.image))
        .await
        .expect("spawn")
        .runtime_id;
    let (input, input_rx) = mpsc::channel(16);
    let (sink, mut out) = mpsc::channel(64);
    let terminal = Terminal {
        size: TerminalSize { cols: 80, rows: 24 },
        input: input_rx,
    };
    let mut sh = spec(&["sh"]);
    sh.env.insert("TERM".into(), "xterm".into());
    let (p2, id2) = (p.clone(), id.clone());
    let run = tokio::spawn(async move { p2.exec_terminal(&id2, &sh, terminal, sink).await });
    let mut seen = String::new();
    let mut until = async |want: &str, seen: &mut String| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !seen.contains(want) {
            match tokio::time::timeout_at(deadline, out.recv()).await {
                Ok(Some(chunk)) => {
                    assert_eq!(chunk.stream, StreamKind::Stdout);
                    seen.push_str(&String::from_utf8_lossy(&chunk.data));
                }
                other => panic!("no {want:?} ({other:?}) in {seen:?}"),
            }
        }
    };
    let typed = |s: &str| TerminalInput::Data(Bytes::from(s.to_string()));
    input.send(typed("tty; stty size\r")).await.expect("input");
    until("24 80", &mut seen).await;
    assert!(seen.contains("/dev/pts/"), "{seen:?}");
    input
        .send(TerminalInput::Resize(TerminalSize {
            cols: 100,
            rows: 30,
        }))
        .await
        .expect("resize");
    input
        .send(typed("stty size; exit 7\r"))
        .await
        .expect("input");
    until("30 100", &mut seen).await;
    let exit = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the shell ends")
        .expect("join")
        .expect("exit");
    assert_eq!(exit, ExecExit::Exited(7), "{seen:?}");
    p.destroy(&id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn native_terminal() {
    terminal_case(&native_fixture().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_terminal() {
    if let Some(fx) = docker_fixture(true).await {
        terminal_case(&fx).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_terminal() {
    if let Some(fx) = qemu_fixture().await {
        terminal_case(&fx).await;
    }
}
