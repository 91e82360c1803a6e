"""Random-weight ChatGLM2/3 and GLM-4 folders in their original layout, and an independent
reference of each: the forward pass, the tokenizer and the prompt builders, written from the
published design (the models' `modeling_chatglm.py` / `tokenization_chatglm.py`), for
tests/model/test_chatglm.py.

The folders hold what the published ones hold: config.json with `model_type: chatglm` and its
`auto_map`, the original tensor names, a `tokenizer.model` (SentencePiece for ChatGLM2/3, a
tiktoken vocabulary for GLM-4) and the Python files the seeds load with
`trust_remote_code=True`. Those files leave a marker and raise if anything ever imports them.
Shapes are the published configs' scaled down for the CPU.
"""

from __future__ import annotations

import base64
import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import torch

from tasks.model.chatglm_tokenizer import CHATGLM3_SPECIALS, GLM4_PATTERN, GLM4_SPECIALS
from tasks.runtime.paths import DATA_DIR

CORPUS = (DATA_DIR / "sample" / "plant_care_qa.txt").read_text(encoding="utf-8")
EXTRA = ("How often should I water a pothos? Every 7-10 days; 2.5 cm of soil dry.\n"
         "def water(plant):\n    return plant.moisture < 0.3  # tabs\tand  spaces\n"
         "Emoji 🌱🌵 and digits 1234567890. Ünïcödé, ｆｕｌｌｗｉｄｔｈ, sop, isopropyl.\n")
#: texts the tokenizer tests encode: Chinese, English, digits, whitespace runs, newlines, emoji
TEXTS = ["绿萝叶子发黄怎么办？", "How often should I water?  Twice a week.", "pH 6.5-7.0, 25°C",
         "  leading and trailing spaces  ", "line one\nline two\n\n\tindented", "🌱 多肉 🌵!",
         "龘麤 unseen characters", "numbers 1234567890 and 3.14159", " ", "\n", "sop isopropyl",
         "答：浇水要见干见湿。\n\n问：", "a\u3000b（全角）", "x" * 40, "Ünïcödé café"]

_GUARD = ("import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('imported')\n"
          "raise RuntimeError('the folder\\'s own code was run')\n")

# published configs (THUDM/chatglm2-6b, chatglm3-6b, glm-4-9b-chat), widths scaled down
SHAPES = {"hidden_size": 128, "ffn_hidden_size": 192, "num_layers": 2, "num_attention_heads": 4,
          "kv_channels": 32, "multi_query_group_num": 2}
CONFIGS = {
    "chatglm2": {"seq_length": 32768, "eos_token_id": 2, "pad_token_id": 0},
    "chatglm3": {"seq_length": 8192, "eos_token_id": 2, "pad_token_id": 0},
    "glm4": {"seq_length": 131072, "rope_ratio": 500},    # eos/pad: after its vocabulary
}


def original_config(family: str, vocab: int) -> dict:
    return {"_name_or_path": f"THUDM/{family}", "model_type": "chatglm",
            "architectures": ["ChatGLMModel"],
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "add_bias_linear": False, "add_qkv_bias": True, "apply_query_key_layer_scaling": True,
            "apply_residual_connection_post_layernorm": False, "attention_dropout": 0.0,
            "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
            "fp32_residual_connection": False, "hidden_dropout": 0.0, "layernorm_epsilon": 1e-5,
            "multi_query_attention": True, "original_rope": True, "padded_vocab_size": vocab,
            "post_layer_norm": True, "rmsnorm": True, "torch_dtype": "float32",
            "tie_word_embeddings": False, "use_cache": True, **SHAPES, **CONFIGS[family]}


