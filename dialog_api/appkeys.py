"""Typed keys for the worker app's state."""

from __future__ import annotations

import asyncio

from aiohttp import web

from dialog_api.channels import Channels
from dialog_api.group_commit import GroupCommit
from dialog_api.map_view import MapView
from dialog_api.metrics import WorkerMetrics
from dialog_api.settings import WorkerSettings
from dialog_api.storage import ShardStore

SETTINGS = web.AppKey("settings", WorkerSettings)
METRICS = web.AppKey("metrics", WorkerMetrics)
STORE = web.AppKey("store", ShardStore)
MAP_VIEW = web.AppKey("map_view", MapView)
GROUP_COMMIT = web.AppKey("group_commit", GroupCommit)
CHANNELS = web.AppKey("channels", Channels)
# Inbox reads of batches running at once, across all of the worker's batches (handlers.py).
INBOX_READS = web.AppKey("inbox_reads", asyncio.Semaphore)
