"""Certificates and TLS (spec §2, §3, §18 case 5) and signals: SIGTERM exits
fast and clean, SIGHUP reloads the certificate for new connections only."""
import datetime
import os
import re
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time

import grpc
import pytest

from pnclient import client_context, http1_request, tls_connect
from pnnode import NODE_VERSION, T, V2RAY_VERSION, free_port, need_tool

EXTRA_DNS = "node.example.test"
EXTRA_IP = "10.20.30.40"


def openssl(*args, input=None, timeout=None):
    exe = need_tool("openssl")
    return subprocess.run([exe] + list(args), capture_output=True, text=True, input=input,
                          timeout=timeout or T(20))


def cert_text(path):
    p = openssl("x509", "-in", path, "-noout", "-text")
    assert p.returncode == 0, p.stderr
    return p.stdout


def ext_value(text, name):
    """The value lines of an X509v3 extension in `openssl x509 -text` output
    (None when absent), and whether it is marked critical."""
    m = re.search(r"^( +)X509v3 " + re.escape(name) + r":( critical)?\s*\n((?:\1 +.*\n)+)",
                  text, re.M)
    if not m:
        return None, False
    return " ".join(line.strip() for line in m.group(3).splitlines()), bool(m.group(2))


def der_of(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def peer_der(node, host=None, server_hostname=None):
    ctx = client_context(verify=False)
    raw = socket.create_connection((host or node.connect_host, node.port), timeout=T(5))
    with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
        return s.getpeercert(binary_form=True)


def strict_connect(node, cafile, server_hostname, host=None):
    """Python ≥ 3.13 style verification: the cert as the only anchor,
    VERIFY_X509_STRICT, hostname/IP matching on. Returns the TLS version."""
    ctx = client_context(cafile, strict=True)
    assert ctx.check_hostname and ctx.verify_mode == ssl.CERT_REQUIRED
    raw = socket.create_connection((host or node.connect_host, node.port), timeout=T(5))
    with ctx.wrap_socket(raw, server_hostname=server_hostname) as s:
        r = http1_request(s, "GET", "/info", {"x-api-key": node.key})
        assert r.status == 200, (r.status, r.data)
        return s.version()


def make_cert(dirpath, cn, san, prefix="new"):
    cert = os.path.join(dirpath, f"{prefix}_cert.pem")
    key = os.path.join(dirpath, f"{prefix}_key.pem")
    p = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={cn}",
                "-addext", f"subjectAltName={san}",
                "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=digitalSignature,keyCertSign")
    assert p.returncode == 0, p.stderr
    return cert, key


# ---- the generated certificate ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def cnode(tmp_path_factory):
    """A node whose certificate was generated with extra names."""
    from pnnode import Node
    n = Node(str(tmp_path_factory.mktemp("cnode")),
             env={"PROXYNODE_CERT_NAMES": f"{EXTRA_DNS},{EXTRA_IP}"})
    n.start()
    yield n
    assert n.alive(), n.describe()
    n.stop(check=True)


def test_generated_certificate_shape(cnode):
    assert os.path.exists(cnode.cert) and os.path.exists(cnode.keyfile)
    text = cert_text(cnode.cert)
    assert "Version: 3 (0x2)" in text, text
    assert "(Negative)" not in text, "serial number is negative"
    serial = openssl("x509", "-in", cnode.cert, "-noout", "-serial").stdout.strip()
    assert re.fullmatch(r"serial=[0-9A-F]+", serial) and int(serial[7:], 16) > 0, serial
    assert re.search(r"Subject: .*CN ?= ?\S+", text), "no subject CN"
    assert "ASN1 OID: prime256v1" in text, "not an EC P-256 key"

    san, _ = ext_value(text, "Subject Alternative Name")
    assert san, text
    entries = {e.strip() for e in san.split(",")}
    for want in ["DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1",
                 f"DNS:{EXTRA_DNS}", f"IP Address:{EXTRA_IP}"]:
        assert want in entries, f"{want} missing from SAN {sorted(entries)}"

    bc, critical = ext_value(text, "Basic Constraints")
    assert bc and "CA:TRUE" in bc and critical, (bc, critical)
    ski, _ = ext_value(text, "Subject Key Identifier")
    aki, _ = ext_value(text, "Authority Key Identifier")
    assert ski and aki, text
    assert aki.replace("keyid:", "").strip() == ski.strip(), (aki, ski)
    ku, _ = ext_value(text, "Key Usage")
    assert ku and "Digital Signature" in ku and "Certificate Sign" in ku, ku

    dates = openssl("x509", "-in", cnode.cert, "-noout", "-startdate", "-enddate").stdout
    fmt = "%b %d %H:%M:%S %Y %Z"
    start = datetime.datetime.strptime(re.search(r"notBefore=(.*)", dates).group(1).strip()
                                       .replace("  ", " "), fmt)
    end = datetime.datetime.strptime(re.search(r"notAfter=(.*)", dates).group(1).strip()
                                     .replace("  ", " "), fmt)
    assert (end - start).days >= 3649, (start, end)
    assert start <= datetime.datetime.utcnow() + datetime.timedelta(minutes=5)


