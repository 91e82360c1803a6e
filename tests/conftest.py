"""Test isolation: every test session gets its own project home (outputs, MLflow DB, Prefect
home and result cache), never the developer's. This runs before Prefect is imported."""

import os
import tempfile
from pathlib import Path

import pytest

SESSION_HOME = Path(tempfile.mkdtemp(prefix="pipeline-tests-"))
os.environ["PIPELINE_HOME"] = str(SESSION_HOME)
os.environ["PREFECT_HOME"] = str(SESSION_HOME / ".prefect")
os.environ["PREFECT_LOCAL_STORAGE_PATH"] = str(SESSION_HOME / ".prefect" / "storage")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
for var in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL"):
    os.environ.pop(var, None)

# pytest-xdist (make test): the workers share the cores, so torch in each gets its share of
# them; two workers with a thread per core each made CPU training several times slower
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    _cores = len(os.sched_getaffinity(0))          # the cores this process may run on
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _cores // _workers)))

from flows.ops.startup import prepare  # noqa: E402  (the rest of the project's settings)

prepare()


@pytest.fixture
def session_home() -> Path:
    return SESSION_HOME


@pytest.fixture(scope="session")
def prefect_api_url() -> str:
    """The API of this worker's temporary Prefect server (the one its in-process flows report
    to; started here if none has been yet), for command-line runs that need not start their
    own: each start costs ~12 s of CPU."""
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    server.start()
    return server.api_url


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny embedded base (180k parameters, a 300-token vocab) built from the first 96/24
    records of the sample split, for training tests that need a real but fast model.

    Returns {"train", "dev", "base"} paths; built once per `pytest` run: the first xdist worker
    to ask builds it in the run's shared temporary folder, under a file lock, the other waits
    for it and reads it (pytest-xdist's docs, "Making session-scoped fixtures execute only
    once"). Tests read it and train into their own homes."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):      # basetemp/popen-gwN: the run's is above
        shared = shared.parent
    root = shared / "tiny-base"
    paths = {"train": root / "train.json", "dev": root / "dev.json"}
    with FileLock(str(root) + ".lock"):
        if not (root / "base.txt").is_file():
            paths["base"] = _build_tiny_base(root, paths["train"], paths["dev"])
            (root / "base.txt").write_text(str(paths["base"]), encoding="utf-8")
    return {**paths, "base": Path((root / "base.txt").read_text(encoding="utf-8"))}


def _build_tiny_base(root: Path, train_json: Path, dev_json: Path) -> Path:
    import json

    from tasks.train.base_model import build_base_model
    from tasks.runtime.paths import DATA_DIR
    from tasks.config import BaseModelConfig
    from tasks.data.conversations import qa_to_conversation, split_train_dev
    from tasks.data.qa_text import read_qa_text

    root.mkdir(parents=True, exist_ok=True)
    convs = [qa_to_conversation(r["q"], r["a"])
             for r in read_qa_text(DATA_DIR / "sample" / "plant_care_qa.txt")]
    train, dev = split_train_dev(convs, 0.7)
    train_json.write_text(json.dumps(train[:96], ensure_ascii=False), encoding="utf-8")
    dev_json.write_text(json.dumps(dev[:24], ensure_ascii=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_HOME", str(root / "home"))
        base = build_base_model(train_json, BaseModelConfig(
            vocab_size=300, hidden_size=64, num_layers=2, num_heads=2, max_seq_len=64,
            pretrain_epochs=10, learning_rate=5e-3))
    return Path(base.path)


#: the order in which modules start: the long ones first, so the short ones fill the gaps at the end
_FIRST = ("browser", "slow", "server", "long")


def pytest_collection_modifyitems(items):
    """Modules with a browser, slow, server or long test run first, in that order (`make test`
    and `make test-fast` hand each module whole to one xdist worker in this order: --dist
    loadfile --no-loadscope-reorder); within a module, the order is kept."""
    module = {item: item.nodeid.split("::")[0] for item in items}
    rank: dict[str, int] = {}
    for item in items:
        kinds = [i for i, name in enumerate(_FIRST) if item.get_closest_marker(name)]
        rank[module[item]] = min([rank.get(module[item], len(_FIRST)), *kinds])
    items.sort(key=lambda item: rank[module[item]])          # stable


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core box OpenMP spinning
    makes them several times slower: one torch thread for the module that asks for it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_sessionfinish(session, exitstatus):
    """Stop Prefect's temporary server while pytest's streams are still open (its own atexit
    hook logs after they are closed, and prints a 'closed file' traceback)."""
    import sys
    if "prefect.logging.handlers" in sys.modules:      # send queued logs/events while the
        from prefect.events.worker import EventsWorker  # server is still up (else the workers
        from prefect.logging.handlers import APILogWorker   # retry a stopped server at exit)
        APILogWorker.drain_all(timeout=15)
        EventsWorker.drain_all(timeout=15)
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer
        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
