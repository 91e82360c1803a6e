"""Stage "generations": base and tuned model (and, after preference tuning, the supervised model
it was tuned from) answer the same dev prompts and out-of-domain probes, and the dev answers
are scored. This is the costly half of the before/after comparison
users of QLoRA tutorials expect ("微调前后推理对比"), with checks for catastrophic forgetting
("灾难性遗忘"). The report stage (tasks/evaluate/report.py) renders it, so a new benchmark table
re-renders the report without generating again (docs/design.md "Caching").

Greedy decoding, one model in memory at a time; the dev answers are scored against the references by
tasks/evaluate/scoring.py (ROUGE-1/2/L, BLEU-4). Output: generations.json (every prompt, reference,
answer and score; the report's input)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from tasks.runtime.results import StageName, StageResult, stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, staging_dir
from tasks.config import ReportConfig
from tasks.model.model_spec import ModelSpec
from tasks.model.modeling import Message, answer, load_tokenizer, pick_device, release
from tasks.evaluate.scoring import SCORES, average, read_dev_prompts, read_probes, score_answer
#: a CPU model below this size decodes faster on one thread: its per-token matmuls are too small
#: to split, and on 2 busy cores intra-op threads made decoding ~8x slower (75 vs 9.6 ms/token)
SMALL_MODEL_PARAMS = 50_000_000


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------
def answer_prompts(spec: ModelSpec, prompts: list[list[Message]], max_new_tokens: int,
                   batch_size: int = 1) -> dict[str, Any]:
    """Load one model from its spec (on the GPU where there is one), answer every prompt
    greedily, `batch_size` at a time (`tasks.model.modeling.answer`), free it again. `new_tokens`
    counts each answer's tokens, its EOS included, so "ended with eos before max_new_tokens" is
    exact."""
    device = pick_device("auto")
    model = spec.load(device)
    tokenizer = load_tokenizer(spec.tokenizer_dir())
    threads = torch.get_num_threads()
    if (next(model.parameters()).device.type == "cpu"
            and sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS):
        torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        answers = answer(model, tokenizer, prompts, max_new_tokens, batch_size)
    finally:
        seconds = time.perf_counter() - start
        torch.set_num_threads(threads)
        del model
        release(device)
    return {"answers": [a.text for a in answers], "new_tokens": [a.new_tokens for a in answers],
            "seconds": seconds}


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def generate_answers(base: ModelSpec, tuned: ModelSpec, dev_json: Path, probes_file: Path,
                     cfg: ReportConfig, supervised: ModelSpec | None = None) -> StageResult:
    """`base` and `tuned` (and `supervised`, a third column) answer the dev prompts and the
    probes; the dev answers are scored -> outputs/generations/<digest>/generations.json."""
    dev = read_dev_prompts(Path(dev_json))
    probes = read_probes(Path(probes_file))
    n_show, n_eval = min(cfg.dev_examples, len(dev)), min(cfg.eval_examples, len(dev))
    used = dev[:max(n_show, n_eval)]
    prompts = [p for p, _ in used] + [[{"role": "user", "content": q}] for q in probes]

    models = {"base": base, **({"supervised": supervised} if supervised else {}),
              "tuned": tuned}
    runs = {role: answer_prompts(spec, prompts, cfg.max_new_tokens, cfg.batch_size)
            for role, spec in models.items()}
    dev_ans = {k: r["answers"][:len(used)] for k, r in runs.items()}
    probe_ans = {k: r["answers"][len(used):] for k, r in runs.items()}
    refs = [r for _, r in used]
    per_prompt = {k: [score_answer(a, ref) for a, ref in zip(v, refs)] for k, v in dev_ans.items()}

    metrics: dict[str, float] = {"dev_examples": float(n_show), "eval_examples": float(n_eval),
                                 "probe_count": float(len(probes))}
    for k, r in runs.items():
        metrics |= {f"{k}_{key}": v for key, v in average(per_prompt[k][:n_eval]).items()}
        metrics[f"{k}_mean_answer_chars"] = sum(map(len, r["answers"])) / len(r["answers"])
        metrics[f"{k}_mean_new_tokens"] = sum(r["new_tokens"]) / len(r["new_tokens"])
        metrics[f"{k}_eos_rate"] = (sum(n < cfg.max_new_tokens for n in r["new_tokens"])
                                    / len(r["new_tokens"]))
        metrics[f"{k}_generate_seconds"] = r["seconds"]

    middle = {"supervised"} & runs.keys()
    examples = [{"prompt": p, "reference": ref, "before": dev_ans["base"][i],
                 "after": dev_ans["tuned"][i], "scored": i < n_eval,
                 **{k: dev_ans[k][i] for k in middle},
                 "scores": {k: per_prompt[k][i] for k in runs}}
                for i, (p, ref) in enumerate(used)]
    probe_rows = [{"question": q, "before": probe_ans["base"][i], "after": probe_ans["tuned"][i],
                   **{k: probe_ans[k][i] for k in middle}} for i, q in enumerate(probes)]
    root = stage_root(StageName.GENERATIONS)
    with staging_dir(root) as tmp:
        atomic_write_json(tmp / "generations.json", {
            **{k: spec.describe() for k, spec in models.items()},
            "labels": {k: spec.label() for k, spec in models.items()},
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
            "dev_examples": n_show,
            "eval_examples": n_eval, "dev": examples, "probes": probe_rows,
            "scores": {k: {key: metrics[f"{k}_{key}"] for key in SCORES} for k in runs},
            "metrics": metrics})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=StageName.GENERATIONS, path=str(out), digest=digest,
                       files={"generations_json": str(out / "generations.json")},
                       metrics=metrics, device=pick_device())
