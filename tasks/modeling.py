"""Model helpers shared by the model stages: device and dtype choice, loading (full precision,
4-bit, with an adapter) and greedy chat generation through the model's own chat template.

Pure transformers/peft/bitsandbytes: no Prefect, no MLflow (this runs on the GPU machine).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, \
    PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)

#: For models that ship no chat template (base, not chat, models) and for the embedded default:
#: ChatGLM3-like `<|role|>\n content`, an assistant turn closed by the model's eos (so the
#: model learns to stop); prefix-consistent, as assistant-only masking needs.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' ~ m['role'] ~ ': expected system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' ~ m['role'] ~ '|>\n' ~ m['content'] }}"
    "{%- if m['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def pick_device(preference: Literal["auto", "cpu", "cuda"] = "auto") -> str:
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("benchmark.device='cuda' but torch sees no CUDA device")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def bnb_config(quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype: str = "float32") -> BitsAndBytesConfig:
    """bitsandbytes 4-bit config (nf4 + double quant by default, as QLoRA and seed 001)."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype])


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, with a pad token (its eos if it has none) and a chat
    template (DEFAULT_CHAT_TEMPLATE if it has none; saved with the adapter and merged model, so
    what was trained is what is served)."""
    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        log.warning("%s has no chat template: using the default one (tasks.modeling."
                    "DEFAULT_CHAT_TEMPLATE: <|system|>/<|user|>/<|assistant|> turns, eos after "
                    "each answer)", path)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
               quantization: BitsAndBytesConfig | None = None,
               adapter: str | Path | None = None) -> PreTrainedModel:
    """Load a causal LM for inference: full precision (`dtype`), or 4-bit when `quantization`
    is given (or the folder is a saved bitsandbytes model), optionally with a peft adapter."""
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if quantization is not None or _is_bnb_folder(path):
        kwargs["device_map"] = {"": device}       # bitsandbytes places weights at load time
    model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    if "device_map" not in kwargs:
        model.to(device)
    if adapter is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _is_bnb_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and '"quantization_config"' in cfg.read_text(encoding="utf-8")


def prompt_ids(tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation prefix followed by the assistant generation prompt."""
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[Sequence[Message]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers, one prompt at a time (no padding effects), special tokens stripped."""
    device = next(model.parameters()).device
    answers = []
    for messages in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
