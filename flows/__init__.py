"""Prefect flows: the table of contents of the product.

    flows/pipeline.py   the full pipeline (build, then register)
    flows/nightly.py    nightly retraining with the champion gate
    flows/data.py       the data stages alone
    flows/stages.py     the stage tasks and the table of stages
    flows/running.py    runs a stage: cache check, MLflow child run, summary row
    flows/serve.py      serves the registry's champion
    flows/ops/          the command line, startup, the local Prefect + MLflow stack

Importing this package changes nothing. A process that runs flows calls
`flows.ops.startup.prepare()` before it imports Prefect (the command-line flows do it themselves).
"""
