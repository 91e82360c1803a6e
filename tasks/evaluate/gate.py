"""Champion gate: does a retrained model (the challenger) replace the current champion?

Both models answer the SAME dev prompts (the current dev split) with the same settings
(`report.*`): the challenger's answers and scores are the generations stage's ("tuned"), and
the champion answers through the same path (ROUGE-1/2/L F1 on jieba words, BLEU-4 on
characters, 0-100). The out-of-domain probes have no reference answers, so forgetting is
measured as *retention*: how close a model's probe answers stay to the base model's (mean ROUGE-L, 0-100;
the base's are the generations stage's "before" column).

The challenger is promoted only if it beats the champion on the configured metric by more than
`min_improvement` AND its retention is at most `max_ood_drop` points below the champion's AND,
with `max_preference_drop` set (a run with preference tuning), its preference accuracy on the
dev pairs (tasks/evaluate/preference_eval.py) is at most that many points below the
champion's. The first model ever is promoted; an unchanged model (same content digest) is
kept without being evaluated again. Pure: no Prefect, no MLflow (the flow moves the registry alias).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.runtime.results import Metrics, StageName, StageResult, stage_entry, stage_output, \
    stage_root
from tasks.runtime.files import atomic_write_json, publish_dir, read_json, staging_dir
from tasks.config import ReportConfig
from tasks.model.model_spec import ModelSpec

Metric = Literal["rouge_1", "rouge_2", "rouge_l", "bleu_4"]


class GateConfig(BaseModel):
    """When a nightly retrained model takes the registry alias from the current champion."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    metric: Metric = Field("rouge_l", description="Dev-set score the challenger must improve "
                           "(ROUGE-1/2/L F1 or BLEU-4, 0-100), both models scored on the "
                           "current dev split's first report.eval_examples prompts.")
    min_improvement: float = Field(0.0, description="Promote only if challenger - champion > "
                                   "this many points (0: strictly better; negative: tolerate "
                                   "that much regression).")
    max_ood_drop: float = Field(10.0, ge=0, description="Out-of-domain bound: the challenger's "
                                "probe-answer retention (ROUGE-L vs the base model's answers) "
                                "may be at most this many points below the champion's.")
    max_preference_drop: float | None = Field(None, ge=0, description="With preference "
                                              "tuning: the challenger's preference accuracy on "
                                              "the dev pairs may be at most this many points "
                                              "(0-100) below the champion's (0: must not fall). "
                                              "Empty: not checked.")
    alias: str = Field("champion", description="MLflow registry alias that marks the model in "
                       "production.")


@stage_output
class ChampionEvaluation:
    """The champion's answers, scored as the generations stage scores (`scores`: score name ->
    value, tasks/evaluate/scoring.py)."""

    evaluation_json: Path
    eval_examples: int
    scores: Metrics


def evaluate_champion(spec: ModelSpec, dev_json: Path, probes_file: Path, cfg: ReportConfig
                      ) -> StageResult:
    """The champion answers what the generations stage's models answered, as they did (the same
    prompts, order, batches and report settings: tasks/evaluate/generations.py); its dev answers
    are scored -> outputs/evaluate_champion/<digest>/evaluation.json."""
    from tasks.evaluate.generations import Prompts, answer_and_score

    prompts = Prompts.read(dev_json, probes_file, cfg)
    run = answer_and_score(spec, prompts, cfg)
    scores = run.metrics(prompts, cfg.max_new_tokens)
    metrics = {**scores, "eval_examples": float(prompts.n_eval)}
    root = stage_root(StageName.EVALUATE_CHAMPION)
    with staging_dir(root) as tmp:
        atomic_write_json(tmp / "evaluation.json", {
            "model": spec.describe(), "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.batch_size, "eval_examples": prompts.n_eval,
            "dev": [{"reference": ref, "answer": a, "scores": s, "scored": i < prompts.n_eval}
                    for i, ((_, ref), a, s) in enumerate(zip(prompts.dev, run.dev, run.scores))],
            "probes": [{"question": q, "answer": a} for q, a in zip(prompts.probes, run.probes)],
            "metrics": metrics})
        out, digest = publish_dir(tmp, root)
    return StageResult(stage=StageName.EVALUATE_CHAMPION, path=str(out), digest=digest,
                       out=ChampionEvaluation(evaluation_json=out / "evaluation.json",
                                              eval_examples=prompts.n_eval, scores=scores))


@stage_entry(StageName.EVALUATE_CHAMPION, model_libs=True, own_process=True)
def evaluate_champion_stage(spec: ModelSpec, data: StageResult, probes_file: Path,
                            cfg: ReportConfig) -> StageResult:
    """The nightly gate's stage: the champion's answers and dev scores, as the generations
    stage's models'."""
    return evaluate_champion(spec, data.out.dev_json, probes_file, cfg)


def probe_answers(path: Path) -> dict[str, list[str]]:
    """A file's probe answers by column: the champion's evaluation.json ("answer"), or the
    generations stage's generations.json ("before": the base, "after": the tuned model)."""
    rows = read_json(path)["probes"]
    return {column: [row[column] for row in rows] for column in rows[0] if column != "question"} \
        if rows else {}


def ood_retention(answers: list[str], base_answers: list[str]) -> float:
    """Mean ROUGE-L (0-100) of a model's probe answers against the base model's answers to the
    same probes: 100 = answers out-of-domain questions exactly as the base did."""
    from tasks.evaluate.scoring import score_answer

    if len(answers) != len(base_answers) or not answers:
        raise ValueError(f"probe answers do not line up ({len(answers)} vs "
                         f"{len(base_answers)}): were both models given the same probes?")
    return sum(score_answer(a, b)["rouge_l"] for a, b in zip(answers, base_answers)) / \
        len(answers)


