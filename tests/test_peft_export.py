"""DeMA as a PEFT method, and `fedzero export`: a client's adapter taken from a run (simulate's --out, a
federate run directory, a bare cluster store), loaded with PeftModel.from_pretrained on the client's
backbone, computes the logits of the federation's own model of that client after that round."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file

import fedzero.peft
from fedzero.adapters.dema import DeMAConfig, inject_dema
from fedzero.adapters.dema.io import save_part
from fedzero.backbones import BackboneSpec, load_backbone
from fedzero.client.state_layout import ClientStateLayout
from fedzero.config import load_run_config
from fedzero.data import ByteTokenizer, load_tokenizer
from fedzero.export import export_adapter, export_lora_client
from fedzero.peft import DeMAPeftConfig, dema_handle, get_dema_peft_model
from fedzero.run_dirs import RunDirError
from fedzero.store import FederationStore

REPO = Path(__file__).resolve().parent.parent
BYTE = {"vocab_size": 259, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
        "max_position_embeddings": 128, "initializer_range": 0.1}
LLAMA = {"model_config": {"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "intermediate_size": 32, **BYTE}, "init_seed": 1, "tokenizer": "byte"}
NEOX = {"model_config": {"model_type": "gpt_neox", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                         "intermediate_size": 64, **BYTE}, "init_seed": 2, "tokenizer": "byte"}
WIDE_LLAMA = {"llama_config": {"hidden_size": 24, "num_hidden_layers": 3, "num_attention_heads": 2,
                               "num_key_value_heads": 2, "intermediate_size": 48, **BYTE}, "init_seed": 3,
              "tokenizer": "byte"}
X = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


def _run_config(tmp_path: Path, dema: dict, backbones: dict, rounds: int = 2) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "test"):
        with open(data / f"{split}.jsonl", "w") as f:
            for i in range(8):
                f.write(json.dumps({"prompt": f"item {i}:", "completion": [" good", " bad"][i % 2]}) + "\n")
    cfg = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2, **dema},
           "federation": {"rounds": rounds, "strategy": "fedavg"},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.05, "max_length": 24},
           "clients": [{"id": cid, "backbone": backbone, "data": {"train": "data/train.jsonl", "test": "data/test.jsonl"}}
                       for cid, backbone in backbones.items()]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _simulated(tmp_path, monkeypatch, dema, backbones, rounds=2):
    """Run simulate; return (out dir, {client id: the LocalClient simulate trained})."""
    import fedzero.simulate as sim

    clients = {}

    def keep(cfg, run):
        clients[cfg.id] = client = build_client(cfg, run)
        return client

    build_client = sim.build_client
    monkeypatch.setattr(sim, "build_client", keep)
    out = tmp_path / "out"
    sim.simulate(load_run_config(_run_config(tmp_path, dema, backbones, rounds)), out, progress=False)
    return out, clients


def _base(backbone: dict):
    return load_backbone(BackboneSpec.from_dict(backbone))[0]


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=X).logits


@pytest.fixture(scope="module")
def anchored(tmp_path_factory):
    """A simulated LLaMA + GPT-NeoX federation with anchor projectors (private buffers computed from the
    backbones), 2 rounds, and the logits of each client's own model at the end."""
    tmp = tmp_path_factory.mktemp("anchored")
    with pytest.MonkeyPatch.context() as mp:
        out, clients = _simulated(tmp, mp, {"projector": "anchor", "num_anchors": 8, "share": "experts-only"},
                                  {"llama": LLAMA, "neox": NEOX})
    return out, {cid: _logits(c.handle.model) for cid, c in clients.items()}


