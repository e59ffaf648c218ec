"""Fixtures for the SDK compatibility suite.

The suite drives a running StacyVM server through the published Python SDK
(stacyvm==0.1.1). It reads:

  STACYVM_URL            base URL of the server (required), e.g. http://127.0.0.1:7423
  STACYVM_TEST_IMAGE     image that exists for the provider under test (default stacyvm-test:busybox)
  STACYVM_TEST_PROVIDER  provider under test (required): docker, native, proot

The server must run on this host: some tests check the host filesystem to
prove that sandbox path tricks never reach it. scripts/test.sh starts the
server and sets the variables.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pytest
import pytest_asyncio

import stacyvm
from stacyvm import SandboxNotFound
from stacyvm.async_sandbox import AsyncSandbox
from stacyvm.sandbox import Sandbox


@dataclass(frozen=True)
class Config:
    url: str
    image: str
    provider: str
    # Set when the server requires authentication (STACYVM_API_KEY).
    api_key: str | None = None


def pytest_configure(config):
    missing = [v for v in ("STACYVM_URL", "STACYVM_TEST_PROVIDER") if not os.environ.get(v)]
    if missing:
        raise pytest.UsageError(
            f"set {', '.join(missing)} (scripts/test.sh starts a server and sets them)"
        )


@pytest.fixture(scope="session")
def cfg() -> Config:
    return Config(
        url=os.environ["STACYVM_URL"].rstrip("/"),
        image=os.environ.get("STACYVM_TEST_IMAGE", "stacyvm-test:busybox"),
        provider=os.environ["STACYVM_TEST_PROVIDER"],
        api_key=os.environ.get("STACYVM_API_KEY") or None,
    )


def uid() -> str:
    return uuid.uuid4().hex[:10]


# ---------------------------------------------------------------- helpers

_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
GO_DURATION_RE = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|μs|ms|s|m|h))+$")
_GO_PART_RE = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|μs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string ("1h30m", "12.5ms", "0s"); AssertionError if malformed."""
    assert isinstance(text, str) and GO_DURATION_RE.match(text), f"not a Go duration: {text!r}"
    return sum(float(n) * _GO_UNITS[u] for n, u in _GO_PART_RE.findall(text))


def parse_ts(text: str) -> datetime:
    """An RFC 3339 timestamp (Go may send nanoseconds) as an aware datetime."""
    assert isinstance(text, str) and text, f"not a timestamp: {text!r}"
    t = text.strip().replace("Z", "+00:00").replace("z", "+00:00")
    t = re.sub(r"(\.\d{6})\d+", r"\1", t)
    dt = datetime.fromisoformat(t)
    assert dt.tzinfo is not None, f"timestamp without zone: {text!r}"
    return dt


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


# ---------------------------------------------------------------- sync fixtures

@pytest.fixture
def client(cfg):
    c = stacyvm.Client(cfg.url, api_key=cfg.api_key, timeout=120.0)
    yield c
    c.close()


class Spawner:
    """Spawns sandboxes for one test and destroys whatever is left at teardown."""

    def __init__(self, client: stacyvm.Client, cfg: Config):
        self.client = client
        self.cfg = cfg
        self.ids: list[str] = []

    def __call__(self, **kw) -> Sandbox:
        kw.setdefault("image", self.cfg.image)
        kw.setdefault("provider", self.cfg.provider)
        kw.setdefault("ttl", "15m")
        sb = self.client.spawn(**kw)
        self.ids.append(sb.id)
        return sb

    def track(self, sb) -> None:
        self.ids.append(sb.id)

    def cleanup(self) -> None:
        for sid in self.ids:
            try:
                Sandbox(self.client._http, sid).destroy()
            except SandboxNotFound:
                pass


@pytest.fixture
def spawn(cfg):
    # Own HTTP client: cleanup must work even if the test closed `client`.
    c = stacyvm.Client(cfg.url, api_key=cfg.api_key, timeout=120.0)
    s = Spawner(c, cfg)
    yield s
    try:
        s.cleanup()
    finally:
        c.close()


@pytest.fixture(scope="module")
def shared_sb(cfg):
    """One sandbox for read-mostly tests in a module (each test uses its own paths)."""
    c = stacyvm.Client(cfg.url, api_key=cfg.api_key, timeout=120.0)
    sb = c.spawn(image=cfg.image, provider=cfg.provider, ttl="30m")
    yield sb
    try:
        sb.destroy()
    except SandboxNotFound:
        pass
    c.close()


# ---------------------------------------------------------------- async fixtures

class AsyncSpawner:
    def __init__(self, client: stacyvm.AsyncClient, cfg: Config):
        self.client = client
        self.cfg = cfg
        self.ids: list[str] = []

    async def __call__(self, **kw) -> AsyncSandbox:
        kw.setdefault("image", self.cfg.image)
        kw.setdefault("provider", self.cfg.provider)
        kw.setdefault("ttl", "15m")
        sb = await self.client.spawn(**kw)
        self.ids.append(sb.id)
        return sb

    def track(self, sb) -> None:
        self.ids.append(sb.id)

    async def cleanup(self) -> None:
        for sid in self.ids:
            try:
                await AsyncSandbox(self.client._http, sid).destroy()
            except SandboxNotFound:
                pass


@pytest_asyncio.fixture
async def aclient(cfg):
    c = stacyvm.AsyncClient(cfg.url, api_key=cfg.api_key, timeout=120.0)
    yield c
    await c.close()


@pytest_asyncio.fixture
async def aspawn(cfg):
    c = stacyvm.AsyncClient(cfg.url, api_key=cfg.api_key, timeout=120.0)
    s = AsyncSpawner(c, cfg)
    yield s
    try:
        await s.cleanup()
    finally:
        await c.close()
