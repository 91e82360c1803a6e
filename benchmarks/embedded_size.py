"""How small can the embedded default be? Build candidate embedded bases on the sample corpus's
train split, train each method with its defaults on each, and score what the test suite asserts
(tests/pipeline/test_embedded_default.py): dev loss before -> after, and dev ROUGE-L of base and tuned
answers to the report's dev prompts -- beside the CPU seconds each candidate costs.

    .venv/bin/python benchmarks/embedded_size.py --jobs 2                  # every candidate
    .venv/bin/python benchmarks/embedded_size.py --only 192x4 192x2

Each candidate runs in a process of its own with one torch thread (as in `make test`, two
workers on two cores), `--jobs` at a time. Prints a table and writes
benchmarks/results/embedded_size.json (see `--out`). The data is the pipeline's own: the sample
corpus, converted and split 70/30 as the conversations stage does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: candidate -> the BaseModelConfig fields it sets (the others at their defaults): hidden size x
#: layers, and a variant or two of the vocabulary, the pretraining epochs and the context. Hidden
#: sizes are multiples of 64 (BaseModelConfig refuses others: bitsandbytes' AVX512-BF16 CPU kernel
#: fails on them; 160 x 3 was the default for a day and failed there at the first int4 answer).
CANDIDATES: dict[str, dict] = {
    "192x4": {"hidden_size": 192, "num_layers": 4},       # the default until 2026-12-01 (2 M)
    "192x3": {"hidden_size": 192, "num_layers": 3},
    "192x2": {"hidden_size": 192, "num_layers": 2},       # the default since (1.2 M)
    "128x4": {"hidden_size": 128, "num_layers": 4},
    "128x3": {"hidden_size": 128, "num_layers": 3},
    "192x4-v1200": {"hidden_size": 192, "num_layers": 4, "vocab_size": 1200},
    "192x4-seq128": {"hidden_size": 192, "num_layers": 4, "max_seq_len": 128},
    "192x4-e16": {"hidden_size": 192, "num_layers": 4, "pretrain_epochs": 16.0},
    "192x3-e16": {"hidden_size": 192, "num_layers": 3, "pretrain_epochs": 16.0},
}
METHOD_NAMES = ("lora", "qlora", "ptuning")


def prepare_data(folder: Path) -> tuple[Path, Path]:
    """train.json and dev.json of the sample corpus, as the conversations stage makes them."""
    from tasks.runtime.paths import DATA_DIR
    from tasks.data.conversations import qa_to_conversation, split_train_dev
    from tasks.data.qa_text import read_qa_text

    convs = [qa_to_conversation(r["q"], r["a"])
             for r in read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")]
    train, dev = split_train_dev(convs, 0.7)
    paths = folder / "train.json", folder / "dev.json"
    for path, records in zip(paths, (train, dev)):
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return paths


def rouge(spec, dev_json: Path) -> dict[str, float]:
    """The generations stage's dev scores of one model (its core, the report's settings)."""
    from tasks.config import PipelineConfig
    from tasks.evaluate.generations import answer_prompts
    from tasks.evaluate.scoring import average, read_dev_prompts, score_answer

    report = PipelineConfig().report
    dev = read_dev_prompts(dev_json)[:report.eval_examples]
    answers = answer_prompts(spec, [p for p, _ in dev], report.max_new_tokens,
                             report.batch_size)["answers"]
    return average([score_answer(a, ref) for a, (_, ref) in zip(answers, dev)])


def one(fields: dict, train_json: Path, dev_json: Path) -> dict:
    """Build one candidate base, train every method on it, score: the child process's work."""
    import torch

    from tasks.train.base_model import build_base_model
    from tasks.config import PipelineConfig
    from tasks.config.methods import METHODS
    from tasks.model.model_spec import ModelSpec
    from tasks.train.train import train_adapter

    torch.set_num_threads(1)
    default = PipelineConfig()
    cpu0 = time.process_time()
    base = build_base_model(train_json, default.base.model_copy(update=fields))
    out = {"fields": fields, "params": base.out.params,
           "pretrain_cpu_s": round(time.process_time() - cpu0, 1),
           "pretrain_loss_last": base.out.pretrain_loss_last,
           "base_rouge_l": round(rouge(ModelSpec(base.path), dev_json)["rouge_l"], 2)}
    for method in METHOD_NAMES:
        cfg = default.train.model_copy(update={"method": method})
        cpu0 = time.process_time()
        try:
            res = train_adapter(base.path, train_json, dev_json, cfg)
        except Exception as exc:         # e.g. a bitsandbytes build without its CPU library
            out[method] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            continue
        train_cpu = time.process_time() - cpu0
        tuned = ModelSpec(base.path, adapter=res.path,
                          quantization=METHODS[method].serving_quantization(cfg))
        out[method] = {"dev_loss_before": round(res.out.eval_loss_before, 3),
                       "dev_loss_after": round(res.out.eval_loss_after, 3),
                       "rouge_l": round(rouge(tuned, dev_json)["rouge_l"], 2),
                       "train_cpu_s": round(train_cpu, 1)}
    out["cpu_s"] = round(time.process_time(), 1)
    return out


