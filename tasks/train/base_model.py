"""Stage "base": the embedded default base model, built offline from the train split.

In the spirit of the Chinese-LLaMA recipe (build a Chinese tokenizer -> continue pretraining ->
instruction tuning), in about a minute on a CPU: train a sentencepiece tokenizer on the train
split's text (byte fallback: unseen characters never become <unk>), wrap it as a fast tokenizer
with a ChatGLM3-like chat template, initialise a tiny LlamaForCausalLM and pretrain it on the
plain text of the train split. The result is an ordinary Hugging Face folder, so the later
stages treat it exactly like a user's Qwen or Llama.

With `base.path` set, `resolve_base_model` names the user's model instead and nothing is built.
"""

from __future__ import annotations

import io
import math
import string
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, \
    PreTrainedTokenizerFast, get_cosine_schedule_with_warmup

from tasks.runtime.errors import DataError
from tasks.runtime.results import Info, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import (
    atomic_write_bytes,
    atomic_write_json,
    digest_bytes,
    digest_path,
    publish_dir,
    staging_dir,
)
from tasks.runtime.paths import is_local_model_path
from tasks.config import BaseModelConfig
from tasks.model.modeling import DEFAULT_CHAT_TEMPLATE
from tasks.runtime.progress import Progress
from tasks.data.validate import read_conversations

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = [f"<|{r}|>" for r in ROLES]
#: pieces that must stay atomic: the role markers and the newline after them (so the text on
#: either side of a marker is tokenized independently: the template is prefix-consistent)
USER_SYMBOLS = [*ROLE_TOKENS, "\n"]
#: ASCII is always in the vocabulary (units, pH, numbers), spaces included ("▁" in sentencepiece)
REQUIRED_CHARS = "▁" + string.ascii_letters + string.digits + string.punctuation

CHAT_TEMPLATE = DEFAULT_CHAT_TEMPLATE          # the embedded default's, saved with it
PRETRAIN_BATCH = 4


@stage_output
class BuiltBase:
    """The embedded default base model: its folder's files and how its pretraining went."""

    config_json: Path
    model_safetensors: Path
    tokenizer_json: Path
    sentencepiece_model: Path
    pretrain_log_json: Path
    params: int
    vocab_size: int
    pretrain_loss_first: float
    pretrain_loss_last: float
    pretrain_seconds: float
    pretrain_tokens: int
    build_seconds: float
    source: str = "embedded"
    train_json: str
    documents: Info[int]
    blocks: list[int]
    architecture: str = "LlamaForCausalLM"


@stage_output
class UserBase:
    """The user's base model, used where it is: `source` "local" (a folder) or "hub" (an id)."""

    source: str


def train_sentencepiece(texts: list[str], vocab_size: int) -> tuple[bytes, int]:
    """Train a unigram sentencepiece model with byte fallback; return (model bytes, vocab size).

    The vocab size is clamped up to what full character coverage needs and (soft limit) down to
    what a small corpus can fill."""
    import sentencepiece as spm

    chars = set("".join(texts).replace(" ", "▁")) | set(REQUIRED_CHARS)
    floor = len(chars) + 256 + 4 + len(USER_SYMBOLS) + 16
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, model_type="unigram",
        vocab_size=max(vocab_size, floor), hard_vocab_limit=False, byte_fallback=True,
        character_coverage=1.0, required_chars="".join(sorted(set(REQUIRED_CHARS))),
        user_defined_symbols=USER_SYMBOLS, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        pad_piece=PAD, normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, max_sentence_length=1 << 16, num_threads=2,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    return proto.getvalue(), sp.get_piece_size()


