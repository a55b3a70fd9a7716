"""What the MLflow registry holds for promotion and rollback, beyond versions and aliases.

**The promotion lease.** Promotion and rollback are compare-and-set operations on the alias
(read it, decide, register, move it); MLflow has no conditional alias update. They run under an
exclusive lease kept in the tracking server itself, so that two hosts sharing nothing but the
tracking URI (no disk, different temporary folders, two Kubeflow pods) still take turns.

The lease is a sequence of registered models ``<name>.lock.<generation>`` (12 digits). The
record with the highest generation is the lease; its tags say who holds it, until when, and
whether it was released. A contender that finds it released or expired creates the next
generation; it holds the lease if that creation succeeds and no higher generation exists.

Why it holds: ``create_registered_model`` inserts a row whose primary key is the name
(``registered_models``, ``PrimaryKeyConstraint("workspace", "name")`` in MLflow's SQLAlchemy
store), in one transaction with the holder tags. The database refuses a second row with the same
key, whatever the database (SQLite, PostgreSQL, MySQL) and whether the client talks to it
directly or through ``mlflow server``: the store turns the ``IntegrityError`` into
``RESOURCE_ALREADY_EXISTS``. So of all contenders that saw generation g free, exactly one
creates g+1. The top record is never deleted (only the ones below it), so generations only grow;
a contender that creates a generation below the top (its record was cleaned up under it) sees
the higher one when it re-reads, and gives up. A client whose request was retried after it
reached the server finds its own token in the record and knows the lease is its own. Like any
lease it assumes the holder finishes its writes before the expiry (``ttl`` is minutes; the
writes take a second) and that clocks agree to within the margin: a holder checks the time it
has left before each write (:meth:`Lease.check`) and writes nothing past it.

**Rolled-back models.** A rollback blocks the model it rolled away from, by the sha256 of its
model files, in a tag of the registered model (``edgeopt.blocked.<sha256>``); promotion refuses
a blocked model until ``edgeopt unblock`` clears it.
"""

from __future__ import annotations

import logging
import os
import random
import re
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

from mlflow.exceptions import MlflowException

from edgeopt.registry.versions import run_model_sha256
from edgeopt.track.uri import client_for

log = logging.getLogger(__name__)

LEASE_SECONDS = 120.0  # how long a lease lasts without release (a killed holder blocks others this long)
WAIT_SECONDS = 600.0  # how long a contender waits for the lease
HOLDER, EXPIRES, RELEASED = "edgeopt.lease.holder", "edgeopt.lease.expires", "edgeopt.lease.released"
BLOCKED = "edgeopt.blocked."


class LeaseError(TimeoutError):
    """The lease could not be taken in time, or was lost before a write; one line for the user."""


def _code(err: MlflowException) -> str:
    return str(err.error_code)


@dataclass
class _Record:
    gen: int
    name: str
    tags: Dict[str, str]

    def free(self, now: float) -> bool:
        return self.tags.get(RELEASED) == "true" or float(self.tags.get(EXPIRES, 0)) < now


