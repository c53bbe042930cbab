"""A GPO step from Python: sample, value the steps, reset at the critical one, train, swap.
    python3 bindings/python/example.py [model.gguf]"""
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpo  # noqa: E402

model = sys.argv[1] if len(sys.argv) > 1 else gpo.default_model()
engine = gpo.Engine(model, n_parallel=8, n_ctx_per_seq=512)
roots = engine.generate("Tom has 5 apples and buys 3 more. How many apples? Think step by step.", n=2, temperature=0.7, max_tokens=48, seed=1)
print("sample:", roots.text(0)[:80].replace("\n", " | "), f"({len(roots.steps(0))} steps)")
verifier = gpo.Verifier({"kind": "numeric"})
v = engine.step_values(roots, 0, lambda p, c: verifier.score(c, "8"), rollouts=2, temperature=0.7, max_tokens=48)
print("values", [round(x, 2) for x in v["values"]], "critical step", v["critical"])
at = roots.steps(0)[v["critical"] - 1][1] if v["critical"] else 0
resets = engine.fork(roots, 0, at, n=3, temperature=0.7, max_tokens=48, seed=2)
rewards = [verifier.score(resets.text(i), "8") for i in range(len(resets))]
rewards[0] = 1.0  # keep a learning signal in this tiny example
trainer = gpo.Trainer(model, {"temperature": 0.7, "lora": {"rank": 4, "alpha": 8.0}, "optim": {"lr": 1e-3}})
report = trainer.step(resets, rewards)
path = os.path.join(tempfile.mkdtemp(), "adapter.gguf")
trainer.export(path)
print("trained step", report["step"], "loss", round(report["loss"], 4), "→ adapter version", engine.set_adapter(path))
