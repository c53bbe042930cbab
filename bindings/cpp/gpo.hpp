// gpo.hpp — header-only C++17 RAII wrapper over the gpo C API (include/gpo.h).
// Every handle owns its C object and frees it once (moves transfer ownership; copies are
// disabled). Failures throw gpo::Error with the status and gpo_last_error()'s message.
#pragma once

#include "gpo.h"

#include <cmath>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace gpo {

/// A failed gpo call.
class Error : public std::runtime_error {
  public:
    Error(GpoStatus status, const std::string& what) : std::runtime_error(what), status_(status) {}
    GpoStatus status() const noexcept { return status_; }

  private:
    GpoStatus status_;
};

inline void check(GpoStatus st, const char* call) {
    if (st != GPO_OK) {
        throw Error(st, std::string(call) + ": " + gpo_status_string(st) + ": " + gpo_last_error());
    }
}

template <typename T, void (*Free)(T*)>
struct Deleter {
    void operator()(T* p) const noexcept { Free(p); }
};

/// Generated trajectories (owned).
class Trajectories {
  public:
    explicit Trajectories(GpoTrajectories* p) : p_(p) {}
    size_t size() const noexcept { return gpo_trajectories_count(p_.get()); }
    std::string text(size_t i) const {
        const char* s = gpo_trajectory_text(p_.get(), i);
        if (!s) throw Error(GPO_INVALID_ARGUMENT, "trajectory index out of range");
        return s;
    }
    std::vector<int32_t> tokens(size_t i) const {
        const int32_t* t = nullptr;
        size_t n = 0;
        check(gpo_trajectory_tokens(p_.get(), i, &t, nullptr, &n), "gpo_trajectory_tokens");
        return std::vector<int32_t>(t, t + n);
    }
    std::vector<float> logprobs(size_t i) const {
        const float* l = nullptr;
        size_t n = 0;
        check(gpo_trajectory_tokens(p_.get(), i, nullptr, &l, &n), "gpo_trajectory_tokens");
        return std::vector<float>(l, l + n);
    }
    /// Steps as (start, end) token offsets.
    std::vector<std::pair<uint32_t, uint32_t>> steps(size_t i) const {
        const uint32_t* b = nullptr;
        size_t n = 0;
        check(gpo_trajectory_steps(p_.get(), i, &b, &n), "gpo_trajectory_steps");
        std::vector<std::pair<uint32_t, uint32_t>> out;
        for (size_t k = 0; k < n; k++) out.emplace_back(b[2 * k], b[2 * k + 1]);
        return out;
    }
    uint64_t adapter_version(size_t i) const noexcept { return gpo_trajectory_adapter_version(p_.get(), i); }
    const GpoTrajectories* get() const noexcept { return p_.get(); }

  private:
    std::unique_ptr<GpoTrajectories, Deleter<GpoTrajectories, gpo_trajectories_free>> p_;
};

/// A verifier built from a JSON config ({"kind": "numeric"} by default).
class Verifier {
  public:
    explicit Verifier(const char* config_json = nullptr) {
        GpoVerifier* v = nullptr;
        check(gpo_verifier_new(config_json, &v), "gpo_verifier_new");
        p_.reset(v);
    }
    float score(const std::string& completion, const std::string& answer, const std::string& prompt = "") const {
        float s = 0;
        check(gpo_verifier_score(p_.get(), prompt.c_str(), completion.c_str(), answer.c_str(), &s), "gpo_verifier_score");
        return s;
    }

  private:
    std::unique_ptr<GpoVerifier, Deleter<GpoVerifier, gpo_verifier_free>> p_;
};

/// Step values of one trajectory.
struct StepValues {
    std::vector<double> values;
    std::vector<double> advantages;
    long long critical;  // -1 when all values are equal
};

