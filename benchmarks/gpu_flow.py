"""The whole pipeline flow at a real size: `flows/pipeline.py` through Prefect (a temporary
server) with an MLflow store, every stage from data to register, measured per stage.

    PYTHONPATH=. python benchmarks/gpu_flow.py                 # 6 B (ChatGLM2-6B shape) on a GPU
    PYTHONPATH=. python benchmarks/gpu_flow.py --size tiny     # the same, in a minute on a CPU
    PYTHONPATH=. python benchmarks/gpu_flow.py --original chatglm3   # a ChatGLM3-6B folder
    PYTHONPATH=. python benchmarks/gpu_flow.py --preference dpo      # + QLoRA-DPO after QLoRA

The base is a random-weight model of `--size` (benchmarks/models.py), built directly on the
device in bf16, saved as a Hugging Face folder and passed as `base.path`: speed and memory, not
quality. With `--original chatglm3` it is a folder in ChatGLM3-6B's own format instead (its
published config, tensor names and a SentencePiece tokenizer), which the base stage converts.
With `--preference dpo` the flow tunes the merged model on the sample's preference pairs with
QLoRA-DPO (README "Preference tuning") before it quantizes.
Writes benchmarks/results/gpu_flow_[<original>_|<preference>_]<size>.json (per stage: seconds and
where they went by phase, device, peak CUDA and host memory, cache hit; the benchmark rows; the
disk: free space at the start, the peak used by the run, what the project home holds at the end
and what each stage wrote) and prints the table docs/benchmarks.md shows. While the flow runs,
gpu_flow_..._killed.json beside it holds the run so far, as a killed run's record (`Record`): a
device call's time limit ends the process with SIGKILL, and the stages it completed keep their
figures. A finished run removes it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import shlex
import sys
import shutil
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import page

LIBS = ("torch", "transformers", "peft", "bitsandbytes", "prefect", "mlflow", "torchao")


def versions() -> dict[str, str]:
    out = {}
    for lib in LIBS:
        try:
            out[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            out[lib] = "absent"
    return out


def config(base_dir: Path, gpu: bool, epochs: float, repeats: int,
           preference: str | None = None) -> dict:
    """The run's PipelineConfig: QLoRA in bf16 on a GPU, short training, a small report; with
    `preference`, QLoRA-DPO (or ORPO) for 0.3 epochs of the sample's pairs after it."""
    cfg = {
        "base": {"path": str(base_dir)},
        "train": {"method": "qlora", "epochs": epochs, "batch_size": 8, "max_length": 160,
                  "eval_steps": 10_000, "save_steps": 10_000, "learning_rate": 2e-4,
                  "compute_dtype": "bfloat16" if gpu else "float32"},
        # the static engine only: HF generate, the eager reference, is measured by gpu_speed.py
        # (at 6 B it would add ~5 minutes over five variants, past one device call)
        "benchmark": {"prompts": 4, "new_tokens": 32, "repeats": repeats, "engines": ["static"],
                      "batch_sizes": [1, 8] if gpu else [1, 2]},
        "report": {"dev_examples": 4, "eval_examples": 8, "max_new_tokens": 32},
        "registry": {"model_name": "gpu-flow-chat"},
        "experiment": "gpu-flow",
    }
    if preference:       # one device call: no torchao model, the benchmark at batch 1, eager
        cfg["preference"] = {"method": preference, "quantized": True, "epochs": 0.3,
                             "batch_size": 8, "max_length": 160, "eval_steps": 10_000,
                             "save_steps": 10_000}
        cfg["quantize"] = {"torchao": "off"}
        cfg["benchmark"] |= {"batch_sizes": [1], "compile": False}
        cfg["report"] |= {"dev_examples": 2, "eval_examples": 4, "max_new_tokens": 16}
    return cfg


class DiskWatch:
    """The disk's free space under `path`, sampled every `every` seconds while it lasts: the
    run's peak use is the start's free space minus the least seen."""

    def __init__(self, path: Path, every: float = 0.5):
        self.path, self.every = path, every
        self.start = self.least = shutil.disk_usage(path).free
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(self.every):
            self.least = min(self.least, shutil.disk_usage(self.path).free)

    def __enter__(self) -> "DiskWatch":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()
        self.least = min(self.least, shutil.disk_usage(self.path).free)

    def figures(self) -> dict:
        return {"start_free_gb": round(self.start / 1e9, 2),
                "peak_used_gb": round((self.start - self.least) / 1e9, 2)}


