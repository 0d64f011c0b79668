#!/usr/bin/env python3
"""Test-only emulation of the cloud cluster in front of one real sekmet-fhir instance per tenant:
OAuth2 client_credentials token endpoint, tenant routing, bearer checks and fault injection.

Start:
  cloud_gateway.py --port 0 --spawn-sekmet t1 --spawn-sekmet t2 --workdir DIR \
                   --client edge-a:secret-a:t1 --client edge-b:secret-b:t2 [--token-ttl 3600]
  cloud_gateway.py --port 0 --tenant t1=http://127.0.0.1:8090/fhir --client edge-a:secret-a:t1
  cloud_gateway.py --config gw.json      ({"port":0, "token_ttl":60, "tenants":{"t1":URL},
                                            "spawn_sekmet":["t2"], "clients":{"edge-a":
                                            {"secret":"s","tenant":"t1"}}})
When ready it prints ONE JSON line on stdout:
  {"port": P, "control_port": C, "url": "http://127.0.0.1:P", "tenants": {"t1": UPSTREAM_BASE}}
and runs until SIGTERM/SIGINT (exit 0; spawned sekmet instances are stopped too).

Interface (main port P):
  POST /oauth2/token   form: grant_type=client_credentials, client_id, client_secret (or HTTP
                       Basic client auth), scope (optional, echoed)
                       -> 200 {"access_token","token_type":"Bearer","expires_in","scope"?}
                       400 unsupported_grant_type / invalid_request; 401 invalid_client
  /{tenant}/fhir/...   path mode, proxied to {tenant upstream base}/...
  /fhir/...            header mode, tenant from the X-Tenant-ID header (400 when missing)
                       both need "Authorization: Bearer <token>": missing/unknown/expired/revoked
                       -> 401 (WWW-Authenticate: Bearer error="invalid_token"); token of another
                       tenant -> 403; unknown tenant -> 404. Errors are OperationOutcomes.
                       Upstream absolute URLs (Location, fullUrl, link.url) are rewritten to the
                       gateway's public base of the request (http://HOST/{tenant}/fhir or /fhir).
                       Upstream unreachable -> 502.
  GET  /_health        200 {"ok": true} (no auth, no faults except down=refuse)
  GET  /_control       current fault state + counters
  POST /_control       JSON object, every key optional, applied at once; answers the new state:
    "token_fail": null|401|503     token endpoint refuses (401 invalid_client / 503)
    "fail_next": N                 next N FHIR requests answer fail_status (default 500),
    "fail_status": 500             without reaching upstream
    "delay_ms": N                  delay every FHIR and token response by N ms
    "malformed_next": N            next N FHIR responses: upstream status, truncated JSON body
    "down": false|"503"|"refuse"|"reset"   "503": every FHIR/token request gets 503 +
                                   Retry-After: 1; "reset": connection closed without an answer;
                                   "refuse": main port closed (connect -> ECONNREFUSED), open
                                   connections shut; down=false reopens it on the same port
    "down_for_s": S                with "down": back up by itself after S seconds
    "token_ttl": S                 lifetime of tokens issued from now on
    "revoke_tokens": true          forget every issued token (next FHIR request -> 401)
    "reset": true                  all faults off, counters zeroed (tokens kept)
  The control port C serves /_control and /_health only and stays up while "down".
"""

import argparse
import base64
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer as _ThreadingHTTPServer


class ThreadingHTTPServer(_ThreadingHTTPServer):
    """A client that hangs up mid-answer (an agent timing out on purpose) is normal here."""

    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError, TimeoutError)):
            return
        super().handle_error(request, client_address)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
       "transfer-encoding", "upgrade", "host", "authorization", "accept-encoding", "content-length",
       "x-tenant-id"}


def outcome(code, text):
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": text}]}


class State:
    def __init__(self, tenants, clients, token_ttl):
        self.lock = threading.Lock()
        self.tenants = tenants  # name -> upstream base URL (no trailing slash)
        self.clients = clients  # client_id -> {"secret", "tenant"}
        self.token_ttl = token_ttl
        self.tokens = {}  # token -> (client_id, tenant, expires_at monotonic)
        self.reset_faults()
        self.reset_stats()

    def reset_faults(self):
        self.token_fail = None
        self.fail_next = 0
        self.fail_status = 500
        self.delay_ms = 0
        self.malformed_next = 0
        self.down = False
        self.down_until = None

    def reset_stats(self):
        self.stats = {"token_requests": 0, "tokens_issued": 0, "fhir_requests": 0, "fhir_by_tenant": {},
                      "fhir_status": {}, "injected_failures": 0, "auth_rejections": 0}

    def snapshot(self):
        return {"token_fail": self.token_fail, "fail_next": self.fail_next, "fail_status": self.fail_status,
                "delay_ms": self.delay_ms, "malformed_next": self.malformed_next, "down": self.down,
                "token_ttl": self.token_ttl, "live_tokens": len(self.tokens), "tenants": self.tenants,
                "stats": json.loads(json.dumps(self.stats))}

    def count(self, key, sub=None):
        with self.lock:
            if sub is None:
                self.stats[key] += 1
            else:
                self.stats[key][sub] = self.stats[key].get(sub, 0) + 1


