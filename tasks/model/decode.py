"""Fast greedy decoding for the benchmark and generations stages: a static KV cache, and on CUDA
one decode step replayed as a CUDA graph (optionally compiled first).

HF `generate` with a dynamic cache is host-bound at batch 1 on a fast GPU: issuing one step's
hundreds of kernels takes as long as running them (docs/gpu.md "At 6 B on one GPU"). Here the step's
inputs live in fixed buffers (token, position, attention mask, transformers' `StaticCache`), so the
whole step -- forward, argmax, advancing the position -- is captured once with
`torch.cuda.CUDAGraph` and replayed per token (the recipe of PyTorch's "CUDA Graphs" notes and of
gpt-fast). With `compile`, Inductor's fused kernels (no cudagraph trees of their own) are what
gets captured:

* `Compile.STEP`: the whole step is one `torch.compile` graph. Inductor lowers every layer of it,
  which at 6 B takes minutes on a cold cache.
* `Compile.LAYERS`: each decoder layer is compiled on its own (PyTorch's "regional compilation"
  recipe). The layers share one code, so Inductor compiles the first and finds the others in its
  FX graph cache; Dynamo still traces each layer once (they differ in their cache index). The
  embedding, the final norm, the head and the argmax stay eager, inside the same CUDA graph.

On a CPU the same loop runs without a graph.

This is a measuring and answering loop, not a serving engine: greedy only, left-padded batches, a
fixed number of new tokens for the benchmark, or until every row has produced an EOS for answers
(callers cut at the EOS). HF `generate` stays the reference: on the same model the static loop
gives the same greedy tokens (tests/model/test_decode.py).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from enum import StrEnum

import torch
from transformers import PreTrainedModel, StaticCache

from tasks.model.compat import cache_argument

log = logging.getLogger(__name__)
#: with stop ids, `decode` checks every this many steps whether every row has ended (on a GPU a
#: check is a host sync, which would stall the replayed graphs if done at every step)
STOP_CHECK_STEPS = 8


class Compile(StrEnum):
    """What of the decode step `torch.compile` compiles (the module docstring says how)."""

    OFF = "off"
    STEP = "step"
    LAYERS = "layers"


def decoder_layers(model: PreTrainedModel) -> list[torch.nn.Module]:
    """The model's repeated blocks: the modules whose class transformers keeps whole when it
    splits a model over devices (`_no_split_modules`, the decoder layer of every native family)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kinds = set(getattr(base, "_no_split_modules", None) or ())
    return [module for module in base.modules() if type(module).__name__ in kinds]


def compile_layers(model: PreTrainedModel) -> int:
    """Compile each decoder layer of `model` in place (`nn.Module.compile`); the number compiled.
    Dynamo keeps one entry per layer and input shape, so its recompile limit is raised to hold
    them all instead of falling back to eager after the default eight."""
    layers = decoder_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to compile "
                         "(its class lists no `_no_split_modules`)")
    limit = 2 * len(layers) + 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    for layer in layers:
        layer.compile(fullgraph=True, dynamic=False)
    return len(layers)


@dataclass(frozen=True)
class Decoded:
    tokens: torch.Tensor        # (batch, new_tokens) greedy ids, on the CPU
    first_token_s: float        # prefill + the first new token (time to first token)
    decode_s: float             # the remaining new_tokens - 1 steps


