#!/usr/bin/env python3
"""A real DICOMweb client (the `dicomweb-client` PyPI package) against hms-edged, and pydicom
for the expected pixel frames. Prints JSON on stdout. Used by tests/tests/dicomweb.rs.

    dicomweb_peer.py pixels FILE
    dicomweb_peer.py client BASE_URL CA_PEM TOKEN|- COMMAND ARGS...
        search-studies KEY=VALUE...      -> [StudyInstanceUID, ...]
        search-instances STUDY           -> [SOPInstanceUID, ...]
        store FILE...                    -> the STOW-RS response (DICOM JSON)
        metadata STUDY                   -> [{"sop": ..., "bulk": n, "patient_id": ...}, ...]
        retrieve-instance STUDY SERIES SOP -> {"sop": ..., "rows": ...}
        retrieve-study STUDY             -> [SOPInstanceUID, ...]
"""

import hashlib
import json
import sys

import pydicom


def cmd_pixels(path):
    ds = pydicom.dcmread(path)
    n = int(getattr(ds, "NumberOfFrames", 1) or 1)
    ts = ds.file_meta.TransferSyntaxUID
    data = ds.PixelData
    if ts.is_compressed:
        from pydicom.encaps import generate_frames

        frames = list(generate_frames(data, number_of_frames=n))
    else:
        size = ds.Rows * ds.Columns * ds.SamplesPerPixel * ds.BitsAllocated // 8
        frames = [data[i * size:(i + 1) * size] for i in range(n)]
    return {
        "compressed": bool(ts.is_compressed),
        "frames": [hashlib.sha256(f).hexdigest() for f in frames],
        "pixel_data": hashlib.sha256(data).hexdigest(),
    }


def client(base, ca, token):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session = create_session()
    session.verify = ca
    session.trust_env = False  # REQUESTS_CA_BUNDLE / proxies from the environment would win
    headers = {"Authorization": f"Bearer {token}"} if token != "-" else None
    return DICOMwebClient(url=base, session=session, headers=headers)


def cmd_client(base, ca, token, command, *args):
    c = client(base, ca, token)
    if command == "search-studies":
        filters = dict(a.split("=", 1) for a in args)
        res = c.search_for_studies(search_filters=filters)
        return [pydicom.Dataset.from_json(r).StudyInstanceUID for r in res]
    if command == "search-instances":
        res = c.search_for_instances(study_instance_uid=args[0])
        return [pydicom.Dataset.from_json(r).SOPInstanceUID for r in res]
    if command == "store":
        datasets = [pydicom.dcmread(f) for f in args]
        return c.store_instances(datasets=datasets).to_json_dict()
    if command == "metadata":
        out = []
        for m in c.retrieve_study_metadata(args[0]):
            bulk = sum(1 for v in m.values() if isinstance(v, dict) and "BulkDataURI" in v)
            ds = pydicom.Dataset.from_json(m, bulk_data_uri_handler=lambda *a: b"")
            out.append({"sop": ds.SOPInstanceUID, "bulk": bulk,
                        "patient_id": str(ds.get("PatientID", ""))})
        return out
    if command == "retrieve-instance":
        ds = c.retrieve_instance(*args)
        return {"sop": ds.SOPInstanceUID, "rows": int(ds.get("Rows", 0) or 0)}
    if command == "retrieve-study":
        return [ds.SOPInstanceUID for ds in c.retrieve_study(args[0])]
    raise SystemExit(f"unknown client command {command}")


def main(argv):
    if argv[0] == "pixels":
        out = cmd_pixels(argv[1])
    elif argv[0] == "client":
        out = cmd_client(*argv[1:])
    else:
        raise SystemExit(f"unknown command {argv[0]}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
