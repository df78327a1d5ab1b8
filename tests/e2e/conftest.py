"""Fixtures for the end-to-end tests: a libvirtd, the guest image, a connection.

Outside CI the tests skip when harness.skip_reason() finds this machine
unable to run them. With CI=true the same finding fails the tests, so a CI
machine that lost its set-up cannot pass by skipping everything.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.e2e import harness

if TYPE_CHECKING:
    import libvirt


def require_e2e() -> None:
    """Skip the calling test, or fail it when CI=true, if e2e tests cannot run here."""
    reason = harness.skip_reason()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"end-to-end set-up is missing and CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def guest_image() -> harness.GuestImage:
    require_e2e()
    return harness.build_guest_image()


# The daemon listens on the system sockets, so two pytest sessions on one
# machine would share it, and the first to finish would stop it under the
# other. Each session holds this lock while it has a libvirtd.
SESSION_LOCK = "/run/lock/balloonctl-e2e.lock"


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[harness.Libvirtd]:
    """The session's libvirtd, with domains left by earlier runs destroyed.

    Waits for any other pytest session on this machine that holds one.
    """
    require_e2e()
    with open(SESSION_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _session_libvirtd()


def _session_libvirtd() -> Iterator[harness.Libvirtd]:
    with harness.Libvirtd() as daemon:
        conn = daemon.connect()
        try:
            harness.destroy_leftover_domains(conn)
        finally:
            conn.close()
        yield daemon


@pytest.fixture
def libvirt_conn(libvirtd: harness.Libvirtd) -> Iterator[libvirt.virConnect]:
    """A new connection for each test.

    A connection breaks when libvirtd restarts, so none is shared between
    tests. A test that calls libvirtd.restart() itself opens new connections
    with libvirtd.connect() afterwards.
    """
    conn = libvirtd.connect()
    yield conn
    conn.close()
