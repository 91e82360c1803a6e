"""Model helpers shared by the model stages: device and dtype choice, loading (full precision,
4-bit, with an adapter) and greedy chat generation through the model's own chat template.

Pure transformers/peft/bitsandbytes: no Prefect, no MLflow (this runs on the GPU machine).
"""

from __future__ import annotations

import gc
import logging
import sys
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel, \
    PreTrainedTokenizerBase

from tasks.runtime.errors import DataError
from tasks.model.compat import bnb_generic_cpu_path, generate_with_prefix
from tasks.config.model_folder import classify
from tasks.model.tokenizer import tokenizer_of
from tasks.runtime.progress import step

Message = dict[str, str]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: shard size of saved models: what saving from a GPU holds in host memory at a time
SHARD_SIZE = "1GB"
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
    """`auto`: the GPU when torch sees one, else the CPU; an explicit `cuda` without one fails."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch sees no CUDA device "
                           f"(torch {torch.__version__}: a CPU build?)")
    if preference == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return preference


def bnb_config(quant_type: str = "nf4", double_quant: bool = True,
               compute_dtype: str = "float32") -> BitsAndBytesConfig:
    """bitsandbytes 4-bit config (nf4 + double quant by default, as the QLoRA paper and peft's
    QLoRA guide)."""
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=DTYPES[compute_dtype])


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a model folder, with a pad token (its eos if it has none) and a chat
    template (DEFAULT_CHAT_TEMPLATE if it has none; saved with the adapter and merged model, so
    what was trained is what is served)."""
    tok = tokenizer_of(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        log.warning("%s has no chat template: using the default one (tasks.model.modeling."
                    "DEFAULT_CHAT_TEMPLATE: <|system|>/<|user|>/<|assistant|> turns, eos after "
                    "each answer)", path)
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    return tok


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 on a GPU that has it, float32 otherwise (the fast choice on a CPU)."""
    if dtype != "auto":
        return dtype
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    return "bfloat16" if cuda and torch.cuda.is_bf16_supported() else "float32"


def load_model(path: str | Path, *, dtype: str = "float32", device: str = "cpu",
               quantization: BitsAndBytesConfig | None = None,
               adapter: str | Path | None = None) -> PreTrainedModel:
    """Load a causal LM for inference straight onto `device`: full precision (`dtype`, `auto`
    as `resolve_dtype`), or 4-bit
    when `quantization` is given (or the folder is saved quantized), optionally with a peft
    adapter. No full copy of the weights passes through host memory (`_from_pretrained`)."""
    if Path(path).is_dir() and (kind := classify(path)).kind != "native":
        raise DataError(path, kind.reason or f"a {kind.family} folder in its original format: "
                        "the base stage converts it (tasks/model/chatglm.py); load the converted "
                        "one")
    kwargs: dict = {"dtype": DTYPES[resolve_dtype(dtype, device)], "device_map": {"": device}}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    how = "" if quantization is None else f" as {type(quantization).__name__}"
    with step(f"loaded {path}{how} onto {device}", phase="load"):
        model = _from_pretrained(Path(path), stream=device != "cpu", **kwargs)
        if device == "cpu" and "bitsandbytes" in sys.modules:      # else no 4-bit layers
            bnb_generic_cpu_path(model, unpackable_only=True)
        if adapter is not None:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


def _from_pretrained(path: Path, *, stream: bool, **kwargs) -> PreTrainedModel:
    """`AutoModelForCausalLM.from_pretrained(path, **kwargs)`; with `stream` (an accelerator's
    weights) the safetensors files are read one tensor at a time onto the device, and each
    tensor's file pages leave the process once it is there (`tasks.model.mapped_weights`).

    On a CPU, transformers maps the safetensors files and the weights stay backed by them (no
    copy). For an accelerator, the pages of a mapped file that were read stay resident in this
    process until loading ends: a 6 B model costs 12 GiB of host RSS on the way to the GPU. The
    files are therefore handed to `from_pretrained` as a lazy state dict (the path transformers
    itself takes on Windows and MPS, `modeling_utils.PreTrainedModel._load_pretrained_model`).
    A torchao folder's quantizer also gets the files' metadata (`_torchao_metadata`)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not stream or not files:
        return AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    from transformers import AutoConfig, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from tasks.model.mapped_weights import mapped_state_dict

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    device = str(kwargs.get("device_map", {}).get("", "cpu"))
    with ExitStack() as stack:
        if _is_torchao_folder(path):
            stack.enter_context(_torchao_metadata(files))
        weights = mapped_state_dict(files, device, stack)
        model = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=weights, **kwargs)
        del weights
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model


@contextmanager
def _torchao_metadata(files: list[Path]) -> Iterator[None]:
    """While it lasts, transformers' torchao quantizer reads the tensor-subclass metadata of
    `files` also when the weights come as a state dict. It reads them only from the
    `checkpoint_files` that `from_pretrained(path)` resolves, and those are None for a state
    dict (`quantizers/quantizer_torchao.py`, `_process_model_before_weight_loading` and
    `set_metadata`)."""
    from transformers.quantizers.quantizer_torchao import TorchAoHfQuantizer

    original = TorchAoHfQuantizer._process_model_before_weight_loading

    def with_metadata(self, model, checkpoint_files=None, **kwargs):
        original(self, model, checkpoint_files=checkpoint_files, **kwargs)
        if checkpoint_files is None:
            self.set_metadata([str(f) for f in files])

    TorchAoHfQuantizer._process_model_before_weight_loading = with_metadata
    try:
        yield
    finally:
        TorchAoHfQuantizer._process_model_before_weight_loading = original


