"""The seeds' models without their code: a ChatGLM2-6B, ChatGLM3-6B or original-format GLM-4
folder becomes a native transformers `GlmForCausalLM` folder (README "Which models").

These folders load only through their own `modeling_chatglm.py` (`trust_remote_code=True` in
every seed), which no longer runs on current transformers (transformers#34677; THUDM/GLM-4
#716). The architecture is transformers' GLM exactly: RMSNorm, rotary embedding on the first
half of each head in interleaved pairs, multi-query groups, a fused QKV projection with bias,
SwiGLU. So the weights are renamed (and the fused QKV split), the config is translated, and the
tokenizer becomes a fast one (tasks/model/chatglm_tokenizer.py). The folder's Python files are read
as text at most, never imported.

Weight names, as in upstream's `src/transformers/models/glm/convert_glm_weights_to_hf.py`:
`transformer.embedding.word_embeddings` -> `model.embed_tokens`, `transformer.encoder.layers.N`
-> `model.layers.N`, `self_attention.query_key_value` -> `self_attn.{q,k,v}_proj` (split: heads
x kv_channels, then groups x kv_channels twice), `self_attention.dense` -> `self_attn.o_proj`,
`mlp.dense_h_to_4h` -> `mlp.gate_up_proj` (kept fused: gate first, as ChatGLM's swiglu),
`mlp.dense_4h_to_h` -> `mlp.down_proj`, `transformer.encoder.final_layernorm` -> `model.norm`,
`transformer.output_layer` -> `lm_head`; `rotary_pos_emb.inv_freq` is recomputed, not stored.

Streamed: one source file open at a time, output shards of `SHARD_BYTES`, so host memory holds
about one source shard plus one output shard, whatever the model's size.
"""

from __future__ import annotations

import re
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from tasks.model.chatglm_tokenizer import save_tokenizer
from tasks.runtime.errors import DataError
from tasks.runtime.results import StageName, StageResult, stage_entry, stage_output, stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, require_free_space, staging_dir
from tasks.model.mapped_weights import mapped_state_dict
from tasks.config.model_folder import classify, read_config
from tasks.runtime.progress import Progress
from tasks.runtime.resources import peak_memory

SHARD_BYTES = 1 << 30
#: the original config's switches that transformers' GLM has fixed: (key, value GLM has)
FIXED = (("rmsnorm", True), ("add_bias_linear", False), ("post_layer_norm", True),
         ("apply_residual_connection_post_layernorm", False), ("original_rope", True))
_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_RENAMES = {"input_layernorm.weight": "input_layernorm.weight",
            "post_attention_layernorm.weight": "post_attention_layernorm.weight",
            "self_attention.dense.weight": "self_attn.o_proj.weight",
            "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
            "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight"}
_TOP = {"transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "transformer.encoder.final_layernorm.weight": "model.norm.weight",
        "transformer.output_layer.weight": "lm_head.weight"}


@dataclass(frozen=True)
class Shape:
    """What the QKV split needs of the original config."""

    heads: int
    groups: int
    head_dim: int


@stage_output
class ConvertedBase:
    """A ChatGLM2/3 or GLM-4 folder converted to a native one: conversion.json, the size of the
    model and what the conversion cost."""

    conversion_json: Path
    params: int
    conversion_seconds: float
    conversion_peak_rss_mib: float
    converted_bytes: int
    source: str = "converted"
    family: str
    original: str
    architecture: str = "GlmForCausalLM"


def native_config(original: dict, folder: Path) -> dict:
    """The original config.json as transformers' `GlmConfig` (a dict for config.json)."""
    for key, value in FIXED:
        if key in original and bool(original[key]) != value:
            raise DataError(folder / "config.json", f"{key}={original[key]}: transformers' GLM "
                            f"architecture has {key}={value}, so this checkpoint cannot be "
                            "converted exactly")
    heads = int(original["num_attention_heads"])
    groups = int(original["multi_query_group_num"]) if original.get("multi_query_attention") \
        else heads
    head_dim = int(original.get("kv_channels") or original["hidden_size"] // heads)
    eos = original.get("eos_token_id", 2)
    return {
        "architectures": ["GlmForCausalLM"], "model_type": "glm",
        "vocab_size": int(original["padded_vocab_size"]),
        "hidden_size": int(original["hidden_size"]),
        "intermediate_size": int(original["ffn_hidden_size"]),
        "num_hidden_layers": int(original["num_layers"]),
        "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim,
        "hidden_act": "silu", "attention_bias": bool(original.get("add_qkv_bias", True)),
        "attention_dropout": float(original.get("attention_dropout", 0.0)),
        "max_position_embeddings": int(original.get("seq_length", 8192)),
        "rms_norm_eps": float(original.get("layernorm_epsilon", 1e-5)),
        "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5,
                            "rope_theta": 10000.0 * float(original.get("rope_ratio", 1))},
        "tie_word_embeddings": False, "use_cache": True,
        "pad_token_id": original.get("pad_token_id", 0),
        "eos_token_id": eos, "bos_token_id": None,
        "dtype": str(original.get("torch_dtype", "float16")),
    }


