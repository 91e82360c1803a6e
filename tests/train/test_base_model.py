"""Stage "base": tokenizer, chat template, a tiny real build that loads and generates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tasks.train.base_model import (
    CHAT_TEMPLATE,
    ROLE_TOKENS,
    build_base_model,
    make_tokenizer,
    resolve_base_model,
    train_sentencepiece,
)
from tasks.runtime.errors import DataError
from tasks.runtime.files import digest_path
from tasks.config import BaseModelConfig
from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.data.qa_text import read_qa_text
from tasks.model.modeling import generate, load_model, load_tokenizer, prompt_ids

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample" / "plant_care_qa.txt"
CJK = re.compile(r"[\u4e00-\u9fff]")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def split() -> tuple[list, list]:
    convs = [qa_to_conversation(r["q"], r["a"]) for r in read_qa_text(SAMPLE)]
    return split_train_dev(convs, 0.7)


@pytest.fixture(scope="module")
def tokenizer(split):
    texts = [t["content"] for c in split[0] for t in c["conversations"]]
    sp_model, _ = train_sentencepiece(texts, 300)
    return make_tokenizer(sp_model)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_tokenizer_round_trips_unseen_text_and_keeps_specials_atomic(tokenizer, split):
    dev_texts = [t["content"] for c in split[1] for t in c["conversations"]]
    for text in dev_texts + ["罕见字：龘麤靐 pH 6.5, 25°C!\n第二行 😀"]:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids) == text
    for t in ["<s>", "</s>", "<pad>", "<unk>", *ROLE_TOKENS, "\n"]:
        ids = tokenizer(t, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids[0]) == t
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
            tokenizer.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id,
                tokenizer.unk_token_id}) == 4


def test_vocab_size_is_clamped_to_the_corpus(split):
    texts = [t["content"] for c in split[0][:20] for t in c["conversations"]]
    chars = len(set("".join(texts)))
    _, small = train_sentencepiece(texts, 300)          # too small for full coverage: raised
    assert small > chars + 256
    _, big = train_sentencepiece(texts, 50_000)         # more than 20 records can fill: lowered
    assert big < 50_000


def test_chat_template_format_and_prefix_consistency(tokenizer):
    conv = [{"role": "system", "content": "你是园艺助手。"},
            {"role": "user", "content": "绿萝叶子发黄怎么办？"},
            {"role": "assistant", "content": "减少浇水，放到散射光处。"},
            {"role": "user", "content": "多久浇一次？"},
            {"role": "assistant", "content": "见干见湿，约一周一次。"}]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    assert text == ("<|system|>\n你是园艺助手。<|user|>\n绿萝叶子发黄怎么办？<|assistant|>\n"
                    "减少浇水，放到散射光处。</s><|user|>\n多久浇一次？<|assistant|>\n"
                    "见干见湿，约一周一次。</s>")
    assert tokenizer.apply_chat_template(conv[:2], tokenize=False,
                                         add_generation_prompt=True).endswith("<|assistant|>\n")
    full = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=False)
    for k in range(1, len(conv) + 1):
        gen = k < len(conv) and conv[k]["role"] == "assistant"
        ids = tokenizer.apply_chat_template(conv[:k], tokenize=True, return_dict=False,
                                            add_generation_prompt=gen)
        assert full[:len(ids)] == ids, f"prefix of {k} turns is not a token prefix"
    with pytest.raises(Exception, match="unknown role"):
        tokenizer.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    assert "eos_token" in CHAT_TEMPLATE


def test_build_tiny_base_model_loads_and_generates_chinese(split, tmp_path, home):
    train_json = tmp_path / "train.json"
    train_json.write_text(json.dumps(split[0][:80], ensure_ascii=False), encoding="utf-8")
    cfg = BaseModelConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=2,
                          max_seq_len=64, pretrain_epochs=10, learning_rate=5e-3)
    res = build_base_model(train_json, cfg)
    out = Path(res.path)
    assert res.stage == "base" and out.parent == home / "outputs" / "base"
    assert res.digest == out.name == digest_path(out) and res.problem() is None
    for name in ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json"]:
        assert (out / name).is_file(), name
    gen_cfg = json.loads((out / "generation_config.json").read_text())
    assert (gen_cfg["bos_token_id"], gen_cfg["eos_token_id"], gen_cfg["pad_token_id"]) == (1, 2, 3)
    m = res.metrics
    assert 0 < m["params"] < 1e6 and m["vocab_size"] > 300
    assert m["pretrain_loss_last"] < m["pretrain_loss_first"]
    curve = res.history
    assert curve[0]["step"] == 1 and len(curve) == curve[-1]["step"] > 4

    tok = load_tokenizer(out)
    model = load_model(out)
    assert model.config.max_position_embeddings >= 512 and model.config.tie_word_embeddings
    assert tok.chat_template and tok.eos_token_id == model.config.eos_token_id
    prompt = [{"role": "user", "content": split[1][0]["conversations"][0]["content"]}]
    assert prompt_ids(tok, prompt)[-2:] == tok.convert_tokens_to_ids(["<|assistant|>", "\n"])
    [answer] = generate(model, tok, [prompt], max_new_tokens=12)
    assert CJK.search(answer), answer



def test_build_refuses_a_malformed_train_file(tmp_path):
    bad = tmp_path / "train.json"
    bad.write_text(json.dumps([{"conversations": [{"role": "user", "text": "缺内容"}]}]),
                   encoding="utf-8")
    with pytest.raises(DataError, match="train.json"):
        build_base_model(bad, BaseModelConfig())


def test_resolve_base_model(tmp_path):
    assert resolve_base_model(BaseModelConfig()) is None
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    res = resolve_base_model(BaseModelConfig(path=str(folder)))
    assert res.path == str(folder) and res.digest == digest_path(folder)
    hub = resolve_base_model(BaseModelConfig(path="Qwen/Qwen2.5-0.5B-Instruct"))
    assert hub.path == "Qwen/Qwen2.5-0.5B-Instruct" and hub.info["source"] == "hub"
    assert hub.digest != resolve_base_model(BaseModelConfig(path="Qwen/Qwen2.5-1.5B")).digest
    with pytest.raises(DataError, match="no such model folder"):
        resolve_base_model(BaseModelConfig(path=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no config.json"):
        resolve_base_model(BaseModelConfig(path=str(tmp_path / "empty")))