def completed_stages(parent_id: str) -> dict[str, dict]:
    """The stages pipeline run `parent_id` has completed so far, as its MLflow child runs say
    (seconds, peaks, phases, cache hit), in the order they ran."""
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    experiment = client.get_run(parent_id).info.experiment_id
    out = {}
    for run in client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}' and "
                                  "attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time ASC"]):
        if "stage_seconds" not in run.data.metrics:      # a step (register), not a stage
            continue
        fig = logged_figures(run.data.metrics)
        out[run.info.run_name] = {
            "seconds": round(fig["seconds"], 2),
            "device": "cuda" if fig["peak_cuda_mib"] else "cpu",
            "peak_cuda_mib": round(fig["peak_cuda_mib"], 1),
            "peak_rss_mib": round(fig["peak_rss_mib"], 1),
            "cached": run.data.tags.get("pipeline.cache") == "hit",
            "phases": where_the_time_went(fig["seconds"], fig["phases"])}
    return out


def latest_parent(since: float, kind: str = "pipeline") -> str | None:
    """The run of flow `kind` started in this project home since `since` (a time.time()), if
    any: the one in progress, or the one an error has just ended."""
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`pipeline.kind` = '{kind}' and "
                              f"attributes.start_time >= {int(since * 1000)}", max_results=1,
                              order_by=["attributes.start_time DESC"]) if experiments else []
    return runs[0].info.run_id if runs else None


class Record(threading.Thread):
    """Every `every` seconds while the flow runs, `target` holds the run so far as a killed
    run's record (`base`, the stages completed, the disk so far): what is left if the process
    is killed before it writes the finished run's figures over it."""

    def __init__(self, target: Path, base: dict, disk: DiskWatch, every: float = 5.0,
                 kind: str = "pipeline"):
        super().__init__(daemon=True)
        self.target, self.base, self.disk, self.every = target, base, disk, every
        self.kind = kind
        self._done = threading.Event()
        self.since = time.time()
        self.parent: str | None = None        # the flow's MLflow run, once it has one

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.write("while the flow ran (the record of a run that did not finish)")

    def write(self, killed: str) -> None:
        try:
            self.parent = self.parent or latest_parent(self.since, self.kind)
            stages = completed_stages(self.parent) if self.parent else {}
        except Exception as error:                 # the store is busy: the next tick tries again
            print(f"[gpu_flow] record not updated: {type(error).__name__}: {error}", flush=True)
            return
        record = {**self.base, "killed": killed, "stages_done": stages,
                  "disk": self.disk.figures()}
        tmp = self.target.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        tmp.replace(self.target)

    def stop(self) -> None:
        self._done.set()
        self.join()


def allocated_gb(folder: Path) -> float:
    """Bytes allocated under `folder` (a hard-linked file counted once, as `du` does), GB."""
    seen, total = set(), 0
    for root, _, files in os.walk(folder):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return round(total / 1e9, 2)


def computed_figures(row: dict) -> dict:
    """A stage's seconds and peaks when it was computed: this run's, or for a cache hit those of
    the MLflow child run that computed it (an earlier flow run on the same PIPELINE_HOME, e.g.
    one that a device call's time limit ended; docs/design.md "Failure modes")."""
    if not row["cached"]:
        return {"seconds": row["seconds"], "peak_cuda_mib": row["peak_cuda_mib"] or 0.0,
                "peak_rss_mib": row["peak_rss_mib"], "phases": row.get("phases", {})}
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    m = MlflowClient(tracking_uri()).get_run(row["from_run"]).data.metrics
    return {**logged_figures(m), "computed_in_run": row["from_run"],
            "hit_seconds": round(row["seconds"], 2)}


