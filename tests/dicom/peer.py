#!/usr/bin/env python3
"""A real DICOM peer for the hms-edge tests, built on pynetdicom and pydicom.

Every subcommand prints one JSON document on stdout; the Rust tests parse it.

  peer.py store HOST PORT AEC FILE...        C-STORE each file exactly as stored on disk
                                              (the data set bytes after the File Meta are sent
                                              unchanged); prints [{"file", "status"}]
  peer.py find HOST PORT AEC LEVEL K=V...     Study Root C-FIND; prints {"status", "matches"}
  peer.py echo HOST PORT AEC MSGID            C-ECHO
  peer.py mpps-create HOST PORT AEC UID ACCESSION STUDY_UID PATIENT_ID
                                              MPPS N-CREATE (IN PROGRESS); prints {"status"}
  peer.py mpps-set HOST PORT AEC UID STATUS   MPPS N-SET of the step status; prints {"status"}
  peer.py compare ORIGINAL EXPORTED           {"meta_ts", "same_dataset", "same_bytes", ...}
  peer.py testfile NAME...                    paths of pydicom / pydicom-data test files
  peer.py info FILE...                        SOP/study/series UIDs and TS of files
  peer.py clone SRC OUTDIR N [PER_SERIES]     N copies of SRC, each with a fresh SOP Instance UID
                                              (a new series every PER_SERIES, default 100);
                                              prints [sop_instance_uid] in file order
                                              (OUTDIR/000000.dcm, …)
  peer.py retrieve-cancel HOST PORT AEC OP STUDY AFTER [DEST]
                                              Study Root C-GET (OP=get) or C-MOVE to DEST
                                              (OP=move) of a study; C-CANCEL after AFTER
                                              sub-operations; then a C-ECHO on the same
                                              association; prints {"statuses", "final",
                                              "completed", "failed", "warning", "remaining",
                                              "received", "echo"}
"""

import json
import sys

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ImplicitVRLittleEndian

CALLING_AE = "PYNETDICOM"


def _assoc(host, port, aec, contexts):
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    for sop, tss in contexts:
        ae.add_requested_context(sop, tss)
    return ae.associate(host, int(port), ae_title=aec)


def split_meta(path):
    """Return (transfer syntax, data set bytes) of a Part 10 file."""
    from pydicom.filereader import read_preamble, _read_file_meta_info

    with open(path, "rb") as f:
        read_preamble(f, False)
        meta = _read_file_meta_info(f)
        return str(meta.TransferSyntaxUID), f.read()


