"""Leases on a remote output dir: one runner per shard, and shards of one N at a time, on an object store.

A local output dir has flock; an object store has conditional writes. Each runner of a remote output
dir holds a lease object

    .leases/<key>.<gen>.json       key: shard-K-of-N, or `all` for an unsharded run; gen: 000001, ...

created with a conditional PutObject (`If-None-Match: *`): of two runners creating the same
generation, the second gets 412 and refuses. A lease says who holds it (host, pid, run) and until when
(`expires`, on the holder's clock, renewed every RENEW_S by a task of the run while it lives). A lease
that expired, was released at the end of its run, or whose holder was a process on this very machine
that is gone, has lapsed: the next runner takes over by creating the next generation, and a holder
that finds a newer generation of its own lease when renewing has lost it (it stalled past its expiry)
and stops its run.

After creating its lease a runner lists every lease. A live one of another N (or an unsharded run
beside shards, or shards beside an unsharded run) would buy the same items twice, so it refuses:
of two such runners, whichever lists second sees the other, so never both run. Two that start at
the same moment may both see each other; each steps back, waits a random moment, and looks again.

Where the store cannot create an object only if it is absent (fsspec backends other than S3, or an
S3-compatible server that ignores the condition, found by a probe at start), the same protocol runs
on plain writes and the run says loudly that it does not keep runners apart.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import OutputLocked

LEASES = ".leases"
TTL_S = 120.0  # a lease lapses this long after its last renewal (a killed runner's, on another machine)
RENEW_S = 20.0  # renewed this often while the run lives
SIMULTANEOUS_S = 2.0  # two leases created this close together: a tie to break, not a runner to refuse for
ATTEMPTS = 4
_NAME = re.compile(r"(?P<key>all|shard-(?P<k>\d+)-of-(?P<n>\d+))\.(?P<gen>\d+)\.json")

Clock = Callable[[], float]


def lease_key(shard: tuple[int, int] | None) -> str:
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def describe_key(key: str) -> str:
    m = _NAME.fullmatch(key + ".0.json")
    return "an unsharded runner" if m is None or m["n"] is None else f"shard {m['k']}/{m['n']}"


def conflicts(mine: str, other: str) -> bool:
    """Would runners holding these two keys buy the same items twice? (Same key: one generation wins.)"""
    if mine == other:
        return False
    if "all" in (mine, other):
        return True
    return mine.rsplit("-of-", 1)[1] != other.rsplit("-of-", 1)[1]


def identity() -> dict[str, Any]:
    """Who holds a lease: enough to tell, on the same machine, that its process is gone."""

    def read(path: str) -> str:
        try:
            return Path(path).read_text().strip()
        except OSError:
            return ""

    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return {"host": socket.gethostname(), "boot": read("/proc/sys/kernel/random/boot_id"), "pidns": pidns,
            "pid": os.getpid()}  # fmt: skip


def gone_here(body: dict[str, Any]) -> bool:
    """Was the lease's holder a process of this machine (same boot, same pid namespace) that no longer runs?"""
    me = identity()
    if not all(body.get(k) == me[k] and me[k] for k in ("host", "boot", "pidns")):
        return False
    pid = body.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == me["pid"]:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def is_live(body: dict[str, Any], now: float) -> bool:
    expires = body.get("expires")
    return not body.get("released") and isinstance(expires, (int, float)) and expires > now and not gone_here(body)


def when(epoch: Any) -> str:
    if not isinstance(epoch, (int, float)):
        return "?"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def holder(body: dict[str, Any]) -> str:
    return f"{body.get('host', '?')} pid {body.get('pid', '?')}"