/// The rollout engine. Thread-safe: share one Engine between threads.
class Engine {
  public:
    explicit Engine(const std::string& model, GpoEngineParams params = gpo_engine_default_params()) {
        GpoEngine* e = nullptr;
        check(gpo_engine_new(model.c_str(), &params, &e), "gpo_engine_new");
        p_.reset(e);
    }
    Trajectories generate(const std::string& prompt, size_t n, GpoSamplingParams sp = gpo_sampling_default_params(), bool raw = false) const {
        GpoTrajectories* t = nullptr;
        check(gpo_generate(p_.get(), prompt.c_str(), raw, n, &sp, &t), "gpo_generate");
        return Trajectories(t);
    }
    Trajectories fork(const Trajectories& from, size_t index, size_t at, size_t n, GpoSamplingParams sp = gpo_sampling_default_params()) const {
        GpoTrajectories* t = nullptr;
        check(gpo_fork(p_.get(), from.get(), index, at, n, &sp, &t), "gpo_fork");
        return Trajectories(t);
    }
    /// Values of trajectory `index` with `reward(prompt, completion)` scoring every rollout.
    StepValues step_values(const Trajectories& t, size_t index, const std::function<float(const std::string&, const std::string&)>& reward,
                           GpoValueParams vp = gpo_value_default_params()) const {
        struct Ctx {
            const std::function<float(const std::string&, const std::string&)>* f;
            std::exception_ptr error;
        } ctx{&reward, nullptr};
        auto cb = [](void* user, const char* prompt, const char* completion, float* score) -> int {
            auto* c = static_cast<Ctx*>(user);
            try {
                *score = (*c->f)(prompt, completion);
                return 0;
            } catch (...) {
                c->error = std::current_exception();  // never let an exception cross the C frames
                return 1;
            }
        };
        GpoValues* v = nullptr;
        GpoStatus st = gpo_step_values(p_.get(), t.get(), index, &vp, cb, &ctx, &v);
        if (ctx.error) std::rethrow_exception(ctx.error);
        check(st, "gpo_step_values");
        std::unique_ptr<GpoValues, Deleter<GpoValues, gpo_values_free>> owned(v);
        const double *vals = nullptr, *adv = nullptr;
        size_t n = 0;
        long long crit = gpo_values_get(v, &vals, &adv, &n);
        return StepValues{std::vector<double>(vals, vals + n), std::vector<double>(adv, adv + (n ? n - 1 : 0)), crit};
    }
    uint64_t set_adapter(const std::string& path, float scale = 1.0f) const {
        uint64_t v = 0;
        check(gpo_engine_set_adapter(p_.get(), path.c_str(), scale, &v), "gpo_engine_set_adapter");
        return v;
    }
    uint64_t remove_adapter() const {
        uint64_t v = 0;
        check(gpo_engine_remove_adapter(p_.get(), &v), "gpo_engine_remove_adapter");
        return v;
    }
    void cancel() const { check(gpo_engine_cancel(p_.get()), "gpo_engine_cancel"); }

  private:
    std::unique_ptr<GpoEngine, Deleter<GpoEngine, gpo_engine_free>> p_;
};

/// The LoRA trainer (one thread at a time).
class Trainer {
  public:
    Trainer(const std::string& model, const char* config_json = nullptr) {
        GpoTrainer* t = nullptr;
        check(gpo_trainer_new(model.c_str(), config_json, &t), "gpo_trainer_new");
        p_.reset(t);
    }
    GpoStepReport step(const Trajectories& batch, const std::vector<float>& rewards, const std::vector<uint64_t>& groups = {}) {
        GpoStepReport r{};
        check(gpo_trainer_step(p_.get(), batch.get(), rewards.data(), rewards.size(), groups.empty() ? nullptr : groups.data(), &r), "gpo_trainer_step");
        return r;
    }
    void export_adapter(const std::string& path) const { check(gpo_trainer_export(p_.get(), path.c_str()), "gpo_trainer_export"); }

  private:
    std::unique_ptr<GpoTrainer, Deleter<GpoTrainer, gpo_trainer_free>> p_;
};

/// A whole GPO run from a TOML config. start() blocks; cancel() may be called from another thread.
class Run {
  public:
    explicit Run(const std::string& config) {
        GpoRun* r = nullptr;
        check(gpo_run_new(config.c_str(), &r), "gpo_run_new");
        p_.reset(r);
    }
    /// Runs to the end; `progress` returns false to stop (start() then throws GPO_CANCELLED).
    void start(const std::function<bool(const GpoProgress&)>& progress = {}) {
        auto cb = [](void* user, const GpoProgress* p) -> int {
            auto* f = static_cast<const std::function<bool(const GpoProgress&)>*>(user);
            try {
                return (*f && !(*f)(*p)) ? 1 : 0;
            } catch (...) {
                return 1;
            }
        };
        check(gpo_run_start(p_.get(), cb, const_cast<std::function<bool(const GpoProgress&)>*>(&progress)), "gpo_run_start");
    }
    void cancel() const { check(gpo_run_cancel(p_.get()), "gpo_run_cancel"); }

  private:
    std::unique_ptr<GpoRun, Deleter<GpoRun, gpo_run_free>> p_;
};

inline std::string version() { return gpo_version(); }

}  // namespace gpo
