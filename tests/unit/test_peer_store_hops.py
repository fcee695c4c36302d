"""A peer's copy is checked and written in one thread hop (node/peer_handler.py).

Each hop to a store thread costs a thread wake-up and a wait for the GIL on the path of
every acknowledged cluster write (bench/write_trace.py measured ~0.4 ms p50 for the
check's own hop), so the CRC-32 check and the durable write share one.
"""

from __future__ import annotations

import asyncio
import zlib
from pathlib import Path
from typing import Any, Callable

import pytest

from pacsnode.node.codec import to_stored
from pacsnode.node.peer_handler import PeerHandler
from pacsnode.node.store import RocksStore
from pacsnode.replication.model import Instance, StoredInstance, StoreOutcome
from pacsnode.replication.transport import PeerRefused, RefusalReason
from pacsnode.ring.placement import Ring
from pacsnode.sim.datagen import StudySetSpec, iter_part10

SPEC = StudySetSpec(patients=1, studies_per_patient=1, series_per_study=1, instances_per_series=1, rows=64, cols=64,
                    seed=11)


class _Membership:
    def ring(self) -> Ring:
        return Ring("test", [])


class _Pending:
    def is_pending(self, ranges: Any) -> bool:
        return False


class _Hops:
    """run_blocking / run_write that run the function at once (as the simulator's do) and count the calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def runner(self, kind: str) -> Callable[..., Any]:
        async def run(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            self.calls.append(kind)
            return function(*args, **kwargs)
        return run


def _handler(store: RocksStore, hops: _Hops) -> PeerHandler:
    return PeerHandler("n1", store, _Membership(), _Pending(), replication_factor=3,
                       run_blocking=hops.runner("blocking"), run_write=hops.runner("write"))


@pytest.fixture
def stored(make_instance: Callable[[bytes], Instance]) -> StoredInstance:
    (_entry, part10), = list(iter_part10(SPEC))
    return to_stored(make_instance(part10))


def test_a_copy_is_checked_and_written_in_one_hop(open_store: Callable[..., RocksStore], stored: StoredInstance,
                                                  tmp_path: Path) -> None:
    store = open_store()
    hops = _Hops()
    outcome = asyncio.run(_handler(store, hops).store_instance(stored, hint_for="", sender_id="n2",
                                                               sender_ring_version=0,
                                                               crc32=zlib.crc32(stored.blob)))
    assert outcome == StoreOutcome.STORED
    assert hops.calls == ["write"]
    assert store.read_stored(stored.study_instance_uid, stored.sop_instance_uid) is not None


def test_a_copy_failing_its_check_is_refused_in_that_hop_and_not_written(open_store: Callable[..., RocksStore],
                                                                         stored: StoredInstance) -> None:
    store = open_store()
    hops = _Hops()
    with pytest.raises(PeerRefused) as refused:
        asyncio.run(_handler(store, hops).store_instance(stored, hint_for="", sender_id="n2", sender_ring_version=0,
                                                         crc32=zlib.crc32(stored.blob) ^ 1))
    assert refused.value.reason is RefusalReason.INVALID
    assert hops.calls == ["write"]
    assert store.read_stored(stored.study_instance_uid, stored.sop_instance_uid) is None
