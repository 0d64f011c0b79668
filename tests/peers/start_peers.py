#!/usr/bin/env python3
"""Starts the real upstream peers of the sync agent's end-to-end tests on free loopback ports.

  start_peers.py sekmet    [--workdir DIR] [--name NAME]   upstream FHIR server (sekmet-fhir, PyPI)
  start_peers.py orthanc   [--workdir DIR]                 PACS: Orthanc + DICOMweb plugin (Debian)
  start_peers.py mosquitto [--workdir DIR]                 MQTT broker (Debian)

Each command starts the peer as a child process, waits until it answers, prints ONE JSON line on
stdout (ports, URLs, pid, log file) and stays in the foreground until SIGTERM/SIGINT, when it stops
the child and exits 0. The child also dies with this process (PR_SET_PDEATHSIG), and its output
goes to a log file in the work directory (never to a pipe nobody reads). Without --workdir a
temporary directory is made and removed at exit.

The functions are importable (tests/peers/cloud_gateway.py starts its sekmet instances with
start_sekmet). Each returns (Popen, info) once the peer is ready, retrying on a port clash.
"""

import argparse
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
MOSQUITTO = "/usr/sbin/mosquitto"
START_TIMEOUT = 30.0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _die_with_parent():
    # Linux PR_SET_PDEATHSIG = 1: the child gets SIGTERM when this process dies, even by SIGKILL.
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except OSError:
        pass
    os.setsid()


def _spawn(argv, workdir, log_name, env=None, cwd=None):
    log = open(os.path.join(workdir, log_name), "ab")
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=cwd or workdir, preexec_fn=_die_with_parent)


def _wait(proc, probe, what, log_path):
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited (most likely a port clash): the caller retries
        try:
            if probe():
                return True
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} not ready after {START_TIMEOUT}s; see {log_path}")


def _http_ok(url):
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200


def _tcp_ok(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def stop(proc, timeout=10):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_sekmet(workdir, name="fhir", validation="strict"):
    """sekmet-fhir with its own SQLite file WORKDIR/NAME/sekmet.db; FHIR base http://127.0.0.1:P/fhir.

    The simulator (which answers ServiceRequest/Task/... with resources of its own) and the inbound
    traffic log are off, so the store holds only what the test wrote (plus the 6 Basic
    SubscriptionTopic resources sekmet seeds at start)."""
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    cfg = os.path.join(d, "settings.yaml")
    with open(cfg, "w") as f:
        f.write(f"data_dir: {d}\nlog_inbound: false\nsimulator:\n  enabled: false\n"
                f"validation:\n  inbound: \"{validation}\"\n")
    for _ in range(3):
        port = free_port()
        base = f"http://127.0.0.1:{port}/fhir"
        env = dict(os.environ, SEKMET_CONFIG=cfg, SEKMET_BASE_URL=base, SEKMET_DB=os.path.join(d, "sekmet.db"))
        argv = [shutil.which("sekmet") or "sekmet", "serve", "--host", "127.0.0.1", "--port", str(port)]
        proc = _spawn(argv, workdir, f"{name}.log", env=env, cwd=d)
        if _wait(proc, lambda: _http_ok(base + "/metadata"), "sekmet", f"{workdir}/{name}.log"):
            return proc, {"peer": "sekmet", "name": name, "pid": proc.pid, "port": port, "base_url": base,
                          "db": os.path.join(d, "sekmet.db"), "log": os.path.join(workdir, f"{name}.log")}
    raise RuntimeError(f"sekmet did not start; see {workdir}/{name}.log")


def orthanc_config(workdir, http_port, dicom_port):
    return {
        "Name": "HMS_TEST_PACS",
        "StorageDirectory": os.path.join(workdir, "storage"),
        "IndexDirectory": os.path.join(workdir, "index"),
        "Plugins": [DICOMWEB_PLUGIN],
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "HMSPACS",
        "DicomCheckCalledAet": False,
        # Any calling AE may store and query (the agent's C-STORE mode confirms with C-FIND).
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "RemoteAccessAllowed": False,  # both ports bind 0.0.0.0; HTTP answers loopback clients only
        "AuthenticationEnabled": False,
        "StorageCompression": False,
        "OverwriteInstances": False,
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                     "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
    }


def start_orthanc(workdir):
    for _ in range(3):
        http_port, dicom_port = free_port(), free_port()
        path = os.path.join(workdir, "orthanc.json")
        with open(path, "w") as f:
            json.dump(orthanc_config(workdir, http_port, dicom_port), f, indent=2)
        proc = _spawn([ORTHANC, path], workdir, "orthanc.log")
        root = f"http://127.0.0.1:{http_port}"
        if _wait(proc, lambda: _http_ok(root + "/system"), "Orthanc", f"{workdir}/orthanc.log"):
            return proc, {"peer": "orthanc", "pid": proc.pid, "http_port": http_port, "dicom_port": dicom_port,
                          "aet": "HMSPACS", "rest_url": root, "dicomweb_url": root + "/dicom-web",
                          "config": path, "log": os.path.join(workdir, "orthanc.log")}
    raise RuntimeError(f"Orthanc did not start; see {workdir}/orthanc.log")


def start_mosquitto(workdir):
    for _ in range(3):
        port = free_port()
        path = os.path.join(workdir, "mosquitto.conf")
        with open(path, "w") as f:
            # user root: otherwise mosquitto (started as root) drops to user 'mosquitto', which
            # cannot read root-only files such as TLS keys in a temp dir.
            f.write(f"user root\npersistence false\nlog_dest stderr\n"
                    f"listener {port} 127.0.0.1\nallow_anonymous true\n")
        proc = _spawn([MOSQUITTO, "-c", path], workdir, "mosquitto.log")
        if _wait(proc, lambda: _tcp_ok(port), "mosquitto", f"{workdir}/mosquitto.log"):
            return proc, {"peer": "mosquitto", "pid": proc.pid, "port": port, "host": "127.0.0.1",
                          "config": path, "log": os.path.join(workdir, "mosquitto.log")}
    raise RuntimeError(f"mosquitto did not start; see {workdir}/mosquitto.log")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=["sekmet", "orthanc", "mosquitto"])
    ap.add_argument("--workdir")
    ap.add_argument("--name", default="fhir", help="sekmet: sub-directory / log name")
    ap.add_argument("--validation", default="strict", choices=["strict", "warn", "off"],
                    help="sekmet: inbound structural validation")
    a = ap.parse_args()
    tmp = None
    workdir = a.workdir
    if not workdir:
        workdir = tmp = tempfile.mkdtemp(prefix=f"hms-peer-{a.peer}-")
    os.makedirs(workdir, exist_ok=True)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    if a.peer == "sekmet":
        proc, info = start_sekmet(workdir, a.name, a.validation)
    elif a.peer == "orthanc":
        proc, info = start_orthanc(workdir)
    else:
        proc, info = start_mosquitto(workdir)
    info["workdir"] = workdir
    print(json.dumps(info), flush=True)
    while not done.wait(0.5):
        if proc.poll() is not None:
            print(f"start_peers: {a.peer} exited with {proc.returncode}", file=sys.stderr)
            break
    stop(proc)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if done.is_set() else 1)


if __name__ == "__main__":
    main()
