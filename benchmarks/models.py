"""Random-weight models of real shapes for the GPU benchmarks (speed and memory, not quality),
with the embedded default's tokenizer and chat template.

    SHAPES["6b"]: the ChatGLM2-6B shape as a Llama (6.24 B parameters, untied head)

A model is built directly on its device in its dtype (`with torch.device(...)`: no fp32 copy on the
host, which at 6 B would need ~25 GB and minutes) and saved with `tasks.model.modeling.save_model`.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, \
    PreTrainedTokenizerFast

from tasks.train.base_model import make_tokenizer, train_sentencepiece
from tasks.runtime.paths import DATA_DIR
from tasks.model.modeling import save_model
from tasks.data.qa_text import read_qa_text

SHAPES: dict[str, dict] = {
    # ChatGLM2-6B: vocab 65024, hidden 4096, ffn 13696, 28 layers, 32 heads, 2 kv heads
    "6b": dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_hidden_layers=28,
               num_attention_heads=32, num_key_value_heads=2),
    # Qwen2-1.5B widths, 20 layers: the earlier H100 runs (README)
    "0.5b": dict(hidden_size=1536, intermediate_size=4096, num_hidden_layers=20,
                 num_attention_heads=12, num_key_value_heads=2),
    # tens of MB with widths the int4 kernels take (multiples of 128): a GPU smoke run
    "smoke": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2),
    # a few MB: the same flow on a CPU in seconds
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


#: ChatGLM3-6B's published config.json (THUDM/chatglm3-6b): the folder a seed's reader brings
CHATGLM3_6B = dict(hidden_size=4096, ffn_hidden_size=13696, num_layers=28, num_attention_heads=32,
                   kv_channels=128, multi_query_group_num=2, padded_vocab_size=65024,
                   seq_length=8192)


def sample_tokenizer(vocab_size: int = 1600) -> PreTrainedTokenizerFast:
    """The embedded default's kind of tokenizer, trained on the sample corpus."""
    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    sp_model, _ = train_sentencepiece([f"{p['q']}\n{p['a']}" for p in pairs], vocab_size)
    return make_tokenizer(sp_model)


def build_random_model(shape: str, out: Path, device: str = "cuda",
                       dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> tuple[Path, int]:
    """Save a random-init Llama of `SHAPES[shape]` and the sample tokenizer to `out`; return
    (folder, parameter count)."""
    tok = sample_tokenizer()
    cfg = LlamaConfig(**{"vocab_size": len(tok), **SHAPES[shape]},
                      max_position_embeddings=4096, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id,
                                               eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    params = sum(p.numel() for p in model.parameters())
    save_model(model, tok, out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out, params


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    start = time.perf_counter()
    folder, n = build_random_model(args.shape, args.out, args.device)
    print(f"{folder}: {n / 1e9:.2f} B parameters in {time.perf_counter() - start:.1f} s")
