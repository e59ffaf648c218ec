//! A private, throwaway Docker daemon for chaos tests: it can be stopped and
//! restarted while StacyVM runs, without touching the host's dockerd that the
//! other tests (in parallel, in this same binary) use.
//!
//! Everything lives under a short temp dir `/tmp/svmd-XXXXXX` (unix socket
//! paths are limited to 108 bytes):
//!
//! ```text
//! docker.sock   the API socket (PrivateDockerd::host)
//! data/         --data-root (images, containers, the managed containerd's root)
//! exec/         --exec-root (the managed containerd's socket and state, runc state)
//! docker.pid    --pidfile
//! daemon.json   an empty --config-file, so /etc/docker/daemon.json is not read
//! dockerd.log   dockerd's (and its containerd's) stdout/stderr, appended across restarts
//! ```
//!
//! The daemon runs without `--live-restore`, as a default install does:
//! stopping it stops its containers (SIGTERM, SIGKILL after the container's
//! stop timeout, 10 s by default — a container whose PID 1 is `/bin/sh`, like
//! StacyVM's sandboxes, ignores SIGTERM, so `stop()` with running containers
//! takes ~12 s). On restart, containers with restart policy `unless-stopped`
//! or `always` are started again before the API answers; containers that
//! were `docker stop`ped or `docker kill`ed stay exited.
//!
//! The methods block (they run the docker CLI and wait for the daemon). In a
//! `#[tokio::test]` with an in-process StacyVM server, call them from
//! `tokio::task::block_in_place` (multi-thread flavor) or `spawn_blocking`,
//! or the server stalls while the daemon stops.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal, kill_process};

/// How long the daemon gets to answer after (re)starting.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `stop` waits after SIGTERM before SIGKILL. Above dockerd's own
/// bound (container stop timeout 10 s + 5 s grace).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for one docker CLI call.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// containerd namespaces of the private daemon: distinct from the host's
/// (`moby`, `plugins.moby`) so that even a shared system containerd would
/// keep the two apart.
const CONTAINERD_NAMESPACE: &str = "stacyvm-privd";
const CONTAINERD_PLUGINS_NAMESPACE: &str = "stacyvm-privd-plugins";
/// Where containerd-shim-runc-v2 puts its sockets (fixed, shared with the host).
const SHIM_SOCKET_DIR: &str = "/run/containerd/s";

pub struct PrivateDockerd {
    /// The temp dir; removed by `Drop` after the daemon is gone and
    /// everything under it is unmounted.
    dir: PathBuf,
    /// The running dockerd, `None` while stopped.
    child: Option<Child>,
    storage_driver: Option<String>,
}

impl PrivateDockerd {
    /// Starts a private dockerd (own data root, exec root, pidfile, socket
    /// and managed containerd under a temp dir), waits until it answers and
    /// imports the test image into it. `None` when docker tests are disabled
    /// (skip message; a panic under `STACYVM_TEST_STRICT=1`).
    pub fn start() -> Option<PrivateDockerd> {
        Self::start_with(false)
    }

    /// As [`start`](Self::start), with the data root on its own btrfs
    /// filesystem (a 2 GiB sparse loop image) and the btrfs storage driver,
    /// which supports the `size` storage option (as overlay2 does on XFS
    /// with `pquota`; this kernel has no XFS quotas). Needs `mkfs.btrfs`
    /// (btrfs-progs).
    pub fn start_on_btrfs() -> Option<PrivateDockerd> {
        Self::start_with(true)
    }

    fn start_with(btrfs: bool) -> Option<PrivateDockerd> {
        if !crate::support::docker_enabled() {
            return None;
        }
        let rootfs = crate::support::rootfs_tarball();
        if !rootfs.is_file() {
            panic!(
                "test rootfs {} not found (set STACYVM_TEST_ROOTFS; scripts/test-env.sh builds it)",
                rootfs.display()
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("svmd-")
            .rand_bytes(6)
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("temp dir for the private dockerd: {e}"))
            // Removed by Drop, after unmounting.
            .keep();
        std::fs::write(dir.join("daemon.json"), "{}\n")
            .unwrap_or_else(|e| panic!("write {}/daemon.json: {e}", dir.display()));
        // From here on a panic drops `daemon`, which cleans up.
        let mut daemon = PrivateDockerd {
            dir,
            child: None,
            storage_driver: if btrfs {
                Some("btrfs".into())
            } else {
                host_storage_driver()
            },
        };
        if btrfs {
            daemon.mount_btrfs_data_root();
        }
        daemon.launch();
        daemon.import_image(&rootfs);
        Some(daemon)
    }

    fn mount_btrfs_data_root(&self) {
        let image = self.dir.join("btrfs.img");
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data).unwrap_or_else(|e| panic!("mkdir {}: {e}", data.display()));
        File::create(&image)
            .and_then(|f| f.set_len(2 << 30))
            .unwrap_or_else(|e| panic!("create {}: {e}", image.display()));
        let mut mkfs = Command::new("mkfs.btrfs");
        mkfs.arg("-q").arg(&image);
        run_bounded(mkfs, CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("mkfs.btrfs (install btrfs-progs): {e}"));
        let mut mount = Command::new("mount");
        mount.args(["-o", "loop"]).arg(&image).arg(&data);
        run_bounded(mount, CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("mount the btrfs data root: {e}"));
        // The driver's `size` is a qgroup limit: quotas must be on.
        let mut quota = Command::new("btrfs");
        quota.args(["quota", "enable"]).arg(&data);
        run_bounded(quota, CLI_TIMEOUT).unwrap_or_else(|e| panic!("btrfs quota enable: {e}"));
    }

