#!/usr/bin/env python3
"""A modality asking hms-edge for Storage Commitment (Push Model), with pynetdicom.

  commit_peer.py HOST PORT AEC TRANSACTION_UID CLASS=INSTANCE...

ACTION_TYPE in the environment overrides the Action Type ID (1) to test refusals.
REPORT_PORT in the environment: the requester releases its association right after the
N-ACTION-RSP and waits for the report on a new association, listening on that port (as AE
COMMIT_SCU, accepting the SCP role the SCP proposes for Storage Commitment).

Sends one N-ACTION (Request Storage Commitment) with the given references on an association
that stays open, and waits for the SCP's N-EVENT-REPORT on that same association. Prints one JSON
document: {"action_status", "event_type", "transaction_uid", "retrieve_ae", "committed":
[[class, instance]...], "failed": [[class, instance, reason]...]}; "event_type" is null when no
report arrived within the timeout.
"""

import json
import os
import sys
import threading

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

INSTANCE = "1.2.840.10008.1.20.1.1"


def main(host, port, aec, transaction_uid, *refs):
    report = {}
    got = threading.Event()

    def on_report(event):
        ds = event.event_information
        report["event_type"] = event.event_type
        # True: on the association of our N-ACTION; False: on one the SCP opened to us.
        report["same_association"] = bool(event.assoc.is_requestor)
        report["transaction_uid"] = str(ds.get("TransactionUID", ""))
        report["retrieve_ae"] = str(ds.get("RetrieveAETitle", "")).strip() or None
        report["committed"] = [
            [str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID)]
            for i in ds.get("ReferencedSOPSequence", [])
        ]
        report["failed"] = [
            [str(i.ReferencedSOPClassUID), str(i.ReferencedSOPInstanceUID), int(i.FailureReason)]
            for i in ds.get("FailedSOPSequence", [])
        ]
        got.set()
        return 0x0000, None  # (status, event reply)

    if os.environ.get("HMS_TEST_VERBOSE"):
        from pynetdicom import debug_logger

        debug_logger()
    ae = AE(ae_title="COMMIT_SCU")
    ae.acse_timeout = 10
    ae.dimse_timeout = 30
    ae.network_timeout = 30
    ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    report_port = os.environ.get("REPORT_PORT")
    server = None
    if report_port:
        ae.add_supported_context(
            StorageCommitmentPushModel,
            [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
            scu_role=False,
            scp_role=True,
        )
        server = ae.start_server(
            ("127.0.0.1", int(report_port)),
            block=False,
            evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
        )
    assoc = ae.associate(
        host, int(port), ae_title=aec, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
    )
    if not assoc.is_established:
        print(json.dumps({"error": "association refused"}))
        return 1
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for r in refs:
        cls, inst = r.split("=", 1)
        item = Dataset()
        item.ReferencedSOPClassUID = cls
        item.ReferencedSOPInstanceUID = inst
        items.append(item)
    ds.ReferencedSOPSequence = items
    action = int(os.environ.get("ACTION_TYPE", "1"))
    status, _ = assoc.send_n_action(ds, action, StorageCommitmentPushModel, INSTANCE)
    out = {"action_status": int(status.Status) if status else None, "event_type": None}
    if server:
        assoc.release()
    if status and status.Status == 0x0000:
        got.wait(20)
        out.update(report)
    if server:
        server.shutdown()
    else:
        assoc.release()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
