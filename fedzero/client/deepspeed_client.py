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

Local directory of a client (`state_dir`):
    private/r000003.safetensors      private DeMA part after training round 3 (save_part format)
    checkpoints/r000004/             DeepSpeed checkpoint of round 4 while it runs, + fedzero.json
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedzero.adapters.dema import DeMAConfig, DeMAModel, inject_dema
from fedzero.adapters.dema.io import read_part, save_part
from fedzero.backbones import BackboneSpec, decoder_layout, fingerprint, load_backbone
from fedzero.client.distill import DistillSettings
from fedzero.client.local import lr_factor, mean_token_loss, token_loss_sums
from fedzero.config import ClientConfig, _only, parse_run_config, read_yaml, resolve_path
from fedzero.data import batches, build_examples, load_tokenizer, read_jsonl
from fedzero.ds_config import complete_ds_config, precision_of, zero_stage
from fedzero.store import FederationStore, StoreIntegrityError, StoreTimeoutError, atomic_write_json

log = logging.getLogger("fedzero.client")

# Testing aid: exit (all ranks, status 17) right after optimizer step j of a round, after that
# step's checkpoint if one is due. Simulates a client killed mid-round.
CRASH_ENV = "FEDZERO_CRASH_AFTER_STEP"
CRASH_EXIT_CODE = 17
_PRIVATE_FILE = re.compile(r"^r(\d{6,})\.safetensors$")


# =========================================================================== configuration

@dataclass
class DeepSpeedSettings:
    config: Path                                   # a file under ds_configs/
    gradient_accumulation_steps: int = 1
    precision: str = "auto"                        # auto | fp32 | bf16 | fp16 (auto: bf16 on GPU, fp32 on CPU)
    overrides: dict = field(default_factory=dict)  # merged into the file (e.g. bucket sizes)
    checkpoint_every: int = 0                      # optimizer steps between mid-round checkpoints (0: none)


@dataclass
class ClientRunConfig:
    """A CLIENT.yaml: one client of a federation, as run by a DeepSpeed process group."""

    seed: int
    dema: DeMAConfig
    total_rounds: int            # the schedule's horizon (federation.rounds)
    client: ClientConfig         # id, backbone, data, train (parsed by fedzero.config)
    deepspeed: DeepSpeedSettings
    state_dir: Path
    wait_timeout: float | None = 3600.0
    poll: float = 2.0
    source: Path | None = None
    distill: DistillSettings | None = None    # output distillation on the public anchors


_TOP_KEYS = {"seed", "dema", "federation", "train", "client", "deepspeed", "state_dir", "wait", "distill"}


def parse_client_config(data: dict, base: Path, source: Path | None = None) -> ClientRunConfig:
    """Parse a CLIENT.yaml mapping. `seed`, `dema`, `federation` and `train` mean what they mean in a
    run config (configs/demo.yaml); `client` is one entry of its `clients:` list."""
    if not isinstance(data, dict):
        raise ValueError("a client config must be a YAML mapping")
    _only("client config", data, _TOP_KEYS)
    for key in ("client", "deepspeed", "state_dir"):
        if key not in data:
            raise ValueError(f"client config: '{key}' is required")
    federation = dict(data.get("federation") or {})
    # The client only needs the schedule's horizon; the rest of the section belongs to the aggregator.
    run = parse_run_config({"seed": data.get("seed", 0), "dema": data.get("dema") or {},
                            "federation": {"rounds": federation.get("rounds", 1)},
                            "train": data.get("train") or {}, "clients": [data["client"]],
                            "distill": data.get("distill")}, base, source)
    ds_data = dict(data["deepspeed"])
    _only("deepspeed", ds_data, {"config", "gradient_accumulation_steps", "precision", "overrides", "checkpoint_every"})
    if "config" not in ds_data:
        raise ValueError("deepspeed.config (a file under ds_configs/) is required")
    ds_path = resolve_path(str(ds_data["config"]), base)
    if not ds_path.is_file():
        raise FileNotFoundError(f"deepspeed.config: no such file {ds_path}")
    ds = DeepSpeedSettings(config=ds_path,
                           gradient_accumulation_steps=int(ds_data.get("gradient_accumulation_steps", 1)),
                           precision=str(ds_data.get("precision", "auto")),
                           overrides=dict(ds_data.get("overrides") or {}),
                           checkpoint_every=int(ds_data.get("checkpoint_every", 0)))
    if ds.checkpoint_every < 0 or ds.gradient_accumulation_steps < 1:
        raise ValueError("deepspeed.checkpoint_every must be >= 0 and gradient_accumulation_steps >= 1")
    wait = dict(data.get("wait") or {})
    _only("wait", wait, {"timeout", "poll"})
    timeout = wait.get("timeout", 3600.0)
    return ClientRunConfig(seed=run.seed, dema=run.dema, total_rounds=run.federation.rounds, client=run.clients[0],
                           deepspeed=ds, state_dir=resolve_path(str(data["state_dir"]), base),
                           wait_timeout=None if timeout is None else float(timeout),
                           poll=float(wait.get("poll", 2.0)), source=source, distill=run.distill)


