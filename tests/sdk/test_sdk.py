"""Compatibility suite: the published Python SDK (stacyvm==0.1.1) against a live server.

Every public method of Client, Sandbox, TemplateManager, ProviderManager,
AsyncClient and AsyncSandbox is called and its effect checked. Nothing is
skipped: each test fails when the server misbehaves.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from datetime import timedelta

import pytest

import stacyvm
from stacyvm import (
    AsyncClient,
    AsyncSandbox,
    Client,
    ExecResult,
    ProviderError,
    QuotaSummary,
    Sandbox,
    SandboxInfo,
    SandboxNotFound,
    SpawnAdmissionDecision,
    StacyVMError,
    Template,
)
from stacyvm.providers import ProviderManager
from stacyvm.templates import TemplateManager

from conftest import GO_DURATION_RE, now_utc, parse_go_duration, parse_ts, uid

SANDBOX_ID_RE = re.compile(r"^sb-[0-9a-f]{8}$")
# Content of /etc/passwd in the test rootfs (scripts/test-env.sh).
ROOTFS_PASSWD = "root:x:0:0:root:/root:/bin/sh\n"


def assert_client_error(exc: BaseException, *codes: str) -> None:
    """A 4xx answer: StacyVMError, not a ProviderError (which the SDK raises for 5xx)."""
    assert isinstance(exc, StacyVMError), repr(exc)
    assert not isinstance(exc, ProviderError), f"server answered 5xx: {exc!r} code={exc.code!r}"
    if codes:
        assert exc.code in codes, f"code {exc.code!r} not in {codes}: {exc}"


def assert_close(actual, expected, slack: timedelta = timedelta(seconds=90)) -> None:
    assert abs(actual - expected) <= slack, f"{actual} not within {slack} of {expected}"


def merge_chunks(chunks):
    """[(stream, data)] with empty chunks dropped and adjacent same-stream chunks joined."""
    out: list[list[str]] = []
    for c in chunks:
        if not c.data:
            continue
        if out and out[-1][0] == c.stream:
            out[-1][1] += c.data
        else:
            out.append([c.stream, c.data])
    return [tuple(x) for x in out]


# =====================================================================
# system: health, providers, pool, quotas, admission
# =====================================================================


def test_health(client):
    h = client.health()
    assert h["status"] == "ok"
    assert isinstance(h.get("version"), str) and h["version"]
    assert "uptime" in h


def test_client_constructor_options_and_context_manager(cfg):
    # api_key is sent as X-API-Key; a server without auth ignores it.
    with Client(cfg.url, api_key="not-checked", timeout=30.0) as c:
        assert c.health()["status"] == "ok"
        assert isinstance(c.templates, TemplateManager)
    assert c._http.is_closed
    c2 = Client(cfg.url, api_key=cfg.api_key)
    c2.close()
    assert c2._http.is_closed


def test_user_id_header_sets_owner(cfg, spawn):
    owner = f"sdk-user-{uid()}"
    with Client(cfg.url, api_key=cfg.api_key, user_id=owner, timeout=120.0) as c:
        sb = c.spawn(image=cfg.image, provider=cfg.provider, ttl="10m")
        spawn.track(sb)
        assert sb._info["owner_id"] == owner
        assert c.get(sb.id)._info["owner_id"] == owner


def test_providers(client, cfg):
    provs = client.providers()
    assert isinstance(provs, list) and provs
    by_name = {p["name"]: p for p in provs}
    assert cfg.provider in by_name, f"{cfg.provider} not in {list(by_name)}"
    mine = by_name[cfg.provider]
    assert mine["healthy"] is True, mine
    assert mine.get("default") is True, mine
    for p in provs:
        assert isinstance(p["healthy"], bool)


def test_provider_manager(client, cfg):
    pm = ProviderManager(client._http)
    names = [p["name"] for p in pm.list()]
    assert sorted(names) == sorted(p["name"] for p in client.providers())
    result = pm.test()
    assert isinstance(result, dict)
    assert result.get(cfg.provider) is True, result
    assert set(result) <= set(names)
    assert all(isinstance(v, bool) for v in result.values())


def test_pool_status(client):
    assert client.pool_status() == {"enabled": False}


def test_quota_summary(client):
    q = client.quota_summary()
    assert isinstance(q, QuotaSummary)
    for v in (q.total, q.with_max_sandboxes, q.with_max_ttl, q.with_max_exec_timeout):
        assert isinstance(v, int) and 0 <= v <= q.total


def test_admission_allowed(client, cfg, spawn):
    sb = spawn()
    d = client.admission(image=cfg.image, provider=cfg.provider, ttl="10m", memory_mb=256,
                         vcpus=1, owner_id=f"adm-{uid()}", metadata={"k": "v"})
    assert isinstance(d, SpawnAdmissionDecision)
    assert d.allowed is True
    assert isinstance(d.queueable, bool)
    assert d.active_sandboxes >= 1  # at least `sb`
    assert isinstance(d.max_sandboxes, int)
    assert d.active_owner_sandboxes == 0
    if d.max_ttl:
        assert parse_go_duration(d.max_ttl) >= 600
    # admission creates nothing
    assert [s.id for s in client.list()].count(sb.id) == 1
    assert client.admission().allowed is True


def test_admission_rejects_ttl_over_max(client, cfg):
    d = client.admission(image=cfg.image, ttl="100h")
    assert isinstance(d, SpawnAdmissionDecision)
    assert d.allowed is False
    assert d.reason == "max_ttl"
    assert d.queueable is False


def test_spawn_over_max_ttl_is_refused(client, cfg):
    marker = uid()
    with pytest.raises(StacyVMError) as ei:
        sb = client.spawn(image=cfg.image, provider=cfg.provider, ttl="100h", metadata={"marker": marker})
        sb.destroy()
    assert_client_error(ei.value)
    assert not [s for s in client.list() if s.metadata.get("marker") == marker]


# =====================================================================
# sandbox lifecycle
# =====================================================================


def test_spawn_echoes_request(client, cfg, spawn):
    owner = f"owner-{uid()}"
    meta = {"suite": "sdk", "run": uid(), "with space": "a b"}
    before = now_utc()
    sb = spawn(owner_id=owner, metadata=meta, memory_mb=256, vcpus=1, ttl="15m")
    assert isinstance(sb, Sandbox)
    assert SANDBOX_ID_RE.match(sb.id), sb.id
    assert sb.state == "running"
    assert sb.provider == cfg.provider
    assert sb.image == cfg.image
    info = sb._info
    assert info["owner_id"] == owner
    assert info["metadata"] == meta
    assert info["memory_mb"] == 256
    assert info["vcpus"] == 1
    created, expires = parse_ts(info["created_at"]), parse_ts(info["expires_at"])
    assert_close(created, before)
    assert_close(expires - created, timedelta(minutes=15), timedelta(seconds=5))
    assert sb.id in repr(sb)


def test_spawn_defaults_to_server_provider(client, cfg, spawn):
    sb = client.spawn(image=cfg.image)
    spawn.track(sb)
    assert sb.provider == cfg.provider
    assert sb.state == "running"
    # default ttl 30m
    info = sb._info
    assert_close(parse_ts(info["expires_at"]) - parse_ts(info["created_at"]),
                 timedelta(minutes=30), timedelta(seconds=5))
    assert sb.exec("echo ok").stdout == "ok\n"


def test_spawned_ids_are_unique(spawn):
    ids = {spawn().id for _ in range(3)}
    assert len(ids) == 3
    assert all(SANDBOX_ID_RE.match(i) for i in ids)


def test_get_and_list(client, cfg, spawn):
    meta = {"list": uid()}
    sb = spawn(metadata=meta)
    got = client.get(sb.id)
    assert isinstance(got, Sandbox)
    assert got.id == sb.id
    assert got.state == "running"
    assert got.provider == cfg.provider and got.image == cfg.image
    assert got._info["metadata"] == meta
    assert parse_ts(got._info["created_at"]) == parse_ts(sb._info["created_at"])

    listed = {s.id: s for s in client.list()}
    assert sb.id in listed
    info = listed[sb.id]
    assert isinstance(info, SandboxInfo)
    assert info.state == "running"
    assert info.provider == cfg.provider
    assert info.image == cfg.image
    assert info.metadata == meta
    parse_ts(info.created_at)
    parse_ts(info.expires_at)


def test_refresh(client, spawn):
    sb = spawn(metadata={"r": "1"})
    sb._info = {}
    assert sb.state == "unknown"
    sb.refresh()
    assert sb.state == "running"
    assert sb._info["id"] == sb.id
    assert sb._info["metadata"] == {"r": "1"}


def test_extend_ttl(client, spawn):
    sb = spawn(ttl="5m")
    exp0 = parse_ts(sb._info["expires_at"])
    sb.extend_ttl("2h")  # also refreshes
    exp1 = parse_ts(sb._info["expires_at"])
    assert exp1 > exp0
    assert_close(exp1, now_utc() + timedelta(hours=2))
    listed = {s.id: s for s in client.list()}
    assert parse_ts(listed[sb.id].expires_at) == exp1
    # new expiry counts from now, not from the current expiry: default 30m < 2h
    sb.extend_ttl()
    exp2 = parse_ts(sb._info["expires_at"])
    assert exp2 < exp1
    assert_close(exp2, now_utc() + timedelta(minutes=30))
    assert sb.state == "running"


def test_extend_ttl_rejects_bad_values(spawn):
    sb = spawn()
    for bad in ("banana", "-5m", "0s"):
        with pytest.raises(StacyVMError) as ei:
            sb.extend_ttl(bad)
        assert_client_error(ei.value, "BAD_REQUEST")


def test_destroy(client, spawn):
    sb = spawn()
    sb.exec("true")
    sb.destroy()
    with pytest.raises(SandboxNotFound):
        client.get(sb.id)
    assert sb.id not in [s.id for s in client.list()]
    with pytest.raises(SandboxNotFound):
        sb.destroy()
    with pytest.raises(SandboxNotFound):
        sb.refresh()
    with pytest.raises(StacyVMError) as ei:
        sb.exec("echo still alive")
    assert_client_error(ei.value)


def test_context_manager_destroys(client, cfg):
    with client.spawn(image=cfg.image, provider=cfg.provider, ttl="10m") as sb:
        assert sb.exec("echo inside").stdout == "inside\n"
        sid = sb.id
    with pytest.raises(SandboxNotFound):
        client.get(sid)
    assert sid not in [s.id for s in client.list()]


def test_prune(client, spawn):
    live = spawn(ttl="30m")
    short = spawn(ttl="2s")
    time.sleep(3.5)
    n = client.prune()
    assert isinstance(n, int) and n >= 0
    # The expired sandbox is gone (pruned now, or reaped before); the live one stays.
    with pytest.raises(SandboxNotFound):
        client.get(short.id)
    assert short.id not in [s.id for s in client.list()]
    assert client.get(live.id).state == "running"
    assert isinstance(client.prune(), int)


def test_get_preview_url(spawn):
    sb = spawn()
    url = sb.get_preview_url(8080)
    assert isinstance(url, str)
    assert url.startswith(f"http://8080-{sb.id}.")
    assert sb.id in url
    domain = sb._info.get("preview_domain") or "localhost"
    assert url == f"http://8080-{sb.id}.{domain}"


# =====================================================================
# exec
# =====================================================================

TRICKY_ARGS = ["hello world", "it's", "$HOME", 'say "hi"', "`id`", "$(echo pwned)", "; echo injected", "*", ""]


def test_exec_shell_args_are_quoted(shared_sb):
    # command is shell text; args are appended shell-quoted, so they stay literal
    r = shared_sb.exec("printf '[%s]\\n'", args=TRICKY_ARGS)
    assert isinstance(r, ExecResult)
    assert r.exit_code == 0, r
    assert r.stdout == "".join(f"[{a}]\n" for a in TRICKY_ARGS)
    assert "pwned" not in r.stdout.replace("[$(echo pwned)]", "")
    assert r.stderr == ""


def test_exec_shell_features(shared_sb):
    r = shared_sb.exec("echo $((40+2)) | cat; X=1 && echo x=$X")
    assert (r.exit_code, r.stdout) == (0, "42\nx=1\n")
    r = shared_sb.exec("echo hi", mode="shell")
    assert (r.exit_code, r.stdout) == (0, "hi\n")


def test_exec_argv_mode(shared_sb):
    r = shared_sb.exec("printf", args=["[%s]\n", "a b", "$HOME", "it's", "`id`"], mode="argv")
    assert r.exit_code == 0, r
    assert r.stdout == "[a b]\n[$HOME]\n[it's]\n[`id`]\n"
    # argv mode has no shell: `sh` must be asked for explicitly
    r = shared_sb.exec("sh", args=["-c", 'echo "$0-$1"', "zero", "one"], mode="argv")
    assert r.stdout == "zero-one\n"


def test_exec_env(shared_sb):
    r = shared_sb.exec('echo "$FOO|$BAR"', env={"FOO": "bar baz", "BAR": "$HOME"})
    assert r.stdout == "bar baz|$HOME\n"
    r = shared_sb.exec("env", mode="argv", env={"SDK_TEST_VAR": "v=1 2"})
    assert "SDK_TEST_VAR=v=1 2" in r.stdout.splitlines()


def test_exec_workdir(shared_sb):
    assert shared_sb.exec("pwd", workdir="/tmp").stdout == "/tmp\n"
    assert shared_sb.exec("pwd", workdir="/workspace").stdout == "/workspace\n"
    assert shared_sb.exec("pwd", mode="argv", workdir="/etc").stdout == "/etc\n"


def test_exec_nonzero_exit_and_stderr(shared_sb):
    r = shared_sb.exec("echo out; echo err >&2; exit 3")
    assert r.exit_code == 3
    assert r.stdout == "out\n"
    assert r.stderr == "err\n"
    r = shared_sb.exec("false")
    assert r.exit_code == 1
    r = shared_sb.exec("definitely-not-a-command-xyz")
    assert r.exit_code == 127
    assert "not found" in r.stderr


def test_exec_duration_is_go_duration(shared_sb):
    r = shared_sb.exec("true")
    assert GO_DURATION_RE.match(r.duration), r.duration
    assert parse_go_duration(r.duration) < 10
    r = shared_sb.exec("sleep 1")
    assert GO_DURATION_RE.match(r.duration), r.duration
    assert 0.9 <= parse_go_duration(r.duration) < 10, r.duration


def test_exec_large_output(shared_sb):
    r = shared_sb.exec("i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done")
    lines = r.stdout.splitlines()
    assert len(lines) == 20000
    assert lines[0] == "line-0" and lines[-1] == "line-19999"


def test_exec_timeout(shared_sb):
    t0 = time.monotonic()
    try:
        r = shared_sb.exec("sleep 5", timeout="1s")
    except StacyVMError as e:
        assert_client_error(e, "TIMEOUT")
    else:
        # A server may instead answer with a result; then it must say it timed out.
        text = (r.stdout + r.stderr).lower()
        assert r.exit_code != 0 and ("timeout" in text or "timed out" in text), r
    elapsed = time.monotonic() - t0
    assert elapsed < 4.0, f"timeout 1s took {elapsed:.1f}s"
    # the sandbox is still usable
    assert shared_sb.exec("echo after").stdout == "after\n"


def test_exec_bogus_mode(shared_sb):
    with pytest.raises(StacyVMError) as ei:
        shared_sb.exec("echo hi", mode="bogus")
    assert_client_error(ei.value, "BAD_REQUEST")


def test_exec_stream(shared_sb):
    t0 = time.monotonic()
    chunks, times = [], []
    for c in shared_sb.exec_stream("echo a; sleep 1; echo e >&2; sleep 1; echo b"):
        chunks.append(c)
        times.append(time.monotonic() - t0)
    total = time.monotonic() - t0
    assert chunks, "no chunks"
    assert all(c.stream in ("stdout", "stderr") for c in chunks), chunks
    assert merge_chunks(chunks) == [("stdout", "a\n"), ("stderr", "e\n"), ("stdout", "b\n")], chunks
    first = next(i for i, c in enumerate(chunks) if c.data)
    assert total >= 1.8
    # flushed as produced: "a" arrives long before the command ends
    assert times[first] < 1.0 and total - times[first] > 1.0, (times, total)


def test_exec_stream_args_env_workdir(shared_sb):
    chunks = list(shared_sb.exec_stream("printf '[%s]\\n'", args=["a b", "$HOME"]))
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "[a b]\n[$HOME]\n"
    chunks = list(shared_sb.exec_stream("pwd", mode="argv", workdir="/tmp"))
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "/tmp\n"
    chunks = list(shared_sb.exec_stream('echo "$V"', env={"V": "streamed"}))
    assert "".join(c.data for c in chunks if c.stream == "stdout") == "streamed\n"


# =====================================================================
# files
# =====================================================================


def test_files_write_read_stat_list(shared_sb):
    d = f"/workspace/f-{uid()}"
    path = f"{d}/sub/hello.txt"
    content = "hi\nthere ✓ é\n"
    shared_sb.write_file(path, content)  # parents created
    assert shared_sb.read_file(path) == content
    assert shared_sb.exec(f"cat {path}").stdout == content

    st = shared_sb.stat_file(path)
    assert st["name"] == "hello.txt"
    assert st["path"] in (path, "hello.txt") or st["path"].endswith("/sub/hello.txt")
    assert st["size"] == len(content.encode())
    assert st["is_dir"] is False
    assert st["mode"] == "644"  # default mode
    assert st["mod_time"]
    parse_ts(st["mod_time"])

    entries = shared_sb.list_files(f"{d}/sub")
    assert [e["name"] for e in entries] == ["hello.txt"]
    e = entries[0]
    for key in ("path", "name", "size", "mode", "is_dir", "mod_time"):
        assert key in e
    assert e["size"] == len(content.encode()) and e["is_dir"] is False

    top = {e["name"]: e for e in shared_sb.list_files(d)}
    assert set(top) == {"sub"}
    assert top["sub"]["is_dir"] is True
    assert shared_sb.stat_file(f"{d}/sub")["is_dir"] is True

    root_names = {e["name"] for e in shared_sb.list_files()}
    assert {"bin", "etc", "tmp", "workspace"} <= root_names

    # overwrite replaces, not appends
    shared_sb.write_file(path, "short")
    assert shared_sb.read_file(path) == "short"
    assert shared_sb.stat_file(path)["size"] == 5


def test_files_write_with_mode(shared_sb):
    d = f"/workspace/m-{uid()}"
    shared_sb.write_file(f"{d}/run.sh", "#!/bin/sh\necho ran\n", mode="0755")
    assert shared_sb.stat_file(f"{d}/run.sh")["mode"] == "755"
    assert shared_sb.exec(f"{d}/run.sh").stdout == "ran\n"
    shared_sb.write_file(f"{d}/secret", "s", mode="0600")
    assert shared_sb.stat_file(f"{d}/secret")["mode"] == "600"
    assert shared_sb.exec(f"stat -c %a {d}/secret").stdout.strip() == "600"


def test_files_move(shared_sb):
    d = f"/workspace/mv-{uid()}"
    shared_sb.write_file(f"{d}/a.txt", "moving")
    shared_sb.move_file(f"{d}/a.txt", f"{d}/b.txt")
    assert shared_sb.read_file(f"{d}/b.txt") == "moving"
    assert [e["name"] for e in shared_sb.list_files(d)] == ["b.txt"]
    with pytest.raises(StacyVMError) as ei:
        shared_sb.stat_file(f"{d}/a.txt")
    assert_client_error(ei.value)
    assert shared_sb.exec(f"test -e {d}/a.txt").exit_code == 1


def test_files_chmod(shared_sb):
    p = f"/workspace/ch-{uid()}.sh"
    shared_sb.write_file(p, "#!/bin/sh\necho chmodded\n")
    assert shared_sb.stat_file(p)["mode"] == "644"
    assert shared_sb.exec(p).exit_code != 0
    shared_sb.chmod_file(p, "755")
    assert shared_sb.stat_file(p)["mode"] == "755"
    assert shared_sb.exec(p).stdout == "chmodded\n"
    shared_sb.chmod_file(p, "0600")
    assert shared_sb.stat_file(p)["mode"] == "600"


def test_files_glob(shared_sb):
    d = f"/workspace/g-{uid()}"
    for name in ("a.txt", "b.txt", "c.log"):
        shared_sb.write_file(f"{d}/{name}", name)
    got = shared_sb.glob_files(f"{d}/*.txt")
    assert isinstance(got, list)
    assert sorted(got) == [f"{d}/a.txt", f"{d}/b.txt"]
    assert shared_sb.glob_files(f"{d}/*.none") == []


def test_files_delete(shared_sb):
    d = f"/workspace/del-{uid()}"
    shared_sb.write_file(f"{d}/one.txt", "1")
    shared_sb.write_file(f"{d}/deep/er/two.txt", "2")
    shared_sb.delete_file(f"{d}/one.txt")
    assert shared_sb.exec(f"test -e {d}/one.txt").exit_code == 1
    assert shared_sb.exec(f"test -e {d}/deep/er/two.txt").exit_code == 0
    shared_sb.delete_file(d, recursive=True)
    assert shared_sb.exec(f"test -e {d}").exit_code == 1
    with pytest.raises(StacyVMError) as ei:
        shared_sb.stat_file(d)
    assert_client_error(ei.value)
    assert not [e for e in shared_sb.list_files("/workspace") if e["name"] == d.rsplit("/", 1)[1]]


def test_files_missing_are_client_errors(shared_sb):
    p = f"/workspace/missing-{uid()}"
    for call in (lambda: shared_sb.read_file(p), lambda: shared_sb.stat_file(p),
                 lambda: shared_sb.list_files(p), lambda: shared_sb.delete_file(p)):
        with pytest.raises(StacyVMError) as ei:
            call()
        assert_client_error(ei.value)


# ---------------------------------------------------------------- path escapes
# The server runs on this host, so the host filesystem is checked directly.

UP = "../" * 12


def test_path_escape_write_stays_inside(spawn):
    sb = spawn()
    name = f"stacyvm-escape-{uid()}"
    for path in (f"/tmp/{UP}{name}", f"{UP}{name}", f"/workspace/../../../{name}"):
        try:
            sb.write_file(path, "escaped?")
        except StacyVMError as e:
            assert_client_error(e, "BAD_REQUEST", "FORBIDDEN")
        else:
            # landed inside the sandbox, at /<name>
            assert sb.exec(f"cat /{name}").stdout == "escaped?"
        assert not os.path.exists(f"/{name}"), "file written on the host"
        assert not os.path.exists(f"/tmp/{name}")


def test_path_escape_read_and_list_stay_inside(spawn):
    sb = spawn()
    own_passwd = sb.exec("cat /etc/passwd").stdout
    assert own_passwd == ROOTFS_PASSWD
    for path in (f"/{UP}etc/passwd", f"/tmp/{UP}etc/passwd", f"{UP}etc/passwd"):
        try:
            got = sb.read_file(path)
        except StacyVMError as e:
            assert_client_error(e, "BAD_REQUEST", "FORBIDDEN")
        else:
            assert got == own_passwd
    try:
        names = {e["name"] for e in sb.list_files(f"/tmp/{UP}etc")}
    except StacyVMError as e:
        assert_client_error(e, "BAD_REQUEST", "FORBIDDEN")
    else:
        assert names == {e["name"] for e in sb.list_files("/etc")}
    try:
        got = sb.glob_files(f"/tmp/{UP}etc/pass*")
    except StacyVMError as e:
        assert_client_error(e, "BAD_REQUEST", "FORBIDDEN")
    else:
        assert all("passwd" in g for g in got)
        # whatever it returns must be readable inside the sandbox as the sandbox's file
        for g in got:
            assert sb.exec(f"cat '{g}'").stdout == own_passwd


def test_path_escape_through_symlinks(spawn):
    sb = spawn()
    u = uid()
    assert sb.exec(f"ln -s / /tmp/hostroot-{u} && ln -s /etc /tmp/etc-{u}").exit_code == 0
    try:
        got = sb.read_file(f"/tmp/hostroot-{u}/etc/passwd")
    except StacyVMError as e:
        assert_client_error(e)
    else:
        assert got == ROOTFS_PASSWD
    try:
        got = sb.read_file(f"/tmp/etc-{u}/passwd")
    except StacyVMError as e:
        assert_client_error(e)
    else:
        assert got == ROOTFS_PASSWD
    name = f"stacyvm-symlink-escape-{u}"
    try:
        sb.write_file(f"/tmp/hostroot-{u}/{name}", "x")
    except StacyVMError as e:
        assert_client_error(e)
    else:
        assert sb.exec(f"cat /{name}").stdout == "x"
    assert not os.path.exists(f"/{name}"), "wrote through a symlink onto the host"


def test_path_escape_move_chmod_delete_leave_host_alone(spawn):
    sb = spawn()
    u = uid()
    # Only throwaway host paths are targeted, so a broken server cannot do real damage.
    canary_dir = f"/tmp/stacyvm-canary-dir-{u}"
    canary = f"/tmp/stacyvm-canary-{u}"
    os.mkdir(canary_dir)
    with open(f"{canary_dir}/keep", "w") as f:
        f.write("keep")
    with open(canary, "w") as f:
        f.write("host canary")
    os.chmod(canary, 0o600)
    try:
        rel = f"/{UP}{canary.lstrip('/')}"
        for call in (
            lambda: sb.move_file(rel, "/workspace/stolen"),
            lambda: sb.chmod_file(rel, "777"),
            lambda: sb.delete_file(rel),
            lambda: sb.delete_file(f"/{UP}{canary_dir.lstrip('/')}", recursive=True),
        ):
            try:
                call()
            except StacyVMError as e:
                assert_client_error(e)
            assert os.path.exists(f"{canary_dir}/keep"), "host directory removed"
            assert os.path.exists(canary), "host file removed or moved"
            assert os.stat(canary).st_mode & 0o777 == 0o600, "host file chmodded"
        with open(canary) as f:
            assert f.read() == "host canary"
        # move a sandbox file "out": it must stay inside
        sb.write_file("/workspace/out.txt", "inside")
        target = f"stacyvm-moved-{u}"
        try:
            sb.move_file("/workspace/out.txt", f"/{UP}{target}")
        except StacyVMError as e:
            assert_client_error(e)
        else:
            assert sb.exec(f"cat /{target}").stdout == "inside"
        assert not os.path.exists(f"/{target}")
    finally:
        if os.path.exists(canary):
            os.unlink(canary)
        if os.path.exists(f"{canary_dir}/keep"):
            os.unlink(f"{canary_dir}/keep")
        if os.path.isdir(canary_dir):
            os.rmdir(canary_dir)


# =====================================================================
# templates
# =====================================================================


def test_templates_crud_and_spawn(client, cfg, spawn):
    tm = client.templates
    name = f"sdk-tpl-{uid()}"
    t = Template(name=name, image=cfg.image, memory_mb=256, vcpus=1, ttl="10m",
                 provider=cfg.provider, metadata={"team": "sdk"})
    try:
        saved = tm.save(t)
        assert isinstance(saved, Template)
        for got in (saved, tm.get(name)):
            assert got.name == name
            assert got.image == cfg.image
            assert got.memory_mb == 256 and got.vcpus == 1
            assert got.provider == cfg.provider
            assert got.metadata == {"team": "sdk"}
            assert parse_go_duration(got.ttl) == 600
        assert name in [x.name for x in tm.list()]
        assert all(isinstance(x, Template) for x in tm.list())

        with pytest.raises(StacyVMError) as ei:
            tm.save(t)
        assert_client_error(ei.value, "CONFLICT")

        before = now_utc()
        sb = client.spawn_template(name)
        spawn.track(sb)
        assert isinstance(sb, Sandbox)
        assert SANDBOX_ID_RE.match(sb.id)
        assert sb.state == "running"
        assert sb.image == cfg.image and sb.provider == cfg.provider
        assert sb._info["metadata"]["template"] == name
        assert sb._info["memory_mb"] == 256
        assert_close(parse_ts(sb._info["expires_at"]), before + timedelta(minutes=10))
        assert sb.exec("echo from-template").stdout == "from-template\n"
        listed = {s.id: s for s in client.list()}
        assert listed[sb.id].metadata["template"] == name
    finally:
        try:
            tm.delete(name)
        except SandboxNotFound:
            pass

    with pytest.raises(SandboxNotFound) as ei:
        tm.get(name)
    assert ei.value.code == "NOT_FOUND"
    assert name not in [x.name for x in tm.list()]
    with pytest.raises(SandboxNotFound):
        tm.delete(name)
    with pytest.raises(SandboxNotFound):
        client.spawn_template(name)


# =====================================================================
# bad input
# =====================================================================


def test_spawn_unknown_image_is_bad_request(client, cfg):
    marker = uid()
    with pytest.raises(StacyVMError) as ei:
        sb = client.spawn(image=f"stacyvm-test-missing-{marker}:latest", provider=cfg.provider,
                          metadata={"marker": marker})
        sb.destroy()
    assert_client_error(ei.value, "BAD_REQUEST")
    assert not [s for s in client.list() if s.metadata.get("marker") == marker]


def test_spawn_bad_ttl_is_bad_request(client, cfg):
    with pytest.raises(StacyVMError) as ei:
        sb = client.spawn(image=cfg.image, provider=cfg.provider, ttl="banana")
        sb.destroy()
    assert_client_error(ei.value, "BAD_REQUEST")


def test_unknown_sandbox_is_not_found(client):
    ghost = "sb-" + os.urandom(4).hex()
    while ghost in [s.id for s in client.list()]:
        ghost = "sb-" + os.urandom(4).hex()
    with pytest.raises(SandboxNotFound) as ei:
        client.get(ghost)
    assert ei.value.code == "NOT_FOUND"
    sb = Sandbox(client._http, ghost)
    for call in (lambda: sb.exec("true"), sb.destroy, sb.refresh,
                 lambda: sb.read_file("/etc/passwd"), lambda: sb.extend_ttl("1h")):
        with pytest.raises(SandboxNotFound):
            call()
    with pytest.raises(SandboxNotFound):
        client.get("not-a-sandbox")


# =====================================================================
# async: AsyncClient / AsyncSandbox
# =====================================================================


@pytest.mark.asyncio
async def test_async_system(aclient, cfg):
    assert (await aclient.health())["status"] == "ok"
    provs = {p["name"]: p for p in await aclient.providers()}
    assert provs[cfg.provider]["healthy"] is True
    assert await aclient.pool_status() == {"enabled": False}
    q = await aclient.quota_summary()
    assert isinstance(q, QuotaSummary) and q.total >= 0
    d = await aclient.admission(image=cfg.image, provider=cfg.provider, ttl="10m", memory_mb=256,
                                vcpus=1, owner_id="async-owner", metadata={"a": "b"})
    assert isinstance(d, SpawnAdmissionDecision) and d.allowed is True
    d = await aclient.admission(image=cfg.image, ttl="100h")
    assert (d.allowed, d.reason, d.queueable) == (False, "max_ttl", False)
    assert isinstance(await aclient.prune(), int)


@pytest.mark.asyncio
async def test_async_context_managers(cfg):
    async with AsyncClient(cfg.url, api_key=cfg.api_key, timeout=120.0) as ac:
        async with await ac.spawn(image=cfg.image, provider=cfg.provider, ttl="10m") as sb:
            assert isinstance(sb, AsyncSandbox)
            assert (await sb.exec("echo async")).stdout == "async\n"
            sid = sb.id
        with pytest.raises(SandboxNotFound):
            await ac.get(sid)
    assert ac._http.is_closed
    ac2 = AsyncClient(cfg.url, api_key="ignored", user_id="u")
    await ac2.close()
    assert ac2._http.is_closed


@pytest.mark.asyncio
async def test_async_lifecycle(aclient, aspawn, cfg):
    owner = f"async-{uid()}"
    meta = {"async": uid()}
    sb = await aspawn(owner_id=owner, metadata=meta, memory_mb=256, vcpus=1, ttl="5m")
    assert isinstance(sb, AsyncSandbox)
    assert SANDBOX_ID_RE.match(sb.id)
    assert (sb.state, sb.provider, sb.image) == ("running", cfg.provider, cfg.image)
    assert sb._info["owner_id"] == owner and sb._info["metadata"] == meta
    assert sb.id in repr(sb)

    got = await aclient.get(sb.id)
    assert got.id == sb.id and got.state == "running" and got._info["metadata"] == meta
    listed = {s.id: s for s in await aclient.list()}
    assert isinstance(listed[sb.id], SandboxInfo) and listed[sb.id].metadata == meta

    exp0 = parse_ts(sb._info["expires_at"])
    await sb.extend_ttl("2h")
    exp1 = parse_ts(sb._info["expires_at"])
    assert exp1 > exp0
    assert_close(exp1, now_utc() + timedelta(hours=2))
    await sb.extend_ttl()
    assert_close(parse_ts(sb._info["expires_at"]), now_utc() + timedelta(minutes=30))
    sb._info = {}
    await sb.refresh()
    assert sb.state == "running"

    url = sb.get_preview_url(3000)
    assert url.startswith(f"http://3000-{sb.id}.")

    await sb.destroy()
    with pytest.raises(SandboxNotFound):
        await aclient.get(sb.id)
    assert sb.id not in [s.id for s in await aclient.list()]
    with pytest.raises(SandboxNotFound):
        await sb.destroy()


@pytest.mark.asyncio
async def test_async_exec(aspawn):
    sb = await aspawn()
    r = await sb.exec("printf '[%s]\\n'", args=TRICKY_ARGS)
    assert isinstance(r, ExecResult)
    assert r.stdout == "".join(f"[{a}]\n" for a in TRICKY_ARGS)
    r = await sb.exec("printf", args=["<%s>", "a b"], mode="argv")
    assert r.stdout == "<a b>"
    r = await sb.exec('echo "$X" >&2; pwd; exit 4', env={"X": "to stderr"}, workdir="/tmp")
    assert (r.exit_code, r.stdout, r.stderr) == (4, "/tmp\n", "to stderr\n")
    assert GO_DURATION_RE.match(r.duration)

    t0 = time.monotonic()
    try:
        r = await sb.exec("sleep 5", timeout="1s")
    except StacyVMError as e:
        assert_client_error(e, "TIMEOUT")
    else:
        text = (r.stdout + r.stderr).lower()
        assert r.exit_code != 0 and ("timeout" in text or "timed out" in text), r
    assert time.monotonic() - t0 < 4.0

    with pytest.raises(StacyVMError) as ei:
        await sb.exec("true", mode="bogus")
    assert_client_error(ei.value, "BAD_REQUEST")


@pytest.mark.asyncio
async def test_async_exec_stream(aspawn):
    sb = await aspawn()
    t0 = time.monotonic()
    chunks, times = [], []
    async for c in sb.exec_stream("echo a; sleep 1; echo e >&2; sleep 1; echo b"):
        chunks.append(c)
        times.append(time.monotonic() - t0)
    total = time.monotonic() - t0
    assert merge_chunks(chunks) == [("stdout", "a\n"), ("stderr", "e\n"), ("stdout", "b\n")], chunks
    first = next(i for i, c in enumerate(chunks) if c.data)
    assert total >= 1.8
    assert times[first] < 1.0 and total - times[first] > 1.0, (times, total)

    out = [c async for c in sb.exec_stream("printf '%s|' \"$V\"; pwd", args=None, mode="shell",
                                           env={"V": "v"}, workdir="/workspace")]
    assert "".join(c.data for c in out if c.stream == "stdout") == "v|/workspace\n"
    out = [c async for c in sb.exec_stream("echo", args=["x y"], mode="argv")]
    assert "".join(c.data for c in out if c.stream == "stdout") == "x y\n"


@pytest.mark.asyncio
async def test_async_files(aspawn):
    sb = await aspawn()
    d = f"/workspace/a-{uid()}"
    await sb.write_file(f"{d}/x.txt", "async ✓\n")
    await sb.write_file(f"{d}/y.sh", "#!/bin/sh\necho y\n", mode="0700")
    assert await sb.read_file(f"{d}/x.txt") == "async ✓\n"
    st = await sb.stat_file(f"{d}/x.txt")
    assert (st["name"], st["size"], st["is_dir"], st["mode"]) == ("x.txt", len("async ✓\n".encode()), False, "644")
    assert (await sb.stat_file(f"{d}/y.sh"))["mode"] == "700"
    assert sorted(e["name"] for e in await sb.list_files(d)) == ["x.txt", "y.sh"]
    assert "workspace" in {e["name"] for e in await sb.list_files()}
    await sb.move_file(f"{d}/x.txt", f"{d}/z.txt")
    assert await sb.glob_files(f"{d}/*.txt") == [f"{d}/z.txt"]
    await sb.chmod_file(f"{d}/z.txt", "755")
    assert (await sb.stat_file(f"{d}/z.txt"))["mode"] == "755"
    await sb.delete_file(f"{d}/z.txt")
    assert sorted(e["name"] for e in await sb.list_files(d)) == ["y.sh"]
    await sb.delete_file(d, recursive=True)
    assert (await sb.exec(f"test -e {d}")).exit_code == 1

    name = f"stacyvm-async-escape-{uid()}"
    try:
        await sb.write_file(f"/tmp/{UP}{name}", "x")
    except StacyVMError as e:
        assert_client_error(e, "BAD_REQUEST", "FORBIDDEN")
    else:
        assert (await sb.exec(f"cat /{name}")).stdout == "x"
    assert not os.path.exists(f"/{name}")


@pytest.mark.asyncio
async def test_async_spawn_template(aclient, aspawn, client, cfg):
    name = f"sdk-atpl-{uid()}"
    client.templates.save(Template(name=name, image=cfg.image, memory_mb=256, vcpus=1,
                                   ttl="10m", provider=cfg.provider))
    try:
        sb = await aclient.spawn_template(name)
        aspawn.track(sb)
        assert isinstance(sb, AsyncSandbox)
        assert sb._info["metadata"]["template"] == name
        assert (sb.image, sb.provider, sb.state) == (cfg.image, cfg.provider, "running")
        assert (await sb.exec("echo t")).stdout == "t\n"
    finally:
        client.templates.delete(name)
    with pytest.raises(SandboxNotFound):
        await aclient.spawn_template(name)


@pytest.mark.asyncio
async def test_async_concurrent_sandboxes(aspawn, aclient):
    sbs = await asyncio.gather(*(aspawn(metadata={"n": str(i)}) for i in range(3)))
    assert len({s.id for s in sbs}) == 3
    results = await asyncio.gather(*(s.exec(f"sleep 1; echo {i}") for i, s in enumerate(sbs)))
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n"]
    # files are per sandbox
    await asyncio.gather(*(s.write_file("/workspace/who", s.id) for s in sbs))
    assert [await s.read_file("/workspace/who") for s in sbs] == [s.id for s in sbs]
    await asyncio.gather(*(s.destroy() for s in sbs))
    live = {s.id for s in await aclient.list()}
    assert not live & {s.id for s in sbs}


@pytest.mark.asyncio
async def test_async_bad_input(aclient, cfg):
    with pytest.raises(StacyVMError) as ei:
        sb = await aclient.spawn(image=f"stacyvm-test-missing-{uid()}:latest", provider=cfg.provider)
        await sb.destroy()
    assert_client_error(ei.value, "BAD_REQUEST")
    with pytest.raises(StacyVMError) as ei:
        sb = await aclient.spawn(image=cfg.image, provider=cfg.provider, ttl="banana")
        await sb.destroy()
    assert_client_error(ei.value, "BAD_REQUEST")
    ghost = "sb-" + os.urandom(4).hex()
    with pytest.raises(SandboxNotFound):
        await aclient.get(ghost)
    with pytest.raises(SandboxNotFound):
        await AsyncSandbox(aclient._http, ghost).exec("true")


def test_sdk_version_under_test():
    # The suite targets the published 0.1.1 wheel (whose __version__ still says 0.1.0).
    from importlib.metadata import version
    assert version("stacyvm") == "0.1.1"
    assert stacyvm.Client is Client
