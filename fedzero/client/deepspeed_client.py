"""One federated client on a backbone sharded by DeepSpeed ZeRO, training only its DeMA adapters.

Launched by launch/client.py (deepspeed, torchrun, mpirun or plain python; see docs/cluster.md).
A round here is the same computation as LocalClient.train_round (the single-process reference):
same batch stream, same loss normalisation, same AdamW with moments reset at the start of every
round, same learning-rate schedule, same clipping. What differs is only where tensors live.

Data parallelism that keeps the arithmetic of the reference
-----------------------------------------------------------
Every rank draws the *whole* optimizer-step batch (batch_size examples) from the same seeded
stream and takes its own rows: micro-batch a of rank r is rows [(a·W + r)·m, (a·W + r + 1)·m),
m = batch_size / (W·A). The reference loss is sum(token losses) / N (N = labelled tokens of the
whole batch, known on every rank). DeepSpeed divides each backward by A and averages gradients over
W ranks, so each micro-batch's backward gets loss_sum · W·A / N: the reduced gradient is exactly
∇(sum over the batch)/N.

Only rank 0 touches the store and the private state files (the other ranks may be on nodes that do
not see them); globals and private tensors reach the other ranks by broadcast.

This module is the round and its engine step; the step loop itself (schedule, batches, losses, the
hook after each step) is fedzero.client.steps.train_steps, as for every client kind. Around it, in fedzero.client: client_config (CLIENT.yaml),
distributed (process group start-up and lock-step waiting), zero_engine (the engine: ds config,
backbone and DeMA, deepspeed.initialize), state and state_layout (private state and checkpoints),
bootstrap (round 0's global); fedzero.backbones.zero3 (the partitioned backbone) and
fedzero.adapters.dema.zero (DeMA in the engine).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedzero.adapters.dema.zero import gather_fp32, load_fp32, read_private, save_private
from fedzero.client import state
from fedzero.client.canonical import exchange_for_engine
from fedzero.client.client_config import ClientRunConfig
from fedzero.client.distributed import broadcast_object, comm_device, init_distributed, poll_in_lock_step
from fedzero.client.local import mean_token_loss, token_loss_sums
from fedzero.client.state_layout import ClientStateLayout
from fedzero.client.steps import train_steps
from fedzero.client.zero_engine import (build_model, client_ds_config, describe, initialize, peak_memory,
                                        reset_optimizer_moments)
from fedzero.data import batches, build_examples, read_jsonl
from fedzero.ds_config import precision_of, zero_stage
from fedzero.store import FederationStore, StoreIntegrityError, StoreTimeoutError
from fedzero.store.auth import client_key

__all__ = ["DeepSpeedClient", "StepHook", "run_client"]

log = logging.getLogger("fedzero.client")

# Called on every rank as hook(round, steps_done) right after each optimizer step of a round (and
# after that step's checkpoint, if one is due). The tests kill a client mid-round from one.
StepHook = Callable[[int, int], None]


class DeepSpeedClient:
    """Builds the engine once; `run_round(r)` trains round r (callable for consecutive rounds)."""

    def __init__(self, cfg: ClientRunConfig, store_root: str | Path, *, after_step: StepHook | None = None,
                 canonical_bases_only: bool = False):
        self.cfg = cfg
        self.after_step = after_step
        self.layout = ClientStateLayout(cfg.state_dir)
        device_type = init_distributed()
        self.dist = torch.distributed
        self.rank, self.world = self.dist.get_rank(), self.dist.get_world_size()
        settings = cfg.client.train
        self.ds_config = client_ds_config(cfg, self.world, device_type)
        self.stage = zero_stage(self.ds_config)
        self.precision = precision_of(self.ds_config)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        # Only rank 0 opens the store: the other ranks may run on nodes that do not mount it.
        self.store = FederationStore(store_root, create=False) if self.rank == 0 else None

        self.built = build_model(cfg, self.ds_config)     # held: it keeps transformers' ZeRO-3 config alive
        self.handle, self.fingerprint, self.penalty = self.built.handle, self.built.fingerprint, self.built.penalty
        self.shared = self.handle.shared_parameters()
        self.private = self.handle.private_parameters()
        tokenizer = self.built.tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.examples = build_examples(read_jsonl(cfg.client.train_data), tokenizer, settings.max_length)
        if not self.examples:
            raise ValueError(f"client {cfg.client.id!r} has no training examples")
        self.engine = initialize(self.built, self.ds_config, settings.lr)
        self.device = self.engine.device
        # canonical projectors: the round-0 exchange sets (or loads) the map; fedzero/client/canonical.py
        self.canonical = (exchange_for_engine(self, send_only=canonical_bases_only) if cfg.dema.uses_canonical
                          else None)
        # Every rank scores the same anchors (a ZeRO-3 forward is collective); rank 0 sends them.
        self.distiller = (cfg.distill.make_distiller(tokenizer, max_length=settings.max_length, seed=cfg.seed)
                          if cfg.distill is not None else None)
        if self.distiller is not None:
            self.distiller.device = self.device
        # The quality sent with the predictions: the loss on the client's held-out examples, as
        # fedzero simulate measures it (the first max_eval_examples records of data.test).
        self.eval_examples = []
        if self.distiller is not None and self.distiller.reports_quality:
            self.eval_examples = build_examples(read_jsonl(cfg.client.test_data)[: settings.max_eval_examples],
                                                tokenizer, settings.max_length)
        if self.rank == 0:
            print(describe(cfg.client.id, self.engine, self.handle, self.ds_config, self.world), flush=True)
        self._stream = None
        self._stream_pos = None
        self._private_loaded = False

    def _broadcast(self, obj):
        return broadcast_object(obj, self.device)

    def _barrier(self):
        self.dist.barrier()

    # -- store and local state (rank 0 reads, everybody receives) ----------------------------------
    def _receive_global(self, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Wait for round rnd's global: rank 0 polls the store's wait (its deadline and its retries
        while a network file system lags), the other ranks wait with it in lock step."""
        wait = self.store.global_wait(rnd, timeout=self.cfg.wait_timeout) if self.rank == 0 else None
        global_state, manifest = poll_in_lock_step(wait.poll if wait is not None else None, interval=self.cfg.poll,
                                                   device=self.device, give_up=(StoreIntegrityError, StoreTimeoutError))
        return {k: v.float() for k, v in global_state.items()}, manifest

    def _load_private(self, rnd: int) -> int | None:
        """Load the private state saved after the latest earlier round; None = keep the seeded init."""
        payload = None
        if self.rank == 0:
            found = state.latest_private_before(self.cfg.state_dir, rnd)
            if found is not None:
                payload = (found[0], read_private(self.handle, found[1], fingerprint=self.fingerprint))
                if found[0] != rnd - 1:
                    log.warning("client %s: round %d starts from the private state of round %d (rounds skipped)",
                                self.cfg.client.id, rnd, found[0])
        payload = self._broadcast(payload)
        if payload is None:
            return None
        load_fp32(self.private, payload[1], self.device)
        return payload[0]

    def _round_done(self, rnd: int) -> bool:
        done = (state.round_is_done(self.store, self.cfg.client.id, self.cfg.state_dir, rnd)
                if self.rank == 0 else False)
        return bool(self._broadcast(done))

    # -- checkpoints ------------------------------------------------------------------------------
    def _resume(self, rnd: int, global_sha: str) -> tuple[int, list[float]]:
        """(first step, losses so far) of round rnd: from its checkpoint if that was trained from this
        same global, else (0, [])."""
        info = None
        if self.rank == 0:
            info = state.read_checkpoint_info(self.cfg.state_dir, rnd)
            if info is not None and (info.get("round") != rnd or info.get("global_sha256") != global_sha):
                log.warning("client %s: checkpoint in %s was trained from another global; restarting the round",
                            self.cfg.client.id, self.layout.checkpoint_dir(rnd))
                info = None
        info = self._broadcast(info)
        if info is None:
            return 0, []
        folder = self.layout.checkpoint_dir(rnd)
        load_path, _ = self.engine.load_checkpoint(str(folder), tag=info["tag"], load_module_strict=False,
                                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"could not load checkpoint {info['tag']} from {folder}")
        if self.rank == 0:
            log.warning("client %s: resuming round %d at step %d from %s", self.cfg.client.id, rnd, info["step"],
                        load_path)
        return int(info["step"]), list(info["losses"])

    def _save_checkpoint(self, rnd: int, step: int, global_sha: str, losses: list[float]) -> None:
        tag_dir = self.layout.checkpoint_tag_dir(rnd, step)
        # Collective: every rank writes its own partition of the DeMA master weights and moments;
        # the frozen backbone is left out (it is reloaded from its directory).
        self.engine.save_checkpoint(str(tag_dir.parent), tag=tag_dir.name, client_state={"round": rnd, "step": step},
                                    exclude_frozen_parameters=True)
        self._barrier()
        if self.rank == 0:     # after every rank's files: the info marks the tag complete
            state.mark_checkpoint_complete(self.cfg.state_dir, rnd, step, global_sha256=global_sha, losses=losses)
        self._barrier()

    # -- one round --------------------------------------------------------------------------------
    def _batches_from(self, position: int):
        """The seeded batch stream of LocalClient (seed = run seed), positioned at `position` batches."""
        if self._stream is None or self._stream_pos != position:
            self._stream = batches(self.examples, self.cfg.client.train.batch_size, seed=self.cfg.seed,
                                   pad_id=self.pad_id)
            for _ in range(position):
                next(self._stream)
            self._stream_pos = position
        return self._stream

    def _next_batch(self) -> dict[str, torch.Tensor]:
        batch = next(self._stream)
        self._stream_pos += 1
        return batch

    def _train_step(self, batch: dict[str, torch.Tensor], step: int) -> float:
        """One optimizer step of the engine (`step` counts from the start of the federation; the
        learning rate is set by fedzero.client.steps.train_steps); returns the batch's mean token loss."""
        count = max(int((batch["labels"][:, 1:] != -100).sum()), 1)   # labelled tokens of the whole batch
        scale = self.world * self.accum / count
        local_sum = torch.zeros((), dtype=torch.float64)
        for a in range(self.accum):
            first = (a * self.world + self.rank) * self.micro
            micro = {k: v[first:first + self.micro].to(self.device) for k, v in batch.items()}
            loss_sum, _ = token_loss_sums(self.engine, micro)
            # The penalty enters every micro-batch unscaled: DeepSpeed's 1/(W·A) brings it back to once.
            loss = loss_sum * scale + self.penalty()
            # The distillation term (same anchors on every rank) once per step, times A for the same reason.
            distill = self.distiller.loss(self.engine, step) if self.distiller is not None and a == 0 else None
            if distill is not None:
                loss = loss + distill * self.accum
            self.engine.backward(loss)
            self.engine.step()
            local_sum += loss_sum.detach().double().cpu()
        total = local_sum.to(comm_device(self.device))
        self.dist.all_reduce(total)
        return float(total) / count

    def run_round(self, rnd: int) -> dict | None:
        """Train round `rnd`; rank 0 writes the update. Returns the metrics (None if already done)."""
        settings = self.cfg.client.train
        cid = self.cfg.client.id
        full_global, manifest = self._receive_global(rnd)
        # With shape-matched sharing the global also holds other widths' projector banks: keep ours.
        global_state = self.handle.select_shared(full_global)
        if self._round_done(rnd):
            log.warning("client %s: round %d is already complete (closed, or update and private state saved); "
                        "skipping", cid, rnd)
            self._private_loaded = False   # the next round must start from the saved private state
            return None
        load_fp32(self.shared, global_state, self.device)
        if self.distiller is not None:
            teacher = self.distiller.read_teacher(self.store, rnd, cid) if self.rank == 0 else None
            self.distiller.set_teacher(self._broadcast(teacher))
        if not self._private_loaded:
            self._load_private(rnd)
            self._private_loaded = True
        reset_optimizer_moments(self.engine)

        start, losses = self._resume(rnd, manifest["sha256"])
        every = self.cfg.deepspeed.checkpoint_every
        self._batches_from(rnd * settings.local_steps + start)
        self.engine.train()
        started = time.perf_counter()

        def after_step(done_here: int, losses_so_far: list[float]) -> None:
            done = start + done_here
            if every and done % every == 0 and done < settings.local_steps:
                self._save_checkpoint(rnd, done, manifest["sha256"], losses_so_far)
            if self.after_step is not None:
                self.after_step(rnd, done)

        steps = train_steps(self._train_step, self.engine.optimizer.param_groups, self._next_batch, settings,
                            first_step=rnd * settings.local_steps + start, count=settings.local_steps - start,
                            total_steps=self.cfg.total_rounds * settings.local_steps, losses=losses,
                            after_step=after_step)
        losses, step_times = steps.losses, steps.seconds
        seconds = time.perf_counter() - started
        self.engine.eval()
        metrics = {"train_loss": sum(losses) / len(losses), "steps": settings.local_steps,
                   "resumed_at_step": start, "world_size": self.world, "zero_stage": self.stage,
                   "precision": self.precision, "seconds": round(seconds, 3),
                   "step_seconds_median": round(sorted(step_times)[len(step_times) // 2], 4) if step_times else None}
        self._send(rnd, global_state, metrics, manifest["sha256"])
        return metrics

    def _send(self, rnd: int, global_state: dict[str, torch.Tensor], metrics: dict, global_sha256: str) -> None:
        """Upload round rnd's update (and anchor predictions), then save the private state. Collective;
        adds the peak memory to `metrics`."""
        cid = self.cfg.client.id
        trained = gather_fp32(self.shared)
        private = gather_fp32(self.private)
        # ZeRO-3's forward is collective: every rank scores the anchors; otherwise rank 0 alone.
        scores = self.distiller is not None and (self.stage == 3 or self.rank == 0)
        predictions = self.distiller.predict(self.engine) if scores else None
        quality = (mean_token_loss(self.engine, self.eval_examples, batch_size=self.cfg.client.train.eval_batch_size,
                                   pad_id=self.pad_id, device=self.device)
                   if scores and self.distiller.reports_quality else None)
        metrics.update(peak_memory(self.device))
        if self.rank == 0:
            delta = {k: trained[k] - global_state[k] for k in trained}
            if predictions is not None:     # before the update: its manifest marks the round complete
                self.distiller.write_predictions(self.store, rnd, cid, predictions, quality=quality)
            # The store commits the tensor file first and the manifest last: a crash here never
            # leaves a visible half-written update.
            self.store.write_update(rnd, cid, delta, fingerprint=self.fingerprint,
                                    num_samples=len(self.examples), metrics=metrics,
                                    slot_use=self.handle.slot_use(), depth=self.handle.depth_declaration(),
                                    # bound to the global it read and verified; signed if prepare gave it a key
                                    global_sha256=global_sha256, key=client_key(self.cfg.state_dir))
            # Saved after the upload and named by round: a rerun of this round still loads round
            # rnd-1's file, so the order of the two writes never matters.
            save_private(self.handle, private, self.layout.private_path(rnd), fingerprint=self.fingerprint)
            state.prune_private(self.cfg.state_dir, rnd)
            state.remove_checkpoints(self.cfg.state_dir, rnd)
        self._barrier()


def run_client(cfg: ClientRunConfig, store: str | Path, first_round: int, rounds: int = 1, *,
               after_step: StepHook | None = None) -> list[dict | None]:
    """Serve `rounds` consecutive rounds from `first_round` with one engine (rounds=1: one-shot)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if first_round + rounds > cfg.total_rounds:
        raise ValueError(f"rounds {first_round}..{first_round + rounds - 1} go past federation.rounds="
                         f"{cfg.total_rounds} (the learning-rate schedule's horizon)")
    client = DeepSpeedClient(cfg, store, after_step=after_step)
    results = []
    for rnd in range(first_round, first_round + rounds):
        metrics = client.run_round(rnd)
        if client.rank == 0:
            status = "skipped (already done)" if metrics is None else (
                f"train_loss {metrics['train_loss']:.4f}, {metrics['seconds']:.1f} s")
            print(f"[fedzero] client {cfg.client.id} round {rnd}: {status}", flush=True)
        results.append(metrics)
    return results