def test_generated_key_file_mode(cnode):
    mode = stat.S_IMODE(os.stat(cnode.keyfile).st_mode)
    assert mode == 0o600, oct(mode)
    p = openssl("pkey", "-in", cnode.keyfile, "-noout")
    assert p.returncode == 0, p.stderr


def test_openssl_verify_strict(cnode):
    p = openssl("verify", "-x509_strict", "-purpose", "sslserver", "-CAfile", cnode.cert,
                cnode.cert)
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr


def test_served_certificate_is_the_generated_file(cnode):
    assert peer_der(cnode) == der_of(cnode.cert)


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", EXTRA_DNS, EXTRA_IP])
def test_strict_verification_for_every_san(cnode, name):
    version = strict_connect(cnode, cnode.cert, name)
    assert version in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("name", ["other.example.test", "192.0.2.1", "127.0.0.2"])
def test_name_not_in_san_fails(cnode, name):
    with pytest.raises(ssl.SSLCertVerificationError):
        strict_connect(cnode, cnode.cert, name)


def test_grpc_with_generated_cert_as_root(cnode, pb):
    with cnode.grpc() as c:
        r = c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
    assert (r.started, r.core_version, r.node_version) == (False, V2RAY_VERSION, NODE_VERSION)


def test_ipv6_node_strict_verification(make_node):
    n = make_node(host="::")
    version = strict_connect(n, n.cert, "::1", host="::1")
    assert version in ("TLSv1.2", "TLSv1.3")
    assert strict_connect(n, n.cert, "localhost", host="::1")


def test_restart_reuses_generated_certificate(make_node):
    n = make_node()
    first = der_of(n.cert)
    assert peer_der(n) == first
    n.stop()
    n.start()
    assert der_of(n.cert) == first
    assert peer_der(n) == first


def test_operator_certificate_is_used_as_is(make_node, tmp_path):
    cert, key = make_cert(str(tmp_path), "operator", "IP:127.0.0.1,DNS:localhost", "op")
    before = open(cert).read()
    n = make_node(env={"SSL_CERT_FILE": cert, "SSL_KEY_FILE": key})
    assert peer_der(n) == der_of(cert)
    assert open(cert).read() == before
    assert strict_connect(n, cert, "127.0.0.1")


def test_only_one_of_cert_and_key_present_refuses(make_node, tmp_path):
    cert, key = make_cert(str(tmp_path), "half", "IP:127.0.0.1", "half")
    n = make_node(start=False, env={"SSL_CERT_FILE": cert,
                                    "SSL_KEY_FILE": str(tmp_path / "missing_key.pem")})
    n.spawn()
    try:
        rc = n.proc.wait(T(10))
    except subprocess.TimeoutExpired:
        n.kill()
        raise AssertionError("node started with a certificate but no key\n" + n.describe())
    assert rc != 0, n.describe()
    assert not os.path.exists(tmp_path / "missing_key.pem"), "a key was generated for a foreign cert"


# ---- TLS versions --------------------------------------------------------------------------------

def tls11_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


class Tls11Server:
    """A local server that does accept TLS 1.1: proves the client below can
    really negotiate TLS 1.1, so its failure against the node means something."""

    def __init__(self, cert, key):
        import warnings
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        self.ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        self.sock.settimeout(T(10))
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.ctx.wrap_socket(c, server_side=True) as s:
                    s.recv(1)
            except (OSError, ssl.SSLError):
                pass

    def close(self):
        self.sock.close()


