"""Test-session setup: kernels compiled by the tests go to a repo-local cache, shared by every test."""

import os
from pathlib import Path

os.environ.setdefault("NUMRNN_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numrnn-cache"))
