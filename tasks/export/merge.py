"""Stage "merge": fold a LoRA adapter into the full-precision base and save a plain HF model.

The adapter is always merged into the base loaded in `dtype` (float32/bfloat16/float16; `auto`:
bfloat16 on a GPU, float32 on a CPU), also for a QLoRA adapter that was trained on a 4-bit base:
merging into 4-bit weights drifts (peft warns in `LoraLayer.merge` for 4-bit layers). The merge
runs on the GPU when there is one (`device="auto"`): the base goes straight there, and the merged
model is saved from it shard by shard, so host memory holds one shard, not the model. The merged
model is checked against base+adapter on a short input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tasks.runtime.errors import DataError
from tasks.runtime.results import Info, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import publish_dir, read_json, require_free_space, staging_dir
from tasks.model.model_spec import ModelSpec
from tasks.model.modeling import (
    DTYPES,
    is_prequantized,
    load_model,
    load_tokenizer,
    pick_device,
    prompt_ids,
    resolve_dtype,
    save_model,
)

if TYPE_CHECKING:        # not imported at run time: the GPU box may lack pydantic
    from tasks.config import MergeConfig


@stage_output
class MergedModel:
    """The merged model folder, how closely it follows base + adapter on a probe prompt, its
    size and parameters, and what it was merged from."""

    config_json: Path
    merge_max_abs_logit_diff: float
    merge_relative_logit_error: float
    merge_top1_agreement: float
    size_mb: float
    params: int
    base: str
    adapter: str
    probe_tokens: Info[int]
    tokenizer_from: str                     # "adapter" | "base"


#: a short chat used to compare merged vs base+adapter logits
PROBE = [{"role": "user", "content": "绿萝叶子发黄是什么原因？"},
         {"role": "assistant", "content": "多半是浇水过多，先检查盆土是否积水。"}]
#: largest relative error ||merged - base+adapter|| / ||base+adapter|| of the probe's logits.
#: In float32 merging is exact to rounding. In 16 bits W + BA is rounded per weight, and a young
#: adapter's BA is about one bf16 step of W, so much of it rounds away and the error adds up over
#: the layers: a 6 B random-weight model after 15 QLoRA steps, merged in bf16 on an H200, gave a
#: relative error of 0.084 and 93 % top-1 agreement (docs/gpu.md "At 6 B on one GPU"). The 16-bit
#: bounds catch a wrong merge (scale, transposition, missing layers: errors of order 1), not
#: rounding; the figures are reported either way.
TOLERANCE = {"float32": 1e-4, "bfloat16": 0.25, "float16": 0.25}


def weights_mib(folder: Path) -> float:
    """Size of the weight files (*.safetensors / *.bin) in a model folder, MiB."""
    files = [p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin")]
    return sum(p.stat().st_size for p in files) / 2**20


def _bytes_in(folder: Path, dtype: str) -> float:
    """Bytes of the model at `folder` saved in `dtype` (its weight files scaled by the ratio of
    item sizes; a config without torch_dtype counts as float32)."""
    config = read_json(folder / "config.json")
    saved = str(config.get("dtype") or config.get("torch_dtype") or "float32")
    ratio = DTYPES[dtype].itemsize / getattr(torch, saved, torch.float32).itemsize
    return weights_mib(folder) * 2**20 * ratio


def probe_ids(tokenizer, messages=PROBE) -> torch.Tensor:
    """A short chat prompt as a (1, n) tensor (load_tokenizer guarantees a chat template)."""
    return torch.tensor([prompt_ids(tokenizer, messages)])


def _check_inputs(base_dir: Path, adapter_dir: Path) -> None:
    if not (base_dir / "config.json").is_file():
        raise DataError(base_dir, "base model folder has no config.json (not a Hugging Face "
                                  "model folder)")
    if is_prequantized(base_dir):
        raise DataError(base_dir / "config.json", "base model is saved quantized "
                        "(quantization_config); merge needs the full-precision base — merging "
                        "into 4-bit weights drifts")
    if not (adapter_dir / "adapter_config.json").is_file():
        raise DataError(adapter_dir, "adapter folder has no adapter_config.json (not a peft "
                                     "adapter)")


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, dtype: str = "auto",
                  device: str = "auto", stage: StageName = StageName.MERGE) -> StageResult:
    """Merge `adapter_dir` into the base at `base_dir` (loaded in `dtype` on `device`: a GPU
    when there is one, else the CPU), save the merged model with its tokenizer and chat template,
    and verify its logits against base+adapter. `stage`: merge, or merge_preference (the
    preference adapter folded into the supervised model)."""
    base_dir, adapter_dir = Path(base_dir), Path(adapter_dir)
    _check_inputs(base_dir, adapter_dir)
    device = pick_device(device)
    dtype = resolve_dtype(dtype, device)
    tokenizer_dir = ModelSpec(base_dir, adapter=adapter_dir).tokenizer_dir()
    tokenizer = load_tokenizer(tokenizer_dir)

    require_free_space(stage_root(stage), _bytes_in(base_dir, dtype),
                       f"merging into {base_dir.name} ({dtype})")
    model = load_model(base_dir, dtype=dtype, device=device, adapter=adapter_dir)
    ids = probe_ids(tokenizer).to(device)
    with torch.inference_mode():
        want = model(input_ids=ids).logits.float()
    merged = model.merge_and_unload()
    with torch.inference_mode():
        got = merged(input_ids=ids).logits.float()
    diff = (got - want).abs().max().item()
    relative = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    if not relative <= TOLERANCE[dtype]:
        raise RuntimeError(f"merged model disagrees with base+adapter ({adapter_dir}): relative "
                           f"logit error {relative:.3g} > {TOLERANCE[dtype]:.3g} in {dtype} "
                           f"(max |diff| {diff:.3g}, top-1 agreement {agree:.0%})")

    params = sum(p.numel() for p in merged.parameters())
    with staging_dir(stage_root(stage)) as tmp:
        save_model(merged, tokenizer, tmp)       # safetensors shards, config, chat template
        size = weights_mib(tmp)
        out, digest = publish_dir(tmp, stage_root(stage))
    return StageResult(stage=stage, path=str(out), digest=digest, device=device, dtype=dtype,
                       out=MergedModel(
        config_json=out / "config.json", merge_max_abs_logit_diff=diff,
        merge_relative_logit_error=relative, merge_top1_agreement=agree, size_mb=size,
        params=params, base=str(base_dir), adapter=str(adapter_dir), probe_tokens=ids.shape[1],
        tokenizer_from="adapter" if tokenizer_dir == str(adapter_dir) else "base"))


@stage_entry(StageName.MERGE, model_libs=True, own_process=True, logged_as="merged_model")
def stage(base: StageResult, adapter: StageResult, cfg: MergeConfig) -> StageResult:
    """The stage: the train stage's adapter merged into the base stage's model."""
    return merge_adapter(base.path, adapter.path, cfg.dtype, cfg.device)


@stage_entry(StageName.MERGE_PREFERENCE, model_libs=True, own_process=True,
             logged_as="merged_model")
def preference_stage(supervised: StageResult, adapter: StageResult, cfg: MergeConfig
                     ) -> StageResult:
    """The stage: the preference adapter merged into the supervised model it was tuned on."""
    return merge_adapter(supervised.path, adapter.path, cfg.dtype, cfg.device,
                         StageName.MERGE_PREFERENCE)
