"""NodeConfig, the TOML file and the `pacsnode start` command line."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from pacsnode.cli.main import START_OPTIONS, build_parser, config_from_args, main
from pacsnode.node.config import ConfigError, Destination, NodeConfig, load_toml

# -- defaults ------------------------------------------------------------------------


def test_defaults() -> None:
    config = NodeConfig(node_id="node-1")
    assert config.data_dir == Path("pacsnode-data")
    assert config.ae_title == "PACSNODE"
    assert config.host == "0.0.0.0"
    assert config.dicom_port == 11112
    assert config.destinations == ()
    assert config.require_called_ae_title is False
    assert config.max_pdu_bytes == 262_144
    assert config.max_associations == 32
    assert config.instance_size_bytes_max == 4 * 1024**3
    assert config.dataset_spool_threshold_bytes == 8 * 1024**2 and config.inflight_instance_bytes_max == 1024**3
    assert config.blob_file_bytes_min == 64 * 1024
    assert config.zstd_level == -3
    assert config.disk_free_bytes_min == 256 * 1024**2
    assert config.find_result_max == 0
    assert config.duplicate_policy == "first-wins"
    assert (config.replication_factor, config.write_quorum, config.vnodes) == (3, 2, 64)
    assert config.write_quorum_mode == "strict"
    assert config.log_level == "INFO"
    assert (config.http_host, config.http_port, config.qido_result_max) == ("", 8042, 10_000)
    assert config.http_tls_client_cert == "optional"


def test_default_node_id_is_a_valid_host_name() -> None:
    config = NodeConfig()
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", config.node_id)


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        NodeConfig(node_id="n").dicom_port = 1  # type: ignore[misc]


# -- TOML ------------------------------------------------------------------------------

FULL_TOML = """
node_id = "node-7"
data_dir = "/var/lib/pacsnode"
site = "campus-b"
cluster_id = "radiology"
ae_title = "ARCHIVE7"
host = "127.0.0.1"
dicom-port = 4242                  # '-' or '_' both work
require_called_ae_title = true
max_pdu_bytes = 0
max_associations = 8
dicom_workers = 2
dicom_local_associations = 2
dimse_timeout_s = 5                # an integer for a float field
acse_timeout_s = 2.5
network_timeout_s = 30.0
move_connect_timeout_s = 3.0
move_store_attempt_max = 5
find_result_max = 500
find_buffer_rows = 250
storage_commitment_timeout_s = 45
instance_size_bytes_max = 1_000_000
dataset_spool_threshold_bytes = 65536
blob_file_bytes_min = 131072
inflight_instance_bytes_max = 5_000_000
stow_bytes_max = 8_388_608
malloc_trim_threshold_bytes = 0
zstd_level = 3
disk_free_bytes_min = 0
store_timeout_ms = 1000
duplicate_policy = "first-wins"
store_stall_ms = 4000
health_probe_interval_ms = 300
peer_port = 7002
replication_factor = 5
site_replicas = { "campus-b" = 2, "campus-a" = 1 }   # the [site_replicas] table, inline
write_quorum = 3
write_quorum_scope = "global"
write_quorum_mode = "sloppy"
read_quorum = 3
scatter_read_quorum = 1
read_fault_window_ms = 30000
vnodes = 16
token_salt = 3
seeds = ["10.0.0.1:7001", "[::1]:7002"]
advertise_host = "archive7.example"
peer_routes = ["10.0.0.2:7001=127.0.0.1:9001"]
replica_timeout_ms = 1500
fetch_timeout_ms = 9000
query_timeout_ms = 8000
replica_start_timeout_ms = 900
profile = "wan"
hint_replay_interval_ms = 700
anti_entropy_interval_ms = 5000
dead_grace_s = 30
tombstone_grace_s = 86400
repair_bytes_per_second_max = 0
repair_fetch_window = 3
tls_dir = "/etc/pacsnode/tls"
dicom_tls_port = 2762
dicom_tls_client_cert = "required"
http_tls_client_cert = "required"
access_mode = "strict"
loopback_trusted = false
known_aes = ["VIEWER@10.0.0.5=echo,find,move,move-to:WS2"]
audit_log = "/var/log/pacsnode-audit.jsonl"
audit_log_segment_bytes = 1048576
audit_syslog = "syslog.hospital.example:6514"
http_host = "127.0.0.3"
http_port = 8080
qido_result_max = 50
viewer_dir = "/opt/ohif"
log_level = "debug"
"""


def _write(tmp_path: Path, text: str, name: str = "pacsnode.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_toml_with_every_kind_of_field_and_a_destination_list(tmp_path: Path) -> None:
    path = _write(tmp_path, FULL_TOML + 'destinations = ["VIEWER=10.0.0.5:104", "WS2=[::1]:11113"]\n')
    config = NodeConfig.from_mapping(load_toml(path))
    assert config.node_id == "node-7"
    assert config.data_dir == Path("/var/lib/pacsnode")
    assert config.site == "campus-b" and config.cluster_id == "radiology"
    assert config.ae_title == "ARCHIVE7" and config.host == "127.0.0.1"
    assert config.dicom_port == 4242
    assert config.require_called_ae_title is True
    assert config.max_pdu_bytes == 0 and config.max_associations == 8 and config.dicom_workers == 2
    assert config.dicom_local_associations == 2
    assert config.dimse_timeout_s == 5.0 and isinstance(config.dimse_timeout_s, float)
    assert config.acse_timeout_s == 2.5 and config.network_timeout_s == 30.0 and config.move_connect_timeout_s == 3.0
    assert config.move_store_attempt_max == 5 and config.find_result_max == 500
    assert config.find_buffer_rows == 250
    assert config.storage_commitment_timeout_s == 45.0
    assert config.store_stall_ms == 4000 and config.health_probe_interval_ms == 300
    assert config.instance_size_bytes_max == 1_000_000 and config.disk_free_bytes_min == 0
    assert config.dataset_spool_threshold_bytes == 65536 and config.inflight_instance_bytes_max == 5_000_000
    assert config.blob_file_bytes_min == 131072 and config.stow_bytes_max == 8_388_608
    assert config.malloc_trim_threshold_bytes == 0
    assert config.zstd_level == 3
    assert config.store_timeout_ms == 1000 and config.duplicate_policy == "first-wins"
    assert (config.peer_port, config.replication_factor, config.write_quorum, config.vnodes) == (7002, 5, 3, 16)
    assert config.token_salt == 3
    assert config.log_level == "debug"
    assert config.seeds == ("10.0.0.1:7001", "[::1]:7002") and config.advertise_host == "archive7.example"
    assert config.peer_host == "archive7.example"
    assert (config.replica_timeout_ms, config.fetch_timeout_ms, config.query_timeout_ms) == (1500, 9000, 8000)
    assert (config.profile, config.hint_replay_interval_ms) == ("wan", 700)
    assert (config.anti_entropy_interval_ms, config.repair_bytes_per_second_max) == (5000, 0)
    assert config.dead_grace_s == 30 and config.read_fault_window_ms == 30_000
    assert (config.read_quorum, config.scatter_read_quorum) == (3, 1)
    assert config.tombstone_grace_s == 86_400
    assert config.peer_routes == (("10.0.0.2:7001", "127.0.0.1:9001"),)
    assert config.replica_start_timeout_ms == 900 and config.repair_fetch_window == 3
    assert (config.http_host, config.http_port, config.qido_result_max) == ("127.0.0.3", 8080, 50)
    assert config.viewer_dir == "/opt/ohif"
    assert config.destinations == (Destination("VIEWER", "10.0.0.5", 104), Destination("WS2", "::1", 11113))
    assert config.destination("VIEWER") == Destination("VIEWER", "10.0.0.5", 104)
    assert config.destination("VIEWER ") == Destination("VIEWER", "10.0.0.5", 104)  # AE titles: padding ignored.
    assert config.destination("NOBODY") is None
    assert (config.tls_dir, config.dicom_tls_port, config.dicom_tls_client_cert) == ("/etc/pacsnode/tls", 2762, "required")
    assert config.http_tls_client_cert == "required"
    assert (config.access_mode, config.loopback_trusted) == ("strict", False)
    assert [str(k) for k in config.known_aes] == ["VIEWER@10.0.0.5=echo,find,move,move-to:WS2"]
    assert config.audit_log == "/var/log/pacsnode-audit.jsonl" and config.audit_log_segment_bytes == 1_048_576
    assert config.site_replicas == (("campus-a", 1), ("campus-b", 2))
    assert str(config.replication) == "campus-a=1,campus-b=2"
    assert config.write_quorum_scope == "global" and not config.write_scope_local
    assert config.write_quorum_mode == "sloppy"
    assert {f.name for f in dataclasses.fields(NodeConfig)} - {"destinations"} <= set(load_toml(path))


def test_toml_destinations_as_a_table_and_in_a_node_table(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
[node]
node_id = "n1"
dicom_port = 104

[destinations]
VIEWER = "10.0.0.5:104"
"WS 2" = "ws2.example:11113"
""",
    )
    config = NodeConfig.from_mapping(load_toml(path))
    assert config.node_id == "n1" and config.dicom_port == 104
    assert config.destinations == (Destination("VIEWER", "10.0.0.5", 104), Destination("WS 2", "ws2.example", 11113))


