"""MLflow edge for big files: artifacts and dataset inputs whose cost does not grow with the data.

* Artifacts. With a local artifact store (the default: `mlruns/`), files of the stages'
  content-addressed outputs (`outputs/<stage>/<digest>/`, never modified once published) are
  hard-linked into the run's artifact folder: no bytes are copied and a multi-GB model folder is
  not stored twice; deleting either name keeps the other. Everything else -- above all the user's
  own input files, which they may edit in place -- is copied, and so is everything when links
  fail (another file system). Remote stores go through `MlflowClient` as usual.
* Datasets. A data file becomes an MLflow dataset *reference* (`mlflow.data.meta_dataset.
  MetaDataset`): a name, our content digest, the file's path as its source, and its schema and
  row count from the Parquet footer (or given). No record is loaded. MLflow keeps one dataset per
  (name, digest) in an experiment, so logging the same reference again (a cache hit) only links
  the run to it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow import MlflowClient
from mlflow.data.meta_dataset import MetaDataset
from mlflow.data.sources import LocalArtifactDatasetSource
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.types.schema import Array, ColSpec, DataType, Object, Property, Schema

from tasks.runtime.files import digest_bytes
from tasks.runtime.paths import project_dir
from tasks.runtime.digest_memo import memo_digest_file


# ---------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------
def _immutable(path: Path) -> bool:
    """Is this file one of the published stage outputs (content-addressed, never rewritten)?"""
    return path.resolve().is_relative_to((project_dir() / "outputs").resolve())


def link_or_copy(src: Path, dst: Path) -> bool:
    """Put `src` at `dst`: a hard link for a published output, else (or if linking fails) a
    copy. Returns True when it linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    if _immutable(src):
        try:
            os.link(src, dst)
            return True
        except OSError:                     # another file system, or links not permitted
            pass
    shutil.copy2(src, dst)
    return False


def log_artifacts(client: MlflowClient, run_id: str, artifacts: dict[str, str]) -> None:
    """Log `{label: path}`: a directory under its label, a file at the artifact root."""
    repo = get_artifact_repository(client.get_run(run_id).info.artifact_uri)
    for label, path in artifacts.items():
        p = Path(path)
        if isinstance(repo, LocalArtifactRepository):
            root = Path(repo.artifact_dir)
            if p.is_dir():
                for f in (q for q in p.rglob("*") if q.is_file()):
                    link_or_copy(f, root / label / f.relative_to(p))
            elif p.is_file():
                link_or_copy(p, root / p.name)
        elif p.is_dir():
            client.log_artifacts(run_id, str(p), label)
        elif p.is_file():
            client.log_artifact(run_id, str(p))


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetFile:
    """A data file to log as a dataset input. `schema`/`rows` are read from a Parquet file's
    footer when not given; other files without them are logged with neither."""

    path: Path
    schema: pa.Schema | None = None
    rows: int | None = None


def _mlflow_type(kind: pa.DataType) -> DataType | Array | Object:
    if pa.types.is_dictionary(kind):
        return _mlflow_type(kind.value_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return Array(_mlflow_type(kind.value_type))
    if pa.types.is_struct(kind):
        return Object([Property(f.name, _mlflow_type(f.type)) for f in kind])
    for test, name in ((pa.types.is_string, DataType.string),
                       (pa.types.is_large_string, DataType.string),
                       (pa.types.is_boolean, DataType.boolean),
                       (pa.types.is_integer, DataType.long),
                       (pa.types.is_floating, DataType.double),
                       (pa.types.is_binary, DataType.binary),
                       (pa.types.is_large_binary, DataType.binary)):
        if test(kind):
            return name
    raise TypeError(f"no MLflow type for Arrow type {kind}")


def mlflow_schema(schema: pa.Schema) -> Schema:
    """An Arrow schema as MLflow column specs (nested lists and structs included)."""
    return Schema([ColSpec(_mlflow_type(f.type), f.name) for f in schema])


def dataset_input(context: str, file: DatasetFile, digest: str) -> DatasetInput:
    """An MLflow dataset input that references `file` (see the module docstring)."""
    schema, rows = file.schema, file.rows
    if file.path.suffix == ".parquet" and (schema is None or rows is None):
        meta = pq.read_metadata(file.path)
        schema = schema or meta.schema.to_arrow_schema()
        rows = meta.num_rows if rows is None else rows
    meta_ds = MetaDataset(LocalArtifactDatasetSource(str(file.path)), name=file.path.name,
                          digest=digest, schema=mlflow_schema(schema) if schema else None)
    entity = Dataset(**meta_ds.to_dict(),
                     profile=json.dumps({"num_rows": rows}) if rows is not None else None)
    return DatasetInput(entity, tags=[InputTag("mlflow.data.context", context)])


def content_digest(path: Path, output_dir: str, output_digest: str) -> str:
    """Our digest of a data file: derived from the stage output's content digest when the file
    is part of that output (no bytes read), else the file's own (memoised) content digest."""
    path, root = Path(path).resolve(), Path(output_dir).resolve()
    if output_digest and path.is_relative_to(root):
        return digest_bytes(f"{output_digest}/{path.relative_to(root).as_posix()}".encode())
    return memo_digest_file(path)
