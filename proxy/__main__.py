"""`python -m proxy`: run the proxy (one process, or DIALOGS_PROCESSES on one port), configured by DIALOGS_* variables."""

import sys

from dialogs.serve import run, settings_or_exit
from proxy.app import create_app
from proxy.processes import prefork
from proxy.settings import ProxySettings

settings = settings_or_exit(ProxySettings)
if settings.processes == 1:
    run(settings, create_app(settings), "proxy")
else:
    sys.exit(prefork(settings))
