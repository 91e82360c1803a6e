"""A tiny, offline Llama + tokenizer + LoRA adapter for the merge/quantize/benchmark tests.

Built in a second or two on a CPU: a byte-free BPE tokenizer trained on a few Chinese lines
(wrapped in PreTrainedTokenizerFast, with a chat template), a 2-layer LlamaForCausalLM and a
peft LoRA adapter whose lora_B weights are perturbed so that merging changes the model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TEXTS = ["绿萝叶子发黄怎么办？", "浇水不要太多，保持土壤湿润即可。", "多肉植物需要充足的阳光。",
         "冬天室内温度低，要减少浇水。", "月季开花后要及时修剪残花。", "How often should I water?"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}")
SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(vocab_size=300,
                                                           special_tokens=SPECIALS))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_base(path: Path, seed: int = 0, hidden_size: int = 64) -> Path:
    """Save a tiny Llama (hidden 64 unless asked, 2 layers) and its tokenizer to `path`."""
    tok = make_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def make_adapter(base: Path, path: Path, seed: int = 1) -> Path:
    """Save a LoRA adapter (r=4, all attention/MLP projections) with non-zero lora_B."""
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                           "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    peft_model.save_pretrained(path)
    make_tokenizer().save_pretrained(path)       # like the train stage: tokenizer beside it
    return Path(path)


def make_all(root: Path) -> tuple[Path, Path]:
    """(base_dir, adapter_dir) under `root`."""
    base = make_base(Path(root) / "base")
    return base, make_adapter(base, Path(root) / "adapter")