def native_tensors(name: str, tensor: torch.Tensor, shape: Shape) -> list[tuple[str, torch.Tensor]]:
    """The native name(s) and tensor(s) of one original tensor ([] for what is not stored)."""
    if name in _TOP:
        return [(_TOP[name], tensor)]
    if name.endswith("rotary_pos_emb.inv_freq"):
        return []
    match = _LAYER.match(name)
    if not match:
        raise KeyError(name)
    prefix, rest = f"model.layers.{match[1]}.", match[2]
    if rest in _RENAMES:
        return [(prefix + _RENAMES[rest], tensor)]
    if rest.startswith("self_attention.query_key_value."):
        kind = rest.rsplit(".", 1)[1]                      # weight | bias
        q, kv = shape.heads * shape.head_dim, shape.groups * shape.head_dim
        parts = tensor.split([q, kv, kv], dim=0)
        return [(f"{prefix}self_attn.{p}_proj.{kind}", t.clone())
                for p, t in zip("qkv", parts)]
    raise KeyError(name)


def source_files(folder: Path) -> list[Path]:
    """The original checkpoint's weight files: safetensors if there are any, else PyTorch
    .bin files (read with `weights_only=True`: tensors only, no code)."""
    for pattern in ("*.safetensors", "pytorch_model*.bin"):
        if files := sorted(folder.glob(pattern)):
            return files
    raise DataError(folder, "no weights: expected *.safetensors or pytorch_model*.bin files")


def _read(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one checkpoint file, one at a time. A safetensors file is read through a
    map whose pages leave this process once their tensor is copied (tasks/model/mapped_weights.py),
    so host memory holds the output shard, not the input file too."""
    if path.suffix == ".safetensors":
        with ExitStack() as stack:
            for name, lazy in mapped_state_dict([path], "cpu", stack).items():
                yield name, lazy[...]
        return
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    for name in list(state):
        yield name, state.pop(name)


def convert_weights(folder: Path, out: Path, shape: Shape) -> dict[str, int]:
    """Write the native tensors as safetensors shards plus their index; returns
    {"tensors", "params", "bytes", "shards"}."""
    from safetensors.torch import save_file

    files, shard, size = source_files(folder), {}, 0
    index: dict[str, str] = {}
    written = {"tensors": 0, "params": 0, "bytes": 0, "shards": 0}

    def flush() -> None:
        nonlocal shard, size
        if shard:
            written["shards"] += 1
            name = f"model-{written['shards']:05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size = {}, 0

    with Progress(f"converting the weights of {folder.name}", len(files)) as progress:
        for path in files:
            for name, tensor in _read(path):
                for new, t in native_tensors(name, tensor, shape):
                    shard[new] = t.contiguous()
                    size += t.numel() * t.element_size()
                    written["tensors"] += 1
                    written["params"] += t.numel()
                    written["bytes"] += t.numel() * t.element_size()
                if size >= SHARD_BYTES:
                    flush()
            progress.update()
    flush()
    total = written["shards"]
    renamed = {}
    for i in range(1, total + 1):        # transformers' shard names: model-0000i-of-0000n
        old, new = out / f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{total:05d}.safetensors"
        old.rename(out / new)
        renamed[old.name] = new
    atomic_write_json(out / "model.safetensors.index.json", {
        "metadata": {"total_size": written["bytes"]},
        "weight_map": {k: renamed[v] for k, v in sorted(index.items())}})
    return written


@stage_entry(StageName.BASE, model_libs=True, own_process=True)
def convert_folder(folder: Path) -> StageResult:
    """Stage "base" for a ChatGLM2/3 or original GLM-4 folder: the native folder (weights,
    config, generation config, fast tokenizer with the family's chat template) under
    outputs/base/<digest>/, and conversion.json (what was mapped, how long, peak host RSS)."""
    folder = Path(folder).resolve()
    kind = classify(folder)
    if kind.kind != "convert":
        raise DataError(folder, kind.reason or "not a ChatGLM2/3 or GLM-4 folder")
    start = time.perf_counter()
    require_free_space(stage_root(StageName.BASE), sum(f.stat().st_size for f in
                                                       source_files(folder)),
                       f"converting {folder.name}")
    original = read_config(folder)
    config = native_config(original, folder)
    shape = Shape(config["num_attention_heads"], config["num_key_value_heads"],
                  config["head_dim"])
    with staging_dir(stage_root(StageName.BASE)) as tmp:
        with peak_memory() as peaks:
            tokens = save_tokenizer(folder, kind.family, tmp)
            config["eos_token_id"], config["pad_token_id"] = tokens.eos_ids[0], tokens.pad_id
            atomic_write_json(tmp / "config.json", config)
            atomic_write_json(tmp / "generation_config.json", {
                "eos_token_id": tokens.eos_ids, "pad_token_id": tokens.pad_id,
                "do_sample": False})
            written = convert_weights(folder, tmp, shape)
        report = {"source": str(folder), "family": kind.family,
                  "architecture": "GlmForCausalLM", **written,
                  "special_tokens": tokens.special_ids, "eos_token_ids": tokens.eos_ids,
                  "seconds": round(time.perf_counter() - start, 2),
                  "peak_rss_mib": round(peaks.rss_mib, 1)}
        atomic_write_json(tmp / "conversion.json", report)
        out, digest = publish_dir(tmp, stage_root(StageName.BASE))
    return StageResult(stage=StageName.BASE, path=str(out), digest=digest, out=ConvertedBase(
        conversion_json=out / "conversion.json", params=written["params"],
        conversion_seconds=report["seconds"], conversion_peak_rss_mib=report["peak_rss_mib"],
        converted_bytes=written["bytes"], family=kind.family, original=str(folder)))

