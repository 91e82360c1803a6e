"""`ModelSpec`: which model the benchmark, generations and gate stages load, and how.

    ModelSpec(path="outputs/merge/<digest>", dtype="bfloat16", digest="<digest>")
    ModelSpec(path=base, adapter=adapter_dir, quantization=FourBit(compute_dtype="bfloat16"))

A spec names a Hugging Face folder, optionally a peft adapter folder on top of it, the compute
dtype and, for a base that is loaded in 4 bits (QLoRA's adapter served as it was trained), the
bitsandbytes settings. `digest` is the content digest of the stage output the spec points at:
the flows set it so that a stage's cache key follows the model's content, not its path; loading
ignores it. Loading itself is `tasks.model.modeling.load_model` (README "What each stage produces").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks.config.methods import FourBit
from tasks.runtime.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: files that make a folder a tokenizer (peft adapters saved by the train stage carry one)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class ModelSpec:
    path: str
    dtype: str = "float32"
    adapter: str | None = None
    quantization: FourBit | None = None
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:                  # Path in, str kept: specs are JSON-able
        object.__setattr__(self, "path", str(self.path))
        if self.adapter is not None:
            object.__setattr__(self, "adapter", str(self.adapter))

    def check(self, who: str) -> "ModelSpec":
        """This spec, or a DataError naming the folder that does not exist and `who` needs it."""
        for what, folder in (("model", self.path), ("adapter", self.adapter)):
            if folder is not None and not Path(folder).is_dir():
                raise DataError(folder, f"{who}: {what} folder not found")
        return self

    def tokenizer_dir(self) -> str:
        """The adapter's folder where it carries a tokenizer (its chat template), else the
        model's."""
        if self.adapter and any((Path(self.adapter) / f).is_file() for f in TOKENIZER_FILES):
            return self.adapter
        return self.path

    def load(self, device: str) -> "PreTrainedModel":
        """The model on `device`, ready for inference (`tasks.model.modeling.load_model`)."""
        from tasks.model.modeling import bnb_config, load_model

        quant = self.quantization
        return load_model(self.path, dtype=self.dtype, device=device, adapter=self.adapter,
                          quantization=bnb_config(quant.quant_type, quant.double_quant,
                                                  quant.compute_dtype) if quant else None)

    def describe(self) -> dict[str, Any]:
        """What a stage writes into its outputs about the model (no digest, no unset field)."""
        out: dict[str, Any] = {"path": self.path, "dtype": self.dtype}
        if self.adapter:
            out["adapter"] = self.adapter
        if self.quantization:
            out["quantization"] = self.quantization.__dict__
        return out

    def label(self) -> str:
        text = self.path + (f" + adapter {self.adapter}" if self.adapter else "")
        return text + (" (4-bit)" if self.quantization else "")