class Leases:
    """The lease objects of one remote output dir, read and written through an fsspec filesystem."""

    def __init__(self, fs: Any, root: str, clock: Clock = time.time) -> None:
        self.fs, self.root, self.clock = fs, root, clock
        self.folder = f"{root}/{LEASES}"

    def path(self, key: str, gen: int) -> str:
        return f"{self.folder}/{key}.{gen:06d}.json"

    def generations(self) -> dict[str, list[int]]:
        """key -> the generations present, oldest first (one listing, never from a cache)."""
        try:
            names = self.fs.ls(self.folder, detail=False, refresh=True)
        except FileNotFoundError:
            return {}
        found: dict[str, list[int]] = {}
        for name in names:
            m = _NAME.fullmatch(str(name).rstrip("/").rsplit("/", 1)[-1])
            if m:
                found.setdefault(m["key"], []).append(int(m["gen"]))
        return {k: sorted(v) for k, v in found.items()}

    def read(self, key: str, gen: int) -> dict[str, Any] | None:
        try:
            body = json.loads(self.fs.cat_file(self.path(key, gen)))
        except (FileNotFoundError, ValueError):
            return None
        return body if isinstance(body, dict) else None

    def current(self, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
        """The newest lease of each key (of `keys`, else all), read in parallel: O(shards) small objects."""
        gens = self.generations()
        wanted = [(k, g[-1]) for k, g in gens.items() if keys is None or k in keys]
        if not wanted:
            return {}
        with ThreadPoolExecutor(min(16, len(wanted)), thread_name_prefix="runner-lease") as pool:
            bodies = list(pool.map(lambda kg: self.read(*kg), wanted))
        return {k: {**b, "gen": g} for (k, g), b in zip(wanted, bodies, strict=True) if b is not None}

    def create(self, path: str, data: bytes, atomic: bool) -> bool:
        """Write the object only if it is absent; False when it exists (or a concurrent write of it won)."""
        if not atomic:
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
            return True
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except FileExistsError:
            return False
        except OSError as e:  # older s3fs: 412 as EINVAL; S3's 409 ConditionalRequestConflict: another write won
            if any(s in str(e) for s in ("PreconditionFailed", "pre-conditions", "ConditionalRequestConflict")):
                return False
            raise
        return True

    def atomic(self) -> str | None:
        """None when this store creates objects only-if-absent; otherwise why not (said loudly at start)."""
        if not hasattr(self.fs, "call_s3"):
            protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
            return f"{protocol}:// has no conditional create here (runner uses S3's If-None-Match)"
        probe = f"{self.folder}/probe-{os.getpid()}-{random.getrandbits(48):012x}"
        try:
            if not self.create(probe, b"{}", True):
                return "the probe object existed already"
            second = self.create(probe, b"{}", True)
        except Exception as e:  # botocore too old for IfNoneMatch raises its ParamValidationError
            if "IfNoneMatch" in str(e) or type(e).__name__ == "ParamValidationError":
                return f"this botocore cannot send If-None-Match ({type(e).__name__}); pip install -U botocore s3fs"
            raise
        finally:
            with suppress(Exception):
                self.fs.rm_file(probe)
        return None if not second else "this S3-compatible server ignores If-None-Match (a second create succeeded)"


class Lease:
    """The lease a run holds on its shard of a remote output dir (see the module's docstring)."""

    def __init__(
        self,
        leases: Leases,
        shard: tuple[int, int] | None,
        run: str,
        display: str,
        *,
        ttl_s: float | None = None,
        renew_s: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.leases, self.run, self.display = leases, run, display
        self.key = lease_key(shard)
        self.ttl_s = TTL_S if ttl_s is None else ttl_s
        self.renew_s = RENEW_S if renew_s is None else renew_s
        self.sleep = sleep
        self.gen = 0
        self.started = self.renewed = self.expires = 0.0
        self.atomic = True
        self.lost = False
        self.who = identity()

    @property
    def clock(self) -> Clock:
        return self.leases.clock

    def _body(self, released: bool = False) -> bytes:
        now = self.renewed
        return json.dumps({
            "key": self.key, "run": self.run, **self.who, "started": self.started, "renewed": now,
            "expires": now if released else now + self.ttl_s, "released": released, "ttl_s": self.ttl_s,
        }).encode()  # fmt: skip

    def acquire(self) -> str | None:
        """Take the lease, or raise OutputLocked saying who holds it (or which runners of another N run);
        returns a warning to say loudly when the store cannot create atomically."""
        why = self.leases.atomic()
        self.atomic = why is None
        warning = None
        if why is not None:
            warning = (
                f"WARNING: {self.display}: this store cannot create an object only if it is absent ({why}): "
                "two runners of one shard, or shards of different N, are NOT kept apart here. Start each "
                "--shard once, with one N"
            )
        for attempt in range(ATTEMPTS):
            gens = self.leases.generations()
            own = gens.get(self.key, [])
            top = own[-1] if own else 0
            if top:
                body = self.leases.read(self.key, top)
                if body is not None and is_live(body, self.clock()):
                    raise OutputLocked(self._held(body))
            self.started = self.renewed = self.clock()
            if not self.leases.create(self.leases.path(self.key, top + 1), self._body(), self.atomic):
                continue  # another runner took this generation a moment ago: look again (it is live now)
            self.gen = top + 1
            self.expires = self.renewed + self.ttl_s
            others = [k for k in self.leases.generations() if conflicts(self.key, k)]
            now = self.clock()
            live = {k: b for k, b in self.leases.current(others).items() if is_live(b, now)}
            if not live:
                for gen in own:  # lapsed generations: O(1) lease objects per shard
                    with suppress(Exception):
                        self.leases.fs.rm_file(self.leases.path(self.key, gen))
                return warning
            self._drop()
            fresh = all(abs(now - float(b.get("started") or 0)) < SIMULTANEOUS_S for b in live.values())
            if fresh and attempt + 1 < ATTEMPTS:
                self.sleep(random.uniform(0.2, 2.0))  # started at the same moment: one of us goes first
                continue
            raise OutputLocked(self._conflict(live))
        raise OutputLocked(
            f"{self.display}: could not take the lease of {describe_key(self.key)}: other runners kept starting "
            "at the same moment; run it again"
        )

    def renew(self) -> str | None:
        """Renew the lease when due; a reason to stop the run when it was lost (None otherwise)."""
        now = self.clock()
        if not self.gen or self.lost or now < self.renewed + self.renew_s:
            return None
        try:
            newer = [g for g in self.leases.generations().get(self.key, []) if g > self.gen]
            if newer:
                self.lost = True
                body = self.leases.read(self.key, newer[-1]) or {}
                return (
                    f"lost the lease of {describe_key(self.key)} of {self.display}: this runner could not renew it "
                    f"in time and another ({holder(body)}) took over; stopping so that only one runs"
                )
            self.renewed = now
            self.leases.fs.pipe_file(self.leases.path(self.key, self.gen), self._body())
            self.expires = now + self.ttl_s
        except Exception as e:  # the store is unreachable for a moment: try again next time, while the lease holds
            # Stop while the lease still holds (two renewals early), not at the instant another may take over.
            if now >= self.expires - 2 * self.renew_s:
                self.lost = True
                return f"could not renew the lease of {describe_key(self.key)} of {self.display} before it expired: {e}"
        return None

    def release(self) -> None:
        """Say the run ended: the next runner of the shard takes over at once (best effort)."""
        if not self.gen or self.lost:
            return
        self.renewed = self.clock()
        with suppress(Exception):
            self.leases.fs.pipe_file(self.leases.path(self.key, self.gen), self._body(released=True))
        self.gen = 0

    def _drop(self) -> None:
        with suppress(Exception):
            self.leases.fs.rm_file(self.leases.path(self.key, self.gen))
        self.gen = 0

    def _held(self, body: dict[str, Any]) -> str:
        now = self.clock()
        renewed = body.get("renewed")
        ago = f", lease renewed {max(0.0, now - renewed):.0f}s ago" if isinstance(renewed, (int, float)) else ""
        expires = body.get("expires")
        left = max(0.0, expires - now) if isinstance(expires, (int, float)) else 0.0
        return (
            f"{self.display}: {describe_key(self.key)} is being run by another runner ({holder(body)}, since "
            f"{when(body.get('started'))}{ago}); wait for it to finish. If that runner is gone, its lease "
            f"lapses at {when(expires)} ({left:.0f}s from now): run this again then"
        )

    def _conflict(self, live: dict[str, dict[str, Any]]) -> str:
        shown = ", ".join(f"{describe_key(k)} ({holder(b)})" for k, b in sorted(live.items())[:4])
        more = f" and {len(live) - 4} more" if len(live) > 4 else ""
        if self.key == "all":
            what = "--shard runs"
        elif "all" in live:
            what = "an unsharded runner"
        else:
            what = f"shards of --shard K/{next(iter(live)).rsplit('-of-', 1)[1]}"
        return (
            f"{self.display} is in use by {what}: {shown}{more}. Runs of a different N (or unsharded beside "
            "sharded) on one output dir would buy the same items twice: use the same N, or wait for them to "
            f"finish (a killed runner's lease lapses {self.ttl_s:.0f}s after its last renewal)"
        )
