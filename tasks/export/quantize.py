"""Stage "quantize": the merged model to 4-bit, saved in a format standard loaders read, reloaded
and checked against the merged model.

Two formats, each a transformers quantization config that `AutoModelForCausalLM.from_pretrained`
reloads (README "Your own data, model and GPU" says which serving engines take which):

* `bnb` -- bitsandbytes nf4/fp4 (double quant by default), what QLoRA trains on; runs on a CPU
  and a GPU;
* `torchao` -- torchao int4 weight-only in the tinygemm layout (`Int4WeightOnlyConfig`,
  `int4_packing_format="tile_packed_to_4d"`, group-wise asymmetric): PyTorch's fast CUDA int4
  matmul (`aten._weight_int4pack_mm`, as in gpt-fast). CUDA only: torchao 0.18 packs and
  serialises this layout on a GPU only.

Quantization happens at load (weights converted one by one; embeddings and the LM head stay in
`compute_dtype`). The merged model's reference logits are taken first and that model is freed,
so two full models never share the device. The saved folder is loaded back; its greedy next-token
predictions are compared with the merged model's (top-1 agreement) and it must generate.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from tasks.runtime.errors import DataError
from tasks.runtime.results import Info, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import publish_dir, require_free_space, staging_dir
from tasks.export.merge import PROBE, probe_ids, weights_mib
from tasks.model.modeling import (
    bnb_config,
    generate,
    is_prequantized,
    load_model,
    load_tokenizer,
    release,
    resolve_dtype,
    save_model,
)

if TYPE_CHECKING:        # not imported at run time: the GPU box may lack pydantic
    from tasks.config import QuantizeConfig

Format = Literal["bnb", "torchao"]
#: each format's stage: its outputs live under outputs/<stage>/
STAGES: dict[str, StageName] = {"bnb": StageName.QUANTIZE, "torchao": StageName.QUANTIZE_TORCHAO}


@stage_output
class Int4Model:
    """An int4 model folder (bitsandbytes or torchao), its size against the merged model's, how
    closely it follows it (top-1 agreement, largest logit difference) and a sample answer."""

    config_json: Path
    size_mb: float
    size_ratio_vs_merged: float
    reload_ok: float                        # 1: reloaded from disk, finite logits, generated
    int4_top1_agreement: float
    int4_max_abs_logit_diff: float
    format: str                             # "bnb" | "torchao"
    description: str
    sample_prompt: list[dict[str, str]]
    sample: str
    merged: str
    quant_type: str
    double_quant: bool
    group_size: Info[int]


SAMPLE_PROMPT = [{"role": "user", "content": "绿萝叶子发黄是什么原因？"}]


def quantization_config(fmt: Format, cfg: QuantizeConfig, compute_dtype: str):
    """The transformers quantization config of `fmt`."""
    if fmt == "bnb":
        return bnb_config(cfg.quant_type, cfg.double_quant, compute_dtype)
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int4WeightOnlyConfig(group_size=cfg.group_size,
                                              int4_packing_format="tile_packed_to_4d"))


def describe(fmt: Format, cfg: QuantizeConfig) -> str:
    """What the benchmark and the report call this format."""
    if fmt == "bnb":
        return f"bitsandbytes {cfg.quant_type}" + (" (double quant)" if cfg.double_quant else "")
    return f"torchao int4 tinygemm (group {cfg.group_size})"


@torch.inference_mode()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids.to(next(model.parameters()).device)).logits.float().cpu()


def _is_quantized(model, fmt: Format) -> bool:
    if fmt == "bnb":
        return any(type(m).__name__ == "Linear4bit" for m in model.modules())
    return any("Int4" in type(m.weight).__name__ for m in model.modules()
               if isinstance(m, torch.nn.Linear))


def quantize_int4(merged_dir: str | Path, cfg: QuantizeConfig, device: str = "cpu",
                  fmt: Format = "bnb", sample_prompt: list[dict] | None = None) -> StageResult:
    """Quantize the merged model at `merged_dir` to 4-bit `fmt`, save it with its tokenizer,
    reload the saved folder on `device`, check it against the merged model and that it
    generates (the sample answer is in `info`)."""
    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise DataError(merged_dir, "merged model folder has no config.json")
    if is_prequantized(merged_dir):
        raise DataError(merged_dir / "config.json", "model is already quantized "
                                                    "(quantization_config present)")
    if fmt == "torchao" and not device.startswith("cuda"):
        raise RuntimeError("torchao int4 (tinygemm layout) is made and served on a CUDA GPU; "
                           f"this stage runs on {device!r}")
    dtype = resolve_dtype(cfg.compute_dtype, device)
    # 4 bits a weight plus scales: about a third of a 16-bit model; half asked for, to spare
    require_free_space(stage_root(STAGES[fmt]), weights_mib(merged_dir) * 2**20 / 2,
                       f"quantizing {merged_dir.name} ({describe(fmt, cfg)})")
    tokenizer = load_tokenizer(merged_dir)
    ids = probe_ids(tokenizer, PROBE)
    full = load_model(merged_dir, dtype=dtype, device=device)
    want = _logits(full, ids)                     # the reference, before the 4-bit model exists
    del full
    release(device)

    with staging_dir(stage_root(STAGES[fmt])) as tmp:
        model = load_model(merged_dir, dtype=dtype, device=device,
                           quantization=quantization_config(fmt, cfg, dtype))
        save_model(model, tokenizer, tmp)
        del model
        release(device)
        reloaded = load_model(tmp, dtype=dtype, device=device)
        if not _is_quantized(reloaded, fmt):
            raise RuntimeError(f"{tmp}: the saved model did not reload as {describe(fmt, cfg)}")
        got = _logits(reloaded, ids)
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        logit_diff = (got - want).abs().max().item()
        if not math.isfinite(logit_diff):
            raise RuntimeError(f"reloaded int4 model from {merged_dir} gives non-finite logits")
        # it must generate (an empty answer -- eos first -- is an answer; a crash is not)
        sample = generate(reloaded, tokenizer, [sample_prompt or SAMPLE_PROMPT],
                          max_new_tokens=32)[0]
        del reloaded
        release(device)
        size, merged_size = weights_mib(tmp), weights_mib(merged_dir)
        out, digest = publish_dir(tmp, stage_root(STAGES[fmt]))
    return StageResult(stage=STAGES[fmt], path=str(out), digest=digest, device=device,
                       dtype=dtype, out=Int4Model(
        config_json=out / "config.json", size_mb=size, size_ratio_vs_merged=size / merged_size,
        reload_ok=1.0, int4_top1_agreement=agree, int4_max_abs_logit_diff=logit_diff,
        format=fmt, description=describe(fmt, cfg),
        sample_prompt=sample_prompt or SAMPLE_PROMPT, sample=sample, merged=str(merged_dir),
        quant_type=cfg.quant_type if fmt == "bnb" else "int4", double_quant=cfg.double_quant,
        group_size=cfg.group_size))


@stage_entry(StageName.QUANTIZE, model_libs=True, own_process=True, logged_as="int4_model")
def stage(merged: StageResult, cfg: QuantizeConfig, device: str) -> StageResult:
    """The stage: the merged model in bitsandbytes nf4."""
    return quantize_int4(merged.path, cfg, device, "bnb")


@stage_entry(StageName.QUANTIZE_TORCHAO, model_libs=True, own_process=True,
             logged_as="int4_torchao_model")
def torchao_stage(merged: StageResult, cfg: QuantizeConfig, device: str) -> StageResult:
    """The stage: the merged model in torchao's int4 (on a GPU; `quantize.torchao`)."""
    return quantize_int4(merged.path, cfg, device, "torchao")
