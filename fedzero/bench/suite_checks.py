"""The checks on a suite (named or read from a file): everything that can be checked without compute,
so a typo fails in a second, not an hour in. `check_suite` also parses every method into its typed
spec (fedzero.bench.methods.spec), with errors that name the setting, the method and the key."""

from __future__ import annotations

from fedzero.backbones.recipes import check_backbone_spec
from fedzero.client import TrainSettings

from .data import DataSettings, check_label_map
from .lm_corpus import FORTUNES_DOMAINS
from .lm_data import LMDataSettings
from .methods.spec import RUNNERS, MethodSpec, parse_method
from .peakmem import METHODS as MEMORY_METHODS

SUITE_FIELDS = {"name", "description", "task", "seeds", "backbones", "data", "lm_data", "rounds", "train", "lr",
                "eval_every", "settings", "memory"}
TASKS = ("classification", "lm")
SETTING_FIELDS = {"description", "clients", "methods"}


def check_suite(suite: dict) -> dict[str, list[MethodSpec]]:
    """Refuse a malformed suite, naming what is wrong; returns {setting: its methods' typed specs}."""
    if not isinstance(suite, dict):
        raise ValueError("a suite must be a mapping")
    unknown = sorted(set(suite) - SUITE_FIELDS)
    if unknown:
        raise ValueError(f"suite: unknown field(s) {unknown}; allowed {sorted(SUITE_FIELDS)}")
    task = suite.get("task", "classification")
    if task not in TASKS:
        raise ValueError(f"suite: task must be one of {list(TASKS)}, got {task!r}")
    lm = task == "lm"
    data_key, wrong = ("lm_data", "data") if lm else ("data", "lm_data")
    if wrong in suite:
        raise ValueError(f"suite {suite.get('name')!r}: a {task} suite takes {data_key!r}, not {wrong!r}"
                         + ("" if lm else " (the LM task's data: set task 'lm')"))
    for key in ("seeds", "backbones", data_key, "rounds", "train", "lr", "settings"):
        if key not in suite:
            raise ValueError(f"suite {suite.get('name')!r}: missing {key!r}")
    if not suite["seeds"] or any(not isinstance(s, int) for s in suite["seeds"]):
        raise ValueError("suite: seeds must be a non-empty list of integers")
    if int(suite["rounds"]) < 1 or int(suite.get("eval_every", 1)) < 1:
        raise ValueError("suite: rounds and eval_every must be >= 1")
    for name, spec in suite["backbones"].items():
        check_backbone_spec(name, spec)
    lm_settings = LMDataSettings.from_dict(suite["lm_data"]) if lm else None
    if not lm:
        DataSettings.from_dict(suite["data"])
    TrainSettings.from_dict({**suite["train"], "lr": 1.0})
    if "lr" in suite["train"]:
        raise ValueError("suite: give learning rates in 'lr': {'dema': …, 'lora': …}, not in 'train'")
    for runner in RUNNERS:
        if not float(suite["lr"].get(runner, 0)) > 0:
            raise ValueError(f"suite: lr.{runner} must be > 0")
    methods = {name: _check_setting(name, setting, suite["backbones"], lm_settings)
               for name, setting in suite["settings"].items()}
    _check_memory(suite.get("memory"), suite["backbones"], lm)
    return methods


def _check_setting(name: str, setting: dict, backbones: dict, lm_settings: LMDataSettings | None
                   ) -> list[MethodSpec]:
    """A setting's clients, then its methods parsed (lm_settings: the LM task's data, None for classification)."""
    unknown = sorted(set(setting) - SETTING_FIELDS)
    if unknown:
        raise ValueError(f"setting {name!r}: unknown field(s) {unknown}")
    ids = [c.get("id") for c in setting["clients"]]
    if len(set(ids)) != len(ids) or not all(ids):
        raise ValueError(f"setting {name!r}: clients need unique ids, got {ids}")
    for c in setting["clients"]:
        if c.get("backbone") not in backbones:
            raise ValueError(f"setting {name!r}, client {c.get('id')!r}: unknown backbone {c.get('backbone')!r}")
        if lm_settings is not None:
            _check_lm_client(name, c, lm_settings)
        elif not c.get("topics"):
            raise ValueError(f"setting {name!r}, client {c['id']!r}: needs 'topics'"
                             + (" ('domains' is for LM suites, task 'lm')" if "domains" in c else ""))
        else:
            check_label_map(f"setting {name!r}, client {c['id']!r}", c.get("label_map"))
    names = [m.get("name") if isinstance(m, dict) else None for m in setting["methods"]]
    if len(set(names)) != len(names) or not all(names):
        raise ValueError(f"setting {name!r}: methods need unique names, got {names}")
    specs = []
    for m in setting["methods"]:
        spec = parse_method(m, setting=name)
        spec.check_setting(setting["clients"], lm=lm_settings is not None,
                           where=f"setting {name!r}, method {spec.name!r}")
        specs.append(spec)
    return specs


def _check_memory(memory: dict | None, backbones: dict, lm: bool) -> None:
    if memory and lm:
        raise ValueError("suite: 'memory' (peak memory per method) is measured by classification suites; set it "
                         "to null in an LM suite")
    if memory:
        if memory.get("backbone") not in backbones:
            raise ValueError(f"memory: unknown backbone {memory.get('backbone')!r}")
        bad = [m for m in memory.get("methods", MEMORY_METHODS) if m not in MEMORY_METHODS]
        if bad:
            raise ValueError(f"memory: unknown method(s) {bad}; known {MEMORY_METHODS}")


def _check_lm_client(setting: str, client: dict, settings: LMDataSettings) -> None:
    """An LM suite's client: 'domains' (a non-empty list without repeats), known to the fortunes corpus
    when that is the source, and scored (in lm_data.domains when that is given)."""
    where = f"setting {setting!r}, client {client.get('id')!r}"
    if "topics" in client:
        raise ValueError(f"{where}: an LM suite's clients take 'domains', not 'topics'")
    if "label_map" in client:
        raise ValueError(f"{where}: 'label_map' relabels sentiment labels; the LM task has none")
    domains = client.get("domains")
    if (not isinstance(domains, list) or not domains or len(set(domains)) != len(domains)
            or not all(isinstance(d, str) and d for d in domains)):
        raise ValueError(f"{where}: 'domains' must be a non-empty list of distinct domain names "
                         f"(e.g. ['computers']), got {domains!r}")
    if settings.source == "fortunes":
        unknown = [d for d in domains if d not in FORTUNES_DOMAINS]
        if unknown:
            raise ValueError(f"{where}: unknown domain(s) {unknown} in 'domains'; the fortunes corpus has "
                             f"{list(FORTUNES_DOMAINS)}")
    if settings.domains is not None:
        unscored = [d for d in domains if d not in settings.domains]
        if unscored:
            raise ValueError(f"{where}: 'domains' {unscored} missing from lm_data.domains {settings.domains}")
