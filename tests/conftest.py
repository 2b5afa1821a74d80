"""Test-session setup: kernels compiled by the tests go to a repo-local cache, shared by every test."""

import os
from pathlib import Path

os.environ.setdefault("NUMRNN_CACHE_DIR", str(Path(__file__).resolve().parent.parent / ".numrnn-cache"))
# The fused projection on every machine, also where it does not pay (codegen.cells.common.fusion_pays): the tests
# check its sums against the unfused ones and the oracle; the unfused path runs in every layer that cannot fuse.
os.environ.setdefault("NUMRNN_FUSED_PROJECTION", "1")