def test_tls11_refused_tls12_tls13_accepted(cnode, tmp_path):
    cert, key = make_cert(str(tmp_path), "control", "IP:127.0.0.1", "control")
    control = Tls11Server(cert, key)
    try:
        # the client can do TLS 1.1 ...
        raw = socket.create_connection(("127.0.0.1", control.port), timeout=T(5))
        with tls11_context().wrap_socket(raw) as s:
            assert s.version() == "TLSv1.1"
        p = openssl("s_client", "-connect", f"127.0.0.1:{control.port}", "-tls1_1",
                    "-cipher", "DEFAULT@SECLEVEL=0", input="")
        assert p.returncode == 0, "control: openssl s_client cannot do TLS 1.1: " + p.stderr
    finally:
        control.close()
    # ... and the node refuses it
    raw = socket.create_connection(("127.0.0.1", cnode.port), timeout=T(5))
    with pytest.raises(ssl.SSLError):
        with tls11_context().wrap_socket(raw) as s:
            pytest.fail(f"node accepted {s.version()}")
    raw.close()
    p = openssl("s_client", "-connect", f"127.0.0.1:{cnode.port}", "-tls1_1",
                "-cipher", "DEFAULT@SECLEVEL=0", input="")
    assert p.returncode != 0, "openssl s_client -tls1_1 succeeded:\n" + p.stdout[-2000:]

    for version, name in [(ssl.TLSVersion.TLSv1_2, "TLSv1.2"), (ssl.TLSVersion.TLSv1_3, "TLSv1.3")]:
        ctx = client_context(cnode.cert, strict=True)
        ctx.minimum_version = ctx.maximum_version = version
        raw = socket.create_connection(("127.0.0.1", cnode.port), timeout=T(5))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() == name
            r = http1_request(s, "GET", "/info", {"x-api-key": cnode.key})
            assert r.status == 200, (name, r.status, r.data)
    for flag in ("-tls1_2", "-tls1_3"):
        p = openssl("s_client", "-connect", f"127.0.0.1:{cnode.port}", flag,
                    "-CAfile", cnode.cert, "-verify_return_error", input="")
        assert p.returncode == 0, f"s_client {flag} failed: {p.stdout[-1500:]}{p.stderr}"


def test_no_client_certificate_requested(cnode):
    """The Python client has no client certificate: TLS 1.2 must not ask."""
    p = openssl("s_client", "-connect", f"127.0.0.1:{cnode.port}", "-tls1_2",
                "-CAfile", cnode.cert, input="")
    assert p.returncode == 0, p.stderr
    # s_client prints the types only when a CertificateRequest arrived
    assert "Client Certificate Types" not in p.stdout, p.stdout[-2000:]
    assert "Acceptable client certificate CA names" not in p.stdout, p.stdout[-2000:]


def test_no_session_resumption(cnode):
    """No session tickets and no session cache (panels never resume; the
    tickets only cost CPU): after a request on TLS 1.3 and on TLS 1.2 the
    client holds no ticket, and offering the session again is a full
    handshake."""
    for version in (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2):
        ctx = client_context(cnode.cert, strict=True)
        ctx.minimum_version = ctx.maximum_version = version
        raw = socket.create_connection(("127.0.0.1", cnode.port), timeout=T(5))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            r = http1_request(s, "GET", "/info", {"x-api-key": cnode.key})
            assert r.status == 200
            session = s.session
        assert session is None or not session.has_ticket, (version, "a session ticket was sent")
        raw = socket.create_connection(("127.0.0.1", cnode.port), timeout=T(5))
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1", session=session) as s:
            assert not s.session_reused, (version, "the session was resumed")
            r = http1_request(s, "GET", "/info", {"x-api-key": cnode.key})
            assert r.status == 200


# ---- signals ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stop_signal_idle_exits_0_fast(make_node, sig):
    n = make_node()
    t0 = time.monotonic()
    n.signal(sig)
    try:
        rc = n.proc.wait(T(5))
    except subprocess.TimeoutExpired:
        raise AssertionError("no exit within 5 s\n" + n.describe())
    took = time.monotonic() - t0
    assert rc == 0, n.describe()
    assert took <= T(2), f"exit took {took:.2f} s"
    n.check_clean()


