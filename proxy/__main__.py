"""`python -m proxy`: run the proxy (one process, or DIALOGS_PROCESSES on one port),
configured by DIALOGS_* variables."""

import sys

from proxy.processes import main

sys.exit(main())
