"""A newcomer's quick start (issue 11): the README's commands work on the data the README
tells the user to generate, and a mistaken second start does not harm the running node."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pacsnode.sim.process import NodeProcess, free_port, pacsnode_command

from . import clients
from .clients import identifier

pytestmark = pytest.mark.skipif(not clients.have_dcmtk(), reason="dcmtk is not installed")


def test_storescu_line_of_the_readme_stores_every_generated_study(node_factory, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert "+sd +r +sp '*.dcm'" in readme
    studies = tmp_path / "studies"
    subprocess.run([sys.executable, "-m", "pacsnode.sim.datagen", "--out", str(studies), "--patients", "5",
                    "--seed", "1"], check=True, capture_output=True)
    assert (studies / "manifest.json").exists()
    node = node_factory.start()
    result = subprocess.run(["storescu", "-aec", "PACSNODE", "127.0.0.1", str(node.dicom_port), "+sd", "+r", "+sp",
                             "*.dcm", str(studies)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    expected = {entry["study_uid"] for entry in json.loads((studies / "manifest.json").read_text())}
    assert len(expected) == 5
    found, status = clients.find(node.dicom_port, identifier("STUDY", StudyInstanceUID=""))
    assert status == 0 and {str(d.StudyInstanceUID) for d in found} == expected


def test_a_second_start_on_the_same_data_dir_fails_without_touching_the_identity(node_factory) -> None:
    node = node_factory.start()
    identity_path = node.data_dir / "identity.json"
    before = json.loads(identity_path.read_text())
    second = subprocess.run(
        pacsnode_command() + ["start", "--node-id", node.node_id, "--data-dir", str(node.data_dir), "--host",
                              "127.0.0.1", "--dicom-port", str(free_port()), "--peer-port", str(free_port())],
        capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert json.loads(identity_path.read_text())["generation"] == before["generation"]
    assert node.alive and clients.echo(node.dicom_port) == 0


def _readme_commands() -> list[list[str]]:
    """The dcmtk command lines of the README's quick start (continuations joined, comments cut)."""
    import shlex

    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = text.split("## Quick start with dcmtk", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    commands, current = [], ""
    for line in block.splitlines():
        code = line.split("  #", 1)[0].rstrip()
        if code.endswith("\\"):
            current += code[:-1] + " "
            continue
        current += code
        if current.strip() and not current.strip().startswith("#"):
            commands.append(shlex.split(current))
        current = ""
    return commands


def test_the_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    """Every dcmtk line of the quick start, with the generated data, a real study UID and
    free ports put in for the placeholders, in the README's order."""
    import os
    import signal

    studies = tmp_path / "studies"
    subprocess.run([sys.executable, "-m", "pacsnode.sim.datagen", "--out", str(studies), "--patients", "3",
                    "--seed", "1"], check=True, capture_output=True)
    manifest = json.loads((studies / "manifest.json").read_text())
    study_uid = manifest[0]["study_uid"]
    dicom_port, viewer_port = free_port(), free_port()
    node = NodeProcess(tmp_path / "data", dicom_port=dicom_port).start()
    background: list[subprocess.Popen[bytes]] = []
    ran = []
    try:
        for command in _readme_commands():
            program = Path(command[0]).name
            if program in ("make",):
                continue
            swap = {"11112": str(dicom_port), "11113": str(viewer_port), "some/dicom/dir": str(studies),
                    "StudyInstanceUID=1.2.3...": f"StudyInstanceUID={study_uid}",
                    "VIEWER=127.0.0.1:11113": f"VIEWER=127.0.0.1:{viewer_port}",
                    "out/": str(tmp_path / "out"), "moved/": str(tmp_path / "moved"),
                    "out": str(tmp_path / "out"), "moved": str(tmp_path / "moved")}
            command = [swap.get(arg, arg) for arg in command]
            if program == "pacsnode":  # "stop the node above, then start it with --destination"
                node.stop()
                node = NodeProcess(tmp_path / "data", dicom_port=dicom_port,
                                   extra_args=command[command.index("start") + 1:]).start()
                continue
            if command[-1] == "&":  # The README's own mkdir made its folder (dcmtk does not).
                background.append(subprocess.Popen(command[:-1], stdout=subprocess.DEVNULL,
                                                   stderr=subprocess.DEVNULL))
                time.sleep(0.5)
                continue
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, (command, result.stderr[-2000:])
            ran.append(program)
        assert ran == ["storescu", "findscu", "findscu", "mkdir", "getscu", "movescu"], ran
        retrieved = [p for p in (tmp_path / "out").iterdir()]
        moved = [p for p in (tmp_path / "moved").iterdir()]
        in_study = [e for e in manifest if e["study_uid"] == study_uid]
        assert len(retrieved) == len(in_study) and len(moved) == len(in_study)
    finally:
        for process in background:
            os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=10)
        node.stop()
