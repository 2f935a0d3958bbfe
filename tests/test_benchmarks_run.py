"""The GPU smoke benchmark's one command, run here on CPU with tiny configs (--tiny), so that it cannot rot between
the rare sessions that have a GPU: the package check, the model and data building, dpo.py under runpy, the parsing of
its step lines and the report."""

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import dpo

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_smoke_tiny_runs_and_reports(tmp_path):
    done = subprocess.run(["bash", "benchmarks/gpu_smoke.sh", "--tiny", "--work_dir", str(tmp_path)], cwd=ROOT,
                          env=os.environ | {"PYTHON": sys.executable}, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "gpu_smoke: done, 2 of 2 runs ok" in out, out[-3000:]
    for name in ("lora-7b", "full-0.5b"):
        row = re.search(rf"^\| {name} \|.*\| ok \|$", out, re.MULTILINE)
        assert row, f"no report row for {name}:\n{out[-3000:]}"
        cells = [c.strip() for c in row[0].strip("|").split("|")]
        assert cells[3] == "3" and cells[4].startswith("0.6931,"), row[0]  # 3 steps logged; step 1 at h = 0: log 2
    for step in (1, 2, 3):
        assert f"step {step}: train/loss=" in out
    # the chunked log-probs run in the smoke test once dpo.py has the flag
    fields = {f.name for f in dataclasses.fields(dpo.Args)}
    passed = re.search(r"^flags passed where dpo.Args has them: (.*);", out, re.MULTILINE)[1]
    assert ("--logp_chunk_tokens 16" in passed) == ("logp_chunk_tokens" in fields), passed
