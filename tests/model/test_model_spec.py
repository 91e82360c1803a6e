"""ModelSpec (tasks/model/model_spec.py): one type for "which model, loaded how" across the
benchmark,
report and gate stages, and its place in their cache keys."""

from __future__ import annotations

import pytest

from flows.caching import fingerprint
from tasks.runtime.errors import DataError
from tasks.config.methods import FourBit
from tasks.model.model_spec import ModelSpec


def test_the_tokenizer_comes_from_an_adapter_that_carries_one(tmp_path):
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    spec = ModelSpec(base, adapter=adapter)
    assert spec.tokenizer_dir() == str(base)                  # an adapter without a tokenizer
    (adapter / "tokenizer_config.json").write_text("{}")
    assert spec.tokenizer_dir() == str(adapter)
    assert ModelSpec(base).tokenizer_dir() == str(base)


def test_a_missing_folder_is_named(tmp_path):
    with pytest.raises(DataError, match=r"/nope: report: model folder not found"):
        ModelSpec(tmp_path / "nope").check("report")
    with pytest.raises(DataError, match=r"/gone: report: adapter folder not found"):
        ModelSpec(tmp_path, adapter=tmp_path / "gone").check("report")
    assert ModelSpec(tmp_path).check("report") == ModelSpec(tmp_path)


def test_outputs_describe_the_model_without_its_digest():
    spec = ModelSpec("/m", "bfloat16", adapter="/a", quantization=FourBit(), digest="d" * 32)
    assert spec.describe() == {"path": "/m", "dtype": "bfloat16", "adapter": "/a",
                               "quantization": {"quant_type": "nf4", "double_quant": True,
                                                "compute_dtype": "float32"}}
    assert ModelSpec("/m").describe() == {"path": "/m", "dtype": "float32"}
    assert spec.label() == "/m + adapter /a (4-bit)"


def test_the_cache_key_follows_digest_dtype_and_quantization():
    spec = ModelSpec("/m", "float32", digest="a")
    assert fingerprint(spec) == fingerprint(ModelSpec("/m", "float32", digest="a"))
    for other in (ModelSpec("/m", "float32", digest="b"), ModelSpec("/m", "bfloat16", digest="a"),
                  ModelSpec("/m", "float32", digest="a", quantization=FourBit())):
        assert fingerprint(other) != fingerprint(spec), other
