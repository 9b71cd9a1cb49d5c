"""Configuration from the environment and .env (spec §4, §15, §18 case 7;
DESIGN "Profiles" and "Small rules"): check, version, --help, refusals that
name the variable, the generated API key, and the key never in the logs."""
import os
import re
import socket
import stat
import subprocess
import uuid

import grpc
import pytest

from pnclient import grpc_error
from pnnode import (NODE_VERSION, T, V2RAY, Node, assert_no_sanitizer_report, base_env, binary,
                    free_port, run_cli)

UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
NIL_KEY = "00000000-0000-0000-0000-000000000000"


def env_with(state=None, **kw):
    """A valid-looking environment (no API_KEY unless given); state: a state
    dir so that a node started by mistake writes only under the test's dir."""
    env = base_env()
    env.update({"XRAY_EXECUTABLE_PATH": V2RAY, "NODE_HOST": "127.0.0.1",
                "SERVICE_PORT": str(free_port())})
    if state:
        env["PROXYNODE_STATE_DIR"] = str(state)
    for k, v in kw.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return env


def key_forms(key):
    return [key, key.lower(), key.upper(), key.replace("-", ""), key.replace("-", "").upper()]


def assert_key_absent(text, key, where):
    for form in key_forms(key):
        assert form not in text, f"the API key appears in {where}:\n{text[-3000:]}"


def run_expect_refusal(env, cwd, args=("run",)):
    """Runs the binary expecting it to refuse to start: non-zero exit,
    quickly, without ever listening."""
    p = subprocess.Popen([binary()] + list(args), env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=T(10))
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"proxynode {' '.join(args)} kept running instead of refusing:\n"
                             f"{err[-3000:]}")
    assert_no_sanitizer_report(out + err, f"proxynode {' '.join(args)}")
    assert p.returncode != 0, f"exit 0 for an invalid configuration:\n{out}\n{err}"
    assert "serving gRPC and REST" not in err, err
    return p.returncode, out, err


# ---- version, help, check ---------------------------------------------------------------------------

