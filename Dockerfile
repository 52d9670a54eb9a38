# The image every Dialogs service runs from, without the operator's tooling (the `local`
# extra): `python -m proxy`, `python -m dialog_api`, `python -m proxy.bootstrap`,
# `python -m proxy.migration`.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
# The pinned dependencies first (a layer that changes only with requirements.lock), then the
# project without resolving anything again: an image built next month runs what was tested.
COPY requirements.lock ./
RUN pip install -r requirements.lock
COPY pyproject.toml README.md ./
COPY dialogs ./dialogs
COPY proxy ./proxy
COPY dialog_api ./dialog_api
RUN pip install --no-deps . && useradd --system --uid 10001 dialogs
USER dialogs

ENTRYPOINT ["python", "-m"]
CMD ["proxy"]
