"""Every path and name in a DeepSpeed client's own state directory (`state_dir` of its CLIENT.yaml).

    STATE_DIR/
      private/r000003.safetensors        private DeMA part after training round 3 (dema io's format)
      checkpoints/r000004/               DeepSpeed checkpoint of round 4, only while that round runs
      checkpoints/r000004/step000002/    one tag: every rank's partition of the DeMA master weights and moments
      checkpoints/r000004/fedzero.json   written after every rank's files of its tag: marks that tag complete

Rounds are named as in the store (fedzero.store.layout.round_dirname). No other module builds a path
in a state directory: they ask a :class:`ClientStateLayout`. Paths only: nothing is read here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from fedzero.store.layout import round_dirname, round_of_dirname

PRIVATE_DIR = "private"
PRIVATE_SUFFIX = ".safetensors"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_INFO = "fedzero.json"
_STEP_TAG_RE = re.compile(r"step(\d{6,})")


def step_tag(step: int) -> str:
    """``step000002``: the DeepSpeed checkpoint tag written after `step` optimizer steps of a round."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step{step:06d}"


def step_of_tag(name: str) -> int | None:
    """The step of a tag :func:`step_tag` writes (``step000002`` -> 2); ``None`` for any other name."""
    m = _STEP_TAG_RE.fullmatch(name)
    return int(m.group(1)) if m and step_tag(int(m.group(1))) == name else None


def round_of_private(name: str) -> int | None:
    """The round of a private state file name (``r000003.safetensors`` -> 3); ``None`` for any other name."""
    if not name.endswith(PRIVATE_SUFFIX):
        return None
    return round_of_dirname(name[: -len(PRIVATE_SUFFIX)])


@dataclass(frozen=True)
class ClientStateLayout:
    """The paths of a client state directory rooted at ``root``."""
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def private_dir(self) -> Path:
        return self.root / PRIVATE_DIR

    def private_path(self, round: int) -> Path:
        """The private DeMA part saved after training `round`."""
        return self.private_dir / f"{round_dirname(round)}{PRIVATE_SUFFIX}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / CHECKPOINTS_DIR

    def checkpoint_dir(self, round: int) -> Path:
        """The folder DeepSpeed's save_checkpoint/load_checkpoint get for `round` (tags inside)."""
        return self.checkpoints_dir / round_dirname(round)

    def checkpoint_tag_dir(self, round: int, step: int) -> Path:
        return self.checkpoint_dir(round) / step_tag(step)

    def checkpoint_info(self, round: int) -> Path:
        return self.checkpoint_dir(round) / CHECKPOINT_INFO
