"""SIGKILL at random instants never leaves a torn file: every file is an old or a new version."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import yaml

from notata import Logbook

KILLS = 300


def _writer(base: Path, run_id: str) -> None:
    """The child: open (or resume) the run and rewrite metadata and artifacts as fast as it can."""
    log = Logbook(run_id, base, resume=True, heartbeat=0.001, signals=False)
    i = 0
    while True:
        i += 1
        log.meta(step=i, pad="x" * (i % 5000))
        log.save_json("progress", {"i": i, "pad": "y" * (i % 7000)})
        log.save_numpy("state", np.full(i % 3000, i, dtype=np.int64))
        log.params(i=i)


def _check(run: Path) -> None:
    meta_file = run / "metadata.json"
    if meta_file.exists():  # killed before the first write is allowed; half a file is not
        meta = json.loads(meta_file.read_text())
        assert meta["run_id"] == run.name[4:]
        if "step" in meta:
            assert meta["pad"] == "x" * (meta["step"] % 5000)
    progress = run / "artifacts" / "progress.json"
    if progress.exists():
        p = json.loads(progress.read_text())
        assert p["pad"] == "y" * (p["i"] % 7000)
    state = run / "data" / "state.npy"
    if state.exists():
        arr = np.load(state, allow_pickle=False)
        assert (arr == arr[0]).all() if arr.size else True
    params = run / "params.yaml"
    if params.exists():
        assert isinstance(yaml.safe_load(params.read_text())["i"], int)


def test_sigkill_at_random_instants_leaves_only_whole_files(base: Path) -> None:
    rng = random.Random(20261128)
    for n in range(KILLS):
        run_id = f"r{n % 10}"  # each run is killed and resumed many times
        pid = os.fork()
        if pid == 0:  # child
            try:
                _writer(base, run_id)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.0, 0.03))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        _check(base / f"log_{run_id}")
    # leftover temporaries are invisible to readers and cleaned by the next attempt
    for k in range(10):
        with Logbook(f"r{k}", base, resume=True) as log:
            assert not list(log.path.rglob("*.tmp"))
            assert log.attempt > 1
        _check(log.path)
