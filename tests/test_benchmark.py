"""benchmark: two variants of a tiny Llama, each measured in its own process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_model import make_all  # noqa: E402

from tasks.common import DataError, read_json  # noqa: E402
from tasks.benchmark import batches, metric_key, run_benchmark  # noqa: E402
from tasks.config import BenchmarkConfig  # noqa: E402
from tasks.model_spec import ModelSpec  # noqa: E402

PROMPTS = [[{"role": "user", "content": "绿萝叶子发黄怎么办？"}],
           [{"role": "user", "content": "多肉植物需要阳光吗？"}]]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))


def test_metric_key():
    assert metric_key("base+adapter") == "base_plus_adapter"
    assert metric_key("int4 (nf4)") == "int4__nf4_"


@pytest.mark.slow                           # four fresh processes, ~10 s each to start here
def test_benchmark_two_variants(tmp_path):
    base, adapter = make_all(tmp_path)
    cfg = BenchmarkConfig(device="cpu", prompts=2, new_tokens=4, warmup=1, cpu_threads=1,
                          batch_sizes=[1, 2], repeats=2)
    res = run_benchmark({"base": ModelSpec(base), "base+adapter": ModelSpec(base,
                                                                          adapter=adapter)},
                        PROMPTS, cfg)
    rows = read_json(res.file("benchmark.json"))
    assert rows == res.info["rows"]
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
    md = res.file("benchmark.md").read_text(encoding="utf-8")
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
