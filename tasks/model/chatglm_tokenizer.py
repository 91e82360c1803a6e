"""The tokenizer of a ChatGLM2/3 or original GLM-4 folder as a fast tokenizer, with the family's
special tokens, prompt format (a chat template) and stop tokens (README "Which models").

* ChatGLM2/3: a SentencePiece `tokenizer.model`; the special tokens follow its vocabulary, in
  the order of the folder's `tokenization_chatglm.py` (`[MASK] [gMASK] [sMASK] sop eop`, then
  in ChatGLM3 `<|system|> <|user|> <|assistant|> <|observation|>`). Built with transformers'
  `SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's own normalizer and
  merge settings, so ids equal `SentencePieceProcessor.encode`'s.
* GLM-4: a tiktoken vocabulary, converted with transformers' `TikTokenConverter` and GLM-4's
  split pattern; its special tokens start with `<|endoftext|>` after the ranks.

`sop`/`eop` are named `<sop>`/`<eop>` here (GLM-4's names) so that the word "sop" in a user's
text stays text; their ids are the originals'. `tok(text)` adds `[gMASK] <sop>` as the original
`tokenizer.encode(text)` does; `add_special_tokens=False` gives the bare ids.

Prompt formats, from the original code:
* ChatGLM3 `build_chat_input` / GLM-4 `build_single_message`: `[gMASK]<sop>`, then per message
  `<|role|>` + "\\n" + content (ChatGLM3 encodes "\\n" and the content separately, each with
  SentencePiece's dummy prefix: the template's "\\n " gives the same ids), and `<|assistant|>`
  to answer. Training ends the conversation with eos, as ChatGLM3's finetune demo does.
* ChatGLM2 `build_prompt`: `[Round N]\\n\\n问：{query}\\n\\n答：{answer}\\n\\n`; the answer being
  learned is encoded on its own with eos after it, as ChatGLM2's P-Tuning `main.py` does. A
  system message, which ChatGLM2 does not have, goes first, followed by a blank line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tasks.runtime.errors import DataError
from tasks.config.model_folder import original_special_tokens, python_literal

CHATGLM3_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                     "<|assistant|>", "<|observation|>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                 "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                 "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>"]
#: GLM-4's split pattern (its tokenization_chatglm.py `pat_str`), when the folder has none
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_ROLE_CHECK = ("{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
               "{{ raise_exception('unknown role ' ~ m['role'] ~ ': expected system, user or "
               "assistant') }}{%- endif -%}")
ROLE_TOKENS_TEMPLATE = (
    "[gMASK]<sop>{%- for m in messages -%}" + _ROLE_CHECK +
    "{{ '<|' ~ m['role'] ~ '|>' ~ NEWLINE ~ m['content'] }}"
    "{%- if m['role'] == 'assistant' and loop.last -%}{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
CHATGLM2_TEMPLATE = (
    "[gMASK]<sop>{%- set ns = namespace(round=0) -%}{%- for m in messages -%}" + _ROLE_CHECK +
    "{%- if m['role'] == 'system' -%}{{ m['content'] ~ '\n\n' }}"
    "{%- elif m['role'] == 'user' -%}{%- set ns.round = ns.round + 1 -%}"
    "{{ '[Round ' ~ ns.round ~ ']\n\n问：' ~ m['content'] ~ '\n\n答：' }}"
    "{%- elif loop.last -%}{{ ' ' ~ m['content'] ~ eos_token }}"
    "{%- else -%}{{ m['content'] ~ '\n\n' }}{%- endif -%}{%- endfor -%}")


@dataclass(frozen=True)
class Family:
    """What differs between the three families' tokenizers."""

    specials: list[str]          # appended after the vocabulary, in this order
    template: str
    eos: str                     # the eos token (ends a training conversation)
    stops: tuple[str, ...]       # generation stops at any of these
    pad: str


