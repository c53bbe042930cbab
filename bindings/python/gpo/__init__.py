"""Python binding of gpo's C API (libgpo.so) through ctypes — no compiled extension.

    import gpo
    engine = gpo.Engine("model.gguf")
    t = engine.generate("What is 2 + 3?", n=4, temperature=0.7)
    values = engine.step_values(t, 0, reward=lambda prompt, completion: float("5" in completion))

The library is found through $GPO_LIB, else the one shipped in the package (`pip install
./bindings/python`), else target/release/libgpo.so of the source tree.
Every failing call raises gpo.Error with the status and gpo's message.
"""

import ctypes as C
import json
import os
from pathlib import Path

__all__ = ["Error", "Engine", "Trajectories", "Verifier", "Trainer", "Run", "version", "default_model", "models_dir", "lib"]


def _load():
    candidates = [os.environ.get("GPO_LIB")] if os.environ.get("GPO_LIB") else []
    here = Path(__file__).resolve().parent
    candidates.append(str(here / "libgpo.so"))  # shipped by `pip install ./bindings/python`
    root = here.parents[2]  # the source tree, when imported from bindings/python
    candidates += [str(root / "target" / "release" / "libgpo.so"), str(root / "target" / "debug" / "libgpo.so"), "libgpo.so"]
    errors = []
    for c in candidates:
        try:
            return C.CDLL(c)
        except OSError as e:
            errors.append(f"{c}: {e}")
    raise OSError("cannot load libgpo.so (`pip install ./bindings/python`, `cargo build --release`, or set GPO_LIB):\n" + "\n".join(errors))


lib = _load()
LIB_PATH = lib._name
OK = 0
STATUS = {0: "ok", 1: "invalid argument", 2: "I/O error", 3: "model or adapter rejected", 4: "cancelled", 5: "internal error (panic)", 6: "internal error", 7: "callback error"}


# GpoEngineParams.sampling (GPO_SAMPLING_AUTO / _GRAPH / _HOST in gpo.h).
_SAMPLING = {"auto": 0, "graph": 1, "host": 2}


class EngineParams(C.Structure):
    _fields_ = [("n_gpu_layers", C.c_int32), ("n_threads", C.c_int32), ("n_ctx_per_seq", C.c_uint32), ("n_parallel", C.c_uint32), ("kv_unified", C.c_bool), ("sampling", C.c_uint32)]


class SamplingParams(C.Structure):
    _fields_ = [("temperature", C.c_float), ("top_k", C.c_int32), ("top_p", C.c_float), ("min_p", C.c_float), ("max_tokens", C.c_uint32), ("seed", C.c_uint64)]


class ValueParams(C.Structure):
    _fields_ = [("rollouts", C.c_uint32), ("critical_mode", C.c_int32), ("sampling", SamplingParams)]


class StepReport(C.Structure):
    _fields_ = [("step", C.c_uint64), ("loss", C.c_double), ("grad_norm", C.c_double), ("tokens_per_s", C.c_double), ("logprob_gap", C.c_double), ("skipped", C.c_bool)]


class Progress(C.Structure):
    _fields_ = [("iteration", C.c_size_t), ("iterations", C.c_size_t), ("reward_mean", C.c_double), ("loss", C.c_double), ("heldout_accuracy", C.c_double), ("adapter_version", C.c_uint64), ("rollouts", C.c_uint64)]


REWARD_FN = C.CFUNCTYPE(C.c_int32, C.c_void_p, C.c_char_p, C.c_char_p, C.POINTER(C.c_float))
PROGRESS_FN = C.CFUNCTYPE(C.c_int32, C.c_void_p, C.POINTER(Progress))
P = C.c_void_p


def _sig(name, res, *args):
    f = getattr(lib, name)
    f.restype, f.argtypes = res, list(args)
    return f


