"""`fedzero federate`'s round-0 canonical exchange (canonical projectors only; docs/method.md, "A
canonical shared space"): federate launches the clients of a round one after another, so the exchange
runs as a phase of its own before round 0: every client once with launch/client.py --canonical-bases
(it reads its anchor states and sends its bases), then launch/aggregate.py --canonical (the targets).
Round 0's clients then find the targets and fit onto them. Skipped when the targets are published.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedzero.store import FederationStore
from fedzero.store import canonical as exchange


def canonical_phase(run, launch, out: Path, store: FederationStore, client_yaml: dict[str, Path], config: Path,
                    deepspeed: str, mpirun: str) -> None:
    from fedzero.federate import _launch_script, _run

    if not run.dema.uses_canonical or exchange.has_targets(store):
        return
    store_dir = store.root
    sent = {m["client_id"] for m in exchange.list_bases(store)}
    ids = [c.id for c in run.clients]
    for i, cid in enumerate(ids):
        if cid in sent:
            print(f"canonical exchange: client {cid} already sent its bases", flush=True)
            continue
        cmd = [deepspeed, "--hostfile", str(out / "hostfile"), "--no_ssh", "--node_rank", "0",
               "--master_addr", "127.0.0.1", "--master_port", str(launch.base_port + i),
               str(_launch_script("client.py")), "--config", str(client_yaml[cid]), "--store", str(store_dir),
               "--round", "0", "--canonical-bases"]
        seconds = _run(cmd, out / "logs" / f"canonical-client-{cid}.log", f"client {cid}'s canonical bases")
        print(f"canonical exchange: client {cid} sent its anchor bases in {seconds:.1f} s", flush=True)
    cmd = [mpirun, "-np", str(launch.aggregator_ranks), sys.executable, str(_launch_script("aggregate.py")),
           "--store", str(store_dir), "--canonical", "--config", str(Path(config).resolve()), "--expected", *ids]
    if launch.quorum is not None:
        cmd += ["--quorum", str(launch.quorum)]
    if launch.deadline_s is not None:
        cmd += ["--deadline", str(launch.deadline_s)]
    seconds = _run(cmd, out / "logs" / "canonical-aggregate.log", "the canonical targets")
    print(f"canonical exchange: targets published in {seconds:.1f} s", flush=True)