def logged_figures(metrics: dict[str, float]) -> dict:
    """A stage's seconds, peaks and phases, as its MLflow child run's metrics hold them
    (flows/running.py `PipelineRun.stage`)."""
    prefix = "stage_phase_seconds."
    return {"seconds": metrics["stage_seconds"],
            "peak_cuda_mib": metrics.get("stage_peak_cuda_mib", 0.0),
            "peak_rss_mib": metrics.get("stage_peak_rss_mib", 0.0),
            "phases": {k[len(prefix):]: v for k, v in metrics.items() if k.startswith(prefix)}}


def where_the_time_went(seconds: float, phases: dict[str, float]) -> dict[str, float]:
    """A stage's seconds by phase (load, save, hash, process_start; a benchmark's or a
    training's child processes summed), and `other`: the rest, the stage's own work."""
    out = {k: round(v, 2) for k, v in sorted(phases.items())}
    return out | {"other": round(max(seconds - sum(phases.values()), 0.0), 2)}


def stage_table(out: dict) -> dict[str, dict]:
    """Per stage: seconds, device, peaks, as computed (a cache hit's from the run that computed
    it). The benchmark measures in child processes: its peaks are the largest of the flow
    process and its children."""
    stages = {}
    for row in out["stages"] + out["steps"]:
        fig = computed_figures(row)
        entry = {**fig, "seconds": round(fig["seconds"], 2), "device": row["device"] or "cpu",
                 "peak_cuda_mib": round(fig["peak_cuda_mib"], 1),
                 "peak_rss_mib": round(fig["peak_rss_mib"], 1), "cached": row["cached"],
                 "phases": where_the_time_went(fig["seconds"], fig.get("phases", {}))}
        if row["stage"] == "benchmark":
            for b in out["benchmark"]:
                entry["peak_rss_mib"] = max(entry["peak_rss_mib"], round(b["peak_rss_mib"], 1))
                entry["peak_cuda_mib"] = max(entry["peak_cuda_mib"],
                                             round(b["peak_cuda_mib"] or 0.0, 1))
        stages[row["stage"]] = entry
    return stages


def build_base(original: str | None, size: str, out: Path, device: str) -> int:
    """Save the run's random-weight base: a native folder of `size`, or a folder in `original`'s
    own format (its published shape at 6 B, the tests' small one otherwise); its parameters."""
    import torch

    from benchmarks.models import CHATGLM3_6B, build_random_model

    if not original:
        return build_random_model(size, out, device)[1]
    from tests._chatglm import make_original, original_tensors

    shape = CHATGLM3_6B if size == "6b" else None
    make_original(out, original, shape=shape, device=device,
                  dtype=torch.float16 if device == "cuda" else torch.float32)
    config = json.loads((out / "config.json").read_text())
    return sum(math.prod(s) for s, _ in original_tensors(config).values())


def conversion_figures(base_row: dict) -> dict:
    """What the base stage's conversion.json says (seconds, peak host RSS, tensors, bytes)."""
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    path = MlflowClient(tracking_uri()).get_run(base_row["from_run"]).data.tags[
        "pipeline.output_path"]
    return json.loads((Path(path) / "conversion.json").read_text())


