"""What the suite's own set-up (conftest.py) promises every test: one CPU thread, in process and in the scripts that
tests start as subprocesses, whatever the shell had set."""

import os

import pytest
import torch

from helpers import python


def test_in_process_runs_use_one_thread():
    """Fails under `OMP_NUM_THREADS=4 pytest` if conftest only defaults the variable."""
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"


@pytest.mark.slow  # starts a process
def test_subprocesses_use_one_thread():
    result = python("-c", "import os, torch; print(os.environ['OMP_NUM_THREADS'], torch.get_num_threads())")
    assert (result.returncode, result.stdout.split()) == (0, ["1", "1"]), result.stderr[-2000:]
