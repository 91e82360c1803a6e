"""The decode part of benchmarks/gpu_speed.py: greedy decode tok/s at batch 1 and 8 of HF
`generate` (eager, the anchor) and of the static loop of tasks/model/decode.py (CUDA graph;
`compiled`: the whole step torch.compile'd, then captured; `compiled-layers`: each decoder layer
compiled, then the step captured) on the bf16 model, torchao int4 (tinygemm) and bitsandbytes
nf4; capture/compile time apart; token agreement with eager `generate` and the first step's max
logit difference. Each model decodes in a process of its own; a model or engine that fails is
recorded under `decode_errors` with its error, and the others keep their figures.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from tasks.model.decode import Compile, StaticDecoder, left_pad
from tasks.model.modeling import generate_ids, load_model, load_tokenizer, prompt_ids, release
from tasks.runtime import child_process

QUESTIONS = ["绿萝叶子发黄是什么原因？", "多肉植物多久浇一次水？", "月季开花后要怎么修剪？",
             "冬天室内的植物要注意什么？", "君子兰怎么施肥？", "薄荷怎么扦插？",
             "发财树烂根怎么办？", "吊兰叶尖发黑是什么原因？"]



def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer as stored: a tensor subclass (torchao's packed int4)
    by its inner tensors, not by its logical shape."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    return sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])


def decode_variant(model, tok, batches: list[int], new_tokens: int, engine: str) -> dict:
    """tok/s per batch size, peak CUDA MiB, capture/compile seconds and greedy tokens (the
    compiled engines at batch 1 only: each batch size is a compile of its own, minutes at 6 B).
    `compiled-layers` compiles the model's layers in place: it must be the model's last engine."""
    if ENGINES.get(engine, Compile.OFF) is not Compile.OFF:
        batches = batches[:1]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    out = {"tok_s": {}, "tokens": {}, "capture_s": 0.0}
    torch.cuda.reset_peak_memory_stats()
    for batch in batches:
        ids, mask = (t.cuda() for t in left_pad(prompts[:batch], tok.pad_token_id))
        if engine == "eager":
            runs = []
            for _ in range(2):                                  # the first is the warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                seq = generate_ids(model, ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=tok.pad_token_id)
                torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
            out["tok_s"][batch] = new_tokens / runs[-1]          # prefill included: eager anchor
            out["tokens"][batch] = seq[:, ids.shape[1]:].cpu().tolist()
        else:
            decoder = StaticDecoder(model, batch_size=batch, compile=ENGINES[engine],
                                    max_len=ids.shape[1] + new_tokens)
            decoder.decode(ids, mask, new_tokens)               # capture (+ compile) + warm-up
            out["capture_s"] += decoder.capture_s
            out["graph_error"] = decoder.graph_error
            runs = [decoder.decode(ids, mask, new_tokens) for _ in range(3)]
            best = sorted(runs, key=lambda r: r.decode_s)[1]    # the median of 3
            out["tok_s"][batch] = (new_tokens - 1) / best.decode_s
            out["tokens"][batch] = best.tokens.tolist()
            del decoder
    out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions, up to each row's first disagreement included, that agree."""
    same = total = 0
    for row, ref in zip(tokens, reference):
        for a, b in zip(row, ref):
            total += 1
            if a != b:
                break
            same += 1
    return same / max(total, 1)


#: the static loop's engines: what each compiles
ENGINES = {"graph": Compile.OFF, "compiled": Compile.STEP, "compiled-layers": Compile.LAYERS}
#: the decode plans: a label and the int4 format (None: the bf16 model itself)
PLANS = [("bf16", None), ("int4-torchao", "torchao"), ("nf4-bnb", "bnb")]


def plan_engines(fmt: str | None, compile_too: bool) -> list[list[str]]:
    """A plan's engines, in groups of one process each. The compiled engines get a process and
    empty compile caches of their own, so neither finds kernels the other compiled (Inductor and
    Triton keep them in memory and on disk): each compile time is a cold one."""
    groups = [(["eager"] if fmt is None else []) + ["graph"]]
    if compile_too:
        groups += ([["compiled"]] if fmt != "bnb" else []) + [["compiled-layers"]]
    return groups


