"""Stage "train": assistant-only label masking, padding-free packing, and real LoRA / QLoRA runs
on a tiny base."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from transformers import AutoTokenizer, DataCollatorForSeq2Seq, DataCollatorWithFlattening

from tasks.runtime.errors import DataError
from tasks.config import TrainConfig
from tasks.config.methods import METHODS
from tasks.export.merge import merge_adapter
from tasks.model.modeling import DEFAULT_CHAT_TEMPLATE, generate, load_model, load_tokenizer
from tasks.train.train import IGNORE, _load_for_training, encode_conversation, train_adapter
from tasks.train.train_data import encode_file
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MULTI_TURN = [{"role": "system", "content": "你是园艺助手。"},
              {"role": "user", "content": "绿萝叶子发黄怎么办？"},
              {"role": "assistant", "content": "减少浇水，放到散射光处。"},
              {"role": "user", "content": "多久浇一次？"},
              {"role": "assistant", "content": "见干见湿，约一周一次。"}]


pytestmark = [pytest.mark.long, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def data(tiny_base) -> dict[str, Path]:
    return tiny_base


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _learned_spans(enc: dict) -> list[list[int]]:
    spans, cur = [], []
    for tok_id, label in zip(enc["input_ids"], enc["labels"]):
        if label == IGNORE:
            if cur:
                spans.append(cur)
            cur = []
        else:
            assert label == tok_id
            cur.append(tok_id)
    return spans + ([cur] if cur else [])


def test_only_assistant_turns_and_their_eos_are_learned(data):
    tok = load_tokenizer(data["base"])
    enc = encode_conversation(tok, MULTI_TURN, max_length=512)
    assert not enc["truncated"] and len(enc["input_ids"]) == len(enc["labels"])
    assert enc["input_ids"] == tok.apply_chat_template(MULTI_TURN, return_dict=False)
    spans = _learned_spans(enc)
    assert [tok.decode(s) for s in spans] == ["减少浇水，放到散射光处。</s>",
                                              "见干见湿，约一周一次。</s>"]
    assert all(s[-1] == tok.eos_token_id for s in spans)
    masked = [t for t, lab in zip(enc["input_ids"], enc["labels"]) if lab == IGNORE]
    assert tok.decode(masked) == ("<|system|>\n你是园艺助手。<|user|>\n绿萝叶子发黄怎么办？"
                                  "<|assistant|>\n<|user|>\n多久浇一次？<|assistant|>\n")

    cut = encode_conversation(tok, MULTI_TURN, max_length=20)
    assert cut["truncated"] and len(cut["input_ids"]) == len(cut["labels"]) == 20
    assert cut["labels"] == enc["labels"][:20]


def test_masking_follows_any_chat_template(data):
    """Another template (ChatML, as Qwen): its end-of-turn marker is learned, its headers not."""
    tok = load_tokenizer(data["base"])
    tok.chat_template = CHATML
    enc = encode_conversation(tok, {"conversations": MULTI_TURN}, max_length=512)
    assert [tok.decode(s) for s in _learned_spans(enc)] == [
        "减少浇水，放到散射光处。<|im_end|>\n", "见干见湿，约一周一次。<|im_end|>\n"]


def test_packed_batch_has_the_loss_of_the_padded_batch(data):
    """Padding-free packing is only a layout: one row of examples back to back, with position
    ids restarting per example, must give the padded batch's loss -- transformers keeps the
    attention within each example. Without the position ids it would not (examples would see
    each other), which is what this test would catch."""
    tok = load_tokenizer(data["base"])
    tok.padding_side = "right"
    examples, _, _ = encode_file(tok, data["train"], max_length=96)
    batch = sorted(examples[:8], key=lambda e: len(e["input_ids"]))[::3]   # unequal lengths
    assert len({len(e["input_ids"]) for e in batch}) > 1
    model = load_model(data["base"]).eval()
    model.config.use_cache = False  # as train.py does: with a KV cache, packed rows go unseen
    padded = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)(batch)
    packed = DataCollatorWithFlattening(separator_id=IGNORE)(batch)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].numel() == sum(len(e["input_ids"]) for e in batch) \
        < padded["input_ids"].numel()
    with torch.no_grad():
        loss_padded = model(**padded).loss
        loss_packed = model(**packed).loss
        leaky = model(input_ids=packed["input_ids"], labels=packed["labels"]).loss
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-5, atol=1e-5)
    assert abs(leaky - loss_padded) > 1e-3


def test_packing_and_checkpointing_are_refused_for_ptuning():
    with pytest.raises(ValueError, match="train.packing does not work with ptuning"):
        TrainConfig(method="ptuning", packing=True)
    with pytest.raises(ValueError, match="train.gradient_checkpointing does not work with ptuning"):
        TrainConfig(method="ptuning", gradient_checkpointing=True)


@pytest.mark.parametrize("method,packing", [("lora", False), ("qlora", False), ("lora", True)])
def test_train_adapter_lowers_dev_loss(data, home, method, packing, caplog):
    cfg = TrainConfig(method=method, epochs=4, batch_size=8, learning_rate=1e-2, lora_r=8,
                      lora_alpha=16, max_length=96, eval_steps=8, packing=packing)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        res = train_adapter(data["base"], data["train"], data["dev"], cfg)
    out = Path(res.path)
    assert res.stage == "train" and out.parent == home / "outputs" / "train"
    assert res.problem() is None
    for name in ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                 "chat_template.jinja", "train_log.json"]:
        assert (out / name).is_file(), name
    m = res.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"] - 0.1, m
    assert m["perplexity_after"] < m["perplexity_before"]
    assert 0 < m["trainable_params"] < m["total_params"] and 0 < m["trainable_percent"] < 100
    assert m["train_tokens_per_s"] > 0 and m["train_seconds"] > 0 and m["train_loss"] > 0
    assert m["truncated_examples"] >= 0 and m["packing"] == packing
    if packing:                 # no pad token trained on (up to the last partial epoch)
        assert m["padding_fraction"] < 0.01, m
    else:                       # 96 chats of unequal length, padded per batch of 8
        assert 0.05 < m["padding_fraction"] < 0.9, m
    assert res.info["method"] == method
    log = res.history
    evals = [h for h in log if "eval_loss" in h]
    assert evals[0]["step"] == 0 and len(evals) >= 3
    # the dev set is evaluated once after the last step (by the Trainer), not again after it
    last = f"step {m['global_step']:.0f}/{m['global_step']:.0f} "
    assert len([r for r in caplog.records if r.getMessage().startswith(last)
                and "eval_loss" in r.getMessage()]) == 1
    assert m["eval_loss_after"] == pytest.approx(evals[-1]["eval_loss"], abs=1e-5)
    assert any("loss" in h for h in log) and all(isinstance(h["step"], int) for h in log)

    tok = load_tokenizer(out)
    model = load_model(data["base"], adapter=out)
    [answer] = generate(model, tok, [[{"role": "user", "content": "绿萝叶子发黄怎么办？"}]],
                        max_new_tokens=16)
    assert answer.strip()


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.lora])
def test_dora_and_rslora_are_settings_of_the_lora_methods(data, home, method):
    """DoRA (QDoRA with qlora) and rsLoRA are two fields of the LoRA methods, not methods: the
    adapter has DoRA's magnitude vectors and rsLoRA's scale, learns, and merges into the base
    with the logits checked by the merge stage."""
    cfg = TrainConfig(method=method, epochs=4, batch_size=8, learning_rate=1e-2, lora_r=8,
                      lora_alpha=16, max_length=96, eval_steps=8, use_dora=True,
                      use_rslora=True)
    res = train_adapter(data["base"], data["train"], data["dev"], cfg)
    saved = json.loads((Path(res.path) / "adapter_config.json").read_text(encoding="utf-8"))
    assert saved["use_dora"] is True and saved["use_rslora"] is True
    from safetensors import safe_open

    with safe_open(Path(res.path) / "adapter_model.safetensors", "pt") as f:
        assert any("lora_magnitude_vector" in key for key in f.keys())
    assert res.metrics["eval_loss_after"] < res.metrics["eval_loss_before"] - 0.1, res.metrics
    merged = merge_adapter(data["base"], res.path)
    assert merged.metrics["merge_relative_logit_error"] < 1e-4, merged.metrics
    plain = TrainConfig(method=method, lora_r=8, lora_alpha=16)
    assert METHODS[method].peft_config(plain, 64).use_dora is False    # off by default


def test_dora_and_rslora_are_refused_where_there_is_no_lora():
    for method in (m for m, spec in METHODS.items() if not spec.lora):
        with pytest.raises(ValueError, match="train.use_dora is a LoRA setting"):
            TrainConfig(method=method, use_dora=True)


def test_the_step_line_shows_a_small_learning_rate_as_it_is(caplog):
    """A DPO learning rate of 5e-06 was logged as 0.0 (rounded to five decimals)."""
    from types import SimpleNamespace

    from tasks.train.train_control import ProgressLog

    state = SimpleNamespace(global_step=3, max_steps=10, is_world_process_zero=True)
    with caplog.at_level(logging.INFO, logger="tasks.train"):
        ProgressLog().on_log(None, state, None, logs={"loss": 0.6931472, "learning_rate": 5e-6})
    assert "step 3/10 {'loss': 0.693147, 'learning_rate': 5e-06}" in caplog.text


def test_an_answer_scored_after_a_history_counts_only_its_own_tokens(data):
    """Preference accuracy scores the answer's tokens: an earlier assistant turn in the
    prompt's history is context, not part of the answer (encode_conversation
    last_turn_only)."""
    from tasks.evaluate.preference_eval import answer_logps

    question = [{"role": "user", "content": "绿萝叶子发黄怎么办？"}]
    history = [{"role": "user", "content": "你好"},
               {"role": "assistant", "content": "你好，请问有什么可以帮你？"}]
    pairs = [{"prompt": p, "chosen": "少浇水。", "rejected": "多晒太阳，别浇太多水。"}
             for p in (question, history + question)]
    logps = answer_logps(load_model(data["base"]), load_tokenizer(data["base"]), pairs)
    counts = logps[..., 1]
    assert torch.equal(counts[0], counts[1]) and counts[0, 0] < counts[0, 1], counts
    assert not logps.requires_grad          # scored without autograd (torch.inference_mode)


def test_qlora_gradients_survive_an_eval_pass(data):
    """bitsandbytes 0.50 repacks 4-bit weights at the first CPU eval forward; training after the
    dev eval must still backpropagate through the base layers."""
    cfg = TrainConfig(method="qlora", lora_dropout=0.0)
    model, _ = _load_for_training(str(data["base"]), cfg, "cpu")
    x = torch.tensor([[5, 7, 40, 41, 42, 43, 6, 7, 44, 45, 2]])

    def grads() -> torch.Tensor:
        model.train()
        model.zero_grad()
        model(input_ids=x, labels=x).loss.backward()
        return torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                          if p.requires_grad and "layers.0." in n and "lora_B" in n])

    before = grads()
    assert before.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        model(input_ids=x)
    torch.testing.assert_close(grads(), before, rtol=1e-3, atol=1e-6)


def test_train_refuses_a_bad_dev_file(data, tmp_path):
    bad = tmp_path / "dev.json"
    bad.write_text(json.dumps([{"conversations": [{"role": "user", "content": "只有问题"}]}],
                              ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="dev.json"):
        train_adapter(data["base"], data["train"], bad, TrainConfig())


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items()
                                    if spec.gradient_checkpointing])
def test_gradient_checkpointing_gives_the_same_gradients(data, method):
    """train.gradient_checkpointing recomputes activations instead of storing them: the
    gradients of the trained parameters must not change."""
    x = torch.tensor([[5, 7, 40, 41, 42, 43, 6, 7, 44, 45, 2]])
    grads = {}
    for on in (False, True):
        torch.manual_seed(0)
        cfg = TrainConfig(method=method, lora_dropout=0.0, gradient_checkpointing=on)
        model, _ = _load_for_training(str(data["base"]), cfg, "cpu")
        assert model.get_base_model().is_gradient_checkpointing == on
        model.train()
        model(input_ids=x, labels=x).loss.backward()
        grads[on] = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    assert grads[False].abs().sum() > 0
    torch.testing.assert_close(grads[True], grads[False], rtol=1e-4, atol=1e-6)


def test_a_model_without_chat_template_gets_the_default_one(data, tmp_path, home):
    """A base (not chat) model ships no template: the stage uses DEFAULT_CHAT_TEMPLATE, still
    learns only the answers, and saves the template with the adapter."""
    plain = tmp_path / "plain-base"
    shutil.copytree(data["base"], plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg_file = plain / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    cfg_file.write_text(json.dumps(cfg), encoding="utf-8")
    assert not AutoTokenizer.from_pretrained(str(plain)).chat_template

    tok = load_tokenizer(plain)
    assert tok.chat_template == DEFAULT_CHAT_TEMPLATE
    enc = encode_conversation(tok, {"conversations": MULTI_TURN}, max_length=512)
    assert [tok.decode(s).strip() for s in _learned_spans(enc)] == [
        "减少浇水，放到散射光处。</s>", "见干见湿，约一周一次。</s>"]
    res = train_adapter(plain, data["train"], data["dev"], TrainConfig(
        epochs=1, batch_size=16, max_length=96, eval_steps=50, sanity_examples=1))
    assert AutoTokenizer.from_pretrained(res.path).chat_template == DEFAULT_CHAT_TEMPLATE
    merged = merge_adapter(plain, res.path, "float32")          # served as it was trained
    assert AutoTokenizer.from_pretrained(merged.path).chat_template == DEFAULT_CHAT_TEMPLATE


def test_gradient_checkpointing_default_follows_the_memory_estimate():
    """Off where a full batch's activations fit easily (the sample at 6 B on an H200), on where
    they would not (a 7 B model at 8 x 512 tokens on a 24 GB card); off on a CPU."""
    from transformers import LlamaConfig

    from tasks.train.train import activation_bytes, checkpointing_needed, gradient_checkpointing

    six_b = LlamaConfig(hidden_size=4096, num_hidden_layers=28, vocab_size=65024)
    seven_b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000)
    assert activation_bytes(seven_b, 2 * 512) == 2 * activation_bytes(seven_b, 512)
    assert not checkpointing_needed(six_b, 8 * 160, 130 << 30)
    assert checkpointing_needed(seven_b, 8 * 512, 20 << 30)
    assert not gradient_checkpointing(TrainConfig(method="qlora"), "cpu")
    assert gradient_checkpointing(TrainConfig(method="qlora", gradient_checkpointing=True), "cpu")