def load_client_config(path: str | Path) -> ClientRunConfig:
    data, path = read_yaml(path, "client config")
    return parse_client_config(data, path.parent, source=path)


# =========================================================================== distributed set-up

_MPI_ENV = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> str:
    """Initialise torch.distributed through DeepSpeed; returns the accelerator's device name.

    deepspeed/torchrun set RANK etc.; mpirun is discovered by DeepSpeed through mpi4py; a plain
    `python launch/client.py` with none of these becomes a one-process group on a free port.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    device = get_accelerator().device_name()
    if device == "cpu":
        # The deepspeed launcher sets LOCAL_SIZE; on the CPU accelerator that makes every process
        # allocate ~66 MB /dev/shm buffers that only inference all-reduce uses and nobody removes.
        os.environ.pop("LOCAL_SIZE", None)
        backend = "gloo"
    else:
        backend = get_accelerator().communication_backend_name()
    if not torch.distributed.is_initialized():
        if "RANK" not in os.environ and not any(k in os.environ for k in _MPI_ENV):
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
        deepspeed.init_distributed(dist_backend=backend)
    if device != "cpu":
        # Before anything is built: zero.Init places each rank's shards on its current device.
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return device


# =========================================================================== backbone under ZeRO-3

def load_backbone_zero3(spec: BackboneSpec) -> tuple[torch.nn.Module, str]:
    """Build a local HF model directory's model partitioned (zero.Init), then stream its weights.

    Requires a live HfDeepSpeedConfig with ZeRO-3 (transformers then wraps construction in
    deepspeed.zero.Init, so every parameter is born as a shard: shape [0], real shape in ds_shape).
    Weights are streamed one tensor at a time from the (sharded) safetensors files: rank 0 reads a
    tensor, the parameter is gathered, filled on rank 0 and re-partitioned. So no process ever holds
    the whole backbone, on the GPU or in CPU memory. (transformers' own ZeRO-3 from_pretrained
    reads every shard into rank 0's CPU memory first.)
    """
    import deepspeed
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    path = Path(spec.path)
    config = spec.hf_config()
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (path / "model.safetensors").is_file():
        with safe_open(str(path / "model.safetensors"), framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors(.index.json); ZeRO-3 loading streams safetensors only")

    model = AutoModelForCausalLM.from_config(config, dtype=spec.torch_dtype)   # partitioned, not initialised
    decoder_layout(model)     # from structure alone (shards hold no values): fail before streaming weights
    params = dict(model.named_parameters())   # tied weights appear once
    names = _parameter_names(model, params, sorted(weight_map), path)
    rank = torch.distributed.get_rank()
    by_file: dict[str, list[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(file, []).append(key)
    loaded = set()
    for file, keys in sorted(by_file.items()):
        reader = safe_open(str(path / file), framework="pt") if rank == 0 else None
        try:
            for key in sorted(keys):
                if names[key] not in params:
                    continue   # e.g. lm_head.weight of a tied model, rotary buffers of old checkpoints
                param = params[names[key]]
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        value = reader.get_tensor(key)
                        if tuple(value.shape) != tuple(param.shape):
                            raise ValueError(f"{path}/{file}: {key} has shape {tuple(value.shape)}, "
                                             f"the model expects {tuple(param.shape)}")
                        param.data.copy_(value.to(param.dtype))
                loaded.add(names[key])
        finally:
            if reader is not None:
                del reader
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:5]}{'…' if len(missing) > 5 else ''}")
    model.requires_grad_(False)
    model.eval()
    return model, fingerprint(config)


def _parameter_names(model, params: dict, keys: list[str], path: Path) -> dict[str, str]:
    """Checkpoint key -> the parameter it fills, renamed as transformers' own loading renames
    checkpoint keys (GPT-NeoX's embed_out is the model's lm_head). Tensors that transformers would
    merge or split on loading cannot be streamed one at a time: refused."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    names = {}
    for key in keys:          # in sorted order, as transformers applies its grouped renamings
        name, converted = rename_source_key(key, renamings, converters, model.base_model_prefix, params)
        if converted is not None:
            raise ValueError(f"{path}: checkpoint tensor {key} is converted ({converted}) when "
                             f"{type(model).__name__} loads it; ZeRO-3 streaming loads tensors one by one as stored")
        names[key] = name
    return names


# =========================================================================== helpers

class _PartView:
    """What save_part reads from a DeMAModel, with tensors gathered from the engine (under ZeRO-3 the
    handle's own parameters are shards)."""

    def __init__(self, handle: DeMAModel, private: dict[str, torch.Tensor]):
        self.config, self.hidden_size, self.num_layers = handle.config, handle.hidden_size, handle.num_layers
        self._private = private

    def private_state_dict(self) -> dict[str, torch.Tensor]:
        return self._private


def _check_private_header(header: dict, handle: DeMAModel, fp: str, path: Path) -> None:
    # The same checks as fedzero.adapters.dema.io.load_part.
    if header["part"] != "private":
        raise ValueError(f"{path} holds the {header['part']} part, not the private part")
    saved = DeMAConfig.from_dict(header["config"])
    if saved.shared_signature() != handle.config.shared_signature():
        raise ValueError(f"{path}: shared space {saved.shared_signature()} differs from this model's "
                         f"{handle.config.shared_signature()}")
    if header["fingerprint"] != fp:
        raise ValueError(f"{path}: private adapter was saved for backbone {header['fingerprint']}, this model is {fp}")


def private_state_path(state_dir: Path, rnd: int) -> Path:
    return Path(state_dir) / "private" / f"r{rnd:06d}.safetensors"


def latest_private_before(state_dir: Path, rnd: int) -> tuple[int, Path] | None:
    """The private state saved after the latest round < rnd, if any."""
    folder = Path(state_dir) / "private"
    best = None
    if folder.is_dir():
        for name in os.listdir(folder):
            m = _PRIVATE_FILE.match(name)
            if m and int(m.group(1)) < rnd and (best is None or int(m.group(1)) > best[0]):
                best = (int(m.group(1)), folder / name)
    return best


def round_is_done(store: FederationStore, client_id: str, state_dir: Path, rnd: int) -> bool:
    """Nothing to train in round rnd: it is closed (the next global exists, so an update would change
    nothing), or this client's update is in the store and its private state was saved after this
    round or a later one. So a restarted client never rewrites an update that may be being aggregated."""
    if store.has_global(rnd + 1):
        return True
    latest = latest_private_before(state_dir, 1 << 62)
    return store.has_update(rnd, client_id) and latest is not None and latest[0] >= rnd


def reset_optimizer_moments(engine) -> None:
    """Zero Adam's moments and step counters in place: the policy of LocalClient (a fresh optimizer
    every round, because the shared parameters jump at aggregation and old moments describe a
    point that no longer exists). Applies to shared and private parameters alike."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in base.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


class _Penalty(torch.nn.Module):
    """handle.regularization() (the anchor+learned penalty; 0 otherwise) as a module call, so that
    ZeRO-3 gathers the weights it reads (registered as external parameters of this module)."""

    def __init__(self, handle: DeMAModel):
        super().__init__()
        object.__setattr__(self, "handle", handle)     # not a submodule: registers no parameters
        self.params = [m.weight for m in handle._anchor_projectors() if isinstance(m.weight, torch.nn.Parameter)]

    def forward(self):
        value = self.handle.regularization()
        return value if torch.is_tensor(value) else torch.zeros(())

    def __call__(self):
        return super().__call__() if self.params else 0.0


def _inject_with_zero3_hooks(model, dema: DeMAConfig, dtype, tokenizer, ds_config: dict) -> DeMAModel:
    """inject_dema for anchor projectors on a ZeRO-3-partitioned backbone. Anchors are set by running
    the frozen backbone on the public anchor texts, which needs ZeRO-3's gather hooks before the
    training engine exists: a temporary engine without optimizer (DeepSpeed's ZeRO inference) installs
    them for the injection and is destroyed afterwards."""
    import deepspeed

    inference = {k: v for k, v in ds_config.items() if k not in ("optimizer", "scheduler")}
    engine, _, _, _ = deepspeed.initialize(model=model, config=inference)
    try:
        return inject_dema(model, dema, dtype=dtype, tokenizer=tokenizer)
    finally:
        engine.destroy()


# =========================================================================== the client

class DeepSpeedClient:
    """Builds the engine once; `run_round(r)` trains round r (callable for consecutive rounds)."""

    def __init__(self, cfg: ClientRunConfig, store_root: str | Path):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        self.cfg = cfg
        device_type = init_distributed()
        self.dist = torch.distributed
        self.rank, self.world = self.dist.get_rank(), self.dist.get_world_size()
        accel = get_accelerator()
        settings = cfg.client.train
        self.ds_config = complete_ds_config(
            cfg.deepspeed.config, batch_size=settings.batch_size, world_size=self.world,
            gradient_accumulation_steps=cfg.deepspeed.gradient_accumulation_steps, lr=settings.lr,
            weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, precision=cfg.deepspeed.precision,
            device_type=device_type, bf16_supported=device_type != "cpu" and accel.is_bf16_supported(),
            overrides=cfg.deepspeed.overrides)
        self.stage = zero_stage(self.ds_config)
        self.precision = precision_of(self.ds_config)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        # Only rank 0 opens the store: the other ranks may run on nodes that do not mount it.
        self.store = FederationStore(store_root, create=False) if self.rank == 0 else None

        spec = cfg.client.backbone
        self._hf_ds_config = None
        if self.stage == 3 and spec.path is not None:
            from transformers.integrations import HfDeepSpeedConfig

            # Must stay alive while the model is built: transformers consults it (weakly referenced)
            # to construct the model under deepspeed.zero.Init.
            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
            model, self.fingerprint = load_backbone_zero3(spec)
        else:
            # ZeRO-0/1/2 keep the whole frozen backbone on every rank. An inline (llama_/model_config) model
            # is small by nature: it is built whole and deepspeed.initialize partitions it.
            model, self.fingerprint = load_backbone(spec)
        tokenizer = load_tokenizer(spec.tokenizer, spec.path)
        self.pad_id = tokenizer.pad_token_id
        dema_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        # DeMA modules are created outside zero.Init, with their real shapes; deepspeed.initialize
        # converts every parameter of the module that is not yet a ZeRO parameter, so they are
        # partitioned (and hooked) like the backbone.
        if cfg.dema.uses_anchors and any(hasattr(p, "ds_id") for p in model.parameters()):
            self.handle = _inject_with_zero3_hooks(model, cfg.dema, dema_dtype, tokenizer, self.ds_config)
        else:
            self.handle = inject_dema(model, cfg.dema, dtype=dema_dtype, tokenizer=tokenizer)
        self.shared = self.handle.shared_parameters()
        self.private = self.handle.private_parameters()
        self.penalty = _Penalty(self.handle)
        if self.stage == 3 and self.penalty.params:
            # The anchor+learned penalty reads in-projector weights outside their module's forward:
            # under ZeRO-3 they are shards there. A module that owns the computation and declares
            # them as external parameters gets them gathered (and their gradients reduced).
            model.dema_penalty = self.penalty
            for param in self.penalty.params:
                deepspeed.zero.register_external_parameter(self.penalty, param)
        self.examples = build_examples(read_jsonl(cfg.client.train_data), tokenizer, settings.max_length)
        if not self.examples:
            raise ValueError(f"client {cfg.client.id!r} has no training examples")

        # Only the DeMA parameters reach the optimizer, so only they get optimizer state. Groups carry
        # `lr_scale` (anchor+learned in-projectors train at a smaller rate), as in LocalClient.
        self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=self.handle.param_groups(settings.lr),
                                                    config=self.ds_config)
        self.device = self.engine.device
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
            print(self.describe(), flush=True)
        self._stream = None
        self._stream_pos = None
        self._private_loaded = False

    def describe(self) -> str:
        numel = lambda p: getattr(p, "ds_numel", p.numel())   # noqa: E731  (ZeRO-3 shards have numel 0)
        model = self.handle.model
        frozen = sum(numel(p) for p in model.parameters() if not p.requires_grad)
        trainable = self.handle.trainable_parameters()
        partitioned = "partitioned" if all(hasattr(p, "ds_id") for p in trainable) else "replicated"
        return (f"[fedzero] client {self.cfg.client.id}: ZeRO-{self.stage} {self.precision} on {self.world} "
                f"{self.device.type} process(es); backbone {frozen:,} frozen parameters, DeMA "
                f"{sum(numel(p) for p in trainable):,} trainable ({partitioned}); batch "
                f"{self.ds_config['train_batch_size']} = micro {self.micro} x {self.world} processes x "
                f"{self.accum} accumulation steps")

    def _peak_memory(self) -> dict:
        """Peak resident memory of the processes (max and sum over ranks) and, on GPUs, peak allocated
        GPU memory (max over ranks), in MiB. Collective."""
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024          # Linux: KiB -> MiB
        gpu = torch.cuda.max_memory_allocated() / 2**20 if self.device.type == "cuda" else 0.0
        values = torch.tensor([rss, rss, gpu], dtype=torch.float64, device=self._comm_device())
        peak = values[[0, 2]].clone()
        self.dist.all_reduce(peak, op=torch.distributed.ReduceOp.MAX)
        total = values[1:2].clone()
        self.dist.all_reduce(total)
        out = {"peak_rss_mib_max": round(float(peak[0]), 1), "peak_rss_mib_sum": round(float(total[0]), 1)}
        if self.device.type == "cuda":
            out["peak_gpu_mib_max"] = round(float(peak[1]), 1)
        return out

    # -- collectives ------------------------------------------------------------------------------
    def _broadcast(self, obj):
        box = [obj]
        self.dist.broadcast_object_list(box, src=0, device=self._comm_device())
        return box[0]

    def _comm_device(self):
        return torch.device("cpu") if self.device.type == "cpu" else self.device

    def _barrier(self):
        self.dist.barrier()

    # -- moving DeMA tensors in and out of the engine ---------------------------------------------
    def gather_fp32(self, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
        """Full fp32 values (the optimizer's master copy where there is one). Collective."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in params.items():          # same order on every rank
            value = safe_get_full_fp32_param(p)
            if value is None:                   # ZeRO-0 in fp32: the parameter is the master
                with deepspeed.zero.GatheredParameters([p]):
                    value = p.detach().clone()
            out[name] = value.detach().float().cpu().reshape(tuple(getattr(p, "ds_shape", p.shape))).clone()
        return out

    def set_trainable(self, params: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
        """Load values into the running engine: the (possibly partitioned, low-precision) parameter and
        the optimizer's fp32 master copy. Setting only the parameter is undone by the next step."""
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        missing, unexpected = sorted(set(params) - set(values)), sorted(set(values) - set(params))
        if missing or unexpected:
            raise KeyError(f"DeMA state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, p in params.items():
            shape = tuple(getattr(p, "ds_shape", p.shape))
            if tuple(values[name].shape) != shape:
                raise ValueError(f"DeMA tensor {name!r}: shape {tuple(values[name].shape)} given, {shape} in the model")
        with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
            with torch.no_grad():
                for name, p in params.items():
                    p.data.copy_(values[name].to(device=p.device, dtype=p.dtype))
        for name, p in params.items():
            safe_set_full_fp32_param(p, values[name].float().to(self.device))

    # -- store and local state (rank 0 reads, everybody receives) ----------------------------------
    def _receive_global(self, rnd: int) -> tuple[dict[str, torch.Tensor], dict]:
        """Wait (in lock step: no collective ever blocks longer than one poll) for round rnd's global:
        rank 0 polls the store's wait (its deadline and its retries while a network file system lags)."""
        wait = self.store.global_wait(rnd, timeout=self.cfg.wait_timeout) if self.rank == 0 else None
        payload = None
        while True:
            status = 0   # 0 wait, 1 ready, 2 give up
            if self.rank == 0:
                try:
                    payload = wait.poll()
                    status = 0 if payload is None else 1
                except (StoreIntegrityError, StoreTimeoutError) as err:
                    payload, status = str(err), 2
            flag = torch.tensor([status], dtype=torch.int64, device=self._comm_device())
            self.dist.broadcast(flag, src=0)
            if int(flag) == 1:
                break
            if int(flag) == 2:
                message = self._broadcast(payload if self.rank == 0 else None)
                raise TimeoutError(message)
            time.sleep(self.cfg.poll)
        state, manifest = self._broadcast(payload if self.rank == 0 else None)
        return {k: v.float() for k, v in state.items()}, manifest

    def _load_private(self, rnd: int) -> int | None:
        """Load the private state saved after the latest earlier round; None = keep the seeded init."""
        payload = None
        if self.rank == 0:
            found = latest_private_before(self.cfg.state_dir, rnd)
            if found is not None:
                tensors, header = read_part(found[1])
                _check_private_header(header, self.handle, self.fingerprint, found[1])
                payload = (found[0], tensors)
                if found[0] != rnd - 1:
                    log.warning("client %s: round %d starts from the private state of round %d (rounds skipped)",
                                self.cfg.client.id, rnd, found[0])
        payload = self._broadcast(payload)
        if payload is None:
            return None
        self.set_trainable(self.private, payload[1])
        return payload[0]

    def _round_done(self, rnd: int) -> bool:
        done = round_is_done(self.store, self.cfg.client.id, self.cfg.state_dir, rnd) if self.rank == 0 else False
        return bool(self._broadcast(done))

    # -- checkpoints ------------------------------------------------------------------------------
    def checkpoint_dir(self, rnd: int) -> Path:
        return Path(self.cfg.state_dir) / "checkpoints" / f"r{rnd:06d}"

    def _read_checkpoint_info(self, rnd: int, global_sha: str) -> dict | None:
        info = None
        if self.rank == 0:
            path = self.checkpoint_dir(rnd) / "fedzero.json"
            if path.is_file():
                info = json.loads(path.read_text())
                if info.get("round") != rnd or info.get("global_sha256") != global_sha:
                    log.warning("client %s: checkpoint in %s was trained from another global; restarting the round",
                                self.cfg.client.id, path.parent)
                    info = None
        return self._broadcast(info)

    def _save_checkpoint(self, rnd: int, step: int, global_sha: str, loss_history: list[float]) -> None:
        folder = self.checkpoint_dir(rnd)
        tag = f"step{step:06d}"
        # Collective: every rank writes its own partition of the DeMA master weights and moments;
        # the frozen backbone is left out (it is reloaded from its directory).
        self.engine.save_checkpoint(str(folder), tag=tag, client_state={"round": rnd, "step": step},
                                    exclude_frozen_parameters=True)
        self._barrier()
        if self.rank == 0:
            # Written after every rank's files: its presence marks the tag complete.
            atomic_write_json(folder / "fedzero.json", {"round": rnd, "step": step, "tag": tag,
                                                        "global_sha256": global_sha, "losses": loss_history})
            for old in folder.iterdir():
                if old.is_dir() and old.name.startswith("step") and old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    # -- data -------------------------------------------------------------------------------------
    def _batches_from(self, position: int):
        """The seeded batch stream of LocalClient (seed = run seed), positioned at `position` batches."""
        if self._stream is None or self._stream_pos != position:
            self._stream = batches(self.examples, self.cfg.client.train.batch_size, seed=self.cfg.seed,
                                   pad_id=self.pad_id)
            for _ in range(position):
                next(self._stream)
            self._stream_pos = position
        return self._stream

    # -- one round --------------------------------------------------------------------------------
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
        self.set_trainable(self.shared, global_state)
        if self.distiller is not None:
            teacher = self.store.read_teacher(rnd, cid) if self.rank == 0 else None
            self.distiller.set_teacher(self._broadcast(None if teacher is None else teacher.numpy()))
        if not self._private_loaded:
            self._load_private(rnd)
            self._private_loaded = True
        reset_optimizer_moments(self.engine)

        start, losses = 0, []
        info = self._read_checkpoint_info(rnd, manifest["sha256"])
        if info is not None:
            load_path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir(rnd)), tag=info["tag"],
                                                       load_module_strict=False, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
            if load_path is None:
                raise RuntimeError(f"could not load checkpoint {info['tag']} from {self.checkpoint_dir(rnd)}")
            start, losses = int(info["step"]), list(info["losses"])
            if self.rank == 0:
                log.warning("client %s: resuming round %d at step %d from %s", cid, rnd, start, load_path)

        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        total_steps = self.cfg.total_rounds * settings.local_steps
        every = self.cfg.deepspeed.checkpoint_every
        stream = self._batches_from(rnd * settings.local_steps + start)
        self.engine.train()
        started = time.perf_counter()
        step_times = []
        for j in range(start, settings.local_steps):
            step_started = time.perf_counter()
            step = rnd * settings.local_steps + j
            for group in self.engine.optimizer.param_groups:
                group["lr"] = settings.lr * group.get("lr_scale", 1.0) * lr_factor(step, total_steps, settings)
            batch = next(stream)
            self._stream_pos += 1
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
            total = local_sum.to(self._comm_device())
            self.dist.all_reduce(total)
            losses.append(float(total) / count)
            step_times.append(time.perf_counter() - step_started)
            done = j + 1
            if every and done % every == 0 and done < settings.local_steps:
                self._save_checkpoint(rnd, done, manifest["sha256"], losses)
            if crash_after and done == crash_after:
                self._barrier()
                log.error("client %s: %s=%d: exiting after step %d of round %d", cid, CRASH_ENV, crash_after, done, rnd)
                os._exit(CRASH_EXIT_CODE)
        seconds = time.perf_counter() - started
        self.engine.eval()

        trained = self.gather_fp32(self.shared)
        private = self.gather_fp32(self.private)
        # ZeRO-3's forward is collective: every rank scores the anchors; otherwise rank 0 alone.
        scores = self.distiller is not None and (self.stage == 3 or self.rank == 0)
        predictions = self.distiller.predict(self.engine) if scores else None
        quality = (mean_token_loss(self.engine, self.eval_examples, batch_size=settings.eval_batch_size,
                                   pad_id=self.pad_id, device=self.device)
                   if scores and self.distiller.reports_quality else None)
        metrics = {"train_loss": sum(losses) / len(losses), "steps": settings.local_steps,
                   "resumed_at_step": start, "world_size": self.world, "zero_stage": self.stage,
                   "precision": self.precision, "seconds": round(seconds, 3),
                   "step_seconds_median": round(sorted(step_times)[len(step_times) // 2], 4) if step_times else None,
                   **self._peak_memory()}
        if self.rank == 0:
            delta = {k: trained[k] - global_state[k] for k in trained}
            if predictions is not None:     # before the update: its manifest marks the round complete
                self.store.write_anchor_predictions(rnd, cid, torch.as_tensor(predictions, dtype=torch.float32),
                                                    quality=quality)
            # The store commits the tensor file first and the manifest last: a crash here never
            # leaves a visible half-written update.
            self.store.write_update(rnd, cid, delta, fingerprint=self.fingerprint,
                                    num_samples=len(self.examples), metrics=metrics,
                                    slot_use=self.handle.slot_use())
            # Saved after the upload and named by round: a rerun of this round still loads round
            # rnd-1's file, so the order of the two writes never matters.
            save_part(_PartView(self.handle, private), private_state_path(self.cfg.state_dir, rnd), "private",
                      fingerprint=self.fingerprint)
            for old_rnd in range(rnd - 1):     # keep the last two
                stale = private_state_path(self.cfg.state_dir, old_rnd)
                if stale.is_file():
                    stale.unlink()
            shutil.rmtree(self.checkpoint_dir(rnd), ignore_errors=True)
        self._barrier()
        return metrics


def initial_shared_state(cfg: ClientRunConfig) -> dict[str, torch.Tensor]:
    """This client's part of round 0's global: its seeded initial shared DeMA state, exactly what
    inject_dema builds (it depends on the DeMA config, the seed and, for shape-matched projectors,
    the backbone's width and depth, never on its weights: the backbone is built on the meta device).
    A federation's round-0 global is the union of its clients' parts (fedzero.simulate)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg.client.backbone.hf_config())
    # Anchor projectors are private and computed from the weights; the shared part does not depend on them.
    return inject_dema(model, cfg.dema.learned_stand_in()).shared_state_dict()


def init_store(cfg: ClientRunConfig, root: str | Path) -> None:
    """Create the store and publish round 0's global if absent (process of global rank 0 only;
    called before torch.distributed starts, so the rank comes from the launcher's environment)."""
    if int(os.environ.get("RANK", os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))) != 0:
        return
    store = FederationStore(root)
    if not store.has_global(0):
        store.publish_global(0, initial_shared_state(cfg), meta={"seed": cfg.seed, "dema": cfg.dema.to_dict(),
                                                                      "published_by": f"client {cfg.client.id}"})


def run_client(cfg: ClientRunConfig, store: str | Path, first_round: int, rounds: int = 1) -> list[dict | None]:
    """Serve `rounds` consecutive rounds from `first_round` with one engine (rounds=1: one-shot)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if first_round + rounds > cfg.total_rounds:
        raise ValueError(f"rounds {first_round}..{first_round + rounds - 1} go past federation.rounds="
                         f"{cfg.total_rounds} (the learning-rate schedule's horizon)")
    client = DeepSpeedClient(cfg, store)
    results = []
    for rnd in range(first_round, first_round + rounds):
        metrics = client.run_round(rnd)
        if client.rank == 0:
            status = "skipped (already done)" if metrics is None else (
                f"train_loss {metrics['train_loss']:.4f}, {metrics['seconds']:.1f} s")
            print(f"[fedzero] client {cfg.client.id} round {rnd}: {status}", flush=True)
        results.append(metrics)
    return results
