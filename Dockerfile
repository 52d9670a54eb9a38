# The image every Dialogs process runs from: `dialogs proxy`, `dialogs worker`,
# `dialogs migrate`, `dialogs run-migration`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY dialogs ./dialogs
COPY proxy ./proxy
COPY dialog_api ./dialog_api
RUN pip install . && useradd --system --uid 10001 dialogs
USER dialogs

ENTRYPOINT ["dialogs"]
CMD ["--help"]