@dataclass(frozen=True)
class Candidate:
    """One model as the gate sees it: its registry version, content digest and, once
    evaluated, its dev score on the gate's metric, its out-of-domain retention and (with
    preference tuning) its preference accuracy on the dev pairs, 0-100."""

    version: str | None
    digest: str
    score: float | None = None
    ood: float | None = None
    preference: float | None = None


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str
    metric: str
    challenger: Candidate
    champion: Candidate | None
    min_improvement: float
    max_ood_drop: float
    max_preference_drop: float | None = None

    @property
    def outcome(self) -> str:
        return "promote" if self.promote else "keep"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = self.outcome
        return d

    def metrics(self) -> dict[str, float]:
        """Both scores, flat, for MLflow (absent ones omitted)."""
        out = {}
        for who, c in (("challenger", self.challenger), ("champion", self.champion)):
            if c is not None and c.score is not None:
                out[f"{who}_{self.metric}"] = c.score
            if c is not None and c.ood is not None:
                out[f"{who}_ood_retention"] = c.ood
            if c is not None and c.preference is not None:
                out[f"{who}_preference_accuracy"] = c.preference
        out["promoted"] = float(self.promote)
        return out

    def markdown(self) -> str:
        def cell(c: Candidate | None, attr: str) -> str:
            value = getattr(c, attr) if c else None
            return "-" if value is None else f"{value:.2f}"

        ch, cp = self.challenger, self.champion
        return "\n".join([
            f"## Champion gate: **{self.outcome.upper()}**", "", self.reason, "",
            "| | challenger | champion |", "|---|---|---|",
            f"| registry version | {ch.version or '-'} | {cp.version if cp else '-'} |",
            f"| model digest | `{ch.digest[:12]}` | {f'`{cp.digest[:12]}`' if cp else '-'} |",
            f"| dev {self.metric} (same dev set) | {cell(ch, 'score')} | {cell(cp, 'score')} |",
            f"| out-of-domain retention | {cell(ch, 'ood')} | {cell(cp, 'ood')} |",
            *([f"| dev preference accuracy (%) | {cell(ch, 'preference')} | "
               f"{cell(cp, 'preference')} |"] if self.max_preference_drop is not None else []),
            "", f"Rule: promote if challenger - champion > {self.min_improvement:g} on "
            f"{self.metric} and the retention drop <= {self.max_ood_drop:g} points"
            + (f" and the preference accuracy drop <= {self.max_preference_drop:g} points."
               if self.max_preference_drop is not None else ".")])


def decide(challenger: Candidate, champion: Candidate | None, cfg: GateConfig) -> GateDecision:
    """The gate's rule (see the module docstring). Evaluated candidates need score and ood."""
    def verdict(promote: bool, reason: str) -> GateDecision:
        return GateDecision(promote, reason, cfg.metric, challenger, champion,
                            cfg.min_improvement, cfg.max_ood_drop, cfg.max_preference_drop)

    if champion is None:
        return verdict(True, f"First model: there is no '{cfg.alias}' yet, so the challenger "
                             "becomes it.")
    if champion.digest == challenger.digest:
        return verdict(False, f"Unchanged model: the challenger is the current '{cfg.alias}' "
                              f"(version {champion.version}); nothing to do.")
    if None in (challenger.score, challenger.ood, champion.score, champion.ood):
        raise ValueError("both candidates must be evaluated (score and ood) before deciding")
    checks_preference = cfg.max_preference_drop is not None
    if checks_preference and None in (challenger.preference, champion.preference):
        raise ValueError("gate.max_preference_drop needs both candidates' preference accuracy "
                         "(a run with preference.method)")
    gain = challenger.score - champion.score
    drop = champion.ood - challenger.ood
    if gain <= cfg.min_improvement:
        return verdict(False, f"Kept the champion: challenger {cfg.metric} "
                              f"{challenger.score:.2f} vs champion {champion.score:.2f} "
                              f"({gain:+.2f}; needs > {cfg.min_improvement:+g}).")
    if drop > cfg.max_ood_drop:
        return verdict(False, f"Kept the champion: {cfg.metric} improved by {gain:+.2f}, but "
                              f"out-of-domain retention fell {drop:.2f} points "
                              f"({champion.ood:.2f} -> {challenger.ood:.2f}; bound "
                              f"{cfg.max_ood_drop:g}).")
    fall = champion.preference - challenger.preference if checks_preference else 0.0
    if checks_preference and fall > cfg.max_preference_drop:
        return verdict(False, f"Kept the champion: {cfg.metric} improved by {gain:+.2f}, but "
                              f"preference accuracy on the dev pairs fell {fall:.2f} points "
                              f"({champion.preference:.2f} -> {challenger.preference:.2f}; "
                              f"bound {cfg.max_preference_drop:g}).")
    return verdict(True, f"Promoted: {cfg.metric} {challenger.score:.2f} vs champion "
                         f"{champion.score:.2f} ({gain:+.2f}), out-of-domain retention "
                         f"{challenger.ood:.2f} vs {champion.ood:.2f} (drop {drop:.2f} <= "
                         f"{cfg.max_ood_drop:g})"
                         + (f", preference accuracy {challenger.preference:.2f} vs "
                            f"{champion.preference:.2f}." if checks_preference else "."))