FAMILIES = {
    "chatglm2": Family(CHATGLM3_SPECIALS[:5], CHATGLM2_TEMPLATE, "</s>", ("</s>",), "<unk>"),
    "chatglm3": Family(CHATGLM3_SPECIALS, ROLE_TOKENS_TEMPLATE.replace("NEWLINE", "'\n '"),
                       "</s>", ("</s>", "<|user|>", "<|observation|>"), "<unk>"),
    "glm4": Family(GLM4_SPECIALS, ROLE_TOKENS_TEMPLATE.replace("NEWLINE", "'\n'"),
                   "<|endoftext|>", ("<|endoftext|>", "<|user|>", "<|observation|>"),
                   "<|endoftext|>"),
}


@dataclass(frozen=True)
class SavedTokens:
    """The ids the converted config and generation config need."""

    special_ids: dict[str, int]
    eos_ids: list[int]           # [eos, other stop tokens...]
    pad_id: int


def _renamed(token: str) -> str:
    return {"sop": "<sop>", "eop": "<eop>"}.get(token, token)


def sentencepiece_tokenizer(model_file: Path):
    """A `tokenizers.Tokenizer` that encodes like the SentencePiece model (ids included)."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    pieces = [(p.piece, p.score) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)} \
        if proto.trainer_spec.model_type == 2 else pieces        # 2: BPE, else Unigram
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    if tok is None:
        raise DataError(model_file, "not a SentencePiece BPE or Unigram model")
    return tok, len(pieces)


def tiktoken_tokenizer(model_file: Path, pattern: str):
    """A `tokenizers.Tokenizer` with the ranks of a tiktoken vocabulary as ids."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(model_file), pattern=pattern).converted()
    return tok, tok.get_vocab_size()


def glm4_specials(folder: Path) -> list[str]:
    """GLM-4's special tokens in id order, from tokenizer_config.json when it lists them."""
    try:
        added = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        decoder = added.get("added_tokens_decoder") or {}
        listed = [decoder[k]["content"] for k in sorted(decoder, key=int)]
    except (OSError, ValueError, KeyError, TypeError):
        listed = []
    return listed or GLM4_SPECIALS


def glm4_pattern(folder: Path) -> str:
    """The `pat_str` of the folder's tokenization_chatglm.py (parsed, not run), else
    GLM4_PATTERN."""
    value = python_literal(folder / "tokenization_chatglm.py", "pat_str")
    return value if isinstance(value, str) else GLM4_PATTERN


def build_tokenizer(folder: Path, family: str):
    """The fast tokenizer (`PreTrainedTokenizerFast`) of a ChatGLM2/3 or GLM-4 folder."""
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    spec, model_file = FAMILIES[family], folder / "tokenizer.model"
    if family == "glm4":
        tok, size = tiktoken_tokenizer(model_file, glm4_pattern(folder))
        specials = glm4_specials(folder)
    else:
        tok, size = sentencepiece_tokenizer(model_file)
        specials = [_renamed(t) for t in original_special_tokens(folder) or spec.specials]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    ids = {t: tok.token_to_id(t) for t in specials}
    if list(ids.values()) != list(range(size, size + len(specials))):
        raise DataError(model_file, f"the special tokens did not get the ids after the "
                                    f"{size} of the vocabulary: {ids}")
    tok.post_processor = TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])])
    unk = "<unk>" if family != "glm4" else None
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=spec.eos, pad_token=spec.pad, unk_token=unk,
        additional_special_tokens=[t for t in specials if t not in (spec.eos, spec.pad)],
        chat_template=spec.template, padding_side="left", clean_up_tokenization_spaces=False)


def save_tokenizer(folder: Path, family: str, out: Path) -> SavedTokens:
    """Write the fast tokenizer (tokenizer.json, tokenizer_config.json with the chat template)
    to `out`; return the ids the model's configs need."""
    tok = build_tokenizer(folder, family)
    tok.save_pretrained(str(out))
    spec = FAMILIES[family]
    special_ids = {t: tok.convert_tokens_to_ids(t) for t in tok.all_special_tokens}
    return SavedTokens(special_ids=special_ids,
                       eos_ids=[tok.convert_tokens_to_ids(t) for t in spec.stops],
                       pad_id=tok.convert_tokens_to_ids(spec.pad))
