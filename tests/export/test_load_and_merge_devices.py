"""Memory rules of the model stages that a CPU can check (docs/gpu.md "At 6 B on one GPU"): where the
merge runs, and loading for an accelerator streams weights tensor by tensor (the same model,
without a second full copy in host memory)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tasks.runtime.paths import REPO_DIR
from tasks.export.merge import merge_adapter
from tasks.model.modeling import _from_pretrained, bnb_config
from tests._tiny_model import make_all

pytestmark = [pytest.mark.long, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_all(tmp_path_factory.mktemp("devices"))


def test_merge_runs_where_it_is_asked_and_refuses_a_missing_gpu(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path))
    res = merge_adapter(*tiny)                                      # auto: no GPU here
    assert res.device == "cpu" and res.dtype == "float32"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        merge_adapter(*tiny, device="cuda")


@pytest.mark.parametrize("quantized", [False, True], ids=["float32", "nf4"])
def test_streamed_loading_gives_the_same_model(tiny, quantized):
    base, _ = tiny
    kwargs = {"dtype": torch.float32, "device_map": {"": "cpu"}}
    if quantized:
        kwargs["quantization_config"] = bnb_config()
    plain = _from_pretrained(base, stream=False, **kwargs)
    streamed = _from_pretrained(base, stream=True, **kwargs)
    ids = torch.tensor([[1, 5, 9, 20, 30]])
    with torch.inference_mode():
        assert torch.equal(plain(input_ids=ids).logits, streamed(input_ids=ids).logits)
    assert streamed.generation_config.eos_token_id == plain.generation_config.eos_token_id
    assert {n for n, _ in streamed.named_parameters()} == {n for n, _ in plain.named_parameters()}


def test_streamed_loading_holds_one_copy_in_host_memory(tmp_path):
    """A ~170 MB model loaded through the streamed path raises the loading process's peak RSS by
    about the model (it lands on the CPU here), not by two copies of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536,
                                 num_hidden_layers=12, num_attention_heads=8,
                                 num_key_value_heads=2)).save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(REPO_DIR)!r})
        from pathlib import Path
        from tasks.model.modeling import _from_pretrained
        from tasks.runtime.resources import peak_memory
        with peak_memory() as before:
            pass
        with peak_memory() as load:
            model = _from_pretrained(Path({str(folder)!r}), stream=True, dtype=torch.float32,
                                     device_map={{"": "cpu"}})
        print(json.dumps({{"base": before.rss_mib, "peak": load.rss_mib}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert size > 100
    assert size * 0.8 < m["peak"] - m["base"] < 1.5 * size, (size, m)


def test_mapped_tensors_read_as_safetensors_reads_them(tmp_path):
    """Every dtype and shape the lazy state dict maps (scalars, empty tensors, odd offsets)
    reads back exactly as safetensors' own loader reads it; other dtypes go through pread."""
    from contextlib import ExitStack

    from safetensors.torch import load_file, save_file

    from tasks.model.mapped_weights import DTYPES, MappedTensor, mapped_state_dict

    g = torch.Generator().manual_seed(0)
    tensors = {f"t.{name}": (torch.randn(3, 5, 7, generator=g) * 50).to(dtype)
               for name, dtype in DTYPES.items()}
    tensors |= {"scalar": torch.tensor(3.5), "empty": torch.zeros(0, 4),
                "odd": torch.arange(5, dtype=torch.uint8),
                "complex": torch.randn(2, 2, dtype=torch.complex64, generator=g)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, path)
    want = load_file(path)
    with ExitStack() as stack:
        lazy = mapped_state_dict([path], "cpu", stack)
        assert set(lazy) == set(want)
        assert not isinstance(lazy["complex"], MappedTensor)          # not mapped: pread
        for name, tensor in want.items():
            got = lazy[name][...]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
            assert torch.equal(got.flatten().view(torch.uint8),           # bytes: NaN-safe
                               tensor.flatten().view(torch.uint8)), name
        assert lazy["t.BF16"].get_dtype() == "BF16" and lazy["t.BF16"].get_shape() == [3, 5, 7]
