"""Stage "benchmark": generation speed and memory of model variants on the same prompts.

Each variant (base, base+adapter, merged, int4, ...) is loaded and measured in a FRESH Python
process (`python -m tasks.benchmark --worker spec.json result.json`), so peak memory is that
model's own. Per prompt, one greedy `generate` of exactly `new_tokens` tokens (EOS suppressed by
`min_new_tokens`) is timed with a streamer that stamps every token as it is produced: TTFT is the
first new token's time, decode tok/s = (new_tokens - 1) / (t_last - t_first), both from the same
run. On CUDA every stamp follows a device->host copy of the token, i.e. a synchronisation.

Standalone (e.g. on the GPU machine, no Prefect/MLflow needed):
    python -m tasks.benchmark --variant base=/models/base --variant merged=/models/merged \
        --adapter base+lora=/models/base,/runs/adapter --new-tokens 64
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from tasks.common import REPO_DIR, DataError, StageResult, atomic_write_json, \
    atomic_write_text, publish_dir, read_json, stage_root, staging_dir

if TYPE_CHECKING:        # not imported at run time: the GPU box may lack pydantic
    from tasks.config import BenchmarkConfig

SPEC_KEYS = {"path", "adapter", "dtype", "quantization"}
DEFAULT_PROMPTS = ["绿萝叶子发黄是什么原因？", "多肉植物多久浇一次水？", "月季开花后要怎么修剪？",
                   "冬天室内的植物要注意什么？"]
COLUMNS = [("variant", "variant"), ("device", "device"), ("dtype", "dtype"), ("quant", "quant"),
           ("decode_tok_s", "decode tok/s"), ("e2e_tok_s", "e2e tok/s"), ("ttft_ms", "TTFT ms"),
           ("peak_rss_mib", "peak RSS MiB"), ("peak_cuda_mib", "peak CUDA MiB"),
           ("footprint_mib", "footprint MiB"), ("load_seconds", "load s")]


def metric_key(name: str) -> str:
    """A variant name as an MLflow metric key part (letters, digits, _ - . / only)."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name.replace("+", "_plus_"))


def _check_spec(name: str, spec: dict) -> dict:
    unknown = set(spec) - SPEC_KEYS
    if unknown or "path" not in spec:
        raise ValueError(f"benchmark variant {name!r}: spec needs 'path' and may carry only "
                         f"{sorted(SPEC_KEYS)}; got {sorted(spec)}")
    for key in ("path", "adapter"):
        if spec.get(key) is not None and not Path(spec[key]).is_dir():
            raise DataError(spec[key], f"benchmark variant {name!r}: {key} folder not found")
    return {k: (str(v) if k in ("path", "adapter") and v is not None else v)
            for k, v in spec.items()}


# ---------------------------------------------------------------------------------------------
# Child process: load one variant, measure, write a row
# ---------------------------------------------------------------------------------------------
def _peak_rss_mib() -> float:
    """Peak RSS of this process in MiB. Linux keeps ru_maxrss across fork+exec (a child of a
    1 GB flow process would report 1 GB), so read VmHWM, which belongs to the address space
    exec created; ru_maxrss elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                      # kB -> MiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure(name: str, spec: dict, prompts: list[list[dict]], new_tokens: int, warmup: int,
             device: str, threads: int = 0) -> dict:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from tasks.merge import TOKENIZER_FILES
    from tasks.modeling import _is_bnb_folder, bnb_config, generate_ids, load_model, \
        load_tokenizer, prompt_ids

    class Stamps(BaseStreamer):
        """Records the wall time of every `put` (the prompt first, then each new token)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    if threads:
        torch.set_num_threads(threads)
    rss0 = _peak_rss_mib()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    quant = spec.get("quantization")
    t0 = time.perf_counter()
    adapter = spec.get("adapter")
    has_tok = adapter and any((Path(adapter) / f).is_file() for f in TOKENIZER_FILES)
    tokenizer = load_tokenizer(adapter if has_tok else spec["path"])
    model = load_model(spec["path"], dtype=spec.get("dtype", "float32"), device=device,
                       quantization=bnb_config(**quant) if quant else None,
                       adapter=adapter)
    sync()
    load_seconds = time.perf_counter() - t0
    if quant is None and _is_bnb_folder(spec["path"]):
        quant = read_json(Path(spec["path"]) / "config.json")["quantization_config"]
        quant = {"quant_type": quant.get("bnb_4bit_quant_type")}

    @torch.inference_mode()
    def run(ids: list[int]) -> tuple[float, float]:
        x = torch.tensor([ids], device=device)
        stamps = Stamps()
        sync()
        start = time.perf_counter()
        out = generate_ids(model, x, do_sample=False, max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id,
                           streamer=stamps)
        sync()
        end = time.perf_counter()
        if out.shape[1] - x.shape[1] != new_tokens or len(stamps.times) != new_tokens + 1:
            raise RuntimeError(f"variant {name!r}: generated {out.shape[1] - x.shape[1]} "
                               f"tokens, expected exactly {new_tokens}")
        return stamps.times[1] - start, end - start

    all_ids = [prompt_ids(tokenizer, p) for p in prompts]
    for i in range(warmup):
        run(all_ids[i % len(all_ids)])
    timings = [run(ids) for ids in all_ids]
    first, full = sum(t[0] for t in timings), sum(t[1] for t in timings)
    n = len(all_ids)
    return {
        "variant": name, "device": device, "dtype": spec.get("dtype", "float32"),
        "quant": (quant or {}).get("quant_type"), "adapter": adapter is not None,
        "prompts": n, "new_tokens": new_tokens, "threads": torch.get_num_threads(),
        "decode_tok_s": n * (new_tokens - 1) / (full - first),
        "e2e_tok_s": n * new_tokens / full,
        "ttft_ms": 1000 * first / n,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_before_load_mib": rss0,
        "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "footprint_mib": model.get_memory_footprint() / 2**20,
        "load_seconds": load_seconds,
    }


