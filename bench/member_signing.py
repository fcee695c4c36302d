"""Gossip signing cost: signatures and verifications per second, and the CPU they take.

1. The primitives: ECDSA P-256 sign and verify of one member record, and one certificate
   check against the CA, each timed over `--repeat` runs (no cache).
2. SWIM with and without signing, the production code (node/swim_membership.py over
   ring/swim.py, with node/member_signing.py's signer and verifier) on sim/swim_cluster.py's
   virtual network:
   `--nodes` members, the LAN profile (memberlist's defaults, as a node runs with
   `profile = "lan"`), `--seconds` of cluster time with churn (every `--churn-s` seconds one
   member is killed and, 20 s later, restarted as its next generation, so there are
   suspicions, deaths, refutations, joins and removals to sign). Counts the signatures
   made and the ECDSA verifications run (cache misses) per node per second of cluster
   time, and the process CPU time of the whole run, signed vs plain, same seed.

    .venv/bin/python bench/member_signing.py [--nodes 5 10 20] [--seconds 300] [--churn-s 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from cryptography import x509

from pacsnode.node import ca
from pacsnode.node.member_signing import MemberSigner, MemberVerifier, signed_bytes
from pacsnode.node.tls import TlsFiles
from pacsnode.ring.swim import MemberUpdate, State, SwimConfig
from pacsnode.sim.swim_cluster import SwimCluster, member_info

CLUSTER = "bench"


def primitives(pki: Path, repeat: int) -> dict[str, float]:
    signer = MemberSigner(CLUSTER, TlsFiles(pki / "node-00"))
    record = MemberUpdate(member_info(0), State.ALIVE, 3, reporter_id="node-00")
    start = time.process_time()
    signed = [signer.sign(record) for _ in range(repeat)]
    sign_s = (time.process_time() - start) / repeat
    ca_pem = (pki / "ca" / "ca.pem").read_bytes()
    verifier = MemberVerifier(CLUSTER, ca_pem)
    public_key = x509.load_der_x509_certificate(signed[0].certificate).public_key()
    payload = signed_bytes(CLUSTER, record)
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    start = time.process_time()
    for item in signed:
        public_key.verify(item.signature, payload, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
    verify_s = (time.process_time() - start) / repeat
    start = time.process_time()
    for _ in range(repeat):
        MemberVerifier(CLUSTER, ca_pem)._signer(signed[0].certificate)
    certificate_s = (time.process_time() - start) / repeat
    start = time.process_time()
    for item in signed:
        verifier(item)  # Cached after the first: the certificate and each distinct signature.
    full_s = (time.process_time() - start) / repeat
    return {"sign_us": sign_s * 1e6, "verify_us": verify_s * 1e6, "certificate_check_us": certificate_s * 1e6,
            "verifier_call_us": full_s * 1e6}


def run(n: int, seconds: int, churn_s: int, pki: Path | None, seed: int) -> dict[str, Any]:
    signers: dict[str, MemberSigner] = {}
    verifiers: dict[str, MemberVerifier] = {}

    def hooks(node_id: str) -> dict[str, object]:
        assert pki is not None
        signers.setdefault(node_id, MemberSigner(CLUSTER, TlsFiles(pki / node_id)))
        verifier = MemberVerifier(CLUSTER, (pki / "ca" / "ca.pem").read_bytes())
        verifiers[f"{node_id}:{len(verifiers)}"] = verifier
        return {"signer": signers[node_id].sign, "verifier": verifier}

    start = time.process_time()
    cluster = SwimCluster(n, SwimConfig.lan(), seed=seed, swim_hooks=hooks if pki else None)
    ids = list(cluster.processes)
    victim = 0
    for at_s in range(0, seconds, churn_s):
        cluster.run_until(at_s * 1000)
        if at_s and at_s + 20 < seconds:
            node_id = ids[1 + victim % (n - 1)]
            victim += 1
            cluster.kill(node_id)
            cluster.run_until((at_s + 20) * 1000)
            cluster.restart(node_id)
    cluster.run_until(seconds * 1000)
    cpu_s = time.process_time() - start
    cluster.close()
    rejected = sum(p.swim.statistics().updates_rejected for p in cluster.processes.values())
    messages = sum(sum(p.swim.statistics().messages_sent.values()) for p in cluster.processes.values())
    return {"nodes": n, "signed": pki is not None, "cpu_s": cpu_s, "messages": messages,
            "signatures": sum(s.signed for s in signers.values()),
            "verifications": sum(v.verified for v in verifiers.values()), "rejected": rejected,
            "transitions": len(cluster.trace)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--seconds", type=int, default=300)
    parser.add_argument("--churn-s", type=int, default=30)
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pki = Path(directory)
        ca.init_ca(pki / "ca")
        for index in range(max(args.nodes)):
            ca.issue(pki / "ca", pki / f"node-{index:02d}", f"node-{index:02d}")
        figures = primitives(pki, args.repeat)
        print("primitives (process CPU, one core): " + ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
        print(f"SWIM, LAN profile, {args.seconds} s of cluster time, one member killed every {args.churn_s} s and "
              "restarted 20 s later; process CPU of the whole simulated cluster:")
        print("| nodes | plain CPU s | signed CPU s | extra CPU per node per s (ms) | signatures /node/s | "
              "verifications /node/s | transitions | refused |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for n in args.nodes:
            plain = run(n, args.seconds, args.churn_s, None, args.seed)
            signed = run(n, args.seconds, args.churn_s, pki, args.seed)
            per_node_s = n * args.seconds
            extra_ms = (signed["cpu_s"] - plain["cpu_s"]) / per_node_s * 1000
            print(f"| {n} | {plain['cpu_s']:.2f} | {signed['cpu_s']:.2f} | {extra_ms:.3f} | "
                  f"{signed['signatures'] / per_node_s:.3f} | {signed['verifications'] / per_node_s:.3f} | "
                  f"{signed['transitions']} (plain {plain['transitions']}) | {signed['rejected']} |")


if __name__ == "__main__":
    main()
