"""Host memory of loading a saved torchao int4 folder onto the GPU: transformers' own path
(memory-mapped safetensors) against `tasks.model.modeling.load_model`'s (one tensor at a time, the
torchao metadata handed to the quantizer; the 2026-11-30 result was taken when load_model read with
safetensors' `pread`, before tasks/model/mapped_weights.py). Each load runs in a fresh process; the
logits of both must be identical. Writes benchmarks/results/torchao_load_<size>.json.

    bash benchmarks/on_device.sh python3 benchmarks/torchao_load.py --size 6b --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def child(folder: Path, how: str) -> None:
    from transformers import AutoModelForCausalLM

    from tasks.runtime.resources import own_peak_rss_mib

    rss0 = own_peak_rss_mib()
    start = time.perf_counter()
    if how == "mmap":
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16,
                                                     device_map={"": "cuda"})
    else:
        from tasks.model.modeling import load_model

        model = load_model(folder, dtype="bfloat16", device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    ids = torch.arange(1, 33, device="cuda")[None]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float().cpu()
    torch.save(logits, folder.parent / f"logits-{how}.pt")
    kinds = sorted({type(m.weight).__name__ for m in model.modules()
                    if isinstance(m, torch.nn.Linear)})
    row = {"how": how, "load_s": round(seconds, 1), "rss_before_mib": rss0,
           "peak_rss_mib": own_peak_rss_mib(), "linear_weight_types": kinds}
    (folder.parent / f"row-{how}.json").write_text(json.dumps(row))
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="6b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        return child(Path(args.child[0]), args.child[1])
    from benchmarks.models import build_random_model
    from tasks.config import QuantizeConfig
    from tasks.model.modeling import load_model, save_model, load_tokenizer
    from tasks.export.quantize import quantization_config

    work = Path(tempfile.mkdtemp(prefix="ao-probe-"))
    base, _ = build_random_model(args.size, work / "model", "cuda")
    model = load_model(base, dtype="bfloat16", device="cuda",
                       quantization=quantization_config("torchao", QuantizeConfig(), "bfloat16"))
    save_model(model, load_tokenizer(base), work / "int4")
    del model
    print(json.dumps({"saved": sorted(p.name for p in (work / "int4").iterdir())[:6]}),
          flush=True)
    for how in ("mmap", "load_model"):
        subprocess.run([sys.executable, __file__, "--child", str(work / "int4"), how],
                       check=True)
    a, b = (torch.load(work / f"logits-{h}.pt") for h in ("mmap", "load_model"))
    result = {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
              "size": args.size, "command": "bash benchmarks/on_device.sh python3 "
              "benchmarks/torchao_load.py " + " ".join(sys.argv[1:]),
              "loads": [json.loads((work / f"row-{h}.json").read_text())
                        for h in ("mmap", "load_model")],
              "max_abs_logit_diff_load_model_vs_mmap": (a - b).abs().max().item()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"torchao_load_{args.size}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
