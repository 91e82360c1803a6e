"""Cache keys are content-addressed: input bytes, config, and the code closure of the stage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tasks.runtime.code_version as code_version
from flows.caching import stage_key
from tasks.runtime.code_version import code_closure
from tasks.runtime.results import StageResult
from tasks.config import DataConfig

pytestmark = pytest.mark.long        # edits code and recomputes keys (seconds)


def test_code_closure_follows_helper_modules():
    """A stage's code is its module and the `tasks` modules it imports, transitively -- the
    runtime beneath them excepted (tasks/runtime/: paths, errors, digests, publishing)."""
    names = {p.name for p in code_closure("tasks.data.conversations")}
    assert names == {"conversations.py", "dataset_io.py"}
    assert {p.name for p in code_closure("tasks.data.ingest")} == {
        "ingest.py", "formats.py", "records.py", "qa_text.py", "sources.py", "dataset_io.py"}
    assert "formats.py" not in {p.name for p in code_closure("tasks.data.validate")}
    # the data report reads ingest's and conversations' outputs: their classes are imported
    # for the type checker only (`if TYPE_CHECKING:`), so their code is not the report's; the
    # tokenizer its lengths are counted in is loaded by its entry: that loader's code is
    assert {p.name for p in code_closure("tasks.data.data_report")} == {
        "data_report.py", "dataset_io.py", "tokenizer.py", "chatglm_tokenizer.py",
        "model_folder.py"}


def test_key_follows_file_content_not_path_or_mtime(tmp_path):
    f = tmp_path / "qa.txt"
    f.write_text("Q\nA\n", encoding="utf-8")
    key = stage_key("tasks.data.ingest", {"source": f})
    f.touch()                                             # touched, unchanged: same key
    assert stage_key("tasks.data.ingest", {"source": f}) == key
    g = tmp_path / "copy.txt"
    shutil.copy(f, g)                                     # same bytes elsewhere: same key
    assert stage_key("tasks.data.ingest", {"source": g}) == key
    f.write_text("Q\nA changed\n", encoding="utf-8")
    assert stage_key("tasks.data.ingest", {"source": f}) != key


def test_key_follows_config_and_upstream_digest():
    r1 = StageResult(stage="ingest", path="/x/a", digest="a")
    r2 = StageResult(stage="ingest", path="/x/a", digest="b")
    base = {"qa": r1, "cfg": DataConfig()}
    key = stage_key("tasks.data.conversations", base)
    assert stage_key("tasks.data.conversations", {**base, "qa": r2}) != key
    assert stage_key("tasks.data.conversations",
                     {**base, "cfg": DataConfig(train_ratio=0.8)}) != key
    # a re-execution mints a new result_id but the same digest: downstream keys are unchanged
    assert stage_key("tasks.data.conversations",
                     {**base, "qa": StageResult("ingest", "/x/a", "a")}) == key


@pytest.fixture
def repo_copy(tmp_path, monkeypatch) -> Path:
    shutil.copytree(code_version.REPO_DIR / "tasks", tmp_path / "tasks")
    monkeypatch.setattr(code_version, "REPO_DIR", tmp_path)
    return tmp_path


def test_changed_helper_module_changes_dependent_keys_only(repo_copy):
    stages = ("tasks.data.ingest", "tasks.data.conversations", "tasks.data.validate",
              "tasks.data.data_report")
    before = {m: stage_key(m, {}) for m in stages}
    parser = repo_copy / "tasks" / "data" / "qa_text.py"      # a helper of ingest only
    src = parser.read_text(encoding="utf-8")
    parser.write_text(src + "\n# a comment is not a code change\n", encoding="utf-8")
    assert stage_key("tasks.data.ingest", {}) == before["tasks.data.ingest"]
    parser.write_text(src.replace("size != 2", "size < 2"), encoding="utf-8")
    assert stage_key("tasks.data.ingest", {}) != before["tasks.data.ingest"]
    assert all(stage_key(m, {}) == before[m] for m in stages if m != "tasks.data.ingest")
    io_py = repo_copy / "tasks" / "data" / "dataset_io.py"   # shared by every data stage
    io_py.write_text(io_py.read_text(encoding="utf-8").replace("_CHUNK = 1 << 16",
                                                              "_CHUNK = 1 << 15"))
    assert all(stage_key(m, {}) != k for m, k in before.items())


def test_the_runtime_and_a_new_stage_re_key_no_stage(repo_copy):
    """The runtime moves results around and computes none: changing it (a digest threshold)
    re-keys nothing, and adding a stage -- its name, its module -- changes no other stage's key
    (at 6 B a re-keyed train stage is a retrain)."""
    stages = [f"tasks.{m}" for m in ("data.ingest", "data.conversations", "data.validate",
                                     "data.data_report", "model.base_model", "model.chatglm",
                                     "train.train", "export.merge", "export.quantize",
                                     "evaluate.benchmark", "evaluate.generations",
                                     "evaluate.report", "evaluate.gate", "data.preferences",
                                     "train.preference", "evaluate.preference_eval")]
    before = {m: stage_key(m, {}) for m in stages}
    files = repo_copy / "tasks" / "runtime" / "files.py"
    files.write_text(files.read_text(encoding="utf-8").replace(
        "LARGE_FILE_BYTES = 256 << 20", "LARGE_FILE_BYTES = 255 << 20"))
    results = repo_copy / "tasks" / "runtime" / "results.py"
    results.write_text(results.read_text(encoding="utf-8").replace(
        '    REPORT = "report"\n', '    REPORT = "report"\n    DISTILL = "distill"\n'))
    (repo_copy / "tasks" / "train" / "distill.py").write_text(
        "from tasks.runtime.results import StageName, StageResult\n"
        "from tasks.train.train import train_adapter\n\n\n"
        "def distill(x):\n    return StageName.DISTILL, train_adapter, x\n")
    assert {m: stage_key(m, {}) for m in stages} == before
    assert stage_key("tasks.train.distill", {}) not in before.values()


def test_key_of_a_directory_source_follows_its_files(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.jsonl").write_text('{"q": "Q", "a": "A"}\n', encoding="utf-8")
    key = stage_key("tasks.data.ingest", {"source": d})
    (d / "a.jsonl").touch()
    assert stage_key("tasks.data.ingest", {"source": d}) == key
    (d / "b.jsonl").write_text('{"q": "Q2", "a": "A2"}\n', encoding="utf-8")
    assert stage_key("tasks.data.ingest", {"source": d}) != key


MODEL_STAGES = ("tasks.train.train", "tasks.export.merge", "tasks.export.quantize",
                "tasks.evaluate.benchmark", "tasks.evaluate.generations")


def test_training_a_users_model_does_not_depend_on_the_tiny_model_builder(repo_copy):
    """The embedded default's builder (tasks/train/base_model.py) is no helper of any other
    stage."""
    assert all("base_model.py" not in {p.name for p in code_closure(m)} for m in MODEL_STAGES)
    before = {m: stage_key(m, {}) for m in (*MODEL_STAGES, "tasks.train.base_model")}
    builder = repo_copy / "tasks" / "train" / "base_model.py"
    builder.write_text(builder.read_text(encoding="utf-8").replace("PRETRAIN_BATCH = 4",
                                                                   "PRETRAIN_BATCH = 5"))
    assert stage_key("tasks.train.base_model", {}) != before["tasks.train.base_model"]
    assert all(stage_key(m, {}) == before[m] for m in MODEL_STAGES)


def test_each_stage_is_keyed_on_its_own_config_section_not_the_schema_text(repo_copy):
    """Rewording a ReportConfig field description changes no stage (nor the train stage's
    checkpoint folder, which follows code_digest); a changed value changes only the stage whose
    section holds it."""
    from tasks.runtime.code_version import code_digest
    from tasks.config import ReportConfig, TrainConfig

    inputs = {m: {"cfg": ReportConfig() if m == "tasks.evaluate.generations" else TrainConfig()}
              for m in MODEL_STAGES}
    before = {m: stage_key(m, inputs[m]) for m in MODEL_STAGES}
    train_code = code_digest("tasks.train.train")
    config = repo_copy / "tasks" / "config" / "__init__.py"
    config.write_text(config.read_text(encoding="utf-8").replace(
        'description="Dev prompts shown before/after."',
        'description="How many dev prompts the report shows, before and after."'))
    assert {m: stage_key(m, inputs[m]) for m in MODEL_STAGES} == before
    assert code_digest("tasks.train.train") == train_code
    assert stage_key("tasks.evaluate.generations", {"cfg": ReportConfig(dev_examples=3)}) \
        != before["tasks.evaluate.generations"]


def test_docstrings_and_comments_change_no_key_code_does(repo_copy):
    before = stage_key("tasks.data.ingest", {})
    ingest = repo_copy / "tasks" / "data" / "ingest.py"
    src = ingest.read_text(encoding="utf-8")
    reworded = src.replace('"""Stage 1, ingest:', '"""Stage one (ingest):', 1).replace(
        '"""File names as the data set knows them', '"""The names of the files, as the data set '
        'knows them', 1)
    assert reworded != src
    ingest.write_text(reworded + "\n# and a comment\n", encoding="utf-8")
    assert stage_key("tasks.data.ingest", {}) == before
    ingest.write_text(src.replace("def _relative_names(loaded: Loaded, source: Path)",
                                  "def _relative_names(loaded: Loaded, source: Path, x=1)"),
                      encoding="utf-8")
    assert stage_key("tasks.data.ingest", {}) != before


def test_two_stages_of_one_module_never_share_a_key():
    """quantize and quantize_torchao are entries of one module, on the same inputs: the stage
    name keeps their results apart."""
    from flows.stages import stage_task
    from tasks.export import quantize

    inputs = {"merged": StageResult("merge", "/x/m", "m"), "cfg": {}, "device": "cuda"}
    bnb, torchao = (stage_task(entry).cache_policy.compute_key(None, inputs, {})
                    for entry in (quantize.stage, quantize.torchao_stage))
    assert bnb != torchao
    assert stage_key("tasks.export.quantize", {}, stage="quantize") != \
        stage_key("tasks.export.quantize", {}, stage="quantize_torchao")


def test_the_benchmark_table_is_an_input_of_the_report_render_only():
    """Generating answers is keyed on the models, the data and the report section; the
    benchmark table goes only into the cheap render (tasks/evaluate/report.py), so a recomputed
    benchmark re-renders the report and generates nothing again."""
    import inspect

    from flows.stages import stage_task
    from tasks.evaluate import generations, report

    def key(entry, **inputs) -> str:
        return stage_task(entry).cache_policy.compute_key(None, inputs, {})

    gens = StageResult("generations", "/x/g", "g1")
    assert key(report.stage, generations=gens, extra_sections={"Benchmark": "| a |"}) != \
        key(report.stage, generations=gens, extra_sections={"Benchmark": "| b |"})
    assert key(report.stage, generations=StageResult("generations", "/x/g", "g2"),
               extra_sections={}) != key(report.stage, generations=gens, extra_sections={})
    generating = set(inspect.signature(generations.stage).parameters)
    assert generating == {"base", "tuned", "data", "probes_file", "cfg", "supervised"}
    assert "tasks/evaluate/benchmark.py" not in {
        p.relative_to(code_version.REPO_DIR).as_posix()
        for p in code_closure("tasks.evaluate.generations")}


def test_a_library_keys_only_the_stages_that_use_it(monkeypatch):
    """A new trl re-keys the preference stage (extra_libs), not train or merge (MODEL_LIBS)."""
    import importlib.metadata

    import flows.caching as caching

    def keys() -> tuple[str, str]:
        caching._lib_versions.cache_clear()
        return (stage_key("tasks.export.merge", {}, model_libs=True),
                stage_key("tasks.train.preference", {}, model_libs=True, extra_libs=("trl",)))

    merge, preference = keys()
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda lib: "999.0" if lib == "trl" else real(lib))
    try:
        after = keys()
    finally:
        caching._lib_versions.cache_clear()
    assert after[0] == merge and after[1] != preference
