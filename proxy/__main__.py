"""`python -m proxy`: run one proxy, configured by DIALOGS_* environment variables."""

from dialogs.serve import serve
from proxy.app import create_app
from proxy.settings import ProxySettings

serve(ProxySettings, create_app, "proxy")