_sig("gpo_version", C.c_char_p)
_sig("gpo_last_error", C.c_char_p)
_sig("gpo_engine_default_params", EngineParams)
_sig("gpo_sampling_default_params", SamplingParams)
_sig("gpo_value_default_params", ValueParams)
_sig("gpo_engine_new", C.c_int, C.c_char_p, C.POINTER(EngineParams), C.POINTER(P))
_sig("gpo_engine_free", None, P)
_sig("gpo_generate", C.c_int, P, C.c_char_p, C.c_bool, C.c_size_t, C.POINTER(SamplingParams), C.POINTER(P))
_sig("gpo_fork", C.c_int, P, P, C.c_size_t, C.c_size_t, C.c_size_t, C.POINTER(SamplingParams), C.POINTER(P))
_sig("gpo_engine_set_adapter", C.c_int, P, C.c_char_p, C.c_float, C.POINTER(C.c_uint64))
_sig("gpo_engine_remove_adapter", C.c_int, P, C.POINTER(C.c_uint64))
_sig("gpo_engine_cancel", C.c_int, P)
_sig("gpo_trajectories_free", None, P)
_sig("gpo_trajectories_count", C.c_size_t, P)
_sig("gpo_trajectory_text", C.c_char_p, P, C.c_size_t)
_sig("gpo_trajectory_finish", C.c_char_p, P, C.c_size_t)
_sig("gpo_trajectory_tokens", C.c_int, P, C.c_size_t, C.POINTER(C.POINTER(C.c_int32)), C.POINTER(C.POINTER(C.c_float)), C.POINTER(C.c_size_t))
_sig("gpo_trajectory_steps", C.c_int, P, C.c_size_t, C.POINTER(C.POINTER(C.c_uint32)), C.POINTER(C.c_size_t))
_sig("gpo_trajectory_adapter_version", C.c_uint64, P, C.c_size_t)
_sig("gpo_verifier_new", C.c_int, C.c_char_p, C.POINTER(P))
_sig("gpo_verifier_free", None, P)
_sig("gpo_verifier_score", C.c_int, P, C.c_char_p, C.c_char_p, C.c_char_p, C.POINTER(C.c_float))
_sig("gpo_step_values", C.c_int, P, P, C.c_size_t, C.POINTER(ValueParams), REWARD_FN, P, C.POINTER(P))
_sig("gpo_values_free", None, P)
_sig("gpo_values_get", C.c_int64, P, C.POINTER(C.POINTER(C.c_double)), C.POINTER(C.POINTER(C.c_double)), C.POINTER(C.c_size_t))
_sig("gpo_trainer_new", C.c_int, C.c_char_p, C.c_char_p, C.POINTER(P))
_sig("gpo_trainer_free", None, P)
_sig("gpo_trainer_step", C.c_int, P, P, C.POINTER(C.c_float), C.c_size_t, C.POINTER(C.c_uint64), C.POINTER(StepReport))
_sig("gpo_trainer_export", C.c_int, P, C.c_char_p)
_sig("gpo_run_new", C.c_int, C.c_char_p, C.POINTER(P))
_sig("gpo_run_start", C.c_int, P, PROGRESS_FN, P)
_sig("gpo_run_cancel", C.c_int, P)
_sig("gpo_run_free", None, P)


class Error(Exception):
    """A failed gpo call: .status (int), .reason (str)."""

    def __init__(self, status, call):
        self.status = status
        self.reason = lib.gpo_last_error().decode("utf-8", "replace")
        super().__init__(f"{call}: {STATUS.get(status, status)}: {self.reason}")


def _check(status, call):
    if status != OK:
        raise Error(status, call)


def _b(s):
    return None if s is None else str(s).encode("utf-8")


def version():
    return lib.gpo_version().decode()


