"""pytest tests of the ctypes binding (run by scripts/test.sh after `cargo build --release`)."""
import os
import sys
import threading
import time

import pytest

try:
    import gpo  # installed with `pip install ./bindings/python`
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import gpo  # noqa: E402  (the source tree, after `cargo build --release`)

MODEL = os.environ.get("GPO_TEST_MODEL", gpo.default_model())


@pytest.fixture(scope="module")
def engine():
    e = gpo.Engine(MODEL, n_parallel=8, n_ctx_per_seq=512)
    yield e
    e.close()


@pytest.mark.skipif(not os.environ.get("GPO_EXPECT_INSTALLED"), reason="only when testing the pip-installed package")
def test_the_installed_package_ships_its_own_library():
    here = os.path.dirname(os.path.abspath(gpo.__file__))
    assert "site-packages" in here, here
    assert gpo.LIB_PATH == os.path.join(here, "libgpo.so"), gpo.LIB_PATH


def test_version():
    assert gpo.version().count(".") == 2


def test_generate_tokens_logprobs_steps(engine):
    t = engine.generate("Count to five, one number per line.", n=2, temperature=0.0, max_tokens=24)
    assert len(t) == 2
    toks, lps = t.tokens(0), t.logprobs(0)
    assert len(toks) == len(lps) == 24 or t.finish(0) == "eog"
    assert all(lp <= 0.0 for lp in lps)
    steps = t.steps(0)
    assert steps[0][0] == 0 and steps[-1][1] == len(toks)
    assert t.text(0) == t.text(1)  # greedy
    with pytest.raises(IndexError):
        t.text(5)


def test_graph_and_host_sampling_agree_on_greedy():
    texts = []
    for where in ("graph", "host"):
        e = gpo.Engine(MODEL, n_parallel=2, n_ctx_per_seq=256, sampling=where)
        texts.append(e.generate("Name three colours.", n=1, temperature=0.0, max_tokens=16).tokens(0))
    assert texts[0] == texts[1]
    with pytest.raises(ValueError):
        gpo.Engine(MODEL, sampling="gpu")


def test_fork_keeps_the_prefix_and_reproduces_greedy(engine):
    t = engine.generate("Name three colours.", n=1, temperature=0.0, max_tokens=20)
    f = engine.fork(t, 0, 8, n=2, temperature=0.0, max_tokens=12)
    assert f.tokens(0) == t.tokens(0)[8:20]


def test_errors_carry_status_and_message(engine):
    with pytest.raises(gpo.Error) as e:
        engine.generate("x", n=1, top_p=0.0)
    assert e.value.status == 1 and "top_p" in e.value.reason
    with pytest.raises(gpo.Error) as e:
        gpo.Engine("/nonexistent.gguf")
    assert e.value.status == 2
    with pytest.raises(gpo.Error) as e:
        engine.set_adapter(MODEL)  # a model, not an adapter
    assert e.value.status == 3


def test_values_with_python_reward_and_exceptions(engine):
    t = engine.generate("What is 2 + 2? Think step by step.", n=1, temperature=0.7, max_tokens=32, seed=3)
    v = engine.step_values(t, 0, lambda p, c: float("4" in c), rollouts=2, temperature=0.7, max_tokens=32)
    assert len(v["values"]) == len(t.steps(0)) + 1
    assert len(v["advantages"]) == len(v["values"]) - 1
    with pytest.raises(ZeroDivisionError):
        engine.step_values(t, 0, lambda p, c: 1 / 0, rollouts=1, max_tokens=8)


def test_train_export_swap(engine, tmp_path):
    t = engine.generate("Say yes or no.", n=3, temperature=1.0, max_tokens=8, seed=5)
    tr = gpo.Trainer(MODEL, {"temperature": 1.0, "lora": {"rank": 2, "alpha": 4.0}, "optim": {"lr": 1e-3}})
    rep = tr.step(t, [1.0, 0.0, 0.0])
    assert rep["step"] == 1 and not rep["skipped"]
    with pytest.raises(gpo.Error):
        tr.step(t, [1.0])
    path = tmp_path / "a.gguf"
    tr.export(str(path))
    before = engine.generate("hi", n=1, temperature=0.0, max_tokens=2).adapter_version(0)
    assert engine.set_adapter(str(path)) == before + 1
    assert engine.generate("hi", n=1, temperature=0.0, max_tokens=2).adapter_version(0) == before + 1
    assert engine.remove_adapter() == before + 2


def test_cancel_from_another_thread(engine):
    result = {}

    def long():
        try:
            engine.generate("go", n=1, raw=True, max_tokens=100000)
        except gpo.Error as e:
            result["status"] = e.status

    th = threading.Thread(target=long)
    th.start()
    # cancel() stops the calls in flight: repeat it until the call has started and returned,
    # however slowly a loaded machine starts the thread.
    deadline = time.monotonic() + 60
    while th.is_alive() and time.monotonic() < deadline:
        engine.cancel()
        th.join(timeout=0.02)
    assert not th.is_alive()
    assert result.get("status") == 4


def test_run_stops_from_its_callback_and_run_gpo_resumes_it(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        f'mode = "gpo"\niterations = 2\noutput = "out"\nmodel = "{MODEL}"\n'
        "[tasks]\ntrain_count = 8\neval_count = 2\n[rollout]\nprompts = 1\ngroup_size = 2\nmax_tokens = 16\n"
        "[value]\nrollouts = 2\n[train]\nrank = 2\nalpha = 4.0\nrecompute = false\n[eval]\nmax_tokens = 8\n"
        "[engine]\nparallel = 4\nctx_per_sequence = 256\n"
    )
    seen = []
    with gpo.Run(str(cfg)) as run:
        with pytest.raises(gpo.Error) as e:
            run.start(lambda p: seen.append(p) or False)
        assert e.value.status == 4
    assert [p["iteration"] for p in seen] == [0] and seen[0]["iterations"] == 2
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 1
    # The README's driver resumes the run from its checkpoint and finishes it.
    import subprocess

    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "run_gpo.py")
    out = subprocess.run([sys.executable, script, str(cfg)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "iteration 2/2" in out.stdout and "iteration 1/2" not in out.stdout and out.stdout.endswith("done\n")
    assert (tmp_path / "out" / "metrics.jsonl").read_text().count("\n") == 2
