"""`python -m tasks.config`: regenerate the committed JSON Schemas of the config and of the Run
form's options (tests/pipeline/test_config.py checks that both are current)."""

from tasks.config import SCHEMA_PATH, PipelineConfig, write_schema
from tasks.config.run_form import OPTIONS_SCHEMA_PATH, Options

if __name__ == "__main__":
    print(write_schema(SCHEMA_PATH, PipelineConfig))
    print(write_schema(OPTIONS_SCHEMA_PATH, Options))
