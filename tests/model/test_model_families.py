"""Every method on a tiny random model of each native transformers family the pipeline is
tested with (README "Which models"): LoRA, QLoRA and P-Tuning v2 train on it, lower nothing
they should not, and the adapted model answers through the pipeline's own generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from tasks.config import TrainConfig
from tasks.config.methods import METHODS
from tasks.model.modeling import generate, load_tokenizer
from tasks.model.model_spec import ModelSpec
from tasks.train.train import train_adapter
from tests._tiny_model import make_tokenizer

pytestmark = [pytest.mark.long, pytest.mark.usefixtures("one_torch_thread")]
#: widths bitsandbytes' 4-bit CPU kernels take (multiples of 64 in, 32 out)
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
FAMILIES = {
    "llama": ("LlamaConfig", {}), "mistral": ("MistralConfig", {}), "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}), "glm": ("GlmConfig", {"head_dim": 16}),
    "glm4": ("Glm4Config", {"head_dim": 16}), "phi3": ("Phi3Config", {}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}), "olmo2": ("Olmo2Config", {}),
}


@pytest.fixture(scope="module")
def data(tiny_base, tmp_path_factory) -> dict[str, Path]:
    """24 training and 8 dev conversations of the tiny base's split."""
    root = tmp_path_factory.mktemp("family-data")
    out = {}
    for split, n in (("train", 24), ("dev", 8)):
        records = json.loads(tiny_base[split].read_text(encoding="utf-8"))[:n]
        out[split] = root / f"{split}.json"
        out[split].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    tok, out = make_tokenizer(), {}
    for family, (config_class, extra) in FAMILIES.items():
        torch.manual_seed(0)
        config = getattr(transformers, config_class)(
            vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **SIZES, **extra)
        model = transformers.AutoModelForCausalLM.from_config(config)
        out[family] = root / family
        model.save_pretrained(out[family])
        tok.save_pretrained(out[family])
    return out


def family_method_cases():
    """Every (family, method). The inner loop (`make test-fast`) runs a diagonal of them, every
    family and every method at least once; `make test` runs the whole matrix."""
    for i, family in enumerate(FAMILIES):
        for j, method in enumerate(METHODS):
            yield pytest.param(family, method, id=f"{family}-{method}",
                               marks=() if j == i % len(METHODS) else pytest.mark.slow)


@pytest.mark.parametrize("family, method", list(family_method_cases()))
def test_every_method_trains_and_answers_on_each_family(bases, data, family, method,
                                                         tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    cfg = TrainConfig(method=method, epochs=2, batch_size=8, max_length=48, eval_steps=1000,
                      sanity_examples=0)
    result = train_adapter(bases[family], data["train"], data["dev"], cfg)
    m = result.metrics
    assert m["global_step"] == 6 and m["eval_loss_after"] < m["eval_loss_before"]
    spec = ModelSpec(str(bases[family]), "float32", adapter=result.path,
                     quantization=METHODS[method].serving_quantization(cfg))
    answer = generate(spec.load("cpu"), load_tokenizer(spec.tokenizer_dir()),
                      [[{"role": "user", "content": "绿萝叶子发黄怎么办？"}]], max_new_tokens=4)
    assert len(answer) == 1 and isinstance(answer[0], str)
