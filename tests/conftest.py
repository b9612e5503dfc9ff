"""Shared fixtures: quiet TensorFlow, small synthetic lakes made by core.synthetic."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