def _worker(spec_file: str, result_file: str) -> None:
    job = read_json(Path(spec_file))
    atomic_write_json(Path(result_file), _measure(**job))


def _run_child(job: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        atomic_write_json(spec_file, job)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH"))
                                            if p)
        proc = subprocess.run([sys.executable, "-m", "tasks.benchmark", "--worker",
                               str(spec_file), str(result_file)], env=env, cwd=REPO_DIR,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            raise RuntimeError(f"benchmark of variant {job['name']!r} failed (exit "
                               f"{proc.returncode}):\n{proc.stderr[-3000:]}")
        return read_json(result_file)


# ---------------------------------------------------------------------------------------------
# Parent: run every variant, write benchmark.json + benchmark.md
# ---------------------------------------------------------------------------------------------
def markdown_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return "–"
        return f"{v:.1f}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" if k in ("variant", "device", "dtype", "quant") else "---:"
                          for k, _ in COLUMNS) + "|"
    body = ["| " + " | ".join(cell(r.get(k)) for k, _ in COLUMNS) + " |" for r in rows]
    n = rows[0]
    return "\n".join([head, rule, *body, "", f"{n['prompts']} prompts x {n['new_tokens']} new "
                      "tokens (greedy, EOS suppressed), batch 1; each variant in a fresh "
                      "process."]) + "\n"


def run_benchmark(variants: dict[str, dict], prompts: list[list[dict]],
                  cfg: BenchmarkConfig) -> StageResult:
    """Measure each variant (name -> {"path", optional "adapter", "dtype", "quantization"}) in a
    fresh process on the same first `cfg.prompts` chat prompts; write benchmark.json/.md."""
    from tasks.modeling import pick_device

    if not variants:
        raise ValueError("benchmark: no variants given")
    prompts = [list(p) for p in prompts[:cfg.prompts]]
    if not prompts:
        raise ValueError("benchmark: no prompts given")
    specs = {name: _check_spec(name, spec) for name, spec in variants.items()}
    device = pick_device(cfg.device)
    rows = [_run_child({"name": name, "spec": spec, "prompts": prompts, "device": device,
                        "new_tokens": cfg.new_tokens, "warmup": cfg.warmup,
                        "threads": cfg.cpu_threads})
            for name, spec in specs.items()]
    table = markdown_table(rows)
    with staging_dir(stage_root("benchmark")) as tmp:
        atomic_write_json(tmp / "benchmark.json", rows)
        atomic_write_text(tmp / "benchmark.md", table)
        out, digest = publish_dir(tmp, stage_root("benchmark"))
    metrics = {}
    for r in rows:
        key = metric_key(r["variant"])
        metrics |= {f"{key}_decode_tok_s": r["decode_tok_s"],
                    f"{key}_peak_rss_mib": r["peak_rss_mib"],
                    f"{key}_footprint_mib": r["footprint_mib"]}
    return StageResult(stage="benchmark", path=str(out), digest=digest,
                       files={"benchmark.json": str(out / "benchmark.json"),
                              "benchmark.md": str(out / "benchmark.md")},
                       metrics=metrics, info={"rows": rows, "table": table,
                                              "variants": specs, "prompts": prompts})


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    ap.add_argument("--variant", action="append", dest="items", default=[], metavar="NAME=PATH",
                    help="a model folder to measure (repeatable)")
    ap.add_argument("--adapter", action="append", dest="items", metavar="NAME=BASE,ADAPTER",
                    help="a base folder + peft adapter folder (repeatable)")
    ap.add_argument("--load-4bit", action="append", default=[], metavar="NAME",
                    help="load this variant's weights in 4-bit nf4 (e.g. the QLoRA base)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per process (0: torch default, one per core)")
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(*args.worker)

    variants: dict[str, dict] = {}
    for item in args.items:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"expected NAME=VALUE, got {item!r}")
        path, _, adapter = value.partition(",")
        variants[name] = {"path": path, "dtype": args.dtype, **({"adapter": adapter}
                                                               if adapter else {})}
    for name in args.load_4bit:
        if name not in variants:
            ap.error(f"--load-4bit {name}: no such variant")
        variants[name]["quantization"] = {"quant_type": "nf4", "double_quant": True,
                                          "compute_dtype": args.dtype}
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed needs a second token)")
    if not variants:
        ap.error("give at least one --variant or --adapter")
    questions = args.prompt or DEFAULT_PROMPTS
    prompts = [[{"role": "user", "content": q}] for q in questions]
    cfg = SimpleNamespace(device=args.device, prompts=args.prompts, new_tokens=args.new_tokens,
                          warmup=args.warmup, cpu_threads=args.threads)
    result = run_benchmark(variants, prompts, cfg)
    print(result.info["table"])
    print(result.path)


if __name__ == "__main__":
    main()
