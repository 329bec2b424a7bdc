"""The MLflow adapter: the tracking client and its pending queue (client.py,
pending.py), the detector as an MLflow model (model.py), the code version every
run is tagged with (code_version.py) and where the store lives (uri.py).

Importing any of them first runs this file, which sets MLflow's quiet defaults:
MLflow reads them when it is imported, so they must be set before that.
"""
import os

# No INFO lines about database migrations, no "View run at" banners for a
# tracking server. setdefault: a user who sets them keeps their choice.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
# MLflow's own HTTP retries (7, exponential backoff) take over four minutes to
# give up on a server that is down; the records are kept and sent later instead.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars while a model is saved
