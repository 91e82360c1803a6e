"""The register step: the merged model (and its int4 siblings) as versions in the MLflow Model
Registry, tagged with the data digest, method and dev metrics (an MLflow edge, imported lazily).
It is idempotent by content: if a version of the model with the same digest exists, it is
returned instead of a duplicate (an unchanged nightly run registers nothing new).

The merged and the bitsandbytes int4 model are MLflow models (transformers flavor, task
`llm/v1/chat`: OpenAI-style chat messages in and out, so `mlflow.transformers.load_model`,
`mlflow.pyfunc.load_model` and `mlflow models serve` work on a version), logged from their saved
folders without loading them (`log_chat_model`). Their weights are not stored a second time:
in a local artifact store the logged model's weight files are hard links of the stage's
published files (flows/mlflow_files.py), so a 12 GB model costs 12 GB once, not once per copy
(`mlflow.transformers.log_model` copies a folder twice on the way). The torchao int4 model
(CUDA-only tensor subclasses) and a P-Tuning v2 prefix adapter stay plain artifact folders.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tasks.runtime.files import file_lock
from tasks.model.compat import mlflow_pipeline_class

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


CHAMPION = "champion"


def champion_version(client, name: str, alias: str = CHAMPION):
    """The model version under `alias`, or None (no registered model or no alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def crown_first(client, versions: list[RegisteredVersion]) -> list[RegisteredVersion]:
    """A model's first registered version becomes its @champion (as the nightly gate crowns
    the first model it sees), so `make run` then `make serve` serves something; a model that
    has a champion keeps it. Returns the versions crowned now."""
    crowned = []
    for v in versions:
        if champion_version(client, v.name) is None:
            client.set_registered_model_alias(v.name, CHAMPION, v.version)
            client.set_model_version_tag(v.name, v.version, "champion.reason",
                                         "the model's first version")
            crowned.append(v)
    return crowned


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


#: files of a model folder that are its weights (linked into the logged model, never copied)
WEIGHTS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.pt")


def weight_files(folder: Path) -> list[Path]:
    return sorted({p for pattern in WEIGHTS for p in folder.glob(pattern) if p.is_file()})


def model_card(folder: Path):
    """The model card MLflow stores with the model: the folder's own README.md when it has one
    (its license included), else a short one naming the folder; MLflow then never asks the
    Hugging Face Hub for a card of a model that is local by design."""
    from huggingface_hub import ModelCard

    readme = folder / "README.md"
    if readme.is_file():
        return ModelCard(readme.read_text(encoding="utf-8"))
    return ModelCard("---\nlicense: unknown\nlibrary_name: transformers\n---\n"
                     f"A chat model made by this pipeline; weights from {folder}.\n")


def log_chat_model(folder: str, run_id: str, *, quantized: bool) -> str:
    """Log the Hugging Face model folder `folder` as an MLflow transformers model (task
    `CHAT_TASK`) in run `run_id`, from its files (the model is not loaded); return its URI
    (`models:/<id>`). MLflow writes the model's description from a copy of the folder without
    its weights; the weights join it as links (see the module docstring). The logged model
    belongs to the run's experiment."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model

    folder_path, client = Path(folder), MlflowClient()
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment, name="chat_model", source_run_id=run_id)
    weights = weight_files(folder_path)
    try:
        with tempfile.TemporaryDirectory(prefix="chat-model-") as tmp:
            light, local = Path(tmp) / "checkpoint", Path(tmp) / "model"
            light.mkdir()
            for f in folder_path.iterdir():
                if f.is_file() and f not in weights:
                    shutil.copy2(f, light / f.name)
            description = Model(artifact_path=logged.artifact_location,
                                model_uuid=logged.model_id, run_id=run_id,
                                model_id=logged.model_id)
            with mlflow_pipeline_class("text-generation"):
                mlflow.transformers.save_model(
                    transformers_model=str(light), path=str(local), task=CHAT_TASK,
                    input_example=CHAT_EXAMPLE, pip_requirements=requirements(quantized),
                    mlflow_model=description, model_card=model_card(folder_path))
            # the model's name (answers carry it) is the folder's, not the weightless copy's
            description.flavors["transformers"]["source_model_name"] = str(folder_path)
            description.save(str(local / "MLmodel"))
            put_model_files(client, logged, local, {f"model/{w.name}": w for w in weights})
        client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
        client.finalize_logged_model(logged.model_id, "READY")
    except BaseException:
        client.finalize_logged_model(logged.model_id, "FAILED")
        raise
    return f"models:/{logged.model_id}"


def put_model_files(client, logged, local: Path, weights: dict[str, Path]) -> None:
    """The logged model's artifacts: the files MLflow wrote under `local`, and `weights`
    (artifact path -> file) linked where the store is a local folder, else uploaded."""
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    from flows.mlflow_files import link_or_copy

    location = urlparse(logged.artifact_location)
    if location.scheme in ("", "file"):
        root = Path(url2pathname(location.path))
        for f in (p for p in local.rglob("*") if p.is_file()):
            link_or_copy(f, root / f.relative_to(local))
        for name, src in weights.items():
            link_or_copy(src, root / name)
        return
    for name, src in weights.items():                     # a remote store: uploaded
        shutil.copy2(src, local / name)
    client.log_model_artifacts(logged.model_id, str(local))
