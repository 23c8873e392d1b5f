"""The canonical projector's round-0 exchange through the store (fedzero/store/canonical.py,
fedzero/adapters/dema/canonical_exchange.py, fedzero/aggregator/canonical.py, fedzero/client/canonical.py):
equal to fit_canonical in one process, end to end through `fedzero simulate`, refusals naming who and why."""

import json

import pytest
import torch
import yaml

from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.canonical import anchor_states, fit_canonical
from fedzero.adapters.dema.canonical_exchange import (MAP_FILE, anchor_set, client_bases,
                                                      inject_awaiting_map, read_anchor_states, read_map)
from fedzero.aggregator import QuorumError
from fedzero.aggregator.canonical import run_canonical
from fedzero.client.canonical import exchange_in_process, fit_from_targets, send_bases
from fedzero.config import load_run_config
from fedzero.data import ByteTokenizer
from fedzero.simulate import simulate
from fedzero.store import FederationStore, StoreConflictError, StoreIntegrityError
from fedzero.store import canonical as exchange

from conftest import tiny_llama
from test_deepspeed_client import ds_ops, workspace  # noqa: F401  (fixtures of the slow DeepSpeed tests)
from test_simulate import tiny_run

TOK = ByteTokenizer()
WORDS = ("red", "blue", "green", "cat", "dog", "sun", "rain", "tree", "sea", "road", "bird", "fish", "hill", "moon")


def anchor_file(path, texts=None):
    texts = texts or [f"{a} {b} {c}" for a, b, c in zip(WORDS, WORDS[3:] + WORDS[:3], WORDS[7:] + WORDS[:7])]
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def config(path, **kw):
    return DeMAConfig(**{"rank": 3, "num_experts": 2, "num_slots": 2, "share": "experts-only", "num_anchors": 12,
                         "canonical_components": 5, "projector": "canonical", "anchor_file": str(path), **kw})


class Client:
    """What exchange_in_process reads of a LocalClient."""

    def __init__(self, cid, model, cfg, fingerprint=None):
        self.client_id, self.tokenizer, self.fingerprint = cid, TOK, fingerprint or f"fp-{cid}"
        self.handle = inject_awaiting_map(model, cfg, tokenizer=TOK)


def models():
    return {"a": tiny_llama(seed=1, vocab=259, hidden=32, layers=3, heads=4, kv_heads=2),
            "b": tiny_llama(seed=2, vocab=259, hidden=24, layers=4, heads=4, kv_heads=2)}


def test_the_exchange_through_the_store_equals_fit_canonical_in_one_process(tmp_path):
    cfg = config(anchor_file(tmp_path / "anchors.jsonl"))
    texts = anchor_set(cfg).texts
    bare = models()
    states = {cid: anchor_states(m, TOK, texts, placement=cfg.placement) for cid, m in sorted(bare.items())}
    slots = {cid: [cfg.slot_of_layer(l, len(h)) for l in range(len(h))] for cid, h in states.items()}
    expected, _ = fit_canonical(states, slots, rank=cfg.rank, components=cfg.canonical_dims, ridge=cfg.canonical_ridge)

    store = FederationStore(tmp_path / "store")
    clients = [Client(cid, m, cfg) for cid, m in models().items()]
    # the model awaiting its map refuses to run, except to read its anchor states (which equal the bare backbone's)
    with pytest.raises(RuntimeError, match="no map yet"):
        clients[0].handle.model(input_ids=torch.tensor([[1, 2, 3]]))
    for c in clients:
        for got, want in zip(read_anchor_states(c.handle.model, TOK, texts, placement=cfg.placement), states[c.client_id]):
            assert torch.equal(got, want)
    report = exchange_in_process(store, clients, cfg, lambda cid: tmp_path / "clients" / cid)
    assert report["clients"] == ["a", "b"] and report["slots"] == [0, 1]

    for c in clients:
        saved, header = read_map(tmp_path / "clients" / c.client_id / MAP_FILE)
        assert header["client"] == c.client_id and header["anchors"] == anchor_set(cfg).digest
        assert len(saved) == len(expected[c.client_id])
        for (mu, w), (mu0, w0) in zip(saved, expected[c.client_id]):
            assert mu.dtype == torch.float64 and torch.equal(mu, mu0) and torch.equal(w, w0)    # bit for bit
        for layer, (mu0, w0) in enumerate(expected[c.client_id]):
            proj = c.handle.private.layers[layer].in_proj
            assert torch.equal(proj.mu, mu0.float()) and torch.equal(proj.weight, w0.T.float())
        c.handle.model(input_ids=torch.tensor([[1, 2, 3]]))       # the guard is lifted

    # Only Q travelled: N x m per layer, orthonormal; the store holds no states, means or maps.
    bases, manifest = exchange.read_bases(store, "a")
    assert [tuple(q.shape) for q in bases] == [(12, 5)] * 3 and manifest.slots == [0, 0, 1]
    for q, h in zip(bases, states["a"]):
        assert torch.equal(q, client_basis_of(h, 5))
    names = {p.name for p in (tmp_path / "store").rglob("*.safetensors")}
    assert names == {"bases.safetensors", "targets.safetensors"}
    targets, tm = exchange.read_targets(store)
    assert sorted(targets) == [0, 1] and tm.clients == ["a", "b"] and tuple(targets[0].shape) == (12, 3)


