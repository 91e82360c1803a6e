"""The fine-tuning methods, one entry each: how the train stage builds the adapter and what the
rest of the pipeline may do with it (README "What each stage produces", stage 5). Adding a
method means adding an entry to METHODS; `train.method` accepts exactly its keys.

peft is imported only inside the builders, so this table is cheap to import
(tasks/config/__init__.py validates against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable


if TYPE_CHECKING:
    from tasks.config import TrainConfig


@dataclass(frozen=True)
class FourBit:
    """bitsandbytes 4-bit loading of a full-precision folder (`tasks.model.modeling.bnb_config`)."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "float32"


def _lora(cfg: TrainConfig, hidden_size: int) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules or "all-linear", task_type="CAUSAL_LM",
                      use_dora=cfg.use_dora, use_rslora=cfg.use_rslora)


def _prefix(cfg: TrainConfig, hidden_size: int) -> Any:
    from peft import PrefixTuningConfig

    return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                              prefix_projection=cfg.prefix_projection,
                              encoder_hidden_size=cfg.encoder_hidden_size or hidden_size)


@dataclass(frozen=True)
class Method:
    """A fine-tuning method. Variants of an adapter are settings of it, not methods of their
    own (as LLaMA-Factory keeps them): DoRA (`train.use_dora`; with qlora, QDoRA) and rsLoRA
    (`train.use_rslora`) for the LoRA methods."""

    name: str
    description: str          # one line for the config's `train.method` field
    peft_config: Callable[[TrainConfig, int], Any]   # (train config, hidden size) -> peft config
    loads_4bit: bool          # the base is trained (and the adapter served) in 4-bit nf4
    mergeable: bool           # the adapter is a weight delta that the merge stage folds in
    learning_rate: float      # default peak learning rate
    packing: bool             # padding-free batches work (a prefix is prepended once per row)
    gradient_checkpointing: bool   # supported (peft prefix tuning does not support it)

    @property
    def lora(self) -> bool:
        """A LoRA adapter: DoRA and rsLoRA apply."""
        return self.peft_config is _lora

    def serving_quantization(self, cfg: TrainConfig) -> FourBit | None:
        """How the un-merged adapter's base is loaded to serve it as it was trained."""
        if not self.loads_4bit:
            return None
        return FourBit("nf4", cfg.double_quant, cfg.compute_dtype)


METHODS: dict[str, Method] = {
    "lora": Method("lora", "full-precision base + LoRA.", _lora, loads_4bit=False,
                   mergeable=True, learning_rate=2e-3, packing=True,
                   gradient_checkpointing=True),
    "qlora": Method("qlora", "base loaded 4-bit nf4 (bitsandbytes) + LoRA.", _lora,
                    loads_4bit=True, mergeable=True, learning_rate=2e-3, packing=True,
                    gradient_checkpointing=True),
    "ptuning": Method("ptuning", "P-Tuning v2 (peft prefix tuning: trained key/value prefixes "
                      "in every layer; cannot be merged into the weights, so merge/int4 are "
                      "skipped and the base + prefix adapter is what is reported).", _prefix,
                      loads_4bit=False, mergeable=False, learning_rate=2e-2, packing=False,
                      gradient_checkpointing=False),
}