def run_candidate(name: str, fields: dict, data: tuple[Path, Path], work: Path) -> dict:
    """`one` in a fresh process with a project home of its own."""
    env = {**os.environ, "PIPELINE_HOME": str(work / name), "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "",                   # the CPU, also on a GPU machine
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    code = ("import json, sys; from benchmarks.embedded_size import one; from pathlib import Path;"
            f" print('RESULT', json.dumps(one({fields!r}, Path({str(data[0])!r}),"
            f" Path({str(data[1])!r}))))")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        return {"name": name, "error": proc.stderr[-2000:]}
    return {"name": name, "wall_s": round(time.perf_counter() - start, 1),
            **json.loads(line[len("RESULT "):])}


def cpu() -> dict:
    """The CPU the figures come from: floating-point results differ between SIMD kernels, and
    bitsandbytes takes its AVX512-BF16 4-bit path where the CPU has the instructions."""
    import torch

    import tasks.model.compat  # noqa: F401  (first: it quiets bitsandbytes' notice about the Hub)
    from bitsandbytes.functional import has_avx512bf16

    from benchmarks.timed import cpu_model_name

    return {"model": cpu_model_name(), "torch_capability": torch.backends.cpu.get_cpu_capability(),
            "avx512_bf16": bool(has_avx512bf16())}


def write(out: Path, jobs: int, machine: dict, rows: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": datetime.date.today().isoformat(),
                               "machine": os.uname().nodename, "cpu": machine, "jobs": jobs,
                               "candidates": rows}, indent=1) + "\n", encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", choices=sorted(CANDIDATES), help="candidates to run")
    ap.add_argument("--jobs", type=int, default=2, help="candidates at once")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks/results/embedded_size.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="embedded-size-"))
    data = prepare_data(work)
    names = args.only or list(CANDIDATES)
    machine, rows = cpu(), []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_candidate, n, CANDIDATES[n], data, work) for n in names]
        for done in as_completed(futures):            # written as they end: a cut-off run
            rows.append(done.result())                # keeps what it finished
            write(args.out, args.jobs, machine, rows)
    for r in sorted(rows, key=lambda r: names.index(r["name"])):
        if "error" in r:
            print(f"{r['name']:12} FAILED: {r['error'][-300:]}")
            continue
        print(f"{r['name']:12} {r['params'] / 1e6:5.2f} M  {r['cpu_s']:6.1f} CPU-s "
              f"(pretrain {r['pretrain_cpu_s']:5.1f})  base ROUGE-L {r['base_rouge_l']:5.2f}  " +
              "  ".join(f"{m} {r[m]['dev_loss_before']:.3f}->{r[m]['dev_loss_after']:.3f} "
                        f"R {r[m]['rouge_l']:5.2f} ({r[m]['train_cpu_s']:.0f} s)"
                        if "error" not in r[m] else f"{m} FAILED" for m in METHOD_NAMES))


if __name__ == "__main__":
    main()
