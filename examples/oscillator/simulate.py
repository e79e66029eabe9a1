"""One task of the oscillator sweep: the tutorial's loop body, with the sweep deciding the params.

Locally:   notata submit sweep.yaml --backend local -- python simulate.py sweep.yaml
One task:  python simulate.py sweep.yaml 3      (or, in a SLURM array, no index at all)
"""

import sys

import numpy as np

import notata

manifest = sys.argv[1] if len(sys.argv) > 1 else "sweep.yaml"
index = int(sys.argv[2]) if len(sys.argv) > 2 else None

with notata.task(manifest, index) as log:
    p = log.task.params
    omega, dt = p["omega"], p["dt"]
    x, v = 1.0, 0.0
    xs = np.empty(p["steps"])

    for n in range(p["steps"]):
        a = -omega**2 * x
        x += v*dt + 0.5*a*dt*dt
        a_new = -omega**2 * x
        v += 0.5*(a + a_new)*dt
        xs[n] = x

    log.save_numpy("x", xs)
    log.save_json("final_state", {"x": float(x), "v": float(v)})
    log.save_json("final_metrics", {"E": float(0.5 * (v**2 + (omega * x)**2))})
