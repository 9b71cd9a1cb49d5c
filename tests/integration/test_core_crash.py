"""Core and node deaths (DESIGN "Core process", "Counters"; spec/pasarguard.md
§16, §18 case 29): kill -9 of the real core → the node restarts it, replays
every user (runtime-added ones too) and carries the counters up to the
last bank; while it restarts, GetBackendStats says `core is not started
yet`. SIGKILL of the node leaves no core process behind."""
import os
import signal
import time

import grpc
import pytest

from pnclient import assert_text_error
from pncore import (USERS, TROJAN, VLESS, Site, alive, assert_user_counts, core_pids,
                    download_ok, exists, make_user, reset_all, stray_processes, wait_for)
from pnnode import T

BANK_S = 1


@pytest.fixture(scope="module")
def site(pb, tmp_path_factory):
    s = Site(tmp_path_factory.mktemp("crash"), pb,
             env={"PROXYNODE_STATS_BANK_INTERVAL": str(BANK_S)})
    yield s
    assert s.node.alive(), "the node died during the tests\n" + s.node.describe()
    s.close()


def _guard_during_restart(site, pid, use_rest):
    """Kills the core, waits until the node reaped it, and asks for the
    backend stats at once. Returns the error seen, or None when the restart
    was already done (the window was missed)."""
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not exists(pid), T(5), f"the node to reap the killed core {pid}",
             interval=0.002)
    if use_rest:
        r = site.panel.rest("GET", "/stats/backend")
        if r.status_code == 200:
            return None
        return ("rest", r.status_code, r.text, r)
    try:
        site.panel.backend_stats()
        return None
    except grpc.RpcError as e:
        return ("grpc", e.code(), e.details(), None)


def test_kill9_core_restarts_replays_and_keeps_banked_counters(site, pb):
    site.start(["1", "2"])
    site.panel.sync_user(make_user(pb, "3"))  # a runtime-added user must be replayed too
    reset_all(site.panel)
    size = site.size()
    c = site.client({"v1": (VLESS, "1"), "t3": (TROJAN, "3")})
    download_ok(c.socks["v1"], site.url(), size, "user 1 before the crash")
    download_ok(c.socks["t3"], site.url(), size, "user 3 before the crash")
    site.panel.settled_traffic("1", size)
    site.panel.settled_traffic("3", size)
    time.sleep(BANK_S * 2.5)  # at least one bank has taken these bytes
    pid = site.core()

    seen = []
    for attempt in range(4):
        got = _guard_during_restart(site, pid, use_rest=attempt % 2 == 1)
        new = wait_for(lambda: (lambda p: p if len(p) == 1 and p[0] != pid else None)(
            core_pids(site.node)), T(15), "the node to restart the killed core")[0]
        site.seen_cores.add(new)
        assert not alive(pid)
        wait_for(lambda: _backend_ok(site), T(10), "GetBackendStats to succeed after restart")
        if got is None:
            pid = new  # the restart won the race: kill again (backoff doubles)
            continue
        seen.append(got)
        kind, code, text, resp = got
        if kind == "grpc":
            assert (code, text) == (grpc.StatusCode.UNAVAILABLE, "core is not started yet"), got
        else:
            assert_text_error(resp, 503, "core is not started yet")
        if len(seen) == 2 or attempt == 3:
            break
        pid = new
    assert seen, "every GetBackendStats after a kill -9 succeeded: the restart window was " \
                 "never observed"

    # users replayed: the config users and the runtime-added one
    download_ok(c.socks["v1"], site.url(), size, "user 1 after the restart")
    download_ok(c.socks["t3"], site.url(), size, "user 3 (added by SyncUser) after the restart")
    site.panel.settled_traffic("1", size)
    st = site.panel.stats(USERS, reset=True)
    assert_user_counts(st, "1", 2 * size, slack=4096, what="banked + after the restart")
    assert_user_counts(st, "3", 2 * size, slack=4096, what="banked + after the restart")
    st = site.panel.stats(USERS, reset=True)
    assert all(v == 0 for v in st.values()), f"counted twice: {st}"
    assert "xray process exited unexpectedly" in site.node.stderr() or \
        "exited unexpectedly" in site.node.stderr(), site.node.stderr()[-3000:]


def _backend_ok(site):
    try:
        site.panel.backend_stats()
        return True
    except grpc.RpcError:
        return False


def test_node_sigkill_leaves_no_core(pb, tmp_path):
    s = Site(tmp_path, pb)
    try:
        s.start(["1"])
        pid = s.core()
        s.node.proc.kill()
        s.node.proc.wait()
        s.node.exit_status = "SIGKILL (by the test)"
        wait_for(lambda: not alive(pid), T(3), f"the core {pid} to die with its node")
        assert not stray_processes(str(tmp_path)), stray_processes(str(tmp_path))
    finally:
        s.close(check=True)
