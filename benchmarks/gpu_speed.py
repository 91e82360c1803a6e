"""Decode and QLoRA speed at 6 B, side by side in one run, against their anchors (README
"Fast at real scale").

    PYTHONPATH=. python benchmarks/gpu_speed.py --out benchmarks/results     # all parts
    PYTHONPATH=. python benchmarks/gpu_speed.py --parts decode                # one part

Parts, each adding its figures to gpu_speed_<size>.json as it finishes (qlora before decode,
whose compiled engine takes longest):
* roofline: device-to-device copy bandwidth, and from it the batch-1 decode roofline of the bf16
  and int4 weights (every weight byte read once per token);
* decode: greedy decode tok/s of HF `generate` (the anchor) and of the static and compiled
  engines on bf16, torchao int4 and bitsandbytes nf4, each model in a process of its own, a
  failure recorded beside the others' figures (benchmarks/decode_speed.py);
* qlora: the train stage against two anchors, a bare HF + peft QLoRA loop and TRL's
  `SFTTrainer` with padding-free batches and Liger kernels (benchmarks/qlora_speed.py).
The model is a random-weight one of benchmarks/models.py: speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.models import build_random_model
from benchmarks.decode_speed import run_decode
from benchmarks.qlora_speed import run_qlora

def copy_bandwidth(gib: int = 4) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10 after warm-up)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, help="model and data folder (default: a temp dir)")
    ap.add_argument("--parts", nargs="+", default=["roofline", "decode", "qlora"],
                    choices=["roofline", "decode", "qlora"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-speed-"))
    os.environ.setdefault("PIPELINE_HOME", str(work / "home"))
    target = args.out / f"gpu_speed_{args.size}.json"
    result = json.loads(target.read_text()) if target.is_file() else {}
    base_dir = work / "model"
    if not (base_dir / "config.json").is_file():
        start = time.perf_counter()
        _, params = build_random_model(args.size, base_dir, "cuda")
        result["params"] = params
        print(f"[model] {params / 1e9:.2f} B built and saved in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    result |= {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "size": args.size, "torch": torch.__version__,
               "command": "bash benchmarks/on_device.sh python3 benchmarks/gpu_speed.py "
                          + " ".join(sys.argv[1:])}

    def save():
        args.out.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")

    if "roofline" in args.parts:
        result["copy_tb_s"] = copy_bandwidth() / 1e12
        save()
        print(f"[roofline] copy {result['copy_tb_s']:.2f} TB/s", flush=True)
    if "qlora" in args.parts:
        result |= run_qlora(base_dir, work)
        save()
    if "decode" in args.parts:
        result |= run_decode(base_dir, args.new_tokens, not args.no_compile,
                             save=lambda figures: (result.update(figures), save()))
        if "copy_tb_s" in result:        # batch-1 roofline: every weight byte read per token
            for label, key in (("bf16", "bf16"), ("int4", "int4-torchao")):
                if key in result["weights_gib"]:
                    result[f"roofline_{label}_tok_s"] = (result["copy_tb_s"] * 1e12
                                                         / (result["weights_gib"][key] * 2**30))
        save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("qlora",)}, indent=1,
                     default=str)[:3000])
    if "qlora" in result:
        print(json.dumps(result["qlora"], indent=1)[:1500])


if __name__ == "__main__":
    main()
