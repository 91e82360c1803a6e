"""benchmark: two variants of a tiny Llama, each measured in its own process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny_model import make_all  # noqa: E402

from tasks.runtime.errors import DataError
from tasks.runtime.files import read_json  # noqa: E402
from tasks.evaluate.benchmark import batches, run_benchmark  # noqa: E402
from tasks.evaluate.benchmark_rows import (
    BenchmarkRow,
    markdown_table,
    metric_key,
    read_rows,
    summarise,
)  # noqa: E402
from tasks.config import BenchmarkConfig  # noqa: E402
from tasks.model.model_spec import ModelSpec  # noqa: E402

PROMPTS = [[{"role": "user", "content": "绿萝叶子发黄怎么办？"}],
           [{"role": "user", "content": "多肉植物需要阳光吗？"}]]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))


def test_metric_key():
    assert metric_key("base+adapter") == "base_plus_adapter"
    assert metric_key("int4 (nf4)") == "int4__nf4_"


def measured(variant: str, decode: float, rss: float) -> BenchmarkRow:
    """One process's row, made up: only the figures a test reads differ."""
    return BenchmarkRow(variant, "static", 1, "cpu", "float32", None, False, 2, 4, 1,
                        decode_tok_s=decode, aggregate_tok_s=decode, e2e_tok_s=decode,
                        ttft_ms=1000 / decode, compile_s=0.0, cuda_graph=None,
                        peak_cuda_mib=None, footprint_mib=1.0, load_seconds=0.5,
                        rss_before_load_mib=100.0, peak_rss_mib=rss)


def test_summarise_takes_medians_with_their_spread_and_the_largest_peak(tmp_path):
    rounds = [[measured("a", 10.0, 300.0), measured("b", 5.0, 200.0)],
              [measured("a", 30.0, 310.0), measured("b", 6.0, 200.0)],
              [measured("a", 20.0, 305.0), measured("b", 7.0, 190.0)]]
    a, b = summarise(rounds)
    assert (a.variant, a.repeats, a.decode_tok_s, a.spread["decode_tok_s"]) == \
        ("a", 3, 20.0, (10.0, 30.0))
    assert (b.peak_rss_mib, b.peak_cuda_mib, b.spread["ttft_ms"]) == (200.0, None, (
        1000 / 7, 200.0))
    # benchmark.json round trip, and the table shows the spread
    path = tmp_path / "benchmark.json"
    path.write_text(json.dumps([a.to_json(), b.to_json()]), encoding="utf-8")
    assert read_rows(path) == [a, b] and a.to_json()["decode_tok_s_min"] == 10.0
    assert "| a | static | 1 | float32 | – | 20.0 (10.0–30.0) |" in markdown_table([a, b])


@pytest.mark.slow                           # four fresh processes, ~10 s each to start here
def test_benchmark_two_variants(tmp_path):
    base, adapter = make_all(tmp_path)
    cfg = BenchmarkConfig(device="cpu", prompts=2, new_tokens=4, warmup=1, cpu_threads=1,
                          batch_sizes=[1, 2], repeats=2)
    res = run_benchmark({"base": ModelSpec(base), "base+adapter": ModelSpec(base,
                                                                          adapter=adapter)},
                        PROMPTS, cfg)
    rows = read_json(res.out.benchmark_json)
    typed = read_rows(res.out.benchmark_json)
    assert [r.to_json() for r in typed] == rows and all(r.repeats == 2 for r in typed)
    assert all(isinstance(r, BenchmarkRow) for r in typed)
    # one row per variant, engine and batch size, each the median of 2 measurements
    assert [(r["variant"], r["engine"], r["batch"]) for r in rows] == [
        (v, e, b) for v in ("base", "base+adapter") for e in ("static", "generate")
        for b in (1, 2)]
    for r in rows:
        assert r["device"] == "cpu" and r["prompts"] == 2 and r["new_tokens"] == 4
        assert r["threads"] == 1 and r["peak_cuda_mib"] is None and r["repeats"] == 2
        for key in ("decode_tok_s", "e2e_tok_s", "ttft_ms"):
            assert 0 < r[f"{key}_min"] <= r[key] <= r[f"{key}_max"], (key, r)
        assert r["aggregate_tok_s"] == pytest.approx(r["decode_tok_s"] * r["batch"])
        assert r["peak_rss_mib"] >= r["rss_before_load_mib"] > 0
        assert r["footprint_mib"] > 0 and r["load_seconds"] > 0
        assert r["adapter"] == (r["variant"] == "base+adapter")
    md = res.out.benchmark_md.read_text(encoding="utf-8")
    assert md == res.summary and "| base+adapter | static | 2 |" in md
    assert "decode tok/s per seq" in md and "median (min–max) of 2 runs" in md
    assert {"base_static_b1_decode_tok_s", "base_plus_adapter_generate_b2_aggregate_tok_s",
            "base_peak_rss_mib", "base_plus_adapter_footprint_mib"} <= set(res.metrics)


def test_batches_cycle_the_prompts():
    assert batches([1, 2, 3], 1) == [[1], [2], [3]]
    assert batches([1, 2, 3], 2) == [[1, 2], [3, 1]]
    assert batches([1, 2], 8) == [[1, 2, 1, 2, 1, 2, 1, 2]]


def test_benchmark_bad_spec(tmp_path):
    cfg = BenchmarkConfig(device="cpu", prompts=1, new_tokens=2)
    with pytest.raises(DataError, match=r"nope: benchmark variant 'x': model folder not found"):
        run_benchmark({"x": ModelSpec(tmp_path / "nope")}, PROMPTS, cfg)
    with pytest.raises(DataError, match=r"gone: benchmark variant 'x': adapter folder not found"):
        run_benchmark({"x": ModelSpec(tmp_path, adapter=tmp_path / "gone")}, PROMPTS, cfg)


def test_a_variant_that_fails_is_a_row_and_the_others_are_measured(tmp_path):
    """A variant whose process fails (here: weights that are not a safetensors file, found only
    when its process loads them) is a row with its error; the others keep their figures. Only
    when every variant failed does the stage fail."""
    base, _ = make_all(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in Path(base).iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file" * 100)
    cfg = BenchmarkConfig(device="cpu", prompts=1, new_tokens=2, warmup=0, cpu_threads=1,
                          batch_sizes=[1], engines=["static"], repeats=1)
    res = run_benchmark({"base": ModelSpec(base), "broken": ModelSpec(broken)}, PROMPTS, cfg)
    assert [r.variant for r in read_rows(res.out.benchmark_json)] == ["base"]
    [failed] = read_json(res.out.failed_json)
    assert failed["variant"] == "broken" and failed["round"] == 0
    assert "Error" in failed["error"].split(":")[0], failed
    md = res.out.benchmark_md.read_text(encoding="utf-8")
    assert "| broken | failed (round 1): " in md and "| base | static | 1 |" in md
    assert res.metrics["failed_variant_runs"] == 1.0 and "base_static_b1_decode_tok_s" in \
        res.metrics
    with pytest.raises(RuntimeError, match=r"every variant failed: broken: "):
        run_benchmark({"broken": ModelSpec(broken)}, PROMPTS, cfg)
