"""WADO-RS /frames through a node that does not hold the instance (Data.FetchFrames):
real node processes on 127.0.0.1, N=1, each multi-frame instance on one owner only. The
entry node answers with the owner's own bytes, and what crossed between the nodes is the
frames' size, not the instance's (the owner's pacsnode.peer.*_sent_bytes counters). A
node from before FetchFrames (the tree of the commit before it, run as it is) still
answers, through FetchInstance."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import grpc
import httpx
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacsnode.node.dicomweb_media import MultipartReader, multipart_boundary
from pacsnode.proto import PROTOCOL_VERSION
from pacsnode.proto import pacsnode_pb2 as pb
from pacsnode.proto import pacsnode_pb2_grpc as pb_grpc
from pacsnode.ring.placement import Member, Ring
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, start_all, wait_until

from . import clients
from .test_cluster import FAST, _member_count, expected_owners, local_sop_uids

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")

FRAMES = 12
ROWS = COLUMNS = 512
FRAME_BYTES = ROWS * COLUMNS * 2
ONE_COPY = ["--replication-factor", "1", "--write-quorum", "1"]
REPO = Path(__file__).resolve().parents[2]


def _write_instance(path: Path, study_uid: str, frames: int = FRAMES) -> Dataset:
    """A `frames`-frame 512 x 512 16-bit instance of study `study_uid` (noise over a ramp)."""
    return datagen.write_ramp_multiframe(path, study_uid=study_uid, frames=frames, rows=ROWS, cols=COLUMNS,
                                         seed=3401, patient_id="PEERFRAMES")


def _study_owned_by(names: tuple[str, ...], owner: str) -> str:
    while True:
        uid = generate_uid()
        if expected_owners(names, uid, n=1) == {owner}:
            return uid


def _metrics(node: NodeProcess) -> dict[str, float]:
    envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")
    with grpc.insecure_channel(node.peer_address) as channel:
        reply = pb_grpc.AdminStub(channel).Metrics(pb.MetricsRequest(envelope=envelope, name_prefix="pacsnode."),
                                                  timeout=10)
    return dict(reply.values)


def _frames(node: NodeProcess, ds: Dataset, frame_list: str) -> tuple[int, list[bytes], str]:
    url = (f"http://127.0.0.1:{node.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
           f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/{frame_list}")
    reply = httpx.get(url, timeout=120)
    if reply.status_code != 200:
        return reply.status_code, [], reply.text
    _type, boundary = multipart_boundary(reply.headers["content-type"])
    reader = MultipartReader(boundary, part_bytes_max=FRAMES * FRAME_BYTES + 1)
    parts = reader.feed(reply.content)
    reader.close()
    return 200, [part.body for part in parts], ""


def _start(root: Path, nodes: list[NodeProcess]) -> list[NodeProcess]:
    start_all(nodes)
    addresses = [n.peer_address for n in nodes]
    if not wait_until(lambda: all(_member_count(a) == len(nodes) for a in addresses), 30):
        for node in nodes:
            node.stop(timeout_s=15)
        raise AssertionError("membership did not converge")
    return nodes


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    root = tmp_path_factory.mktemp("frames-peer")
    names = ("f1", "f2")
    first = NodeProcess(root / "f1", node_id="f1", extra_args=FAST + ONE_COPY)
    second = NodeProcess(root / "f2", node_id="f2", seeds=[first.peer_address], extra_args=FAST + ONE_COPY)
    nodes = _start(root, [first, second])
    assert tuple(n.node_id for n in nodes) == names
    try:
        yield nodes
    finally:
        for node in nodes:
            node.stop(timeout_s=15)


def test_frames_of_an_instance_on_a_peer_move_only_the_frames(pair: list[NodeProcess], tmp_path: Path) -> None:
    entry, owner = pair
    ds = _write_instance(tmp_path / "multi.dcm", _study_owned_by(("f1", "f2"), "f2"))
    size = (tmp_path / "multi.dcm").stat().st_size
    result, acked = clients.storescu(entry.dicom_port, [str(tmp_path / "multi.dcm")])
    assert len(acked) == 1, result.stdout + result.stderr
    assert ds.SOPInstanceUID in local_sop_uids(owner.peer_address, ds.StudyInstanceUID)
    assert not local_sop_uids(entry.peer_address, ds.StudyInstanceUID)  # Only on the peer.
    pixels = ds.PixelData

    def frame(number: int) -> bytes:
        return pixels[(number - 1) * FRAME_BYTES:number * FRAME_BYTES]

    before = _metrics(owner)
    status, parts, text = _frames(entry, ds, "1,3")
    after = _metrics(owner)
    assert status == 200, text
    assert parts == [frame(1), frame(3)]
    own_status, own_parts, _text = _frames(owner, ds, "1,3")
    assert own_status == 200 and own_parts == parts  # The owner's own answer, byte for byte.
    frames_sent = after["pacsnode.peer.frames_sent_bytes"] - before["pacsnode.peer.frames_sent_bytes"]
    fetch_sent = after["pacsnode.peer.fetch_sent_bytes"] - before["pacsnode.peer.fetch_sent_bytes"]
    # Exactly the two frames' bytes crossed, and no whole instance (12 frames, ~6.3 MB).
    assert frames_sent == 2 * FRAME_BYTES, (frames_sent, size)
    assert fetch_sent == 0
    assert frames_sent < size / 5

    # A list that goes back, and a repeat: in the order asked, each time asked.
    status, parts, text = _frames(entry, ds, f"{FRAMES},2,2")
    assert status == 200, text
    assert parts == [frame(FRAMES), frame(2), frame(2)]

    # The single-node path's errors, from the owner, through the entry node.
    for frame_list, expected in ((str(FRAMES + 1), 404), (",".join(["2", "1"] * 17), 400)):
        own = _frames(owner, ds, frame_list)
        through = _frames(entry, ds, frame_list)
        assert own[0] == through[0] == expected, (frame_list, own[0], own[2], through[0], through[2])
    entry_figures = _metrics(entry)
    assert entry_figures.get("pacsnode.replication.frames_reads_count", 0) >= 2
    assert entry_figures.get("pacsnode.replication.frames_unsupported_count", 0) == 0


def test_frames_of_a_small_instance_on_a_peer(pair: list[NodeProcess], tmp_path: Path) -> None:
    """An instance under frame_stream's streaming size (a RocksDB value or a small blob
    file on the owner): cut there from its whole copy; still only the frames travel."""
    entry, owner = pair
    ds = _write_instance(tmp_path / "small.dcm", _study_owned_by(("f1", "f2"), "f2"), frames=3)
    result, acked = clients.storescu(entry.dicom_port, [str(tmp_path / "small.dcm")])
    assert len(acked) == 1, result.stdout + result.stderr
    before = _metrics(owner)
    status, parts, text = _frames(entry, ds, "3,1")
    after = _metrics(owner)
    assert status == 200, text
    assert parts == [ds.PixelData[2 * FRAME_BYTES:], ds.PixelData[:FRAME_BYTES]]
    assert after["pacsnode.peer.frames_sent_bytes"] - before["pacsnode.peer.frames_sent_bytes"] == 2 * FRAME_BYTES
    assert after["pacsnode.peer.fetch_sent_bytes"] == before["pacsnode.peer.fetch_sent_bytes"]


def _tree_before_fetch_frames(target: Path) -> Path | None:
    """The project as it was before FetchFrames, unpacked under `target`/pacsnode (a regular
    package first on PYTHONPATH: the older modules, generated protocol code included, are
    what the node process imports). None outside a git checkout."""
    git = shutil.which("git")
    if git is None or not (REPO / ".git").exists():
        return None
    def run(*args: str) -> str:
        return subprocess.run([git, "-C", str(REPO), *args], check=True, capture_output=True, text=True).stdout.strip()
    try:
        introduced = run("log", "-1", "--format=%H", "-S", "rpc FetchFrames", "--", "proto/pacsnode.proto")
        old = f"{introduced}^" if introduced else "HEAD"  # Not committed yet: HEAD is the older tree.
        package = target / "pacsnode"
        package.mkdir(parents=True)
        archive = subprocess.run([git, "-C", str(REPO), "archive", old], check=True, capture_output=True).stdout
    except subprocess.CalledProcessError:
        return None
    subprocess.run(["tar", "-x", "-C", str(package)], input=archive, check=True)
    (package / "__init__.py").write_text("")
    if "FetchFrames" in (package / "proto" / "pacsnode_pb2_grpc.py").read_text():
        return None
    return target


class OlderNode(NodeProcess):
    """A node process running the older tree (PYTHONPATH first)."""

    def __init__(self, *args: object, tree: Path, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.tree = tree

    def launch(self) -> "OlderNode":
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(self.tree), os.environ.get("PYTHONPATH")])))
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        return self


def test_an_older_owner_answers_through_fetch_instance(tmp_path: Path) -> None:
    tree = _tree_before_fetch_frames(tmp_path / "older")
    if tree is None:
        pytest.skip("no git checkout with the tree from before FetchFrames")
    first = NodeProcess(tmp_path / "g1", node_id="g1", extra_args=FAST + ONE_COPY)
    older = OlderNode(tmp_path / "g2", node_id="g2", seeds=[first.peer_address], extra_args=FAST + ONE_COPY,
                      tree=tree)
    nodes = _start(tmp_path, [first, older])
    try:
        with grpc.insecure_channel(older.peer_address) as channel:  # It is the older code indeed.
            envelope = pb.Envelope(cluster_id="pacsnode", protocol_version=PROTOCOL_VERSION, sender_id="test")
            with pytest.raises(grpc.RpcError) as refused:
                list(pb_grpc.DataStub(channel).FetchFrames(pb.FetchFramesRequest(
                    envelope=envelope, study_instance_uid="1.2.3", sop_instance_uid="1.2.3.4", frame_numbers=[1]),
                    timeout=10))
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        ds = _write_instance(tmp_path / "multi.dcm", _study_owned_by(("g1", "g2"), "g2"))
        result, acked = clients.storescu(first.dicom_port, [str(tmp_path / "multi.dcm")])
        assert len(acked) == 1, result.stdout + result.stderr
        assert not local_sop_uids(first.peer_address, ds.StudyInstanceUID)
        status, parts, text = _frames(first, ds, "1,3")
        assert status == 200, text
        assert parts == [ds.PixelData[:FRAME_BYTES], ds.PixelData[2 * FRAME_BYTES:3 * FRAME_BYTES]]
        figures = _metrics(first)
        assert figures.get("pacsnode.replication.frames_unsupported_count", 0) == 1
        assert figures.get("pacsnode.replication.frames_reads_count", 0) == 0
        assert figures.get("pacsnode.replication.fetch_peers_count", 0) >= 1  # Read whole, from the older node.
        status, parts, text = _frames(first, ds, "2")  # Remembered: straight to FetchInstance.
        assert status == 200 and parts == [ds.PixelData[FRAME_BYTES:2 * FRAME_BYTES]], text
        assert _metrics(first).get("pacsnode.replication.frames_unsupported_count", 0) == 2
    finally:
        for node in nodes:
            node.stop(timeout_s=15)


def test_the_next_owner_answers_when_the_first_is_gone(tmp_path: Path) -> None:
    """N=2 of three nodes: the entry node holds no copy; the first owner in its read order
    is killed (membership has not noticed yet): the frames come from the second owner."""
    names = ("h1", "h2", "h3")
    two_copies = ["--replication-factor", "2", "--write-quorum", "2"]
    nodes: list[NodeProcess] = []
    for name in names:
        seeds = [nodes[0].peer_address] if nodes else []
        nodes.append(NodeProcess(tmp_path / name, node_id=name, seeds=seeds, extra_args=FAST + two_copies))
    _start(tmp_path, nodes)
    try:
        entry = nodes[0]
        while True:
            study = generate_uid()
            if "h1" not in expected_owners(names, study, n=2):
                break
        ring = Ring("pacsnode", [Member(node_id=name, host=socket.gethostname()) for name in names])
        first_id, second_id = ring.owners_of_study(study, 2)
        first = next(n for n in nodes if n.node_id == first_id)
        second = next(n for n in nodes if n.node_id == second_id)
        ds = _write_instance(tmp_path / "multi.dcm", study)
        result, acked = clients.storescu(entry.dicom_port, [str(tmp_path / "multi.dcm")])
        assert len(acked) == 1, result.stdout + result.stderr
        assert ds.SOPInstanceUID in local_sop_uids(second.peer_address, study)
        before = _metrics(second)
        first.kill()
        status, parts, text = _frames(entry, ds, "2,5")
        assert status == 200, text
        assert parts == [ds.PixelData[FRAME_BYTES:2 * FRAME_BYTES], ds.PixelData[4 * FRAME_BYTES:5 * FRAME_BYTES]]
        after = _metrics(second)
        assert after["pacsnode.peer.frames_sent_bytes"] - before["pacsnode.peer.frames_sent_bytes"] == 2 * FRAME_BYTES
        assert after["pacsnode.peer.fetch_sent_bytes"] == before["pacsnode.peer.fetch_sent_bytes"]
    finally:
        for node in nodes:
            node.stop(timeout_s=15)


def test_a_client_that_goes_away_stops_the_peer_call(pair: list[NodeProcess], tmp_path: Path) -> None:
    """Every frame of an 80 MiB instance asked through the entry node, the client gone after
    the first MiB: the owner stops sending (the entry node pulls a piece only as the body
    is sent, and closing the body cancels the FetchFrames call), and both nodes answer on."""
    entry, owner = pair
    frames, rows = 40, 1024
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    ds.SOPInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyInstanceUID = _study_owned_by(("f1", "f2"), "f2")
    ds.PatientID, ds.Modality = "PEERFRAMES", "OT"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(3403).integers(0, 4096, frames * rows * rows, dtype=np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    total = len(ds.PixelData)
    del ds.PixelData
    result, acked = clients.storescu(entry.dicom_port, [str(tmp_path / "big.dcm")])
    assert len(acked) == 1, result.stdout + result.stderr
    url = (f"http://127.0.0.1:{entry.http_port}/dicom-web/studies/{ds.StudyInstanceUID}"
           f"/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}/frames/"
           + ",".join(str(n) for n in range(1, frames + 1)))
    before = _metrics(owner)["pacsnode.peer.frames_sent_bytes"]
    with httpx.stream("GET", url, timeout=60) as reply:
        assert reply.status_code == 200
        received = 0
        for chunk in reply.iter_raw():
            received += len(chunk)
            if received >= 1 << 20:
                break
    sent: list[float] = []

    def settled() -> bool:
        sent.append(_metrics(owner)["pacsnode.peer.frames_sent_bytes"] - before)
        return len(sent) >= 3 and sent[-1] == sent[-3]

    assert wait_until(settled, 20, interval_s=0.3)
    assert sent[-1] < total / 2, (sent[-1], total)  # 5 MiB of 80 when written.

    def blob_files_open() -> list[str]:  # The owner's call ended: its blob file is closed.
        assert owner.process is not None
        links = []
        for fd in Path(f"/proc/{owner.process.pid}/fd").iterdir():
            try:
                links.append(os.readlink(fd))
            except OSError:
                continue
        return [link for link in links if link.startswith(str(owner.data_dir)) and link.endswith(".zst")]

    assert wait_until(lambda: not blob_files_open(), 10), blob_files_open()
    status, parts, text = _frames(entry, ds, "1")  # The nodes answer on.
    assert status == 200 and len(parts) == 1 and len(parts[0]) == rows * rows * 2, text
