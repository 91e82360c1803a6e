"""The model stages on a GPU at a realistic size, through the same cores the pipeline runs.

A ~0.57 B-parameter Llama (random weights: speed and memory, not quality) with the embedded
default's tokenizer and chat template is trained with QLoRA (CUDA bitsandbytes nf4 kernels),
merged in bf16, quantized to int4 and benchmarked (base / base+adapter / merged / int4). No
Prefect or MLflow needed, so it runs on a bare GPU box:

    python benchmarks/gpu_pipeline.py --out results/           # prints tables, writes JSON
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tasks.base_model import build_base_model
from tasks.benchmark import run_benchmark
from tasks.common import DATA_DIR, atomic_write_json
from tasks.config import BaseModelConfig, BenchmarkConfig, QuantizeConfig, TrainConfig
from tasks.conversations import qa_to_conversation, split_train_dev
from tasks.merge import merge_adapter
from tasks.modeling import load_tokenizer
from tasks.qa_text import read_qa_text
from tasks.quantize import quantize_int4
from tasks.train import train_adapter

#: Qwen2-1.5B-like widths, 20 layers: ~0.57 B parameters with the small embedded vocabulary
BIG = dict(hidden_size=1536, num_hidden_layers=20, num_attention_heads=12,
           num_key_value_heads=2, intermediate_size=4096)


def big_base(tokenizer_dir: Path, out: Path) -> tuple[Path, int]:
    """A random-init Llama of BIG size sharing the embedded default's tokenizer."""
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                                         bos_token_id=tok.bos_token_id,
                                         eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, **BIG))
    model.to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("gpu-results"))
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PIPELINE_HOME", str(args.out / "home"))
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        r = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t, 2)
        print(f"[{name}] {timings[name]} s  {json.dumps(r.metrics)[:400]}", flush=True)
        return r

    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    train_json = atomic_write_json(args.out / "train.json", train)
    dev_json = atomic_write_json(args.out / "dev.json", dev)
    tiny = timed("embedded_base", build_base_model, train_json,
                 BaseModelConfig(pretrain_epochs=1))
    base_dir, params = big_base(Path(tiny.path), args.out / "home" / "big_base")
    print(f"big base: {params / 1e6:.0f} M parameters", flush=True)

    torch.cuda.reset_peak_memory_stats()
    adapter = timed("train_qlora", train_adapter, base_dir, train_json, dev_json,
                    TrainConfig(method="qlora", compute_dtype="bfloat16", epochs=args.epochs,
                                batch_size=args.batch_size, max_length=256, eval_steps=50,
                                learning_rate=2e-4))
    train_peak = torch.cuda.max_memory_allocated() / 2**20
    merged = timed("merge_bf16", merge_adapter, base_dir, adapter.path, "bfloat16")
    int4 = timed("quantize_int4", quantize_int4, merged.path,
                 QuantizeConfig(compute_dtype="bfloat16"), "cuda")
    prompts = [[{"role": "user", "content": q}] for q in
               ["绿萝叶子发黄怎么办？", "多肉多久浇一次水？", "君子兰怎么施肥？", "薄荷怎么扦插？"]]
    q = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
    bench = timed("benchmark", run_benchmark, {
        "base": {"path": str(base_dir), "dtype": "bfloat16"},
        "base(4bit)+adapter": {"path": str(base_dir), "adapter": adapter.path,
                               "quantization": q, "dtype": "bfloat16"},
        "merged": {"path": merged.path, "dtype": "bfloat16"},
        "int4": {"path": int4.path, "dtype": "bfloat16"},
    }, prompts, BenchmarkConfig(device="cuda", prompts=4, new_tokens=128, warmup=2))
    summary = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "params": params, "timings_s": timings, "train": adapter.metrics,
               "train_peak_cuda_mib": round(train_peak, 1), "merge": merged.metrics,
               "quantize": int4.metrics, "benchmark": bench.info["rows"]}
    (args.out / "gpu_pipeline.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nQLoRA train: {adapter.metrics.get('train_tokens_per_s', 0):.0f} tok/s, "
          f"peak {train_peak:.0f} MiB, eval loss {adapter.metrics.get('eval_loss_before')} -> "
          f"{adapter.metrics.get('eval_loss_after')}\n")
    print(bench.info["table"])


if __name__ == "__main__":
    main()