def client_basis_of(h, m):
    return client_bases([h], m)[0]


def test_a_second_exchange_loads_the_saved_maps_and_the_targets_are_write_once(tmp_path):
    cfg = config(anchor_file(tmp_path / "anchors.jsonl"))
    store = FederationStore(tmp_path / "store")
    first = [Client(cid, m, cfg) for cid, m in models().items()]
    exchange_in_process(store, first, cfg, lambda cid: tmp_path / "clients" / cid)
    again = [Client(cid, m, cfg) for cid, m in models().items()]
    assert exchange_in_process(store, again, cfg, lambda cid: tmp_path / "clients" / cid) is None     # loaded
    for c0, c1 in zip(first, again):
        assert all(torch.equal(a, b) for a, b in zip(c0.handle.private.state_dict().values(),
                                                    c1.handle.private.state_dict().values()))
    # write-once: other targets are refused; bases cannot change under published targets
    targets, m = exchange.read_targets(store)
    with pytest.raises(StoreConflictError):
        exchange.publish_targets(store, {s: -g for s, g in targets.items()}, anchors=m.anchors,
                                 anchor_source=m.anchor_source, num_anchors=m.num_anchors, components=m.components,
                                 rank=m.rank, clients=m.clients, shared={})
    with pytest.raises(Exception, match="already published"):
        exchange.write_bases(store, "a", exchange.read_bases(store, "a")[0], fingerprint="x", anchors=m.anchors,
                             anchor_source="x", num_anchors=12, components=5, rank=3, slots=[0, 0, 1])
    # a saved map of another backbone is refused, naming what differs
    other = [Client("a", models()["a"], cfg, fingerprint="another")]
    with pytest.raises(ValueError, match="fingerprint 'fp-a' in the file, 'another' now"):
        exchange_in_process(store, other, cfg, lambda cid: tmp_path / "clients" / cid)


def test_a_tampered_targets_file_is_refused(tmp_path):
    cfg = config(anchor_file(tmp_path / "anchors.jsonl"))
    store = FederationStore(tmp_path / "store")
    exchange_in_process(store, [Client(c, m, cfg) for c, m in models().items()], cfg, lambda cid: tmp_path / cid)
    path = exchange.targets_files(store).tensors
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(StoreIntegrityError, match="checksum mismatch for canonical targets"):
        exchange.read_targets(store)


def test_clients_on_different_anchor_files_are_refused_naming_them(tmp_path):
    one = anchor_file(tmp_path / "one.jsonl")
    two = anchor_file(tmp_path / "two.jsonl", [f"{w} and {v}" for w, v in zip(WORDS, reversed(WORDS))])
    store = FederationStore(tmp_path / "store")
    for (cid, model), path in zip(models().items(), (one, two)):
        cfg = config(path)
        anchors = anchor_set(cfg)
        c = Client(cid, model, cfg)
        states = read_anchor_states(c.handle.model, TOK, anchors.texts, placement=cfg.placement)
        send_bases(store, cid, states, c.handle.slot_of_layer(), cfg, anchors, c.fingerprint)
    with pytest.raises(Exception, match=r"different anchor texts.*a on .*one\.jsonl.*b on .*two\.jsonl"):
        run_canonical(store, expected=["a", "b"], deadline_s=0, log=lambda m: None)
    assert not exchange.has_targets(store)


