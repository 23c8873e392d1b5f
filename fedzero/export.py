"""`fedzero export`: one client's adapter from a run, as an ordinary PEFT adapter directory.

    export_adapter(run, client, out, round=R)   ->  out/adapter_config.json, out/adapter_model.safetensors

which, after `import fedzero.peft`, `PeftModel.from_pretrained(base, out)` loads onto the client's
backbone: the model the federation had for that client after round R (the global of round R+1 and the
client's private part; fedzero/run_dirs.py finds them in simulate's, federate's or a cluster's
layout). The directory is written by PEFT's own save_pretrained. docs/export.md.

LoRA baselines: `export_lora_client` writes a LoRA client's PEFT LoRA adapter (the bench, where they
run, keeps no adapter tensors on disk, so there is no run directory to export them from).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

# Only the standard library at import time: cli.py imports this module to build its parser, and
# `fedzero --help` should not wait for torch. The rest is imported where it is used.

ADAPTER_CONFIG = "adapter_config.json"      # PEFT's file names (peft.utils.CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME)
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_adapter(run: str | os.PathLike, client_id: str, out: str | os.PathLike, *, round: int | None = None,
                   client_config: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
                   overwrite: bool = False) -> Path:
    """Write client `client_id`'s DeMA adapter after `round` (default: the latest finished round) of the
    run in `run` as a PEFT adapter directory `out`. `client_config`: the client's CLIENT.yaml when `run`
    is a bare federation store; `config`: a simulate run's original run config when its copy in the run
    directory does not resolve (fedzero.run_dirs.open_run). Returns `out`."""
    from fedzero.run_dirs import open_run

    out = _check_out(Path(out), overwrite)
    run_dir = open_run(run, client_config=client_config, config=config)
    found = run_dir.client_round(client_id, round)
    model = dema_model_of(run_dir, found)
    _write(out, model.save_pretrained)
    return out


def dema_model_of(run_dir, found, *, weights: bool = False):
    """The DeMA PeftModel of `found` (a client after a round): its shared part from the global of round
    R+1 (strategy local: the client's own shared file), its private part from the client's saved file.
    The backbone is the client's own, its weights loaded where the adapter needs them (anchor projectors
    are computed from them) or `weights` asks for them (to run the model: fedzero generate / evaluate):
    otherwise it is built on the meta device, which is enough to save the adapter."""
    import fedzero
    from fedzero.adapters.dema import DeMAConfig
    from fedzero.adapters.dema.io import read_part
    from fedzero.peft import DeMAPeftConfig, dema_handle, get_dema_peft_model
    from fedzero.run_dirs import RunDirError

    client, rnd = found.client, found.round
    private, header = read_part(found.private_path)
    if header["part"] != "private":
        raise RunDirError(f"{found.private_path} holds the {header['part']} part of a DeMA adapter, not the private one")
    dema = DeMAConfig.from_dict(header["config"])
    canonical = _canonical_map(found, dema, header) if dema.uses_canonical else None
    base, fp, tokenizer = _backbone(client.backbone, weights=weights or dema.uses_anchors)
    if fp != header["fingerprint"]:
        raise RunDirError(f"the backbone of client {client.client_id!r} in {client.described_in} (fingerprint {fp}) is "
                          f"not the one its private part {found.private_path} was trained on ({header['fingerprint']})")
    global_state, manifest = run_dir.store.read_global(rnd + 1)
    provenance = {"fedzero_version": fedzero.__version__, "run": str(run_dir.root), "run_kind": run_dir.kind,
                  "client": client.client_id, "round": rnd, "global_round": rnd + 1,
                  "global_sha256": manifest["sha256"], "private_file": str(found.private_path),
                  "private_round": found.private_round}
    shared_source = run_dir.store.global_path(rnd + 1)
    if found.shared_path is not None:           # strategy local: nothing aggregated, the client's own shared part
        own, own_header = read_part(found.shared_path)
        if own_header["part"] != "shared" or own_header["fingerprint"] != fp:
            raise RunDirError(f"{found.shared_path} is not client {client.client_id!r}'s shared part (part "
                              f"{own_header['part']!r}, fingerprint {own_header['fingerprint']}; its backbone's is {fp})")
        global_state, shared_source = own, found.shared_path
        provenance.update(strategy="local", shared_file=str(found.shared_path))
    peft_config = DeMAPeftConfig.from_dema(dema, hidden_size=header["hidden_size"], num_layers=header["num_layers"],
                                           fingerprint=fp, provenance=provenance)
    model = get_dema_peft_model(base, peft_config, tokenizer=tokenizer, canonical=canonical)
    # get_peft_model takes the name from the model, which a meta-built backbone lacks.
    model.peft_config["default"].base_model_name_or_path = client.backbone.path
    handle = dema_handle(model)
    try:
        handle.load_shared_state_dict({k: v.float() for k, v in global_state.items()})
        handle.load_private_state_dict(private)
    except (KeyError, ValueError) as err:
        raise RunDirError(f"client {client.client_id!r}, round {rnd}: the shared part {shared_source} "
                          f"and private part {found.private_path} do not fit its DeMA adapter: {err}") from None
    return model


def _canonical_map(found, dema, header):
    """The client's canonical (mu, W) per layer: fitted in the round-0 exchange and saved beside its
    private parts (fedzero/adapters/dema/canonical_exchange.py, MAP_FILE)."""
    from fedzero.adapters.dema.canonical_exchange import MAP_FILE, check_map_header, read_map
    from fedzero.run_dirs import RunDirError

    path = found.private_path.parent / MAP_FILE
    try:
        fitted, saved = read_map(path)
        check_map_header(saved, path, config=dema, fingerprint=header["fingerprint"], num_layers=header["num_layers"])
    except (FileNotFoundError, ValueError) as err:
        raise RunDirError(f"client {found.client.client_id!r} uses projector {dema.projector!r}, whose map comes from "
                          f"the round-0 canonical exchange: {err}") from None
    return fitted


def _backbone(spec, *, weights: bool):
    """(model, fingerprint, tokenizer or None) of a BackboneSpec."""
    import torch

    from fedzero.backbones import fingerprint, load_backbone
    from fedzero.data import load_tokenizer

    if weights or spec.path is None:
        # Inline backbones are small random models: built whole, so the fingerprint is load_backbone's own.
        model, fp = load_backbone(spec)
    else:
        from transformers import AutoModelForCausalLM

        config = spec.hf_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        fp = fingerprint(config)        # load_backbone's fingerprint of a model directory: its config alone
    return model, fp, load_tokenizer(spec.tokenizer, spec.path) if weights else None


def export_lora_client(client, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a LoRA baseline client's adapter (fedzero.baselines.LoRAClient) as a PEFT LoRA directory,
    loadable with PeftModel.from_pretrained on the client's base model. FLoRA is refused once it has
    merged: its aggregate went into the base weights, which the adapter alone does not carry."""
    if getattr(client, "_resets", 0):
        raise ValueError(f"client {client.client_id!r} (FLoRA) has merged {client._resets} aggregate(s) into its base "
                         "weights: a LoRA adapter on the original base model would leave them out; save the whole "
                         "model (client.model.get_base_model().save_pretrained) instead")
    out = _check_out(Path(out), overwrite)
    _write(out, client.model.save_pretrained)
    return out


