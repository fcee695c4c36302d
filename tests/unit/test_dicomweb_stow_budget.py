"""STOW-RS's node-wide memory budget (stow_bytes_max, node/dicomweb_stow_budget.py).

The HTTP tests run a real HttpServer on a free loopback port over a real Archive
(RocksStore) whose writes wait at a gate (a slow disk, as the simulator's faults have it):
the parts of several clients then pile up in the store path, and the bytes inside the
store's writes at once are what the budget must bound. Clients are httpx, in threads.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from pacsnode.node.dicomweb_stow_budget import (
    RECEIVE_SLACK_BYTES,
    BudgetWaitTimeout,
    StowBudget,
    part_bytes_max,
)
from pacsnode.node.http_server import HttpServer
from pacsnode.node.http_views import StoreHeaders
from pacsnode.node.metrics import Metrics
from pacsnode.node.store import RocksStore
from pacsnode.replication.archive import Archive, WriteResult
from pacsnode.replication.model import Instance
from pacsnode.sim.datagen import StudySetSpec, iter_part10

MIB = 1024**2
BUDGET_BYTES = 4 * MIB  # Parts up to 1 MiB (half, less the slack); the CT parts are ~525 KB.


# ---------------------------------------------------------------- the budget alone


def test_the_part_limit_is_half_the_budget_less_the_slack_when_smaller() -> None:
    assert part_bytes_max(4 * MIB, 4 * 1024**3) == 2 * MIB - RECEIVE_SLACK_BYTES
    assert part_bytes_max(2 * 1024**3, 4 * 1024**3) == 1024**3 - RECEIVE_SLACK_BYTES
    assert part_bytes_max(2 * 1024**3, 100_000) == 100_000


def test_the_leader_takes_what_is_free_and_followers_leave_it_its_part() -> None:
    async def run() -> None:
        budget = StowBudget(8 * MIB, 4 * 1024**3, wait_s=0.2)
        assert budget.part_bytes_max + RECEIVE_SLACK_BYTES == 4 * MIB  # The leader's reserve: half.
        leader, follower = budget.request(), budget.request()
        await leader.take(MIB)  # The first to receive is the leader.
        # A follower may hold what leaves the leader's remaining need free: 8 - 1 - 3 = 4 MiB.
        await follower.take(4 * MIB)
        with pytest.raises(BudgetWaitTimeout):
            await follower.take(1)
        # The leader's part completes (a part of 4 MiB handed to the store); the budget is full.
        await leader.take(3 * MIB)
        leader.settle(0, [4 * MIB])
        assert budget.statistics().used_bytes == 8 * MIB
        # Its write ends: the follower can take again, but only up to the followers' half.
        leader.stored(4 * MIB)
        with pytest.raises(BudgetWaitTimeout):
            await follower.take(1)  # The leader still receives: its need (4 MiB) stays free.
        leader.end_receiving()
        await follower.take(4 * MIB)  # Now the leader itself: anything free.
        assert budget.statistics().used_bytes == 8 * MIB
        assert budget.statistics().peak_bytes == 8 * MIB
        follower.settle(0, [])
        follower.end_receiving()
        assert budget.statistics().used_bytes == 0

    asyncio.run(run())


def test_a_waiting_request_is_woken_by_a_release() -> None:
    async def run() -> None:
        budget = StowBudget(4 * MIB, 4 * 1024**3, wait_s=5.0)
        first = budget.request()
        await first.take(4 * MIB)
        first.settle(0, [4 * MIB])  # One part of the whole budget, being stored.
        second = budget.request()
        taking = asyncio.ensure_future(second.take(MIB))
        await asyncio.sleep(0.05)
        assert not taking.done() and budget.statistics().waiting_requests == 1
        first.stored(4 * MIB)
        await asyncio.wait_for(taking, 1.0)
        assert budget.statistics().waits == 1 and budget.statistics().used_bytes == MIB

    asyncio.run(run())


def test_requests_with_half_received_parts_do_not_block_each_other() -> None:
    """Three requests each take slices of a part of the largest size in turn: without the
    leader's reserve they could fill the budget with three half parts and wait forever."""

    async def run() -> None:
        budget = StowBudget(8 * MIB, 4 * 1024**3, wait_s=2.0)
        part = budget.part_bytes_max
        slice_bytes = 256 * 1024

        async def send(delay: float) -> None:
            hold = budget.request()
            await asyncio.sleep(delay)
            taken = 0
            while taken < part:
                size = min(slice_bytes, part - taken)
                await hold.take(size)
                taken += size
                await asyncio.sleep(0)
            hold.settle(0, [part])
            await asyncio.sleep(0.01)  # Its write.
            hold.stored(part)
            hold.end_receiving()

        await asyncio.wait_for(asyncio.gather(send(0), send(0), send(0)), 10.0)  # Slices in turn.
        assert budget.statistics().used_bytes == 0
        assert budget.statistics().peak_bytes <= 8 * MIB

    asyncio.run(run())


