"""Prefect flows: the table of contents of the product.

Importing this package points Prefect's state (its home, result storage) into the project
directory (`PIPELINE_HOME`, default: the repo) unless the environment already says otherwise,
so caches are per project and tests get their own. This must run before Prefect is imported.
"""

import contextlib
import logging
import os

from flows.startup import api_url_configured, begin_cli_run, cli_flow, \
    launch_temporary_server
from tasks.common import project_dir

_home = project_dir() / ".prefect"
with contextlib.suppress(OSError):            # a new PIPELINE_HOME: Prefect makes one level only
    _home.mkdir(parents=True, exist_ok=True)
os.environ.setdefault("PREFECT_HOME", str(_home))
os.environ.setdefault("PREFECT_LOCAL_STORAGE_PATH", str(_home / "storage"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# the temporary server of a run without PREFECT_API_URL can need > 20 s on a busy 2-core box
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("DO_NOT_TRACK", "1")
# the stage cores log through `logging` (e.g. train progress): show it in the task-run logs
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks")
logging.getLogger("tasks").setLevel(logging.INFO)
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # never download at run time by accident
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

if cli_flow():
    begin_cli_run()
if "PREFECT_API_URL" not in os.environ:
    # a shell run while `make stack` is up reports to the stack's server (and shows in its UI)
    # instead of starting a temporary server on the same database; otherwise a command-line run
    # starts its temporary server now, so that it boots while the run imports the rest
    from flows.stack import running_api_url

    if _url := running_api_url():
        os.environ["PREFECT_API_URL"] = _url
    elif cli_flow() and not api_url_configured():
        os.environ["PREFECT_API_URL"] = launch_temporary_server()