def make_tokenizer(sp_model: bytes) -> PreTrainedTokenizerFast:
    """A transformers fast tokenizer with the same pieces and scores as the sentencepiece model
    (a `tokenizers` Unigram with byte fallback), the chat template and atomic special tokens."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Replace("▁", " ")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (UNK, BOS, EOS, PAD, *ROLE_TOKENS)])
    tok.add_tokens([AddedToken("\n", special=False, normalized=False)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                 unk_token=UNK, pad_token=PAD,
                                 additional_special_tokens=ROLE_TOKENS,
                                 chat_template=CHAT_TEMPLATE, padding_side="right",
                                 clean_up_tokenization_spaces=False)
    if len(hf) != len(vocab):
        raise RuntimeError(f"tokenizer has {len(hf)} ids, sentencepiece {len(vocab)}")
    return hf


def check_tokenizer(tok: PreTrainedTokenizerFast, sample: str) -> None:
    """Special tokens are single ids; Chinese (and unseen) text round-trips without <unk>."""
    for t in (BOS, EOS, PAD, UNK, *ROLE_TOKENS):
        ids = tok(t, add_special_tokens=False).input_ids
        if ids != [tok.convert_tokens_to_ids(t)]:
            raise RuntimeError(f"special token {t!r} is not atomic: {ids}")
    for text in (sample, "龘麤 pH 6.5, OK?\n换行 😀"):
        ids = tok(text, add_special_tokens=False).input_ids
        if tok.unk_token_id in ids or tok.decode(ids) != text:
            raise RuntimeError(f"tokenizer does not round-trip {text[:30]!r}: "
                               f"{tok.decode(ids)[:30]!r}")


def make_model(cfg: BaseModelConfig, tok: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A tiny Llama (tied embeddings), seeded with cfg.seed."""
    if cfg.hidden_size % cfg.num_heads:
        raise ValueError(f"base.hidden_size {cfg.hidden_size} is not divisible by "
                         f"base.num_heads {cfg.num_heads}")
    torch.manual_seed(cfg.seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        intermediate_size=max(64, round(cfg.hidden_size * 2.7 / 64) * 64),
        max_position_embeddings=max(512, cfg.max_seq_len), tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(config)


def pack_documents(tok: PreTrainedTokenizerFast, docs: list[list[str]], block: int) -> torch.Tensor:
    """Plain-text documents (turns joined by newlines), eos after each, packed into blocks."""
    stream: list[int] = []
    for turns in docs:
        stream += tok("\n".join(turns), add_special_tokens=False).input_ids + [tok.eos_token_id]
    block = min(block, len(stream))
    n = len(stream) // block
    return torch.tensor(stream[:n * block]).view(n, block)


def pretrain(model: LlamaForCausalLM, blocks: torch.Tensor, cfg: BaseModelConfig) -> list[dict]:
    """Causal-LM pretraining on packed blocks (AdamW, 5% warmup, cosine decay); the loss curve."""
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = math.ceil(len(blocks) / PRETRAIN_BATCH)
    total = max(1, round(per_epoch * cfg.pretrain_epochs))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, betas=(0.9, 0.95),
                            weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.05 * total), total)
    model.train()
    curve, step = [], 0
    with Progress("pretraining the embedded base", total) as progress:
        while step < total:
            for idx in torch.randperm(len(blocks), generator=gen).split(PRETRAIN_BATCH):
                batch = blocks[idx]
                loss = model(input_ids=batch, labels=batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
                step += 1
                curve.append({"step": step, "loss": round(loss.item(), 4)})
                progress.update()
                if step >= total:
                    break
    return curve


@stage_entry(StageName.BASE, model_libs=True, logged_as="base_model")
def stage(data: StageResult, cfg: BaseModelConfig) -> StageResult:
    """The embedded default, built from the conversations stage's train split."""
    return build_base_model(data.out.train_json, cfg)


def build_base_model(train_json: Path, cfg: BaseModelConfig) -> StageResult:
    """Build the embedded default base model from the train split (never dev) -> an HF folder
    (safetensors, tokenizer with chat template) under outputs/base/<digest>/."""
    start = time.perf_counter()
    docs = [[t["content"] for t in turns if t["content"].strip()]
            for turns in read_conversations(Path(train_json))]
    texts = [t for turns in docs for t in turns]
    sp_model, vocab_size = train_sentencepiece(texts, cfg.vocab_size)
    tok = make_tokenizer(sp_model)
    check_tokenizer(tok, max(texts, key=len))
    model = make_model(cfg, tok)
    blocks = pack_documents(tok, docs, cfg.max_seq_len)
    t0 = time.perf_counter()
    curve = pretrain(model, blocks, cfg)
    pretrain_seconds = time.perf_counter() - t0
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, do_sample=False)
    with staging_dir(stage_root(StageName.BASE)) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        atomic_write_bytes(tmp / "sentencepiece.model", sp_model)
        atomic_write_json(tmp / "pretrain_log.json", curve)
        out, digest = publish_dir(tmp, stage_root(StageName.BASE))
    params = sum(p.numel() for p in model.parameters())
    return StageResult(stage=StageName.BASE, path=str(out), digest=digest, history=curve,
                       out=BuiltBase(
        config_json=out / "config.json", model_safetensors=out / "model.safetensors",
        tokenizer_json=out / "tokenizer.json", sentencepiece_model=out / "sentencepiece.model",
        pretrain_log_json=out / "pretrain_log.json", params=params, vocab_size=vocab_size,
        pretrain_loss_first=curve[0]["loss"], pretrain_loss_last=curve[-1]["loss"],
        pretrain_seconds=round(pretrain_seconds, 2), pretrain_tokens=blocks.numel(),
        build_seconds=round(time.perf_counter() - start, 2), train_json=str(train_json),
        documents=len(docs), blocks=list(blocks.shape)))


@stage_entry(StageName.BASE, cached=False)
def resolve_base_model(cfg: BaseModelConfig) -> StageResult | None:
    """The user's base model when `cfg.path` is set (a local HF folder, digested by content, or
    a hub id, digested by name), used where it is: nothing computed, nothing cached; None when
    it is empty (build the embedded default instead)."""
    if not cfg.path or not cfg.path.strip():
        return None
    raw = cfg.path.strip()
    local = Path(raw).expanduser()
    if is_local_model_path(raw):
        if not local.is_dir():
            raise DataError(local, "base.path: no such model folder (expected a Hugging Face "
                                   "causal-LM folder with config.json)")
        if not (local / "config.json").is_file():
            raise DataError(local, "base.path: the folder has no config.json; it is not a "
                                   "Hugging Face model folder")
        return StageResult(stage=StageName.BASE, path=str(local.resolve()),
                           digest=digest_path(local), out=UserBase(source="local"))
    return StageResult(stage=StageName.BASE, path=raw, digest=digest_bytes(f"hub:{raw}".encode()),
                       out=UserBase(source="hub"))
