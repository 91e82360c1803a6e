"""Where a model stage's time and host memory go at a real size, phase by phase: a process's
start (imports, CUDA context), a bf16 load, a save, hashing the saved folder for its manifest, and
the torchao int4 quantize stage's steps. Each scenario runs in a fresh process, as the stages do on
a GPU (tasks/runtime/child_process.py); each phase's peak host RSS is its own (VmHWM, reset through
/proc/self/clear_refs as tasks/runtime/resources.py does). Writes
benchmarks/results/stage_phases_<size>.json.

    bash benchmarks/on_device.sh python3 benchmarks/stage_phases.py --size 6b --out $OUT

On 2026-11-30 it showed a 6 B bf16 load taking 18.4 s through safetensors' `pread` backend and
1.6 s through transformers' memory map (benchmarks/results/stage_phases_6b_pread.json), hence
tasks/model/mapped_weights.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

T0 = time.perf_counter()                  # before the heavy imports: a scenario's start-up
ROWS: list[dict] = []


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Time a phase; its peak RSS is the high-water mark since the phase began."""
    import torch

    from tasks.runtime.resources import own_peak_rss_mib, rss_mib

    Path("/proc/self/clear_refs").write_text("5")
    start = time.perf_counter()
    yield
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    row = {"phase": name, "seconds": round(time.perf_counter() - start, 2),
           "peak_rss_mib": round(own_peak_rss_mib()), "rss_after_mib": round(rss_mib())}
    ROWS.append(row)
    print(json.dumps(row), flush=True)


def scenario(name: str, base: Path, work: Path) -> list[dict]:
    """One scenario, in this (fresh) process."""
    import torch

    from tasks.config import QuantizeConfig
    from transformers import AutoModelForCausalLM

    from tasks.runtime.manifest import build_manifest, hash_file
    from tasks.export.merge import PROBE, probe_ids
    from tasks.model.modeling import load_model, load_tokenizer, release, save_model
    from tasks.export.quantize import quantization_config

    dev = "cuda" if torch.cuda.is_available() else "cpu"          # cpu: a smoke run only
    with phase("start-up: imports + CUDA context"):
        torch.zeros(1, device=dev)
    ROWS[-1]["seconds"] = round(time.perf_counter() - T0, 2)       # from the process's start
    if name == "bf16":
        with phase("load bf16 (tasks.model.modeling.load_model)"):
            model = load_model(base, dtype="bfloat16", device=dev)
        with phase("save bf16 (1 GB shards)"):
            save_model(model, None, work / "bf16")
        del model
        release(dev)
        with phase("manifest: hash the saved folder"):
            build_manifest(work / "bf16")
        with phase("hash the saved folder, 8 threads"):
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(hash_file, sorted((work / "bf16").glob("*.safetensors"))))
        with phase("load bf16 (transformers' mmap)"):
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16,
                                                         device_map={"": dev})
    elif name == "torchao":
        tok = load_tokenizer(base)
        ids = probe_ids(tok, PROBE)
        with phase("reference: load bf16 + logits + free"):
            full = load_model(base, dtype="bfloat16", device="cuda")
            with torch.inference_mode():
                full(input_ids=ids.cuda())
            del full
            release("cuda")
        with phase("quantizing load (torchao int4)"):
            model = load_model(base, dtype="bfloat16", device="cuda",
                               quantization=quantization_config("torchao", QuantizeConfig(),
                                                                "bfloat16"))
        with phase("save int4"):
            save_model(model, tok, work / f"int4-{os.getpid()}")
            del model
            release("cuda")
        with phase("reload int4 (tasks.model.modeling.load_model)"):
            model = load_model(work / f"int4-{os.getpid()}", dtype="bfloat16", device="cuda")
    return ROWS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--scenario", nargs=3, help=argparse.SUPPRESS)   # name base work (a child)
    args = ap.parse_args()
    if args.scenario:
        name, base, work = args.scenario
        rows = scenario(name, Path(base), Path(work))
        (Path(work) / f"rows-{name}-{os.getpid()}.json").write_text(json.dumps(rows))
        return
    import torch

    from benchmarks.models import build_random_model

    work = Path(tempfile.mkdtemp(prefix="phases-"))
    start = time.perf_counter()
    gpu = torch.cuda.is_available()
    base, params = build_random_model(args.size, work / "base", "cuda" if gpu else "cpu")
    built = time.perf_counter() - start
    # (an env per scenario: e.g. {"MALLOC_MMAP_THRESHOLD_": "4194304"} changed nothing at 6 B)
    runs = [("bf16", {})] + ([("torchao", {})] if gpu else [])
    result = {"gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU)", "date": datetime.date.today().isoformat(),
              "size": args.size, "params": params, "build_seconds": round(built, 1),
              "command": "bash benchmarks/on_device.sh python3 benchmarks/stage_phases.py "
                         + " ".join(sys.argv[1:]), "scenarios": []}
    for name, env in runs:
        print(f"[phases] {name} {env}", flush=True)
        before = set(work.glob(f"rows-{name}-*.json"))
        subprocess.run([sys.executable, __file__, "--scenario", name, str(base), str(work)],
                       check=True, env={**os.environ, **env})
        (rows,) = set(work.glob(f"rows-{name}-*.json")) - before
        result["scenarios"].append({"scenario": name, "env": env,
                                    "phases": json.loads(rows.read_text())})
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"stage_phases_{args.size}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
