"""Never a partial Success: real node processes, pynetdicom and dcmtk clients.

Five nodes (N=3, W=2, R=2); every owner of one study is killed with SIGKILL. A C-FIND or
C-GET that cannot ask all of the archive must end with a failure or warning status that
says so, while a study with two live owners is still answered in full with Success, and
one with a single live owner is answered but flagged (R=2 owners could not vouch for it),
right after the kills (strict writes: no fault window flags a study whose R owners answer).
Then the strict write quorum: a C-STORE into a study with two of its three owners down is
refused (0xA701, never a false Success), one into a study with one owner down succeeds,
and once the killed owners are back, that study reads complete through the returned owner
and the refused store, sent again, succeeds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

from pacsnode.cli.status import collect, metrics
from pacsnode.sim import datagen
from pacsnode.sim.process import start_all, wait_until

from . import clients
from .clients import identifier
from .test_cluster import NAMES, expected_owners, start_cluster

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

FIVE = NAMES + ("n5",)


def _settled(nodes: list[Any]) -> bool:
    """Every node has filled the ranges it owns (a filling replica declines reads)."""
    try:
        return all(metrics(node.peer_address, prefix="pacsnode.repair.pending_ranges")
                   .get("pacsnode.repair.pending_ranges_count", 1) == 0 for node in nodes)
    except Exception:
        return False


def _members_alive(address: str) -> int:
    try:
        return sum(1 for n in collect(address, timeout_s=2)["nodes"] if n["state"] == "alive" and n["reachable"])
    except Exception:
        return 0


def _move_into_study(path: Path, study_uid: str) -> None:
    """Make a generated instance one more of study `study_uid` (same UID, own series)."""
    dataset = dcmread(path)
    dataset.StudyInstanceUID = study_uid
    dataset.save_as(path, enforce_file_format=True)


def _find_with_comment(port: int, query: Any) -> tuple[int, int, str]:
    """(matches, final status, ErrorComment) of a pynetdicom C-FIND."""
    ae = clients.scu_ae()
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE", evt_handlers=[(evt.EVT_CONN_OPEN, clients._nodelay)])
    assert assoc.is_established
    matches, final, comment = 0, -1, ""
    try:
        for status, _found in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if not status:
                break
            if status.Status in (0xFF00, 0xFF01):
                matches += 1
            else:
                final = int(status.Status)
                comment = str(status.get("ErrorComment", ""))
    finally:
        assoc.release()
    return matches, final, comment


def test_unreachable_owners_are_reported_never_success(tmp_path: Path) -> None:
    nodes = start_cluster(tmp_path, FIVE)
    try:
        entry = nodes[0]
        spec = datagen.StudySetSpec(patients=12, seed=91, rows=16, cols=16)
        manifest = datagen.write_study_set(spec, tmp_path / "data")
        owners = {e["study_uid"]: expected_owners(FIVE, e["study_uid"]) for e in manifest}
        # A study that lives only on three nodes other than the entry node: kill them all.
        lost_study = next(uid for uid, held in owners.items() if "n1" not in held)
        doomed = owners[lost_study]
        # With read_quorum 2, a study is answered in full only when two of its owners answer.
        reachable = [uid for uid, held in owners.items() if len(held - doomed) >= 2]
        one_left = [uid for uid, held in owners.items() if len(held - doomed) == 1]
        one_down = next((uid for uid in reachable[1:] if len(owners[uid] & doomed) == 1), "")
        assert reachable and one_left and one_down, "pick another seed"
        # One more instance of two studies, stored after the kills (strict write quorum).
        later = {uid: datagen.write_study_set(dataclasses.replace(spec, patients=1, seed=seed), tmp_path / uid)
                 for uid, seed in ((one_left[0], 92), (one_down, 93))}
        for uid, extra in later.items():
            _move_into_study(Path(extra[0]["path"]), uid)
        statuses = clients.send_files(entry.dicom_port, [Path(e["path"]) for e in manifest])
        assert set(statuses.values()) == {0}, statuses
        # Joined nodes finish filling their ranges first (a filling replica declines reads).
        assert wait_until(lambda: _settled(nodes), 90), "ranges still filling"
        by_name = {node.node_id: node for node in nodes}
        for name in doomed:
            by_name[name].kill()

        # C-FIND naming the lost study: failure, with how much could not be asked.
        matches, final, comment = _find_with_comment(
            entry.dicom_port, identifier("STUDY", StudyInstanceUID=lost_study))
        assert (matches, final) == (0, 0xC001), (matches, final, comment)
        assert comment.startswith("incomplete: 1 study")
        # A C-FIND naming a study with a live owner: complete, Success.
        matches, final, _comment = _find_with_comment(
            entry.dicom_port, identifier("STUDY", StudyInstanceUID=reachable[0]))
        assert (matches, final) == (1, 0x0000)
        # One owner left of three: its rows come back, but R=2 owners could not vouch for them.
        matches, final, comment = _find_with_comment(
            entry.dicom_port, identifier("STUDY", StudyInstanceUID=one_left[0]))
        assert (matches, final) == (1, 0xC001) and comment.startswith("incomplete: 1 study"), (matches, final)
        # A C-FIND with no study key scatters; the ranges none of whose owners is up are counted.
        matches, final, comment = _find_with_comment(entry.dicom_port, identifier("STUDY", StudyInstanceUID=""))
        assert final == 0xC001 and "range" in comment, (final, comment)
        assert matches >= len(reachable)
        # dcmtk's findscu sees the failure too.
        result, _responses = clients.findscu(entry.dicom_port, ["QueryRetrieveLevel=STUDY",
                                                                f"StudyInstanceUID={lost_study}"], tmp_path / "find",
                                           extra=["-v"])
        assert "Final Find Response (Failed: UnableToProcess)" in result.stdout + result.stderr

        # C-GET of the lost study: nothing could be sent, and it says so.
        contexts = [(e["sop_class_uid"], "1.2.840.10008.1.2.1") for e in manifest]
        got = clients.get(entry.dicom_port, identifier("STUDY", StudyInstanceUID=lost_study), contexts)
        assert got.final_status == 0xA702 and got.failed >= 1 and not got.received, got
        # C-GET of both studies at once: the reachable one arrives, the other is a failed sub-operation.
        both = "\\".join([lost_study, reachable[0]])
        got = clients.get(entry.dicom_port, identifier("STUDY", StudyInstanceUID=both), contexts)
        expected = {e["sop_uid"] for e in manifest if e["study_uid"] == reachable[0]}
        assert set(got.received) == expected
        assert got.final_status == 0xB000 and got.failed >= 1 and got.completed == len(expected), got
        # A reachable study alone: Success.
        got = clients.get(entry.dicom_port, identifier("STUDY", StudyInstanceUID=reachable[0]), contexts)
        assert got.final_status == 0x0000 and set(got.received) == expected
        log = entry.log_text()
        assert "dicom.find.incomplete" in log and "dicom.retrieve.incomplete" in log

        # Strict write quorum: two of the study's three owners down, a hint for each would
        # not count, so the store is refused; one owner down, the two others take it.
        refused = Path(later[one_left[0]][0]["path"])
        taken = Path(later[one_down][0]["path"])
        assert clients.send_files(entry.dicom_port, [refused]) == {str(refused): 0xA701}
        assert clients.send_files(entry.dicom_port, [taken]) == {str(taken): 0}
        start_all([by_name[name] for name in sorted(doomed)])
        assert wait_until(lambda: all(_members_alive(node.peer_address) == len(FIVE) for node in nodes), 60), \
            "the killed owners did not come back"
        # Through the owner that was down when it was stored (it asks itself first): complete.
        returned = by_name[next(iter(owners[one_down] & doomed))]
        study_sops = {e["sop_uid"] for e in manifest if e["study_uid"] == one_down} | {later[one_down][0]["sop_uid"]}
        contexts.append((later[one_down][0]["sop_class_uid"], "1.2.840.10008.1.2.1"))
        got = clients.get(returned.dicom_port, identifier("STUDY", StudyInstanceUID=one_down), contexts)
        assert got.final_status == 0x0000 and set(got.received) == study_sops, got
        # The modality retries the refused store: the owners are back, it succeeds.
        assert clients.send_files(entry.dicom_port, [refused]) == {str(refused): 0}
    finally:
        for node in nodes:
            node.stop()