    /// `unix:///tmp/svmd-XXXXXX/docker.sock`, for `providers.docker.host`.
    pub fn host(&self) -> String {
        format!("unix://{}", self.socket().display())
    }

    /// The temp dir holding the daemon's state and `dockerd.log`.
    #[allow(dead_code)]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// True when the daemon answers `GET /_ping` right now.
    pub fn answers(&self) -> bool {
        ping(&self.socket())
    }

    /// Stops the daemon: SIGTERM, then waits for it to exit (its containers
    /// are stopped as in a real daemon shutdown); SIGKILL after 20 s.
    /// No-op when it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(why) = terminate(&mut child) {
            eprintln!("private dockerd {}: {why}", self.dir.display());
            // A SIGKILLed dockerd leaves its containerd to die by
            // parent-death signal; make sure, so a restart starts a fresh one.
            self.kill_leftovers(false);
        }
    }

    /// SIGKILLs dockerd, as in a crash. Its containerd dies with it; the
    /// containers keep running under their shims until `restart()`, which
    /// then stops them (~10 s, before the API answers) and, unlike after a
    /// clean `stop()`, does NOT start `unless-stopped`/`always` containers
    /// again (observed with dockerd 20.10; cf. moby/moby#31735).
    #[allow(dead_code)]
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the daemon again on the same data root and socket (stopping it
    /// first if it still runs) and waits until it answers.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Runs `docker -H <host> args...` and returns its stdout; panics with
    /// stderr when it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        match self.try_cli(args, CLI_TIMEOUT) {
            Ok(out) => out,
            Err(e) => panic!("docker -H {} {}: {e}", self.host(), args.join(" ")),
        }
    }

    fn try_cli(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        let mut cmd = Command::new("docker");
        cmd.arg("-H").arg(self.host()).args(args);
        run_bounded(cmd, timeout)
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("docker.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("dockerd.log")
    }

    /// Spawns dockerd and waits until it answers; panics with the log tail
    /// when it exits or does not answer in time.
    fn launch(&mut self) {
        assert!(self.child.is_none(), "private dockerd is already running");
        let d = &self.dir;
        // After a SIGKILLed dockerd: its containerd must be gone (it dies by
        // parent-death signal, make sure), and the pidfiles it left must go,
        // or dockerd takes a zombie or reused pid for a running daemon
        // ("containerd is still running", then a startup timeout).
        self.kill_leftovers(false);
        let _ = std::fs::remove_file(d.join("docker.pid"));
        let _ = std::fs::remove_file(d.join("exec/containerd/containerd.pid"));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.log_path().display()));
        let log_err = log
            .try_clone()
            .unwrap_or_else(|e| panic!("dup dockerd log: {e}"));
        let mut cmd = Command::new("dockerd");
        cmd.arg("--host")
            .arg(self.host())
            .arg("--data-root")
            .arg(d.join("data"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .args(["--containerd-namespace", CONTAINERD_NAMESPACE])
            .args([
                "--containerd-plugins-namespace",
                CONTAINERD_PLUGINS_NAMESPACE,
            ])
            .args(["--bridge", "none", "--iptables=false", "--ip-masq=false"]);
        if let Some(driver) = &self.storage_driver {
            cmd.args(["--storage-driver", driver]);
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        let started = Instant::now();
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn dockerd (is docker.io installed?): {e}"));
        self.child = Some(child);
        loop {
            if self.answers() {
                eprintln!(
                    "private dockerd {} answers after {:?}",
                    self.host(),
                    started.elapsed()
                );
                return;
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                Some(Err(e)) => Some(format!("wait failed: {e}")),
                _ => None,
            };
            if let Some(status) = exited {
                self.child = None;
                panic!(
                    "private dockerd exited during startup ({status}); last log lines of {}:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path(), 40)
                );
            }
            if started.elapsed() > READY_TIMEOUT {
                self.stop();
                panic!(
                    "private dockerd did not answer within {READY_TIMEOUT:?}; last log lines of {}:\n{}",
                    self.log_path().display(),
                    log_tail(&self.log_path(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Imports the rootfs as scripts/test-env.sh does for the host daemon.
    fn import_image(&self, rootfs: &Path) {
        use sha2::Digest;
        let bytes =
            std::fs::read(rootfs).unwrap_or_else(|e| panic!("read {}: {e}", rootfs.display()));
        let sum: String = sha2::Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let rootfs = rootfs.display().to_string();
        let image = crate::support::docker_image();
        self.cli(&[
            "import",
            "--change",
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "--change",
            &format!("LABEL org.stacyvm.rootfs-sha256={sum}"),
            &rootfs,
            &image,
        ]);
    }

    /// SIGKILLs processes left over from this daemon: its containerd and,
    /// with `shims`, the runc shims and the containers they hold (removing
    /// the shims' sockets from the shared /run/containerd/s).
    fn kill_leftovers(&self, shims: bool) {
        let marker = format!("{}/", self.dir.display());
        let me = std::process::id() as i32;
        let procs = processes();
        for (pid, args) in &procs {
            if *pid == me || !args.iter().any(|a| a.contains(&marker)) {
                continue;
            }
            let is_shim = args.first().is_some_and(|a| a.contains("containerd-shim"));
            if is_shim && !shims {
                continue;
            }
            if is_shim {
                // The container's init (PID 1 of its namespace): killing it
                // takes the whole container down.
                for (child, _) in procs.iter().filter(|(p, _)| parent_of(*p) == Some(*pid)) {
                    eprintln!("private dockerd cleanup: killing container process {child}");
                    signal(*child, Signal::KILL);
                }
            }
            eprintln!("private dockerd cleanup: killing {pid} {}", args.join(" "));
            signal(*pid, Signal::KILL);
            if is_shim && let Some(sock) = shim_socket(args) {
                let _ = std::fs::remove_file(sock);
            }
        }
    }

    /// Lazily unmounts whatever is still mounted under the temp dir.
    fn unmount_all(&self) {
        let marker = format!("{}/", self.dir.display());
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut points: Vec<String> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .map(unescape_mount_path)
            .filter(|p| p.starts_with(&marker) || *p == marker.trim_end_matches('/'))
            .collect();
        // Deepest first.
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        points.dedup();
        for point in points {
            match Command::new("umount").args(["-l", &point]).output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "private dockerd cleanup: umount -l {point}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("private dockerd cleanup: umount -l {point}: {e}"),
            }
        }
    }
}

impl Drop for PrivateDockerd {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        if std::thread::panicking() {
            eprintln!(
                "private dockerd {}: last log lines:\n{}",
                self.dir.display(),
                log_tail(&self.log_path(), 20)
            );
        }
        if self.child.is_some() && self.answers() {
            // Removing containers first unmounts their overlays and ends
            // their shims while the daemon can still do it cleanly.
            match self.try_cli(&["ps", "-aq"], Duration::from_secs(30)) {
                Ok(out) => {
                    let ids: Vec<&str> = out.split_whitespace().collect();
                    if !ids.is_empty() {
                        let mut args = vec!["rm", "-f", "-v"];
                        args.extend(ids);
                        if let Err(e) = self.try_cli(&args, Duration::from_secs(60)) {
                            eprintln!("private dockerd cleanup: docker rm -f: {e}");
                        }
                    }
                }
                Err(e) => eprintln!("private dockerd cleanup: docker ps: {e}"),
            }
        }
        self.stop();
        self.kill_leftovers(true);
        self.unmount_all();
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            eprintln!(
                "private dockerd cleanup: remove {}: {e}",
                self.dir.display()
            );
        }
    }
}

/// SIGTERM, bounded wait, SIGKILL. Returns what went wrong, if anything.
fn terminate(child: &mut Child) -> Option<String> {
    if let Ok(Some(_)) = child.try_wait() {
        return Some("had already exited".into());
    }
    let started = Instant::now();
    signal(child.id() as i32, Signal::TERM);
    while started.elapsed() < STOP_TIMEOUT {
        match child.try_wait() {
            Ok(Some(_)) => {
                eprintln!("private dockerd stopped after {:?}", started.elapsed());
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Some(format!("wait failed: {e}")),
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Some(format!(
        "did not exit within {STOP_TIMEOUT:?} of SIGTERM; SIGKILLed"
    ))
}

fn signal(pid: i32, sig: Signal) {
    if let Some(pid) = Pid::from_raw(pid) {
        // Best effort: it may have exited meanwhile.
        let _ = kill_process(pid, sig);
    }
}

/// `GET /_ping` on the socket; true on a 200.
fn ping(socket: &Path) -> bool {
    let Ok(mut stream) = UnixStream::connect(socket) else {
        return false;
    };
    // dockerd accepts on the socket before it serves (while restoring
    // containers): bound the wait for an answer.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
    if stream
        .write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while head.len() < 12 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head);
    head.starts_with("HTTP/1.") && head.get(8..12) == Some(" 200")
}

/// Runs a command with a deadline; stdout on success, a description with
/// stderr otherwise.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<String, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut out = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut out);
            }
            String::from_utf8_lossy(&out).into_owned()
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if started.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("timed out after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Ok(status) if status.success() => Ok(stdout),
        Ok(status) => Err(format!("{status}: {}", stderr.trim())),
        Err(e) => Err(format!("{e}: {}", stderr.trim())),
    }
}

/// The host daemon's storage driver (`docker info`), asked once; `None`
/// (dockerd picks one) when the host daemon does not say.
fn host_storage_driver() -> Option<String> {
    static DRIVER: OnceLock<Option<String>> = OnceLock::new();
    DRIVER
        .get_or_init(|| {
            let mut cmd = Command::new("docker");
            cmd.args(["info", "--format", "{{.Driver}}"]);
            match run_bounded(cmd, Duration::from_secs(30)) {
                Ok(out) if !out.trim().is_empty() => Some(out.trim().to_string()),
                other => {
                    eprintln!(
                        "private dockerd: host storage driver unknown ({other:?}); letting dockerd choose"
                    );
                    None
                }
            }
        })
        .clone()
}

/// The last `n` lines of a file.
fn log_tail(path: &Path, n: usize) -> String {
    let mut text = String::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_string(&mut text)) {
        return format!("(cannot read {}: {e})", path.display());
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// All processes with their argv.
fn processes() -> Vec<(i32, Vec<String>)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some((pid, args))
        })
        .collect()
}

fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The socket containerd-shim-runc-v2 created for `-namespace NS -id ID
/// -address ADDR`: /run/containerd/s/sha256(ADDR/NS/ID).
fn shim_socket(args: &[String]) -> Option<PathBuf> {
    use sha2::Digest;
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let path = format!(
        "{}/{}/{}",
        flag("-address")?,
        flag("-namespace")?,
        flag("-id")?
    );
    let hex: String = sha2::Sha256::digest(path.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Some(Path::new(SHIM_SOCKET_DIR).join(hex))
}

/// /proc/mounts escapes space, tab, newline and backslash as octal.
fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let code =
                (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

const KEEP_ALIVE: &str = "while :; do sleep 3600; done";

fn container_running(d: &PrivateDockerd, id: &str) -> bool {
    d.cli(&["inspect", "-f", "{{.State.Running}}", id]).trim() == "true"
}

fn container_started_at(d: &PrivateDockerd, id: &str) -> String {
    d.cli(&["inspect", "-f", "{{.State.StartedAt}}", id])
        .trim()
        .to_string()
}

#[test]
fn private_dockerd_stops_and_restarts() {
    let Some(mut d) = PrivateDockerd::start() else {
        return;
    };
    let image = crate::support::docker_image();
    let run = |d: &PrivateDockerd| {
        d.cli(&[
            "run",
            "-d",
            "--restart",
            "unless-stopped",
            &image,
            "/bin/sh",
            "-c",
            KEEP_ALIVE,
        ])
        .trim()
        .to_string()
    };
    let kept = run(&d);
    let killed = run(&d);
    d.cli(&["kill", &killed]);
    assert!(container_running(&d, &kept));
    assert!(!container_running(&d, &killed));
    let first_start = container_started_at(&d, &kept);

    // The host daemon does not see the private daemon's containers.
    if let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--no-trunc"])
        .output()
    {
        assert!(
            !String::from_utf8_lossy(&out.stdout).contains(&kept),
            "the private container shows up in the host daemon"
        );
    }

    d.stop();
    assert!(
        !d.answers(),
        "the private dockerd still answers after stop()"
    );

    d.restart();
    assert!(d.answers());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !container_running(&d, &kept) {
        assert!(
            Instant::now() < deadline,
            "the unless-stopped container did not come back within 20 s of the restart"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(
        container_started_at(&d, &kept),
        first_start,
        "the container was not restarted"
    );
    // `docker kill` counts as a manual stop: the restart policy leaves it be.
    assert!(!container_running(&d, &killed));
    let out = d.cli(&["exec", &kept, "cat", "/etc/hostname"]);
    assert!(!out.trim().is_empty());
}
