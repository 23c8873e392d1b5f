"""The federation store's output-distillation files: each client's anchor predictions (label-level
[N, C], or token-level top-k ids and probabilities) and each round's teachers (docs/store.md,
"Output distillation"). A mixin of FederationStore: `self.layout` names the files."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from .artifact import prepare_tensors, read_artifact_if_present, remove_artifact, write_artifact
from .errors import StoreIntegrityError
from .layout import ALL_CLIENTS, validate_client_id, validate_round
from .manifest import PredictionsManifest, TeachersManifest, is_valid_quality


class DistillFiles:
    """Writing and reading the distillation files of a store (FederationStore's methods)."""

    def write_anchor_predictions(self, round: int, client_id: str, probs: torch.Tensor, *,
                                 quality: float | None = None) -> Path:
        """The client's label distribution on the public anchor prompts after training ``round``
        ([N, C], fedzero.distill.distiller), and optionally its quality: its mean loss on its own
        held-out examples (nats per labelled token; finite, >= 0; lower is better), which the
        quality-weighted teachers need. Written *before* the client's update: the update's
        manifest marks the client's whole round complete."""
        round = validate_round(round)
        files = self.layout.predictions_files(round, client_id)
        if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
            raise ValueError(f"anchor predictions must be a 2-d tensor [anchors, labels], got {probs!r:.80}")
        if quality is not None and not is_valid_quality(quality):
            raise ValueError(f"anchor predictions of client {client_id} in round {round}: quality must be a "
                             f"finite number >= 0 (the client's held-out loss), got {quality!r}")
        return write_artifact(files, prepare_tensors({"probs": probs}, "anchor predictions"), PredictionsManifest,
                              round=round, quality=None if quality is None else float(quality))

    def _read_predictions(self, round: int, client_id: str, *, token: bool) -> tuple[str, tuple | None]:
        """(what, (tensors, manifest) or None if the client sent no predictions in ``round``), the
        files refused (StoreIntegrityError) when their level is not the one asked for (token or label)."""
        round = validate_round(round)
        what = f"anchor predictions of client {client_id} in round {round}"
        found = read_artifact_if_present(self.layout.predictions_files(round, client_id), PredictionsManifest,
                                         round=round, what=what)
        if found is not None and (found[1].level == "token") != token:
            raise StoreIntegrityError(f"{what} are label-level, not token-level (distill.level: token)" if token
                                      else f"{what} are token-level (distill.level: token), not label distributions")
        return what, found

    def read_anchor_predictions(self, round: int, client_id: str) -> torch.Tensor | None:
        """A client's verified anchor predictions of ``round``, or ``None`` if it sent none."""
        found = self.read_anchor_predictions_with_quality(round, client_id)
        return None if found is None else found[0]

    def read_anchor_predictions_with_quality(self, round: int, client_id: str
                                             ) -> tuple[torch.Tensor, float | None] | None:
        """(predictions, quality) of a client in ``round`` from one read of the manifest (quality
        None: the client sent none, as files written before the field existed), or ``None`` if it
        sent no predictions. A quality that is not a finite number >= 0 is refused."""
        what, found = self._read_predictions(round, client_id, token=False)
        if found is None:
            return None
        tensors, manifest = found
        if list(tensors) != ["probs"]:
            raise StoreIntegrityError(f"{what}: expected one tensor 'probs', found {sorted(tensors)}")
        return tensors["probs"], None if manifest.quality is None else float(manifest.quality)

    def write_token_predictions(self, round: int, client_id: str, ids: torch.Tensor, probs: torch.Tensor, *,
                                tokenizer: str, anchors: str, quality: float | None = None) -> Path:
        """Token-level distillation (fedzero.distill.tokens): the client's top-k next-token ids
        [P, k] (int32) and their renormalised probabilities [P, k] (float32) at the P scored anchor
        positions, its tokenizer fingerprint, the digest of the positions it scored, and optionally its
        quality (as write_anchor_predictions). Written before the client's update, in the same files."""
        round = validate_round(round)
        where = f"token predictions of client {client_id} in round {round}"
        files = self.layout.predictions_files(round, client_id)
        if not isinstance(ids, torch.Tensor) or not isinstance(probs, torch.Tensor) or ids.dim() != 2 \
                or ids.shape != probs.shape or ids.numel() == 0:
            raise ValueError(f"{where}: ids and probs must be two non-empty 2-d tensors of one shape [positions, "
                             f"top_k], got {getattr(ids, 'shape', ids)!r:.60} and {getattr(probs, 'shape', probs)!r:.60}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"{where}: ids must be integer token ids, got {ids.dtype}")
        if not isinstance(tokenizer, str) or not tokenizer:
            raise ValueError(f"{where}: tokenizer must be a non-empty fingerprint, got {tokenizer!r}")
        if not isinstance(anchors, str) or len(anchors) != 64 or any(ch not in "0123456789abcdef" for ch in anchors):
            raise ValueError(f"{where}: anchors must be the hex sha256 of the scored positions, got {anchors!r}")
        if quality is not None and not is_valid_quality(quality):
            raise ValueError(f"{where}: quality must be a finite number >= 0 (the client's held-out loss), "
                             f"got {quality!r}")
        tensors = prepare_tensors({"ids": ids.to(torch.int32), "probs": probs.to(torch.float32)}, "token predictions")
        return write_artifact(files, tensors, PredictionsManifest, round=round, level="token", tokenizer=tokenizer,
                              anchors=anchors, top_k=int(ids.shape[1]),
                              quality=None if quality is None else float(quality))

    def read_token_predictions(self, round: int, client_id: str) -> dict | None:
        """A client's verified token predictions of ``round`` as {"ids", "probs", "tokenizer",
        "anchors", "quality"}, or ``None`` if it sent no predictions. Label-level predictions are
        refused (StoreIntegrityError), as are files whose tensors do not match their manifest."""
        what, found = self._read_predictions(round, client_id, token=True)
        if found is None:
            return None
        tensors, m = found
        if sorted(tensors) != ["ids", "probs"]:
            raise StoreIntegrityError(f"{what}: expected tensors 'ids' and 'probs', found {sorted(tensors)}")
        missing = [k for k in ("tokenizer", "anchors", "top_k") if getattr(m, k) is None]
        if missing:
            raise StoreIntegrityError(f"{what}: token-level manifest lacks {missing}")
        ids, probs = tensors["ids"], tensors["probs"]
        if ids.dim() != 2 or ids.shape != probs.shape or ids.shape[1] != m.top_k or ids.dtype != torch.int32:
            raise StoreIntegrityError(f"{what}: ids {tuple(ids.shape)} {ids.dtype} and probs {tuple(probs.shape)} "
                                      f"do not match the manifest's top_k {m.top_k} (int32 ids)")
        return {"ids": ids, "probs": probs, "tokenizer": m.tokenizer, "anchors": m.anchors,
                "quality": None if m.quality is None else float(m.quality)}

    def write_teachers(self, round: int, teachers: Mapping[str, torch.Tensor]) -> Path:
        """The anchor teachers clients distil from in ``round`` ({client id or ALL_CLIENTS: [N, C]}),
        written by the aggregator of round-1 *before* it publishes the global of ``round``."""
        round = validate_round(round)
        for key in teachers:
            if key != ALL_CLIENTS:
                validate_client_id(key)
        return write_artifact(self.layout.teachers_files(round), prepare_tensors(teachers, "teachers"),
                              TeachersManifest, round=round)

    def clear_teachers(self, round: int) -> None:
        """Remove the teachers of ``round`` (manifest first): an aggregator that retries a round and
        this time has no predictions must not leave an earlier attempt's teachers beside the global."""
        remove_artifact(self.layout.teachers_files(validate_round(round)))

    def read_teacher(self, round: int, client_id: str) -> torch.Tensor | None:
        """The teacher for ``client_id`` in ``round``: its own (the others' mean), else the mean of
        every client that sent predictions (present only when two or more did, so it is never a
        client's own predictions alone), else ``None`` (no distillation this round)."""
        round = validate_round(round)
        found = read_artifact_if_present(self.layout.teachers_files(round), TeachersManifest, round=round,
                                         what=f"teachers of round {round}")
        if found is None:
            return None
        if found[1].level == "token":
            raise StoreIntegrityError(f"teachers of round {round} are token-level (distill.level: token)")
        return found[0].get(client_id, found[0].get(ALL_CLIENTS))

    def write_token_teachers(self, round: int, teachers: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> Path:
        """Token-level teachers of ``round`` ({client id or ALL_CLIENTS: (ids [P, W] int32, PAD_ID -1
        where a row is narrower; probs [P, W] float32)}), as tensors ``<key>/ids`` and ``<key>/probs``
        in the teachers files, written before the global of ``round`` as write_teachers."""
        round = validate_round(round)
        tensors = {}
        for key, (ids, probs) in teachers.items():
            if key != ALL_CLIENTS:
                validate_client_id(key)
            if ids.dim() != 2 or ids.shape != probs.shape:
                raise ValueError(f"token teacher of {key!r}: ids {tuple(ids.shape)} and probs {tuple(probs.shape)} "
                                 "must be two 2-d tensors of one shape")
            tensors[f"{key}/ids"], tensors[f"{key}/probs"] = ids.to(torch.int32), probs.to(torch.float32)
        return write_artifact(self.layout.teachers_files(round), prepare_tensors(tensors, "token teachers"),
                              TeachersManifest, round=round, level="token")

    def read_token_teacher(self, round: int, client_id: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The token-level teacher (ids, probs) for ``client_id`` in ``round``: its own, else the
        ALL_CLIENTS mixture, else ``None``. Label-level teachers are refused (StoreIntegrityError)."""
        round = validate_round(round)
        what = f"teachers of round {round}"
        found = read_artifact_if_present(self.layout.teachers_files(round), TeachersManifest, round=round, what=what)
        if found is None:
            return None
        tensors, manifest = found
        if manifest.level != "token":
            raise StoreIntegrityError(f"{what} are label-level, not token-level (distill.level: token)")
        for key in (client_id, ALL_CLIENTS):
            if f"{key}/ids" in tensors:
                if f"{key}/probs" not in tensors:
                    raise StoreIntegrityError(f"{what}: '{key}/ids' without '{key}/probs'")
                return tensors[f"{key}/ids"], tensors[f"{key}/probs"]
        return None