class Gateway:
    def __init__(self, state, host, port):
        self.state = state
        self.host = host
        self.port = port
        self.main = None
        self.main_lock = threading.Lock()
        self.conns = set()  # open sockets on the main port (shut when going down=refuse)
        self.conns_lock = threading.Lock()

    def open_main(self):
        with self.main_lock:
            if self.main is not None:
                return
            srv = ThreadingHTTPServer((self.host, self.port), make_handler(self, control_only=False))
            srv.daemon_threads = True
            self.port = srv.server_address[1]
            self.main = srv
            threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()

    def close_main(self):
        with self.main_lock:
            srv, self.main = self.main, None
        if srv is None:
            return
        srv.shutdown()
        srv.server_close()
        with self.conns_lock:
            for s in list(self.conns):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def apply_control(self, body):
        st = self.state
        reopen = close = False
        with st.lock:
            if body.get("reset"):
                st.reset_faults()
                st.reset_stats()
                reopen = True
            if "token_fail" in body:
                st.token_fail = body["token_fail"]
            if "fail_next" in body:
                st.fail_next = int(body["fail_next"])
            if "fail_status" in body:
                st.fail_status = int(body["fail_status"])
            if "delay_ms" in body:
                st.delay_ms = int(body["delay_ms"])
            if "malformed_next" in body:
                st.malformed_next = int(body["malformed_next"])
            if "token_ttl" in body:
                st.token_ttl = float(body["token_ttl"])
            if body.get("revoke_tokens"):
                st.tokens.clear()
            if "down" in body:
                down = body["down"]
                if down not in (False, None, "503", 503, "refuse", "reset"):
                    raise ValueError(f"down must be false, \"503\", \"refuse\" or \"reset\", not {down!r}")
                st.down = str(down) if down else False
                st.down_until = (time.monotonic() + float(body["down_for_s"])
                                 if st.down and body.get("down_for_s") else None)
                close, reopen = st.down == "refuse", st.down != "refuse"
        if close:
            self.close_main()
        elif reopen:
            self.open_main()

    def tick(self):
        """Ends a timed "down"."""
        st = self.state
        with st.lock:
            expired = st.down and st.down_until is not None and time.monotonic() >= st.down_until
            if expired:
                st.down, st.down_until = False, None
        if expired:
            self.open_main()


