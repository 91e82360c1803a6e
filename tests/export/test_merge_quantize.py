"""merge + quantize on a tiny Llama and a real (perturbed) LoRA adapter."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from _tiny_model import make_all, make_base  # noqa: E402

from tasks.runtime.errors import DataError  # noqa: E402
from tasks.config import QuantizeConfig, TrainConfig  # noqa: E402
from tasks.export.merge import PROBE, merge_adapter, probe_ids  # noqa: E402
from tasks.model.modeling import generate, load_model, load_tokenizer  # noqa: E402
from tasks.export.quantize import quantize_int4  # noqa: E402
from tasks.train.train import _load_for_training  # noqa: E402


@pytest.fixture(autouse=True)
def home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path_factory.mktemp("home")))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(tmp_path_factory.mktemp("merge-home")))
        yield merge_adapter(*tiny)


@torch.inference_mode()
def _logits(model, tok):
    return model(input_ids=probe_ids(tok, PROBE)).logits


def test_merge_equals_base_plus_adapter(tiny, merged):
    base, adapter = tiny
    out = Path(merged.path)
    assert merged.stage == "merge" and merged.digest == out.name
    for name in ("model.safetensors", "config.json", "generation_config.json",
                 "tokenizer.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(out.glob("adapter_*"))              # a plain model, no peft leftovers

    tok = load_tokenizer(out)
    merged_logits = _logits(load_model(out), tok)
    with_adapter = _logits(load_model(base, adapter=adapter), tok)
    plain_base = _logits(load_model(base), tok)
    assert torch.allclose(merged_logits, with_adapter, atol=1e-4)
    assert (merged_logits - plain_base).abs().max() > 1e-2       # the adapter did something
    assert merged.metrics["merge_max_abs_logit_diff"] < 1e-4
    assert merged.metrics["params"] == sum(p.numel() for p in load_model(out).parameters())
    assert merged.metrics["size_mb"] > 0
    assert generate(load_model(out), tok, [[{"role": "user", "content": "绿萝"}]], 4)


def test_merge_bad_inputs(tiny, tmp_path):
    base, adapter = tiny
    with pytest.raises(DataError, match="adapter_config.json"):
        merge_adapter(base, tmp_path)
    with pytest.raises(DataError, match="config.json"):
        merge_adapter(tmp_path, adapter)


def test_quantize_saves_reloads_and_generates(merged):
    res = quantize_int4(merged.path, QuantizeConfig())
    out = Path(res.path)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["load_in_4bit"] and qc["bnb_4bit_quant_type"] == "nf4"
    assert qc["bnb_4bit_use_double_quant"] is True
    assert res.metrics["reload_ok"] == 1.0
    assert 0 < res.metrics["size_ratio_vs_merged"] < 1
    assert 0.5 <= res.metrics["int4_top1_agreement"] <= 1.0
    assert res.info["sample"].strip()
    # the saved folder is a real 4-bit model that loads and generates on its own
    model = load_model(out)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    assert generate(model, load_tokenizer(out), [[{"role": "user", "content": "浇水"}]], 4)
    with pytest.raises(DataError, match="already quantized"):
        quantize_int4(out, QuantizeConfig())


def test_a_width_bitsandbytes_cannot_pack_still_quantizes_and_answers(tmp_path):
    """A user's model whose layers are 96 wide: on a CPU with AVX512-BF16 (CI's, 2026-12-01),
    bitsandbytes' fast 4-bit kernel fails on it at the first answer; those layers keep the
    generic path there, and on every CPU `load_model` marks them so."""
    base = make_base(tmp_path / "base96", hidden_size=96)
    res = quantize_int4(base, QuantizeConfig())
    assert res.metrics["reload_ok"] == 1.0 and res.info["sample"].strip()
    model = load_model(res.path)
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    narrow = [m for m in layers if m.in_features == 96]              # q/k/v/o, gate/up
    assert narrow and not any(m.support_avx512bf16_for_cpu for m in narrow)
    assert generate(model, load_tokenizer(res.path), [[{"role": "user", "content": "浇水"}]], 4)

    # QLoRA on it: the dev evaluation (no gradients, the kernel's trigger), then a training step
    qlora, _ = _load_for_training(str(base), TrainConfig(method="qlora"), "cpu")
    x = torch.tensor([load_tokenizer(base).encode("绿萝叶子发黄怎么办？浇水不要太多。How often?")])
    qlora.eval()
    with torch.no_grad():
        qlora(input_ids=x)
    qlora.train()
    qlora(input_ids=x, labels=x).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in qlora.parameters())
