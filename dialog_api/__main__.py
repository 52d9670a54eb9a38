"""`python -m dialog_api`: run one worker for one shard, configured by DIALOGS_* variables."""

from dialog_api.app import create_app
from dialog_api.settings import WorkerSettings
from dialogs.serve import serve

serve(WorkerSettings, create_app, "worker")