def make_handler(gw, control_only):
    st = gw.state

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
        server_version = "hms-test-cloud-gateway"

        def log_message(self, fmt, *args):
            if VERBOSE:
                sys.stderr.write("gateway: " + (fmt % args) + "\n")

        def setup(self):
            super().setup()
            if not control_only:
                with gw.conns_lock:
                    gw.conns.add(self.connection)

        def finish(self):
            try:
                super().finish()
            finally:
                with gw.conns_lock:
                    gw.conns.discard(self.connection)

        # ---- plumbing ----
        def body(self):
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                out = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return out
                    out += self.rfile.read(size)
                    self.rfile.readline()
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def send(self, status, body=b"", ctype="application/json", headers=()):
            if isinstance(body, (dict, list)):
                body = json.dumps(body).encode()
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            if body or status not in (204, 304):
                self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def fhir_error(self, status, code, text, headers=()):
            self.send(status, outcome(code, text), "application/fhir+json", headers)

        def drop(self):
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        # ---- dispatch ----
        def handle_any(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/_health":
                return self.send(200, {"ok": True, "port": gw.port})
            if path == "/_control":
                return self.control()
            if control_only:
                return self.send(404, {"error": "control port serves /_control and /_health only"})
            with st.lock:
                down, delay = st.down, st.delay_ms
            if down == "reset":
                return self.drop()
            is_token = path == "/oauth2/token"
            if not is_token and not (path == "/fhir" or path.startswith("/fhir/") or "/fhir" in path):
                return self.send(404, {"error": f"no route for {path}"})
            if down:
                self.body()
                if is_token:
                    return self.send(503, {"error": "temporarily_unavailable"}, headers=[("Retry-After", "1")])
                return self.fhir_error(503, "transient", "gateway down (test fault)", [("Retry-After", "1")])
            if delay:
                time.sleep(delay / 1000.0)
            if is_token:
                return self.token()
            return self.fhir(path)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = handle_any

        def control(self):
            if self.command == "POST":
                try:
                    body = json.loads(self.body() or b"{}")
                    if not isinstance(body, dict):
                        raise ValueError("control body must be a JSON object")
                    gw.apply_control(body)
                except (ValueError, TypeError) as e:
                    return self.send(400, {"error": str(e)})
            with st.lock:
                snap = st.snapshot()
            snap["port"] = gw.port
            return self.send(200, snap)

        def token(self):
            st.count("token_requests")
            if self.command != "POST":
                return self.send(405, {"error": "invalid_request", "error_description": "POST only"})
            raw = self.body().decode("utf-8", "replace")
            form = dict(urllib.parse.parse_qsl(raw, keep_blank_values=True))
            with st.lock:
                fail, ttl = st.token_fail, st.token_ttl
            if fail:
                if int(fail) == 401:
                    return self.send(401, {"error": "invalid_client", "error_description": "refused (test fault)"})
                return self.send(int(fail), {"error": "temporarily_unavailable"}, headers=[("Retry-After", "1")])
            if "x-www-form-urlencoded" not in self.headers.get("Content-Type", ""):
                return self.send(400, {"error": "invalid_request",
                                       "error_description": "application/x-www-form-urlencoded required"})
            if form.get("grant_type") != "client_credentials":
                return self.send(400, {"error": "unsupported_grant_type"})
            cid, secret = form.get("client_id"), form.get("client_secret")
            auth = self.headers.get("Authorization", "")
            if auth.lower().startswith("basic "):
                try:
                    u, _, p = base64.b64decode(auth[6:]).decode().partition(":")
                    cid, secret = urllib.parse.unquote_plus(u), urllib.parse.unquote_plus(p)
                except ValueError:
                    pass
            client = st.clients.get(cid or "")
            if not client or not secrets.compare_digest(client["secret"], secret or ""):
                return self.send(401, {"error": "invalid_client"},
                                 headers=[("WWW-Authenticate", 'Basic realm="token"')])
            tok = secrets.token_urlsafe(24)
            with st.lock:
                st.tokens[tok] = (cid, client["tenant"], time.monotonic() + ttl)
                st.stats["tokens_issued"] += 1
            out = {"access_token": tok, "token_type": "Bearer", "expires_in": int(ttl)}
            if form.get("scope"):
                out["scope"] = form["scope"]
            return self.send(200, out, headers=[("Cache-Control", "no-store")])

        def fhir(self, path):
            segs = path.split("/")  # "", tenant, "fhir", rest...  or  "", "fhir", rest...
            if len(segs) >= 2 and segs[1] == "fhir":
                tenant = self.headers.get("X-Tenant-ID")
                prefix = "/fhir"
                rest = "/".join(segs[2:])
                if not tenant:
                    self.body()
                    return self.fhir_error(400, "required", "X-Tenant-ID header required on /fhir")
            elif len(segs) >= 3 and segs[2] == "fhir":
                tenant = urllib.parse.unquote(segs[1])
                prefix = f"/{segs[1]}/fhir"
                rest = "/".join(segs[3:])
            else:
                return self.send(404, {"error": f"no route for {path}"})
            body = self.body()
            auth = self.headers.get("Authorization", "")
            tok = auth[7:].strip() if auth.lower().startswith("bearer ") else None
            challenge = [("WWW-Authenticate", 'Bearer error="invalid_token"')]
            with st.lock:
                entry = st.tokens.get(tok) if tok else None
                if entry and entry[2] <= time.monotonic():
                    del st.tokens[tok]
                    entry, why = None, "expired"
                else:
                    why = "unknown" if tok else "missing"
            if entry is None:
                st.count("auth_rejections")
                return self.fhir_error(401, "login", f"bearer token {why}", challenge)
            if tenant not in st.tenants:
                return self.fhir_error(404, "not-found", f"unknown tenant {tenant!r}")
            if entry[1] != tenant:
                st.count("auth_rejections")
                return self.fhir_error(403, "forbidden", f"token of tenant {entry[1]!r} used for {tenant!r}")
            st.count("fhir_requests")
            st.count("fhir_by_tenant", tenant)
            with st.lock:
                fail = st.fail_next > 0
                if fail:
                    st.fail_next -= 1
                    st.stats["injected_failures"] += 1
                malformed = not fail and st.malformed_next > 0
                if malformed:
                    st.malformed_next -= 1
                fail_status = st.fail_status
            if fail:
                st.count("fhir_status", str(fail_status))
                return self.fhir_error(fail_status, "exception", "injected failure (test fault)")
            upstream = st.tenants[tenant]
            u = urllib.parse.urlsplit(upstream)
            query = urllib.parse.urlsplit(self.path).query
            target = u.path.rstrip("/") + ("/" + rest if rest else "") + ("?" + query if query else "")
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            if body or self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            try:
                conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
                conn.request(self.command, target, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                rh = resp.getheaders()
                status = resp.status
                conn.close()
            except OSError as e:
                st.count("fhir_status", "502")
                return self.fhir_error(502, "transient", f"upstream {upstream} unreachable: {e}")
            public = f"http://{self.headers.get('Host') or f'127.0.0.1:{gw.port}'}{prefix}"
            up_base = upstream.rstrip("/")
            data = data.replace(up_base.encode(), public.encode())
            if malformed and data:
                data = data[: max(1, len(data) // 2)]
            out_headers = []
            ctype = "application/fhir+json"
            for k, v in rh:
                lk = k.lower()
                if lk == "content-type":
                    ctype = v
                elif lk not in HOP and lk not in ("date", "server", "content-length"):
                    out_headers.append((k, v.replace(up_base, public)))
            st.count("fhir_status", str(status))
            return self.send(status, data, ctype, out_headers)

    return Handler


VERBOSE = False


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="JSON file: port, host, token_ttl, tenants, clients, spawn_sekmet, workdir")
    ap.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=None, help="main port (0 = free port, the default)")
    ap.add_argument("--control-port", type=int, default=0, help="control-only port (0 = free port)")
    ap.add_argument("--tenant", action="append", default=[], metavar="NAME=BASE_URL",
                    help="route tenant NAME to an already running FHIR base URL")
    ap.add_argument("--spawn-sekmet", action="append", default=[], metavar="NAME",
                    help="start one sekmet-fhir (own SQLite db under --workdir) for tenant NAME")
    ap.add_argument("--client", action="append", default=[], metavar="ID:SECRET:TENANT")
    ap.add_argument("--token-ttl", type=float, default=None, help="token lifetime in seconds (default 3600)")
    ap.add_argument("--workdir", help="for spawned sekmet instances (default: a temp dir removed at exit)")
    ap.add_argument("--sekmet-validation", default="strict", choices=["strict", "warn", "off"])
    ap.add_argument("--verbose", action="store_true", help="log each request on stderr")
    return ap.parse_args()


def main():
    global VERBOSE
    a = parse_args()
    VERBOSE = a.verbose
    cfg = {}
    if a.config:
        with open(a.config) as f:
            cfg = json.load(f)
    tenants = {k: v.rstrip("/") for k, v in (cfg.get("tenants") or {}).items()}
    for t in a.tenant:
        name, _, url = t.partition("=")
        tenants[name] = url.rstrip("/")
    clients = {k: {"secret": v["secret"], "tenant": v["tenant"]} for k, v in (cfg.get("clients") or {}).items()}
    for c in a.client:
        cid, secret, tenant = c.split(":", 2)
        clients[cid] = {"secret": secret, "tenant": tenant}
    spawn = list(cfg.get("spawn_sekmet") or []) + a.spawn_sekmet
    ttl = a.token_ttl if a.token_ttl is not None else float(cfg.get("token_ttl", 3600))
    host = a.host or cfg.get("host", "127.0.0.1")
    port = a.port if a.port is not None else int(cfg.get("port", 0))

    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())

    children, tmp = [], None
    workdir = a.workdir or cfg.get("workdir")
    if spawn:
        import start_peers
        if not workdir:
            workdir = tmp = tempfile.mkdtemp(prefix="hms-cloud-gw-")
        os.makedirs(workdir, exist_ok=True)
        for t in spawn:
            proc, info = start_peers.start_sekmet(workdir, t, a.sekmet_validation)
            children.append(proc)
            tenants[t] = info["base_url"]

    state = State(tenants, clients, ttl)
    gw = Gateway(state, host, port)
    gw.open_main()
    ctl = ThreadingHTTPServer((host, a.control_port), make_handler(gw, control_only=True))
    ctl.daemon_threads = True
    threading.Thread(target=ctl.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    print(json.dumps({"port": gw.port, "control_port": ctl.server_address[1], "url": f"http://{host}:{gw.port}",
                      "tenants": tenants, "workdir": workdir}), flush=True)
    while not done.wait(0.1):
        gw.tick()
    gw.close_main()
    ctl.shutdown()
    ctl.server_close()
    if children:
        import start_peers
        for p in children:
            start_peers.stop(p)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
