#!/usr/bin/env python3
"""Schema-driven fuzzer of the live FHIR and DICOMweb listener (issue 16, item 5).

Reads the daemon's CapabilityStatement (the schema of what it serves: types, interactions,
search parameters and their kinds) and has Hypothesis generate requests from it, valid-looking
and hostile: searches with random parameters, modifiers, prefixes, sort keys, includes and
unicode; resources with random and malformed fields (dates above all); Bundles with random
entries; reads of odd ids; QIDO-RS queries, WADO-RS paths and STOW-RS bodies.

Fails when any answer is a 5xx other than a documented 503 (with an OperationOutcome), when a
request gets no answer within the timeout (a hang), or when the connection is refused (the
process died). Prints a histogram of status codes.

    fuzz_api.py --base https://localhost:8443 --ca state/tls/ca.pem [--examples N]
"""
import argparse
import json
import random
import sys
from collections import Counter

import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ap = argparse.ArgumentParser()
ap.add_argument("--base", required=True)
ap.add_argument("--ca", required=True)
ap.add_argument("--examples", type=int, default=200)
args = ap.parse_args()

S = requests.Session()
S.trust_env = False  # a CA bundle named in the environment would override ours
S.verify = args.ca
FHIR = args.base + "/fhir"
WEB = args.base + "/dicom-web"
TIMEOUT = 40
seen = Counter()
bad = []

cap = S.get(FHIR + "/metadata", timeout=TIMEOUT, verify=args.ca).json()
RESOURCES = {r["type"]: r for r in cap["rest"][0]["resource"]}
SEARCHABLE = sorted(t for t, r in RESOURCES.items() if r.get("searchParam"))
ALL_TYPES = sorted(RESOURCES)


def check(method, url, r=None, exc=None, body=None):
    if exc is not None:
        bad.append(f"{method} {url}: no answer ({type(exc).__name__}: {exc})")
        raise AssertionError(bad[-1])
    seen[r.status_code] += 1
    if r.status_code >= 500:
        documented = r.status_code == 503
        try:
            documented = documented and r.json().get("resourceType") == "OperationOutcome"
        except ValueError:
            documented = documented and "dicom-web" in url
        if not documented:
            snippet = (body or "")[:300]
            bad.append(f"{method} {url} -> {r.status_code}: {r.text[:300]} (sent {snippet!r})")
            raise AssertionError(bad[-1])


def send(method, url, **kw):
    try:
        r = S.request(method, url, timeout=TIMEOUT, verify=args.ca, **kw)
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
        check(method, url, exc=e)
        return None
    except (requests.exceptions.RequestException, ValueError, UnicodeError):
        seen["not sent (client refused it)"] += 1
        return None
    data = kw.get("data")
    check(method, url, r=r, body=data if isinstance(data, str) else repr(data))
    return r


# ---- value strategies -----------------------------------------------------------------------

nasty = st.sampled_from([
    "", " ", "*", "%", "\\", "|", "||", ",", ",,", "$", "\\,", "null", "0", "-1", "1e309", "NaN",
    "2000-01-01T10:00+0\u00e900", "2000-13-45", "9999-12-31T23:59:59.999999999+14:00",
    "\u202e\u0000", "\U0001F600", "'; DROP TABLE fhir_current; --", "a" * 5000,
    "Patient/../../etc/passwd", "urn:uuid:00000000-0000-0000-0000-000000000000",
])
date_value = st.one_of(
    st.builds(lambda p, y, m, d, rest: f"{p}{y:04d}-{m:02d}-{d:02d}{rest}",
              st.sampled_from(["", "eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap", "xx"]),
              st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32),
              st.sampled_from(["", "T10:00", "T10:00:00Z", "T10:00+01:00", "T25:61", "T10:00+0\u00e900"])),
    st.text(max_size=30),
)
token_value = st.one_of(
    st.builds(lambda s, c: f"{s}|{c}", st.sampled_from(["http://loinc.org", "", "urn:mrn", "\u00e9"]),
              st.text(max_size=12)),
    st.text(max_size=20),
)
number_value = st.one_of(
    st.builds(lambda p, n: f"{p}{n}", st.sampled_from(["", "gt", "lt", "ap", "ne"]),
              st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=True, allow_infinity=True))),
    st.text(max_size=10),
)
any_value = st.one_of(nasty, st.text(max_size=40), token_value, date_value, number_value)