def decode_plan(base_dir: Path, label: str, fmt: str | None, engines: list[str],
                new_tokens: int, reference_logits: list[float] | None) -> dict:
    """One plan's `engines` (load the model as `label`), in a process of its own: a failed
    CUDA-graph capture can leave the CUDA context unusable, and must cost only its own rows. An
    engine that fails is an error row; the others still run. Without `reference_logits` (the
    bf16 model's first process) it returns its own first-step logits as the reference."""
    from tasks.config import QuantizeConfig
    from tasks.export.quantize import quantization_config

    tok = load_tokenizer(base_dir)
    qcfg = quantization_config(fmt, QuantizeConfig(), "bfloat16") if fmt else None
    torch.cuda.reset_peak_memory_stats()
    model = load_model(base_dir, dtype="bfloat16", device="cuda", quantization=qcfg)
    out: dict = {"weights_gib": weight_bytes(model) / 2**30, "engines": {}, "errors": {}}
    print(f"[decode] {label}: loaded, {out['weights_gib']:.2f} GiB", flush=True)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": QUESTIONS[0]}])]).cuda()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
    if reference_logits is None:
        out["reference_logits"] = logits.cpu().tolist()
    else:
        out["max_first_logit_diff_vs_bf16"] = (
            logits.cpu() - torch.tensor(reference_logits)).abs().max().item()
    for engine in engines:
        start = time.perf_counter()
        try:
            out["engines"][engine] = decode_variant(model, tok, [1, 8], new_tokens, engine)
        except Exception as error:                        # a row with its error, not a crash
            out["errors"][engine] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            print(f"[decode] {label} {engine}: failed: {out['errors'][engine]}", flush=True)
            continue
        r = out["engines"][engine]
        print(f"[decode] {label} {engine}: {r['tok_s']} tok/s, capture {r['capture_s']:.1f} s, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    del model
    release("cuda")
    return out


def run_decode(base_dir: Path, new_tokens: int, compile_too: bool,
               save: Callable[[dict], None] = lambda figures: None) -> dict:
    """Every plan's engine groups, each in a fresh process (tasks/runtime/child_process.py); a
    process or engine that fails is recorded under `decode_errors` and the others keep their
    figures. `save` gets the figures so far after each process: a call killed at its time limit
    keeps what it finished."""
    results, peaks, compile_s, agree, logit_diff, weights = {}, {}, {}, {}, {}, {}
    graph_errors: dict[str, str] = {}
    errors: dict[str, str] = {}
    reference_tokens = reference_logits = None

    def figures() -> dict:
        return {"decode": results, "peak_cuda_mib": peaks, "compile_s": compile_s,
                "token_agreement_with_eager": agree, "max_first_logit_diff_vs_bf16": logit_diff,
                "weights_gib": weights, "graph_errors": graph_errors, "decode_errors": errors}

    caches = Path(tempfile.mkdtemp(prefix="decode-compile-"))
    for label, fmt in PLANS:
        for engines in plan_engines(fmt, compile_too):
            group = f"{label} {'+'.join(engines)}"
            fresh = caches / group.replace(" ", "_")
            os.environ |= {"TORCHINDUCTOR_CACHE_DIR": str(fresh / "inductor"),
                           "TRITON_CACHE_DIR": str(fresh / "triton")}
            try:
                plan = child_process.call(decode_plan, base_dir, label, fmt, engines, new_tokens,
                                          reference_logits)
            except Exception as error:
                errors[group] = f"{type(error).__name__}: {str(error).strip()[:500]}"
                print(f"[decode] {group}: failed: {errors[group]}", flush=True)
                save(figures())
                continue
            weights[label] = plan["weights_gib"]
            if "reference_logits" in plan:
                reference_logits = plan["reference_logits"]
            elif label != "bf16":
                logit_diff[label] = plan["max_first_logit_diff_vs_bf16"]
            errors |= {f"{label} {engine}": e for engine, e in plan["errors"].items()}
            for engine, r in plan["engines"].items():
                name = f"{label} {engine}"
                results[name], peaks[name], compile_s[name] = r["tok_s"], r["peak_cuda_mib"], \
                    r["capture_s"]
                if r.get("graph_error"):
                    graph_errors[name] = r["graph_error"]
                if engine == "eager":
                    reference_tokens = r["tokens"]
                if reference_tokens is not None:
                    agree[name] = {b: agreement(r["tokens"][b], reference_tokens[b])
                                   for b in r["tokens"]}
            save(figures())
    return figures()
