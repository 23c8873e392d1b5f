"""Token-level distillation (distill.level: token) through the distributed paths, mirroring the
label-level tests: the aggregator's round (in process, and under `mpirun` through launch/aggregate.py
reading distill.level from the run YAML) publishes exactly the teachers round_token_teachers makes in
process; the DeepSpeed client (torchrun, 2 processes, ZeRO-2 and ZeRO-3) distils from a token teacher
and sends token predictions equal to the single-process LocalClient's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from fedzero.distill.teachers import TeacherRule
from fedzero.distill.tokens import round_token_teachers
from fedzero.store import FederationStore
from test_deepspeed_client import ds_ops, workspace  # noqa: F401  (fixtures: the DeepSpeed client's workspace)

REPO = Path(__file__).resolve().parent.parent
ANCHORS = "c" * 64


def write_token_predictions(store: FederationStore, round: int, clients=("a", "b", "c")) -> dict:
    """Top-3 next-token rows at 5 positions, per client (its own seeded ids and probabilities)."""
    preds = {}
    for c in clients:
        g = torch.Generator().manual_seed(ord(c))
        ids = torch.stack([torch.randperm(40, generator=g)[:3] for _ in range(5)]).to(torch.int32)
        probs = torch.softmax(torch.randn(5, 3, generator=g), dim=1)
        store.write_token_predictions(round, c, ids, probs, tokenizer="fp", anchors=ANCHORS)
        preds[c] = (ids.numpy(), probs.numpy())
    return preds


def check_token_teachers(store: FederationStore, preds: dict, samples: dict) -> None:
    """Round 1's teachers are exactly those round_token_teachers makes in process; d (no predictions)
    reads the all-clients mixture."""
    assert store.read_result(0)["distill"] == {"used": sorted(preds), "dropped": {}, "level": "token",
                                               "tokenizer": "fp"}
    expected = round_token_teachers(preds, {c: samples[c] for c in preds})
    assert sorted(expected) == ["*", *sorted(preds)]
    for c in [*preds, "d"]:
        ids, probs = store.read_token_teacher(1, c)
        want = expected.get(c, expected["*"])
        assert torch.equal(ids, want[0]) and torch.equal(probs, want[1]), c
        torch.testing.assert_close(probs.double().sum(dim=1), torch.ones(5, dtype=torch.float64))


def test_the_aggregators_round_publishes_token_teachers(tmp_path):
    from test_aggregator import CLIENTS, build_store, quiet, strategy_for

    from fedzero.aggregator import run_aggregation

    store = build_store(tmp_path / "store", rounds=1)
    preds = write_token_predictions(store, 0)
    run_aggregation(store.root, 0, strategy_for("fedavg"), comm=None, log=quiet, teacher_rule=TeacherRule(level="token"))
    check_token_teachers(store, preds, {c: v[1] for c, v in CLIENTS.items()})


MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install mpich)")
def test_mpi_aggregator_reads_distill_level_from_the_run_yaml(tmp_path):
    from test_aggregator import CLIENTS, build_store

    store = build_store(tmp_path / "store", rounds=1)
    preds = write_token_predictions(store, 0)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"seed": 5, "federation": {"rounds": 2, "strategy": "fedavg"},
                                      "clients": [{"id": c} for c in CLIENTS],
                                      "distill": {"level": "token", "top_k": 3}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([MPIRUN, "-np", "2", sys.executable, "launch/aggregate.py", "--store", str(store.root),
                           "--config", str(config), "--round", "0"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    check_token_teachers(store, preds, {c: v[1] for c, v in CLIENTS.items()})


# ---------------------------------------------------------------- the DeepSpeed client

TOKEN_DISTILL = {"level": "token", "top_k": 4, "anchors": 4, "batch_size": 2, "weight": 2.0, "max_chars": 40}


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_torchrun_two_processes_distil_token_level_as_the_local_client(workspace, ds_ops, ds_config):
    """torchrun, 2 processes: the client distils from a token teacher already in round 0 and sends its
    token predictions (ZeRO-3: every rank scores, the forward is collective); its update and its
    predictions equal LocalClient's on the same backbone, data, seed and teacher."""
    from test_deepspeed_client import TOL, _client_yaml, _env, _run

    from fedzero.backbones import load_backbone
    from fedzero.client import LocalClient
    from fedzero.client.client_config import load_client_config
    from fedzero.client.distributed import free_port
    from fedzero.adapters.dema import inject_dema
    from fedzero.data import build_examples, load_tokenizer, read_jsonl
    from fedzero.distill.tokens import mix_sparse

    stage = 2 if ds_config == "zero2.json" else 3
    path = _client_yaml(workspace, f"tok{stage}", ds_config=ds_config,
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None)
    data = yaml.safe_load(path.read_text())
    data["distill"] = TOKEN_DISTILL
    path.write_text(yaml.safe_dump(data))
    cfg = load_client_config(path)
    store = FederationStore(path.parent / "store", create=False)
    tok = load_tokenizer("byte")

    def local_client():
        model, fp = load_backbone(cfg.client.backbone)
        handle = inject_dema(model, cfg.dema, tokenizer=tok)
        examples = build_examples(read_jsonl(cfg.client.train_data), tok, cfg.client.train.max_length)
        distiller = cfg.distill.make_distiller(tok, max_length=cfg.client.train.max_length, seed=cfg.seed)
        return LocalClient("c1", handle, fp, examples, examples[:2], cfg.client.train, pad_id=tok.pad_token_id,
                           seed=cfg.seed, total_rounds=cfg.total_rounds, distiller=distiller)

    # a teacher in round 0: another seed's predictions on the same anchors
    teacher_client = local_client()
    torch.manual_seed(7)
    for p in teacher_client.handle.model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    ids, probs = mix_sparse([teacher_client.distiller.predict(teacher_client.handle.model)],
                            np.ones((1, teacher_client.distiller.num_positions)))
    store.write_token_teachers(0, {"c1": (torch.as_tensor(ids, dtype=torch.int32), torch.as_tensor(probs))})

    ref = local_client()
    ref.distiller.set_teacher(ref.distiller.read_teacher(store, 0, "c1"))
    g, _ = store.read_global(0)
    delta, _ = ref.train_round(g)
    ref_ids, ref_probs = ref.distiller.predict(ref.handle.model)

    torchrun = str(Path(sys.executable).parent / "torchrun")
    rc, out = _run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/client.py",
                    "--config", str(path), "--store", str(path.parent / "store"), "--round", "0"], _env())
    assert rc == 0, out[-3000:]
    update, _ = store.read_update(0, "c1")
    worst = max(float((update[k] - delta[k]).abs().max()) for k in update)
    assert worst < TOL, f"update differs from LocalClient's by {worst:.2e}"
    sent = store.read_token_predictions(0, "c1")
    assert sent["tokenizer"] == ref.distiller.tokenizer and sent["anchors"] == ref.distiller.anchors_digest
    np.testing.assert_array_equal(sent["ids"].numpy(), ref_ids)
    np.testing.assert_allclose(sent["probs"].numpy(), ref_probs, atol=10 * TOL)