def value_for(kind):
    return {"date": date_value, "token": token_value, "number": number_value,
            "quantity": number_value}.get(kind, any_value)


@st.composite
def search_query(draw):
    rtype = draw(st.sampled_from(SEARCHABLE))
    params = RESOURCES[rtype].get("searchParam", [])
    pairs = []
    for _ in range(draw(st.integers(0, 5))):
        p = draw(st.sampled_from(params))
        name = p["name"]
        mod = draw(st.sampled_from(["", "", ":missing", ":exact", ":contains", ":not", ":text",
                                    ":below", ":above", ":in", ":Patient", ":identifier", ":\u00e9"]))
        if p.get("type") == "reference" and draw(st.booleans()):
            name += draw(st.sampled_from([".name", ".identifier", ":Patient.birthdate", ".x.y"]))
        vals = draw(st.lists(value_for(p.get("type")), min_size=1, max_size=3))
        pairs.append((name + mod, ",".join(vals)))
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(["_sort", "_count", "_include", "_revinclude", "_elements",
                                    "_summary", "_total", "_id", "_lastUpdated", "_format", "_page"]))
        if key == "_sort":
            names = [p["name"] for p in params] + ["_id", "_lastUpdated", "nope"]
            v = ",".join(draw(st.sampled_from(["", "-"])) + draw(st.sampled_from(names))
                         for _ in range(draw(st.integers(1, 8))))
        elif key in ("_include", "_revinclude"):
            v = draw(st.sampled_from([f"{rtype}:subject", "Observation:subject", "*", f"{rtype}:*",
                                      "Encounter:patient:Patient", "x:y:z:w"]))
        elif key == "_count":
            v = str(draw(st.integers(-5, 10**7)))
        else:
            v = draw(any_value)
        pairs.append((key, v))
    return rtype, pairs


@st.composite
def resource_body(draw):
    rtype = draw(st.sampled_from(ALL_TYPES))
    if rtype in ("AuditEvent",):
        rtype = "Patient"
    res = {"resourceType": rtype}
    fields = ["birthDate", "effectiveDateTime", "issued", "authoredOn", "recordedDate", "date",
              "status", "code", "subject", "identifier", "name", "valueQuantity", "period",
              "meta", "id", "text", "extension", "contained"]
    for f in draw(st.lists(st.sampled_from(fields), max_size=6, unique=True)):
        res[f] = draw(st.recursive(
            st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), any_value),
            lambda kids: st.one_of(st.lists(kids, max_size=3),
                                   st.dictionaries(st.sampled_from(
                                       ["reference", "system", "value", "start", "end", "family",
                                        "given", "coding", "code", "text", "unit", "url"]),
                                       kids, max_size=3)),
            max_leaves=8))
    return rtype, res


# ---- the fuzz tests ---------------------------------------------------------------------------

common = settings(max_examples=args.examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))


@common
@given(search_query(), st.booleans())
def fuzz_search(q, as_post):
    rtype, pairs = q
    if as_post:
        send("POST", f"{FHIR}/{rtype}/_search", data=pairs,
             headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        send("GET", f"{FHIR}/{rtype}", params=pairs)


@common
@given(resource_body(), st.sampled_from(["POST", "PUT", "POST-raw", "PUT-cond"]), st.binary(max_size=64))
def fuzz_write(rb, how, junk):
    rtype, res = rb
    h = {"Content-Type": "application/fhir+json"}
    if how == "POST":
        send("POST", f"{FHIR}/{rtype}", data=json.dumps(res), headers=h)
    elif how == "PUT":
        rid = res.get("id") if isinstance(res.get("id"), str) else "fuzz-1"
        send("PUT", f"{FHIR}/{rtype}/{rid}", data=json.dumps(res), headers=h)
    elif how == "PUT-cond":
        send("POST", f"{FHIR}/{rtype}", data=json.dumps(res),
             headers={**h, "If-None-Exist": "identifier=" + json.dumps(res.get("identifier"))[:200]})
    else:
        body = json.dumps(res).encode()
        cut = random.randint(0, len(body))
        send("POST", f"{FHIR}/{rtype}", data=body[:cut] + junk, headers=h)


@common
@given(st.lists(st.tuples(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "X"]),
                          st.one_of(search_query().map(lambda q: q[0] + "?" + "&".join(f"{k}={v}" for k, v in q[1])),
                                    st.text(max_size=40)),
                          st.one_of(st.none(), resource_body().map(lambda r: r[1]))),
                max_size=6),
       st.sampled_from(["batch", "transaction", "searchset", None]))
