"""Stage "quantize": the merged model to bitsandbytes 4-bit (nf4/fp4), saved and reloaded.

Quantization happens at load time (bitsandbytes `Linear4bit`; embeddings and the LM head stay in
`compute_dtype`), the 4-bit weights are saved with `save_pretrained`, and the saved folder is
loaded back and must generate text. Its greedy next-token predictions are compared with the
full-precision merged model (top-1 agreement), so a broken quantization shows up as a number.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tasks.common import DataError, StageResult, publish_dir, stage_root, staging_dir
from tasks.merge import PROBE, probe_ids, weights_mib
from tasks.modeling import _is_bnb_folder, bnb_config, generate, load_model, load_tokenizer

if TYPE_CHECKING:        # not imported at run time: the GPU box may lack pydantic
    from tasks.config import QuantizeConfig

SAMPLE_PROMPT = [{"role": "user", "content": "绿萝叶子发黄是什么原因？"}]


@torch.inference_mode()
def top1_agreement(model_a, model_b, ids: torch.Tensor) -> tuple[float, float]:
    """(share of positions where both models predict the same next token, max |logit diff|)."""
    la = model_a(input_ids=ids.to(model_a.device)).logits.float().cpu()
    lb = model_b(input_ids=ids.to(model_b.device)).logits.float().cpu()
    agree = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    return agree, (la - lb).abs().max().item()


def quantize_int4(merged_dir: str | Path, cfg: QuantizeConfig, device: str = "cpu",
                  sample_prompt: list[dict] | None = None) -> StageResult:
    """Quantize the merged model at `merged_dir` to 4-bit per `cfg`, save it with its tokenizer,
    reload the saved folder on `device` and check it generates (sample in `info`)."""
    merged_dir = Path(merged_dir)
    if not (merged_dir / "config.json").is_file():
        raise DataError(merged_dir, "merged model folder has no config.json")
    if _is_bnb_folder(merged_dir):
        raise DataError(merged_dir / "config.json", "model is already quantized "
                                                    "(quantization_config present)")
    tokenizer = load_tokenizer(merged_dir)
    quant = bnb_config(cfg.quant_type, cfg.double_quant, cfg.compute_dtype)
    model = load_model(merged_dir, dtype=cfg.compute_dtype, device=device, quantization=quant)

    with staging_dir(stage_root("quantize")) as tmp:
        model.save_pretrained(tmp)               # bnb 4-bit serialization
        tokenizer.save_pretrained(tmp)
        del model
        reloaded = load_model(tmp, dtype=cfg.compute_dtype, device=device)
        if not _is_bnb_folder(tmp) or not any(
                type(m).__name__ == "Linear4bit" for m in reloaded.modules()):
            raise RuntimeError(f"{tmp}: saved model did not reload as 4-bit")
        # it must generate (an empty answer -- eos first -- is an answer; a crash is not) and
        # predict like the merged model it came from
        sample = generate(reloaded, tokenizer, [sample_prompt or SAMPLE_PROMPT],
                          max_new_tokens=32)[0]
        full = load_model(merged_dir, dtype=cfg.compute_dtype, device=device)
        agree, logit_diff = top1_agreement(full, reloaded, probe_ids(tokenizer, PROBE))
        if not math.isfinite(logit_diff):
            raise RuntimeError(f"reloaded int4 model from {merged_dir} gives non-finite logits")
        size, merged_size = weights_mib(tmp), weights_mib(merged_dir)
        out, digest = publish_dir(tmp, stage_root("quantize"))
    return StageResult(
        stage="quantize", path=str(out), digest=digest,
        files={"config.json": str(out / "config.json")},
        metrics={"size_mb": size, "size_ratio_vs_merged": size / merged_size,
                 "reload_ok": 1.0, "int4_top1_agreement": agree,
                 "int4_max_abs_logit_diff": logit_diff},
        info={"sample_prompt": sample_prompt or SAMPLE_PROMPT, "sample": sample,
              "merged": str(merged_dir), "device": device,
              "quant_type": cfg.quant_type, "double_quant": cfg.double_quant,
              "compute_dtype": cfg.compute_dtype})
