"""A corpus of bad inputs through the real command line: a data or config error exits with 2
and prints, on stderr, the user's file:line (or the argument) and what is wrong in at most three
lines, with no traceback anywhere; an internal error exits with 1; --debug shows the traceback.
The flow run (Prefect) and the MLflow run still record the failure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.runtime.paths import REPO_DIR
import _cli  # noqa: E402  (tests/_cli.py)

BAD = Path(__file__).parents[1] / "data" / "bad"
pytestmark = pytest.mark.server       # every run reports to one real Prefect server


@pytest.fixture
def work(tmp_path) -> Path:
    """The user's current directory; the project home is beside it."""
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


def check_one_line_error(result, *, code: int, where: str, words: str = "") -> list[str]:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr + result.stdout[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    assert 1 <= len(lines) <= 3, lines
    assert lines[0].startswith(where), lines
    assert words in lines[0], lines
    assert "records.arrow" not in result.stderr and "/outputs/" not in result.stderr
    return lines


# file (copied into the user's directory) -> where (relative to the directory), words of the
# message. One case per shape of location the command line prints: a record and
# its JSON path, a file inside the user's folder, a record of the conversations stage; a line
# alone and no location at all are the tests' below. What each file of the bad-input corpus
# says is tests/data/test_data_bad.py's (the same DataError, raised by the same cores).
DATA_CASES = {
    "wrong_type.json": ("wrong_type.json:3 record #1 at $[1].a: ", "expected a string"),
    "mixed_formats_dir": ("mixed_formats_dir/b.json:1 record #0", "the data set's format"),
    "sharegpt_starts_with_gpt.jsonl": ("sharegpt_starts_with_gpt.jsonl:2 record #1",
                                       "where a user turn is expected"),
}


@pytest.mark.parametrize("name", sorted(DATA_CASES))
def test_bad_data_files_fail_in_one_line_naming_file_and_line(name, work, prefect_api_url):
    where, words = DATA_CASES[name]
    src = BAD / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    result = _cli.run("data", f"--set=source={name}", home=work.parent / "home", cwd=work,
                      api_url=prefect_api_url)
    lines = check_one_line_error(result, code=2, where=f"{work}/{where}", words=words)
    assert "(stage ingest)" in lines[0] or "(stage conversations)" in lines[0]
    assert lines[-1].startswith("hint: ") or len(lines) == 1


def test_a_json_file_of_one_object_says_the_top_level_must_be_a_list(work, prefect_api_url):
    """The file and line, then the hint on the next line. (What the too-few cases say is
    tests/data/test_data_bad.py's: the same cores.)"""
    (work / "one.json").write_text('{"q": "问题？", "a": "答案。"}\n', encoding="utf-8")
    result = _cli.run("data", "--set", "source=one.json", home=work.parent / "home", cwd=work,
                      api_url=prefect_api_url)
    lines = check_one_line_error(result, code=2, where=f"{work}/one.json:1: ",
                                 words="the top level is one JSON object, not a list of records")
    assert "(stage ingest)" in lines[0] and "JSON array of records" in lines[1]


def test_the_failure_is_recorded_in_mlflow_and_prefect(work, prefect_api_url):
    """Also: `#` in a --set value is part of the file name, not a comment, and a relative path
    is taken from the current directory, not the repository."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    home, name = work.parent / "home", "q&a #1.txt"
    shutil.copy(BAD / "odd_lines_block.txt", work / name)
    result = _cli.run("data", "--set", f"source={name}", home=home, cwd=work,
                      api_url=prefect_api_url)
    check_one_line_error(result, code=2, where=f"{work}/{name}:1: ", words="block has 3 lines")
    assert not (REPO_DIR / name).exists()
    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("finetune-pipeline").experiment_id])
    parent = next(r for r in runs if "pipeline.kind" in r.data.tags)
    ingest = next(r for r in runs if r.info.run_name == "ingest")
    assert parent.info.status == ingest.info.status == "FAILED"
    assert f"{work}/{name}:1" in parent.data.tags["pipeline.error"]
    assert "[stage ingest]" in parent.data.tags["pipeline.error"]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
    assert flow_run.state.is_failed() and f"{work}/{name}:1" in flow_run.state.message


@pytest.mark.parametrize("args, where, words", [
    (["--set", "train.methd=lora"], "--set train.methd=lora: train.methd: unknown field",
     ""),
    (["--set", "data.source=missing.txt"], "--set data.source=missing.txt: data.source: no "
                                          "such file or directory", ""),
    (["--set", "train"], "--set train: expected KEY=VALUE", ""),
    (["--config", "run.yaml"], "run.yaml:4: train.epochs: ", "number"),
    (["--config", "broken.yaml"], "broken.yaml:3: invalid YAML/JSON", ""),
    (["--config", "nope.yaml"], "nope.yaml: no such config file", ""),
    (["--set", "base.path=baichuan"], "--set base.path=baichuan: base.path: ",
     "model_type 'baichuan' needs the folder's own Python code (configuration_baichuan.py, "
     "modeling_baichuan.py)"),
    (["--set", "base.path=chatglm-6b"], "--set base.path=chatglm-6b: base.path: ",
     "ChatGLM-6B (v1"),
])
def test_config_mistakes_fail_in_one_line_before_anything_runs(args, where, words, work):
    # folders whose models need their own code (README "Which models"): refused, never run
    remote = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
              "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}
    for name, config in (("baichuan", {"model_type": "baichuan", "auto_map": remote}),
                         ("chatglm-6b", {"model_type": "chatglm", "position_encoding_2d": True,
                                         "auto_map": remote})):
        (work / name).mkdir()
        (work / name / "config.json").write_text(json.dumps(config), encoding="utf-8")
    (work / "run.yaml").write_text("# a run\ntrain:\n  method: lora\n  epochs: many\n",
                                   encoding="utf-8")
    (work / "broken.yaml").write_text("train:\n  method: lora\n epochs: 2\n", encoding="utf-8")
    home = work.parent / "home"
    result = _cli.run("pipeline", *args, home=home, cwd=work)
    check_one_line_error(result, code=2, where=where, words=words)
    assert not (home / "mlflow.db").exists(), "nothing started"
    assert not (home / ".prefect" / "prefect.db").exists(), "no temporary server was launched"
    assert result.stdout == "", "the config was checked before anything was set up"


def test_nightly_gate_and_data_arguments_are_checked_before_anything_starts(work):
    home = work.parent / "home"
    result = _cli.run("nightly", "--gate", "metric=accuracy", home=home, cwd=work)
    check_one_line_error(result, code=2, where="--gate metric=accuracy: metric: ")
    assert not (home / ".prefect" / "prefect.db").exists(), "no temporary server was launched"
    result = _cli.run("data", "--set", "on_error=sometimes", home=home, cwd=work)
    check_one_line_error(result, code=2, where="--set data.on_error=sometimes: data.on_error: ")
    assert not (home / ".prefect" / "prefect.db").exists() and result.stdout == ""


def test_internal_errors_exit_1_in_one_line_and_debug_shows_the_traceback(work, prefect_api_url):
    home = work.parent / "home"
    home.mkdir()
    (home / "outputs").write_text("not a directory", encoding="utf-8")   # a broken home
    result = _cli.run("data", home=home, cwd=work, api_url=prefect_api_url)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) <= 3, result.stderr
    assert lines[0].startswith("internal error: ") and "--debug" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    debug = _cli.run("data", "--debug", home=home, cwd=work, api_url=prefect_api_url)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr


@pytest.mark.parametrize("flag, env, wanted", [
    (False, None, False), (True, None, True), (False, "1", True), (False, "true", True),
    (False, "0", False), (False, "", False)])
def test_debug_is_asked_for_by_the_flag_or_by_PIPELINE_DEBUG(flag, env, wanted, monkeypatch):
    """What decides the run above's `--debug` also reads PIPELINE_DEBUG (docs/design.md
    "Failure modes"), so one command-line run covers both."""
    import argparse

    from flows.ops.commands import add_common_arguments, debug_wanted

    monkeypatch.delenv("PIPELINE_DEBUG", raising=False)
    if env is not None:
        monkeypatch.setenv("PIPELINE_DEBUG", env)
    ap = argparse.ArgumentParser()
    add_common_arguments(ap)
    assert debug_wanted(ap.parse_args(["--debug"] if flag else [])) is wanted