def test_destination_round_trips_through_text() -> None:
    for text in ("VIEWER=10.0.0.5:104", "WS=ws.example:11112"):
        assert str(Destination.parse(text)) == text
    assert Destination.parse(" VIEWER =host:104") == Destination("VIEWER", "host", 104)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[node\nnode_id = 1", "not valid TOML"),
        ('node_id = "n"\ncolour = "blue"', "unknown setting(s): colour"),
        ('node_id = "n"\n[extra]\nx = 1', "unknown setting(s): extra"),
    ],
)
def test_bad_toml_files(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        NodeConfig.from_mapping(load_toml(path))


def test_missing_toml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "nope.toml")


# -- bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dicom_port": -1}, "dicom_port must be 0-65535"),
        ({"dicom_port": 65536}, "dicom_port must be 0-65535"),
        ({"peer_port": 70000}, "peer_port must be 0-65535"),
        ({"dicom_port": "eleven"}, "dicom_port: cannot use 'eleven' as int"),
        ({"dicom_port": 104.5}, "dicom_port: cannot use 104.5 as int"),
        ({"dicom_port": True}, "dicom_port: cannot use True as int"),
        ({"write_quorum": 4}, "write_quorum=4 replication_factor=3"),
        ({"write_quorum": 0}, "need 1 <= write_quorum <= replication_factor"),
        ({"read_quorum": 0}, "read_quorum must be >= 1"),
        ({"scatter_read_quorum": 0}, "scatter_read_quorum must be >= 1"),
        ({"read_fault_window_ms": -1}, "read_fault_window_ms must be >= 0"),
        ({"write_quorum_mode": "lazy"}, "write_quorum_mode must be one of strict, sloppy"),
        ({"replication_factor": 1}, "write_quorum=2 replication_factor=1"),
        ({"ae_title": ""}, "ae_title must be 1-16"),
        ({"ae_title": "    "}, "ae_title must be 1-16"),
        ({"ae_title": "A" * 17}, "ae_title must be 1-16"),
        ({"ae_title": "PÄCS"}, "ae_title must be 1-16"),
        ({"ae_title": "PACS\\1"}, "ae_title must be 1-16"),  # Backslash is not allowed in AE.
        ({"ae_title": "PACS\t1"}, "ae_title must be 1-16"),
        ({"node_id": "no spaces"}, "node_id must be"),
        ({"node_id": ""}, "node_id must be"),
        ({"vnodes": 0}, "vnodes must be >= 1"),
        ({"token_salt": -2}, "token_salt must be -1"),
        ({"max_pdu_bytes": 100}, "max_pdu_bytes must be 0 (unlimited) or >= 4096"),
        ({"max_associations": 0}, "max_associations must be >= 1"),
        ({"dicom_workers": -1}, "dicom_workers must be >= 0"),
        ({"dicom_local_associations": -1}, "dicom_local_associations must be >= 0"),
        ({"move_store_attempt_max": 0}, "move_store_attempt_max must be >= 1"),
        ({"store_timeout_ms": 0}, "store_timeout_ms must be >= 1"),
        ({"instance_size_bytes_max": 0}, "instance_size_bytes_max must be >= 1"),
        ({"inflight_instance_bytes_max": 0}, "inflight_instance_bytes_max must be >= 1"),
        ({"stow_bytes_max": 4 * 1024**2 - 1}, "stow_bytes_max must be >= 4 MiB"),
        ({"blob_file_bytes_min": 0}, "blob_file_bytes_min must be >= 1"),
        ({"zstd_level": 23}, "zstd_level must be -131072 to 22, got 23"),
        ({"zstd_level": -131073}, "zstd_level must be -131072 to 22, got -131073"),
        ({"disk_free_bytes_min": -1}, "disk_free_bytes_min must be >= 0"),
        ({"find_result_max": -1}, "find_result_max must be >= 0"),
        ({"find_buffer_rows": 0}, "find_buffer_rows must be >= 1"),
        ({"store_stall_ms": 0}, "store_stall_ms must be >= 1"),
        ({"health_probe_interval_ms": 0}, "health_probe_interval_ms must be >= 1"),
        ({"dimse_timeout_s": 0}, "dimse_timeout_s must be > 0"),
        ({"acse_timeout_s": -1.0}, "acse_timeout_s must be > 0"),
        ({"network_timeout_s": "soon"}, "network_timeout_s: cannot use 'soon' as float"),
        ({"move_connect_timeout_s": 0}, "move_connect_timeout_s must be > 0"),
        ({"storage_commitment_timeout_s": 0}, "storage_commitment_timeout_s must be > 0"),
        ({"require_called_ae_title": "maybe"}, "require_called_ae_title: cannot use 'maybe' as bool"),
        ({"duplicate_policy": "last-wins"}, "duplicate_policy must be 'first-wins'"),
        ({"log_level": "LOUD"}, "log_level must be DEBUG, INFO, WARNING or ERROR"),
        ({"profile": "fast"}, "profile must be one of lan, local, wan, got 'fast'"),
        ({"colour": "blue", "shape": 1}, "unknown setting(s): colour, shape"),
        ({"destinations": ["VIEWER"]}, "destination must look like AET=HOST:PORT, got 'VIEWER'"),
        ({"destinations": ["VIEWER=host"]}, "destination must look like AET=HOST:PORT"),
        ({"destinations": ["=host:104"]}, "destination must look like AET=HOST:PORT"),
        ({"destinations": ["VIEWER=:104"]}, "destination must look like AET=HOST:PORT"),
        ({"destinations": ["VIEWER=host:port"]}, "destination port is not a number in 'VIEWER=host:port'"),
        ({"destinations": ["VIEWER=host:0"]}, "destination port must be 1-65535"),
        ({"destinations": ["VIEWER=host:70000"]}, "destination port must be 1-65535"),
        ({"destinations": ["A" * 17 + "=host:104"]}, "destination AE title must be 1-16"),
        ({"destinations": ["VIE\\WER=host:104"]}, "destination AE title must be 1-16"),
        ({"destinations": ["V=h:1", "V=g:2"]}, "duplicate C-MOVE destination AE titles"),
        ({"destinations": "VIEWER=host:104"}, "destinations must be a list of AET=HOST:PORT or a table"),
    ],
)
def test_bad_values_raise_config_error(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        NodeConfig.from_mapping({"node_id": "n", **values})


@pytest.mark.parametrize(
    ("values", "field", "expected"),
    [
        ({"dicom_port": "104"}, "dicom_port", 104),  # Command-line strings.
        ({"dicom_port": 0}, "dicom_port", 0),  # 0: any free port (tests).
        ({"dicom_port": 104.0}, "dicom_port", 104),
        ({"require_called_ae_title": "yes"}, "require_called_ae_title", True),
        ({"require_called_ae_title": "0"}, "require_called_ae_title", False),
        ({"dimse_timeout_s": "2.5"}, "dimse_timeout_s", 2.5),
        ({"data_dir": "relative/dir"}, "data_dir", Path("relative/dir")),
        ({"ae_title": "A" * 16}, "ae_title", "A" * 16),
        ({"write_quorum": 1, "replication_factor": 1}, "write_quorum", 1),
        ({"zstd_level": "19"}, "zstd_level", 19),
        ({"zstd_level": -5}, "zstd_level", -5),
    ],
)
def test_good_values_are_coerced(values: dict[str, Any], field: str, expected: object) -> None:
    assert getattr(NodeConfig.from_mapping({"node_id": "n", **values}), field) == expected


# -- command line ----------------------------------------------------------------------


def _start_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    start: argparse.ArgumentParser = subparsers.choices["start"]
    return start


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["start", *argv])


