"""The benchmark's figures as a type: one `BenchmarkRow` per (variant, engine, batch size), the
median of its repeats, and how rows become benchmark.json, the markdown table and MLflow metrics.

Plain Python, without torch: a flow imports it at start-up. How the figures are measured is
tasks/evaluate/benchmark.py's docstring.
"""

from __future__ import annotations

import dataclasses
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.runtime.files import read_json

#: figures taken per measurement; the table shows their median and spread over the repeats
TIMED = ("decode_tok_s", "aggregate_tok_s", "e2e_tok_s", "ttft_ms", "load_seconds", "compile_s")
#: memory figures: the largest seen over the repeats
PEAKS = ("peak_rss_mib", "peak_cuda_mib")


@dataclass(frozen=True)
class BenchmarkRow:
    """One variant, engine and batch size: what was measured and the figures. A measurement
    of one process has `repeats=1`; `summarise` makes the median row of several, with each timed
    figure's (min, max) in `spread`."""

    variant: str
    engine: str                       # "static" (tasks/model/decode.py) or "generate" (HF generate)
    batch: int
    device: str
    dtype: str
    quant: str | None                 # e.g. "nf4", "torchao int4"; None: not quantized
    adapter: bool                     # measured as base + adapter (not merged)
    prompts: int
    new_tokens: int
    threads: int
    decode_tok_s: float               # per sequence, after the first token
    aggregate_tok_s: float            # decode_tok_s x batch
    e2e_tok_s: float                  # every new token of the batch over the whole generation
    ttft_ms: float
    compile_s: float                  # static engine: graph capture (and compile) of its first run
    cuda_graph: bool | None
    peak_cuda_mib: float | None
    footprint_mib: float
    load_seconds: float
    rss_before_load_mib: float
    peak_rss_mib: float
    repeats: int = 1
    compiled: str | None = None       # static engine: what torch.compile compiled ("layers",
                                      # "step"; True in rows of older runs: the step)
    spread: dict[str, tuple[float, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """benchmark.json's record: the fields, each spread as `<figure>_min` / `_max`."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "spread"}
        for key, (low, high) in self.spread.items():
            out |= {f"{key}_min": low, f"{key}_max": high}
        return out

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> "BenchmarkRow":
        names = {f.name for f in dataclasses.fields(cls)} - {"spread"}
        spread = {k: (record[f"{k}_min"], record[f"{k}_max"]) for k in TIMED
                  if f"{k}_min" in record}
        return cls(**{k: v for k, v in record.items() if k in names}, spread=spread)


@dataclass(frozen=True)
class FailedVariant:
    """A variant whose measuring process failed in one round: no figures, the error's first
    line (the other variants' rows are kept)."""

    variant: str
    round: int
    error: str

    @classmethod
    def of(cls, variant: str, round_: int, error: BaseException) -> "FailedVariant":
        first = (str(error).strip().splitlines() or [""])[0][:300]
        return cls(variant, round_, f"{type(error).__name__}: {first}")


def read_rows(benchmark_json: Path) -> list[BenchmarkRow]:
    """The rows of a benchmark stage's benchmark.json."""
    return [BenchmarkRow.from_json(r) for r in read_json(benchmark_json)]


def summarise(measured: list[list[BenchmarkRow]]) -> list[BenchmarkRow]:
    """One row per (variant, engine, batch) over the repeats: the median of each timed figure
    with its (min, max); memory figures are the largest seen."""
    groups: dict[tuple, list[BenchmarkRow]] = {}
    for rows in measured:
        for r in rows:
            groups.setdefault((r.variant, r.engine, r.batch), []).append(r)
    out = []
    for runs in groups.values():
        values = {key: [getattr(r, key) for r in runs] for key in TIMED}
        peaks = {key: [v for r in runs if (v := getattr(r, key)) is not None] for key in PEAKS}
        out.append(dataclasses.replace(
            runs[0], repeats=len(runs),
            **{key: statistics.median(v) for key, v in values.items()},
            **{key: max(v) if v else None for key, v in peaks.items()},
            spread={key: (min(v), max(v)) for key, v in values.items()}))
    return out


def metric_key(name: str) -> str:
    """A variant name as an MLflow metric key part (letters, digits, _ - . / only)."""
    return re.sub(r"[^A-Za-z0-9_\-./]", "_", name.replace("+", "_plus_"))


def metrics(rows: list[BenchmarkRow]) -> dict[str, float]:
    """The rows as MLflow metrics: `<variant>_<engine>_b<batch>_<figure>` and per variant its
    peak RSS and weight footprint."""
    out: dict[str, float] = {}
    for r in rows:
        key = metric_key(r.variant)
        run = f"{key}_{r.engine}_b{r.batch}"
        out |= {f"{run}_decode_tok_s": r.decode_tok_s,
                f"{run}_aggregate_tok_s": r.aggregate_tok_s, f"{run}_ttft_ms": r.ttft_ms,
                f"{key}_peak_rss_mib": r.peak_rss_mib, f"{key}_footprint_mib": r.footprint_mib}
        if r.peak_cuda_mib is not None:
            out[f"{run}_peak_cuda_mib"] = r.peak_cuda_mib
    return out


def engine_label(engine: str, compiled: str | bool | None) -> str:
    """A row's engine and what torch.compile compiled of it ("static + compiled layers"); rows
    of older runs say `compiled: true` for the whole step, or nothing."""
    scope = "step" if compiled is True else compiled
    return f"{engine} + compiled {scope}" if scope else engine


def markdown_table(rows: list[BenchmarkRow], failed: list[FailedVariant] = ()) -> str:
    """benchmark.md: one line per row, the median and (min–max) where there were repeats; a
    line per failed variant and round with its error."""
    def num(v):
        return "–" if v is None else f"{v:,.1f}" if isinstance(v, float) else str(v)

    def spread(r: BenchmarkRow, key: str) -> str:
        if key not in r.spread or r.repeats < 2:
            return num(getattr(r, key))
        low, high = r.spread[key]
        return f"{num(getattr(r, key))} ({num(low)}–{num(high)})"

    head = ("| variant | engine | batch | dtype | quant | decode tok/s per seq | aggregate tok/s "
            "| TTFT ms | peak CUDA MiB | peak RSS MiB | load s | capture s |")
    rule = "|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
    body = [f"| {r.variant} | {engine_label(r.engine, r.compiled)} | {r.batch} | "
            f"{r.dtype} | {r.quant or '–'} | "
            f"{spread(r, 'decode_tok_s')} | {num(r.aggregate_tok_s)} | {spread(r, 'ttft_ms')} | "
            f"{num(r.peak_cuda_mib)} | {num(r.peak_rss_mib)} | {num(r.load_seconds)} | "
            f"{num(r.compile_s)} |" for r in rows]
    body += [f"| {f.variant} | failed (round {f.round + 1}): {f.error.replace('|', '/')} |"
             + " – |" * 10 for f in failed]
    n = rows[0]
    graph = " + CUDA graph" if n.device.startswith("cuda") else ""
    return "\n".join([head, rule, *body, "", f"{n.prompts} prompts x {n.new_tokens} new tokens "
                      f"(greedy, no early stop) on {n.device}; median (min–max) of {n.repeats} "
                      "runs, each variant in a fresh process per run; static: static KV cache"
                      f"{graph}, + compiled layers/step: each decoder layer or the whole step "
                      "torch.compile'd first; generate: HF generate."]
                     ) + "\n"
