"""Shared test setup: `import dpo` works from any working directory, and CPU work stays single-threaded."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# The test models are tiny: extra intra-op threads only add synchronisation, and on shared cores
# they spin against other processes (measured: 0.73 s vs 0.012 s per toy-model step on 2 busy cores).
torch.set_num_threads(1)

# Figures measured by the end-to-end tests, printed in pytest's closing summary (and so in CI's log).
MEASURED: list[str] = []


def pytest_terminal_summary(terminalreporter):
    if MEASURED:
        terminalreporter.section("measured on the toy world")
        for line in MEASURED:
            terminalreporter.write_line(line)
