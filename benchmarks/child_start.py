"""How long a model stage's process takes to start on a GPU machine: from a fork server of
tasks/runtime/child_process.py with each of several preload sets, and as a spare.

    bash benchmarks/on_device.sh python3 benchmarks/child_start.py --out "$OUT" [--only spare]

A fork server that imports a module which initialises CUDA leaves every child it forks without
a usable GPU, so on a GPU it preloads `child_process.PRELOAD` only and each child imports the
model code itself. For each preload set, a fresh caller starts a fork server with it and runs
the same job in two children: import every model stage's module, then a matmul on the GPU. A
set is usable when both children answer. "spare" runs the job as the flow does on a GPU: in
spares (`child_process.START`), the first started by `prepare()` while the caller works
(`WORK_S`, the data stages), each next one while the previous job's stage works.
`process_start_s` is what the stage waits for its process; `imports_s` what its job still
had to import. Writes (or, with --only, updates) child_start_<gpu>.json.
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
    "spare": "spare",
}
#: seconds the caller works between jobs (a stage's own work, while the next spare imports)
WORK_S = 20.0


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


def one_caller(extra: list[str] | str) -> dict:
    """In this (fresh) process: a fork server with `extra` preloaded too, two children; or,
    for "spare", two spares."""
    from benchmarks.child_start import job as stage_job     # by module name, not __main__
    from tasks.runtime.resources import peak_memory

    if extra == "spare":
        child_process.START = "spare"
        child_process.prepare()
        out: dict = {"preload": child_process.SPARE_PRELOAD, "work_s": WORK_S, "children": []}
    else:
        child_process.START = "fork server"
        child_process.PRELOAD = child_process.PRELOAD + extra
        out = {"preload": child_process.PRELOAD, "children": []}
    for _ in range(2):
        if extra == "spare":
            time.sleep(WORK_S)
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
    ap.add_argument("--only", nargs="*", choices=list(CANDIDATES), help="these sets only")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one_caller(json.loads(args.one))))
        return 0
    import torch

    results = {}
    for name, extra in CANDIDATES.items():
        if args.only and name not in args.only:
            continue
        run = subprocess.run([sys.executable, __file__, "--one", json.dumps(extra)],
                             capture_output=True, text=True, timeout=300)
        lines = run.stdout.strip().splitlines()
        results[name] = json.loads(lines[-1]) if run.returncode == 0 and lines else {
            "error": f"exit {run.returncode}: {run.stderr.strip()[-300:]}"}
        print(f"[child_start] {name}: {json.dumps(results[name])[:400]}", flush=True)
        results[name]["date"] = datetime.date.today().isoformat()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    tag = "h200" if "H200" in gpu else "h100" if "H100" in gpu else "gpu"
    path = args.out / f"child_start_{tag}.json"
    before = json.loads(path.read_text()) if args.only and path.is_file() else {}
    data = {"gpu": gpu, "date": datetime.date.today().isoformat(),
            "command": "bash benchmarks/on_device.sh python3 benchmarks/child_start.py",
            "stage_modules": STAGE_MODULES,
            "preload_sets": {**before.get("preload_sets", {}), **results}}
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
