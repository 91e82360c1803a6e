"""The one typed config of a pipeline run.

Defaults are the embedded default: the bundled sample corpus and a tiny base model built
offline, so `PipelineConfig()` runs on a CPU with no network. Field descriptions are user-facing:
Prefect renders them as the Run form, and `schemas/pipeline_config.schema.json` is generated
from this model (`python -m tasks.config`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, \
    model_validator

from tasks.runtime.paths import DATA_DIR, SCHEMA_DIR
from tasks.runtime.files import atomic_write_text
from tasks.config.methods import METHODS

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]


def _not_blank(value: Any) -> Any:
    if isinstance(value, str) and not value.strip():
        raise ValueError("is empty: expected a path")
    return value


#: a path as the user meant it: `~` expanded, a relative one taken from the current directory
#: (the defaults are absolute paths into the repository)
UserPath = Annotated[Path, BeforeValidator(_not_blank),
                     AfterValidator(lambda p: Path(os.path.abspath(p.expanduser())))]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


#: what every training stage (train, preference) checkpoints and seeds the same way
SaveSteps = Annotated[int, Field(ge=1, description="Checkpoint (adapter, optimizer, scheduler, "
                                 "RNG) every N steps; a re-run of the same inputs resumes from "
                                 "the last one.")]
CheckpointsKept = Annotated[int, Field(ge=1, description="Checkpoints kept (older ones pruned).")]
Resume = Annotated[bool, Field(description="Resume from the last checkpoint of the same inputs "
                               "when one exists.")]
Seed = Annotated[int, Field(description="Training seed.")]


class DataConfig(_Section):
    source: UserPath = Field(default_factory=lambda: DATA_DIR / "sample" / "plant_care_qa.txt",
                             description="Input data: a file, or a directory whose .txt/.json/"
                                         ".jsonl files (in natural name order) form one data "
                                         "set of one format. A relative path is taken from the "
                                         "current directory. Default: the bundled sample "
                                         "corpus (data/sample/plant_care_qa.txt).")
    format: Literal["auto", "txt", "qa", "adgen", "alpaca", "instruct", "sharegpt",
                    "conversation"] = Field(
        "auto", description="auto: detected from the content. txt: blocks of 'question\\n"
        "answer' separated by blank lines. JSON array or JSON Lines of: qa {q, a}; adgen "
        "{content, summary}; alpaca {instruction, output[, input, system, history]}; instruct "
        "{instruct, query, answer}; sharegpt {conversations: [{from, value}]}; conversation "
        "(ChatGLM3) {conversations: [{role, content}]}.")
    on_error: Literal["fail", "skip"] = Field("fail", description="A malformed record: fail "
                                              "(stop, naming file, line/record and problem) "
                                              "or skip it (counted in the metrics and listed "
                                              "in the data report). Unreadable files always "
                                              "fail.")
    max_chars: int = Field(100_000, ge=1, description="Longest message accepted, in "
                           "characters; a longer one is malformed (a file without line "
                           "breaks?).")
    duplicates: Literal["drop", "keep", "fail"] = Field("drop", description="Records identical "
                                                        "to an earlier one (every turn): drop "
                                                        "them (counted and reported), keep "
                                                        "them, or fail.")
    system_prompt: str | None = Field(None, description="Optional system message put at the "
                                                        "start of every conversation that has "
                                                        "none.")
    train_ratio: float = Field(0.7, gt=0, lt=1, description="Share of records in train.json; "
                                                            "the rest go to dev.json.")
    shuffle_seed: int | None = Field(None, description="Shuffle records with this seed before "
                                                       "splitting; empty keeps file order.")
    split_by: Literal["record", "question"] = Field("record", description="record: exact "
                                                    "split. question: all records sharing a "
                                                    "first user message go to the same side "
                                                    "(no question in both train and dev), as "
                                                    "close to train_ratio as whole groups "
                                                    "allow.")
    tokenizer: UserPath | None = Field(None, description="Local tokenizer folder (Hugging Face "
                                       "format) for the token lengths in the data report; "
                                       "empty: jieba words.")


class BaseModelConfig(_Section):
    path: str | None = Field(None, description="Local Hugging Face causal-LM folder (or hub id "
                             "on a machine with hub access). Empty: build the embedded default "
                             "tiny model from the train split, offline.")
    vocab_size: int = Field(1600, ge=300, description="Embedded default: sentencepiece vocab.")
    hidden_size: int = Field(192, ge=64, multiple_of=64, description=(
        "Embedded default: hidden size, a multiple of 64 (the 4-bit CPU kernel of "
        "bitsandbytes needs it on recent CPUs; tasks/model/compat.py)."))
    num_layers: int = Field(2, ge=1, description="Embedded default: decoder layers.")
    num_heads: int = Field(4, ge=1, description="Embedded default: attention heads.")
    max_seq_len: int = Field(160, ge=32, description="Embedded default: pretraining context.")
    pretrain_epochs: float = Field(20.0, gt=0, description="Embedded default: passes over the "
                                                           "train split's plain text.")
    learning_rate: float = Field(1e-3, gt=0, description="Embedded default: pretraining LR.")
    seed: int = Field(0, description="Embedded default: init and data-order seed.")


class TrainConfig(_Section):
    method: Literal[tuple(METHODS)] = Field(
        "lora", description=" ".join(f"{m.name}: {m.description}" for m in METHODS.values()))
    lora_r: int = Field(16, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout on the adapter's "
                                "input; 0 (none) as peft and LLaMA-Factory default to.")
    target_modules: list[str] | None = Field(None, description="Module names to adapt; empty: "
                                             "every linear layer except the LM head.")
    epochs: float = Field(6.0, gt=0, description="Training epochs over train.json.")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (cosine "
                                        "decay); empty: the method's own default (" + ", ".join(
                                            f"{m.name} {m.learning_rate:g}"
                                            for m in METHODS.values()) + ").")
    use_dora: bool = Field(False, description="lora/qlora: DoRA, weight-decomposed LoRA (a "
                           "learned magnitude per output feature; peft `use_dora`); with qlora, "
                           "QDoRA. Slower per step; merged like LoRA.")
    use_rslora: bool = Field(False, description="lora/qlora: rank-stabilized LoRA, scale = "
                             "alpha / sqrt(r) instead of alpha / r (peft `use_rslora`), for "
                             "high ranks.")
    batch_size: int = Field(16, ge=1, description="Per-device batch size.")
    max_length: int = Field(160, ge=16, description="Max tokens per example (longer: truncated "
                                                    "and counted).")
    eval_steps: int = Field(20, ge=1, description="Evaluate dev loss every N optimizer steps.")
    packing: bool = Field(False, description="Padding-free batches (lora/qlora): each batch "
                          "is one row of its examples back to back, position ids restarting per "
                          "example, attention kept within each example (transformers "
                          "DataCollatorWithFlattening). Same loss as padded batches; no compute "
                          "spent on pad tokens.")
    compute_dtype: Dtype = Field("float32", description="qlora: compute dtype of the 4-bit "
                                                        "layers.")
    double_quant: bool = Field(True, description="qlora: nested (double) quantization.")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations in "
                                                "the backward pass (less memory, ~35% slower; "
                                                "lora/qlora); empty: on a GPU, on only when a "
                                                "full batch's activations (batch_size x "
                                                "max_length tokens, estimated) would take more "
                                                "than half the free GPU memory; off on a CPU.")
    shuffle: bool = Field(True, description="Shuffle the training examples each epoch (seeded); "
                          "off: file order, e.g. to compare two training loops batch by batch.")
    seed: Seed = 42
    num_virtual_tokens: int = Field(16, ge=1, description="ptuning: prefix length (virtual "
                                    "tokens per layer).")
    prefix_projection: bool = Field(False, description="ptuning: reparameterize the prefix "
                                    "through a 2-layer MLP (P-Tuning v2's projection).")
    encoder_hidden_size: int | None = Field(None, ge=1, description="ptuning with "
                                            "prefix_projection: MLP width (empty: the model's "
                                            "hidden size).")
    save_steps: SaveSteps = 50
    save_total_limit: CheckpointsKept = 2
    resume: Resume = True
    sanity_examples: int = Field(3, ge=0, description="Training examples dumped token by token "
                                 "with their labels (sanity_check.md) to show what is learned.")
    num_gpus: int = Field(0, ge=0, description="Data-parallel GPUs (torchrun DDP): 0 = all "
                          "visible CUDA devices; 1 = no launcher. Ignored on a CPU.")

    @model_validator(mode="after")
    def _what_the_method_supports(self) -> "TrainConfig":
        method = METHODS[self.method]
        if self.packing and not method.packing:
            raise ValueError(f"train.packing does not work with {self.method}: a P-Tuning v2 "
                             "prefix is prepended once per row, so packed examples after the "
                             "first would not see it")
        if self.gradient_checkpointing and not method.gradient_checkpointing:
            raise ValueError(f"train.gradient_checkpointing does not work with {self.method} "
                             "(peft prefix tuning does not support it)")
        for flag in ("use_dora", "use_rslora"):
            if getattr(self, flag) and not method.lora:
                raise ValueError(f"train.{flag} is a LoRA setting; train.method={self.method} "
                                 "trains no LoRA adapter")
        return self


class MergeConfig(_Section):
    dtype: Dtype | Literal["auto"] = Field("auto", description="dtype the adapter is merged in "
                                           "and the merged model saved as; auto: bfloat16 on a "
                                           "GPU, float32 on a CPU (the fastest there).")
    device: Device = Field("auto", description="Where the merge runs; auto: the GPU when there "
                           "is one (the base loads straight onto it), else the CPU.")


class QuantizeConfig(_Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit type.")
    double_quant: bool = Field(True, description="bitsandbytes: nested quantization of the "
                               "scales.")
    compute_dtype: Dtype | Literal["auto"] = Field("auto", description="Compute dtype of the "
                                                   "4-bit layers; auto: bfloat16 on a GPU, "
                                                   "float32 on a CPU.")
    torchao: Literal["auto", "on", "off"] = Field("auto", description="Also make a torchao int4 "
                                                  "model (tinygemm layout, PyTorch's fast CUDA "
                                                  "int4 matmul; registered as '<name>-int4-"
                                                  "torchao'); auto: on a GPU. It is made and "
                                                  "served on CUDA only.")
    group_size: int = Field(128, description="torchao int4: weights per scale/zero group.")

    @model_validator(mode="after")
    def _group_size(self) -> "QuantizeConfig":
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError("quantize.group_size must be one of 32, 64, 128, 256 (the tinygemm "
                             "kernel's group sizes)")
        return self


def _on_is_layers(value: Any) -> Any:
    """`benchmark.compile: true/false`, as configs wrote it before it named what it compiles."""
    return ({True: "layers", False: "off"}[value] if isinstance(value, bool) else value)


class BenchmarkConfig(_Section):
    device: Device = Field("auto", description="auto: CUDA when present, else CPU.")
    prompts: int = Field(4, ge=1, description="Dev prompts measured per model.")
    new_tokens: int = Field(32, ge=2, description="Tokens generated per prompt (forced, no "
                                                  "early stop), for a fair comparison.")
    batch_sizes: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="Batch sizes measured (prompts cycled to fill a batch); "
        "empty: [1] on a CPU, [1, 8] on a GPU.")
    engines: list[Literal["static", "generate"]] = Field(
        ["static", "generate"], min_length=1, description="static: the fast decode loop "
        "(static KV cache, CUDA graphs on a GPU). generate: Hugging Face generate, the "
        "reference.")
    compile: Annotated[Literal["off", "step", "layers"] | None, BeforeValidator(_on_is_layers)] \
        = Field(None, description="static engine: torch.compile before capturing the decode "
                "step (fused kernels; the compile time is reported apart, and paid once per model "
                "shape: PyTorch's compile caches live in the project's .cache/). layers: each "
                "decoder layer (one compiles, the others reuse it: seconds at 6 B); step: the "
                "whole step as one graph (minutes at 6 B on a cold cache); off. true means "
                "layers. Empty: layers on a GPU, off on a CPU.")
    repeats: int = Field(3, ge=1, description="Measurements per model and batch size, taken in "
                         "turns across the models (each in a fresh process); the table shows the "
                         "median and the min-max.")
    warmup: int = Field(1, ge=0, description="Untimed warm-up generations per measurement.")
    cpu_threads: int = Field(1, ge=0, description="torch CPU threads in each benchmark process "
                             "(0: torch's default, one per core — for a large model on a CPU). "
                             "1 is faster and steadier for small models, on a busy machine and "
                             "on a GPU.")


class ReportConfig(_Section):
    dev_examples: int = Field(8, ge=1, description="Dev prompts shown before/after.")
    eval_examples: int = Field(24, ge=1, description="Dev prompts scored before/after (ROUGE, "
                               "BLEU-4); capped at the dev set size.")
    probes_file: UserPath = Field(default_factory=lambda: DATA_DIR / "sample" / "ood_probes.txt",
                                  description="Out-of-domain probe questions, one per line "
                                              "(catastrophic-forgetting check). Default: "
                                              "data/sample/ood_probes.txt of the repository.")
    max_new_tokens: int = Field(64, ge=1, description="Max new tokens per answer (greedy).")
    batch_size: int = Field(16, ge=1, description="Prompts answered together (left-padded; "
                            "1: one at a time). A batch's float rounding can differ from one "
                            "prompt's, which can flip a near-tie between two tokens.")


class PreferenceConfig(_Section):
    method: Literal["none", "dpo", "orpo"] = Field(
        "none", description="Preference tuning after supervised fine-tuning: none; dpo (Direct "
        "Preference Optimization, TRL's DPOTrainer: a new LoRA adapter on the merged supervised "
        "model, which is also the reference); orpo (TRL's ORPO: no reference model).")
    source: UserPath = Field(default_factory=lambda: DATA_DIR / "sample" /
                             "plant_care_preferences.jsonl",
                             description="Preference pairs: a JSON or JSON Lines file (or a "
                             "folder of them) of prompt / chosen / rejected records. Default: "
                             "the sample's pairs (data/sample/plant_care_preferences.jsonl).")
    format: Literal["auto", "trl", "alpaca_ranking", "sharegpt_ranking"] = Field(
        "auto", description="auto: detected. trl {prompt, chosen, rejected} (text or "
        "messages); alpaca_ranking {instruction, input, chosen, rejected}; sharegpt_ranking "
        "{conversations, chosen, rejected}.")
    on_error: Literal["fail", "skip"] = Field("fail", description="A malformed pair: fail "
                                              "(naming file, line and record) or skip it.")
    train_ratio: float = Field(0.7, gt=0, lt=1, description="Share of pairs to train on; the "
                               "rest measure preference accuracy.")
    shuffle_seed: int | None = Field(None, description="Shuffle pairs with this seed before "
                                     "splitting; empty keeps file order.")
    quantized: bool = Field(False, description="Train the preference adapter on the merged "
                            "model loaded in 4 bits (QLoRA-DPO): least memory.")
    beta: float = Field(0.1, gt=0, description="How far the tuned model may move from the "
                        "reference (DPO's beta; ORPO's lambda).")
    epochs: float = Field(2.0, gt=0, description="Passes over the training pairs.")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (cosine "
                                        "decay). Empty: 1e-3 on the embedded default (a tiny "
                                        "model), 5e-6 on a model of your own.")
    batch_size: int = Field(8, ge=1, description="Pairs per device and step.")
    max_length: int = Field(256, ge=16, description="Max tokens of prompt + answer.")
    lora_r: int = Field(16, ge=1, description="LoRA rank of the preference adapter.")
    lora_alpha: int = Field(32, ge=1, description="LoRA alpha of the preference adapter.")
    gradient_checkpointing: bool | None = Field(None, description="Recompute activations in "
                                                "the backward pass (less memory, slower). "
                                                "Empty: on a GPU only.")
    group_by_length: bool = Field(True, description="Batch pairs of similar length together: "
                                  "less padding, the same pairs per epoch.")
    liger: bool | None = Field(None, description="Liger kernels (RMSNorm, RoPE, SwiGLU) in the "
                               "model. Empty: on a GPU where liger-kernel is installed.")
    eval_steps: int = Field(20, ge=1, description="Evaluate on the dev pairs every N steps.")
    save_steps: SaveSteps = 50
    save_total_limit: CheckpointsKept = 2
    resume: Resume = True
    seed: Seed = 42

    def for_base(self, embedded: bool) -> "PreferenceConfig":
        """This config with the learning rate filled in for the base model."""
        if self.learning_rate is not None:
            return self
        return self.model_copy(update={"learning_rate": 1e-3 if embedded else 5e-6})


class RegistryConfig(_Section):
    model_name: str = Field("plant-care-chat", description="MLflow registered model name; the "
                            "int4 model is registered as '<name>-int4'.")


class PipelineConfig(_Section):
    """A full pipeline run: data -> base -> train -> merge -> quantize -> benchmark ->
    generations -> report -> register."""

    data: DataConfig = Field(default_factory=DataConfig, description="Input data and split.")
    base: BaseModelConfig = Field(default_factory=BaseModelConfig, description="Base model.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    merge: MergeConfig = Field(default_factory=MergeConfig, description="Adapter merge.")
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig,
                                     description="int4 quantization of the merged model.")
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig,
                                       description="Throughput benchmark.")
    report: ReportConfig = Field(default_factory=ReportConfig,
                                 description="Before/after generation report.")
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig,
                                         description="Preference tuning (DPO, ORPO) after "
                                                     "supervised fine-tuning.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig,
                                     description="MLflow Model Registry.")
    experiment: str = Field("finetune-pipeline", description="MLflow experiment name.")

    @model_validator(mode="after")
    def _preference_needs_a_merged_model(self) -> "PipelineConfig":
        if self.preference.method != "none" and not METHODS[self.train.method].mergeable:
            raise ValueError(f"preference.method={self.preference.method} tunes the merged "
                             f"supervised model, and train.method={self.train.method} makes "
                             "none (a prefix is not merged): use lora or qlora")
        return self


SCHEMA_PATH = SCHEMA_DIR / "pipeline_config.schema.json"


def json_schema(model: type[BaseModel]) -> dict:
    """The JSON Schema (draft 2020-12) of a config model, as committed under schemas/."""
    return {**model.model_json_schema(), "$schema": "https://json-schema.org/draft/2020-12/schema"}


def config_schema() -> dict:
    return json_schema(PipelineConfig)


def write_schema(path: Path = SCHEMA_PATH, model: type[BaseModel] = PipelineConfig) -> Path:
    """Regenerate a committed JSON Schema (a test checks that each is current)."""
    return atomic_write_text(path, json.dumps(json_schema(model), ensure_ascii=False, indent=2,
                                              default=str) + "\n")