def cmd_store(host, port, aec, *files):
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    contexts = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        key = (str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        contexts[key] = True
    assoc = _assoc(host, port, aec, [(sop, [ts]) for sop, ts in contexts])
    if not assoc.is_established:
        print(json.dumps({"error": "association failed", "rejected": assoc.is_rejected}))
        return 2
    out = []
    for f in files:
        rsp = assoc.send_c_store(f)
        status = rsp.Status if "Status" in rsp else None
        out.append({"file": f, "status": status, "comment": str(rsp.get("ErrorComment", ""))})
    assoc.release()
    print(json.dumps(out))
    return 0


def _identifier(level, pairs):
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for p in pairs:
        k, _, v = p.partition("=")
        setattr(ds, k, v)
    return ds


def _jsonable(ds):
    out = {}
    for elem in ds:
        if elem.keyword in ("", "QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        v = elem.value
        if elem.VR == "SQ":
            v = []
        elif isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = "\\".join(str(x) for x in v)
        elif v is None:
            v = ""
        else:
            v = str(v)
        out[elem.keyword] = v
    return out


def cmd_find(host, port, aec, level, *pairs):
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    assoc = _assoc(host, port, aec, [(FIND, [ImplicitVRLittleEndian])])
    if not assoc.is_established:
        print(json.dumps({"error": "association failed", "rejected": assoc.is_rejected}))
        return 2
    matches, final = [], None
    for status, ident in assoc.send_c_find(_identifier(level, pairs), FIND):
        if status is None:
            break
        if status.Status in (0xFF00, 0xFF01):
            matches.append(_jsonable(ident))
        else:
            final = status.Status
    assoc.release()
    print(json.dumps({"status": final, "matches": matches}))
    return 0


def cmd_echo(host, port, aec, msg_id):
    from pynetdicom.sop_class import Verification

    assoc = _assoc(host, port, aec, [(Verification, [ImplicitVRLittleEndian])])
    if not assoc.is_established:
        print(json.dumps({"error": "association failed", "rejected": assoc.is_rejected}))
        return 2
    rsp = assoc.send_c_echo(msg_id=int(msg_id))
    assoc.release()
    print(json.dumps({"status": rsp.Status if "Status" in rsp else None}))
    return 0


def _mpps_assoc(host, port, aec):
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS

    return MPPS, _assoc(host, port, aec, [(MPPS, [ImplicitVRLittleEndian])])


def cmd_mpps_create(host, port, aec, uid, accession, study_uid, patient_id):
    mpps, assoc = _mpps_assoc(host, port, aec)
    if not assoc.is_established:
        print(json.dumps({"error": "association failed", "rejected": assoc.is_rejected}))
        return 2
    ds = Dataset()
    step = Dataset()
    step.AccessionNumber = accession
    step.StudyInstanceUID = study_uid
    step.RequestedProcedureID = accession
    step.ScheduledProcedureStepID = accession
    ds.ScheduledStepAttributesSequence = [step]
    ds.PatientID = patient_id
    ds.PatientName = "Doe^John"
    ds.PerformedProcedureStepID = "PPS1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedProcedureStepStartDate = "20261130"
    ds.PerformedProcedureStepStartTime = "093000"
    ds.TimezoneOffsetFromUTC = "+0100"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT chest performed"
    ds.Modality = "CT"
    ds.PerformedSeriesSequence = []
    status, _ = assoc.send_n_create(ds, mpps, uid)
    assoc.release()
    print(json.dumps({"status": status.Status if status is not None and "Status" in status else None}))
    return 0


def cmd_mpps_set(host, port, aec, uid, step_status):
    mpps, assoc = _mpps_assoc(host, port, aec)
    if not assoc.is_established:
        print(json.dumps({"error": "association failed", "rejected": assoc.is_rejected}))
        return 2
    ds = Dataset()
    ds.PerformedProcedureStepStatus = step_status
    ds.PerformedProcedureStepEndDate = "20261130"
    ds.PerformedProcedureStepEndTime = "101500"
    ds.TimezoneOffsetFromUTC = "+0100"
    status, _ = assoc.send_n_set(ds, mpps, uid)
    assoc.release()
    print(json.dumps({"status": status.Status if status is not None and "Status" in status else None}))
    return 0


def cmd_compare(original, exported):
    ts_o, bytes_o = split_meta(original)
    ts_e, bytes_e = split_meta(exported)
    a, b = dcmread(original), dcmread(exported)
    meta = b.file_meta
    diff = sorted(
        str(t) for t in set(a.keys()) ^ set(b.keys())
    ) + sorted(str(t) for t in set(a.keys()) & set(b.keys()) if a[t] != b[t])
    print(
        json.dumps(
            {
                "meta_ts": ts_e,
                "original_ts": ts_o,
                "same_bytes": bytes_o == bytes_e,
                "same_dataset": a == b,
                "differing_tags": diff[:10],
                "meta_sop_instance": str(meta.MediaStorageSOPInstanceUID),
                "meta_sop_class": str(meta.MediaStorageSOPClassUID),
                "implementation_class": str(meta.ImplementationClassUID),
                "sop_instance": str(b.SOPInstanceUID),
            }
        )
    )
    return 0


def cmd_testfile(*names):
    from pydicom.data import get_testdata_file

    print(json.dumps([get_testdata_file(n) for n in names]))
    return 0


def cmd_info(*files):
    out = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        out.append(
            {
                "file": f,
                "sop_class": str(ds.SOPClassUID),
                "sop_instance": str(ds.SOPInstanceUID),
                "study": str(ds.get("StudyInstanceUID", "")),
                "series": str(ds.get("SeriesInstanceUID", "")),
                "ts": str(ds.file_meta.TransferSyntaxUID),
                "patient_id": str(ds.get("PatientID", "")),
                "patient_name": str(ds.get("PatientName", "")),
                "modality": str(ds.get("Modality", "")),
                "study_date": str(ds.get("StudyDate", "")),
            }
        )
    print(json.dumps(out))
    return 0


def cmd_clone(src, outdir, n, per_series="100"):
    """Fast: one template written by pydicom, then equal-length UID substitutions in its bytes."""
    import io
    import os
    import random

    from pydicom.uid import generate_uid

    def root():
        return "2.25.%d" % random.randrange(10**29, 10**30)

    inst_root, series_root = root(), root()
    ds = dcmread(src)
    # Data set trailing padding: DCMTK's storescu drops it when sending, so the data set it
    # sends would not be the file's.
    if 0xFFFCFFFC in ds:
        del ds[0xFFFCFFFC]
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_root + ".1000000"
    ds.SOPInstanceUID = inst_root + ".1000000"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    template = buf.getvalue()
    os.makedirs(outdir, exist_ok=True)
    out = []
    for i in range(int(n)):
        uid = "%s.1%06d" % (inst_root, i)
        series = "%s.1%06d" % (series_root, i // int(per_series))
        data = template.replace((inst_root + ".1000000").encode(), uid.encode())
        data = data.replace((series_root + ".1000000").encode(), series.encode())
        with open(os.path.join(outdir, "%06d.dcm" % i), "wb") as f:
            f.write(data)
        out.append(uid)
    print(json.dumps(out))
    return 0


def cmd_retrieve_cancel(host, port, aec, op, study, after, dest=None):
    import threading

    from pynetdicom import AE, StoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import (
        StudyRootQueryRetrieveInformationModelGet as GET,
        StudyRootQueryRetrieveInformationModelMove as MOVE,
        Verification,
    )

    after = int(after)
    msg_id = 7
    model = GET if op == "get" else MOVE
    received = []
    state = {"assoc": None, "cancelled": False}
    lock = threading.Lock()

    def cancel():
        with lock:
            if not state["cancelled"]:
                state["cancelled"] = True
                state["assoc"].send_c_cancel(msg_id, query_model=model)

    def on_store(event):
        received.append(event.request.AffectedSOPInstanceUID)
        if len(received) >= after:
            cancel()
        return 0x0000

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.add_requested_context(model)
    ae.add_requested_context(Verification)
    roles = []
    if op == "get":
        from pydicom.uid import ExplicitVRLittleEndian

        # Explicit VR first: the SCP sends stored bytes as they are, in the stored syntax.
        for cx in StoragePresentationContexts[:120]:
            ae.add_requested_context(
                cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
            )
            roles.append(build_role(cx.abstract_syntax, scp_role=True))
    assoc = ae.associate(
        host, int(port), ae_title=aec, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    if not assoc.is_established:
        print(json.dumps({"error": "association failed"}))
        return 2
    state["assoc"] = assoc
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = study
    if op == "get":
        responses = assoc.send_c_get(ds, model, msg_id=msg_id)
    else:
        responses = assoc.send_c_move(ds, dest, model, msg_id=msg_id)
    statuses = []
    last = None
    for status, _identifier in responses:
        if status is None or "Status" not in status:
            break
        statuses.append(status.Status)
        last = status
        if status.Status in (0xFF00, 0xFF01) and op == "move":
            completed = int(status.get("NumberOfCompletedSuboperations", 0))
            if completed >= after:
                cancel()
    counts = {
        k: int(last.get("NumberOf%sSuboperations" % k.capitalize(), -1)) if last else -1
        for k in ("completed", "failed", "warning", "remaining")
    }
    echo = assoc.send_c_echo(msg_id=99)
    assoc.release()
    print(
        json.dumps(
            dict(
                statuses=statuses,
                final=statuses[-1] if statuses else None,
                received=len(received),
                echo=echo.Status if "Status" in echo else None,
                **counts,
            )
        )
    )
    return 0


def main(argv):
    cmds = {
        "store": cmd_store,
        "find": cmd_find,
        "echo": cmd_echo,
        "compare": cmd_compare,
        "mpps-create": cmd_mpps_create,
        "mpps-set": cmd_mpps_set,
        "testfile": cmd_testfile,
        "info": cmd_info,
        "clone": cmd_clone,
        "retrieve-cancel": cmd_retrieve_cancel,
    }
    if len(argv) < 2 or argv[1] not in cmds:
        print(__doc__, file=sys.stderr)
        return 64
    return cmds[argv[1]](*argv[2:])


if __name__ == "__main__":
    import logging

    logging.disable(logging.CRITICAL)
    sys.exit(main(sys.argv))
