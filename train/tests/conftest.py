"""Shared helpers of the iapt-train tests: the repository's paths, the `iapt` binary ($IAPT_BIN),
the committed tiny GGUF models read back into Hugging Face transformers, and a tiny tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TRAIN_TEST_THREADS", "1")))

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent.parent
FIXTURES = REPO / "converters" / "python" / "fixtures" / "models"
VECTORS = REPO / "spec" / "vectors"
sys.path.insert(0, str(TESTS))


def iapt_bin() -> str:
    b = os.environ.get("IAPT_BIN", str(REPO / "target" / "debug" / "iapt"))
    p = Path(b)
    if not p.is_absolute():
        p = REPO / p
    if not p.exists():
        raise RuntimeError(f"IAPT_BIN {p} does not exist (build the toolkit: cargo build -p iapt)")
    return str(p)


def run_iapt(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([iapt_bin(), *map(str, args)], capture_output=True, text=True, errors="replace", timeout=120)
    if check and r.returncode != 0:
        raise AssertionError(f"iapt {' '.join(map(str, args))} exited {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}")
    return r


def validate_json(adapter, model=None) -> dict:
    args = ["validate", "--json", adapter] + (["--model", model] if model else [])
    r = run_iapt(*args, check=False)
    return {"rc": r.returncode, **json.loads(r.stdout)}


@pytest.fixture(scope="session")
def tiny_tokenizer_factory():
    from tinymodels import tiny_tokenizer

    return tiny_tokenizer
