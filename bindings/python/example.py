"""A GPO step from Python: sample, value the steps, reset at the critical one, train, swap.
    python3 bindings/python/example.py [model.gguf]

Rewards come from the verifier only. A group whose rewards are all equal carries no learning
signal (its group-normalised advantages are zero); the example then falls back to the root
group, and if that is uniform too it says so and does not train."""
import os
import sys
import tempfile

try:
    import gpo  # installed with `pip install ./bindings/python`
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import gpo  # the source tree (after `cargo build --release`)

model = sys.argv[1] if len(sys.argv) > 1 else gpo.default_model()
question, answer = "Tom has 5 apples and buys 3 more. How many apples? Think step by step.", "8"
engine = gpo.Engine(model, n_parallel=8, n_ctx_per_seq=512)
verifier = gpo.Verifier({"kind": "numeric"})
roots = engine.generate(question, n=8, temperature=0.9, max_tokens=48, seed=1)
root_rewards = [verifier.score(roots.text(i), answer) for i in range(len(roots))]
print("roots:", root_rewards)
# Analyse a failed root if there is one (its value drop marks the critical step).
i = next((k for k, r in enumerate(root_rewards) if r < 0.5), 0)
print("sample:", roots.text(i)[:80].replace("\n", " | "), f"({len(roots.steps(i))} steps)")
v = engine.step_values(roots, i, lambda p, c: verifier.score(c, answer), rollouts=4, critical="auto", temperature=0.9, max_tokens=48)
print("values", [round(x, 2) for x in v["values"]], "critical step", v["critical"])
at = roots.steps(i)[v["critical"] - 1][1] if v["critical"] else 0
resets = engine.fork(roots, i, at, n=8, temperature=0.9, max_tokens=48, seed=2)
rewards = [verifier.score(resets.text(k), answer) for k in range(len(resets))]
print("resets at the critical prefix:", rewards)
batch, batch_rewards, what = resets, rewards, "the resets"
if len(set(rewards)) == 1:
    batch, batch_rewards, what = roots, root_rewards, "the root group (the resets all scored the same)"
if len(set(batch_rewards)) == 1:
    print("no learning signal: every sample scored", batch_rewards[0], "- nothing to train on this time")
    sys.exit(0)
trainer = gpo.Trainer(model, {"temperature": 0.9, "lora": {"rank": 4, "alpha": 8.0}, "optim": {"lr": 1e-3}})
report = trainer.step(batch, batch_rewards)
path = os.path.join(tempfile.mkdtemp(), "adapter.gguf")
trainer.export(path)
print(f"trained on {what}: step", report["step"], "loss", round(report["loss"], 4), "→ adapter version", engine.set_adapter(path))