@pytest.mark.parametrize("cid, backbone", [("llama", LLAMA), ("neox", NEOX)])
def test_simulate_export_loads_as_the_federations_model(anchored, tmp_path, cid, backbone):
    out, own = anchored
    adapter = export_adapter(out, cid, tmp_path / "adapter")
    assert sorted(p.name for p in adapter.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "DEMA" and config["projector"] == "anchor"
    assert config["provenance"]["round"] == 1 and config["provenance"]["run_kind"] == "simulate"
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert any(k.startswith("base_model.model.dema_private.") and k.endswith(".mu") for k in tensors)   # anchor buffers

    model = PeftModel.from_pretrained(_base(backbone), adapter)
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert torch.equal(_logits(model), own[cid])
    assert not torch.allclose(_logits(_base(backbone)), own[cid])     # the adapter does change the model

    # save_pretrained writes the same adapter back, which loads to the same model again.
    model.save_pretrained(tmp_path / "again")
    again = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    saved = json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    assert {k: v for k, v in saved.items() if k != "inference_mode"} == \
        {k: v for k, v in config.items() if k != "inference_mode"}
    assert isinstance(PeftConfig.from_pretrained(tmp_path / "again"), DeMAPeftConfig)
    assert torch.equal(_logits(PeftModel.from_pretrained(_base(backbone), tmp_path / "again")), own[cid])


def test_simulate_export_refusals_name_the_run_client_and_round(anchored, tmp_path):
    out, _ = anchored
    with pytest.raises(RunDirError, match=r"unknown client 'nobody' in simulate run .*: its clients are \['llama', 'neox'\]"):
        export_adapter(out, "nobody", tmp_path / "a")
    with pytest.raises(RunDirError, match=r"round 2 of simulate run .* has not finished: the global of round 3 .*"
                                          r"finished rounds: 0\.\.1"):
        export_adapter(out, "llama", tmp_path / "a", round=2)
    with pytest.raises(RunDirError, match=r"only each client's latest private part: .*private.safetensors is "
                                          r"client 'llama''s after round 1, not round 0; export round 1"):
        export_adapter(out, "llama", tmp_path / "a", round=0)
    other = yaml.safe_load((out / "config.yaml").read_text())
    other["clients"][0]["backbone"]["init_seed"] = 9              # another random model of the same shape
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(RunDirError, match=r"the backbone of client 'llama' in .*other.yaml \(fingerprint \w+\) is not "
                                          r"the one its private part .*private.safetensors was trained on"):
        export_adapter(out, "llama", tmp_path / "a", config=tmp_path / "other.yaml")
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "suite.json").write_text("{}")
    with pytest.raises(RunDirError, match=r"bench.* is not a fedzero run: .*`fedzero bench` directory"):
        export_adapter(tmp_path / "bench", "llama", tmp_path / "a")
    with pytest.raises(RunDirError, match=r"store is a federation store alone.*--client-config.*run directory around it"):
        export_adapter(out / "store", "llama", tmp_path / "a")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken exists and is not empty"):
        export_adapter(out, "llama", tmp_path / "taken")
    with pytest.raises(FileExistsError, match="not an adapter directory"):
        export_adapter(out, "llama", tmp_path / "taken", overwrite=True)
    assert not (tmp_path / "a").exists()


def test_shape_matched_side_export_takes_its_own_width_bank(tmp_path, monkeypatch):
    """Projectors shared among clients of one width (shape-matched), side placement: the global holds
    a bank per width and the client's private part is empty, so every finished round is exportable."""
    out, clients = _simulated(tmp_path, monkeypatch, {"placement": "side"}, {"a": LLAMA, "b": WIDE_LLAMA})
    banks = {k.split(".")[1] for k in FederationStore(out / "store", create=False).read_global(2)[0] if k.startswith("proj.")}
    assert banks == {"h16", "h24"}
    for cid, backbone in (("a", LLAMA), ("b", WIDE_LLAMA)):
        export_adapter(out, cid, tmp_path / cid)
        keys = load_file(tmp_path / cid / "adapter_model.safetensors").keys()
        width = backbone.get("model_config", backbone.get("llama_config"))["hidden_size"]
        assert {k.split(".")[4] for k in keys if ".proj." in k} == {f"h{width}"}
        assert not any("dema_private" in k for k in keys)
        assert torch.equal(_logits(PeftModel.from_pretrained(_base(backbone), tmp_path / cid)),
                           _logits(clients[cid].handle.model))
    export_adapter(out, "a", tmp_path / "a0", round=0)
    assert not torch.equal(_logits(PeftModel.from_pretrained(_base(LLAMA), tmp_path / "a0")),
                           _logits(clients["a"].handle.model))


# -------------------------------------------------------------------------- federate / cluster layouts