def test_version(tmp_path):
    p = run_cli(["version"], base_env(), str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert re.search(r"(^|\s)" + re.escape(NODE_VERSION) + r"(\s|$)", p.stdout), p.stdout


def test_help_lists_variables(tmp_path):
    p = run_cli(["--help"], base_env(), str(tmp_path))
    assert p.returncode == 0, p.stderr
    for var in ["SERVICE_PORT", "API_KEY", "NODE_HOST", "SSL_CERT_FILE", "SSL_KEY_FILE",
                "XRAY_EXECUTABLE_PATH", "PROXYNODE_PROFILE", "PROXYNODE_STATE_DIR",
                "PROXYNODE_CERT_NAMES", "DEBUG", "LOG_BUFFER_SIZE"]:
        assert re.search(r"\b" + var + r"\b", p.stdout), f"{var} missing from --help:\n{p.stdout}"
    assert "62050" in p.stdout, "default SERVICE_PORT not shown"


def test_unknown_command(tmp_path):
    p = run_cli(["frobnicate"], base_env(), str(tmp_path))
    assert p.returncode != 0
    assert "frobnicate" in p.stderr


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "explicit"])
def test_check_prints_profile_and_reason_and_masks_key(tmp_path, explicit):
    key = str(uuid.uuid4())
    env = env_with(API_KEY=key, SERVICE_PORT="62999")
    if explicit:
        env["PROXYNODE_PROFILE"] = "pasarguard"
    p = run_cli(["check"], env, str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "pasarguard" in p.stdout, p.stdout
    # the rule that chose it
    assert ("PROXYNODE_PROFILE" if explicit else "API_KEY") in p.stdout, p.stdout
    assert "62999" in p.stdout, "effective SERVICE_PORT not shown"
    assert_key_absent(p.stdout + p.stderr, key, "the output of check")
    # check creates nothing
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_check_accepts_ip_literals(tmp_path):
    for host in ["0.0.0.0", "127.0.0.1", "::", "::1"]:
        p = run_cli(["check"], env_with(API_KEY=str(uuid.uuid4()), NODE_HOST=host), str(tmp_path))
        assert p.returncode == 0, (host, p.stderr)


BAD_VALUES = [
    ("SERVICE_PORT", "70000"),
    ("SERVICE_PORT", "-1"),
    ("SERVICE_PORT", "abc"),
    ("NODE_HOST", "localhost"),
    ("NODE_HOST", "1.2.3"),
    ("API_KEY", "abc"),
    ("API_KEY", NIL_KEY),
    ("LOG_BUFFER_SIZE", "0"),
    ("LOG_BUFFER_SIZE", "-5"),
    ("DEBUG", "maybe"),
    ("PROXYNODE_PROFILE", "bogus"),
]


@pytest.mark.parametrize("cmd", ["check", "run"])
@pytest.mark.parametrize("var,value", BAD_VALUES, ids=[f"{v}={x}" for v, x in BAD_VALUES])
def test_invalid_value_refused_naming_variable(tmp_path, var, value, cmd):
    env = env_with(state=tmp_path / "state", API_KEY=str(uuid.uuid4()))
    env[var] = value
    rc, out, err = run_expect_refusal(env, str(tmp_path), (cmd,))
    assert var in err, f"stderr does not name {var}:\n{err}"


@pytest.mark.parametrize("cmd", ["check", "run"])
@pytest.mark.parametrize("profile", [None, ""], ids=["unset", "empty"])
def test_no_profile_variables_refuses_and_explains(tmp_path, cmd, profile):
    env = env_with(state=tmp_path / "state", PROXYNODE_PROFILE=profile, API_KEY=None)
    rc, out, err = run_expect_refusal(env, str(tmp_path), (cmd,))
    text = (out + err).lower()
    for word in ["pasarguard", "gozargah", "marzban", "api_key"]:
        assert word in text, f"{word!r} not explained:\n{out}\n{err}"


def test_pasarguard_without_key_or_state_dir_refuses(tmp_path):
    env = env_with(PROXYNODE_PROFILE="pasarguard", API_KEY=None)
    env["SSL_CERT_FILE"] = str(tmp_path / "c.pem")
    env["SSL_KEY_FILE"] = str(tmp_path / "k.pem")
    rc, out, err = run_expect_refusal(env, str(tmp_path))
    assert "API_KEY" in err, err


# ---- .env ----------------------------------------------------------------------------------------

def write_dotenv(path, key, port):
    path.write_text(
        "# proxynode test .env\n"
        "\n"
        f"export NODE_HOST=127.0.0.1\n"
        f'API_KEY="{key}"\n'
        f"SERVICE_PORT={port}  # the real environment overrides this\n"
        f"XRAY_EXECUTABLE_PATH='{V2RAY}'\n"
        "DEBUG=false\n")


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_dotenv_loaded_and_real_environment_wins(tmp_path, pb):
    file_key, file_port = str(uuid.uuid4()), free_port()
    # 1. .env gives the key; the real environment gives the port
    n = Node(str(tmp_path / "a"), key=None, env={"XRAY_EXECUTABLE_PATH": None,
                                                "NODE_HOST": None})
    write_dotenv(tmp_path / "a" / ".env", file_key, file_port)
    n.start()
    try:
        assert not port_open(file_port), "listening on the .env port, not the environment's"
        n.key = file_key
        with n.grpc() as c:
            assert c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse).core_version == \
                "4.34.0", "XRAY_EXECUTABLE_PATH from .env not used"
        with n.session() as s:
            assert s.get(n.url + "/info", timeout=T(5)).status_code == 200
    finally:
        n.stop()
    # 2. both give a key: the environment's wins
    env_key = str(uuid.uuid4())
    n = Node(str(tmp_path / "b"), key=env_key)
    write_dotenv(tmp_path / "b" / ".env", file_key, file_port)
    n.start()
    try:
        with n.session() as s:
            r = s.get(n.url + "/info", timeout=T(5))
            assert r.status_code == 200, (r.status_code, r.content)
            r = s.get(n.url + "/info", headers={"x-api-key": file_key}, timeout=T(5))
            assert (r.status_code, r.content) == (403, b"api key mismatch\n")
    finally:
        n.stop()


