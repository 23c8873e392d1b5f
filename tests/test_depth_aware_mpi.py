"""Depth-aware projector banks through the MPI aggregator under `mpirun -np 2`: two rounds with
server momentum, three banks of one family (one far), equal to the in-process Strategy.aggregate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fedzero.adapters.dema import shared_block
from fedzero.store import FederationStore
from fedzero.strategies import ClientUpdate, make_strategy

sys.path.insert(0, str(Path(__file__).parent))
from test_aggregator_mpi import MPIRUN, mpirun  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install mpich)")]

BANKS = {"h4_aaaa": [[0.0, 0.5]], "h4_bbbb": [[0.25, 0.75]], "h4_cccc": [[0.8, 1.0]]}   # c overlaps nobody
CLIENTS = {"a1": ("h4_aaaa", 10), "a2": ("h4_aaaa", 30), "b": ("h4_bbbb", 20), "c": ("h4_cccc", 5)}
SHAPES = {"slots.0.x": (5, 3)} | {f"proj.{b}.slots.0.{p}.weight": (4, 6) for b in BANKS for p in ("in_proj", "out_proj")}
OPTS = {"server_lr": 0.8, "server_momentum": 0.5}


def _global():
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g) for k, s in sorted(SHAPES.items())}


def _update(cid, r):
    bank, n = CLIENTS[cid]
    g = torch.Generator().manual_seed(100 * r + ord(cid[0]) + len(cid))
    delta = {k: torch.randn(s, generator=g) for k, s in sorted(SHAPES.items()) if k.startswith("slots.") or f".{bank}." in k}
    depth = {"overlap_min": 0.3, "blocks": {f"slot0.{bank}": {"family": "slot0.h4", "ranges": BANKS[bank]}}}
    return ClientUpdate(cid, delta, n, cid, {"slot0": 1, f"slot0.{bank}": 1}, depth)


def _reference(rounds=2):
    s, state, out = make_strategy("fedavg", **OPTS), _global(), []
    for r in range(rounds):
        state, metrics = s.aggregate(state, [_update(c, r) for c in CLIENTS], round=r, block_of=shared_block)
        out.append((state, metrics))
    return out


def test_mpi_aggregator_equals_single_process(tmp_path):
    store = FederationStore(tmp_path / "store")
    store.publish_global(0, _global())
    for r in range(2):
        for c in CLIENTS:
            u = _update(c, r)
            store.write_update(r, c, u.delta, fingerprint=u.group, num_samples=u.num_samples, slot_use=u.slot_use,
                               depth=u.depth)

    proc = mpirun(2, __file__, str(store.root))

    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r, (expected, metrics) in enumerate(_reference()):
        got, _ = store.read_global(r + 1)
        assert sorted(got) == sorted(expected)
        for k in expected:
            if ".h4_cccc." in k or ".h4_aaaa." in k or ".h4_bbbb." in k:    # rank 0, the in-process function
                assert torch.equal(got[k], expected[k]), (r, k)
            else:
                torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-6)
        result = store.read_result(r)
        assert result["blocks"]["slot0.h4_cccc"]["beta"] == [0.0, 0.0, 0.0, 1.0]
        assert result["blocks"]["slot0.h4_aaaa"]["depth"]["overlap"] == metrics["blocks"]["slot0.h4_aaaa"]["depth"]["overlap"]
        assert result["blocks"]["slot0.h4_aaaa"]["beta"] == metrics["blocks"]["slot0.h4_aaaa"]["beta"]
    buffers = store.read_server_state(1)
    assert sorted(buffers) == sorted(SHAPES)


def _worker(root: str) -> None:
    from mpi4py import MPI

    from fedzero.aggregator import run_aggregation

    for r in range(2):
        run_aggregation(root, r, make_strategy("fedavg", **OPTS), comm=MPI.COMM_WORLD)


if __name__ == "__main__":
    _worker(sys.argv[1])
