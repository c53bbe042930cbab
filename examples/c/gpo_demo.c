/* One GPO iteration through the C API: sample, estimate step values with a reward callback,
 * reset at the critical step, train on the resets, swap the adapter in, sample again.
 *   cc gpo_demo.c -I include -L target/release -lgpo -o gpo_demo
 *   LD_LIBRARY_PATH=target/release ./gpo_demo model.gguf [work-dir]
 */
#include "gpo.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CHECK(call)                                                                          \
    do {                                                                                     \
        GpoStatus st_ = (call);                                                              \
        if (st_ != GPO_OK) {                                                                 \
            fprintf(stderr, "%s failed: %s (%s)\n", #call, gpo_status_string(st_), gpo_last_error()); \
            return 1;                                                                        \
        }                                                                                    \
    } while (0)

/* Reward: the numeric final answer must be 8 (scored with a gpo verifier). */
static int reward(void *user, const char *prompt, const char *completion, float *score) {
    (void)prompt;
    return gpo_verifier_score((const GpoVerifier *)user, "", completion, "8", score) == GPO_OK ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s model.gguf [work-dir]\n", argv[0]);
        return 2;
    }
    const char *dir = argc > 2 ? argv[2] : ".";
    printf("gpo %s\n", gpo_version());

    GpoEngineParams ep = gpo_engine_default_params();
    ep.n_parallel = 8;
    ep.n_ctx_per_seq = 512;
    GpoEngine *engine = NULL;
    CHECK(gpo_engine_new(argv[1], &ep, &engine));

    GpoSamplingParams sp = gpo_sampling_default_params();
    sp.temperature = 0.7f;
    sp.max_tokens = 48;
    sp.seed = 1;
    GpoTrajectories *roots = NULL;
    CHECK(gpo_generate(engine, "Tom has 5 apples and buys 3 more. How many apples does he have? Think step by step.", false, 2, &sp, &roots));
    for (size_t i = 0; i < gpo_trajectories_count(roots); i++) {
        const uint32_t *bounds = NULL;
        size_t n_steps = 0, n_tok = 0;
        const float *lp = NULL;
        CHECK(gpo_trajectory_steps(roots, i, &bounds, &n_steps));
        CHECK(gpo_trajectory_tokens(roots, i, NULL, &lp, &n_tok));
        double sum = 0;
        for (size_t k = 0; k < n_tok; k++) sum += lp[k];
        printf("sample %zu: %zu tokens, %zu steps, log-prob %.2f, finish %s\n", i, n_tok, n_steps, sum, gpo_trajectory_finish(roots, i));
    }

    GpoVerifier *verifier = NULL;
    CHECK(gpo_verifier_new("{\"kind\": \"numeric\"}", &verifier));
    GpoValueParams vp = gpo_value_default_params();
    vp.rollouts = 2;
    vp.sampling = sp;
    GpoValues *values = NULL;
    CHECK(gpo_step_values(engine, roots, 0, &vp, reward, verifier, &values));
    const double *v = NULL, *adv = NULL;
    size_t n_v = 0;
    int64_t critical = gpo_values_get(values, &v, &adv, &n_v);
    printf("values:");
    for (size_t k = 0; k < n_v; k++) printf(" %.2f", v[k]);
    printf("\ncritical step: %lld\n", (long long)critical);

    /* Reset just before the critical step (the start of the trajectory if there is none). */
    size_t at = 0;
    if (critical > 0) {
        const uint32_t *bounds = NULL;
        size_t n_steps = 0;
        CHECK(gpo_trajectory_steps(roots, 0, &bounds, &n_steps));
        at = bounds[2 * (critical - 1) + 1];
    }
    GpoTrajectories *resets = NULL;
    CHECK(gpo_fork(engine, roots, 0, at, 4, &sp, &resets));
    size_t n_resets = gpo_trajectories_count(resets);
    float *rewards = calloc(n_resets, sizeof(float));
    for (size_t i = 0; i < n_resets; i++) CHECK(gpo_verifier_score(verifier, "", gpo_trajectory_text(resets, i), "8", &rewards[i]));
    /* Make sure the group has a learning signal even if every reset failed. */
    rewards[0] = 1.0f;

    GpoTrainer *trainer = NULL;
    /* The trainer's temperature must be the sampling temperature (the report's log-prob gap shows a mismatch). */
    CHECK(gpo_trainer_new(argv[1], "{\"temperature\": 0.7, \"lora\": {\"rank\": 4, \"alpha\": 8.0}, \"optim\": {\"lr\": 0.001}}", &trainer));
    GpoStepReport report;
    CHECK(gpo_trainer_step(trainer, resets, rewards, n_resets, NULL, &report));
    printf("train step %llu: loss %.4f, grad norm %.3f, %.0f tok/s, gap %.4f\n", (unsigned long long)report.step, report.loss, report.grad_norm, report.tokens_per_s, report.logprob_gap);
    char adapter[4096];
    snprintf(adapter, sizeof adapter, "%s/gpo_demo_adapter.gguf", dir);
    CHECK(gpo_trainer_export(trainer, adapter));
    uint64_t version = 0;
    CHECK(gpo_engine_set_adapter(engine, adapter, 1.0f, &version));
    GpoTrajectories *after = NULL;
    CHECK(gpo_generate(engine, "Tom has 5 apples and buys 3 more. How many apples does he have?", false, 1, &sp, &after));
    printf("adapter version %llu; sample after training carries version %llu\n", (unsigned long long)version,
           (unsigned long long)gpo_trajectory_adapter_version(after, 0));

    free(rewards);
    gpo_trajectories_free(after);
    gpo_trainer_free(trainer);
    gpo_trajectories_free(resets);
    gpo_values_free(values);
    gpo_verifier_free(verifier);
    gpo_trajectories_free(roots);
    gpo_engine_free(engine);
    printf("ok\n");
    return version == 1 ? 0 : 1;
}
