"""Every workaround for a library's behaviour, in one place: what it works around, where upstream
the behaviour is, and when it can go. Nothing else in the project patches, filters or detours around
a dependency. Importing this module installs the warning and log filters (tasks/model/modeling.py
imports it, so every process that loads a model has them).

| workaround | upstream | remove when |
|---|---|---|
| `cache_argument` | transformers 5.24 renamed `forward(past_key_values=)` to `cache=` | the lock's floor is transformers >= 5.24 |
| `generate_with_prefix` | peft's `PeftModelForCausalLM.prepare_inputs_for_generation` passes the P-Tuning v2 prefix as `past_key_values`, which transformers >= 5.24 drops in `generate` | peft passes the prefix as `cache` |
| `bnb_generic_cpu_path` | bitsandbytes 0.50 (`nn/modules.py` `Linear4bit.forward`, `functional.py` `_convert_weight_packed_for_cpu`) repacks 4-bit weights at the first eval forward on AVX512-BF16 CPUs: training then drops their gradients, and widths not a multiple of 64 in / 32 out fail | bitsandbytes repacks reversibly and for any width |
| `_bnb_hub_kernel_notice` | bitsandbytes `backends/cpu/ops.py` logs at every import that the optional `kernels` package (code from the Hugging Face Hub) is missing; we never load code from the Hub | bitsandbytes stops logging it |
| `peft is_gradient_checkpointing` filter | peft 0.21 `PeftModel.__init__` reads transformers' deprecated `is_gradient_checkpointing` (a FutureWarning per model load) | peft reads `is_activation_checkpointing` |
| `gradient_checkpointing` filter | transformers 5 renamed it `activation_checkpointing` (`TrainingArguments`, `PreTrainedModel.gradient_checkpointing_enable/disable`: a FutureWarning each); TRL 1.16 `DPOConfig` defaults and peft call the old names | TRL and peft use the new names |
| `use_liger_kernel` filter | TRL 1.16 `DPOConfig` deprecates `use_liger_kernel=True` (a FutureWarning per preference run) for Hub kernels (`model_init_kwargs={"use_kernels": True}`), which download code from the Hugging Face Hub; we never load code from the Hub | TRL keeps a local Liger switch, or the lock pins kernels that ship in a package |
| `mlflow_pipeline_class` | transformers 5 names pipeline classes as dotted strings (`pipelines.SUPPORTED_TASKS[task]["impl"]`); MLflow 3.17 reads the class's `__name__` when logging from a folder | MLflow handles the string |
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import warnings
from typing import Any, Iterator

#: what bitsandbytes logs on AVX512-BF16 CPUs when the optional `kernels` package is absent
NO_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named " \
    "'kernels'"


def _bnb_hub_kernel_notice(record: logging.LogRecord) -> bool:
    """Drop only that notice: any other failure of bitsandbytes' kernel loader is still shown."""
    return not record.getMessage().startswith(NO_HUB_KERNEL)


def install_filters() -> None:
    """The log and warning filters of the table above (idempotent)."""
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if _bnb_hub_kernel_notice not in logger.filters:
        logger.addFilter(_bnb_hub_kernel_notice)
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning, module=r"transformers\.modeling_utils")
    warnings.filterwarnings("ignore", message=r"`gradient_checkpointing(_enable|_disable)?` is "
                            r"deprecated", category=FutureWarning,
                            module=r"transformers\.(modeling_utils|training_args)")
    warnings.filterwarnings("ignore", message=r"`use_liger_kernel=True` is deprecated",
                            category=FutureWarning)


install_filters()


def cache_argument(model: Any) -> str:
    """The name of the KV-cache argument of the (base) model's forward: `cache` from
    transformers 5.24 on, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters \
        else "past_key_values"


def generate_with_prefix(model: Any, n: int, input_ids: Any, mask: Any, **kwargs: Any) -> Any:
    """`generate` of a P-Tuning v2 model whose prefix has `n` positions: through its base, with
    the trained prefix as the initial KV cache (`get_prompt`) and `n` placeholder ids in front
    of the prompt that the cache already covers, so prompt positions start at `n` as in
    training. Returns what `generate` returns, the placeholders cut off."""
    import torch

    base = model.get_base_model()
    prefix = model.get_prompt(batch_size=input_ids.shape[0])          # a Cache of n positions
    placeholders = torch.zeros_like(input_ids[:, :1]).expand(-1, n)
    out = base.generate(input_ids=torch.cat([placeholders, input_ids], dim=1),
                        attention_mask=torch.cat([torch.ones_like(placeholders), mask], dim=1),
                        **{cache_argument(base): prefix}, **kwargs)
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]                  # return_dict_in_generate=True
    return out


def bnb_generic_cpu_path(model: Any, *, unpackable_only: bool) -> None:
    """Keep bitsandbytes' 4-bit layers of a CPU model on its generic path: all of them for
    training (`unpackable_only=False`: the AVX512-BF16 repack would drop their gradients), or
    only those whose widths the repack cannot take (inference: the others keep the fast
    kernel)."""
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if not isinstance(module, Linear4bit):
            continue
        if not unpackable_only or module.in_features % module.weight.blocksize \
                or module.out_features % 32:
            module.support_avx512bf16_for_cpu = False


@contextlib.contextmanager
def mlflow_pipeline_class(task: str) -> Iterator[None]:
    """While it lasts, transformers' pipeline table holds the class of `task`, not its dotted
    name, for MLflow to read."""
    from transformers.pipelines import SUPPORTED_TASKS

    entry = SUPPORTED_TASKS[task]
    impl = entry["impl"]
    if isinstance(impl, str):
        module, _, cls = impl.rpartition(".")
        entry["impl"] = getattr(importlib.import_module(module), cls)
    try:
        yield
    finally:
        entry["impl"] = impl
