"""Stage 10, register: the merged model (and its int4 siblings) as versions in the MLflow Model
Registry, tagged with the data digest, method and dev metrics.

This stage *is* the MLflow edge, so unlike the other stages it imports MLflow (lazily, so
`import tasks.register` stays cheap). It is idempotent by content: if a version of the model
with the same digest exists, it is returned instead of a duplicate (an unchanged nightly run
registers nothing new).

The merged and the bitsandbytes int4 model are MLflow models (transformers flavor, task
`llm/v1/chat`: OpenAI-style chat messages in and out, so `mlflow.transformers.load_model`,
`mlflow.pyfunc.load_model` and `mlflow models serve` work on a version), logged from their saved
folders without loading them (`log_chat_model`). The torchao int4 model (CUDA-only tensor
subclasses) and a P-Tuning v2 prefix adapter stay plain artifact folders.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from dataclasses import dataclass
from typing import Callable, Iterator

from tasks.common import file_lock

#: the chat format a logged model speaks (MLflow's OpenAI-style chat schema)
CHAT_TASK = "llm/v1/chat"
CHAT_EXAMPLE = {"messages": [{"role": "user", "content": "绿萝叶子发黄是什么原因？"}],
                "max_tokens": 32}


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str
    created: bool           # False: an identical model was registered before; reused


def register_version(client, name: str, *, source: str | Callable[[], str], run_id: str,
                     digest: str, tags: dict[str, str],
                     description: str = "") -> RegisteredVersion:
    """Create (or find, by `model_digest` tag) a version of registered model `name`; `source`
    is its URI, or a function that makes it (logs the MLflow model) and is called only when a
    new version is created. Find and create hold a lock: two runs registering the same model
    at once make one version."""
    from mlflow.exceptions import MlflowException

    with file_lock("registry"):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description=description)
        for mv in client.search_model_versions(f"name = '{name}'"):
            if mv.tags.get("model_digest") == digest:
                return RegisteredVersion(name, mv.version, mv.source, created=False)
        if callable(source):
            source = source()
        mv = client.create_model_version(name, source=source, run_id=run_id,
                                         tags={"model_digest": digest, **tags},
                                         description=description)
    return RegisteredVersion(name, mv.version, mv.source, created=True)


def requirements(quantized: bool) -> list[str]:
    """The logged model's pip requirements, pinned to what made it (explicit: MLflow's own
    inference adds torchvision when torch is present)."""
    libs = ["torch", "transformers", "accelerate", "sentencepiece"] + \
        (["bitsandbytes"] if quantized else [])
    out = []
    for lib in libs:
        try:
            out.append(f"{lib}=={importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@contextlib.contextmanager
def _pipeline_class_resolved(task: str) -> Iterator[None]:
    """transformers 5 names each pipeline class as a dotted string (`SUPPORTED_TASKS[task]
    ["impl"]`); MLflow 3.17 logging from a local folder reads the class's `__name__` from it
    and fails. Give it the class for the duration of the call."""
    from transformers.pipelines import SUPPORTED_TASKS

    entry = SUPPORTED_TASKS[task]
    impl = entry["impl"]
    if isinstance(impl, str):
        module, _, cls = impl.rpartition(".")
        entry["impl"] = getattr(importlib.import_module(module), cls)
    try:
        yield
    finally:
        entry["impl"] = impl


def log_chat_model(folder: str, run_id: str, *, quantized: bool) -> str:
    """Log the Hugging Face model folder `folder` as an MLflow transformers model (task
    `CHAT_TASK`) in run `run_id`, from its files (the model is not loaded); return its URI.

    MLflow creates the logged model in the *active* experiment, not the run's
    (`mlflow.tracking.fluent._create_logged_model`): without `set_experiment` it would land in
    "Default", whose artifact root is `mlflow-artifacts:` when the MLflow server made the DB."""
    import mlflow

    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with _pipeline_class_resolved("text-generation"):
        info = mlflow.transformers.log_model(
            transformers_model=folder, name="chat_model", task=CHAT_TASK, run_id=run_id,
            input_example=CHAT_EXAMPLE, pip_requirements=requirements(quantized))
    return info.model_uri

