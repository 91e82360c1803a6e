"""How long a model stage's process takes to start on a GPU machine, and which model modules the
fork server of tasks/runtime/child_process.py can import there without breaking CUDA in the
processes it forks.

    bash benchmarks/on_device.sh python3 benchmarks/child_start.py --out "$OUT"

On a GPU the fork server preloads `child_process.PRELOAD` only, not the model code it preloads
elsewhere (`PRELOAD_WITHOUT_GPU`): a module that initialises CUDA in the server leaves every
forked child without a usable GPU. Each child then imports the model code itself; how much of
the 5.3 s a stage process took to start at 6 B (`gpu_flow_6b_h100_layers_cold.json`) that is,
is what this measures. For each preload set, a fresh caller starts a fork server with it and
runs the same job in two children: import every model stage's module, then a matmul on the GPU.
A set is usable when both children answer. Writes child_start_<gpu>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path

from tasks.runtime import child_process

#: the modules a model stage's child imports, beyond the fork server's preload
STAGE_MODULES = ["tasks.model.modeling", "tasks.model.decode", "tasks.export.merge",
                 "tasks.export.quantize", "tasks.train.train", "tasks.evaluate.generations"]
#: preload sets to try, beside the current one (their names are what the JSON reports)
CANDIDATES = {
    "current": [],
    "peft": ["peft"],
    "bitsandbytes": ["bitsandbytes"],
    "torchao": ["torchao"],
    "model code": ["tasks.model.modeling", "tasks.model.decode"],
    "what a CPU machine preloads": child_process.PRELOAD_WITHOUT_GPU,
    "every stage module": ["peft", "bitsandbytes", "torchao", *STAGE_MODULES],
}


def job() -> dict:
    """What a model stage's child does first: its modules, then the GPU."""
    import importlib

    import torch

    start = time.perf_counter()
    for module in STAGE_MODULES:
        importlib.import_module(module)
    imported = time.perf_counter()
    x = torch.ones(256, 256, device="cuda" if torch.cuda.is_available() else "cpu")
    (x @ x).sum().item()
    return {"imports_s": imported - start, "cuda_s": time.perf_counter() - imported}


def one_caller(extra: list[str]) -> dict:
    """In this (fresh) process: a fork server with `extra` preloaded too, two children."""
    from benchmarks.child_start import job as stage_job     # by module name, not __main__
    from tasks.runtime.resources import peak_memory

    child_process.PRELOAD = child_process.PRELOAD + extra
    out: dict = {"preload": child_process.PRELOAD, "children": []}
    for _ in range(2):
        start = time.perf_counter()
        try:
            with peak_memory() as peaks:
                answer = child_process.call(stage_job)
        except Exception as error:                 # a broken CUDA in the child: this set fails
            out["error"] = f"{type(error).__name__}: {str(error).strip()[:300]}"
            break
        out["children"].append({**answer, "call_s": time.perf_counter() - start,
                                "process_start_s": peaks.phases.get("process_start")})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--one", help=argparse.SUPPRESS)         # a JSON list: run one caller
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_caller(json.loads(args.one))))
        return 0
    import torch

    results = {}
    for name, extra in CANDIDATES.items():
        run = subprocess.run([sys.executable, __file__, "--one", json.dumps(extra)],
                             capture_output=True, text=True, timeout=300)
        lines = run.stdout.strip().splitlines()
        results[name] = json.loads(lines[-1]) if run.returncode == 0 and lines else {
            "error": f"exit {run.returncode}: {run.stderr.strip()[-300:]}"}
        print(f"[child_start] {name}: {json.dumps(results[name])[:400]}", flush=True)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    data = {"gpu": gpu, "date": datetime.date.today().isoformat(),
            "command": "bash benchmarks/on_device.sh python3 benchmarks/child_start.py",
            "stage_modules": STAGE_MODULES, "preload_sets": results}
    args.out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    (args.out / f"child_start_{tag}.json").write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