def preference_figures(out: dict) -> dict:
    """The preference stage's throughput and memory, and each model's preference accuracy on
    the dev pairs (random weights: speed, not quality)."""
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri())
    runs = {r["stage"]: r["from_run"] for r in out["stages"]}
    tuned = client.get_run(runs["preference"]).data.metrics
    scored = client.get_run(runs["preference_eval"]).data.metrics
    return {"train_tokens_per_s": tuned.get("train_tokens_per_s"),
            "train_tokens": tuned.get("train_tokens"),
            "train_seconds": tuned.get("train_seconds"),
            "peak_gpu_memory_gib": tuned.get("peak_gpu_memory_gib"),
            "steps": tuned.get("global_step"),
            "preference_accuracy": {k.split("_preference")[0]: v for k, v in scored.items()
                                    if k.endswith("_preference_accuracy")}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b", help="a shape of benchmarks/models.py (default 6b)")
    ap.add_argument("--home", type=Path, help="PIPELINE_HOME of the run (default: a temp dir); "
                    "run again on the same one to resume from the cache")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                    help="folder of gpu_flow_<size>.json")
    ap.add_argument("--epochs", type=float, default=0.5, help="QLoRA epochs over the sample")
    ap.add_argument("--repeats", type=int, default=1, help="benchmark repeats")
    ap.add_argument("--original", choices=["chatglm3"], help="the base as a folder in this "
                    "model's own format (converted by the base stage)")
    ap.add_argument("--preference", choices=["dpo", "orpo"], help="preference tuning after the "
                    "supervised stage")
    args = ap.parse_args()
    home = args.home or Path(tempfile.mkdtemp(prefix="gpu-flow-"))
    os.environ["PIPELINE_HOME"] = str(home)
    from flows.ops import startup

    startup.prepare()                                 # before Prefect is imported
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    # the command line's temporary server, in a session of its own: a SIGTERM to the run's
    # process group (`timeout`) leaves it up while the flow reports its end
    os.environ["PREFECT_API_URL"] = startup.launch_temporary_server()

    import torch

    gpu = torch.cuda.is_available()
    start = time.perf_counter()
    name = f"{args.original}_{args.size}" if args.original else args.size
    base_dir, built = home / "models" / name, home / "models" / f"{name}.json"
    if built.is_file():                               # a resumed run on the same --home
        params, build_seconds = json.loads(built.read_text())
    else:
        params = build_base(args.original, args.size, base_dir, "cuda" if gpu else "cpu")
        build_seconds = time.perf_counter() - start
        built.write_text(json.dumps([params, build_seconds]))
    print(f"[gpu_flow] {name}: {params / 1e9:.2f} B parameters, built and saved in "
          f"{build_seconds:.1f} s -> {base_dir}", flush=True)

    from flows.pipeline import pipeline
    from tasks.config import PipelineConfig

    cfg = PipelineConfig.model_validate(config(base_dir, gpu, args.epochs, args.repeats,
                                               args.preference))
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"gpu_flow_{args.preference + '_' if args.preference else ''}{name}.json"
    base = {"gpu": torch.cuda.get_device_name(0) if gpu else "none (CPU)",
            "params": params, "date": datetime.date.today().isoformat(),
            "command": "PYTHONPATH=. python " + " ".join(map(shlex.quote, sys.argv)),
            "versions": versions(), "build_model_seconds": round(build_seconds, 1)}
    startup.ready()                                   # the server answers
    start = time.perf_counter()
    with DiskWatch(home) as disk:
        record = Record(target.with_name(f"{target.stem}_killed.json"), base, disk)
        record.start()
        try:
            out = pipeline(cfg)
        except BaseException as error:      # an error (a SIGTERM kills before this runs)
            record.stop()
            record.write(f"by {type(error).__name__}: {str(error).strip()[:300]} after "
                         f"{time.perf_counter() - start:.0f} s of the flow")
            raise
        record.stop()
    record.target.unlink(missing_ok=True)
    flow_seconds = time.perf_counter() - start
    result = {
        **base, "flow_seconds": round(flow_seconds, 1), "stages": stage_table(out),
        "benchmark": [{k: b[k] for k in ("variant", "engine", "batch", "decode_tok_s",
                                         "aggregate_tok_s", "ttft_ms", "peak_cuda_mib",
                                         "peak_rss_mib", "compile_s", "compiled", "dtype",
                                         "quant", "repeats")} for b in out["benchmark"]],
        "benchmark_failed": out.get("benchmark_failed", []),
        "registered": out["registered"], "mlflow_run_id": out["mlflow_run_id"],
        "disk": {**disk.figures(), "home_gb": {
            p.name: allocated_gb(p) for p in sorted(home.iterdir()) if p.is_dir()},
            "home_total_gb": allocated_gb(home),
            # what each stage wrote (mlruns/ hard-links these files: not a second copy)
            "outputs_gb": {p.name: allocated_gb(p) for p in sorted((home / "outputs").iterdir())
                           if p.is_dir() and not p.name.endswith("-checkpoints")}},
    }
    if args.original:
        base = next(r for r in out["stages"] if r["stage"] == "base")
        result["conversion"] = conversion_figures(base)
    if args.preference:
        result["preference"] = preference_figures(out)
    target.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")
    print("\n".join(page.gpu_flow(result)))     # as docs/benchmarks.md shows it
    print(f"[gpu_flow] flow {flow_seconds:.1f} s; wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
