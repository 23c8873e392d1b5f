"""DeMA as a PEFT tuner: PEFT's BaseTuner whose inject step is fedzero's own `inject_dema`.

DeMA does not wrap target modules one by one, as LoRA does: one injection adds the model-level
containers `dema_shared` (what travels) and `dema_private` (what stays on the client) to the backbone
and wraps every decoder layer's MLP (or hooks the side stream). So the tuner replaces BaseTuner's
per-module injection with one `inject_dema` call, and tells PEFT's save/load machinery which state
belongs to the adapter: every parameter and persistent buffer under those two containers. Under a
PeftModel the keys read `base_model.model.dema_shared.slots.0.gate.weight`,
`base_model.model.dema_private.layers.3.in_proj.weight`, ... (no adapter name: one DeMA per model).

Anchor and canonical projectors hold buffers computed from data (the backbone's hidden states on the
public anchor texts; the canonical fit across clients). They are written into adapter_model.safetensors
with the parameters, so loading needs neither the tokenizer nor the other clients. Until a checkpoint
fills them a forward is refused (a guard hook), rather than computed with zeros.
"""

from __future__ import annotations

import contextlib
import contextvars
from unittest import mock

import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from fedzero.adapters.dema import DeMAModel, inject_dema
from fedzero.adapters.dema import model as dema_model
from fedzero.adapters.dema.layer import DeMAPrivate, DeMAShared
from fedzero.backbones import decoder_layout

PREFIX = "dema_"          # the containers' attribute names start with it: dema_shared, dema_private
_PEFT_PREFIX = "base_model.model."

# What inject_dema needs beyond the config, for get_dema_peft_model: PEFT builds the tuner itself
# and passes it nothing but the model and the config.
_INJECT_INPUTS: contextvars.ContextVar[dict] = contextvars.ContextVar("fedzero_dema_inject_inputs", default={})


