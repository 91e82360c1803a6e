"""Stage "benchmark": generation speed and memory of model variants on the same prompts.

Each variant (base, base+adapter, merged, int4, ...) is loaded and measured in a FRESH Python
process (tasks/runtime/child_process.py), so peak memory is that model's own. In it, every engine
and batch size of the config is measured on the same prompts (cycled to fill a batch, left-padded),
generating exactly `new_tokens` greedy tokens per row:

* `static`: the fast loop of tasks/model/decode.py (static KV cache; on a GPU each decode step is a
  replayed CUDA graph, optionally compiled first; its capture/compile time is reported apart);
* `generate`: HF `generate` with its dynamic cache (EOS suppressed by `min_new_tokens`), the
  reference; a streamer stamps the first new token.

A variant whose process fails (an error in it, or the out-of-memory killer) is a row of the
table with its error, and the other variants are still measured; only when every variant failed
does the stage fail. A variant process ended by SIGTERM or SIGINT ends the stage: the run was
cancelled.

TTFT is the time to the first new token; decode tok/s per sequence is (new_tokens - 1) / the time
of the remaining steps, and the aggregate is that times the batch. `repeats` rounds run every
variant in turn (each round a new process per variant), and the table shows the median with the
min-max, so a noisy machine shows up as a spread instead of a wrong ranking.

Standalone (e.g. on the GPU machine, no Prefect/MLflow needed):
    python -m tasks.evaluate.benchmark --variant base=/models/base --variant merged=/models/merged \
        --adapter base+lora=/models/base,/runs/adapter --new-tokens 64 --batch 1 --batch 8
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from tasks.runtime import child_process
from tasks.evaluate.benchmark_rows import BenchmarkRow, FailedVariant, markdown_table, metrics, \
    summarise
from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import (
    atomic_write_json,
    atomic_write_text,
    publish_dir,
    read_json,
    staging_dir,
)
from tasks.config.methods import FourBit
from tasks.model.model_spec import ModelSpec
from tasks.runtime.resources import own_peak_rss_mib

if TYPE_CHECKING:        # not imported at run time: the GPU box may lack pydantic
    from tasks.config import BenchmarkConfig

#: a measuring process ended by one of these was cancelled with the run, not failed
CANCELLED = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
log = logging.getLogger(__name__)
DEFAULT_PROMPTS = ["绿萝叶子发黄是什么原因？", "多肉植物多久浇一次水？", "月季开花后要怎么修剪？",
                   "冬天室内的植物要注意什么？"]


@stage_output
class Benchmark:
    """The measured rows (`benchmark.json`, read by `tasks.evaluate.benchmark_rows`), the
    variants that failed (`failed.json`), the table (`benchmark.md`), each variant's figures as
    metrics, and what was measured."""

    benchmark_json: Path
    failed_json: Path
    benchmark_md: Path
    figures: Metrics
    failed_variant_runs: int
    variants: dict[str, dict[str, Any]]      # name -> ModelSpec.describe()
    prompts: list


def batches(prompts: list, batch: int) -> list[list]:
    """The prompts, cycled to fill whole batches: every prompt is measured at least once."""
    rounds = -(-len(prompts) // batch)
    cycled = [prompts[i % len(prompts)] for i in range(rounds * batch)]
    return [cycled[i:i + batch] for i in range(0, len(cycled), batch)]


# ---------------------------------------------------------------------------------------------
# Child process: load one variant, measure every engine and batch size, write its rows
# ---------------------------------------------------------------------------------------------
def _quant_label(spec: ModelSpec) -> str | None:
    if spec.quantization:
        return spec.quantization.quant_type
    config = Path(spec.path) / "config.json"
    quant = read_json(config).get("quantization_config") if config.is_file() else None
    if not quant:
        return None
    return quant.get("bnb_4bit_quant_type") or f"{quant.get('quant_method')} int4"


def _measure(name: str, spec: ModelSpec, prompts: list[list[dict]], new_tokens: int, warmup: int,
             device: str, threads: int = 0, batch_sizes: tuple[int, ...] = (1,),
             engines: tuple[str, ...] = ("static", "generate"), compile: str = "off"
             ) -> list[BenchmarkRow]:
    import torch
    from transformers.generation.streamers import BaseStreamer

    from tasks.model.decode import Compile, StaticDecoder, left_pad
    from tasks.model.modeling import generate_ids, load_tokenizer, prefix_length, prompt_ids

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
    rss0 = own_peak_rss_mib()
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(spec.tokenizer_dir())
    model = spec.load(device)
    sync()
    load_seconds = time.perf_counter() - t0
    pad = tokenizer.pad_token_id
    all_ids = [prompt_ids(tokenizer, p) for p in prompts]

    def run_generate(ids: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
        stamps = Stamps()
        sync()
        start = time.perf_counter()
        out = generate_ids(model, ids, attention_mask=mask, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=pad, streamer=stamps)
        sync()
        end = time.perf_counter()
        if out.shape[1] - ids.shape[1] != new_tokens or len(stamps.times) != new_tokens + 1:
            raise RuntimeError(f"variant {name!r}: generated {out.shape[1] - ids.shape[1]} "
                               f"tokens, expected exactly {new_tokens}")
        return stamps.times[1] - start, end - stamps.times[1]

    rows = []
    for engine in engines:
        if engine == "static" and prefix_length(model):
            continue                    # a P-Tuning prefix lives in the cache: generate only
        for batch in batch_sizes:
            groups = [tuple(t.to(device) for t in left_pad(g, pad))
                      for g in batches(all_ids, batch)]
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            capture = 0.0
            if engine == "static":
                decoder = StaticDecoder(model, batch_size=batch, compile=Compile(compile),
                                        max_len=max(len(i) for i in all_ids) + new_tokens)

                def run(ids, mask):
                    out = decoder.decode(ids, mask, new_tokens)
                    return out.first_token_s, out.decode_s
            else:
                # not the layers a static engine compiled
                run = torch.compiler.set_stance("force_eager")(run_generate)
            for i in range(warmup):
                run(*groups[i % len(groups)])
            graph = None
            if engine == "static":                # graph capture (and compile) of its first run
                capture = decoder.capture_s
                graph = decoder.graph is not None
            timings = [run(ids, mask) for ids, mask in groups]
            first = sum(t[0] for t in timings) / len(timings)
            rest = sum(t[1] for t in timings) / len(timings)
            per_seq = (new_tokens - 1) / rest
            rows.append(dict(
                variant=name, engine=engine, batch=batch, device=device,
                dtype=str(model.dtype).removeprefix("torch."), quant=_quant_label(spec),
                adapter=spec.adapter is not None, prompts=len(prompts), new_tokens=new_tokens,
                threads=torch.get_num_threads(), decode_tok_s=per_seq,
                aggregate_tok_s=per_seq * batch, e2e_tok_s=batch * new_tokens / (first + rest),
                ttft_ms=1000 * first, compile_s=capture, cuda_graph=graph,
                compiled=compile if engine == "static" and compile != "off" else None,
                peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
                footprint_mib=model.get_memory_footprint() / 2**20, load_seconds=load_seconds,
                rss_before_load_mib=rss0))
    peak = own_peak_rss_mib()
    return [BenchmarkRow(**r, peak_rss_mib=peak) for r in rows]


# ---------------------------------------------------------------------------------------------
# Parent: rounds of every variant -> the median rows, benchmark.json + benchmark.md
# ---------------------------------------------------------------------------------------------
def run_benchmark(variants: dict[str, ModelSpec], prompts: list[list[dict]],
                  cfg: BenchmarkConfig) -> StageResult:
    """Measure each variant (name -> the model it loads) in fresh processes on the same first
    `cfg.prompts` chat prompts; write benchmark.json/.md."""
    from tasks.model.modeling import pick_device
    from tasks.runtime.progress import Progress

    if not variants:
        raise ValueError("benchmark: no variants given")
    prompts = [list(p) for p in prompts[:cfg.prompts]]
    if not prompts:
        raise ValueError("benchmark: no prompts given")
    specs = {name: spec.check(f"benchmark variant {name!r}") for name, spec in variants.items()}
    device = pick_device(cfg.device)
    sizes = cfg.batch_sizes or ([1, 8] if device.startswith("cuda") else [1])
    compiled = cfg.compile or ("layers" if device.startswith("cuda") else "off")
    measured: list[list[BenchmarkRow]] = []
    failed: list[FailedVariant] = []
    with Progress("benchmark runs (a fresh process each)", cfg.repeats * len(specs)) as progress:
        for round_ in range(cfg.repeats):
            for name, spec in specs.items():
                try:
                    measured.append(child_process.call(
                        _measure, name, spec, prompts, cfg.new_tokens, cfg.warmup, device,
                        threads=cfg.cpu_threads, batch_sizes=tuple(sizes),
                        engines=tuple(cfg.engines), compile=compiled))
                except Exception as error:
                    if isinstance(error, child_process.ChildDied) and error.signal in CANCELLED:
                        raise
                    failed.append(FailedVariant.of(name, round_, error))
                    log.warning("benchmark: variant %s failed (its row says so): %s", name,
                                failed[-1].error)
                progress.update()
    if not measured:
        raise RuntimeError("benchmark: every variant failed: " + "; ".join(
            f"{f.variant}: {f.error}" for f in failed))
    rows = summarise(measured)
    table = markdown_table(rows, failed)
    with staging_dir(stage_root(StageName.BENCHMARK)) as tmp:
        atomic_write_json(tmp / "benchmark.json", [r.to_json() for r in rows])
        atomic_write_json(tmp / "failed.json", [vars(f) for f in failed])
        atomic_write_text(tmp / "benchmark.md", table)
        out, digest = publish_dir(tmp, stage_root(StageName.BENCHMARK))
    return StageResult(stage=StageName.BENCHMARK, path=str(out), digest=digest, summary=table,
                       device=device, out=Benchmark(
        benchmark_json=out / "benchmark.json", failed_json=out / "failed.json",
        benchmark_md=out / "benchmark.md", figures=metrics(rows),
        failed_variant_runs=len(failed),
        variants={name: spec.describe() for name, spec in specs.items()}, prompts=prompts))


@stage_entry(StageName.BENCHMARK, model_libs=True)
def stage(variants: dict[str, ModelSpec], prompts: list, cfg: BenchmarkConfig, device: str
          ) -> StageResult:
    """The stage: each variant measured in a process of its own (`run_benchmark`)."""
    return run_benchmark(variants, prompts, cfg.model_copy(update={"device": device}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    ap.add_argument("--batch", type=int, action="append", dest="batch_sizes",
                    help="a batch size (repeatable; default: 1 on a CPU, 1 and 8 on a GPU)")
    ap.add_argument("--engine", action="append", dest="engines", choices=["static", "generate"],
                    help="static (fast loop) and/or generate (HF reference); default: both")
    ap.add_argument("--compile", choices=["off", "step", "layers"], default="off",
                    help="static engine: compile each decoder layer or the whole decode step")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads per process (0: torch default, one per core)")
    args = ap.parse_args(argv)

    variants: dict[str, ModelSpec] = {}
    for item in args.items:
        name, sep, value = item.partition("=")
        if not sep:
            ap.error(f"expected NAME=VALUE, got {item!r}")
        path, _, adapter = value.partition(",")
        variants[name] = ModelSpec(path, dtype=args.dtype, adapter=adapter or None)
    for name in args.load_4bit:
        if name not in variants:
            ap.error(f"--load-4bit {name}: no such variant")
        variants[name] = replace(variants[name], quantization=FourBit(compute_dtype=args.dtype))
    if args.new_tokens < 2:
        ap.error("--new-tokens must be at least 2 (decode speed needs a second token)")
    if not variants:
        ap.error("give at least one --variant or --adapter")
    questions = args.prompt or DEFAULT_PROMPTS
    prompts = [[{"role": "user", "content": q}] for q in questions]
    cfg = SimpleNamespace(device=args.device, prompts=args.prompts, new_tokens=args.new_tokens,
                          warmup=args.warmup, cpu_threads=args.threads,
                          batch_sizes=args.batch_sizes, engines=args.engines or
                          ["static", "generate"], compile=args.compile, repeats=args.repeats)
    result = run_benchmark(variants, prompts, cfg)
    print(result.summary)
    print(result.path)


if __name__ == "__main__":
    main()
