"""A newcomer's quick start (issue 11): the README's commands work on the data the README
tells the user to generate, and a mistaken second start does not harm the running node."""

from __future__ import annotations

import json
import subprocess
import sys
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
