"""DeMA as a PEFT method. `import fedzero.peft` registers it with PEFT (`register_peft_method`), so that

    import fedzero.peft
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, "exported/adapter")    # a client's DeMA adapter
    model.save_pretrained("elsewhere")                              # adapter_config.json + adapter_model.safetensors

work as for any PEFT method (docs/export.md). `fedzero.export` writes such directories from a run.

Registration lives here, not in `import fedzero`: the package root stays importable without peft and
transformers (the aggregator needs neither).

Modules: ``config`` (DeMAPeftConfig; the PeftType member PEFT's enum lacks), ``tuner`` (DeMATuner:
BaseTuner around inject_dema; get_dema_peft_model, dema_handle).
"""

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import register_peft_method

from .config import DEMA, DeMAPeftConfig
from .tuner import PREFIX, DeMATuner, dema_handle, get_dema_peft_model

if PEFT_TYPE_TO_TUNER_MAPPING.get(DEMA) is not DeMATuner:      # a re-import registers nothing twice
    register_peft_method(name=DEMA.value.lower(), config_cls=DeMAPeftConfig, model_cls=DeMATuner, prefix=PREFIX)

__all__ = ["DEMA", "DeMAPeftConfig", "DeMATuner", "dema_handle", "get_dema_peft_model"]