def _federate_run(tmp_path):
    """A federate run directory as `fedzero prepare` lays it out, with two rounds written as the
    DeepSpeed clients and the aggregator write them (updates, private parts per round, globals); each
    round's private part and global differ, so taking the wrong one shows in the logits."""
    from fedzero.federate import prepare

    _base(LLAMA).save_pretrained(tmp_path / "llama-hf")     # a model directory: exported from its config alone
    backbones = {"llama": {"path": str(tmp_path / "llama-hf"), "tokenizer": "byte"}, "neox": NEOX}
    cfg = _run_config(tmp_path, {"share": "experts-only"}, backbones)
    run, client_yaml = prepare(cfg, tmp_path / "run", REPO / "ds_configs" / "zero3.json")
    store = FederationStore(tmp_path / "run" / "store", create=False)
    expected = {}
    for rnd in (0, 1):
        state, _ = store.read_global(rnd)
        deltas = []
        for k, client in enumerate(run.clients):
            base, fp = load_backbone(client.backbone)
            handle = inject_dema(base, run.dema)
            handle.load_shared_state_dict(state)
            generator = torch.Generator().manual_seed(10 * rnd + k)
            with torch.no_grad():
                for p in handle.trainable_parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * 0.3)
            deltas.append({key: v - state[key] for key, v in handle.shared_state_dict().items()})
            store.write_update(rnd, client.id, deltas[-1], fingerprint=fp, num_samples=8, metrics={})
            layout = ClientStateLayout(yaml.safe_load(client_yaml[client.id].read_text())["state_dir"])
            save_part(handle, layout.private_path(rnd), "private", fingerprint=fp)
            expected[(client.id, rnd)] = handle
        new = {key: state[key] + sum(d[key] for d in deltas) / len(deltas) for key in state}
        store.publish_global(rnd + 1, new)
        for k, client in enumerate(run.clients):
            expected[(client.id, rnd)].load_shared_state_dict(new)
            expected[(client.id, rnd)] = _logits(expected[(client.id, rnd)].model)
    return tmp_path / "run", client_yaml, expected, backbones


def test_federate_and_cluster_store_exports(tmp_path):
    from peft import AutoPeftModelForCausalLM

    run, client_yaml, expected, backbones = _federate_run(tmp_path)
    for (cid, rnd), logits in expected.items():
        out = export_adapter(run, cid, tmp_path / f"{cid}-{rnd}", round=rnd)
        config = json.loads((out / "adapter_config.json").read_text())
        provenance = config["provenance"]
        assert (provenance["run_kind"], provenance["round"], provenance["private_round"]) == ("federate", rnd, rnd)
        model = PeftModel.from_pretrained(_base(backbones[cid]), out)
        assert torch.equal(_logits(model), logits)
        assert config["base_model_name_or_path"] == backbones[cid].get("path")
    assert not torch.equal(expected[("neox", 0)], expected[("neox", 1)])
    # A backbone from a model directory is named in the adapter, so PEFT's auto class finds it alone.
    assert torch.equal(_logits(AutoPeftModelForCausalLM.from_pretrained(tmp_path / "llama-1")), expected[("llama", 1)])

    # A cluster run's store alone, with the client's CLIENT.yaml: the same adapter.
    out = export_adapter(run / "store", "neox", tmp_path / "cluster", client_config=client_yaml["neox"])
    same = tmp_path / "neox-1" / "adapter_model.safetensors"
    assert load_file(out / "adapter_model.safetensors").keys() == load_file(same).keys()
    assert json.loads((out / "adapter_config.json").read_text())["provenance"]["run_kind"] == "store"

    with pytest.raises(RunDirError, match=r"round 2 of federate run .* has not finished"):
        export_adapter(run, "neox", tmp_path / "x", round=2)
    private = ClientStateLayout(run / "clients" / "neox")
    private.private_path(0).unlink()          # as a client prunes its older private parts
    with pytest.raises(RunDirError, match=r"client 'neox' has no private part for round 0 in .*neox/private "
                                          r"\(saved after rounds \[1\]"):
        export_adapter(run, "neox", tmp_path / "x", round=0)
    with pytest.raises(RunDirError, match=r"unknown client 'zed' in federate run"):
        export_adapter(run, "zed", tmp_path / "x")


