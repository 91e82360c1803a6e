"""Model helpers shared by the model stages: device and dtype choice, loading (full precision,
4-bit, with an adapter) and greedy chat generation through the model's own chat template.

Pure transformers/peft/bitsandbytes: no Prefect, no MLflow (this runs on the GPU machine).
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Literal, Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, \
    PreTrainedModel, PreTrainedTokenizerBase

Message = dict[str, str]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger(__name__)
#: what bitsandbytes logs on AVX512-BF16 CPUs when the optional `kernels` package is absent
NO_HUB_KERNEL = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named " \
    "'kernels'"


def _not_the_hub_kernel_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes (backends/cpu/ops.py) tries to fetch a CPU 4-bit matmul from the Hugging Face
    Hub through the `kernels` package and warns at every import when the package is missing. We
    never load code from the Hub at run time, so that absence is by design (README
    "Dependencies"); any other failure of that loader is still shown."""
    return not record.getMessage().startswith(NO_HUB_KERNEL)


logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_hub_kernel_notice)

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


def prefix_length(model: PreTrainedModel) -> int:
    """Virtual tokens of a peft prefix-tuning (P-Tuning v2) model; 0 for any other model."""
    config = getattr(model, "active_peft_config", None)
    return getattr(config, "num_virtual_tokens", 0) if getattr(
        config, "peft_type", None) == "PREFIX_TUNING" else 0


@torch.inference_mode()
def generate_ids(model: PreTrainedModel, input_ids: torch.Tensor, **kwargs):
    """`model.generate(input_ids=..., **kwargs)`: prompt + new ids (or generate's output object),
    correct for every model we make, P-Tuning v2 prefixes included.

    A prefix model generates through its base, with the trained prefix as the initial KV cache
    (`get_prompt`) and `n` placeholder ids in front of the prompt that the cache already covers,
    so prompt positions start at `n` as in training. peft's own `generate` injects the prefix as
    `past_key_values`, which transformers 5.24 (where the argument became `cache`) drops in favour
    of the empty cache `generate` creates: the prefix never reached generation
    (https://github.com/huggingface/peft/blob/main/src/peft/peft_model.py,
    `PeftModelForCausalLM.prepare_inputs_for_generation`). This path works before and after."""
    mask = torch.ones_like(input_ids)
    n = prefix_length(model)
    if not n:
        return model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    base = model.get_base_model()
    prefix = model.get_prompt(batch_size=input_ids.shape[0])          # a Cache of n positions
    cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters \
        else "past_key_values"
    placeholders = torch.zeros_like(input_ids[:, :1]).expand(-1, n)
    out = base.generate(input_ids=torch.cat([placeholders, input_ids], dim=1),
                        attention_mask=torch.cat([torch.ones_like(placeholders), mask], dim=1),
                        **{cache_arg: prefix}, **kwargs)
    if isinstance(out, torch.Tensor):
        return out[:, n:]
    out.sequences = out.sequences[:, n:]                  # return_dict_in_generate=True
    return out


@torch.inference_mode()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[Sequence[Message]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers, one prompt at a time (no padding effects), special tokens stripped."""
    device = next(model.parameters()).device
    answers = []
    for messages in prompts:
        ids = torch.tensor([prompt_ids(tokenizer, messages)], device=device)
        out = generate_ids(model, ids, max_new_tokens=max_new_tokens, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    return answers
