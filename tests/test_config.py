"""The typed config loader: every key typed and range-checked at load, every problem of a file
reported at once with its key path, the value and the reason, before anything is built."""

import copy
import json
import math
from pathlib import Path

import pytest
import yaml

from fedzero.config import ConfigError, ConfigFileNotFoundError, load_run_config, parse_run_config
from fedzero.config.problems import show

REPO = Path(__file__).resolve().parent.parent


def write_run(tmp_path: Path, **changes) -> Path:
    """A small valid run config (two inline LLaMA clients, JSONL data beside it), then `changes`:
    {"federation.rounds": 2.5} sets a key by its path; a value of DROP removes the key."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_text(json.dumps({"prompt": "x:", "completion": " good"}) + "\n")
    backbone = {"llama_config": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                                 "num_key_value_heads": 2, "intermediate_size": 32, "vocab_size": 259},
                "init_seed": 1, "tokenizer": "byte"}
    cfg = {"seed": 0, "dema": {"rank": 4, "num_experts": 2, "num_slots": 2},
           "federation": {"rounds": 2, "strategy": "cmga", "strategy_options": {}},
           "train": {"local_steps": 2, "batch_size": 4, "lr": 0.01, "max_length": 32},
           "clients": [{"id": cid, "backbone": copy.deepcopy(backbone), "data": {"train": "data/train.jsonl", "test": "data/test.jsonl"}}
                       for cid in ("a", "b")]}
    for path, value in changes.items():
        set_path(cfg, path, value)
    out = tmp_path / "run.yaml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


DROP = object()


def set_path(cfg: dict, path: str, value) -> None:
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node = cfg
    for key in parents:
        node = node[int(key)] if key.isdigit() else node.setdefault(key, {})
    key = int(last) if last.isdigit() else last
    if value is DROP:
        del node[key]
    else:
        node[key] = value


def problems_of(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    return info.value


def test_a_valid_config_loads_with_its_values(tmp_path):
    run = load_run_config(write_run(tmp_path))
    assert run.client_ids == ["a", "b"] and run.federation.rounds == 2 and run.clients[1].train.lr == 0.01
    assert run.dema.seed == 0 and run.clients[0].train_data == tmp_path / "data" / "train.jsonl"


# The wrong-type and non-finite values that gave a traceback, an unnamed `int()` error, or passed
# `prepare` to fail only at run time: each is now refused at load, naming the key path and the value.
WRONG = [
    ("federation.rounds", 2.5, "must be an integer, got 2.5"),
    ("federation.rounds", None, "must be an integer, got null"),
    ("federation.rounds", True, "must be an integer, got true"),
    ("federation.rounds", 0, "must be >= 1, got 0"),
    ("train.lr", "x", "must be a number, got 'x'"),
    ("train.lr", math.inf, "must be a finite number, got .inf"),
    ("train.lr", "3e-3", "must be a number, got '3e-3' (YAML reads a number with an exponent but no '.' as text"),
    ("train.local_steps", "3", "must be an integer, got '3' (a quoted number is text"),
    ("train.grad_clip", math.nan, "must be a finite number, got .nan"),
    ("train.warmup_steps", -5, "must be >= 0, got -5"),
    ("train.max_eval_examples", -1, "must be >= 0, got -1"),
    ("federation.server_lr", math.nan, "must be a finite number, got .nan"),
    ("federation.server_lr", math.inf, "must be a finite number, got .inf"),
    ("federation.server_momentum", 1.0, "must be < 1, got 1.0"),
    ("federation.strategy_options.c_max", math.nan, "must be a finite number, got .nan"),
    ("federation.strategy_options.harmonize_norms", "no", "must be true or false, got 'no'"),
    ("seed", -1, "must be >= 0, got -1"),
    ("seed", "x", "must be an integer, got 'x'"),
    ("dema.temperature", math.nan, "must be a finite number, got .nan"),
    ("dema.placement", "sideways", "must be one of ['parallel', 'side'], got 'sideways'"),
    ("clients[0].backbone.init_seed", "1", "must be an integer, got '1'"),
    ("clients[1].train.batch_size", 0, "must be >= 1, got 0"),
]


@pytest.mark.parametrize("key, value, reason", WRONG, ids=[f"{k}={show(v)}" for k, v, _ in WRONG])
def test_each_wrong_value_is_refused_naming_file_key_value_and_reason(tmp_path, key, value, reason):
    path = write_run(tmp_path, **{key: value})
    err = problems_of(path)
    text = str(err)
    assert str(path) in text and f"{key} {reason}" in text, text
    assert [p.path for p in err.problems] == [key]


@pytest.mark.parametrize("cid, reason", [
    ("..", "must not start with '.'"),
    (".", "must not start with '.'"),
    (".hidden", "must not start with '.'"),
    ("a\n", "only letters, digits"),
    ("../x", "only letters, digits"),
    ("x" * 300, "longer than 128 characters"),
    ("", "must not be empty"),
    (7, "must be a string, got 7"),
])
def test_client_ids_are_checked_by_the_stores_validator(tmp_path, cid, reason):
    err = problems_of(write_run(tmp_path, **{"clients[0].id": cid}))
    assert [p.path for p in err.problems] == ["clients[0].id"] and reason in str(err)


def test_every_problem_of_the_file_is_reported_at_once(tmp_path):
    path = write_run(tmp_path, **{"federation.rounds": 2.5, "train.lr": "x", "clients[1].id": "a",
                                  "clients[0].data.train": "missing.jsonl", "dema.rank": 0, "extra": 1,
                                  "federation.strategy_options.harmonise": True})
    err = problems_of(path)
    paths = [p.path for p in err.problems]
    assert sorted(paths) == sorted(["config", "dema.rank", "federation.rounds", "federation.strategy_options",
                                    "train.lr", "clients[0].data.train", "clients[1].id"])
    text = str(err)
    assert text.startswith(f"{path}: 7 problems:")
    assert "unknown key(s) ['extra']" in text and "'a' is a duplicate client id (also clients[0])" in text
    assert "unknown option(s) ['harmonise'] (did you mean 'harmonize_norms'?)" in text
    assert f"clients[0].data.train names no such file: {tmp_path / 'missing.jsonl'}" in text


def test_missing_files_alone_are_a_file_not_found_error(tmp_path):
    with pytest.raises(ConfigFileNotFoundError, match="no such file"):
        load_run_config(write_run(tmp_path, **{"clients[0].data.test": "nope.jsonl"}))
    with pytest.raises(ConfigError) as info:
        load_run_config(write_run(tmp_path, **{"clients[0].data.test": "nope.jsonl", "seed": -1}))
    assert not isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("text, reason", [
    ("seed: !!python/object/apply:os.system ['echo pwned']\n", "line 1, column 7: could not determine a constructor"),
    ("seed: [1\n", "is not valid YAML: line 2"),
    ("", "must be a YAML mapping"),
    ("- 1\n", "must be a YAML mapping"),
])
def test_a_file_that_is_not_a_plain_yaml_mapping_is_refused_with_its_line(tmp_path, text, reason):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    err = problems_of(path)
    assert str(path) in str(err) and reason in str(err)


@pytest.mark.parametrize("key, value, reason", [
    ("clients[0].backbone.path", "/no/such/dir", "needs exactly one of 'path'"),
    ("clients[0].backbone.llama_config", DROP, "needs exactly one of 'path'"),
    ("clients[0].backbone.dtype", "float8", "must be one of ['float32', 'bfloat16', 'float16']"),
    ("clients[0].backbone.colour", 1, "unknown backbone field(s) ['colour']"),
    ("clients[0].backbone.model_config", {"model_type": "nope"}, "needs exactly one of"),
    ("clients[0].data", DROP, "clients[0].data is required"),
    ("clients[0].train.lr_typo", 1, "unknown train setting(s) ['lr_typo']"),
    ("dema.rnk", 4, "unknown DeMAConfig field(s) ['rnk'] (did you mean 'rank'?)"),
    ("dema.projector", "anchor", "DeMAConfig.num_anchors (256) must be >= rank"),     # the class's own rule
    ("federation.strategy", "fedprox", "must be one of ['cmga', 'fedavg', 'local'], got 'fedprox'"),
    ("federation.strategy_options.seed", 3, "is set by `seed`, not as a strategy option"),
    ("federation.strategy_options.c_max", 0.5, "CMGA c_max must be >= 1"),           # the strategy's own rule
    ("clients", [], "clients must list at least one client"),
    ("clients", {"a": 1}, "clients must be a list of clients"),
    ("train", [1], "train must be a mapping of settings, got [1]"),
])
def test_sections_and_their_own_rules(tmp_path, key, value, reason):
    if key == "dema.projector":
        set_key = {key: value, "dema.rank": 300}
    else:
        set_key = {key: value}
    assert reason in str(problems_of(write_run(tmp_path, **set_key)))


def test_distill_section_is_typed(tmp_path):
    distill = {"labels": ["good", 3], "template": "{text}", "teacher": "best", "weight": math.nan,
               "anchor_file": "nope.jsonl"}
    err = problems_of(write_run(tmp_path, distill=distill))
    text = str(err)
    assert "distill.labels must be a list whose every item is a string: item 1 must be a string, got 3" in text
    assert "distill.teacher must be one of ['mean', 'quality'], got 'best'" in text
    assert "distill.weight must be a finite number, got .nan" in text
    err = problems_of(write_run(tmp_path, distill={"labels": ["good", "bad"]}))
    assert "distill.template is required" in str(err)
    err = problems_of(write_run(tmp_path, distill={"labels": ["good", "bad"], "template": "{text}",
                                                   "anchor_file": "nope.jsonl"}))
    assert "distill.anchor_file names no such file" in str(err)


def test_valid_spellings_keep_their_meaning(tmp_path):
    """What loaded before still loads, to the same values: ints where numbers are asked, null
    sections, null grad_clip and max_eval_examples, a strategy named in capitals."""
    run = load_run_config(write_run(tmp_path, **{"train.lr": 1, "train.grad_clip": None, "dema": None,
                                                 "train.max_eval_examples": None, "federation.strategy": "CMGA",
                                                 "federation.server_lr": 2}))
    assert run.clients[0].train.lr == 1 and run.clients[0].train.grad_clip is None and run.dema.rank == 64
    assert run.federation.make_strategy(seed=0).name == "cmga"


def test_the_shipped_configs_load():
    run = load_run_config(REPO / "configs" / "demo.yaml")
    assert run.client_ids == ["airlines", "apple", "coachella"]
    assert parse_run_config(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text()), REPO / "configs").federation \
        == run.federation


def test_docs_config_md_names_every_key():
    import dataclasses

    from fedzero.adapters.dema import DeMAConfig
    from fedzero.backbones import BackboneSpec
    from fedzero.client import TrainSettings
    from fedzero.client.client_config import DeepSpeedSettings
    from fedzero.config import FederationSettings
    from fedzero.distill.settings import DistillSettings

    doc = (REPO / "docs" / "config.md").read_text()
    for cls, prefix in ((DeMAConfig, ""), (TrainSettings, ""), (DistillSettings, ""), (FederationSettings, ""),
                        (BackboneSpec, ""), (DeepSpeedSettings, "deepspeed.")):
        missing = [f.name for f in dataclasses.fields(cls) if f.name != "extra" and f"`{prefix}{f.name}`" not in doc]
        assert not missing, f"docs/config.md does not document {cls.__name__} field(s) {missing}"