def test_export_subcommand(anchored, tmp_path, capsys):
    from fedzero.cli import main

    out, _ = anchored
    assert main(["export", "--run", str(out), "--client", "neox", "--out", str(tmp_path / "ad")]) == 0
    assert "client neox, round 1: wrote" in capsys.readouterr().out
    assert main(["export", "--run", str(out), "--client", "neox", "--round", "5", "--out", str(tmp_path / "ad2")]) == 2
    assert "fedzero export: error: round 5 of simulate run" in capsys.readouterr().err
    assert main(["export", "--run", str(tmp_path / "nowhere"), "--client", "a", "--out", str(tmp_path / "b")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err


# -------------------------------------------------------------------------- the PEFT method itself

def _llama(seed=0, hidden=16):
    return _base({**LLAMA, "init_seed": seed, "model_config": {**LLAMA["model_config"], "hidden_size": hidden}})


def test_registered_with_peft_and_refusals(tmp_path):
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils.peft_types import PeftType

    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.DEMA] is fedzero.peft.DeMATuner
    dema = DeMAConfig(rank=4, num_experts=2, num_slots=2, share="experts-only")
    model = get_dema_peft_model(_llama(), DeMAPeftConfig.from_dema(dema, hidden_size=16, num_layers=2))
    with torch.no_grad():
        for p in dema_handle(model).trainable_parameters():
            p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "ad")
    assert torch.equal(_logits(PeftModel.from_pretrained(_llama(), tmp_path / "ad")), _logits(model))
    with pytest.raises(ValueError, match="hidden_size=16; the base model given has hidden_size=24"):
        PeftModel.from_pretrained(_llama(hidden=24), tmp_path / "ad")
    with pytest.raises(NotImplementedError, match="merging"):
        model.merge_and_unload()
    with pytest.raises(NotImplementedError, match="switching the adapter off"):
        model.base_model.disable_adapter_layers()
    with pytest.raises(ValueError, match="No adapter layers found"):     # PEFT looks for its own layer type first
        with model.disable_adapter():
            pass

    # A checkpoint that does not fill the adapter is refused (PEFT alone would load it silently).
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    dropped = sorted(tensors)[0]
    from safetensors.torch import save_file
    save_file({k: v for k, v in tensors.items() if k != dropped}, tmp_path / "ad" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"DeMA checkpoint does not fit this model .*missing 1 tensor"):
        PeftModel.from_pretrained(_llama(), tmp_path / "ad")

    # Anchor projectors built without their data: refused at forward, not computed with zero buffers.
    anchored = DeMAConfig(rank=4, num_experts=2, num_slots=2, projector="anchor", num_anchors=8)
    fresh = get_dema_peft_model(_llama(), DeMAPeftConfig.from_dema(anchored))
    with pytest.raises(RuntimeError, match="missing state computed from data .*anchor buffers"):
        _logits(fresh)
    built = get_dema_peft_model(_llama(), DeMAPeftConfig.from_dema(anchored), tokenizer=ByteTokenizer())
    assert torch.isfinite(_logits(built)).all()


def test_lora_baseline_client_exports_a_peft_lora_adapter(tmp_path):
    from fedzero.baselines import LoRAClient, LoRASettings, make_lora_strategy
    from fedzero.client import TrainSettings
    from fedzero.data import build_examples

    tok = load_tokenizer("byte")
    records = [{"prompt": f"item {i}:", "completion": [" good", " bad"][i % 2]} for i in range(8)]
    examples = build_examples(records, tok, 24)
    settings = TrainSettings(local_steps=2, batch_size=4, lr=0.05, max_length=24)
    clients = [LoRAClient(f"c{k}", _llama(), "fp", examples, [], settings, LoRASettings(rank=2), pad_id=tok.pad_token_id,
                          seed=k, total_rounds=1) for k in range(2)]
    states = [c.train_round()[0] for c in clients]
    agg = make_lora_strategy("fedit").aggregate(states, [8, 8], [2, 2], 0, fingerprints=["fp", "fp"])
    for k, c in enumerate(clients):
        c.apply(agg, k)
    out = export_lora_client(clients[0], tmp_path / "lora")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert torch.equal(_logits(PeftModel.from_pretrained(_llama(), out)), _logits(clients[0].model))

    flora = make_lora_strategy("flora").aggregate(states, [8, 8], [2, 2], 0, fingerprints=["fp", "fp"])
    clients[1].apply(flora, 1)
    with pytest.raises(ValueError, match=r"client 'c1' \(FLoRA\) has merged 1 aggregate"):
        export_lora_client(clients[1], tmp_path / "flora")