def test_sigterm_with_open_connections_exits_0_within_2s(make_node, pb):
    from pnclient import H2Conn
    n = make_node()
    # idle HTTP/1.1 keep-alive connection after one request
    s1 = tls_connect(n, alpn=None)
    r = http1_request(s1, "GET", "/info", {"x-api-key": n.key})
    assert r.status == 200
    # idle HTTP/2 connection after one REST request
    h2c = H2Conn(n)
    res = h2c.request("GET", "/info", [("x-api-key", n.key)])
    assert res["status"] == 200, res
    # idle gRPC channel after one call
    c = n.grpc()
    c.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
    # a connection that never finished its TLS handshake
    raw = socket.create_connection(("127.0.0.1", n.port), timeout=T(5))
    try:
        t0 = time.monotonic()
        n.signal(signal.SIGTERM)
        try:
            rc = n.proc.wait(T(5))
        except subprocess.TimeoutExpired:
            raise AssertionError("no exit within 5 s of SIGTERM with open connections\n"
                                 + n.describe())
        took = time.monotonic() - t0
        assert rc == 0, n.describe()
        assert took <= T(2), f"exit took {took:.2f} s with idle connections open"
        n.check_clean()
    finally:
        s1.close()
        h2c.close()
        c.close()
        raw.close()


def test_sighup_reloads_certificate_for_new_connections(make_node, pb, tmp_path):
    n = make_node()
    old_der = der_of(n.cert)
    old_cert_copy = tmp_path / "old_cert.pem"
    old_cert_copy.write_text(open(n.cert).read())
    # connections opened before the reload
    before = tls_connect(n, alpn=None)
    r = http1_request(before, "GET", "/info", {"x-api-key": n.key})
    assert r.status == 200
    chan = n.grpc(cert=str(old_cert_copy))
    chan.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
    try:
        cert, key = make_cert(str(tmp_path), "reloaded", "IP:127.0.0.1,DNS:localhost")
        new_der = der_of(cert)
        assert new_der != old_der
        with open(n.keyfile, "w") as f:  # keeps the file's 0600 mode
            f.write(open(key).read())
        with open(n.cert, "w") as f:
            f.write(open(cert).read())
        n.signal(signal.SIGHUP)
        deadline = time.monotonic() + T(5)
        while peer_der(n) != new_der:
            assert time.monotonic() < deadline, "new connections still get the old certificate"
            assert n.alive(), n.describe()
            time.sleep(0.05)
        # a new connection verifies against the new cert only
        assert strict_connect(n, cert, "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError):
            strict_connect(n, str(old_cert_copy), "127.0.0.1")
        # the connections from before still work
        r = http1_request(before, "GET", "/info", {"x-api-key": n.key})
        assert r.status == 200, (r.status, r.data)
        m = chan.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse)
        assert m.node_version == NODE_VERSION
        with n.grpc(cert=cert) as c2:
            assert c2.unary("GetBaseInfo", pb.Empty(), pb.BaseInfoResponse).node_version \
                == NODE_VERSION
        assert stat.S_IMODE(os.stat(n.keyfile).st_mode) == 0o600
    finally:
        before.close()
        chan.close()
    assert n.alive(), n.describe()


def test_sighup_with_broken_files_keeps_serving(make_node, tmp_path):
    n = make_node()
    good = der_of(n.cert)
    good_copy = tmp_path / "good_cert.pem"
    good_copy.write_text(open(n.cert).read())
    # garbage certificate
    with open(n.cert, "w") as f:
        f.write("-----BEGIN CERTIFICATE-----\nnot a certificate\n-----END CERTIFICATE-----\n")
    n.signal(signal.SIGHUP)
    time.sleep(T(0.5))
    assert n.alive(), n.describe()
    assert peer_der(n) == good
    # a valid certificate that does not match the key
    cert, _ = make_cert(str(tmp_path), "mismatch", "IP:127.0.0.1")
    with open(n.cert, "w") as f:
        f.write(open(cert).read())
    n.signal(signal.SIGHUP)
    time.sleep(T(0.5))
    assert n.alive(), n.describe()
    assert peer_der(n) == good
    with n.session(verify=str(good_copy)) as s:
        assert s.get(n.url + "/info", timeout=T(5)).status_code == 200
