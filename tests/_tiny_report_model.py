"""A tiny offline chat model for report tests: a LlamaForCausalLM (hidden 64, 2 layers) and a
BPE tokenizer trained on a few Chinese strings, with a simple chat template and an eos token.

The eos token has id 0. Two calls with different seeds give two differently-initialised models
("base" and "tuned") that share the same tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXTS = [
    "绿萝叶子发黄怎么办？", "绿萝喜欢散射光，避免暴晒，土壤见干见湿再浇水。",
    "多肉植物多久浇一次水？", "多肉耐旱，春秋两周左右浇一次，夏季和冬季要少浇。",
    "法国的首都是哪座城市？", "法国的首都是巴黎。", "十七加二十五等于多少？", "等于四十二。",
    "你好，我是一个植物养护助手。", "<script>alert(1)</script> & 其他符号 ``` 反引号",
]
SPECIALS = ["</s>", "<unk>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_chat_model(folder: Path, seed: int = 0, mute: bool = False) -> Path:
    """Save a randomly initialised tiny chat model (+ tokenizer) into `folder`.

    `mute`: zero the final norm, so every logit is 0 and greedy decoding picks id 0 = eos at
    once (an empty answer that ended with eos)."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    if mute:
        torch.nn.init.zeros_(model.model.norm.weight)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
