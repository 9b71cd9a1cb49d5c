"""The core alone, as the reference for the node's figures: the node's own
generated config (written to GENERATED_CONFIG_PATH/xray.json by a node with
DEBUG=true), run directly as `<core> -config stdin:` like the node runs it,
with fresh loopback ports. Ready = its API answers GetSysStats (probed on a
new HTTP/2 connection every millisecond, 50 ms per probe at most, so no
client backoff hides time)."""
import copy
import json
import os
import subprocess
import time

import grpc

from . import clients, panel, util

API_TAG = "API_INBOUND"


class StartUnavailable(Exception):
    """The node under test does not implement Start (yet)."""


def start_node_backend(ctx, node_client, config, users, timeout=300):
    """Start on the node; raises StartUnavailable when Start is not implemented."""
    req = panel.backend(ctx.svc, config, users)
    try:
        r = node_client.unary("Start", req, ctx.svc.BaseInfoResponse, timeout=timeout)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNIMPLEMENTED:
            raise StartUnavailable(f"Start answered UNIMPLEMENTED: {e.details()}")
        raise
    if not r.started:
        raise RuntimeError(f"Start answered started=false: {r}")
    return r


def capture_config(ctx, n_users, vless_port):
    """The node's generated core config for n_users (Users.make(n, seed=1)),
    cached in ctx.configs. Uses a DEBUG node of its own."""
    if n_users in ctx.configs:
        return ctx.configs[n_users]
    node = ctx.node(f"capture{n_users}", env={"DEBUG": "true"})
    try:
        c = ctx.node_client(node)
        start_node_backend(ctx, c, panel.panel_config(vless_port), panel.Users.make(n_users))
        path = os.path.join(node.gen_dir, "xray.json")
        with open(path) as f:
            cfg = json.load(f)
        c.close()
    finally:
        node.stop()
        ctx.nodes.remove(node)
    ctx.configs[n_users] = cfg
    return cfg


def api_port_of(cfg):
    for ib in cfg.get("inbounds", []):
        if ib.get("tag") == API_TAG:
            return int(ib["port"])
    raise RuntimeError("generated config has no API_INBOUND inbound")


def with_fresh_ports(cfg):
    """A copy of cfg with every inbound on a new free loopback port; returns (cfg, api_port)."""
    c = copy.deepcopy(cfg)
    ports = util.free_ports(len(c.get("inbounds", [])))
    for ib, p in zip(c.get("inbounds", []), ports):
        ib["port"] = p
    return c, api_port_of(c)


class CoreAlone:
    """One core process running a generated config; .ready_s is exec -> API ready."""

    def __init__(self, ctx, cfg, timeout=120.0):
        self.cfg, self.api_port = with_fresh_ports(cfg)
        data = json.dumps(self.cfg).encode()
        dialect = clients.Dialect(ctx.xray)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
               # the node's default assets path, as the node passes it
               "XRAY_LOCATION_ASSET": "/usr/local/share/xray",
               "V2RAY_LOCATION_ASSET": "/usr/local/share/xray"}
        t0 = time.perf_counter()
        self.proc = util.spawn([ctx.core, "-config", "stdin:"], stdin=subprocess.PIPE,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.close()
            deadline = t0 + timeout
            # A short probe timeout: the API inbound may accept a connection
            # before the API answers; a probe that waited long would hide time.
            while not clients.h2c_sys_stats_once(self.api_port, dialect, timeout=0.05):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"core exited with {self.proc.returncode} before ready")
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"core not ready within {timeout} s")
                time.sleep(0.001)
            self.ready_s = time.perf_counter() - t0
        except BaseException:
            self.stop()
            raise

    def inbound_port(self, tag):
        for ib in self.cfg["inbounds"]:
            if ib.get("tag") == tag:
                return int(ib["port"])
        return None

    def stop(self):
        util.stop(self.proc)
