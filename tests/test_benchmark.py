"""benchmark: two variants of a tiny Llama, each measured in its own process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_model import make_all  # noqa: E402

from tasks.common import DataError, read_json  # noqa: E402
from tasks.benchmark import metric_key, run_benchmark  # noqa: E402
from tasks.config import BenchmarkConfig  # noqa: E402

PROMPTS = [[{"role": "user", "content": "绿萝叶子发黄怎么办？"}],
           [{"role": "user", "content": "多肉植物需要阳光吗？"}]]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))


def test_metric_key():
    assert metric_key("base+adapter") == "base_plus_adapter"
    assert metric_key("int4 (nf4)") == "int4__nf4_"


def test_benchmark_two_variants(tmp_path):
    base, adapter = make_all(tmp_path)
    cfg = BenchmarkConfig(device="cpu", prompts=1, new_tokens=4, warmup=1, cpu_threads=1)
    res = run_benchmark({"base": {"path": base}, "base+adapter": {"path": base,
                                                                 "adapter": adapter}},
                        PROMPTS, cfg)
    rows = read_json(res.file("benchmark.json"))
    assert rows == res.info["rows"] and [r["variant"] for r in rows] == ["base", "base+adapter"]
    for r in rows:
        assert r["device"] == "cpu" and r["prompts"] == 1 and r["new_tokens"] == 4
        assert r["threads"] == 1 and r["peak_cuda_mib"] is None
        assert r["decode_tok_s"] > 0 and r["e2e_tok_s"] > 0 and r["ttft_ms"] > 0
        assert r["peak_rss_mib"] >= r["rss_before_load_mib"] > 0
        assert r["footprint_mib"] > 0 and r["load_seconds"] > 0
    assert rows[1]["adapter"] and not rows[0]["adapter"]
    md = res.file("benchmark.md").read_text(encoding="utf-8")
    assert md == res.info["table"] and "| base+adapter |" in md and "decode tok/s" in md
    assert set(res.metrics) == {f"{v}_{m}" for v in ("base", "base_plus_adapter")
                                for m in ("decode_tok_s", "peak_rss_mib", "footprint_mib")}


def test_benchmark_bad_spec(tmp_path):
    cfg = BenchmarkConfig(device="cpu", prompts=1, new_tokens=2)
    with pytest.raises(DataError, match="not found"):
        run_benchmark({"x": {"path": tmp_path / "nope"}}, PROMPTS, cfg)
    with pytest.raises(ValueError, match="may carry only"):
        run_benchmark({"x": {"path": tmp_path, "bits": 4}}, PROMPTS, cfg)