def _check_out(out: Path, overwrite: bool) -> Path:
    out = out.expanduser().absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty: choose a new directory, or replace an earlier "
                                  "export with --force")
        if not (out / ADAPTER_CONFIG).is_file():
            raise FileExistsError(f"{out} is not an adapter directory (no {ADAPTER_CONFIG}): not replacing it")
    return out


def _write(out: Path, save) -> None:
    """save(directory) into a temporary sibling, then renamed into place: a failed export leaves no
    half-written adapter where a loader would find it."""
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        save(str(tmp))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- the `fedzero export` subcommand (fedzero/cli.py adds it) -----------------------------------------

def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="write one client's adapter after a round of a run as a PEFT adapter "
                                             "directory (PeftModel.from_pretrained loads it; docs/export.md)")
    p.add_argument("--run", required=True, help="simulate's --out, a federate run directory, or a federation store")
    p.add_argument("--client", required=True, help="client id")
    p.add_argument("--round", type=int, help="the round after which to take the model (default: the latest finished)")
    p.add_argument("--out", required=True, help="new directory for adapter_config.json and adapter_model.safetensors")
    p.add_argument("--client-config", help="a bare federation store: the client's CLIENT.yaml (backbone, state_dir)")
    p.add_argument("--config", help="simulate runs: the original run config, if the copy in --run does not resolve "
                                    "(relative backbone paths)")
    p.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(func=run_export)
    return p


def run_export(args) -> int:
    from fedzero.store import StoreError

    try:
        out = export_adapter(args.run, args.client, args.out, round=args.round, client_config=args.client_config,
                             config=args.config, overwrite=args.force)
    except (ValueError, FileNotFoundError, FileExistsError, StoreError) as err:
        print(f"fedzero export: error: {err}", file=sys.stderr)
        return 2
    provenance = json.loads((out / ADAPTER_CONFIG).read_text())["provenance"]
    print(f"client {args.client}, round {provenance['round']}: wrote {out}/{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}\n"
          f"load it: import fedzero.peft; PeftModel.from_pretrained(<client {args.client}'s base model>, {str(out)!r})")
    return 0
