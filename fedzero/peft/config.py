"""DeMA's PEFT config: DeMAConfig's fields as a PeftConfig, plus the backbone shape it was exported for.

PEFT names every method by a member of its closed `PeftType` enum, and `register_peft_method` refuses a
name that is not one ("please add an entry to peft.utils.peft_types.PeftType"). That is the one part
of the registration PEFT's API does not offer to a method living outside PEFT: `_add_peft_type` adds
the `DEMA` member to the enum in place, the way an entry in PEFT's own source would define it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from peft import PeftConfig
from peft.utils.peft_types import PeftType

from fedzero.adapters.dema import DeMAConfig

PEFT_TYPE_NAME = "DEMA"


def _add_peft_type(name: str) -> PeftType:
    """PeftType[name], added to the enum if absent. Idempotent."""
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member._sort_order_ = len(PeftType._member_names_)
    # The three tables Enum looks members up in (iteration, PeftType[name], PeftType(value)), then the
    # class attribute (PeftType.DEMA); type.__setattr__ because EnumType refuses to set member names.
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


DEMA = _add_peft_type(PEFT_TYPE_NAME)


@dataclass
class _DeMAPeftBase(PeftConfig):
    """What a DeMA adapter directory says besides DeMAConfig's fields (those are added below)."""

    hidden_size: Optional[int] = field(default=None, metadata={
        "help": "hidden size of the backbone the private part was trained on (checked when the adapter is injected)"})
    num_layers: Optional[int] = field(default=None, metadata={
        "help": "decoder layers of that backbone (its depth fixes the layer -> slot map; checked when injected)"})
    fingerprint: Optional[str] = field(default=None, metadata={
        "help": "fedzero's fingerprint of that backbone (fedzero.backbones.fingerprint), for reference"})
    provenance: Optional[dict] = field(default=None, metadata={
        "help": "where the adapter came from: run directory, client, round, the global's sha256, fedzero version"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = DEMA
        # Validated, and expert_hidden made explicit, by DeMAConfig itself: one set of rules.
        self.expert_hidden = self.dema_config().expert_hidden
        for name in ("hidden_size", "num_layers"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"DeMAPeftConfig.{name} must be a positive integer or None, got {value!r}")

    def dema_config(self) -> DeMAConfig:
        """The DeMAConfig these fields hold."""
        return DeMAConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(DeMAConfig)})

    @classmethod
    def from_dema(cls, dema: DeMAConfig, **fields) -> "DeMAPeftConfig":
        """A DeMAPeftConfig holding `dema`, with PEFT's and this class's other fields from `fields`."""
        fields.setdefault("task_type", "CAUSAL_LM")
        return cls(**dema.to_dict(), **fields)


def _dema_fields() -> list[tuple]:
    # Generated from DeMAConfig, so a field added there is carried into adapter_config.json without
    # a second list to keep in step.
    out = []
    for f in dataclasses.fields(DeMAConfig):
        default = {"default": f.default} if f.default is not dataclasses.MISSING else {
            "default_factory": f.default_factory}
        out.append((f.name, f.type, field(metadata=f.metadata, **default)))
    return out


_clash = {f.name for f in dataclasses.fields(_DeMAPeftBase)} & {f.name for f in dataclasses.fields(DeMAConfig)}
if _clash:
    raise ImportError(f"DeMAConfig field(s) {sorted(_clash)} collide with PeftConfig's own fields")

DeMAPeftConfig = dataclasses.make_dataclass(
    "DeMAPeftConfig", _dema_fields(), bases=(_DeMAPeftBase,),
    namespace={"__doc__": "PEFT config of a DeMA adapter: every DeMAConfig field (rank, num_experts, num_slots, "
                          "projector, ...) and the backbone shape the adapter belongs to "
                          "(fedzero/peft/config.py)."})
DeMAPeftConfig.__module__ = __name__      # make_dataclass names its caller's module only from Python 3.12