def test_targets_of_other_anchor_texts_are_refused_by_the_client(tmp_path):
    cfg = config(anchor_file(tmp_path / "one.jsonl"))
    store = FederationStore(tmp_path / "store")
    exchange_in_process(store, [Client(c, m, cfg) for c, m in models().items()], cfg, lambda cid: tmp_path / cid)
    late_cfg = config(anchor_file(tmp_path / "two.jsonl", [f"{w}!" for w in WORDS]))
    late = Client("late", models()["a"], late_cfg)
    anchors = anchor_set(late_cfg)
    states = read_anchor_states(late.handle.model, TOK, anchors.texts, placement=late_cfg.placement)
    with pytest.raises(ValueError, match=r"client late: .*other anchor texts .*one\.jsonl.*than this client reads .*two\.jsonl"):
        fit_from_targets("late", states, late.handle.slot_of_layer(), exchange.read_targets(store), late_cfg, anchors)


def test_a_missing_clients_bases_are_named_at_the_deadline(tmp_path):
    cfg = config(anchor_file(tmp_path / "anchors.jsonl"))
    store = FederationStore(tmp_path / "store")
    c = Client("a", models()["a"], cfg)
    anchors = anchor_set(cfg)
    send_bases(store, "a", read_anchor_states(c.handle.model, TOK, anchors.texts, placement=cfg.placement),
               c.handle.slot_of_layer(), cfg, anchors, c.fingerprint)
    with pytest.raises(QuorumError, match=r"canonical exchange: deadline of 0.05 s passed .*missing: b\b") as err:
        run_canonical(store, expected=["a", "b"], deadline_s=0.05, poll_s=0.01, log=lambda m: None)
    assert err.value.missing == ["b"]
    # a quorum of 1 goes ahead without b; b, arriving late, fits onto the published targets
    report = run_canonical(store, expected=["a", "b"], quorum=1, deadline_s=0.05, poll_s=0.01, log=lambda m: None)
    assert report["clients"] == ["a"] and report["missing"] == ["b"]
    late = Client("b", models()["b"], cfg)
    assert exchange_in_process(store, [late], cfg, lambda cid: tmp_path / cid) is not None
    assert not exchange.bases_files(store, "b").manifest.exists()      # it only fitted
    assert (tmp_path / "b" / MAP_FILE).is_file()
    # a client that waits for targets nobody publishes is told so, by name
    empty = FederationStore(tmp_path / "empty")
    with pytest.raises(Exception, match="client z: timed out .*canonical targets"):
        exchange.TargetsWait(empty, 0.0, client_id="z").wait(poll=0.01)


def canonical_run(tmp_path, projector="canonical+learned"):
    path = tiny_run(tmp_path, "fedavg", rounds=1)
    raw = yaml.safe_load(path.read_text())
    anchor_file(tmp_path / "anchors.jsonl")
    raw["dema"].update(projector=projector, rank=3, num_anchors=12, canonical_components=5, anchor_file="anchors.jsonl")
    path.write_text(yaml.safe_dump(raw))
    return load_run_config(path)