class StaticDecoder:
    """Greedy decoding of up to `batch_size` left-padded prompts with a `StaticCache` of
    `max_len` positions; the decode step is a CUDA graph on a CUDA device (`graph=None`: there).

    Build once per (model, batch size, length budget); `decode` reuses the buffers, the cache and
    the captured graph for every call."""

    def __init__(self, model: PreTrainedModel, *, batch_size: int, max_len: int,
                 graph: bool | None = None, compile: Compile | bool = Compile.OFF):
        self.model, self.batch, self.max_len = model, batch_size, max_len
        self.device = next(model.parameters()).device
        self.use_graph = self.device.type == "cuda" if graph is None else graph
        config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
        self.cache = StaticCache(config=config, max_cache_len=max_len)
        self.cache_arg = cache_argument(model)
        # sdpa and flash kernels take a boolean mask (True: attend); eager attention adds a float one
        self.additive = getattr(config, "_attn_implementation", "sdpa") == "eager"
        new = dict(device=self.device, dtype=torch.long)
        self.token = torch.zeros(batch_size, 1, **new)          # the step's input and output
        self.position = torch.zeros(batch_size, 1, **new)
        self.slot = torch.zeros(1, **new)                      # cache slot the step writes
        self.mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)
        self.compile = Compile.STEP if compile is True else Compile(compile or Compile.OFF)
        self.step = self._step
        if self.compile is Compile.STEP:
            self.step = torch.compile(self._step, fullgraph=True, dynamic=False)
        elif self.compile is Compile.LAYERS:
            compile_layers(model)        # the prefill runs them eagerly: see `_prefill`
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_error: str | None = None          # why capture failed, if it did
        self.capture_s = 0.0

    # -- the step: everything on device buffers, nothing read back on the host ---------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor):
        """Logits of the last position; `keep` is the (batch, 1, queries, max_len) boolean mask."""
        mask = keep
        if self.additive:
            dtype = self.model.get_input_embeddings().weight.dtype
            mask = torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(
                ~keep, torch.finfo(dtype).min)
        return self.model(input_ids=ids, position_ids=positions, attention_mask=mask,
                          use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache}).logits

    @torch.compiler.set_stance("force_eager")
    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor):
        """The prompt's forward, eager: compiled layers would compile again for every prompt
        length (`dynamic=False`) for a pass that runs once per answer."""
        return self._forward(ids, positions, keep)

    def _step(self) -> None:
        self.mask.index_fill_(1, self.slot, True)              # attend to the slot written now
        logits = self._forward(self.token, self.position, self.mask[:, None, None, :])
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.add_(1)
        self.slot.add_(1)

    @torch.inference_mode()
    def _capture(self) -> None:
        """Warm up on a side stream (as CUDA graph capture requires; the first, eager step
        allocates the static cache, the next ones compile the step if asked), then capture one
        step. The warm-up writes into the cache: `decode` resets every buffer before use."""
        start = time.perf_counter()
        self._reset()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for step in (torch.compiler.set_stance("force_eager")(self._step), self.step,
                         self.step, self.step):
                self.slot.fill_(self.max_len - 1)              # warm up on the last slot; the
                step()                                         # eager one allocates the cache
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.slot.fill_(self.max_len - 1)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start

    def _reset(self) -> None:
        self.cache.reset()
        self.mask.zero_()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.inference_mode()
    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               new_tokens: int, stop_ids: set[int] | None = None) -> Decoded:
        """`new_tokens` greedy tokens after each row of `input_ids` (left-padded, `attention_mask`
        1 on real tokens). Rows beyond the prompts given are padding copies. No early stop (what
        the benchmark times), unless `stop_ids`: then decoding ends once every row has produced
        one of them, checked every `STOP_CHECK_STEPS` steps (a check waits for the device), so
        rows may hold fewer than `new_tokens` tokens; callers cut at the stop id anyway."""
        rows, length = input_ids.shape
        if rows > self.batch or length + new_tokens > self.max_len:
            raise ValueError(f"decode: {rows}x{length}+{new_tokens} tokens exceed this decoder's "
                             f"{self.batch}x{self.max_len}")
        if self.use_graph and self.graph is None:
            try:
                self._capture()
            except (RuntimeError, torch.AcceleratorError) as error:
                # e.g. a kernel library that synchronises inside its forward: no graph, same loop
                log.warning("decode: no CUDA graph for %s (%s: %s); decoding step by step",
                            type(self.model).__name__, type(error).__name__,
                            str(error).splitlines()[0][:200])
                self.graph, self.use_graph = None, False
                self.graph_error = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
                torch.cuda.synchronize(self.device)
        ids = torch.cat([input_ids, input_ids[-1:].expand(self.batch - rows, -1)]).to(self.device)
        real = torch.cat([attention_mask, attention_mask[-1:].expand(self.batch - rows, -1)]
                         ).to(self.device).bool()
        self._sync()
        start = time.perf_counter()
        self._reset()
        self.mask[:, :length] = real
        positions = (real.long().cumsum(-1) - 1).clamp(min=0)
        causal = torch.ones(length, self.max_len, dtype=torch.bool, device=self.device).tril()
        # a pad row attends to itself only: no fully masked row (NaN) reaches the cache
        prefill = (causal & self.mask[:, None, :]) | torch.eye(
            length, self.max_len, dtype=torch.bool, device=self.device)
        logits = self._prefill(ids, positions, prefill[:, None])
        self.token.copy_(logits[:, -1].argmax(-1, keepdim=True))
        self.position.copy_(positions[:, -1:] + 1)
        self.slot.fill_(length)
        out = [self.token.clone()]
        stops = None if not stop_ids else torch.tensor(sorted(stop_ids), device=self.device)
        ended = None if stops is None else torch.isin(self.token[:rows], stops)
        self._sync()
        first = time.perf_counter()
        for step in range(1, new_tokens):
            if ended is not None and step % STOP_CHECK_STEPS == 0 and bool(ended.all()):
                break
            if self.graph is not None:
                self.graph.replay()
            else:
                self.step()
            out.append(self.token.clone())
            if ended is not None:
                ended |= torch.isin(self.token[:rows], stops)
        self._sync()
        end = time.perf_counter()
        return Decoded(tokens=torch.cat(out, dim=1)[:rows].cpu(), first_token_s=first - start,
                       decode_s=end - first)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists, padded on the left to the longest."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids, mask


def cut_at_eos(tokens: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """The tokens before the first EOS, and whether one was produced."""
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i], True
    return tokens, False
