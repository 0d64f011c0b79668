#!/usr/bin/env python3
"""Seed corpora for the cargo-fuzz targets (scripts/fuzz), made from the test material.

Writes into CORPUS_DIR/<target>/seed-*: existing files are kept, so libFuzzer's finds stay.
"""
import io
import json
import os
import struct
import sys
import tarfile

out = sys.argv[1]


def put(target, name, data):
    d = os.path.join(out, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, f"seed-{name}"), "wb") as f:
        f.write(data)


def elem_implicit(group, element, value):
    if len(value) % 2:
        value += b"\0" if group == 0 or element in (0x0016, 0x0018) else b" "
    return struct.pack("<HHI", group, element, len(value)) + value


# DICOM data sets from pydicom's test files, in both little-endian encodings.
try:
    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.data import get_testdata_file

    for name in ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm"]:
        path = get_testdata_file(name)
        if not path:
            continue
        ds = pydicom.dcmread(path)
        for implicit in (True, False):
            buf = DicomBytesIO()
            buf.is_little_endian = True
            buf.is_implicit_VR = implicit
            write_dataset(buf, ds)
            data = buf.getvalue()
            flag = bytes([0 if implicit else 1])
            put("dataset_scanner", f"{name}-{implicit}", bytes([0x80 | (0 if implicit else 1)]) + data)
            put("dicom_json", f"{name}-{implicit}", flag + data)
        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.PatientID = "*"
        q.StudyInstanceUID = ds.get("StudyInstanceUID", "1.2.3")
        q.ScheduledProcedureStepSequence = [pydicom.Dataset()]
        q.ScheduledProcedureStepSequence[0].Modality = "CT"
        q.ReferencedSOPSequence = [pydicom.Dataset()]
        q.ReferencedSOPSequence[0].ReferencedSOPClassUID = ds.SOPClassUID
        q.ReferencedSOPSequence[0].ReferencedSOPInstanceUID = ds.SOPInstanceUID
        q.TransactionUID = "2.25.1"
        q.PerformedProcedureStepStatus = "IN PROGRESS"
        for implicit in (True, False):
            buf = DicomBytesIO()
            buf.is_little_endian = True
            buf.is_implicit_VR = implicit
            write_dataset(buf, q)
            for kind in range(5):
                put("dimse_identifiers", f"{name}-{implicit}-{kind}",
                    bytes([(kind << 1) | (0 if implicit else 1)]) + buf.getvalue())
except ImportError:
    print("fuzz-seeds: pydicom not installed; DICOM seeds skipped", file=sys.stderr)

# Inputs that once crashed a target (kept as seeds so every run replays them).
# dimse_identifiers: an unknown VR read as a 775 MB length by the object model (fixed: refused).
put("dimse_identifiers", "regression-unknown-vr-oom", bytes.fromhex(
    "05080052004353060053545544592008009511554b0600322e32352e31080099115351000060000000feff00e0580000000800501155491a00312e322e3834302e31303030382e352e312e342e312e312e34000800551155492e00312e332e362e312e342e312e353936322e312e312e342e312e312e32303034303832363138353035392e35343537100020004c4f02002a2020000d0051492a00312e332e362e302e39343231362e2e352e312e322e342e32303034303832363138353035392e35343537400000015351000012000000feff00e00a000000080060004353020043544000520243530c00494e2050524f475245535320"))

# dimse_identifiers: a 39-byte UL value; the object model read 36 and then a header out of step.
put("dimse_identifiers", "regression-short-value-oom", bytes.fromhex(
    "00000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000002700000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000007000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000290000000000000000000000000000000000000000000085000000000000000000000000000000000000000000000000000000000000000400000000000000000002000000000000000000000000000000000000000000"))

# DIMSE command sets and PDUs.
echo = elem_implicit(0, 0x0002, b"1.2.840.10008.1.1") + elem_implicit(0, 0x0100, struct.pack("<H", 0x30)) \
    + elem_implicit(0, 0x0110, struct.pack("<H", 1)) + elem_implicit(0, 0x0800, struct.pack("<H", 0x0101))
