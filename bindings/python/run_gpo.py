"""Drive a whole GPO run from Python (resumable; Ctrl-C stops after the current iteration).
    python3 bindings/python/run_gpo.py [configs/quick.toml]"""
import math
import os
import sys

try:
    import gpo  # installed with `pip install ./bindings/python`
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpo  # noqa: E402  (the source tree)

config = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "..", "configs", "quick.toml")


def progress(p):
    held = "" if math.isnan(p["heldout_accuracy"]) else f", held-out {100 * p['heldout_accuracy']:.0f}%"
    loss = "-" if math.isnan(p["loss"]) else f"{p['loss']:.4f}"
    print(f"iteration {p['iteration'] + 1}/{p['iterations']}: reward {p['reward_mean']:.2f}, loss {loss}, "
          f"{p['rollouts']} rollouts, adapter v{p['adapter_version']}{held}", flush=True)
    return True  # False stops the run


with gpo.Run(config) as run:
    run.start(progress)
print("done")
