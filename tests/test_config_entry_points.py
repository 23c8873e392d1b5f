"""Every entry point reads a config the same way: simulate, prepare and align (the run config), the
DeepSpeed client (CLIENT.yaml), the MPI aggregator (the run config without the clients' files);
user mistakes end in a message and exit status 2, never a traceback, and before anything is
written; command-line choices come from the registries; round 0's global declares its blocks."""

import importlib.util
import math
from pathlib import Path

import pytest
import yaml

from fedzero.aggregator import load_aggregator_settings
from fedzero.baselines import LORA_STRATEGIES, make_lora_strategy
from fedzero.cli import build_parser, main
from fedzero.client.client_config import load_client_config, parse_client_config
from fedzero.config import ConfigError, ConfigFileNotFoundError, load_run_config
from fedzero.registry import Registry
from fedzero.strategies import STRATEGIES, make_strategy

from test_config import write_run

REPO = Path(__file__).resolve().parent.parent
BAD = {"federation.server_lr": math.nan, "train.lr": "x", "seed": -1}
BAD_LINES = ["federation.server_lr must be a finite number, got .nan", "train.lr must be a number, got 'x'",
             "seed must be >= 0, got -1"]


@pytest.mark.parametrize("command", ["simulate", "prepare", "federate", "align"])
def test_cli_reports_every_problem_and_writes_nothing(tmp_path, capsys, command):
    config = write_run(tmp_path, **BAD)
    out = tmp_path / "out"
    assert main([command, "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"fedzero {command}: error: {config}: 3 problems:" in err and "Traceback" not in err
    assert all(line in err for line in BAD_LINES)
    assert not out.exists()


def test_the_aggregator_reads_the_same_checks_without_the_clients_files(tmp_path):
    bad = write_run(tmp_path, **BAD)
    with pytest.raises(ConfigError) as info:
        load_aggregator_settings(bad)
    assert all(line in str(info.value) for line in BAD_LINES)
    # A copy of a run config away from the clients' data and backbones (RUN_DIR/config.yaml): the
    # aggregator reads it, the clients' own entry points would not.
    far = write_run(tmp_path, **{"clients[0].data.train": "elsewhere.jsonl",
                                 "clients[1].backbone": {"path": "/models/not-here"},
                                 "federation.server_momentum": 0.5})
    settings = load_aggregator_settings(far)
    assert settings.client_ids == ["a", "b"] and settings.make_strategy().server_opt.momentum == 0.5
    with pytest.raises(ConfigFileNotFoundError):
        load_run_config(far)
    assert load_aggregator_settings(write_run(tmp_path, clients=None)).client_ids is None


def launch_script(name: str):
    spec = importlib.util.spec_from_file_location(f"fedzero_launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_launch_aggregate_exits_1_naming_the_problem(tmp_path, capsys):
    aggregate = launch_script("aggregate")
    code = aggregate.main(["--store", str(tmp_path / "store"), "--round", "0",
                           "--config", str(write_run(tmp_path, **{"federation.strategy_options.c_max": math.nan}))])
    err = capsys.readouterr().err
    assert code == 1 and "federation.strategy_options.c_max must be a finite number, got .nan" in err
    for bad in (["--deadline", "nan"], ["--expected", "a", ".."], ["--quorum", "0"], ["--verify", "md5"]):
        with pytest.raises(SystemExit) as info:
            aggregate.parse_args(["--store", "s", "--round", "0", "--config", "c", *bad])
        assert info.value.code == 2


def client_yaml(tmp_path, **changes) -> dict:
    data = yaml.safe_load((REPO / "configs" / "client_example.yaml").read_text())
    data["deepspeed"]["config"] = str(REPO / "ds_configs" / "zero3.json")
    for path, value in changes.items():
        section, key = path.split(".", 1)
        data.setdefault(section, {})[key] = value
    return data


def test_the_client_config_uses_the_run_configs_readers(tmp_path):
    cfg = parse_client_config(client_yaml(tmp_path), REPO / "configs")
    assert cfg.total_rounds == 4 and cfg.client.id == "airlines" and cfg.wait_timeout == 3600
    bad = client_yaml(tmp_path, **{"train.lr": math.inf, "federation.rounds": "4", "deepspeed.precision": "fp8",
                                   "wait.poll": 0, "client.id": "../x"})
    with pytest.raises(ConfigError) as info:
        parse_client_config(bad, REPO / "configs", source=Path("client.yaml"))
    text = str(info.value)
    assert text.startswith("client.yaml: 5 problems:")
    for line in ("train.lr must be a finite number, got .inf", "federation.rounds must be an integer, got '4'",
                 "deepspeed.precision must be one of ['auto', 'fp32', 'bf16', 'fp16'], got 'fp8'",
                 "wait.poll must be > 0, got 0", "client.id: invalid client id '../x'"):
        assert line in text
    no_rounds = client_yaml(tmp_path)
    del no_rounds["federation"]
    assert parse_client_config(no_rounds, REPO / "configs").total_rounds == 1     # a client tried alone


def test_launch_client_exits_2_naming_the_problem(tmp_path, capsys):
    path = tmp_path / "client.yaml"
    path.write_text(yaml.safe_dump(client_yaml(tmp_path, **{"train.warmup_steps": -5})))
    assert launch_script("client").main(["--config", str(path), "--store", str(tmp_path / "store"), "--round", "0"]) == 2
    err = capsys.readouterr().err
    assert f"client: error: {path}: train.warmup_steps must be >= 0, got -5" in err
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- registries and command-line choices

def test_both_strategy_registries_are_one_helper():
    assert isinstance(STRATEGIES, Registry) and isinstance(LORA_STRATEGIES, Registry)
    assert sorted(STRATEGIES) == ["cmga", "fedavg", "local"] and "flexlora" in LORA_STRATEGIES
    assert set(STRATEGIES.options("cmga")) == {"harmonize_norms", "c_max", "groups", "server_lr", "server_momentum", "seed"}
    assert STRATEGIES.options("cmga")["c_max"].annotation is float
    assert LORA_STRATEGIES.options("fedit") == {}
    with pytest.raises(ValueError, match=r"unknown strategy 'fedprox'; valid: \['cmga', 'fedavg', 'local'\]"):
        make_strategy("fedprox")
    with pytest.raises(TypeError, match=r"LoRA baseline 'fedit' got unknown option\(s\) \['mu'\]"):
        make_lora_strategy("fedit", mu=0.1)
    with pytest.raises(ValueError, match="unknown strategy None"):
        make_strategy(None)


def test_cli_choices_come_from_the_registries():
    from fedzero.adapters.dema.config import PLACEMENTS, PROJECTORS

    sub = build_parser()._subparsers._group_actions[0].choices
    choices = {(name, a.dest): list(a.choices) for name, p in sub.items() for a in p._actions if a.choices}
    assert choices[("simulate", "strategy")] == sorted(STRATEGIES)
    assert choices[("align", "projector")] == list(PROJECTORS)
    assert choices[("memory-estimate", "placement")] == list(PLACEMENTS)


@pytest.mark.parametrize("args", [["--rounds", "0"], ["--rounds", "x"], ["--strategy", "fedprox"]])
def test_cli_overrides_are_checked(tmp_path, args):
    with pytest.raises(SystemExit) as info:
        main(["simulate", "--config", str(write_run(tmp_path)), "--out", str(tmp_path / "o"), *args])
    assert info.value.code == 2 and not (tmp_path / "o").exists()


# ---------------------------------------------------------------- round 0 declares its blocks

def test_prepare_publishes_round_0_with_the_blocks_its_clients_declare(tmp_path):
    from fedzero.adapters.dema.blocks import global_blocks
    from fedzero.client.bootstrap import init_store
    from fedzero.federate import prepare
    from fedzero.store import FederationStore

    config = write_run(tmp_path, **{"dema.share": "shape-matched", "clients[1].backbone.llama_config.hidden_size": 24,
                                    "clients[1].backbone.llama_config.num_attention_heads": 3,
                                    "clients[1].backbone.llama_config.num_key_value_heads": 3})
    run, client_yaml = prepare(config, tmp_path / "run", REPO / "ds_configs" / "zero3.json")
    store = FederationStore(tmp_path / "run" / "store", create=False)
    state, manifest = store.read_global(0)
    blocks = manifest["meta"]["blocks"]
    assert blocks == global_blocks(state, None)       # the same blocks as the key-name rule
    assert {"slot0", "slot1", "slot0.h16", "slot1.h24"} <= set(blocks.values())
    assert manifest["meta"]["dema"] == run.dema.to_dict() and manifest["meta"]["published_by"] == "fedzero"
    init_store(load_client_config(client_yaml["b"]), tmp_path / "alone")
    alone = FederationStore(tmp_path / "alone", create=False).read_global(0)
    assert alone[1]["meta"]["blocks"] == global_blocks(alone[0], None)
    assert not any(b.endswith(".h16") for b in alone[1]["meta"]["blocks"].values())


def test_an_aggregators_run_yaml_may_list_client_ids_alone(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("seed: 5\nfederation: {strategy: fedavg}\nclients: [{id: a}, {id: b, train: {lr: 0.1}}]\n")
    assert load_aggregator_settings(path).client_ids == ["a", "b"]
    path.write_text("clients: [{id: a}, {id: a, train: {lr: .nan}}]\n")
    with pytest.raises(ConfigError) as info:
        load_aggregator_settings(path)
    assert "clients[1].id 'a' is a duplicate client id" in str(info.value)
    assert "clients[1].train.lr must be a finite number, got .nan" in str(info.value)
    with pytest.raises(ConfigError, match="clients\\[0\\].backbone is required"):
        load_run_config(path)
