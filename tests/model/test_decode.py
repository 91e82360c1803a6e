"""The fast decode loop (tasks/model/decode.py) against HF `generate`, the reference: on the same
model the static-cache loop must produce the same greedy tokens, alone and in a left-padded batch,
for a plain model and for a base + LoRA adapter (the benchmark's "base+adapter" variant); with stop
ids it ends early and loses nothing before them; answers in batches are the answers one at a
time, in the prompts' order; with its layers compiled it gives the same tokens and compiles one
layer for all."""

from __future__ import annotations

import shutil

import pytest
import torch

from tasks.model.decode import STOP_CHECK_STEPS, Compile, StaticDecoder, cut_at_eos, \
    decoder_layers, left_pad
from tasks.model.modeling import answer, generate_ids, load_model, load_tokenizer, prompt_ids
from tests._tiny_model import make_all

pytestmark = pytest.mark.usefixtures("one_torch_thread")
QUESTIONS = ["绿萝叶子发黄怎么办？", "多肉植物需要充足的阳光。", "How often should I water?"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base, adapter = make_all(tmp_path_factory.mktemp("decode"))
    tok = load_tokenizer(base)
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) > 1          # unequal lengths: padding is exercised
    return {"base": base, "adapter": adapter, "tok": tok, "prompts": prompts}


def reference(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = generate_ids(model, ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "lora"])
def test_static_loop_gives_generates_greedy_tokens(tiny, adapter):
    model = load_model(tiny["base"], adapter=tiny["adapter"] if adapter else None)
    n = 12
    want = [reference(model, p, n) for p in tiny["prompts"]]
    decoder = StaticDecoder(model, batch_size=4, max_len=64)
    for prompt, expected in zip(tiny["prompts"], want):           # one at a time ...
        ids, mask = left_pad([prompt], pad_id=0)
        got = decoder.decode(ids, mask, n).tokens[0].tolist()
        # generate stops at EOS; the static loop runs on: compare up to generate's stop
        assert got[:len(expected)] == expected
    ids, mask = left_pad(tiny["prompts"], pad_id=0)                 # ... and as one batch
    out = decoder.decode(ids, mask, n)
    assert out.tokens.shape == (3, n) and out.first_token_s > 0 and out.decode_s > 0
    for row, expected in zip(out.tokens.tolist(), want):
        assert row[:len(expected)] == expected


@pytest.mark.slow                    # Inductor compiles C++ kernels for the CPU: ~30 s
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="Inductor compiles CPU kernels with a C++ compiler")
def test_compiled_layers_give_the_same_tokens_and_inductor_compiles_one_layer(
        tiny, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))   # a cold cache
    model = load_model(tiny["base"], adapter=tiny["adapter"])      # base + LoRA: the slowest
    ids, mask = left_pad(tiny["prompts"], pad_id=0)
    want = StaticDecoder(model, batch_size=4, max_len=64).decode(ids, mask, 12).tokens
    counters.clear()
    decoder = StaticDecoder(model, batch_size=4, max_len=64, compile=Compile.LAYERS)
    assert torch.equal(decoder.decode(ids, mask, 12).tokens, want)
    inductor, layers = counters["inductor"], len(decoder_layers(model))
    # Dynamo traces each layer; Inductor compiles the first and finds the rest in its cache
    assert layers == 2 and counters["stats"]["unique_graphs"] == layers
    assert (inductor["fxgraph_cache_miss"], inductor["fxgraph_cache_hit"]) == (1, layers - 1)
    # a prompt of another length: its prefill runs eagerly, so nothing compiles again
    one = left_pad([tiny["prompts"][1]], pad_id=0)
    assert decoder.decode(*one, 12).tokens[0].tolist() == want[1].tolist()
    assert counters["stats"]["unique_graphs"] == layers and inductor["fxgraph_cache_miss"] == 1


def test_stop_ids_end_the_loop_once_every_row_has_stopped(tiny):
    model = load_model(tiny["base"])
    n = 4 * STOP_CHECK_STEPS
    decoder = StaticDecoder(model, batch_size=4, max_len=64)
    ids, mask = left_pad(tiny["prompts"], pad_id=0)
    full = decoder.decode(ids, mask, n).tokens
    assert full.shape == (3, n)
    # each row's second token stops it: every row has stopped after two steps
    stops = {row[1] for row in full.tolist()}
    early = decoder.decode(ids, mask, n, stop_ids=stops).tokens
    assert early.shape == (3, STOP_CHECK_STEPS)
    assert early.tolist() == full[:, :STOP_CHECK_STEPS].tolist()
    # while one row has not stopped, the loop goes on to the end
    others = (set(full[0].tolist()) | set(full[2].tolist())) - set(full[1].tolist())
    assert others, full
    assert decoder.decode(ids, mask, n, stop_ids=others).tokens.tolist() == full.tolist()


@pytest.mark.parametrize("adapter", [False, True], ids=["plain", "lora"])
def test_answers_in_batches_are_the_answers_one_at_a_time(tiny, adapter):
    model = load_model(tiny["base"], adapter=tiny["adapter"] if adapter else None)
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS + QUESTIONS[:1]]
    alone = answer(model, tiny["tok"], prompts, 12, batch_size=1)
    assert answer(model, tiny["tok"], prompts, 12, batch_size=3) == alone   # 3 + 1
    assert answer(model, tiny["tok"], prompts, 12, batch_size=16) == alone  # all at once
    assert alone[0] == alone[-1] and len({a.text for a in alone}) > 1   # order kept


def test_the_decoder_refuses_what_does_not_fit(tiny):
    decoder = StaticDecoder(load_model(tiny["base"]), batch_size=1, max_len=16)
    ids, mask = left_pad(tiny["prompts"][:1], pad_id=0)
    with pytest.raises(ValueError, match="exceed"):
        decoder.decode(ids, mask, 16)


def test_cut_at_eos():
    assert cut_at_eos([5, 6, 2, 7], {2}) == ([5, 6], True)
    assert cut_at_eos([5, 6], {2}) == ([5, 6], False)
