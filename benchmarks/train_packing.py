"""Padding-free packing (`train.packing`) against padded batches, through the train stage's core.

After an untimed warm-up run, each method with packing off/on trains over the sample corpus's
train split `--repeats` times (interleaved), reporting the mean useful (non-pad) tokens/s, the share of pad tokens in what was computed, peak CUDA memory and the dev
loss reached. First it checks, with this machine's attention kernel, that a packed batch has the
loss of the same examples padded (packing must be only a layout).

    PYTHONPATH=. python benchmarks/train_packing.py --model embedded          # CPU, ~2 M params
    PYTHONPATH=. python benchmarks/train_packing.py --model big --out results  # GPU, ~0.5 B params

`big` is benchmarks/models.py's random-init "0.5b" Llama (speed and memory, not quality).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

from tasks.train.base_model import build_base_model
from tasks.runtime.paths import DATA_DIR
from tasks.runtime.files import atomic_write_json
from tasks.config import BaseModelConfig, TrainConfig
from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.model.modeling import load_model, load_tokenizer, pick_device
from tasks.data.qa_text import read_qa_text
from tasks.train.train import IGNORE, train_adapter
from tasks.train.train_data import encode_file

from benchmarks.models import build_random_model


def packed_vs_padded_loss(base: Path, train_json: Path, device: str) -> dict[str, float]:
    """Loss of 8 unequal examples padded vs packed into one row (float32, no KV cache)."""
    tok = load_tokenizer(base)
    tok.padding_side = "right"
    batch = encode_file(tok, train_json, 256)[0][:8]
    model = load_model(base, dtype="float32", device=device).eval()
    model.config.use_cache = False
    out = {}
    with torch.no_grad():
        for name, collate in (("padded", DataCollatorForSeq2Seq(tok, padding=True,
                                                                 label_pad_token_id=IGNORE)),
                              ("packed", DataCollatorWithFlattening(separator_id=IGNORE))):
            inputs = {k: v.to(device) for k, v in collate(batch).items()}
            out[name] = model(**inputs).loss.item()
    del model
    out["abs_diff"] = abs(out["packed"] - out["padded"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["embedded", "big"], default="embedded")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("packing-results"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PIPELINE_HOME", str(args.out / "home"))
    device = pick_device("auto")
    cuda = device == "cuda"

    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    train_json = atomic_write_json(args.out / "train.json", train)
    dev_json = atomic_write_json(args.out / "dev.json", dev)
    base = Path(build_base_model(train_json, BaseModelConfig(
        pretrain_epochs=1 if args.model == "big" else 20)).path)
    if args.model == "big":
        base, _ = build_random_model("0.5b", Path(os.environ["PIPELINE_HOME"]) / "big_base",
                                     device)
    check = packed_vs_padded_loss(base, train_json, device)
    print(f"loss of 8 examples, padded {check['padded']:.6f} vs packed {check['packed']:.6f} "
          f"(|diff| {check['abs_diff']:.2e})", flush=True)

    def run(method: str, packing: bool, epochs: float) -> dict[str, float]:
        cfg = TrainConfig(method=method, packing=packing, epochs=epochs,
                          batch_size=args.batch_size, max_length=256, eval_steps=10_000,
                          save_steps=10_000, resume=False, sanity_examples=0,
                          compute_dtype="bfloat16" if cuda else "float32",
                          learning_rate=2e-4 if args.model == "big" else None)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        return train_adapter(base, train_json, dev_json, cfg).metrics

    methods = args.methods.split(",")
    for method in methods:                          # warm-up: CUDA context, kernels, caches
        run(method, False, 0.5)
    runs: dict[tuple[str, bool], list[dict]] = {}
    for _ in range(args.repeats):
        for method in methods:
            for packing in (False, True):
                m = run(method, packing, args.epochs)
                runs.setdefault((method, packing), []).append(m)
                print(f"{method} packing={packing}: {m['train_tokens_per_s']:.0f} useful tok/s",
                      flush=True)
    rows = []
    for (method, packing), ms in runs.items():
        mean = lambda key: sum(m[key] for m in ms) / len(ms)   # noqa: E731
        rows.append({"method": method, "packing": packing, "repeats": len(ms),
                     "useful_tok_s": round(mean("train_tokens_per_s"), 1),
                     "useful_tok_s_each": [round(m["train_tokens_per_s"], 1) for m in ms],
                     "padding_pct": round(100 * mean("padding_fraction"), 1),
                     "train_s": round(mean("train_seconds"), 2),
                     "peak_cuda_mib": round(max(m["peak_gpu_memory_gib"] for m in ms) * 1024, 1),
                     "eval_loss_after": round(mean("eval_loss_after"), 4)})

    lines = ["| method | packing | useful tok/s | pad share | train s | peak CUDA MiB | "
             "dev loss after |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['method']} | {'on' if r['packing'] else 'off'} | {r['useful_tok_s']:.0f} | "
              f"{r['padding_pct']:.1f}% | {r['train_s']:.1f} | {r['peak_cuda_mib']:.0f} | "
              f"{r['eval_loss_after']:.3f} |" for r in rows]
    device_name = torch.cuda.get_device_name(0) if cuda else "cpu"
    summary = {"device": device_name, "model": args.model, "torch": torch.__version__,
               "threads": torch.get_num_threads(), "loss_check": check, "rows": rows}
    (args.out / f"train_packing_{args.model}.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