def test_simulate_with_canonical_learned_equals_an_in_process_reference(tmp_path):
    run = canonical_run(tmp_path)
    summary = simulate(run, tmp_path / "out", progress=False, report_to="none") if _takes_report_to() else \
        simulate(run, tmp_path / "out", progress=False)
    assert summary["status"] == "complete"
    store = FederationStore(tmp_path / "out" / "store")
    assert exchange.read_targets(store)[1].clients == ["a", "b"]

    # The reference: fit_canonical on the bare backbones' states, inject, train round 0 in process.
    from fedzero.backbones import load_backbone
    from fedzero.client.local import LocalClient
    from fedzero.data import build_examples, load_tokenizer, read_jsonl
    from fedzero.strategies import ClientUpdate

    texts = anchor_set(run.dema).texts
    built, states = {}, {}
    for c in run.clients:
        model, fp = load_backbone(c.backbone)
        tok = load_tokenizer(c.backbone.tokenizer, c.backbone.path)
        built[c.id] = (c, model, fp, tok)
        states[c.id] = anchor_states(model, tok, texts, placement=run.dema.placement)
    slots = {cid: [run.dema.slot_of_layer(l, len(h)) for l in range(len(h))] for cid, h in states.items()}
    fitted, _ = fit_canonical(states, slots, rank=run.dema.rank, components=run.dema.canonical_dims,
                              ridge=run.dema.canonical_ridge)
    from fedzero.adapters.dema.blocks import global_blocks

    global0, manifest0 = store.read_global(0)
    updates = []
    for cid, (c, model, fp, tok) in built.items():
        saved, _ = read_map(tmp_path / "out" / "clients" / cid / MAP_FILE)
        assert all(torch.equal(m, m0) and torch.equal(w, w0) for (m, w), (m0, w0) in zip(saved, fitted[cid]))
        handle = inject_dema(model, run.dema, tokenizer=tok, canonical=fitted[cid])
        client = LocalClient(cid, handle, fp, build_examples(read_jsonl(c.train_data), tok, c.train.max_length), [],
                             c.train, pad_id=tok.pad_token_id, seed=run.seed, total_rounds=run.federation.rounds)
        delta, _ = client.train_round(global0)
        stored, _ = store.read_update(0, cid)
        assert sorted(stored) == sorted(delta)
        for k in delta:
            torch.testing.assert_close(stored[k], delta[k], rtol=0, atol=0)
        updates.append(ClientUpdate(cid, delta, client.num_samples, fp, handle.slot_use()))
    new_state, _ = run.federation.make_strategy(seed=run.seed).aggregate(
        global0, updates, round=0, block_of=global_blocks(global0, manifest0["meta"].get("blocks")))
    published, _ = store.read_global(1)
    for k in new_state:
        torch.testing.assert_close(published[k], new_state[k], rtol=0, atol=0)


def _takes_report_to():
    import inspect
    return "report_to" in inspect.signature(simulate).parameters


def test_export_of_a_canonical_client_carries_its_map(tmp_path, monkeypatch):
    import fedzero.peft  # noqa: F401  (registers DeMA with PEFT)
    import fedzero.simulate as sim
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedzero.backbones import load_backbone
    from fedzero.export import export_adapter
    from fedzero.run_dirs import RunDirError

    kept = {}

    def keep(cfg, run):
        kept[cfg.id] = client = build(cfg, run)
        return client

    build = sim.build_client
    monkeypatch.setattr(sim, "build_client", keep)
    run = canonical_run(tmp_path)
    sim.simulate(run, tmp_path / "out", progress=False)
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(0))
    for c in run.clients:
        adapter = export_adapter(tmp_path / "out", c.id, tmp_path / f"adapter-{c.id}")
        tensors = load_file(adapter / "adapter_model.safetensors")
        saved, _ = read_map(tmp_path / "out" / "clients" / c.id / MAP_FILE)
        for layer, (mu, w) in enumerate(saved):
            key = f"base_model.model.dema_private.layers.{layer}.in_proj"
            assert torch.equal(tensors[f"{key}.mu"], mu.float()) and torch.equal(tensors[f"{key}.weight"], w.T.float())
        model = PeftModel.from_pretrained(load_backbone(c.backbone)[0], adapter)
        with torch.no_grad():
            assert torch.equal(model(input_ids=x).logits, kept[c.id].handle.model(input_ids=x).logits)
    (tmp_path / "out" / "clients" / "a" / MAP_FILE).unlink()
    with pytest.raises(RunDirError, match=r"client 'a' uses projector 'canonical\+learned'.*no canonical map at"):
        export_adapter(tmp_path / "out", "a", tmp_path / "adapter-again")


# =========================================================================== real launches (slow)

