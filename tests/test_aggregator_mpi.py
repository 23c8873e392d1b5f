"""The aggregator under a real `mpirun -np N` (oversubscribed on a 2-core machine, OMP_NUM_THREADS=1).

One launch per N runs this file as the MPI program (see `_worker`): FedAvg and CMGA (with a
conflict), two rounds with server momentum each, a fresh strategy object per round, on the full
updates and on shape-matched ones (each client holds the experts and its own width's projector
bank only), then quality-weighted anchor teachers, a corrupted update that one rank discovers and an update
holding a block only in part. pytest compares the published globals with the in-process `Strategy.aggregate`
(test_aggregator.reference / sm_reference) to the tolerance in docs/aggregator.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedzero.store import FederationStore

REPO = Path(__file__).resolve().parents[1]
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
STRATEGIES = ("fedavg", "cmga")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install mpich)")]


def mpirun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([MPIRUN, "-np", str(n), sys.executable, *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_sharded_equals_in_process_strategy(tmp_path, ranks):
    from test_aggregator import (SM_CLIENTS, assert_matches_reference, make_delta, assert_sm_matches_reference, build_sm_store,
                                 build_store, check_quality_teachers, check_teachers, sm_delta, write_predictions,
                                 write_quality_predictions)

    for name in STRATEGIES:
        build_store(tmp_path / name)
        build_sm_store(tmp_path / f"sm-{name}")
    preds = write_predictions(FederationStore(tmp_path / "fedavg"), 0)
    quality_preds = write_quality_predictions(build_store(tmp_path / "quality", rounds=1), 0)
    build_store(tmp_path / "corrupt", rounds=1)
    partial = build_sm_store(tmp_path / "partial", rounds=1)
    delta = sm_delta("c", 0)
    del delta["proj.h8.out_proj.weight"]          # c lacks the whole of side_out.h8: fine
    del delta["proj.h8.slots.1.in_proj.weight"]   # ... and the whole of slot1.h8 (one key): fine
    del delta["proj.h8.slots.0.in_proj.bias"]     # ... but holds slot0.h8 only in part: an error
    partial.write_update(0, "c", delta, fingerprint=SM_CLIENTS["c"][0], num_samples=SM_CLIENTS["c"][1])
    nan = build_store(tmp_path / "nan", rounds=1)      # b's NaN is seen in the Gram of whichever rank holds it
    bad = make_delta("b", 0)
    bad["slots.0.gate"][1] = float("nan")
    nan.write_update(0, "b", bad, fingerprint="fa", num_samples=30)

    proc = mpirun(ranks, __file__, str(tmp_path))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_teachers(FederationStore(tmp_path / "fedavg", create=False), preds)
    check_quality_teachers(FederationStore(tmp_path / "quality", create=False), quality_preds)

    for name in STRATEGIES:
        store = FederationStore(tmp_path / name, create=False)
        assert_matches_reference(store, name)
        assert store.read_result(1)["ranks"] == ranks
        store = FederationStore(tmp_path / f"sm-{name}", create=False)
        assert_sm_matches_reference(store, name)
        assert store.read_result(1)["ranks"] == ranks
    # a bad update is left out (quarantined) and the round goes on, with the same outcome on every rank
    outcomes = [json.loads((tmp_path / f"corrupt.rank{r}.json").read_text()) for r in range(ranks)]
    assert all(o == outcomes[0] for o in outcomes) and outcomes[0]["error"] is None, outcomes
    assert outcomes[0]["clients"] == ["a", "b", "c"] and list(outcomes[0]["left_out"]) == ["d"]
    assert outcomes[0]["left_out"]["d"]["reason"].startswith("checksum mismatch for update of client d: "), outcomes
    outcomes = [json.loads((tmp_path / f"partial.rank{r}.json").read_text()) for r in range(ranks)]
    assert all(o == outcomes[0] for o in outcomes) and outcomes[0]["error"] is None, outcomes
    assert outcomes[0]["left_out"] == {"c": {"file": "rounds/r000000/updates/c/update.safetensors",
                                             "reason": "client 'c': delta holds block 'slot0.h8' only in part "
                                                       "(missing ['proj.h8.slots.0.in_proj.bias'])"}}, outcomes
    assert partial.has_global(1) and (partial.root / "rounds/r000000/quarantine/0001/reason.json").is_file()
    nan = FederationStore(tmp_path / "nan", create=False)
    assert nan.read_result(0)["left_out"]["b"]["reason"] == "tensor 'slots.0.gate' holds non-finite values (1 NaN, 0 Inf)"
    assert nan.read_result(0)["clients"] == ["a", "c", "d"]
    assert "[aggregate r1] slot0: 3 group(s)" in proc.stdout


def test_cli_two_ranks_reads_the_yaml_and_fails_below_quorum_naming_the_missing(tmp_path):
    from test_aggregator import CLIENTS, build_store, reference, write_updates

    store = build_store(tmp_path / "store", rounds=1)
    config = tmp_path / "run.yaml"
    config.write_text(
        "seed: 5\n"
        "federation: {rounds: 2, strategy: cmga, server_lr: 0.7, server_momentum: 0.9}\n"
        "clients:\n" + "".join(f"  - {{id: {c}}}\n" for c in CLIENTS))
    cmd = ["launch/aggregate.py", "--store", str(store.root), "--config", str(config)]

    proc = mpirun(2, *cmd, "--round", "0")

    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = reference("cmga", 1)[0]
    got = store.read_global(1)[0]
    for k in expected:
        torch.testing.assert_close(got[k].float(), expected[k].float(), rtol=1e-6, atol=1e-6)
    assert "[aggregate r0] arrived 4/4: a (+0.0 s), b (+0.0 s), c (+0.0 s), d (+0.0 s); missing: none" in proc.stdout

    # round 1: only a and c deliver; a quorum of 3 cannot be met by the deadline
    write_updates(store, 1, ["a", "c"])
    proc = mpirun(2, *cmd, "--round", "1", "--quorum", "3", "--deadline", "0.5", "--poll", "0.1")

    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "deadline of 0.5 s passed with 2 of the 3 updates the quorum needs; missing: b, d" in proc.stderr
    assert proc.stderr.count("aggregate: error:") == 1        # printed once, by rank 0
    assert not store.has_global(2)


def _worker(work: str) -> None:
    """The MPI program: every rank runs this."""
    from mpi4py import MPI

    sys.path.insert(0, str(Path(__file__).parent))
    from test_aggregator import _corrupt, quality_rule, strategy_for

    from fedzero.aggregator import AggregationError, run_aggregation
    from fedzero.store import FederationStore

    comm = MPI.COMM_WORLD
    work = Path(work)
    for name in STRATEGIES:
        for store in (name, f"sm-{name}"):
            for r in range(2):   # a fresh strategy per round, as separate launches would have
                run_aggregation(work / store, r, strategy_for(name), comm=comm)
    run_aggregation(work / "quality", 0, strategy_for("fedavg"), comm=comm, teacher_rule=quality_rule())
    if comm.Get_rank() == 0:
        store = FederationStore(work / "corrupt", create=False)
        _corrupt(store.update_path(0, "d"))   # hashed by rank 3 % N: the error starts away from rank 0 for N=2
    comm.Barrier()
    for case in ("corrupt", "partial", "nan"):
        try:
            result = run_aggregation(work / case, 0, strategy_for("cmga"), comm=comm)
            outcome = {"error": None, "clients": result["clients"], "left_out": result["left_out"]}
        except AggregationError as e:
            outcome = {"error": str(e)}
        (work / f"{case}.rank{comm.Get_rank()}.json").write_text(json.dumps(outcome))


if __name__ == "__main__":
    _worker(sys.argv[1])