echo = elem_implicit(0, 0x0000, struct.pack("<I", len(echo))) + echo
put("dimse_command", "echo", echo)
pdv = struct.pack(">IBB", len(echo) + 2, 1, 3) + echo
put("pdu_reader", "pdata", struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
put("pdu_reader", "release", bytes.fromhex("050000000004 00000000".replace(" ", "")))
put("pdu_reader", "abort", bytes.fromhex("07000000000400000000"))
app = b"1.2.840.10008.3.1.1.1"
items = struct.pack(">BBH", 0x10, 0, len(app)) + app
ab = b"1.2.840.10008.1.1"
ts = b"1.2.840.10008.1.2"
pc = struct.pack(">BBH", 0x30, 0, len(ab)) + ab + struct.pack(">BBH", 0x40, 0, len(ts)) + ts
items += struct.pack(">BBHBBBB", 0x20, 0, 4 + len(pc), 1, 0, 0, 0) + pc
ui = struct.pack(">BBHI", 0x51, 0, 4, 16384)
items += struct.pack(">BBH", 0x50, 0, len(ui)) + ui
rq = struct.pack(">HH", 1, 0) + b"HMS-EDGE".ljust(16) + b"SCU".ljust(16) + bytes(32) + items
put("pdu_reader", "associate", struct.pack(">BBI", 1, 0, len(rq)) + rq)

# FHIR: searches, dates, FHIRPath, resources from the Synthea bundles.
for i, q in enumerate([
    "name=smith&birthdate=ge1990-01-01&_sort=-birthdate&_count=10",
    "patient=Patient/1&code=http://loinc.org|8867-4&date=lt2026-03-01T10:00:00+01:00&_sort=-date",
    "subject:Patient.identifier=urn:mrn|123&_include=Observation:subject&_revinclude=Provenance:target",
    "value-quantity=gt5.4|http://unitsofmeasure.org|mg&_total=accurate&_summary=count",
    "_id=a,b,c&_lastUpdated=ge2026&_elements=id,code&status:not=final",
]):
    put("fhir_search_params", f"q{i}", bytes([i]) + q.encode())
for i, d in enumerate(["2026", "2026-03", "2026-03-01", "2026-03-01T10:00", "2026-03-01T10:00:05.123+01:00",
                       "2026-03-01T10:00:05Z", "1900-02-29"]):
    put("fhir_date", f"d{i}", d)
for i, e in enumerate([
    "Patient.name.family | Patient.name.given",
    "Observation.value.as(Quantity) | Observation.component.value.as(Quantity)",
    "Observation.subject.where(resolve() is Patient)",
    "(Observation.effective as dateTime)",
    "Patient.extension('http://x').value",
]):
    put("fhirpath", f"e{i}", e + "\n" + json.dumps({"resourceType": "Patient", "name": [{"family": "A", "given": ["B"]}]}))
tar = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "synthea-r4-100.tar.gz")
seen = {}
if os.path.exists(tar):
    with tarfile.open(tar) as t:
        for m in t:
            if not m.isfile() or not m.name.endswith(".json") or "hospital" in m.name:
                continue
            bundle = json.load(t.extractfile(m))
            for e in bundle.get("entry", []):
                r = e.get("resource", {})
                rt = r.get("resourceType")
                if rt and seen.get(rt, 0) < 3:
                    seen[rt] = seen.get(rt, 0) + 1
                    put("fhir_index", f"{rt}-{seen[rt]}", json.dumps(r))
                    if rt in ("Patient", "Observation"):
                        put("internal_api", f"{rt}-{seen[rt]}", json.dumps(
                            {"rtype": rt, "id": r.get("id", "x"), "resource": r,
                             "upstream_version": "1", "policy": "server-wins"}))
            if len(seen) > 25:
                break
put("internal_api", "lease", json.dumps({"kind": "fhir", "max": 10, "lease_secs": 30}))
put("stow_multipart", "one", b'multipart/related; type="application/dicom"; boundary=b\n'
    b"--b\r\nContent-Type: application/dicom\r\n\r\nDICM\r\n--b\r\nContent-Type: application/dicom\r\n\r\nX\r\n--b--\r\n")
put("jwt", "token", "eyJhbGciOiJFUzI1NiIsImtpZCI6ImsxIn0.eyJpc3MiOiJpc3MiLCJhdWQiOiJhdWQiLCJleHAiOjQxMDI0NDQ4MDAsInRlbmFudCI6InQifQ.c2ln")