def test_dotenv_check(tmp_path):
    key = str(uuid.uuid4())
    write_dotenv(tmp_path / ".env", key, 61234)
    p = run_cli(["check"], base_env(), str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "pasarguard" in p.stdout and "61234" in p.stdout, p.stdout
    assert_key_absent(p.stdout + p.stderr, key, "check with .env")


def test_invalid_dotenv_refused(tmp_path):
    (tmp_path / ".env").write_text('API_KEY="unterminated\n')
    rc, out, err = run_expect_refusal(base_env(), str(tmp_path), ("check",))
    assert ".env" in err, err


# ---- the generated API key ------------------------------------------------------------------------

GEN_RE = re.compile(r"Generated API key \(shown once, stored in (.+)\): (" + UUID_RE + r")\s*$",
                    re.M)


def test_generated_api_key_printed_once_and_reused(tmp_path, pb):
    n = Node(str(tmp_path / "gen"), key=None, env={"PROXYNODE_PROFILE": "pasarguard"})
    assert not os.path.exists(n.state_dir)
    n.start()
    try:
        out = n.stdout()
        found = GEN_RE.findall(out)
        assert len(found) == 1, f"expected one 'Generated API key' line on stdout:\n{out}"
        path, key = found[0]
        key_file = os.path.join(n.state_dir, "api_key")
        assert os.path.realpath(path) == os.path.realpath(key_file), path
        assert stat.S_IMODE(os.stat(key_file).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(n.state_dir).st_mode) == 0o700
        assert open(key_file).read().strip().lower() == key.lower()
        assert_key_absent(n.stderr(), key, "stderr")
        n.key = key
        with n.grpc() as c:
            assert c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse).node_version == \
                NODE_VERSION
            assert grpc_error(c.unary, "GetBaseInfo", key=str(uuid.uuid4()))[0] == \
                grpc.StatusCode.PERMISSION_DENIED
        with n.session() as s:
            assert s.get(n.url + "/info", timeout=T(5)).status_code == 200
    finally:
        n.stop()
    stdout_len, content = len(n.stdout()), open(key_file).read()
    n.start()
    try:
        again = n.stdout()[stdout_len:]
        assert "Generated API key" not in again and key not in again, again
        assert open(key_file).read() == content
        with n.session() as s:
            assert s.get(n.url + "/info", timeout=T(5)).status_code == 200
        assert_key_absent(n.stderr(), key, "stderr")
    finally:
        n.stop()


@pytest.mark.parametrize("content", ["garbage\n", NIL_KEY + "\n"], ids=["garbage", "nil"])
def test_bad_api_key_file_refused(tmp_path, content):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "api_key").write_text(content)
    os.chmod(state / "api_key", 0o600)
    env = env_with(PROXYNODE_PROFILE="pasarguard", API_KEY=None, PROXYNODE_STATE_DIR=str(state))
    run_expect_refusal(env, str(tmp_path))
    assert (state / "api_key").read_text() == content, "the key file was overwritten"


@pytest.mark.parametrize("debug", ["true", "false"])
def test_api_key_never_logged(tmp_path, pb, debug):
    n = Node(str(tmp_path / "n"), env={"DEBUG": debug})
    n.start()
    try:
        with n.grpc() as c:
            c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
            grpc_error(c.unary, "GetStats", pb.StatRequest())
            grpc_error(c.unary, "GetBaseInfo", key=str(uuid.uuid4()))
            c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse, key=None,
                    extra=[("authorization", f"Bearer {n.key}")])
        with n.session() as s:
            s.get(n.url + "/info", timeout=T(5))
            s.get(n.url + "/stats", timeout=T(5))
            s.get(n.url + "/nope", timeout=T(5))
            s.get(n.url + "/info", headers={"x-api-key": n.key.upper()}, timeout=T(5))
    finally:
        n.stop()
    assert n.stderr().strip(), "no log output at all"
    assert_key_absent(n.stderr(), n.key, f"stderr (DEBUG={debug})")
    assert_key_absent(n.stdout(), n.key, f"stdout (DEBUG={debug})")
