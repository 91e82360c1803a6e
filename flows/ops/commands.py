"""The flows' command lines (`python -m flows.pipeline|data|nightly`): their arguments, how the
parsed arguments become the flow's config, and the one line a config mistake prints. Light to
import -- no Prefect, MLflow or torch -- so `flows/ops/startup.py` checks the config before
anything starts; flows/ops/cli.py runs the flow.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from tasks.runtime.errors import DataError


EXIT_INTERNAL, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


def add_common_arguments(ap: argparse.ArgumentParser, *, config_file: bool = True,
                         what: str = "a PipelineConfig field, e.g. train.method=qlora") -> None:
    if config_file:
        ap.add_argument("--config", type=Path, help="JSON/YAML file of PipelineConfig fields "
                                                    "(schema: schemas/pipeline_config.schema."
                                                    "json); relative paths in it are taken "
                                                    "from the current directory")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    metavar="KEY=VALUE", help=f"override {what}; the value is a literal "
                                              "string unless it parses as JSON (numbers, "
                                              "true/false, null, lists)")
    ap.add_argument("--debug", action="store_true",
                    help="show full tracebacks (also: PIPELINE_DEBUG=1)")
    ap.add_argument("--verbose", action="store_true",
                    help="show every log line on the console (training steps, each task's "
                         "end, library progress bars); also: PIPELINE_VERBOSE=1. The Prefect "
                         "task log and MLflow keep all of it either way")


def _gate_arguments(ap: argparse.ArgumentParser) -> None:
    add_common_arguments(ap)
    ap.add_argument("--gate", dest="gate", action="append", default=[], metavar="KEY=VALUE",
                    help="override a GateConfig field, e.g. metric=bleu_4")


def _pipeline_config(args: argparse.Namespace) -> Any:
    from tasks.config.load import load_config

    return load_config(args.config, args.overrides)


def _data_config(args: argparse.Namespace) -> Any:
    from tasks.config.load import load_config

    return load_config(None, [o if o.startswith("data.") else f"data.{o}"
                              for o in args.overrides]).data


def _nightly_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from tasks.config.load import load_config, load_model
    from tasks.evaluate.gate import GateConfig

    return load_config(args.config, args.overrides), load_model(GateConfig, args.gate, "--gate")


@dataclass(frozen=True)
class Command:
    """A flow's command line: its arguments, and how the parsed arguments become the flow's
    config (raising `ConfigError` where they are wrong). Light to import: no Prefect, MLflow
    or torch."""

    add_arguments: Callable[[argparse.ArgumentParser], None]
    load: Callable[[argparse.Namespace], Any]
    #: configs loaded in this process, by command line: `check_config` loads the config before
    #: anything starts, and the flow's `main` gets that same object instead of loading it again
    loaded: dict[tuple[str, ...], Any] = field(default_factory=dict, compare=False, repr=False)

    def parse(self, argv: list[str] | None, description: str | None = None
              ) -> tuple[argparse.Namespace, Callable[[], Any]]:
        """The parsed arguments, and the call that loads the config from them (once per
        command line and process)."""
        ap = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_arguments(ap)
        args = ap.parse_args(argv)
        key = tuple(sys.argv[1:] if argv is None else argv)

        def load() -> Any:
            if key not in self.loaded:
                self.loaded[key] = self.load(args)
            return self.loaded[key]
        return args, load


#: `python -m <module>` of each flow (flows.ops.startup.CLI_FLOWS)
COMMANDS: dict[str, Command] = {
    "flows.pipeline": Command(add_common_arguments, _pipeline_config),
    "flows.data": Command(partial(add_common_arguments, config_file=False,
                                  what="a DataConfig field, e.g. shuffle_seed=7 (or "
                                       "data.shuffle_seed=7)"), _data_config),
    "flows.nightly": Command(_gate_arguments, _nightly_configs),
}


def check_config(module: str, argv: list[str]) -> None:
    """Before anything starts: parse `python -m <module>`'s arguments and load its config; a
    mistake ends the process here, as `run` would end it (one line, exit 2). Help, and any
    error other than a config mistake, are left to the flow's own `main`."""
    if module not in COMMANDS or any(a == "-h" or a.startswith("--h") for a in argv):
        return
    args, load = COMMANDS[module].parse(argv)
    try:
        load()
    except DataError as error:
        if debug_wanted(args):
            traceback.print_exc()
        print(describe(error), file=sys.stderr)
        sys.exit(EXIT_INPUT)
    except Exception:
        return                          # internal: `run` reports it (module docstring)


def debug_wanted(args: argparse.Namespace) -> bool:
    return bool(args.debug) or env_flag("PIPELINE_DEBUG")


def verbose_wanted(argv: list[str]) -> bool:
    """`--verbose` or PIPELINE_VERBOSE=1: every log line on the console (module docstring)."""
    return "--verbose" in argv or env_flag("PIPELINE_VERBOSE")


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def describe(error: DataError) -> str:
    """The one line (plus a hint line) a data or config error prints."""
    line = str(error) + (f" (stage {error.stage})" if error.stage else "")
    return line + (f"\nhint: {error.hint}" if error.hint else "")
