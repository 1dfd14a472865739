"""A Redis lock with a time to live: what keeps a group's shared runs one at a time.

Kafka's lease (`worker.stream.lease`) picks the shared trainer, but a lease can move while the old holder
still trains (its revoke waits only `WORKER_DRAIN_GRACE_S`), so the lease alone cannot keep two shared
runs apart. The lock can: SET NX PX with a token of its own per acquisition, renewed by a daemon thread
while the run lasts, released by a compare-and-delete script, so a holder never deletes a lock that
another one took after it expired. A crashed holder's lock expires after its TTL.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time

import redis
import structlog

from worker.state import client as clients
from worker.state.client import RedisClient
from worker.state.scripts import lua

log = structlog.get_logger(__name__)

_RELEASE = lua("lock_release.lua")
_RENEW = lua("lock_renew.lua")


class Lock:
    """One holder at a time per key, across processes; `held()` says whether this one still is."""

    def __init__(self, client: RedisClient, key: str, ttl_s: float, owner: str | None = None) -> None:
        self.client = client
        self.key = key
        self.ttl_s = ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.token = ""
        self._release = clients.register_script(client, _RELEASE)
        self._renew = clients.register_script(client, _RENEW)
        self._valid_until = 0.0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it, and keep it renewed until `release`; False if held elsewhere."""
        if self._keeper is not None:
            raise RuntimeError(f"lock {self.key} is already held by this holder")
        token = f"{self.owner}:{secrets.token_hex(8)}"
        sent = time.monotonic()
        if not self.client.set(self.key, token, nx=True, px=max(1, int(self.ttl_s * 1000))):
            return False
        self.token = token
        self._valid_until = sent + self.ttl_s
        self._lost.clear()
        self._stop.clear()
        self._keeper = threading.Thread(target=self._keep, name="lock-keeper", daemon=True)
        self._keeper.start()
        return True

    def holder(self) -> str | None:
        """The token of whoever holds the lock now (host:pid:random), or None."""
        value = self.client.get(self.key)
        return value.decode() if value is not None else None

    def held(self) -> bool:
        """True while this holder's lock cannot have expired in Redis: renewed within its TTL (timed from
        before the renewal was sent) and not found taken by another holder."""
        return self._keeper is not None and not self._lost.is_set() and time.monotonic() < self._valid_until

    def _keep(self) -> None:
        """Renew every third of the TTL; a Redis error is retried, a lock found gone or taken is lost."""
        ttl_ms = max(1, int(self.ttl_s * 1000))
        while not self._stop.wait(self.ttl_s / 3):
            sent = time.monotonic()
            try:
                renewed = self._renew(keys=[self.key], args=[self.token, ttl_ms])
            except redis.RedisError as exc:
                log.warning("lock renewal failed", key=self.key, error=str(exc))
                continue
            if not renewed:
                self._lost.set()
                log.error("lock lost: it expired or another holder took it", key=self.key)
                return
            self._valid_until = sent + self.ttl_s

    def release(self) -> None:
        """Stop renewing and delete the lock if it is still this holder's; if Redis does not answer, the
        lock expires after its TTL."""
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return
        self._stop.set()
        keeper.join()
        self._valid_until = 0.0
        try:
            self._release(keys=[self.key], args=[self.token])
        except redis.RedisError as exc:
            log.warning("lock release failed; it expires by itself", key=self.key, error=str(exc))
