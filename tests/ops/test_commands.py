"""A flow's command line loads its config once per process (flows/ops/commands.py): the check
that runs before anything starts and the flow's own `main` get the same config -- the file is not
read, nor the overrides applied, a second time."""

from __future__ import annotations

from flows.ops.commands import COMMANDS, check_config


def test_the_config_checked_before_the_run_is_the_one_the_run_gets(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("train:\n  epochs: 2\n", encoding="utf-8")
    argv = ["--config", str(config), "--set", "train.learning_rate=0.001"]
    check_config("flows.pipeline", argv)
    config.unlink()                        # a second load would fail: the file is gone
    _, load = COMMANDS["flows.pipeline"].parse(argv)
    cfg = load()
    assert (cfg.train.epochs, cfg.train.learning_rate) == (2, 0.001)
    assert load() is cfg
    other = COMMANDS["flows.pipeline"].parse(["--set", "train.epochs=3"])[1]()
    assert other is not cfg and other.train.epochs == 3          # another command line