def train_sentencepiece(out: Path, vocab_size: int = 1600, model_type: str = "bpe",
                        normalization: str = "identity") -> Path:
    """A SentencePiece model with ChatGLM2/3's settings (BPE, byte fallback, dummy prefix, no
    whitespace folding, digits split) on the sample corpus; `model_type`/`normalization` let a
    test vary them."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((CORPUS + EXTRA).splitlines()), model_prefix=str(out.with_suffix("")),
        model_type=model_type, vocab_size=vocab_size, byte_fallback=True, character_coverage=0.98,
        normalization_rule_name=normalization, add_dummy_prefix=True,
        remove_extra_whitespaces=normalization != "identity", split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    return out


def train_tiktoken(out: Path, vocab_size: int = 450) -> Path:
    """A tiktoken vocabulary (all 256 bytes, then merges) with GLM-4's split pattern."""
    from tiktoken._educational import SimpleBytePairEncoding

    with redirect_stdout(io.StringIO()):               # it prints every merge
        enc = SimpleBytePairEncoding.train(CORPUS[:6000] + EXTRA, vocab_size, GLM4_PATTERN)
    ranked = sorted(enc.mergeable_ranks.items(), key=lambda kv: kv[1])
    out.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranked))
    return out


def make_original(folder: Path, family: str, *, seed: int = 0, bin_weights: bool = False,
                  sp_model: Path | None = None, tiktoken_file: Path | None = None,
                  shape: dict | None = None, device: str = "cpu",
                  dtype: torch.dtype = torch.float32, shard_bytes: int = 2 << 30) -> Path:
    """Save an original-format folder of `family` (chatglm2 | chatglm3 | glm4); `shape`
    overrides the config's sizes (e.g. the published 6 B ones), the tensors are made on
    `device` in `dtype` and saved in safetensors shards of `shard_bytes` (or, `bin_weights`,
    as one PyTorch .bin file, as ChatGLM2-6B ships)."""
    folder.mkdir(parents=True, exist_ok=True)
    if family == "glm4":
        tokens = (folder / "tokenizer.model")
        tokens.write_bytes((tiktoken_file or train_tiktoken(folder / "tk.tmp")).read_bytes())
        n = sum(1 for _ in tokens.open("rb"))
        specials = {str(n + i): {"content": t, "special": True}
                    for i, t in enumerate(GLM4_SPECIALS)}
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"added_tokens_decoder": specials, "tokenizer_class": "ChatGLM4Tokenizer",
             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}}))
        vocab = n + len(GLM4_SPECIALS) + 10
        special_line = ""
    else:
        model = sp_model or train_sentencepiece(folder / "sp.tmp.model")
        (folder / "tokenizer.model").write_bytes(model.read_bytes())
        specials = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM3_SPECIALS[:5]
        special_line = f"        special_tokens = {specials!r}\n"
        import sentencepiece as spm
        vocab = spm.SentencePieceProcessor(model_file=str(model)).vocab_size() + 16
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "ChatGLMTokenizer", "remove_space": False,
             "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}))
    for tmp in folder.glob("*.tmp*"):
        tmp.unlink()
    config = original_config(family, vocab) | (shape or {})
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if family == "glm4":                                 # <|endoftext|>, <|user|>, <|observation|>
        config |= {"eos_token_id": [n, n + 7, n + 9], "pad_token_id": n}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("configuration_chatglm.py", "modeling_chatglm.py"):
        (folder / name).write_text(_GUARD)
    (folder / "tokenization_chatglm.py").write_text(
        _GUARD + "class SPTokenizer:\n    def __init__(self, model_path):\n" + special_line)
    if bin_weights:                                     # ChatGLM2-6B ships .bin files only
        torch.save(original_state_dict(config, seed), folder / "pytorch_model.bin")
    else:
        save_sharded(folder, config, seed, device, dtype, shard_bytes)
    return folder