# ---------------------------------------------------------------- through HTTP


class GatedArchive(Archive):
    """An Archive whose writes wait for `gate` (a store that has stalled): it counts the
    Part-10 bytes inside its writes at once, and the most it saw."""

    def __init__(self, store: RocksStore) -> None:
        super().__init__(store)
        self.gate = threading.Event()
        self._lock = threading.Lock()
        self.inside_bytes = 0
        self.inside_bytes_max = 0
        self.inside = 0

    def store(self, instance: Instance) -> WriteResult:
        with self._lock:
            self.inside_bytes += len(instance.part10)
            self.inside += 1
            self.inside_bytes_max = max(self.inside_bytes_max, self.inside_bytes)
        try:
            if not self.gate.wait(60):
                raise RuntimeError("the gate was not opened")
            return super().store(instance)
        finally:
            with self._lock:
                self.inside_bytes -= len(instance.part10)
                self.inside -= 1


class _Served:
    def __init__(self, server: HttpServer, archive: GatedArchive) -> None:
        self.server = server
        self.archive = archive
        self.url = f"http://127.0.0.1:{server.port}/dicom-web"

    def budget(self) -> object:
        return self.server.dicomweb._stow_budget.statistics()  # noqa: SLF001 (the node's own accounting)


@pytest.fixture
def served(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[_Served]:
    wait_s = getattr(request, "param", 30.0)
    store = RocksStore(tmp_path / "store", disk_free_bytes_min=0)
    archive = GatedArchive(store)
    server = HttpServer(host="127.0.0.1", port=0, archive=archive, metrics=Metrics(lambda: {}),
                        ready=lambda: {"ready": True}, instance_size_bytes_max=4 * 1024**3, qido_result_max=1000,
                        local_headers=StoreHeaders(store), stow_bytes_max=BUDGET_BYTES, stow_wait_s=wait_s)
    server.start()
    try:
        yield _Served(server, archive)
    finally:
        archive.gate.set()
        server.stop()
        store.close()


@pytest.fixture(scope="module")
def studies() -> list[list[bytes]]:
    """Three studies of 10 CT 512 x 512 (~525 KB each): one a client."""
    return [[data for _entry, data in iter_part10(StudySetSpec(
        patients=1, series_per_study=1, instances_per_series=10, seed=40 + index, rows=512, cols=512,
        modalities=("CT",)))] for index in range(3)]


def _stow_body(parts: list[bytes], boundary: str = "XyZ") -> tuple[bytes, dict[str, str]]:
    body = b"".join(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'}


def _post(url: str, parts: list[bytes]) -> httpx.Response:
    body, headers = _stow_body(parts)
    return httpx.post(url + "/studies", content=body, headers=headers, timeout=120)


def _wait_until(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_parts_of_several_clients_at_once_stay_within_the_budget(served: _Served,
                                                                 studies: list[list[bytes]]) -> None:
    """Three clients send 10 parts of ~525 KB each while the store is stalled: without the
    budget each request would have 8 parts (4.2 MB) inside the store's writes, 12.6 MB in all;
    with it, the bytes inside the writes and in the readers stay within the 4 MiB, the
    requests wait (reading no more of their bodies), and once the store moves, every part
    of every request is stored."""
    archive = served.archive
    with ThreadPoolExecutor(max_workers=3) as pool:
        replies = [pool.submit(_post, served.url, parts) for parts in studies]
        # Until the requests wait for budget, or the store holds more than the budget.
        assert _wait_until(lambda: served.budget().waiting_requests >= 2  # type: ignore[attr-defined]
                           or archive.inside_bytes > BUDGET_BYTES, 30)
        time.sleep(0.3)  # Had anything been let through, it would reach the store by now.
        assert archive.inside_bytes_max <= BUDGET_BYTES, archive.inside_bytes_max
        assert served.budget().used_bytes <= BUDGET_BYTES  # type: ignore[attr-defined]
        assert archive.inside >= 1
        archive.gate.set()
        answers = [reply.result(timeout=120) for reply in replies]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    for answer, parts in zip(answers, studies):
        assert len(answer.json()["00081199"]["Value"]) == len(parts)
    assert archive.inside_bytes_max <= BUDGET_BYTES
    stats = served.budget()
    assert stats.used_bytes == 0 and stats.receiving_requests == 0  # type: ignore[attr-defined]
    assert stats.peak_bytes <= BUDGET_BYTES and stats.waits >= 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("served", [0.5], indirect=True)
def test_a_request_that_waits_too_long_is_503_and_one_that_stored_some_is_202(
        served: _Served, studies: list[list[bytes]], caplog: pytest.LogCaptureFixture) -> None:
    """The store stalls: the first client fills the budget with parts that wait at the store
    and then waits itself; a second client gets none of the budget. After 0.5 s
    (stow_wait_s) the second is answered 503 with Retry-After while the store still
    stalls (it stored nothing); the first, once its parts are written, 202 with them listed
    and a Warning: the rest of its body was not read."""
    archive = served.archive
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_post, served.url, studies[0])
        assert _wait_until(lambda: archive.inside >= 1 and served.budget().waiting_requests == 1, 30)  # type: ignore[attr-defined]
        second = pool.submit(_post, served.url, studies[1])
        refused = second.result(timeout=30)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert "stow_bytes_max" in refused.headers["Warning"] and "nothing was stored" in refused.text
        assert not archive.gate.is_set()
        assert _wait_until(lambda: served.budget().timeouts >= 2, 30)  # type: ignore[attr-defined]
        archive.gate.set()
        partial = first.result(timeout=60)
    assert partial.status_code == 202
    listed = partial.json()["00081199"]["Value"]
    assert 1 <= len(listed) < len(studies[0])
    assert "the rest of the body was not read" in partial.headers["Warning"]
    assert served.budget().used_bytes == 0  # type: ignore[attr-defined]
    lines = [record.getMessage() for record in caplog.records if "budget_timeout" in record.getMessage()]
    assert lines and all("wanted_bytes=" in line for line in lines)
    # What /metrics says of it: both requests timed out, nothing is held now.
    scraped = httpx.get(served.url.removesuffix("/dicom-web") + "/metrics").text
    figures = dict(line.rsplit(" ", 1) for line in scraped.splitlines() if line.startswith("pacsnode_stow_"))
    assert float(figures["pacsnode_stow_budget_timeouts_total"]) == 2.0
    assert float(figures["pacsnode_stow_budget_waits_total"]) >= 2.0
    assert float(figures["pacsnode_stow_held_bytes"]) == 0.0
    assert float(figures["pacsnode_stow_limit_bytes"]) == BUDGET_BYTES
    assert float(figures["pacsnode_stow_waiting_requests"]) == 0.0


def test_a_long_preamble_is_not_kept() -> None:
    """What comes before the first delimiter is ignored (RFC 2046 5.1.1), so the reader does
    not keep it: 8 MB of it leave the reader holding a few bytes (its bytes were the
    request's share of the budget until dropped), and the part after it is read."""
    from pacsnode.node.dicomweb_media import MultipartReader, Part

    reader = MultipartReader("XyZ", part_bytes_max=1000)
    held = []
    for _ in range(128):
        assert reader.feed(b"p" * 65536) == []
        held.append(reader.buffered_bytes)
    assert max(held) < 64, max(held)
    parts = reader.feed(b"\r\n--XyZ\r\nContent-Type: application/dicom\r\n\r\nbody\r\n--XyZ--\r\n")
    assert [part.body for part in parts if isinstance(part, Part)] == [b"body"]
