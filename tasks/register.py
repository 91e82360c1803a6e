"""Stage 10, register: the merged model (and its int4 sibling) as versions in the MLflow Model
Registry, tagged with the data digest, method and dev metrics.

This stage *is* the MLflow edge, so unlike the other stages it imports MLflow (lazily, so
`import tasks.register` stays cheap). It is idempotent by content: if a version of the model
with the same digest exists, it is returned instead of a duplicate (an unchanged nightly run
registers nothing new). Versions are created with `create_model_version(source=<artifact
uri>)`, because `register_model("runs:/...")` refuses a plain artifact folder
(it expects an MLflow model: `MLmodel`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tasks.common import file_lock


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    source: str
    created: bool           # False: an identical model was registered before; reused


def register_version(client, name: str, *, source: str, run_id: str, digest: str,
                     tags: dict[str, str], description: str = "") -> RegisteredVersion:
    """Create (or find, by `model_digest` tag) a version of registered model `name`. Find and
    create hold a lock: two runs registering the same model at once make one version."""
    from mlflow.exceptions import MlflowException

    with file_lock("registry"):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description=description)
        for mv in client.search_model_versions(f"name = '{name}'"):
            if mv.tags.get("model_digest") == digest:
                return RegisteredVersion(name, mv.version, mv.source, created=False)
        mv = client.create_model_version(name, source=source, run_id=run_id,
                                         tags={"model_digest": digest, **tags},
                                         description=description)
    return RegisteredVersion(name, mv.version, mv.source, created=True)
