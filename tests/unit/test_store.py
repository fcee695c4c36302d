"""RocksStore: durable round trip, duplicates, first-writer-wins conflicts, corruption, limits.

Ends with a hypothesis state machine comparing the store with a dict model across
puts of the same and of different bytes, reads and reopen.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from pacsnode.node.store import PREFIX_BLOB, SEP, RocksStore, study_prefix
from pacsnode.replication.model import CorruptBlob, Instance, StoreError, StoreFull, StoreOutcome
from pacsnode.sim.datagen import StudySetSpec, iter_part10

MakeInstance = Callable[[bytes], Instance]
OpenStore = Callable[..., RocksStore]

# Same seed, other image size: the same UIDs with other bytes (a conflicting copy).
SPEC_A = StudySetSpec(patients=2, studies_per_patient=1, series_per_study=2, instances_per_series=2, rows=4, cols=4,
                      seed=7, latin1_fraction=0.5)
SPEC_B = StudySetSpec(**{**SPEC_A.__dict__, "rows": 6})


@pytest.fixture(scope="module")
def versions(make_instance: MakeInstance) -> tuple[list[Instance], list[Instance]]:
    """Two copies of every instance: same SOP Instance UIDs, different bytes."""
    a = [make_instance(part10) for _entry, part10 in iter_part10(SPEC_A)]
    b = [make_instance(part10) for _entry, part10 in iter_part10(SPEC_B)]
    assert [x.sop_instance_uid for x in a] == [y.sop_instance_uid for y in b]
    assert all(x.content_hash != y.content_hash for x, y in zip(a, b))
    return a, b


def _dump(store: RocksStore) -> dict[bytes, bytes]:
    """Every key and value in the store (to prove that nothing was written)."""
    return dict(store._db.items())


def _blob_key(instance: Instance) -> bytes:
    return PREFIX_BLOB + study_prefix(instance.study_instance_uid) + SEP + instance.sop_instance_uid.encode()


# -- round trip ------------------------------------------------------------------------


def test_round_trip_of_bytes_records_and_counters(open_store: OpenStore, versions: Any) -> None:
    instances, _ = versions
    store = open_store()
    for instance in instances:
        assert store.put_instance(instance, now_ms=1234) == StoreOutcome.STORED
    for instance in instances:
        assert store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
        record = store.instance_record(instance.study_instance_uid, instance.sop_instance_uid)
        assert record is not None
        assert (record.series_instance_uid, record.sop_class_uid, record.transfer_syntax_uid) == (
            instance.series_instance_uid,
            instance.sop_class_uid,
            instance.transfer_syntax_uid,
        )
        assert record.content_hash == instance.content_hash
        assert record.dataset_offset == instance.dataset_offset
        assert record.size_bytes == instance.size_bytes
        assert record.stored_at_ms == 1234
    stats = store.statistics()
    assert stats.instances == len(instances) == 8
    assert stats.studies == 2
    assert stats.conflicts == 0
    assert stats.bytes_received == sum(i.size_bytes for i in instances)
    assert 0 < stats.bytes_stored
    studies = {s.study_instance_uid: s for s in store.studies()}
    assert set(studies) == {i.study_instance_uid for i in instances}
    for study in studies.values():
        assert study.series_count == 2 and study.instance_count == 4
        assert len(list(store.series(study.study_instance_uid))) == 2
        assert len(list(store.instances(study.study_instance_uid))) == 4
        assert all(series.instance_count == 2 for series in store.series(study.study_instance_uid))
    assert len(list(store.all_instances())) == 8
    assert len(list(store.all_series())) == 4


def test_unknown_instance_is_a_key_error(open_store: OpenStore, versions: Any) -> None:
    store = open_store()
    instance = versions[0][0]
    assert store.instance_record(instance.study_instance_uid, instance.sop_instance_uid) is None
    assert store.study(instance.study_instance_uid) is None
    with pytest.raises(KeyError):
        store.read_part10(instance.study_instance_uid, instance.sop_instance_uid)


def test_duplicate_writes_nothing(open_store: OpenStore, versions: Any, make_instance: MakeInstance) -> None:
    store = open_store()
    instance = versions[0][0]
    assert store.put_instance(instance) == StoreOutcome.STORED
    before, stats = _dump(store), store.statistics()
    assert store.put_instance(instance) == StoreOutcome.DUPLICATE
    # The same bytes received again (a new Instance object) are a duplicate too.
    assert store.put_instance(make_instance(bytes(instance.part10))) == StoreOutcome.DUPLICATE
    assert _dump(store) == before
    assert store.statistics() == stats
    assert store.conflicts(instance.study_instance_uid, instance.sop_instance_uid) == []


def test_conflict_keeps_the_first_and_sets_the_other_aside(open_store: OpenStore, versions: Any) -> None:
    store = open_store()
    first, second = versions[0][0], versions[1][0]
    assert store.put_instance(first, now_ms=1) == StoreOutcome.STORED
    record_before = store.instance_record(first.study_instance_uid, first.sop_instance_uid)
    study_before = store.study(first.study_instance_uid)
    assert store.put_instance(second, now_ms=2) == StoreOutcome.CONFLICT
    assert store.read_part10(first.study_instance_uid, first.sop_instance_uid) == first.part10
    assert store.instance_record(first.study_instance_uid, first.sop_instance_uid) == record_before
    assert store.study(first.study_instance_uid) == study_before
    assert store.conflicts(first.study_instance_uid, first.sop_instance_uid) == [second.part10]
    assert store.statistics().conflicts == 1 and store.statistics().instances == 1
    # The same conflicting copy again is kept once.
    assert store.put_instance(second, now_ms=3) == StoreOutcome.CONFLICT
    assert store.statistics().conflicts == 1
    assert store.conflicts(first.study_instance_uid, first.sop_instance_uid) == [second.part10]
    # The first copy again is still a plain duplicate.
    assert store.put_instance(first) == StoreOutcome.DUPLICATE


# -- corruption ------------------------------------------------------------------------


def _flip_middle(blob: bytes) -> bytes:
    middle = len(blob) // 2
    return blob[:middle] + bytes([blob[middle] ^ 0xFF]) + blob[middle + 1 :]


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(_flip_middle, id="flipped-byte-in-data"),
        pytest.param(lambda blob: blob[:-1] + bytes([blob[-1] ^ 0x01]), id="flipped-checksum-bit"),
        pytest.param(lambda blob: blob[:-10], id="truncated"),
        pytest.param(lambda blob: b"not a zstd frame", id="garbage"),
        pytest.param(lambda blob: b"", id="empty"),
    ],
)
def test_corrupt_blob_is_detected_on_read(open_store: OpenStore, versions: Any, corrupt: Callable[[bytes], bytes]) -> None:
    store = open_store()
    victim, bystander = versions[0][0], versions[0][1]
    store.put_instance(victim)
    store.put_instance(bystander)
    key = _blob_key(victim)
    store._db.put(key, corrupt(store._db.get(key)))
    with pytest.raises(CorruptBlob, match=victim.sop_instance_uid):
        store.read_part10(victim.study_instance_uid, victim.sop_instance_uid)
    assert store.read_part10(bystander.study_instance_uid, bystander.sop_instance_uid) == bystander.part10


def test_corruption_survives_reopen_and_is_still_detected(open_store: OpenStore, versions: Any) -> None:
    store = open_store()
    victim = versions[0][0]
    store.put_instance(victim)
    store._db.put(_blob_key(victim), _flip_middle(store._db.get(_blob_key(victim))))
    store.close()
    reopened = open_store()
    with pytest.raises(CorruptBlob):
        reopened.read_part10(victim.study_instance_uid, victim.sop_instance_uid)


# -- limits ----------------------------------------------------------------------------


def test_store_full_below_disk_free_bytes_min_writes_nothing(open_store: OpenStore, versions: Any, tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    store = open_store(disk_free_bytes_min=free + (1 << 40))
    before = _dump(store)
    with pytest.raises(StoreFull, match="disk_free_bytes_min"):
        store.put_instance(versions[0][0])
    assert _dump(store) == before
    assert store.statistics().instances == 0


def test_store_full_over_instance_size_bytes_max_writes_nothing(open_store: OpenStore, versions: Any) -> None:
    instance = versions[0][0]
    store = open_store(instance_size_bytes_max=len(instance.part10) - 1)
    before = _dump(store)
    with pytest.raises(StoreFull, match="instance_size_bytes_max"):
        store.put_instance(instance)
    assert _dump(store) == before
    exact = open_store("exact", instance_size_bytes_max=len(instance.part10))
    assert exact.put_instance(instance) == StoreOutcome.STORED


def test_retry_of_a_stored_instance_succeeds_when_the_disk_is_full(open_store: OpenStore, versions: Any) -> None:
    """An SCU that lost our Success retries: identical bytes already present are Success (STYLE 5)."""
    stored, conflicting = versions[0][0], versions[1][0]
    store = open_store("store")
    store.put_instance(stored)
    store.close()
    full = open_store("store", disk_free_bytes_min=1 << 62)
    assert full.put_instance(stored) == StoreOutcome.DUPLICATE
    with pytest.raises(StoreFull):
        full.put_instance(conflicting)  # Keeping the other copy needs space.
    with pytest.raises(StoreFull):
        full.put_instance(versions[0][1])
    assert full.statistics().conflicts == 0 and full.statistics().instances == 1


def test_closed_store_refuses_writes(open_store: OpenStore, versions: Any) -> None:
    store = open_store()
    store.close()
    store.close()  # Idempotent.
    with pytest.raises(StoreError, match="closed"):
        store.put_instance(versions[0][0])


# -- reopen and the secondary index -----------------------------------------------------


def test_reopen_keeps_everything(open_store: OpenStore, versions: Any) -> None:
    first, second = versions
    store = open_store()
    for instance in first:
        store.put_instance(instance, now_ms=5)
    store.put_instance(second[0], now_ms=6)
    dump, stats = _dump(store), store.statistics()
    store.close()
    reopened = open_store()
    assert _dump(reopened) == dump
    assert reopened.statistics() == stats
    for instance in first:
        assert reopened.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == instance.part10
        assert reopened.put_instance(instance) == StoreOutcome.DUPLICATE
    assert reopened.conflicts(second[0].study_instance_uid, second[0].sop_instance_uid) == [second[0].part10]
    assert reopened.put_instance(second[1], now_ms=7) == StoreOutcome.CONFLICT
    assert reopened.statistics().conflicts == 2


def test_studies_by_index(open_store: OpenStore, versions: Any) -> None:
    store = open_store()
    for instance in versions[0]:
        store.put_instance(instance)
    by_study = {i.study_instance_uid: i.attributes for i in versions[0]}
    for study_uid, attributes in by_study.items():
        name, patient_id, date = str(attributes["PatientName"]), str(attributes["PatientID"]), str(attributes["StudyDate"])
        assert list(store.studies_by_index("PatientID", patient_id, patient_id)) == [study_uid]
        assert study_uid in store.studies_by_index("PatientID", patient_id[:4], None)
        assert list(store.studies_by_index("PatientName", name.lower(), name.lower())) == [study_uid]
        assert study_uid in store.studies_by_index("PatientName", name[:2].lower(), None)
        assert study_uid in store.studies_by_index("StudyDate", date, date)
        assert study_uid in store.studies_by_index("StudyDate", "0", "99999999")
        assert list(store.studies_by_index("PatientID", patient_id + "0", patient_id + "0")) == []
        # A value that is a prefix of the stored one is not an exact hit.
        assert list(store.studies_by_index("PatientID", patient_id[:-1], patient_id[:-1])) == []
    assert sorted(store.studies_by_index("StudyDate", "0", "99999999")) == sorted(by_study)


# -- state machine: RocksStore vs a dict ------------------------------------------------


class StoreMachine(RuleBasedStateMachine):
    """Puts (new, duplicate, conflicting), reads and reopen, checked against a dict model."""

    pool: tuple[list[Instance], list[Instance]] = ([], [])

    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="pacsnode-store-machine-"))
        self.store = RocksStore(self.directory, disk_free_bytes_min=0)
        self.kept: dict[str, Instance] = {}  # sop uid -> the first copy stored
        self.set_aside: dict[str, set[bytes]] = {}  # sop uid -> conflicting copies
        # Ingest times strictly increase, so the first copy to arrive has the lowest version
        # (the store's rule; with wall-clock times two puts in one millisecond would tie and
        # the content hash would decide, which a first-arrival model cannot predict).
        self.clock_ms = 1_000

    @rule(index=st.integers(0, 7), version=st.integers(0, 1))
    def put(self, index: int, version: int) -> None:
        instance = self.pool[version][index]
        self.clock_ms += 1
        outcome = self.store.put_instance(instance, now_ms=self.clock_ms)
        uid = instance.sop_instance_uid
        kept = self.kept.get(uid)
        if kept is None:
            assert outcome == StoreOutcome.STORED
            self.kept[uid] = instance
        elif kept.content_hash == instance.content_hash:
            assert outcome == StoreOutcome.DUPLICATE
        else:
            assert outcome == StoreOutcome.CONFLICT
            self.set_aside.setdefault(uid, set()).add(instance.part10)

    @rule(index=st.integers(0, 7))
    def read(self, index: int) -> None:
        instance = self.pool[0][index]
        kept = self.kept.get(instance.sop_instance_uid)
        if kept is None:
            with pytest.raises(KeyError):
                self.store.read_part10(instance.study_instance_uid, instance.sop_instance_uid)
        else:
            assert self.store.read_part10(instance.study_instance_uid, instance.sop_instance_uid) == kept.part10
            conflicts = self.store.conflicts(instance.study_instance_uid, instance.sop_instance_uid)
            assert sorted(conflicts) == sorted(self.set_aside.get(instance.sop_instance_uid, set()))

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = RocksStore(self.directory, disk_free_bytes_min=0)

    @invariant()
    def counters_match_the_model(self) -> None:
        stats = self.store.statistics()
        assert stats.instances == len(self.kept)
        assert stats.studies == len({i.study_instance_uid for i in self.kept.values()})
        assert stats.conflicts == sum(len(copies) for copies in self.set_aside.values())
        assert stats.bytes_received == sum(i.size_bytes for i in self.kept.values())

    @invariant()
    def study_records_match_the_model(self) -> None:
        for study in self.store.studies():
            members = [i for i in self.kept.values() if i.study_instance_uid == study.study_instance_uid]
            assert study.instance_count == len(members)
            assert study.series_count == len({i.series_instance_uid for i in members})

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def test_store_behaves_like_a_dict(versions: Any) -> None:
    StoreMachine.pool = versions
    run_state_machine_as_test(
        StoreMachine,
        settings=settings(
            max_examples=30,
            stateful_step_count=25,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


def test_the_copy_with_the_lowest_version_wins_in_either_arrival_order(open_store: OpenStore, versions: Any) -> None:
    """One rule on every replica: whichever order two copies arrive in, the one ingested
    first (lowest version) is the instance and the other is the conflict record."""
    early, late = versions[0][0], versions[1][0]
    in_order = open_store("in-order")
    in_order.put_instance(early, now_ms=10)
    in_order.put_instance(late, now_ms=20)
    reversed_order = open_store("reversed")
    reversed_order.put_instance(late, now_ms=20)
    assert reversed_order.put_instance(early, now_ms=10) == StoreOutcome.CONFLICT
    for store in (in_order, reversed_order):
        assert store.read_part10(early.study_instance_uid, early.sop_instance_uid) == early.part10
        assert store.conflicts(early.study_instance_uid, early.sop_instance_uid) == [late.part10]
        assert store.statistics().instances == 1 and store.statistics().conflicts == 1
        assert store.statistics().bytes_received == early.size_bytes
    full = [(0, (1 << 64) - 1)]
    assert in_order.segment_digests(full) == reversed_order.segment_digests(full)


def test_delete_instances_removes_exactly_the_entries_still_identical(open_store: OpenStore, versions: Any) -> None:
    """The drop rule's delete: only listed (study, sop, content hash) entries that are still
    held with that content; digests, records, index and counters follow in the same batch."""
    from pacsnode.replication.digest import Digest, entry_hash
    from pacsnode.ring.tokens import TOKEN_SPACE

    instances, others = versions
    store = open_store()
    for instance in instances:
        store.put_instance(instance, now_ms=1)
    study = instances[0].study_instance_uid
    mine = [i for i in instances if i.study_instance_uid == study]
    series = mine[0].series_instance_uid
    in_series = [i for i in mine if i.series_instance_uid == series]
    other = next(o for o in others if o.sop_instance_uid == mine[-1].sop_instance_uid)
    entries = [(i.study_instance_uid, i.sop_instance_uid, i.content_hash) for i in in_series]
    entries.append((study, other.sop_instance_uid, other.content_hash))  # Other content than held: stays.
    entries.append((study, "1.2.3.4.404", "0" * 64))  # Not held at all.
    assert store.delete_instances(entries) == len(in_series)

    kept = [i for i in instances if i not in in_series]
    assert sorted(r.sop_instance_uid for r in store.all_instances()) == sorted(i.sop_instance_uid for i in kept)
    expected = Digest()
    for instance in kept:
        expected = expected.add(entry_hash(instance.sop_instance_uid, instance.content_hash))
    total = Digest()
    for digest in store.segment_digests([(0, TOKEN_SPACE - 1)]).values():
        total = total.combine(digest)
    assert total == expected
    record = store.study(study)
    assert record is not None and record.instance_count == len(mine) - len(in_series) and record.series_count == 1
    assert [s.series_instance_uid for s in store.series(study)] != [series]
    assert store.statistics().instances == len(kept) and store.statistics().studies == 2

    rest = [(i.study_instance_uid, i.sop_instance_uid, i.content_hash) for i in mine if i not in in_series]
    assert store.delete_instances(rest) == len(rest)
    assert store.study(study) is None and list(store.series(study)) == []
    assert store.statistics().studies == 1
    patient = str(mine[0].attributes["PatientID"])
    assert study not in set(store.studies_by_index("PatientID", patient, patient))


def test_kept_metadata_goes_with_its_instance(open_store: OpenStore, versions: Any) -> None:
    """The /metadata JSON kept beside the index is read only for the content it was built
    from, and goes when the instance or its study is deleted."""
    instances, _ = versions
    store = open_store()
    for instance in instances:
        store.put_instance(instance, now_ms=1)
    first, second = instances[0], next(i for i in instances if i.study_instance_uid != instances[0].study_instance_uid)
    for instance in (first, second):
        store.put_header(instance.study_instance_uid, instance.sop_instance_uid, instance.content_hash, b'{"a":1}')
    assert store.instance_header(first.study_instance_uid, first.sop_instance_uid, first.content_hash) == b'{"a":1}'
    assert store.instance_header(first.study_instance_uid, first.sop_instance_uid, "0" * 64) is None
    store.delete_instances([(first.study_instance_uid, first.sop_instance_uid, first.content_hash)])
    assert store.instance_header(first.study_instance_uid, first.sop_instance_uid, first.content_hash) is None
    store.delete_study(second.study_instance_uid)
    assert store.instance_header(second.study_instance_uid, second.sop_instance_uid, second.content_hash) is None


def test_blocks_are_compressed_by_zstd_with_a_trained_dictionary(tmp_path: Path) -> None:
    """What RocksDB itself records it uses (its OPTIONS file), not what we asked: zstd with
    a dictionary trained on each file's data, not the default Snappy (disk per study 0.6x,
    bench/README.md "Disk: zstd with a trained dictionary")."""
    from pacsnode.node.store import DICT_BYTES, DICT_TRAIN_BYTES

    store = RocksStore(tmp_path / "store")
    store.close()
    options_file = max((tmp_path / "store" / "rocksdb").glob("OPTIONS-*"), key=lambda path: path.stat().st_mtime)
    settings = dict(line.strip().split("=", 1) for line in options_file.read_text().splitlines()
                    if line.strip().startswith(("compression=", "compression_opts=")))
    assert settings["compression"] == "kZSTD"
    compression_opts = dict(item.split("=", 1) for item in settings["compression_opts"].strip("{};").split(";"))
    assert int(compression_opts["max_dict_bytes"]) == DICT_BYTES > 0
    assert int(compression_opts["zstd_max_train_bytes"]) == DICT_TRAIN_BYTES > 0


def test_records_are_written_as_the_json_module_wrote_them() -> None:
    """_dump (orjson) gives the bytes json.dumps(separators=(",", ":"), ensure_ascii=False)
    gave for every record kind, with non-ASCII text, lists and empty values."""
    import dataclasses
    import json

    from pacsnode.node.store import _dump
    from pacsnode.replication.model import InstanceRecord, SeriesRecord, StudyRecord

    attributes: dict[str, Any] = {"PatientName": "Müller^Jürgen=山田^太郎", "ModalitiesInStudy": ["CT", "MR"],
                                  "StudyDescription": "", "Quote": 'a "b" \\ c\n\t\x01'}
    records: list[Any] = [
        InstanceRecord(study_instance_uid="1.2", series_instance_uid="1.2.3", sop_instance_uid="1.2.3.4",
                       sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                       content_hash="ab" * 16, size_bytes=2**40, dataset_offset=332, stored_at_ms=1_765_000_000_000,
                       attributes=attributes, version_logical=3, version_node="node-ä"),
        SeriesRecord(study_instance_uid="1.2", series_instance_uid="1.2.3", attributes=attributes,
                     first_sop_instance_uid="1.2.3.4"),
        StudyRecord(study_instance_uid="1.2", attributes=attributes, first_sop_instance_uid="1.2.3.4"),
    ]
    for record in records:
        fields = {field.name: getattr(record, field.name) for field in dataclasses.fields(record)}
        assert _dump(record) == json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