def save_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
               folder: Path) -> Path:
    """`save_pretrained` in shards of SHARD_SIZE: saving from a GPU copies one shard at a time
    to host memory (transformers' default is a single 50 GB shard, i.e. the whole model)."""
    with step(f"saved the model to {folder}", phase="save"):
        model.save_pretrained(folder, max_shard_size=SHARD_SIZE)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)             # with its chat template
    return folder


def release(device: str | torch.device) -> None:
    """Give freed model memory back (CUDA caching allocator), after `del model`."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def is_prequantized(path: str | Path) -> bool:
    """Whether the model folder at `path` was saved quantized (its config has a
    `quantization_config`: bitsandbytes or torchao)."""
    cfg = Path(path) / "config.json"
    return cfg.is_file() and '"quantization_config"' in cfg.read_text(encoding="utf-8")


def _is_torchao_folder(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    return cfg.is_file() and '"quant_method": "torchao"' in cfg.read_text(encoding="utf-8")


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
def generate_ids(model: PreTrainedModel, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, **kwargs):
    """`model.generate(input_ids=..., attention_mask=..., **kwargs)`: prompt + new ids (or
    generate's output object), correct for every model we make, P-Tuning v2 prefixes included.

    A prefix model generates through its base, with the trained prefix as the initial KV cache
    (`get_prompt`) and `n` placeholder ids in front of the prompt that the cache already covers,
    so prompt positions start at `n` as in training. peft's own `generate` injects the prefix as
    `past_key_values`, which transformers 5.24 (where the argument became `cache`) drops in favour
    of the empty cache `generate` creates: the prefix never reached generation
    (tasks/model/compat.py `generate_with_prefix`). This path works before and after."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    n = prefix_length(model)
    if not n:
        return model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
    return generate_with_prefix(model, n, input_ids, mask, **kwargs)


@dataclass(frozen=True)
class Answer:
    text: str               # special tokens stripped
    new_tokens: int         # tokens generated, the closing EOS included
    ended: bool             # an EOS came before max_new_tokens ran out


def eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every token id that ends an answer: the generation config's and the tokenizer's EOS."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


@torch.inference_mode()
def answer(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
           prompts: Sequence[Sequence[Message]], max_new_tokens: int = 64,
           batch_size: int = 1) -> list[Answer]:
    """Greedy answers, cut at the first EOS, in the order of `prompts`.

    Through the static-cache loop of tasks/model/decode.py (a CUDA graph per step on a GPU), which
    gives `generate`'s greedy tokens (tests/model/test_decode.py) several times faster: up to
    `batch_size` prompts at a time, left-padded (the longest first, so a batch pads little), each
    batch ending once every answer in it has ended. A batch's numbers differ from one prompt's by
    float rounding only, which can flip a near-tie between two tokens; `batch_size=1` answers one
    prompt at a time. A P-Tuning v2 prefix model goes through `generate_ids` (its prefix is the
    initial cache), in the same left-padded batches."""
    from tasks.model.decode import StaticDecoder, cut_at_eos, left_pad
    from tasks.runtime.progress import Progress

    device = next(model.parameters()).device
    ends = eos_ids(model, tokenizer)
    all_ids = [prompt_ids(tokenizer, messages) for messages in prompts]
    prefixed = prefix_length(model) > 0               # through generate_ids, not the loop
    batch_size = max(1, min(batch_size, len(all_ids)))
    order = sorted(range(len(all_ids)), key=lambda i: -len(all_ids[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    decoder = None if prefixed or not all_ids else StaticDecoder(
        model, batch_size=batch_size, max_len=max(map(len, all_ids)) + max_new_tokens)
    new: dict[int, list[int]] = {}
    progress = Progress(f"answers of {Path(str(model.name_or_path)).name or 'the model'}",
                        len(all_ids))
    for batch in batches:
        ids, mask = left_pad([all_ids[i] for i in batch], tokenizer.pad_token_id or 0)
        if decoder is None:
            out = generate_ids(model, ids.to(device), mask.to(device), do_sample=False,
                               max_new_tokens=max_new_tokens, eos_token_id=sorted(ends) or None,
                               pad_token_id=tokenizer.pad_token_id)
            rows = out[:, ids.shape[1]:].tolist()
        else:
            rows = decoder.decode(ids, mask, max_new_tokens, stop_ids=ends).tokens.tolist()
        new |= dict(zip(batch, rows))
        progress.update(len(batch))
    progress.close()
    answers = []
    for i in range(len(all_ids)):
        kept, ended = cut_at_eos(new[i], ends)
        answers.append(Answer(tokenizer.decode(kept, skip_special_tokens=True).strip(),
                              len(kept) + ended, ended))
    return answers


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
             prompts: Sequence[Sequence[Message]], max_new_tokens: int = 64) -> list[str]:
    """The text of `answer`'s greedy answers."""
    return [a.text for a in answer(model, tokenizer, prompts, max_new_tokens)]
