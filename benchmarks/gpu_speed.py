"""Decode and QLoRA speed at 6 B, side by side in one run, against their anchors (README
"Fast at real scale").

    PYTHONPATH=. python benchmarks/gpu_speed.py --out benchmarks/results     # all parts
    PYTHONPATH=. python benchmarks/gpu_speed.py --parts decode                # one part

Parts, each adding its figures to gpu_speed_<size>.json as it finishes (qlora before decode,
whose compiled engine takes longest):
* roofline: device-to-device copy bandwidth, and from it the batch-1 decode roofline of the bf16
  and int4 weights (every weight byte read once per token);
* decode: greedy decode tok/s at batch 1 and 8 of HF `generate` (eager, the anchor) and of the
  static loop of tasks/model/decode.py (CUDA graph; `+compile`: torch.compile'd, then captured) on
  the bf16 model, torchao int4 (tinygemm) and bitsandbytes nf4; capture/compile time apart; token
  agreement with eager `generate` and the first step's max logit difference. Each model in a
  process of its own; a model or engine that fails is recorded under `decode_errors` with its
  error, and the others keep their figures;
* qlora: the train stage (tasks/train/train.py) against two anchors on the same model, data,
  batches (file order), LoRA and optimizer settings: a bare HF + peft QLoRA loop, and TRL's
  `SFTTrainer` with padding-free batches and Liger kernels (`trl_liger_anchor`); useful (non-pad)
  tokens/s, peak CUDA memory and the first 20 steps' losses of each.
The model is a random-weight one of benchmarks/models.py: speed and memory, not quality.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.models import build_random_model
from tasks.runtime.paths import DATA_DIR
from tasks.runtime.files import atomic_write_json
from tasks.data.conversations import qa_to_conversation, split_train_dev
from tasks.model.decode import StaticDecoder, left_pad
from tasks.model.modeling import generate_ids, load_model, load_tokenizer, prompt_ids, release
from tasks.data.qa_text import read_qa_text

QUESTIONS = ["绿萝叶子发黄是什么原因？", "多肉植物多久浇一次水？", "月季开花后要怎么修剪？",
             "冬天室内的植物要注意什么？", "君子兰怎么施肥？", "薄荷怎么扦插？",
             "发财树烂根怎么办？", "吊兰叶尖发黑是什么原因？"]


def copy_bandwidth(gib: int = 4) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10 after warm-up)."""
    src = torch.empty(gib << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1000)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (gib << 30) / sorted(times)[len(times) // 2]


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer as stored: a tensor subclass (torchao's packed int4)
    by its inner tensors, not by its logical shape."""
    def nbytes(t: torch.Tensor) -> int:
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            return sum(nbytes(getattr(t, n)) for n in names)
        return t.numel() * t.element_size()
    return sum(nbytes(t) for t in [*model.parameters(), *model.buffers()])


# -- decode ------------------------------------------------------------------------------------
def decode_variant(model, tok, batches: list[int], new_tokens: int, engine: str) -> dict:
    """tok/s per batch size, peak CUDA MiB, capture/compile seconds and greedy tokens (the
    compiled engine at batch 1 only: each batch size is a compile of its own, minutes at 6 B)."""
    if engine == "compiled":
        batches = batches[:1]
    prompts = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS]
    out = {"tok_s": {}, "tokens": {}, "capture_s": 0.0}
    torch.cuda.reset_peak_memory_stats()
    for batch in batches:
        ids, mask = (t.cuda() for t in left_pad(prompts[:batch], tok.pad_token_id))
        if engine == "eager":
            runs = []
            for _ in range(2):                                  # the first is the warm-up
                torch.cuda.synchronize()
                start = time.perf_counter()
                seq = generate_ids(model, ids, attention_mask=mask, do_sample=False,
                                   max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                   pad_token_id=tok.pad_token_id)
                torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
            out["tok_s"][batch] = new_tokens / runs[-1]          # prefill included: eager anchor
            out["tokens"][batch] = seq[:, ids.shape[1]:].cpu().tolist()
        else:
            decoder = StaticDecoder(model, batch_size=batch, compile=engine == "compiled",
                                    max_len=ids.shape[1] + new_tokens)
            decoder.decode(ids, mask, new_tokens)               # capture (+ compile) + warm-up
            out["capture_s"] += decoder.capture_s
            out["graph_error"] = decoder.graph_error
            runs = [decoder.decode(ids, mask, new_tokens) for _ in range(3)]
            best = sorted(runs, key=lambda r: r.decode_s)[1]    # the median of 3
            out["tok_s"][batch] = (new_tokens - 1) / best.decode_s
            out["tokens"][batch] = best.tokens.tolist()
            del decoder
    out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of positions, up to each row's first disagreement included, that agree."""
    same = total = 0
    for row, ref in zip(tokens, reference):
        for a, b in zip(row, ref):
            total += 1
            if a != b:
                break
            same += 1
    return same / max(total, 1)


#: the decode plans: a label and the int4 format (None: the bf16 model itself)
PLANS = [("bf16", None), ("int4-torchao", "torchao"), ("nf4-bnb", "bnb")]


def decode_plan(base_dir: Path, label: str, fmt: str | None, new_tokens: int,
                compile_too: bool, reference_logits: list[float] | None) -> dict:
    """One plan (load the model as `label`, every engine of it), in a process of its own: a
    failed CUDA-graph capture can leave the CUDA context unusable, and must cost only its own
    rows. An engine that fails is an error row; the plan's other engines still run."""
    from tasks.config import QuantizeConfig
    from tasks.export.quantize import quantization_config

    tok = load_tokenizer(base_dir)
    qcfg = quantization_config(fmt, QuantizeConfig(), "bfloat16") if fmt else None
    torch.cuda.reset_peak_memory_stats()
    model = load_model(base_dir, dtype="bfloat16", device="cuda", quantization=qcfg)
    out: dict = {"weights_gib": weight_bytes(model) / 2**30, "engines": {}, "errors": {}}
    print(f"[decode] {label}: loaded, {out['weights_gib']:.2f} GiB", flush=True)
    ids = torch.tensor([prompt_ids(tok, [{"role": "user", "content": QUESTIONS[0]}])]).cuda()
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, -1].float()
    if reference_logits is None:
        out["reference_logits"] = logits.cpu().tolist()
    else:
        out["max_first_logit_diff_vs_bf16"] = (
            logits.cpu() - torch.tensor(reference_logits)).abs().max().item()
    engines = (["eager"] if fmt is None else []) + ["graph"] + (
        ["compiled"] if compile_too and fmt != "bnb" else [])
    for engine in engines:
        start = time.perf_counter()
        try:
            out["engines"][engine] = decode_variant(model, tok, [1, 8], new_tokens, engine)
        except Exception as error:                        # a row with its error, not a crash
            out["errors"][engine] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            print(f"[decode] {label} {engine}: failed: {out['errors'][engine]}", flush=True)
            continue
        r = out["engines"][engine]
        print(f"[decode] {label} {engine}: {r['tok_s']} tok/s, capture {r['capture_s']:.1f} s, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    del model
    release("cuda")
    return out


def run_decode(base_dir: Path, new_tokens: int, compile_too: bool) -> dict:
    """Every plan in a fresh process (tasks/runtime/child_process.py); a plan or engine that
    fails is recorded under `errors` and the others keep their figures."""
    from benchmarks.gpu_speed import decode_plan as by_name   # picklable: not __main__'s
    from tasks.runtime import child_process

    results, peaks, compile_s, agree, logit_diff, weights = {}, {}, {}, {}, {}, {}
    graph_errors: dict[str, str] = {}
    errors: dict[str, str] = {}
    reference_tokens = reference_logits = None
    for label, fmt in PLANS:
        try:
            plan = child_process.call(by_name, base_dir, label, fmt, new_tokens,
                                      compile_too, reference_logits)
        except Exception as error:
            errors[label] = f"{type(error).__name__}: {str(error).strip()[:500]}"
            print(f"[decode] {label}: failed: {errors[label]}", flush=True)
            continue
        weights[label] = plan["weights_gib"]
        if "reference_logits" in plan:
            reference_logits = plan["reference_logits"]
        else:
            logit_diff[label] = plan["max_first_logit_diff_vs_bf16"]
        errors |= {f"{label} {engine}": e for engine, e in plan["errors"].items()}
        for engine, r in plan["engines"].items():
            name = f"{label} {engine}"
            results[name], peaks[name], compile_s[name] = r["tok_s"], r["peak_cuda_mib"], \
                r["capture_s"]
            if r.get("graph_error"):
                graph_errors[name] = r["graph_error"]
            if engine == "eager":
                reference_tokens = r["tokens"]
            if reference_tokens is not None:
                agree[name] = {b: agreement(r["tokens"][b], reference_tokens[b])
                               for b in r["tokens"]}
    return {"decode": results, "peak_cuda_mib": peaks, "compile_s": compile_s,
            "token_agreement_with_eager": agree, "max_first_logit_diff_vs_bf16": logit_diff,
            "weights_gib": weights, "graph_errors": graph_errors, "decode_errors": errors}


# -- qlora -------------------------------------------------------------------------------------
def sample_split(folder: Path) -> tuple[Path, Path]:
    pairs = read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")
    train, dev = split_train_dev([qa_to_conversation(p["q"], p["a"]) for p in pairs])
    return (atomic_write_json(folder / "train.json", train),
            atomic_write_json(folder / "dev.json", dev))


def anchor_loop(base_dir: Path, train_json: Path, cfg, steps: int) -> dict:
    """The bare HF + peft QLoRA loop as peft's and bitsandbytes' guides write it: 4-bit nf4 base,
    `prepare_model_for_kbit_training` (gradient checkpointing on, its default), LoRA on every
    linear layer, padded batches in file order, AdamW, cosine schedule, bf16 autocast."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, \
        DataCollatorForSeq2Seq, get_cosine_schedule_with_warmup

    from tasks.train.train_data import IGNORE, encode_file

    tok = load_tokenizer(base_dir)
    tok.padding_side = "right"
    examples, _, _ = encode_file(tok, train_json, cfg.max_length)
    collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), device_map={"": "cuda"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    model = prepare_model_for_kbit_training(model)
    model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                             lora_dropout=cfg.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0, fused=True)
    total = math.ceil(len(examples) / cfg.batch_size) * cfg.epochs
    sched = get_cosine_schedule_with_warmup(opt, math.ceil(0.05 * total), math.ceil(total))
    torch.cuda.reset_peak_memory_stats()
    model.train()
    losses, useful, ends = [], 0, []
    torch.cuda.synchronize()
    start = time.perf_counter()
    for step in range(steps):
        chunk = examples[step * cfg.batch_size:(step + 1) * cfg.batch_size]
        batch = {k: v.cuda() for k, v in collate(chunk).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        useful += sum(len(e["input_ids"]) for e in chunk)
        torch.cuda.synchronize()
        ends.append(time.perf_counter())
    seconds = time.perf_counter() - start
    gaps = [b - a for a, b in zip(ends, ends[1:])][2:]      # as tasks/train_control.StepTimes
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt
    release("cuda")
    return {"useful_tok_s": useful / seconds, "losses": losses, "peak_cuda_mib": peak,
            "seconds": seconds, "step_s_median": statistics.median(gaps) if gaps else None,
            "tokens_per_step": useful / steps}


def trl_liger_anchor(base_dir: Path, train_json: Path, cfg, steps: int,
                     liger: bool = True) -> dict:
    """The strongest peer recipe: TRL's `SFTTrainer` with its fastest switches -- padding-free
    batches, `use_liger_kernel=True` (fused linear cross-entropy, RMSNorm, SwiGLU, RoPE), bf16,
    gradient checkpointing off -- on the same nf4 model, LoRA, batches of 8 in file order,
    learning rate and schedule; the loss on the answer only (prompt-completion pairs). Run in a
    process of its own: Liger patches the model's classes for the whole process."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    gpu = torch.cuda.is_available()
    convs = json.loads(train_json.read_text(encoding="utf-8"))
    data = Dataset.from_list([{"prompt": c["conversations"][:-1],
                               "completion": c["conversations"][-1:]} for c in convs])
    model = AutoModelForCausalLM.from_pretrained(
        str(base_dir), device_map={"": "cuda" if gpu else "cpu"}, dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True,
                                               bnb_4bit_compute_dtype=torch.bfloat16))
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps,
                     per_device_train_batch_size=cfg.batch_size,
                     learning_rate=cfg.learning_rate, lr_scheduler_type="cosine",
                     warmup_steps=0.05, weight_decay=0.0, padding_free=True, max_length=None,
                     use_liger_kernel=liger, bf16=gpu, use_cpu=not gpu,
                     gradient_checkpointing=False, train_sampling_strategy="sequential",
                     logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data,
                         processing_class=load_tokenizer(base_dir),
                         peft_config=LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                lora_dropout=cfg.lora_dropout,
                                                target_modules="all-linear",
                                                task_type="CAUSAL_LM"))
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    history = trainer.state.log_history
    tokens = [h["num_tokens"] for h in history if "num_tokens" in h][-1]
    return {"useful_tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens,
            "losses": [h["loss"] for h in history if "loss" in h],
            "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if gpu else 0.0}


def qlora_config(train_json: Path, steps: int, checkpointing: bool | None = None):
    """The train stage's settings for the comparison: `steps` batches of 8 in file order, r=16
    all-linear LoRA on nf4, bf16 compute, packing; no eval or checkpoint inside the steps."""
    from tasks.config import TrainConfig

    n = len(json.loads(train_json.read_text(encoding="utf-8")))
    return TrainConfig(method="qlora", compute_dtype="bfloat16", batch_size=8, max_length=160,
                       learning_rate=2e-4, epochs=steps * 8 / n, shuffle=False, packing=True,
                       gradient_checkpointing=checkpointing, eval_steps=10_000,
                       save_steps=10_000, sanity_examples=0, resume=False)


def warm_up(base_dir: Path, train_json: Path, cfg) -> None:
    """Pay the process's one-off CUDA costs (context, cuBLAS, bitsandbytes and attention
    kernels' first use) before either loop is timed: two anchor steps."""
    anchor_loop(base_dir, train_json, cfg, 2)


def run_qlora(base_dir: Path, work: Path, steps: int = 20) -> dict:
    """The train stage, then the anchor, on a process warmed up first. Figures: useful tok/s
    over each whole loop, and in steady state (median step time after two steps, the same
    tokens per step)."""
    from tasks.train.train import train_adapter

    train_json, dev_json = sample_split(work)
    cfg = qlora_config(train_json, steps)
    warm_up(base_dir, train_json, cfg)
    start = time.perf_counter()
    project = train_adapter(base_dir, train_json, dev_json, cfg)
    print(f"[qlora] project: {project.metrics['train_tokens_per_s']:.0f} useful tok/s, "
          f"{time.perf_counter() - start:.0f} s in all", flush=True)
    release("cuda")
    steps_run = int(project.metrics["global_step"])
    anchor = anchor_loop(base_dir, train_json, cfg, steps_run)
    print(f"[qlora] anchor: {anchor['useful_tok_s']:.0f} useful tok/s", flush=True)
    release("cuda")
    from benchmarks.gpu_speed import trl_liger_anchor as by_name   # picklable: not __main__'s
    from tasks.runtime import child_process

    try:
        trl = child_process.call(by_name, base_dir, train_json, cfg, steps_run)
        print(f"[qlora] TRL + Liger: {trl['useful_tok_s']:.0f} useful tok/s", flush=True)
    except Exception as error:             # a failed anchor is a figure missing, not a crash
        trl = {"error": f"{type(error).__name__}: {str(error).strip()[:500]}"}
        print(f"[qlora] TRL + Liger failed: {trl['error']}", flush=True)
    project_losses = [h["loss"] for h in project.history if "loss" in h]
    step_s = project.metrics["step_seconds_median"]
    return {"qlora": {
        "project_useful_tok_s": project.metrics["train_tokens_per_s"],
        "anchor_hf_peft_tok_s": anchor["useful_tok_s"],
        "speedup": project.metrics["train_tokens_per_s"] / anchor["useful_tok_s"],
        "project_step_s_median": step_s, "anchor_step_s_median": anchor["step_s_median"],
        "speedup_steady_state": anchor["step_s_median"] / step_s,
        "peak_cuda_mib": project.metrics["peak_gpu_memory_gib"] * 1024,
        "anchor_peak_cuda_mib": anchor["peak_cuda_mib"],
        **({"anchor_trl_liger_tok_s": trl["useful_tok_s"],
            "speedup_vs_trl_liger": project.metrics["train_tokens_per_s"] / trl["useful_tok_s"],
            "anchor_trl_liger_peak_cuda_mib": trl["peak_cuda_mib"],
            "loss_first_20_trl_liger": trl["losses"][:20]} if "error" not in trl
           else {"anchor_trl_liger_error": trl["error"]}),
        "steps": steps_run, "project_settings": {
            "gradient_checkpointing": project.info["gradient_checkpointing"],
            "packing": True, "batch_size": 8, "lora_r": cfg.lora_r},
        "loss_first_20_project": project_losses[:20],
        "loss_first_20_anchor": anchor["losses"][:20],
        "max_rel_loss_diff": max(abs(a - b) / abs(b) for a, b in
                                 zip(project_losses[:20], anchor["losses"][:20]))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="6b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--work", type=Path, help="model and data folder (default: a temp dir)")
    ap.add_argument("--parts", nargs="+", default=["roofline", "decode", "qlora"],
                    choices=["roofline", "decode", "qlora"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled engine")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-speed-"))
    os.environ.setdefault("PIPELINE_HOME", str(work / "home"))
    target = args.out / f"gpu_speed_{args.size}.json"
    result = json.loads(target.read_text()) if target.is_file() else {}
    base_dir = work / "model"
    if not (base_dir / "config.json").is_file():
        start = time.perf_counter()
        _, params = build_random_model(args.size, base_dir, "cuda")
        result["params"] = params
        print(f"[model] {params / 1e9:.2f} B built and saved in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    result |= {"gpu": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "size": args.size, "torch": torch.__version__,
               "command": "bash benchmarks/on_device.sh python3 benchmarks/gpu_speed.py "
                          + " ".join(sys.argv[1:])}

    def save():
        args.out.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")

    if "roofline" in args.parts:
        result["copy_tb_s"] = copy_bandwidth() / 1e12
        save()
        print(f"[roofline] copy {result['copy_tb_s']:.2f} TB/s", flush=True)
    if "qlora" in args.parts:
        result |= run_qlora(base_dir, work)
        save()
    if "decode" in args.parts:
        result |= run_decode(base_dir, args.new_tokens, not args.no_compile)
        if "copy_tb_s" in result:        # batch-1 roofline: every weight byte read per token
            for label, key in (("bf16", "bf16"), ("int4", "int4-torchao")):
                if key in result["weights_gib"]:
                    result[f"roofline_{label}_tok_s"] = (result["copy_tb_s"] * 1e12
                                                         / (result["weights_gib"][key] * 2**30))
        save()
    print(json.dumps({k: v for k, v in result.items() if k not in ("qlora",)}, indent=1,
                     default=str)[:3000])
    if "qlora" in result:
        print(json.dumps(result["qlora"], indent=1)[:1500])


if __name__ == "__main__":
    main()
