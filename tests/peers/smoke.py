#!/usr/bin/env python3
"""Smoke check of the test peers: starts the cloud gateway with two sekmet tenants, Orthanc and
mosquitto through their launchers, exercises the behaviours the sync agent relies on, and prints
'N passed, N failed'. Exit 1 on any failure. Usage: tests/peers/smoke.py
"""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
passed = failed = 0


def check(name, cond, detail=""):
    global passed, failed
    if cond:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name} {detail}")


def spawn(argv):
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=None, text=True)
    line = p.stdout.readline()
    return p, json.loads(line)


def req(method, url, body=None, headers=None, form=None):
    h = dict(headers or {})
    data = None
    if form is not None:
        data = urllib.parse.urlencode(form).encode()
        h.setdefault("Content-Type", "application/x-www-form-urlencoded")
    elif body is not None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        h.setdefault("Content-Type", "application/fhir+json")
    r = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(r, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def js(b):
    try:
        return json.loads(b)
    except ValueError:
        return None


def gateway_checks():
    gw, info = spawn([sys.executable, f"{HERE}/cloud_gateway.py", "--port", "0", "--spawn-sekmet", "t1",
                      "--spawn-sekmet", "t2", "--client", "edge-a:sa:t1", "--client", "edge-b:sb:t2",
                      "--token-ttl", "60"])
    try:
        base, ctl = info["url"], f"http://127.0.0.1:{info['control_port']}/_control"
        s, _, b = req("POST", base + "/oauth2/token", form={"grant_type": "client_credentials",
                                                             "client_id": "edge-a", "client_secret": "sa"})
        tok = js(b)
        check("token issued", s == 200 and tok["token_type"] == "Bearer" and tok["expires_in"] == 60, b)
        basic = base64.b64encode(b"edge-b:sb").decode()
        s, _, b = req("POST", base + "/oauth2/token", form={"grant_type": "client_credentials"},
                      headers={"Authorization": "Basic " + basic})
        tok_b = js(b)["access_token"] if s == 200 else None
        check("token via client_secret_basic", s == 200)
        s, _, _ = req("POST", base + "/oauth2/token", form={"grant_type": "client_credentials",
                                                             "client_id": "edge-a", "client_secret": "x"})
        check("bad secret 401", s == 401)
        A = {"Authorization": "Bearer " + tok["access_token"]}
        pat = {"resourceType": "Patient", "id": "p1", "meta": {"source": "urn:hms-edge:a"}}
        s, h, b = req("PUT", base + "/t1/fhir/Patient/p1", pat, A)
        check("path mode PUT 201 + ETag", s == 201 and h.get("etag") == 'W/"1"', (s, h))
        check("Location rewritten to gateway", h.get("location", "").startswith(base + "/t1/fhir/Patient/p1"),
              h.get("location"))
        s, h, b = req("GET", base + "/fhir/Patient/p1", headers={**A, "X-Tenant-ID": "t1"})
        check("header mode GET", s == 200 and js(b)["meta"]["source"] == "urn:hms-edge:a", (s, b[:200]))
        s, _, _ = req("GET", base + "/t2/fhir/Patient/p1", headers=A)
        check("wrong tenant 403", s == 403)
        s, _, _ = req("GET", base + "/t2/fhir/Patient/p1", headers={"Authorization": "Bearer " + tok_b})
        check("tenant t2 has its own db (404)", s == 404)
        s, _, _ = req("GET", base + "/t1/fhir/Patient/p1")
        check("no token 401", s == 401)
        s, _, b = req("GET", base + "/t1/fhir/_history?_count=1", headers=A)
        nxt = [l["url"] for l in js(b)["link"] if l["relation"] == "next"]
        check("history next link rewritten", nxt and nxt[0].startswith(base + "/t1/fhir/_history"), nxt)
        req("POST", ctl, {"fail_next": 2})
        codes = [req("GET", base + "/t1/fhir/Patient/p1", headers=A)[0] for _ in range(3)]
        check("fail_next 2", codes == [500, 500, 200], codes)
        req("POST", ctl, {"malformed_next": 1})
        s, _, b = req("GET", base + "/t1/fhir/Patient/p1", headers=A)
        check("malformed_next", s == 200 and js(b) is None, b)
        req("POST", ctl, {"delay_ms": 300})
        t0 = time.monotonic()
        req("GET", base + "/t1/fhir/Patient/p1", headers=A)
        check("delay_ms", time.monotonic() - t0 >= 0.3)
        req("POST", ctl, {"delay_ms": 0, "token_fail": 503})
        s, _, _ = req("POST", base + "/oauth2/token", form={"grant_type": "client_credentials",
                                                             "client_id": "edge-a", "client_secret": "sa"})
        check("token_fail 503", s == 503)
        req("POST", ctl, {"token_fail": None, "down": "503"})
        s, _, _ = req("GET", base + "/t1/fhir/Patient/p1", headers=A)
        check("down 503", s == 503)
        req("POST", ctl, {"down": "refuse", "down_for_s": 1})
        try:
            socket.create_connection(("127.0.0.1", info["port"]), timeout=1).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        check("down refuse -> ECONNREFUSED", refused)
        time.sleep(1.5)
        s, _, _ = req("GET", base + "/t1/fhir/Patient/p1", headers=A)
        check("back up after down_for_s", s == 200, s)
        req("POST", ctl, {"down": "reset"})
        try:
            req("GET", base + "/t1/fhir/Patient/p1", headers=A)
            reset = False
        except (urllib.error.URLError, ConnectionError, http.client.RemoteDisconnected):
            reset = True
        check("down reset -> connection closed", reset)
        req("POST", ctl, {"reset": True, "token_ttl": 1})
        s, _, b = req("POST", base + "/oauth2/token", form={"grant_type": "client_credentials",
                                                             "client_id": "edge-a", "client_secret": "sa"})
        short = {"Authorization": "Bearer " + js(b)["access_token"]}
        check("token_ttl via control", js(b)["expires_in"] == 1)
        time.sleep(1.1)
        s, _, _ = req("GET", base + "/t1/fhir/Patient/p1", headers=short)
        check("expired token 401", s == 401)
        req("POST", ctl, {"revoke_tokens": True})
        s, _, _ = req("GET", base + "/t1/fhir/Patient/p1", headers=A)
        check("revoked token 401", s == 401)
        s, _, b = req("GET", ctl)
        check("control state", s == 200 and js(b)["down"] is False)
    finally:
        gw.send_signal(signal.SIGTERM)
        check("gateway exits 0 on SIGTERM", gw.wait(15) == 0)


def orthanc_checks():
    from pydicom.data import get_testdata_file
    p, info = spawn([sys.executable, f"{HERE}/start_peers.py", "orthanc"])
    try:
        f = get_testdata_file("CT_small.dcm")
        data = open(f, "rb").read()
        bnd = uuid.uuid4().hex
        body = (f"--{bnd}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + f"\r\n--{bnd}--\r\n".encode())
        ct = f'multipart/related; type="application/dicom"; boundary={bnd}'
        s, _, b = req("POST", info["dicomweb_url"] + "/studies", body, {"Content-Type": ct,
                                                                        "Accept": "application/dicom+json"})
        r = js(b)
        check("STOW 200 + ReferencedSOPSequence", s == 200 and len(r["00081199"]["Value"]) == 1, (s, b[:300]))
        sop = r["00081199"]["Value"][0]["00081155"]["Value"][0]
        url = r["00081199"]["Value"][0]["00081190"]["Value"][0]
        s, _, b = req("GET", url.rsplit("/instances/", 1)[0] + "/instances")
        check("QIDO lists it", s == 200 and len(js(b)) == 1)
        s, _, b = req("POST", info["rest_url"] + "/tools/lookup", sop.encode(), {"Content-Type": "text/plain"})
        oid = [x["ID"] for x in js(b) if x["Type"] == "Instance"][0]
        s, _, b = req("GET", f"{info['rest_url']}/instances/{oid}/file")
        check("byte-identical", b == data)
        s, _, b = req("POST", info["dicomweb_url"] + "/studies", body, {"Content-Type": ct})
        check("duplicate STOW 200, referenced again", s == 200 and "Value" in js(b)["00081199"])
    finally:
        p.send_signal(signal.SIGTERM)
        check("orthanc launcher exits 0", p.wait(15) == 0)


def mosquitto_checks():
    p, info = spawn([sys.executable, f"{HERE}/start_peers.py", "mosquitto"])
    try:
        port = str(info["port"])
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", port, "-t", "hms/#", "-C", "1", "-W", "5"],
                               stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", port, "-t", "hms/x", "-q", "1", "-m", "hi"],
                       check=True)
        check("mqtt pub/sub", sub.communicate(timeout=10)[0].strip() == "hi")
    finally:
        p.send_signal(signal.SIGTERM)
        check("mosquitto launcher exits 0", p.wait(15) == 0)


if __name__ == "__main__":
    import http.client
    import urllib.parse
    for fn in (gateway_checks, orthanc_checks, mosquitto_checks):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - report and go on
            check(fn.__name__, False, repr(e))
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
