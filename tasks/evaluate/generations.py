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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, staging_dir
from tasks.config import ReportConfig
from tasks.model.model_spec import ModelSpec
from tasks.model.modeling import Message, answer, load_tokenizer, pick_device, release
from tasks.evaluate.scoring import COLUMNS, SCORES, average, read_dev_prompts, read_probes, \
    score_answer

#: a CPU model below this size decodes faster on one thread: its per-token matmuls are too small
#: to split, and on 2 busy cores intra-op threads made decoding ~8x slower (75 vs 9.6 ms/token)
SMALL_MODEL_PARAMS = 50_000_000


@stage_output
class Generations:
    """The answers of base, tuned (and supervised) to the dev prompts and probes, scored:
    `scores` holds "<role>_<score>" (role base, supervised or tuned; tasks/evaluate/scoring.py)."""

    generations_json: Path
    dev_examples: int
    eval_examples: int
    probe_count: int
    scores: Metrics


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
# One generation path: what each model answers, and its scores
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompts:
    """What every model of a comparison answers, in one order (batches alike, so the float
    rounding of a batch is alike too): the first dev prompts with their references -- the first
    `n_eval` of them scored, the first `n_show` shown -- then the out-of-domain probes."""

    dev: list[tuple[list[Message], str]]
    probes: list[str]
    n_show: int
    n_eval: int

    @classmethod
    def read(cls, dev_json: Path, probes_file: Path, cfg: ReportConfig) -> "Prompts":
        dev = read_dev_prompts(Path(dev_json))
        n_show, n_eval = min(cfg.dev_examples, len(dev)), min(cfg.eval_examples, len(dev))
        return cls(dev[:max(n_show, n_eval)], read_probes(Path(probes_file)), n_show, n_eval)

    def messages(self) -> list[list[Message]]:
        return [p for p, _ in self.dev] + [[{"role": "user", "content": q}] for q in self.probes]


@dataclass(frozen=True)
class ModelAnswers:
    """One model's answers to `Prompts`, each dev answer scored against its reference."""

    dev: list[str]
    probes: list[str]
    scores: list[dict[str, float]]
    new_tokens: list[int]
    seconds: float

    def metrics(self, prompts: Prompts, max_new_tokens: int) -> dict[str, float]:
        """Scores averaged over the first `n_eval` dev answers; answer length, EOS rate and
        generation time over every answer."""
        n = len(self.new_tokens)
        return {**average(self.scores[:prompts.n_eval]),
                "mean_answer_chars": sum(map(len, self.dev + self.probes)) / n,
                "mean_new_tokens": sum(self.new_tokens) / n,
                "eos_rate": sum(t < max_new_tokens for t in self.new_tokens) / n,
                "generate_seconds": self.seconds}


def answer_and_score(spec: ModelSpec, prompts: Prompts, cfg: ReportConfig) -> ModelAnswers:
    """One model answers every prompt greedily (`answer_prompts`); its dev answers are scored.
    The generations stage runs it per model, the nightly gate for the champion."""
    run = answer_prompts(spec, prompts.messages(), cfg.max_new_tokens, cfg.batch_size)
    answers, n_dev = run["answers"], len(prompts.dev)
    return ModelAnswers(answers[:n_dev], answers[n_dev:],
                        [score_answer(a, ref) for a, (_, ref) in zip(answers, prompts.dev)],
                        run["new_tokens"], run["seconds"])


# ---------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------
def generate_answers(base: ModelSpec, tuned: ModelSpec, dev_json: Path, probes_file: Path,
                     cfg: ReportConfig, supervised: ModelSpec | None = None) -> StageResult:
    """`base` and `tuned` (and `supervised`, a third column) answer the dev prompts and the
    probes; the dev answers are scored -> outputs/generations/<digest>/generations.json."""
    prompts = Prompts.read(dev_json, probes_file, cfg)
    models = {"base": base, **({"supervised": supervised} if supervised else {}),
              "tuned": tuned}
    runs = {role: answer_and_score(spec, prompts, cfg) for role, spec in models.items()}

    scores = {f"{k}_{key}": v for k, r in runs.items()
              for key, v in r.metrics(prompts, cfg.max_new_tokens).items()}
    metrics = {"dev_examples": float(prompts.n_show), "eval_examples": float(prompts.n_eval),
               "probe_count": float(len(prompts.probes)), **scores}

    examples = [{"prompt": p, "reference": ref,
                 **{COLUMNS[k]: r.dev[i] for k, r in runs.items()},
                 "scored": i < prompts.n_eval, "scores": {k: r.scores[i] for k, r in runs.items()}}
                for i, (p, ref) in enumerate(prompts.dev)]
    probe_rows = [{"question": q, **{COLUMNS[k]: r.probes[i] for k, r in runs.items()}}
                  for i, q in enumerate(prompts.probes)]
    root = stage_root(StageName.GENERATIONS)
    with staging_dir(root) as tmp:
        atomic_write_json(tmp / "generations.json", {
            **{k: spec.describe() for k, spec in models.items()},
            "labels": {k: spec.label() for k, spec in models.items()},
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size,
            "dev_examples": prompts.n_show,
            "eval_examples": prompts.n_eval, "dev": examples, "probes": probe_rows,
            "scores": {k: {key: metrics[f"{k}_{key}"] for key in SCORES} for k in runs},
            "metrics": metrics})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=StageName.GENERATIONS, path=str(out), digest=digest,
                       device=pick_device(), out=Generations(
        generations_json=out / "generations.json", dev_examples=prompts.n_show,
        eval_examples=prompts.n_eval, probe_count=len(prompts.probes), scores=scores))


@stage_entry(StageName.GENERATIONS, model_libs=True, own_process=True)
def stage(base: ModelSpec, tuned: ModelSpec, data: StageResult, probes_file: Path,
          cfg: ReportConfig, supervised: ModelSpec | None = None) -> StageResult:
    """The stage: the models' answers on the conversations stage's dev split and the probes."""
    return generate_answers(base, tuned, data.out.dev_json, probes_file, cfg, supervised)