def test_cli_without_options_gives_the_defaults() -> None:
    config = config_from_args(_args("--node-id", "n1"))
    assert config == NodeConfig(node_id="n1")


def test_cli_overrides_toml(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        'node_id = "from-toml"\ndicom_port = 4242\nae_title = "TOMLAE"\nlog_level = "WARNING"\n'
        'destinations = ["VIEWER=10.0.0.5:104", "OTHER=10.0.0.6:104"]\n',
    )
    config = config_from_args(
        _args(
            "--config", str(path),
            "--dicom-port", "5000",
            "--node-id", "from-cli",
            "--destination", "VIEWER=10.0.0.9:11112",
            "--destination", "NEW=h:1",
        )
    )  # fmt: skip
    assert config.node_id == "from-cli"
    assert config.dicom_port == 5000
    assert config.ae_title == "TOMLAE"  # Not on the command line: TOML value kept.
    assert config.log_level == "WARNING"
    assert set(config.destinations) == {
        Destination("VIEWER", "10.0.0.9", 11112),  # Same AE title: the command line wins.
        Destination("OTHER", "10.0.0.6", 104),
        Destination("NEW", "h", 1),
    }


@pytest.mark.parametrize("key", ["destinations", "destination"])
def test_cli_destinations_merge_with_toml_table_or_list(tmp_path: Path, key: str) -> None:
    table = _write(tmp_path, f'node_id = "n"\n[{key}]\nVIEWER = "10.0.0.5:104"\n', "table.toml")
    listed = _write(tmp_path, f'node_id = "n"\n{key} = ["VIEWER=10.0.0.5:104"]\n', "list.toml")
    for path in (table, listed):
        config = config_from_args(_args("--config", str(path), "--destination", "NEW=h:1"))
        assert set(config.destinations) == {Destination("VIEWER", "10.0.0.5", 104), Destination("NEW", "h", 1)}