class DeMATuner(BaseTuner):
    """The PEFT model class registered for PeftType.DEMA (fedzero.peft)."""

    prefix = PREFIX
    tuner_layer_cls = BaseTunerLayer     # DeMA has no per-module tuner layers; nothing is one of them
    target_module_mapping: dict = {}
    uses_shared_state = True             # slot mixtures are shared by several layers

    # -- injection --------------------------------------------------------------------------------
    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        if len(self.peft_config) > 1 or hasattr(model, "dema_shared"):
            raise ValueError("a model holds one DeMA adapter: load another one into a fresh copy of the base model")
        config = self.peft_config[adapter_name]
        dema = config.dema_config()
        _check_backbone(model, config)
        inputs = _INJECT_INPUTS.get()
        tokenizer, canonical = inputs.get("tokenizer"), inputs.get("canonical")
        unset = []
        patch = contextlib.nullcontext()
        if dema.uses_anchors and tokenizer is None:
            # The anchor buffers come from the checkpoint: skip running the backbone on the anchor texts.
            # inject_dema has no switch for that; its anchor step is replaced by a no-op for this call.
            patch = mock.patch.object(dema_model, "_set_anchors", lambda *args, **kwargs: None)
            tokenizer = _NoTokenizer()
            unset.append(f"projector {dema.projector!r}: the anchor buffers (mu, anchor directions)")
        if dema.uses_canonical and canonical is None:
            num_layers, hidden = len(decoder_layout(model).layers), model.config.get_text_config().hidden_size
            canonical = [(torch.zeros(hidden), torch.zeros(hidden, dema.rank))] * num_layers
            unset.append(f"projector {dema.projector!r}: the canonical map (mu, W) of every layer")
        with patch:
            self.dema: DeMAModel = inject_dema(model, dema, tokenizer=tokenizer, canonical=canonical)
        # inject_dema builds the adapter on the CPU (where the federation's clients build it before their
        # engine moves it); a base model already on an accelerator gets its adapter there, as PEFT's own do.
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), None)
        if device is not None and device.type != "cpu":
            model.dema_shared.to(device)
            model.dema_private.to(device)
        self.set_requires_grad(adapter_name, not config.inference_mode)
        self.targeted_module_names = [name for name, module in model.named_modules()
                                      if isinstance(module, (DeMAShared, DeMAPrivate))]
        self._unset_guard = model.register_forward_pre_hook(_refuse_forward(unset)) if unset else None

    def _create_and_replace(self, *args, **kwargs):
        raise NotImplementedError("DeMA is injected whole by inject_dema, not module by module")

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        for param in self.dema.trainable_parameters():
            param.requires_grad_(requires_grad)

    def _filled_from_checkpoint(self) -> None:
        if self._unset_guard is not None:
            self._unset_guard.remove()
            self._unset_guard = None

    # -- what PEFT cannot do with DeMA: refused, not done wrongly ---------------------------------
    def _refuse(self, what: str, why: str):
        raise NotImplementedError(f"DeMA adapters do not support {what}: {why}")

    def merge_and_unload(self, *args, **kwargs):
        self._refuse("merging", "the adapter is a gated mixture of MLPs, not a weight delta that folds into the backbone")

    def merge_adapter(self, *args, **kwargs):
        self.merge_and_unload()

    def unmerge_adapter(self, *args, **kwargs):
        self.merge_and_unload()

    def unload(self, *args, **kwargs):
        self._refuse("unloading", "load the base model again instead")

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._refuse("switching the adapter off (disable_adapter)", "load the base model alone to compare with it")

    def disable_adapter_layers(self) -> None:
        self._enable_adapter_layers(False)

    def enable_adapter_layers(self) -> None:
        self._enable_adapter_layers(True)

    def delete_adapter(self, adapter_name: str) -> None:
        self._refuse("deleting the adapter", "load the base model again instead")

    def _check_new_adapter_config(self, config) -> None:
        if len(self.peft_config) > 1:
            raise ValueError("a model holds one DeMA adapter: load another one into a fresh copy of the base model")

    # -- which state is the adapter's (PEFT's save/load hooks) -------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        prefixes = _container_prefixes(model)
        return {k: v for k, v in state_dict.items() if _under(k, prefixes)}

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key          # one adapter per model: its keys carry no adapter name

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Checkpoint keys -> model keys, refusing a checkpoint that does not fill this model's DeMA
        state exactly (PEFT only warns about missing keys that contain the adapter name, which DeMA's
        keys never do: a partial checkpoint would load silently)."""
        prefixes = _container_prefixes(model)
        own = {k: v for k, v in model.state_dict().items() if _under(k, prefixes)}
        wrapped = any(k.startswith(_PEFT_PREFIX) for k in own)
        mapped = {(k if wrapped else k.removeprefix(_PEFT_PREFIX)): v for k, v in state_dict.items()}
        given = {k for k in mapped if _under(k, prefixes)}
        missing, unexpected = sorted(set(own) - given), sorted(given - set(own))
        wrong = [f"{k}: {tuple(mapped[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
                 for k in sorted(given & set(own)) if tuple(mapped[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or wrong:
            raise ValueError(
                f"DeMA checkpoint does not fit this model ({_describe(config)}): "
                + "; ".join(part for part in (
                    f"missing {len(missing)} tensor(s) {_short(missing)}" if missing else "",
                    f"{len(unexpected)} unexpected {_short(unexpected)}" if unexpected else "",
                    f"shapes differ: {_short(wrong)}" if wrong else "") if part))
        for module in model.modules():
            if isinstance(module, DeMATuner):
                module._filled_from_checkpoint()
        return mapped


def get_dema_peft_model(model: nn.Module, config, *, tokenizer=None, canonical=None,
                        adapter_name: str = "default"):
    """peft.get_peft_model for DeMA, with what inject_dema needs besides the config: the backbone's
    `tokenizer` (anchor projectors: their buffers are computed from the anchor texts) and the
    `canonical` fit (canonical projectors). Without them those buffers must come from a checkpoint."""
    token = _INJECT_INPUTS.set({"tokenizer": tokenizer, "canonical": canonical})
    try:
        return get_peft_model(model, config, adapter_name=adapter_name)
    finally:
        _INJECT_INPUTS.reset(token)


def dema_handle(peft_model) -> DeMAModel:
    """The DeMAModel handle (shared/private state dicts, fedzero.adapters.dema) of a DeMA PeftModel."""
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, DeMATuner):
        raise TypeError(f"not a DeMA PeftModel: its base_model is a {type(tuner).__name__}")
    return tuner.dema


def _check_backbone(model: nn.Module, config) -> None:
    """The private part and the layer -> slot map belong to one backbone shape: refuse another."""
    hidden = model.config.get_text_config().hidden_size
    layers = len(decoder_layout(model).layers)
    for name, want, have in (("hidden_size", config.hidden_size, hidden), ("num_layers", config.num_layers, layers)):
        if want is not None and want != have:
            raise ValueError(f"this DeMA adapter was exported for a backbone with {name}={want}; the base model "
                             f"given has {name}={have} (fingerprint {config.fingerprint}): load the client's own backbone")


def _container_prefixes(model: nn.Module) -> set[str]:
    # Found from the structure (the containers' types), not from names that a backbone might share.
    return {name.removeprefix("_fsdp_wrapped_module.") for name, module in model.named_modules()
            if isinstance(module, (DeMAShared, DeMAPrivate))}


def _under(key: str, prefixes: set[str]) -> bool:
    return any(key.startswith(p + ".") for p in prefixes)


def _short(items: list[str]) -> str:
    return str(items[:4])[:-1] + (", …]" if len(items) > 4 else "]")


def _describe(config) -> str:
    return (f"rank {config.rank}, {config.num_experts} experts, {config.num_slots} slots, projector "
            f"{config.projector!r}, share {config.share!r}, hidden_size {config.hidden_size}, "
            f"num_layers {config.num_layers}")


class _NoTokenizer:
    """Passed to inject_dema while its anchor step is skipped: any use is a bug, and says so."""

    def __getattr__(self, name):
        raise RuntimeError("the anchor texts were to be skipped while loading a DeMA checkpoint, but were read")


def _refuse_forward(unset: list[str]):
    def hook(module, args):
        raise RuntimeError("this DeMA adapter is missing state computed from data (" + "; ".join(unset) + "): load "
                           "it with PeftModel.from_pretrained, or build it with fedzero.peft.get_dema_peft_model("
                           "..., tokenizer=, canonical=)")
    return hook