def models_dir():
    """gpo's model cache: $GPO_MODELS_DIR, else $XDG_CACHE_HOME/gpo/models, else ~/.cache/gpo/models."""
    if os.environ.get("GPO_MODELS_DIR"):
        return Path(os.environ["GPO_MODELS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpo" / "models"


def default_model():
    """Path of the default model (SmolLM2-135M-Instruct Q4_1; scripts/fetch-model.sh fetches it)."""
    return str(models_dir() / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _sampling(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_tokens=256, seed=0):
    p = lib.gpo_sampling_default_params()
    p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens, p.seed = temperature, top_k, top_p, min_p, max_tokens, seed
    return p


class _Handle:
    _free = None
    _p = None  # set once construction succeeded; __del__ may run on a failed construction

    def __init__(self, ptr):
        self._p = ptr

    def close(self):
        if self._p:
            type(self)._free(self._p)
            self._p = None

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Trajectories(_Handle):
    """Generated trajectories: texts, tokens, log-probs, steps."""

    _free = lib.gpo_trajectories_free

    def __len__(self):
        return lib.gpo_trajectories_count(self._p)

    def text(self, i):
        s = lib.gpo_trajectory_text(self._p, i)
        if s is None:
            raise IndexError(i)
        return s.decode("utf-8", "replace")

    def finish(self, i):
        return lib.gpo_trajectory_finish(self._p, i).decode()

    def tokens(self, i):
        t, n = C.POINTER(C.c_int32)(), C.c_size_t()
        _check(lib.gpo_trajectory_tokens(self._p, i, C.byref(t), None, C.byref(n)), "gpo_trajectory_tokens")
        return t[: n.value]

    def logprobs(self, i):
        lp, n = C.POINTER(C.c_float)(), C.c_size_t()
        _check(lib.gpo_trajectory_tokens(self._p, i, None, C.byref(lp), C.byref(n)), "gpo_trajectory_tokens")
        return lp[: n.value]

    def steps(self, i):
        b, n = C.POINTER(C.c_uint32)(), C.c_size_t()
        _check(lib.gpo_trajectory_steps(self._p, i, C.byref(b), C.byref(n)), "gpo_trajectory_steps")
        return [(b[2 * k], b[2 * k + 1]) for k in range(n.value)]

    def adapter_version(self, i):
        return lib.gpo_trajectory_adapter_version(self._p, i)


class Engine(_Handle):
    """The rollout engine (thread-safe)."""

    _free = lib.gpo_engine_free

    def __init__(self, model, n_parallel=16, n_ctx_per_seq=1024, n_threads=0, n_gpu_layers=-1, kv_unified=False, sampling="auto"):
        p = lib.gpo_engine_default_params()
        p.n_parallel, p.n_ctx_per_seq, p.n_threads, p.n_gpu_layers, p.kv_unified = n_parallel, n_ctx_per_seq, n_threads, n_gpu_layers, kv_unified
        if sampling not in _SAMPLING:
            raise ValueError(f"sampling must be one of {sorted(_SAMPLING)}, not {sampling!r}")
        p.sampling = _SAMPLING[sampling]
        out = P()
        _check(lib.gpo_engine_new(_b(model), C.byref(p), C.byref(out)), "gpo_engine_new")
        super().__init__(out)

    def generate(self, prompt, n=1, raw=False, **sampling):
        out = P()
        sp = _sampling(**sampling)
        _check(lib.gpo_generate(self._p, _b(prompt), raw, n, C.byref(sp), C.byref(out)), "gpo_generate")
        return Trajectories(out)

    def fork(self, trajectories, index, at, n=1, **sampling):
        out = P()
        sp = _sampling(**sampling)
        _check(lib.gpo_fork(self._p, trajectories._p, index, at, n, C.byref(sp), C.byref(out)), "gpo_fork")
        return Trajectories(out)

    def step_values(self, trajectories, index, reward, rollouts=4, critical="abs", **sampling):
        """Values V(s_0..s_K), advantages and the critical step (None if all values are equal).
        `reward(prompt, completion) -> float` scores every rollout; an exception aborts the call."""
        errors = []

        def cb(_user, prompt, completion, score):
            try:
                score[0] = float(reward(prompt.decode("utf-8", "replace"), completion.decode("utf-8", "replace")))
                return 0
            except Exception as e:  # never raise through the C frames
                errors.append(e)
                return 1

        vp = lib.gpo_value_default_params()
        vp.rollouts = rollouts
        vp.critical_mode = {"abs": 0, "drop": 1, "gain": 2, "auto": 3}[critical]
        vp.sampling = _sampling(**sampling)
        out = P()
        status = lib.gpo_step_values(self._p, trajectories._p, index, C.byref(vp), REWARD_FN(cb), None, C.byref(out))
        if errors:
            raise errors[0]
        _check(status, "gpo_step_values")
        try:
            v, a, n = C.POINTER(C.c_double)(), C.POINTER(C.c_double)(), C.c_size_t()
            crit = lib.gpo_values_get(out, C.byref(v), C.byref(a), C.byref(n))
            return {"values": v[: n.value], "advantages": a[: max(n.value - 1, 0)], "critical": None if crit < 0 else crit}
        finally:
            lib.gpo_values_free(out)

    def set_adapter(self, path, scale=1.0):
        v = C.c_uint64()
        _check(lib.gpo_engine_set_adapter(self._p, _b(path), scale, C.byref(v)), "gpo_engine_set_adapter")
        return v.value

    def remove_adapter(self):
        v = C.c_uint64()
        _check(lib.gpo_engine_remove_adapter(self._p, C.byref(v)), "gpo_engine_remove_adapter")
        return v.value

    def cancel(self):
        _check(lib.gpo_engine_cancel(self._p), "gpo_engine_cancel")


class Verifier(_Handle):
    """A verifier from a config dict ({"kind": "numeric"} by default)."""

    _free = lib.gpo_verifier_free

    def __init__(self, config=None):
        out = P()
        _check(lib.gpo_verifier_new(_b(json.dumps(config)) if config else None, C.byref(out)), "gpo_verifier_new")
        super().__init__(out)

    def score(self, completion, answer, prompt=""):
        s = C.c_float()
        _check(lib.gpo_verifier_score(self._p, _b(prompt), _b(completion), _b(answer), C.byref(s)), "gpo_verifier_score")
        return s.value


class Trainer(_Handle):
    """The LoRA trainer; `config` is a TrainerConfig dict (see the README)."""

    _free = lib.gpo_trainer_free

    def __init__(self, model, config=None):
        out = P()
        _check(lib.gpo_trainer_new(_b(model), _b(json.dumps(config)) if config else None, C.byref(out)), "gpo_trainer_new")
        super().__init__(out)

    def step(self, batch, rewards, groups=None):
        r = (C.c_float * len(rewards))(*rewards)
        g = (C.c_uint64 * len(groups))(*groups) if groups else None
        rep = StepReport()
        _check(lib.gpo_trainer_step(self._p, batch._p, r, len(rewards), g, C.byref(rep)), "gpo_trainer_step")
        return {f: getattr(rep, f) for f, _ in StepReport._fields_}

    def export(self, path):
        _check(lib.gpo_trainer_export(self._p, _b(path)), "gpo_trainer_export")


class Run(_Handle):
    """A whole GPO run from a TOML config (resumable)."""

    _free = lib.gpo_run_free

    def __init__(self, config_path):
        out = P()
        _check(lib.gpo_run_new(_b(config_path), C.byref(out)), "gpo_run_new")
        super().__init__(out)

    def start(self, progress=None):
        """Runs to the end; `progress(dict) -> bool` returning False stops (raises Error, status 4)."""

        def cb(_user, p):
            try:
                d = {f: getattr(p.contents, f) for f, _ in Progress._fields_}
                return 0 if progress is None or progress(d) is not False else 1
            except Exception:
                return 1

        _check(lib.gpo_run_start(self._p, PROGRESS_FN(cb), None), "gpo_run_start")

    def cancel(self):
        _check(lib.gpo_run_cancel(self._p), "gpo_run_cancel")
