"""P-Tuning v2 at inference: a trained prefix must reach `forward` and `generate` alike.

transformers 5.24 renamed `generate`'s cache argument to `cache`; peft hands the prefix in as
`past_key_values`, which transformers then drops in favour of its own empty cache, so the
"tuned" model generated exactly like the base. `tasks.model.modeling.generate_ids` routes prefix
models through the base with the prefix as the initial cache; these tests pin that down."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tasks.config import TrainConfig
from tasks.model.decode import left_pad
from tasks.model.modeling import (
    answer,
    generate,
    generate_ids,
    load_model,
    load_tokenizer,
    prefix_length,
    prompt_ids,
)
from tasks.train.train import train_adapter

pytestmark = [pytest.mark.long, pytest.mark.usefixtures("one_torch_thread")]
PROMPT = [{"role": "user", "content": "绿萝叶子发黄怎么办？"}]


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory) -> dict:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(tmp_path_factory.mktemp("ptuning-home")))
        res = train_adapter(tiny_base["base"], tiny_base["train"], tiny_base["dev"],
                            TrainConfig(method="ptuning", epochs=2, batch_size=8,
                                        num_virtual_tokens=8, max_length=96, eval_steps=50))
    # a prefix trained for real; that it lowers dev loss and beats the base is asserted on the
    # embedded default (tests/pipeline/test_embedded_default.py): this 300-token base is too small for it
    assert res.metrics["global_step"] == 24
    return {"base": tiny_base["base"], "adapter": Path(res.path)}


def _first_logits(model, ids: torch.Tensor) -> torch.Tensor:
    out = generate_ids(model, ids, max_new_tokens=3, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=0)
    return out.logits[0][0]


def test_the_prefix_reaches_forward_and_generate(trained):
    tuned = load_model(trained["base"], adapter=trained["adapter"])
    base = load_model(trained["base"])
    assert prefix_length(tuned) == 8 and prefix_length(base) == 0
    ids = torch.tensor([prompt_ids(load_tokenizer(trained["adapter"]), PROMPT)])

    with torch.inference_mode():
        fwd_tuned = tuned(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
        fwd_base = base(input_ids=ids).logits[0, -1]
    gen_tuned, gen_base = _first_logits(tuned, ids), _first_logits(base, ids)

    # the prefix changes what the model predicts ...
    assert (fwd_tuned - fwd_base).abs().max() > 1e-2
    assert (gen_tuned - gen_base).abs().max() > 1e-2
    # ... and generation sees exactly the model that training and eval see
    torch.testing.assert_close(gen_tuned, fwd_tuned, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gen_base, fwd_base, rtol=1e-4, atol=1e-4)


def test_every_generated_step_matches_a_full_forward(trained):
    """Greedy tokens from `generate` equal a step-by-step argmax of the prefix model's own forward
    over the growing sequence, so positions and the cache stay right after the first step; the
    text helper the report and the nightly gate use decodes the same tokens."""
    tuned = load_model(trained["base"], adapter=trained["adapter"])
    tok = load_tokenizer(trained["adapter"])
    ids = torch.tensor([prompt_ids(tok, PROMPT)])
    out = generate_ids(tuned, ids, max_new_tokens=6, do_sample=False,
                       pad_token_id=tok.pad_token_id)[0, ids.shape[1]:]
    assert len(out) >= 1
    seq = ids
    with torch.inference_mode():
        for _ in range(len(out)):
            logits = tuned(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[0, -1]
            seq = torch.cat([seq, logits.argmax().view(1, 1)], dim=1)
    assert seq[0, ids.shape[1]:].tolist() == out.tolist()
    [answer] = generate(tuned, tok, [PROMPT], max_new_tokens=6)
    assert answer == tok.decode(out, skip_special_tokens=True).strip()


def test_answers_in_left_padded_batches_are_the_answers_one_at_a_time(trained):
    """A batch of prompts of different lengths, padded on the left behind the prefix's
    placeholders, gets at every step the logits each prompt gets alone, and `answer` gives each
    prompt its own answer, in the prompts' order."""
    tuned = load_model(trained["base"], adapter=trained["adapter"])
    tok = load_tokenizer(trained["adapter"])
    prompts = [PROMPT, [{"role": "user", "content": "多肉"}],
               [{"role": "user", "content": "冬天室内温度低，绿萝要减少浇水吗？"}]]
    ids = [prompt_ids(tok, p) for p in prompts]
    assert len({len(i) for i in ids}) == 3
    steps = dict(max_new_tokens=4, do_sample=False, output_logits=True,
                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    batch = generate_ids(tuned, *left_pad(ids, tok.pad_token_id), **steps)
    for row, one in enumerate(ids):
        alone = generate_ids(tuned, torch.tensor([one]), **steps)
        for step, logits in enumerate(alone.logits):
            torch.testing.assert_close(batch.logits[step][row], logits[0], rtol=1e-4, atol=1e-4)
    assert answer(tuned, tok, prompts, 10, batch_size=3) == \
        answer(tuned, tok, prompts, 10, batch_size=1)
