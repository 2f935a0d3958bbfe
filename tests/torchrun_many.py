"""Several scripts' runs in one launch, for the tests: `torchrun tests/torchrun_many.py RUNS_JSON` (or plain `python`).

RUNS_JSON is a list of [module, [flags...]]. Each run is exactly `python <module>.py <flags>` (tyro parses the same
flags and train() runs); one launch pays the start-up (imports, process group rendezvous) once for all of them, which
is most of a small run's time. Rank 0 prints RUN_END after each run, so the output can be split per run.
"""

import importlib
import json
import sys
from pathlib import Path

import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RUN_END = "=== end of run ==="

if __name__ == "__main__":
    for module, argv in json.loads(sys.argv[1]):
        script = importlib.import_module(module)
        script.train(tyro.cli(script.Args, args=argv, use_underscores=True))
        print(RUN_END, flush=True)
