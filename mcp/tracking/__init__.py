"""The only package that imports mlflow: runs, params, metrics, artifacts, models, registry."""

import os

# MLflow draws a progress bar for every artifact it copies; a stage logs many small ones.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

from mcp.tracking.runs import EpochLogger, log_artifact, log_metrics, log_params, stage_run
from mcp.tracking.models import alias_exists, load_model, log_model, register_model, registered_name

__all__ = [
    "EpochLogger", "log_artifact", "log_metrics", "log_params", "stage_run",
    "alias_exists", "load_model", "log_model", "register_model", "registered_name",
]