class Lease:
    """An exclusive lease on promotions and rollbacks of registered model ``name`` (see the module).

    ``with Lease(uri, name): ...``; call :meth:`check` before each write made under it.
    """

    def __init__(self, uri: str, name: str, *, ttl: float = LEASE_SECONDS, wait: float = WAIT_SECONDS):
        self.uri, self.name, self.ttl, self.wait = uri, name, ttl, wait
        self.prefix = f"{name}.lock."
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        self.record: Optional[str] = None
        self.expires = 0.0
        self._client = client_for(uri)

    def _records(self) -> List[_Record]:
        pattern = re.compile(re.escape(self.prefix) + r"(\d{12})$")
        found = self._client.search_registered_models(filter_string=f"name LIKE '{self.prefix}%'", max_results=1000)
        out = [_Record(int(m.group(1)), rm.name, dict(rm.tags)) for rm in found if (m := pattern.match(rm.name))]
        return sorted(out, key=lambda r: r.gen)

    def _create(self, gen: int) -> bool:
        name = f"{self.prefix}{gen:012d}"
        expires = time.time() + self.ttl
        try:
            self._client.create_registered_model(
                name, tags={HOLDER: self.token, EXPIRES: f"{expires:.3f}"},
                description=f"edgeopt: promotion lease of {self.name} (generation {gen})")
        except MlflowException as err:
            if _code(err) != "RESOURCE_ALREADY_EXISTS":
                raise
            try:  # our own request may have been retried after it reached the server
                if self._client.get_registered_model(name).tags.get(HOLDER) != self.token:
                    return False
            except MlflowException:
                return False
        self.record, self.expires = name, expires
        return True

    def acquire(self) -> "Lease":
        deadline = time.monotonic() + self.wait
        while True:
            records = self._records()
            top = records[-1] if records else None
            if top is None or top.free(time.time()):
                gen = (top.gen if top else 0) + 1
                if self._create(gen):
                    if self._records()[-1].gen == gen:
                        for old in records:  # below the top: nobody decides anything by them any more
                            self._delete(old.name)
                        return self
                    self.record = None  # created under a higher generation: void
            if time.monotonic() > deadline:
                holder = f"held by {top.tags.get(HOLDER)} until {time.ctime(float(top.tags.get(EXPIRES, 0)))}" \
                    if top else "contended"
                raise LeaseError(f"{self.name}: the promotion lease is {holder}; gave up after {self.wait:.0f} s")
            time.sleep(random.uniform(0.05, 0.3))

    def _delete(self, name: str) -> None:
        try:
            self._client.delete_registered_model(name)
        except MlflowException as err:
            if _code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise

    def check(self) -> None:
        """Raise unless the lease has a safe margin left: a holder past its lease writes nothing."""
        if self.record is None or time.time() > self.expires - min(10.0, self.ttl / 4):
            raise LeaseError(f"{self.name}: the promotion lease ran out before the write; nothing written")

    def release(self) -> None:
        if self.record is None:
            return
        try:
            self._client.set_registered_model_tag(self.record, RELEASED, "true")
        except MlflowException as err:
            if _code(err) != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("lease %s was taken over after it expired", self.record)
        self.record = None

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ blocks


def blocked(uri: str, name: str) -> Dict[str, str]:
    """sha256 of each rolled-back model of ``name`` -> the note recorded when it was blocked."""
    try:
        tags = client_for(uri).get_registered_model(name).tags
    except MlflowException as err:
        if _code(err) == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise
    return {k.removeprefix(BLOCKED): v for k, v in tags.items() if k.startswith(BLOCKED)}


def block(uri: str, name: str, sha256: str, version: Optional[str], note: str) -> None:
    """Record a rollback: the model (by sha256) is blocked; its version, if it exists, carries the note."""
    client = client_for(uri)
    client.set_registered_model_tag(name, f"{BLOCKED}{sha256}", note[:5000])
    if version is not None:
        client.set_model_version_tag(name, version, "edgeopt.rolled_back", note[:5000])


def unblock(uri: str, name: str, which: Optional[str]) -> List[str]:
    """Clear blocks: ``which`` a sha256 (or a prefix of 8+ characters), a version ``v3`` / ``3``, or None for all.
    Returns the sha256s cleared; LookupError when nothing matches."""
    client = client_for(uri)
    current = blocked(uri, name)
    if which is None:
        chosen = list(current)
    elif re.fullmatch(r"v?\d+", which):
        try:
            mv = client.get_model_version(name, which.removeprefix("v"))
        except MlflowException:
            raise LookupError(f"{name}: no version {which}") from None
        sha = mv.tags.get("model_sha256") or run_model_sha256(uri, str(mv.run_id))
        chosen = [sha] if sha in current else []
    else:
        chosen = [s for s in current if len(which) >= 8 and s.startswith(which.lower())]
    if not chosen:
        raise LookupError(f"{name}: nothing blocked matches {which!r}" if which else f"{name}: nothing is blocked")
    for sha in chosen:
        client.delete_registered_model_tag(name, f"{BLOCKED}{sha}")
    return chosen