def save_sharded(folder: Path, config: dict, seed: int, device: str, dtype: torch.dtype,
                 shard_bytes: int) -> None:
    """The original tensors, made one at a time on `device`, in safetensors shards (as the
    published folders: model-0000i-of-0000n.safetensors and their index)."""
    from safetensors.torch import save_file

    g = torch.Generator(device=device).manual_seed(seed)
    shards, shard, size = [], {}, 0
    for name, (shape, kind) in original_tensors(config).items():
        shard[name] = random_tensor(shape, kind, g, device=device, dtype=dtype).cpu()
        size += shard[name].numel() * shard[name].element_size()
        if size >= shard_bytes:
            shards.append(list(shard))                  # names only: the tensors are saved
            save_file(shard, str(folder / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
            shard, size = {}, 0
    if shard:
        shards.append(list(shard))
        save_file(shard, str(folder / f"part-{len(shards)}.tmp"), metadata={"format": "pt"})
    weight_map = {}
    for i, names in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        (folder / f"part-{i}.tmp").rename(folder / final)
        weight_map |= {n: final for n in names}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def original_tensors(cfg: dict) -> dict[str, tuple[tuple[int, ...], str]]:
    """Every tensor of the original layout: name -> (shape, kind), kind "weight" (std 0.02),
    "norm" (around 1), "bias" (std 0.1) or "inv_freq" (zeros: recomputed, never read)."""
    h, f, kv = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["kv_channels"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["multi_query_group_num"]) * kv
    vocab = cfg["padded_vocab_size"]
    out = {"transformer.embedding.word_embeddings.weight": ((vocab, h), "weight"),
           "transformer.rotary_pos_emb.inv_freq": ((kv // 4,), "inv_freq")}
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        out |= {p + "input_layernorm.weight": ((h,), "norm"),
                p + "self_attention.query_key_value.weight": ((qkv, h), "weight"),
                p + "self_attention.query_key_value.bias": ((qkv,), "bias"),
                p + "self_attention.dense.weight": ((h, cfg["num_attention_heads"] * kv),
                                                    "weight"),
                p + "post_attention_layernorm.weight": ((h,), "norm"),
                p + "mlp.dense_h_to_4h.weight": ((2 * f, h), "weight"),
                p + "mlp.dense_4h_to_h.weight": ((h, f), "weight")}
    return out | {"transformer.encoder.final_layernorm.weight": ((h,), "norm"),
                  "transformer.output_layer.weight": ((vocab, h), "weight")}


def random_tensor(shape: tuple[int, ...], kind: str, generator: torch.Generator,
                  **where) -> torch.Tensor:
    """A tensor of `original_tensors`' kind (`where`: device and dtype)."""
    if kind == "inv_freq":
        return torch.zeros(shape, **where)
    std, mean = {"weight": (0.02, 0.0), "norm": (0.1, 1.0), "bias": (0.1, 0.0)}[kind]
    device = where.get("device", "cpu")
    return (torch.randn(shape, generator=generator, device=device) * std + mean).to(**where)


def original_state_dict(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the original names and shapes, float32 on the CPU (for a .bin)."""
    g = torch.Generator().manual_seed(seed)
    return {name: random_tensor(shape, kind, g)
            for name, (shape, kind) in original_tensors(cfg).items()}


# ---------------------------------------------------------------------------------------------
# The reference forward: ChatGLM2/3 and GLM-4 as published (modeling_chatglm.py), in plain torch
# ---------------------------------------------------------------------------------------------
def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb: the first 2 x cos.shape[-1] dims of each head, in (even, odd)
    pairs; x: [batch, seq, heads, head_dim]."""
    rot = cos.shape[-1] * 2
    x, rest = x[..., :rot], x[..., rot:]
    pairs = x.reshape(*x.shape[:-1], rot // 2, 2)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([pairs[..., 0] * c - pairs[..., 1] * s,
                       pairs[..., 1] * c + pairs[..., 0] * s], -1).flatten(-2)
    return torch.cat([out, rest], -1)


def reference_logits(sd: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of the original architecture on `ids` (no padding)."""
    heads, groups, kv = cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"]
    eps, (b, s) = cfg["layernorm_epsilon"], ids.shape
    n_elem = kv // 2                                     # RotaryEmbedding(rotary_dim // 2)
    base = 10000 * cfg.get("rope_ratio", 1)
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float32) / n_elem))
    angles = torch.outer(torch.arange(s, dtype=torch.float32), theta)
    cos, sin = angles.cos(), angles.sin()
    x = sd["transformer.embedding.word_embeddings.weight"][ids]
    mask = torch.full((s, s), float("-inf")).triu(1)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        h = _rms(x, sd[p + "input_layernorm.weight"], eps)
        qkv = h @ sd[p + "self_attention.query_key_value.weight"].T \
            + sd[p + "self_attention.query_key_value.bias"]
        q, k, v = qkv.split([heads * kv, groups * kv, groups * kv], -1)
        q, k, v = (t.reshape(b, s, -1, kv) for t in (q, k, v))
        q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
        k, v = (t.repeat_interleave(heads // groups, dim=2) for t in (k, v))   # groups expand
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / kv ** 0.5 + mask
        ctx = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v).reshape(b, s, heads * kv)
        x = x + ctx @ sd[p + "self_attention.dense.weight"].T
        h = _rms(x, sd[p + "post_attention_layernorm.weight"], eps)
        gate, up = (h @ sd[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ sd[p + "mlp.dense_4h_to_h.weight"].T
    x = _rms(x, sd["transformer.encoder.final_layernorm.weight"], eps)
    return x @ sd["transformer.output_layer.weight"].T


# ---------------------------------------------------------------------------------------------
# The reference prompt builders (tokenization_chatglm.py, modeling_chatglm.py, finetune demos)
# ---------------------------------------------------------------------------------------------
class OriginalTokenizer:
    """The original tokenizer's ids: SentencePiece's own `encode` (ChatGLM2/3) or tiktoken's
    (GLM-4), with the special tokens after the vocabulary."""

    def __init__(self, folder: Path, family: str):
        self.family = family
        model = folder / "tokenizer.model"
        if family == "glm4":
            import tiktoken
            from tiktoken.load import load_tiktoken_bpe

            ranks = load_tiktoken_bpe(str(model))
            self.special = {t: len(ranks) + i for i, t in enumerate(GLM4_SPECIALS)}
            self._enc = tiktoken.Encoding("glm4-test", pat_str=GLM4_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.special)
            self.encode = lambda text: self._enc.encode(text, disallowed_special=())
            self.eos = self.special["<|endoftext|>"]
        else:
            import sentencepiece as spm

            self._sp = spm.SentencePieceProcessor(model_file=str(model))
            names = CHATGLM3_SPECIALS if family == "chatglm3" else CHATGLM3_SPECIALS[:5]
            self.special = {t: self._sp.vocab_size() + i for i, t in enumerate(names)}
            self.special |= {"<sop>": self.special["sop"], "<eop>": self.special["eop"]}
            self.encode = self._sp.encode
            self.eos = self._sp.eos_id()
        self.prefix = [self.special["[gMASK]"], self.special["<sop>"]]

    def chat_ids(self, messages: list[dict], answer: bool = False) -> list[int]:
        """What the family's own code feeds the model: the prompt (`build_chat_input` /
        `build_prompt`), or with `answer` the training sequence (finetune demos)."""
        if self.family == "chatglm2":
            *history, last = messages if not answer else messages[:-1]
            pairs = [(history[i]["content"], history[i + 1]["content"])
                     for i in range(0, len(history), 2)]
            prompt = "".join(f"[Round {i + 1}]\n\n问：{q}\n\n答：{a}\n\n"
                             for i, (q, a) in enumerate(pairs))
            prompt += f"[Round {len(pairs) + 1}]\n\n问：{last['content']}\n\n答："
            ids = self.prefix + self.encode(prompt)
            return ids + self.encode(messages[-1]["content"]) + [self.eos] if answer else ids
        ids = list(self.prefix)
        for m in messages:
            ids += [self.special[f"<|{m['role']}|>"]] + self.encode("\n") \
                + self.encode(m["content"])
        return ids + [self.eos] if answer else ids + [self.special["<|assistant|>"]]