def _bases_in(tmp_path, name, anchors_path):
    """A store holding clients a and b's bases (as their processes would write them)."""
    cfg = config(anchors_path)
    anchors = anchor_set(cfg)
    store = FederationStore(tmp_path / name)
    for cid, model in models().items():
        c = Client(cid, model, cfg)
        send_bases(store, cid, read_anchor_states(c.handle.model, TOK, anchors.texts, placement=cfg.placement),
                   c.handle.slot_of_layer(), cfg, anchors, c.fingerprint)
    return store


@pytest.mark.slow
def test_mpi_aggregator_two_ranks_publishes_the_targets_of_one_process(tmp_path):
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("mpirun not found (pip install mpich)")
    repo = Path(__file__).resolve().parent.parent
    anchors_path = anchor_file(tmp_path / "anchors.jsonl")
    one, two = _bases_in(tmp_path, "one", anchors_path), _bases_in(tmp_path, "two", anchors_path)
    run_canonical(one, expected=["a", "b"], log=lambda m: None)
    config_path = tmp_path / "run.yaml"
    config_path.write_text("seed: 0\nfederation: {rounds: 1}\nclients:\n  - {id: a}\n  - {id: b}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    cmd = [mpirun, "-np", "2", sys.executable, "launch/aggregate.py", "--store", str(two.root), "--canonical",
           "--config", str(config_path)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "[aggregate canonical] published the targets of slots [0, 1] from a, b" in proc.stdout
    assert exchange.read_targets(two)[1].sha256 == exchange.read_targets(one)[1].sha256      # the same bytes
    # below the quorum by the deadline: exit 2, the missing client named once (by rank 0)
    three = FederationStore(tmp_path / "three")
    shutil.copytree(exchange.bases_files(two, "a").manifest.parent, exchange.bases_files(three, "a").manifest.parent)
    proc = subprocess.run([*cmd[:6], str(three.root), *cmd[7:], "--deadline", "0.3", "--poll", "0.1"], cwd=repo,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "canonical exchange: deadline of 0.3 s passed with the bases of 1 client(s), the quorum needs 2; missing: b" \
        in proc.stderr and proc.stderr.count("aggregate: error:") == 1
    assert not exchange.has_targets(three)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_deepspeed_client_two_processes_runs_the_exchange(workspace, ds_ops, ds_config):
    """torchrun, 2 processes, projector canonical+learned on the bundled anchors. Under ZeRO-3 the
    backbone is partitioned (persistence threshold 0): its anchor states are read through the engine's
    gathering forward. The client sends its bases and waits; the test plays the aggregator
    (run_canonical); the client fits, saves its map and trains round 0: map and update equal the
    single-process reference (fit_canonical + LocalClient). A restarted client loads its map."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    from test_deepspeed_client import REPO, TOL, _client_yaml, _env, free_port

    from fedzero.backbones import load_backbone
    from fedzero.client import LocalClient
    from fedzero.client.client_config import load_client_config
    from fedzero.client.state_layout import ClientStateLayout
    from fedzero.data import build_examples, load_tokenizer, read_jsonl

    stage = 3 if ds_config == "zero3.json" else 2
    path = _client_yaml(workspace, f"canon{stage}", ds_config=ds_config, projector="canonical+learned",
                        num_anchors=24, canonical_components=10,
                        overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else None)
    cfg = load_client_config(path)
    store = FederationStore(path.parent / "store", create=False)

    # the reference, in one process
    model, fp = load_backbone(cfg.client.backbone)
    tok = load_tokenizer("byte")
    texts = anchor_set(cfg.dema).texts
    states = anchor_states(model, tok, texts, placement=cfg.dema.placement)
    slots = [cfg.dema.slot_of_layer(l, len(states)) for l in range(len(states))]
    fitted, _ = fit_canonical({"c1": states}, {"c1": slots}, rank=cfg.dema.rank, components=cfg.dema.canonical_dims,
                              ridge=cfg.dema.canonical_ridge)
    handle = inject_dema(model, cfg.dema, tokenizer=tok, canonical=fitted["c1"])
    examples = build_examples(read_jsonl(cfg.client.train_data), tok, cfg.client.train.max_length)
    ref = LocalClient("c1", handle, fp, examples, examples[:2], cfg.client.train, pad_id=tok.pad_token_id,
                      seed=cfg.seed, total_rounds=cfg.total_rounds)
    delta, _ = ref.train_round(store.read_global(0)[0])

    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/client.py",
           "--config", str(path), "--store", str(store.root), "--round", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 200
        while not exchange.list_bases(store) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        report = run_canonical(store, expected=["c1"], deadline_s=0, log=lambda m: None)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert report["clients"] == ["c1"]
    assert f"ZeRO-{stage} fp32 on 2 cpu process(es)" in out

    bases, _ = exchange.read_bases(store, "c1")
    assert all(float((q - client_basis_of(h, 10)).abs().max()) < 1e-6 for q, h in zip(bases, states))
    saved, header = read_map(ClientStateLayout(path.parent / "state").private_dir / MAP_FILE)
    assert header["fingerprint"] == fp
    for (mu, w), (mu0, w0) in zip(saved, fitted["c1"]):
        assert float((mu - mu0).abs().max()) < 1e-5 * (1 + float(mu0.abs().max()))
        assert float((w - w0).abs().max()) < 1e-4 * (1 + float(w0.abs().max()))
    update, _ = store.read_update(0, "c1")
    assert sorted(update) == sorted(delta)
    worst = max(float((update[k] - delta[k]).abs().max()) for k in update)
    assert worst < 10 * TOL, f"update differs from LocalClient's by {worst:.2e}"

    # a restarted client (round 1) loads its map: no new bases, no wait
    nxt = {k: v + delta[k] for k, v in store.read_global(0)[0].items()}
    store.publish_global(1, nxt)
    rc = subprocess.run(cmd[:-1] + ["1"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert rc.returncode == 0, (rc.stdout + rc.stderr)[-3000:]
    assert store.has_update(1, "c1")


@pytest.mark.slow
def test_federate_runs_the_exchange_before_round_0(tmp_path):
    """`fedzero federate` with canonical+learned: every client sends its bases (launch/client.py
    --canonical-bases), the MPI aggregator (2 ranks) publishes the targets, round 0's clients fit onto
    them. Each client's saved map is fit_canonical's in one process on the same backbones."""
    import shutil
    import sys
    from pathlib import Path

    from test_federate import _client

    from fedzero.backbones import BackboneSpec, load_backbone
    from fedzero.cli import main

    if shutil.which("mpirun") is None and not (Path(sys.executable).parent / "mpirun").exists():
        pytest.skip("mpirun not installed (pip install mpich)")
    anchor_file(tmp_path / "anchors.jsonl")
    run = {"seed": 0, "dema": {"rank": 3, "num_experts": 2, "num_slots": 2, "projector": "canonical+learned",
                               "num_anchors": 12, "canonical_components": 5,
                               "anchor_file": str(tmp_path / "anchors.jsonl")},
           "federation": {"rounds": 1, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 64},
           "clients": [_client("a", 16, 2, 1, "airlines"), _client("b", 24, 3, 2, "apple")]}
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump(run))
    assert main(["federate", "--config", str(cfg), "--out", str(tmp_path / "out"), "--aggregator-ranks", "2"]) == 0
    store = FederationStore(tmp_path / "out" / "store", create=False)
    assert exchange.read_targets(store)[1].clients == ["a", "b"] and store.has_global(1)

    dema = DeMAConfig(**run["dema"])
    texts = anchor_set(dema).texts
    states = {c["id"]: anchor_states(load_backbone(BackboneSpec.from_dict(c["backbone"]))[0], TOK, texts,
                                     placement=dema.placement) for c in run["clients"]}
    slots = {cid: [dema.slot_of_layer(l, len(h)) for l in range(len(h))] for cid, h in states.items()}
    fitted, _ = fit_canonical(states, slots, rank=3, components=5, ridge=dema.canonical_ridge)
    for cid in ("a", "b"):
        saved, _ = read_map(tmp_path / "out" / "clients" / cid / "private" / MAP_FILE)
        for (mu, w), (mu0, w0) in zip(saved, fitted[cid]):
            torch.testing.assert_close(mu, mu0, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(w, w0, rtol=1e-4, atol=1e-5)
