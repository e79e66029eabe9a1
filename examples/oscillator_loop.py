"""The seed tutorial's sweep, unchanged: one Logbook per (omega, dt), run in a plain loop.

Run it from any folder; it writes ./outputs/log_omega*_dt*/.
"""

import itertools

import numpy as np

from notata import Logbook

omegas = [1.0, 2.0, 3.0]
dts = [1e-2, 1e-3]

for omega, dt in itertools.product(omegas, dts):
    run_id = f"omega{omega}_dt{dt}"
    params = {"omega": omega, "dt": dt, "steps": 1000}

    with Logbook(run_id, params=params) as log:
        x, v = 1.0, 0.0
        xs = np.empty(params["steps"])

        for n in range(params["steps"]):
            a = -omega**2 * x
            x += v*dt + 0.5*a*dt*dt
            a_new = -omega**2 * x
            v += 0.5*(a + a_new)*dt
            xs[n] = x

        log.save_numpy("x", xs)
        log.save_json("final_state", {"x": float(x), "v": float(v)})

        energy = 0.5 * (v**2 + (omega * x)**2)
        log.save_json("final_metrics", {"E": float(energy)})
