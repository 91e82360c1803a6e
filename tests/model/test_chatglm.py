"""The seeds' own models (README "Which models"): ChatGLM2-6B, ChatGLM3-6B and original-format
GLM-4 folders are converted into native transformers folders whose logits, tokenizer and
prompt format equal the originals', without running a line of the folders' own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tasks.model.chatglm import convert_folder
from tasks.config.model_folder import classify
from tasks.model.modeling import load_tokenizer
from tests._chatglm import TEXTS, CORPUS, OriginalTokenizer, make_original, reference_logits, \
    train_sentencepiece, train_tiktoken

FAMILIES = ("chatglm2", "chatglm3", "glm4")
CHAT = [{"role": "system", "content": "你是园艺助手。"},
        {"role": "user", "content": "绿萝叶子发黄怎么办？"},
        {"role": "assistant", "content": "减少浇水，放在散射光处。"},
        {"role": "user", "content": "How often should I water it?  Twice a week?"}]


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    return {"sp": train_sentencepiece(root / "sp.model"),
            "tiktoken": train_tiktoken(root / "glm4.tiktoken")}


@pytest.fixture(scope="module")
def converted(vocabularies, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """(original folder, converted folder) of each family; ChatGLM2 as .bin files."""
    import os

    root = tmp_path_factory.mktemp("chatglm")
    os.environ["PIPELINE_HOME"] = str(root / "home")
    try:
        out = {}
        for i, family in enumerate(FAMILIES):
            folder = make_original(root / family, family, seed=i,
                                   bin_weights=family == "chatglm2",
                                   sp_model=vocabularies["sp"],
                                   tiktoken_file=vocabularies["tiktoken"])
            out[family] = (folder, Path(convert_folder(folder).path))
        return out
    finally:
        del os.environ["PIPELINE_HOME"]


def _original(folder: Path) -> tuple[dict, dict]:
    cfg = json.loads((folder / "config.json").read_text())
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        return cfg, torch.load(folder / "pytorch_model.bin", weights_only=True)
    return cfg, {k: v for f in shards for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_equal_the_original_architecture(converted, family):
    folder, native = converted[family]
    cfg, sd = _original(folder)
    model = AutoModelForCausalLM.from_pretrained(native, dtype=torch.float32).eval()
    assert type(model).__name__ == "GlmForCausalLM"
    ids = torch.randint(0, cfg["padded_vocab_size"], (2, 24), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        expected = reference_logits(sd, cfg, ids)
        assert (logits - expected).abs().max() < 1e-4
        # cached decode: one token at a time through the KV cache equals the full forward
        out = model(input_ids=ids[:, :16], use_cache=True)
        past, steps = out.past_key_values, [out.logits[:, -1]]
        for t in range(16, 24):
            out = model(input_ids=ids[:, t:t + 1], past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[:, -1])
    assert (torch.stack(steps[:-1], 1) - expected[:, 15:23]).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_ids_equal_the_original_tokenizer(converted, family):
    folder, native = converted[family]
    original, tok = OriginalTokenizer(folder, family), load_tokenizer(native)
    texts = TEXTS + CORPUS.splitlines()[:200]
    for text in texts:
        assert tok(text, add_special_tokens=False).input_ids == original.encode(text), text
        assert tok(text).input_ids == original.prefix + original.encode(text)
    # the special tokens' names in a user's text are text, as in the original, when asked
    tricky = "<|user|>[gMASK]<sop> sop"
    assert tok(tricky, add_special_tokens=False, split_special_tokens=True).input_ids == \
        original.encode(tricky)
    for name, i in original.special.items():
        if name not in ("sop", "eop"):      # named <sop>, <eop> here (same ids)
            assert tok.convert_tokens_to_ids(name) == i, name
    assert tok.decode(tok("绿萝 pH 6.5\n  ok", add_special_tokens=False).input_ids) == \
        "绿萝 pH 6.5\n  ok"


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_template_is_the_familys_prompt_builder_token_for_token(converted, family):
    folder, native = converted[family]
    original, tok = OriginalTokenizer(folder, family), load_tokenizer(native)
    chat = CHAT[1:] if family == "chatglm2" else CHAT      # ChatGLM2 has no system role
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                     return_dict=False)
    assert list(prompt) == original.chat_ids(chat)
    answered = chat + [{"role": "assistant", "content": "每周一到两次。"}]
    training = tok.apply_chat_template(answered, tokenize=True, return_dict=False)
    assert list(training) == original.chat_ids(answered, answer=True)
    config = json.loads((native / "generation_config.json").read_text())
    assert original.eos in config["eos_token_id"]


def test_the_folders_code_is_never_run(converted, tmp_path):
    for family, (folder, native) in converted.items():
        assert classify(folder).family == family
        assert not list(folder.glob("*.ran")), "a file of the folder was imported"
        assert classify(native).kind == "native"
        assert not list(native.glob("*.py"))


def test_a_conversion_that_would_not_fit_on_the_disk_fails_at_once(converted, tmp_path,
                                                                   monkeypatch):
    """Before writing gigabytes, the stage checks the free space (a sparse 4 TiB weight file:
    real to the file system, no space used) and fails in one line, leaving nothing behind."""
    from tasks.runtime.errors import DataError

    monkeypatch.setenv("PIPELINE_HOME", str(tmp_path / "home"))
    folder, _ = converted["chatglm3"]
    huge = tmp_path / "huge"
    huge.mkdir()
    for f in folder.iterdir():
        if f.suffix not in (".safetensors", ".json") or f.name == "config.json":
            (huge / f.name).write_bytes(f.read_bytes())
    with open(huge / "model-00001-of-00001.safetensors", "wb") as f:
        f.truncate(4 << 40)
    with pytest.raises(DataError, match=r"converting huge needs about 4096\.0 GiB free") as e:
        convert_folder(huge)
    assert "\n" not in str(e.value) and e.value.hint
    assert not list((tmp_path / "home").glob("outputs/base/*")), "nothing was written"


def test_no_loader_can_block_on_transformers_remote_code_prompt(converted, tmp_path):
    """transformers asks `Do you wish to run the custom code? [y/N]` on stdin when a folder's
    config names code of its own and no choice was passed. Every loader of the pipeline passes
    `trust_remote_code=False` or refuses the folder first: in a process whose stdin stays open
    and silent (a worker's), each one fails at once instead of waiting for an answer."""
    import subprocess
    import sys

    from tasks.runtime.paths import REPO_DIR

    foreign = tmp_path / "internlm"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "internlm2", "auto_map": {
        "AutoConfig": "configuration_internlm2.InternLM2Config",
        "AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None],
        "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}}))
    chatglm = converted["chatglm3"][0]
    script = "\n".join([
        "import sys", "from tasks.model.modeling import load_model, load_tokenizer",
        "for call in (lambda f: load_tokenizer(f), lambda f: load_model(f)):",
        "    for folder in sys.argv[1:]:",
        "        try:", "            call(folder)",
        "        except Exception as e:",
        "            print(type(e).__name__, str(e).splitlines()[0][:160])",
        "        else:", "            print('LOADED', folder)"])
    proc = subprocess.run([sys.executable, "-c", script, str(foreign), str(chatglm)],
                          stdin=subprocess.PIPE, capture_output=True, text=True, timeout=120,
                          cwd=REPO_DIR, env={"PYTHONPATH": str(REPO_DIR), "HF_HUB_OFFLINE": "1",
                                             "PATH": "/usr/bin:/bin"})
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and "[y/N]" not in proc.stdout + proc.stderr, proc.stderr
    assert lines[0].startswith("DataError") and "internlm2" in lines[0], lines
    assert lines[1] == f"LOADED {chatglm}", "its tokenizer is converted in memory"
    assert lines[2].startswith("DataError") and "internlm2" in lines[2], lines
    assert lines[3].startswith("DataError") and "the base stage converts it" in lines[3], lines
    assert not list(chatglm.glob("*.ran"))
