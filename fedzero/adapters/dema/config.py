"""DeMA configuration: the numbers every client of a federation must agree on, plus local choices.

DeMA (Dense Mixture of Adapters) is *our design after the HeteroTune abstract*, see docs/method.md.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from fedzero.fields import from_known_fields

PLACEMENTS = ("parallel", "side")
TARGETS = ("mlp",)
PROJECTORS = ("learned", "anchor", "anchor+learned", "canonical", "canonical+learned")
SHARING = ("experts-only", "shape-matched", "depth-aware")

# Fields that define the shared space. Two clients whose values differ here cannot aggregate.
SHARED_FIELDS = ("rank", "num_experts", "num_slots", "expert_hidden")


@dataclass
class DeMAConfig:
    rank: int = field(default=64, metadata={"help": "r: width of the shared low-rank space"})
    num_experts: int = field(default=4, metadata={"help": "M: shared experts per depth slot (all active: dense)"})
    num_slots: int = field(default=8, metadata={"help": "S: depth slots; layer l of L maps to slot floor(l*S/L)"})
    expert_hidden: int | None = field(default=None, metadata={"help": "h: hidden size of each expert MLP (default r)"})
    temperature: float = field(default=1.0, metadata={"help": "tau: softmax temperature of the gate"})
    placement: str = field(default="parallel", metadata={"help": "'parallel' (beside the MLP block) or 'side' (side stream, no backbone autograd)"})
    target: str = field(default="mlp", metadata={"help": "which block of each decoder layer the adapter runs beside"})
    projector: str = field(default="learned", metadata={"help": "in-projector: 'learned' (trained), 'anchor' (frozen relative representation over the public anchor set), 'anchor+learned' (anchor start, fine-tuned with a penalty), 'canonical' (frozen linear map onto a shared space fitted on the anchor set across clients: fedzero/adapters/dema/canonical.py) or 'canonical+learned' (plus a learned private residual, zero-initialised)"})
    anchor_out: bool = field(default=False, metadata={"help": "anchor-defined out-projector U = (A - mu)^T diag(g), g learned and zero-initialised (needs an anchor projector)"})
    share: str = field(default="shape-matched", metadata={"help": "'shape-matched' (default: clients of equal hidden size also share their learned per-slot projectors; anchor projectors stay private), 'depth-aware' (as shape-matched, but a slot's projector is averaged only among clients whose depth ranges for that slot overlap by at least depth_overlap_min, weighted by the overlap: fedzero/adapters/dema/depth.py) or 'experts-only' (projectors stay on the client)"})
    depth_overlap_min: float = field(default=0.5, metadata={"help": "share 'depth-aware': the least overlap (intersection over union of two clients' depth ranges for a slot) at which a client's projector enters another's average; in (0, 1]"})
    anchor_file: str | None = field(default=None, metadata={"help": "JSONL of public anchor texts ({'text': ...}); default: the bundled set. Every client must use the same file"})
    num_anchors: int = field(default=256, metadata={"help": "anchor texts used for the mean mu (the first `rank` of them define the directions)"})
    anchor_lr_scale: float = field(default=0.1, metadata={"help": "anchor+learned: learning-rate factor of the in-projector"})
    anchor_whiten: bool = field(default=False, metadata={"help": "anchor projectors: whiten the r anchor directions by their Gram matrix (z = K^-1/2 of the relative codes), so one common direction does not dominate every code"})
    canonical_components: int | None = field(default=None, metadata={"help": "canonical projectors: m, the principal components of its anchor states each client contributes to the fit (default 2 x rank)"})
    canonical_ridge: float = field(default=0.01, metadata={"help": "canonical projectors: ridge of each client's fit onto the shared codes, relative to its anchor states' mean squared singular value"})
    anchor_penalty: float = field(default=1.0, metadata={"help": "anchor+learned: weight of ||(W - W0) W0^T||^2, which keeps the anchors' codes near their initial values"})
    seed: int = field(default=0, metadata={"help": "seeds the initial shared state (identical on every client)"})

    def __post_init__(self):
        if self.expert_hidden is None:
            self.expert_hidden = self.rank
        for name in ("rank", "num_experts", "num_slots", "expert_hidden"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DeMAConfig.{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"DeMAConfig.temperature must be > 0, got {self.temperature!r}")
        for name, allowed in (("placement", PLACEMENTS), ("target", TARGETS), ("projector", PROJECTORS), ("share", SHARING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"DeMAConfig.{name}={getattr(self, name)!r} is not supported; choose one of {allowed}")

        if not (isinstance(self.depth_overlap_min, (int, float)) and not isinstance(self.depth_overlap_min, bool)
                and 0 < self.depth_overlap_min <= 1):
            raise ValueError(f"DeMAConfig.depth_overlap_min must be in (0, 1], got {self.depth_overlap_min!r}")

        if self.anchor_out and not self.uses_anchors:
            raise ValueError("DeMAConfig.anchor_out needs projector 'anchor' or 'anchor+learned'")
        if self.uses_anchors and self.num_anchors < self.rank:
            raise ValueError(f"DeMAConfig.num_anchors ({self.num_anchors}) must be >= rank ({self.rank}): "
                             "each of the r code dimensions is one anchor")
        if self.anchor_whiten and not self.uses_anchors:
            raise ValueError("DeMAConfig.anchor_whiten needs projector 'anchor' or 'anchor+learned'")
        if self.canonical_components is not None and (not isinstance(self.canonical_components, int)
                                                      or isinstance(self.canonical_components, bool)):
            raise ValueError(f"DeMAConfig.canonical_components must be an integer, got {self.canonical_components!r}")
        if not (isinstance(self.canonical_ridge, (int, float)) and self.canonical_ridge >= 0):
            raise ValueError(f"DeMAConfig.canonical_ridge must be >= 0, got {self.canonical_ridge!r}")
        if self.uses_canonical:
            m = self.canonical_dims
            if m < self.rank:
                raise ValueError(f"DeMAConfig.canonical_components ({m}) must be >= rank ({self.rank}): each client's "
                                 "own components must be able to hold the r shared codes")
            if self.num_anchors <= m:
                raise ValueError(f"DeMAConfig.num_anchors ({self.num_anchors}) must be > canonical_components ({m}"
                                 f"{', default 2 x rank' if self.canonical_components is None else ''}): m components "
                                 "of N centred anchor states need N >= m + 1 texts, and many more to mean anything")

    @property
    def uses_anchors(self) -> bool:
        return self.projector in ("anchor", "anchor+learned")

    @property
    def uses_canonical(self) -> bool:
        return self.projector in ("canonical", "canonical+learned")

    @property
    def canonical_dims(self) -> int:
        """m: the components each client contributes to the canonical fit."""
        return self.canonical_components if self.canonical_components is not None else 2 * self.rank

    def learned_stand_in(self) -> "DeMAConfig":
        """The learned-projector config with the same shared state as this one: for counting and for
        round 0's shared state without a backbone's weights (anchor and canonical projectors are
        computed from them, and stay private: share experts-only)."""
        if self.projector == "learned":
            return self
        return dataclasses.replace(self, projector="learned", anchor_out=False, anchor_whiten=False,
                                   share="experts-only")

    @property
    def shares_projectors(self) -> bool:
        """Whether the projectors travel (per slot, among clients of one width; with 'depth-aware', per
        slot among those of one width whose depth ranges overlap). Anchor and canonical projectors are
        defined by each backbone's own anchor states, so they stay private under any `share`."""
        return self.share in ("shape-matched", "depth-aware") and self.projector == "learned"

    @property
    def depth_aware(self) -> bool:
        """Whether the shared projectors are averaged depth-aware (docs/method.md, "Depth-aware projector sharing")."""
        return self.shares_projectors and self.share == "depth-aware"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "DeMAConfig":
        return from_known_fields(cls, data, "DeMAConfig field")

    @classmethod
    def from_json(cls, text: str) -> "DeMAConfig":
        return cls.from_dict(json.loads(text))

    def shared_signature(self) -> dict:
        """The part of the config that must match for two clients' shared states to be compatible."""
        return {name: getattr(self, name) for name in SHARED_FIELDS}

    def slot_of_layer(self, layer: int, num_layers: int) -> int:
        """Proportional depth alignment: layer l of an L-layer backbone uses slot floor(l*S/L)."""
        return (layer * self.num_slots) // num_layers