def fuzz_bundle(entries, btype):
    b = {"resourceType": "Bundle", "entry": []}
    if btype:
        b["type"] = btype
    for method, url, res in entries:
        e = {"request": {"method": method, "url": url}, "fullUrl": "urn:uuid:" + str(random.getrandbits(64))}
        if res is not None:
            e["resource"] = res
        b["entry"].append(e)
    send("POST", FHIR, data=json.dumps(b), headers={"Content-Type": "application/fhir+json"})


@common
@given(st.sampled_from(ALL_TYPES + ["Nope", ""]), st.one_of(st.text(max_size=70), nasty),
       st.sampled_from(["", "/_history", "/_history/1", "/_history/x", "/$everything", "/$verify"]))
def fuzz_read(rtype, rid, tail):
    send("GET", f"{FHIR}/{rtype}/{requests.utils.quote(rid, safe='')}{tail}")


uid = st.one_of(st.from_regex(r"\A[12](\.[0-9]{1,6}){1,8}\Z"), nasty, st.text(max_size=70))


@common
@given(st.sampled_from(["studies", "series", "instances"]),
       st.lists(st.tuples(st.sampled_from(["PatientID", "PatientName", "StudyDate", "00100010",
                                           "StudyInstanceUID", "Modality", "limit", "offset",
                                           "includefield", "fuzzymatching", "0020000D", "zz"]),
                          any_value), max_size=5))
def fuzz_qido(level, pairs):
    send("GET", f"{WEB}/{level}", params=pairs, headers={"Accept": "application/dicom+json"})


@common
@given(uid, uid, uid, st.sampled_from(["", "/metadata", "/frames/1", "/frames/0,2,99999", "/rendered",
                                       "/bulkdata/x"]),
       st.sampled_from(["application/dicom+json", "multipart/related; type=\"application/dicom\"",
                        "multipart/related; type=\"application/octet-stream\"; transfer-syntax=*",
                        "*/*", "text/\u00e9"]))
def fuzz_wado(study, series, inst, tail, accept):
    path = f"{WEB}/studies/{requests.utils.quote(study, safe='')}/series/{requests.utils.quote(series, safe='')}" \
           f"/instances/{requests.utils.quote(inst, safe='')}{tail}"
    try:
        send("GET", path, headers={"Accept": accept.encode("latin-1", "replace").decode("latin-1")})
    except UnicodeError:
        pass


@common
@given(st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=20),
       st.lists(st.tuples(st.sampled_from(["application/dicom", "text/plain", ""]),
                                                  st.binary(max_size=300)), max_size=5),
       st.booleans())
def fuzz_stow(boundary, parts, close):
    b = boundary.encode("utf-8", "replace") or b"x"
    body = b""
    for ct, data in parts:
        body += b"--" + b + b"\r\nContent-Type: " + ct.encode() + b"\r\n\r\n" + data + b"\r\n"
    if close:
        body += b"--" + b + b"--\r\n"
    ctype = 'multipart/related; type="application/dicom"; boundary=' + boundary
    try:
        ctype.encode("latin-1")
    except UnicodeError:
        ctype = 'multipart/related; type="application/dicom"; boundary=x'
    send("POST", f"{WEB}/studies", data=body, headers={"Content-Type": ctype})


failed = []
for test in [fuzz_search, fuzz_write, fuzz_bundle, fuzz_read, fuzz_qido, fuzz_wado, fuzz_stow]:
    try:
        test()
    except Exception as e:  # noqa: BLE001 - report every fuzz test, then fail
        failed.append(f"{test.__name__}: {e}")

print("status codes:", dict(sorted(seen.items(), key=str)), "requests:", sum(seen.values()))
for b in bad[:20]:
    print("BAD:", b)
if failed:
    print("FAILED:", *failed, sep="\n  ")
    sys.exit(1)