# ---------------------------------------------------------------- fedzero federate

@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun not found (pip install mpich)")
def test_federate_token_level_through_the_launchers(tmp_path):
    """`fedzero federate` with distill.level: token: the DeepSpeed clients send token predictions on every
    position of the anchor texts, the MPI aggregator (reading the run YAML) turns them into the next
    round's token teachers: with two clients each one's teacher is the other's predictions."""
    from test_federate import _client

    from fedzero.cli import main

    run = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
           "federation": {"rounds": 2, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 64},
           "clients": [_client("a", 16, 2, 1, "airlines"), _client("b", 24, 1, 2, "apple")],
           "distill": {"level": "token", "top_k": 4, "anchors": 3, "batch_size": 2, "max_chars": 40}}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert main(["federate", "--config", str(cfg), "--out", str(tmp_path / "out"), "--aggregator-ranks", "2"]) == 0
    store = FederationStore(tmp_path / "out" / "store", create=False)
    assert store.read_token_teacher(0, "a") is None
    for rnd in (0, 1):
        result = store.read_result(rnd)["distill"]
        assert result["used"] == ["a", "b"] and result["dropped"] == {} and result["level"] == "token"
        for me, other in (("a", "b"), ("b", "a")):
            sent = store.read_token_predictions(rnd, other)
            assert sent["ids"].shape[1] == 4 and sent["ids"].shape[0] > 3       # many positions per anchor
            ids, probs = store.read_token_teacher(rnd + 1, me)
            order = np.lexsort((sent["ids"].numpy(), -sent["probs"].numpy().astype(np.float64)), axis=1)
            np.testing.assert_array_equal(ids.numpy(), np.take_along_axis(sent["ids"].numpy(), order, axis=1))
            np.testing.assert_allclose(probs.numpy(), np.take_along_axis(sent["probs"].numpy(), order, axis=1),
                                       atol=1e-6)
