"""Benchmark suites: the testbed, the data cut, the training budget and the methods, as plain dicts.

    fedzero bench --suite quick --out runs/bench-quick      # minutes: checks the harness end to end
    fedzero bench --suite full  --out runs/bench-full       # hours on 2 CPU cores: the report's numbers
    fedzero bench --suite tune  --out runs/bench-tune       # gate temperature x DeMA lr, scored on val
    fedzero bench --suite long  --out runs/bench-long       # the key methods with twice the training
    fedzero bench --suite depth30 --out runs/bench-depth30  # SmolLM2-135M itself as one of the clients
    fedzero bench --suite hetero-lm --out runs/bench-hetero-lm   # the LM task (docs/lm_task.md)
    fedzero bench --suite conflict --out runs/bench-conflict     # conflicting objectives: where CMGA can matter
    fedzero bench --suite my_suite.yaml --out DIR           # your own (same fields as below)

A suite (JSON or YAML; the named ones are defined in suites_report, suites_hetero and
suites_conflict, each derived suite built from the one it varies):

    name, description
    task            "classification" (default: tweet sentiment by topic) or "lm"
    seeds           [int, ...]
    backbones       {name: a recipe of fedzero.backbones.recipes, e.g. {"kind": "depth", "layers": 10}}
    data            fedzero.bench.data.DataSettings fields (classification)
    lm_data         fedzero.bench.lm_data.LMDataSettings fields (task "lm", in place of "data")
    rounds, eval_every
    train           fedzero.client.TrainSettings fields, lr aside
    lr              {"dema": float, "lora": float}: each runner's lr
    settings        {name: {"description", "clients": [{"id", "backbone", "topics" (LM: "domains"),
                    "rank"?, "label_map"?}], "methods": [method, ...]}}
    memory          {"backbone", "batch_size", "seq_len", "steps", "methods"?} or null (fedzero.bench.peakmem)

A method is a dict (fields: fedzero.bench.methods.spec). Every method of a suite gets the same clients,
data, seeds, rounds, local steps, batch size and lr schedule. A new DeMA variant is one more entry in
a setting's "methods", e.g.
    {"name": "dema-anchor-cmga", "runner": "dema", "strategy": "cmga",
     "dema": {"projector": "anchor", "share": "shape-matched"}}
(the dema dict goes to DeMAConfig.from_dict unchanged: the suite is refused at start if DeMAConfig
does not know a field yet).

Tasks: a suite classifies tweet sentiment by topic unless it says "task": "lm": then it models the
language of per-client domains of the Debian fortunes corpus (docs/lm_task.md) and takes "lm_data"
(fedzero.bench.lm_data.LMDataSettings fields) in place of "data", and clients take "domains" in
place of "topics". Distillation exchanges label predictions, so an LM suite refuses it.

Every suite is checked before anything runs (suite_checks.check_suite).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import yaml

from . import suites_conflict, suites_hetero, suites_report
from .suite_checks import check_suite
from .suites_conflict import SWAP_NEG_POS

SUITES: dict[str, dict] = {**suites_report.SUITES, **suites_hetero.SUITES, **suites_conflict.SUITES}


def load_suite(name_or_path: str | Path) -> dict:
    """A copy of a named suite, or a suite read from a JSON/YAML file; checked before it is returned."""
    if str(name_or_path) in SUITES:
        suite = copy.deepcopy(SUITES[str(name_or_path)])
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(f"no suite named {str(name_or_path)!r} (known: {sorted(SUITES)}) and no such file")
        text = path.read_text()
        suite = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        suite.setdefault("name", path.stem)
    check_suite(suite)
    return suite


__all__ = ["SUITES", "SWAP_NEG_POS", "check_suite", "load_suite"]