def test_every_start_option_sets_its_field() -> None:
    """Every NodeConfig field (destinations aside) has a flag, and the flag sets it."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(NodeConfig)}
    assert {name for _flag, name, _text in START_OPTIONS} == set(fields) - {"destinations", "seeds", "peer_routes",
                                                                             "known_aes", "site_replicas"}
    samples = {"str": "s9", "int": "4097", "float": "9.5", "bool": "true", "Path": "d"}
    special = {"node_id": "n9", "ae_title": "AE9", "host": "127.0.0.2", "log_level": "ERROR",
               "duplicate_policy": "first-wins", "replication_factor": "5", "write_quorum": "4", "write_quorum_scope": "local", "write_quorum_mode": "sloppy",
               "profile": "wan", "access_mode": "default", "dicom_tls_client_cert": "none",
               "http_tls_client_cert": "none", "audit_syslog": "127.0.0.9:6514", "zstd_level": "19",
               "stow_bytes_max": "8388608"}
    values = {}
    for _flag, name, _text in START_OPTIONS:
        type_name = str(fields[name].type)
        values[name] = special.get(name, samples["Path"] if "Path" in type_name else samples.get(type_name, "s9"))
    argv = [item for flag, name, _text in START_OPTIONS for item in (flag, values[name])]
    config = config_from_args(_args(*argv))
    for _flag, name, _text in START_OPTIONS:
        got = getattr(config, name)
        expected = values[name]
        if isinstance(got, bool):
            assert got is True, name
        elif isinstance(got, float):
            assert got == float(expected), name
        else:
            assert str(got) == expected, name


def test_bad_cli_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="dicom_port: cannot use 'x' as int"):
        config_from_args(_args("--dicom-port", "x"))
    with pytest.raises(ConfigError, match="destination must look like"):
        config_from_args(_args("--destination", "nonsense"))


def test_main_reports_config_errors_without_starting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["start", "--dicom-port", "99999"]) == 2
    assert "configuration error: dicom_port must be 0-65535, got 99999" in capsys.readouterr().err
    assert main([]) == 2
    assert "pacsnode" in capsys.readouterr().out


def test_start_help_lists_every_option_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "300")  # No wrapping inside "pacsnode-data".
    parser = _start_parser()
    text = " ".join(parser.format_help().split())  # Undo argparse's line wrapping.
    defaults = NodeConfig(node_id="n")
    for flag, name, _text in START_OPTIONS:
        value = getattr(defaults, name)
        default = "host name" if name == "node_id" else (str(value).lower() if isinstance(value, bool) else str(value))
        assert re.search(re.escape(flag) + r" \S+ .*?\(default: " + re.escape(default) + r"\)", text), flag
    for action in parser._actions:
        if action.option_strings and "--help" not in action.option_strings:
            assert action.option_strings[0] in text
            assert action.help and "(default: " in action.help, f"{action.option_strings[0]} shows no default"


def test_peer_routes_from_flags_and_toml(tmp_path: Path) -> None:
    config = config_from_args(_args("--peer-route", "10.0.0.2:7001=127.0.0.1:9001",
                                    "--peer-route", "[::1]:7002=localhost:9002"))
    assert config.peer_routes == (("10.0.0.2:7001", "127.0.0.1:9001"), ("[::1]:7002", "localhost:9002"))
    table = _write(tmp_path, 'node_id = "n"\n[peer_routes]\n"10.0.0.2:7001" = "127.0.0.1:9001"\n')
    assert config_from_args(_args("--config", str(table))).peer_routes == (("10.0.0.2:7001", "127.0.0.1:9001"),)
    assert NodeConfig(node_id="n").peer_routes == ()
    for bad in ("10.0.0.2:7001", "10.0.0.2=127.0.0.1:9001", "a:1=b:x"):
        with pytest.raises(ConfigError, match="peer route"):
            config_from_args(_args("--peer-route", bad))
    with pytest.raises(ConfigError, match="two peer routes"):
        config_from_args(_args("--peer-route", "a:1=b:2", "--peer-route", "a:1=c:3"))


def test_channels_dial_the_routed_address() -> None:
    from pacsnode.node.grpc_transport import Channels

    channels = Channels({"10.0.0.2:7001": "127.0.0.1:9001"})
    assert channels.dialled("10.0.0.2:7001") == "127.0.0.1:9001"
    assert channels.dialled("10.0.0.3:7001") == "10.0.0.3:7001"


def test_known_aes_from_flags_and_a_toml_table(tmp_path: Path) -> None:
    path = _write(tmp_path, 'node_id = "n"\n[known_aes.VIEWER]\nhosts = ["10.0.0.5"]\nservices = ["find", "get"]\n'
                  '[known_aes.WS]\nmove_to = ["*"]\n')
    config = config_from_args(_args("--config", str(path), "--known-ae", "WS@10.0.0.9=echo,move",
                                    "--known-ae", "CT1"))
    known = {k.ae_title: k for k in config.known_aes}
    assert set(known) == {"VIEWER", "WS", "CT1"}
    assert known["VIEWER"].hosts == ("10.0.0.5",) and known["VIEWER"].services == {"find", "get"}
    assert known["WS"].hosts == ("10.0.0.9",) and known["WS"].services == {"echo", "move"}  # The flag wins.
    assert known["CT1"].services == {"echo", "store", "find", "get", "move"}


@pytest.mark.parametrize("values, message", [
    ({"access_mode": "strict"}, "needs at least one known AE"),
    ({"access_mode": "open"}, "access_mode must be"),
    ({"dicom_tls_port": 2762}, "needs tls_dir"),
    ({"dicom_tls_client_cert": "maybe", "tls_dir": "x"}, "dicom_tls_client_cert"),
    ({"http_tls_client_cert": "sometimes"}, "http_tls_client_cert must be none, optional or required"),
    ({"known_aes": ["A=find,delete"]}, "unknown service"),
    ({"known_aes": ["A", "A@h"]}, "duplicate known AE"),
    ({"audit_syslog": "h:6514"}, "audit_syslog needs tls_dir"),
    ({"audit_syslog": "h", "tls_dir": "x"}, "audit_syslog must be HOST:PORT"),
])
def test_bad_security_settings_are_refused(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig.from_mapping({"node_id": "n", **values})


def test_a_tls_destination_needs_tls_dir() -> None:
    destination = Destination.parse("VIEWER=10.0.0.5:2762+tls")
    assert destination == Destination("VIEWER", "10.0.0.5", 2762, tls=True) and str(destination).endswith("+tls")
    with pytest.raises(ConfigError, match="needs tls_dir"):
        NodeConfig.from_mapping({"node_id": "n", "destinations": ["VIEWER=10.0.0.5:2762+tls"]})
    assert NodeConfig.from_mapping({"node_id": "n", "tls_dir": "t", "destinations": ["V=h:1+tls"]}).destinations[0].tls


def test_site_replicas_from_flags_and_a_toml_table(tmp_path: Path) -> None:
    """--site-replicas SITE=N (repeatable) or a [site_replicas] table: N copies per site;
    the flags replace the table; the plain replication_factor is then not the policy."""
    from pacsnode.ring.placement import SiteReplicas

    assert NodeConfig(node_id="n").replication == 3 and NodeConfig(node_id="n").site_replicas == ()
    table = _write(tmp_path, 'node_id = "n"\nsite = "east"\n[site_replicas]\neast = 2\nwest = 1\n')
    config = config_from_args(_args("--config", str(table)))
    assert config.replication == SiteReplicas.of({"east": 2, "west": 1})
    config = config_from_args(_args("--config", str(table), "--site-replicas", "east=1", "--site-replicas", "north=2"))
    assert config.site_replicas == (("east", 1), ("north", 2))  # Flags win, whole.
    config = config_from_args(_args("--site", "b", "--site-replicas", "a=1,b=2"))
    assert config.replication == SiteReplicas.of({"a": 1, "b": 2})


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--site-replicas", "east"], "must look like SITE=N"),
        (["--site-replicas", "east=x"], "must look like SITE=N"),
        (["--site-replicas", "default=0"], "needs >= 1 copies"),
        (["--site-replicas", "default=1", "--site-replicas", "default=2"], "named twice"),
        (["--site-replicas", "east=2"], "no copies for this node's site 'default'"),
        (["--site-replicas", "default=1", "--write-quorum", "2"], "write_quorum <= the copies site_replicas place"),
    ],
)
def test_bad_site_replicas(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_args(_args(*argv))


def test_write_quorum_scope_auto_is_local_with_site_replicas() -> None:
    assert NodeConfig(node_id="n").write_quorum_scope == "auto"
    assert not NodeConfig(node_id="n").write_scope_local  # No site replicas: global.
    assert config_from_args(_args("--site-replicas", "default=2")).write_scope_local
    assert not config_from_args(_args("--site-replicas", "default=2", "--write-quorum-scope", "global")).write_scope_local
    assert config_from_args(_args("--write-quorum-scope", "local")).write_scope_local
    with pytest.raises(ConfigError, match="write_quorum_scope must be one of auto, local, global"):
        config_from_args(_args("--write-quorum-scope", "site"))
