"""TLS overhead: the same 3-node cluster workload without and with TLS, in one run.

Plain: three nodes, no tls_dir; the client stores and retrieves on the plain DICOM port.
TLS: three nodes with tls_dir (mutual TLS between peers), the client on the DICOM TLS
port with a client certificate. Ingest: one pynetdicom association sends every instance
to node 1 (N=3, W=2: every instance crosses the peer port twice, then once more for the
third copy); the phase ends when all three copies are held. Retrieve: C-GET of every
study from node 2 (with N=3 on three nodes node 2 holds every study itself, so this phase
measures DICOM TLS and the C-GET path, not the peer port).
CPU is the nodes' own (user + system, from /proc), not the client's.

    .venv/bin/python bench/tls.py [--instances 120] [--size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import ssl
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

from pacsnode.cli.status import collect
from pacsnode.node import ca
from pacsnode.sim import datagen
from pacsnode.sim.process import NodeProcess, free_port, wait_until

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def nodes_cpu(nodes: list[NodeProcess]) -> float:
    return sum(cpu_s(n.process.pid) for n in nodes if n.process is not None)


def held(nodes: list[NodeProcess], tls_dir: str | None) -> int:
    try:
        return sum(n["local_instances"] or 0 for n in collect(nodes[0].peer_address, tls_dir=tls_dir)["nodes"])
    except Exception:
        return 0


def run(root: Path, files: list[Path], tls_on: bool) -> dict[str, Any]:
    pki = root / "pki"
    admin = str(pki / "admin") if tls_on else None
    nodes: list[NodeProcess] = []
    (root / ("tls-" if tls_on else "plain-")).mkdir(parents=True, exist_ok=True)
    for name in ("b1", "b2", "b3"):
        extra = ["--profile", "local", "--log-level", "WARNING", "--audit-log", "off"]
        if tls_on:
            extra += ["--tls-dir", str(pki / name), "--dicom-tls-port", str(free_port())]
        seeds = [nodes[0].peer_address] if nodes else []
        nodes.append(NodeProcess(root / ("tls-" if tls_on else "plain-") / name, node_id=name, seeds=seeds,
                                 extra_args=extra).start())
    try:
        assert wait_until(lambda: all(
            sum(1 for m in collect(n.peer_address, tls_dir=admin)["nodes"] if m["state"] == "alive") == 3
            for n in nodes), 30)
        context = None
        if tls_on:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "client" / "ca.pem"))
            context.load_cert_chain(pki / "client" / "cert.pem", pki / "client" / "key.pem")

        def port(node: NodeProcess) -> int:
            return int(node.extra_args[node.extra_args.index("--dicom-tls-port") + 1]) if tls_on else node.dicom_port

        datasets = [dcmread(f) for f in files]
        ae = AE(ae_title="BENCH")
        for sop_class in {str(d.SOPClassUID) for d in datasets}:
            ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
        cpu0, t0 = nodes_cpu(nodes), time.monotonic()
        assoc = ae.associate("127.0.0.1", port(nodes[0]), ae_title="PACSNODE",
                             tls_args=(context, "localhost") if context else None)
        assert assoc.is_established
        for dataset in datasets:
            assert assoc.send_c_store(dataset).Status == 0
        assoc.release()
        acked_s = time.monotonic() - t0
        assert wait_until(lambda: held(nodes, admin) == 3 * len(files), 120, 0.2)
        ingest = {"wall_s": round(time.monotonic() - t0, 2), "acked_s": round(acked_s, 2),
                  "nodes_cpu_s": round(nodes_cpu(nodes) - cpu0, 2)}

        received = 0

        def on_store(event: Any) -> int:
            nonlocal received
            received += 1
            return 0

        get_ae = AE(ae_title="BENCH")
        get_ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        roles = []
        for sop_class in {str(d.SOPClassUID) for d in datasets}:
            get_ae.add_requested_context(sop_class, [str(datasets[0].file_meta.TransferSyntaxUID)])
            roles.append(build_role(sop_class, scp_role=True))
        cpu0, t0 = nodes_cpu(nodes), time.monotonic()
        assoc = get_ae.associate("127.0.0.1", port(nodes[1]), ae_title="PACSNODE", ext_neg=roles,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)],
                                 tls_args=(context, "localhost") if context else None)
        assert assoc.is_established
        for study_uid in sorted({str(d.StudyInstanceUID) for d in datasets}):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = study_uid
            for _status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
                pass
        assoc.release()
        retrieve = {"wall_s": round(time.monotonic() - t0, 2), "nodes_cpu_s": round(nodes_cpu(nodes) - cpu0, 2),
                    "received": received}
        return {"ingest": ingest, "retrieve": retrieve}
    finally:
        for node in nodes:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=120)
    parser.add_argument("--size", type=int, default=256, help="rows = cols (16-bit pixels)")
    parser.add_argument("--rounds", type=int, default=2, help="plain/TLS pairs, alternated")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="pacsnode-bench-tls-"))
    try:
        spec = datagen.StudySetSpec(patients=max(1, args.instances // 40), studies_per_patient=2, series_per_study=2,
                                    instances_per_series=10, rows=args.size, cols=args.size, seed=7)
        manifest = datagen.write_study_set(spec, root / "data")
        files = [Path(e["path"]) for e in manifest][: args.instances]
        ca.init_ca(root / "pki" / "ca")
        for name in ("b1", "b2", "b3"):
            ca.issue(root / "pki" / "ca", root / "pki" / name, name)
        ca.issue(root / "pki" / "ca", root / "pki" / "admin", "admin", admin=True)
        ca.issue(root / "pki" / "ca", root / "pki" / "client", "BENCH", dicom_client=True)
        mb = sum(f.stat().st_size for f in files) / 1e6
        results: dict[str, list[Any]] = {"plain": [], "tls": []}
        for _ in range(args.rounds):
            for mode in ("plain", "tls"):
                shutil.rmtree(root / f"{mode}-", ignore_errors=True)
                results[mode].append(run(root, files, mode == "tls"))
        summary: dict[str, Any] = {"instances": len(files), "megabytes": round(mb, 1), "runs": results}
        for phase in ("ingest", "retrieve"):
            for key in ("wall_s", "nodes_cpu_s"):
                plain = sum(r[phase][key] for r in results["plain"])
                tls = sum(r[phase][key] for r in results["tls"])
                summary[f"{phase}_{key}_ratio"] = round(tls / plain, 3) if plain else None
        print(json.dumps(summary, indent=2))
        out = Path(__file__).parent / "results" / "tls-overhead.json"
        out.write_text(json.dumps(summary, indent=2) + "\n")
        return 0
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
