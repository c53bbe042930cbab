#define _DEFAULT_SOURCE
/* C ABI safety test, built with -fsanitize=address by tests/c_abi.rs:
 * NULL handles and outputs, *_free(NULL), wrong-order and out-of-range calls, callbacks that fail,
 * cancellation from another thread, and a whole run stopped by its progress callback.
 *   usage: abi_test model.gguf run.toml work-dir */
#include "gpo.h"
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;
#define EXPECT(cond)                                                        \
    do {                                                                    \
        if (!(cond)) {                                                      \
            fprintf(stderr, "%s:%d: expected %s (last error: %s)\n", __FILE__, __LINE__, #cond, gpo_last_error()); \
            failures++;                                                     \
        }                                                                   \
    } while (0)

static int failing_reward(void *user, const char *prompt, const char *completion, float *score) {
    (void)prompt; (void)completion;
    int *calls = (int *)user;
    (*calls)++;
    *score = 0.0f;
    return *calls >= 2 ? 7 : 0; /* fail on the second call */
}

static int stop_after_first(void *user, const GpoProgress *p) {
    int *seen = (int *)user;
    (*seen)++;
    return p->iteration == 0 ? 1 : 0;
}

struct gen_args { GpoEngine *engine; GpoStatus status; atomic_int done; };
static void *long_generate(void *arg) {
    struct gen_args *a = (struct gen_args *)arg;
    GpoSamplingParams sp = gpo_sampling_default_params();
    sp.max_tokens = 100000;
    GpoTrajectories *out = NULL;
    a->status = gpo_generate(a->engine, "count forever", true, 2, &sp, &out);
    atomic_store(&a->done, 1);
    gpo_trajectories_free(out); /* NULL on failure: a no-op */
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    const char *model = argv[1], *run_cfg = argv[2], *dir = argv[3];

    /* Free functions accept NULL. */
    gpo_engine_free(NULL); gpo_trajectories_free(NULL); gpo_values_free(NULL);
    gpo_verifier_free(NULL); gpo_trainer_free(NULL); gpo_run_free(NULL);

    /* NULL arguments give GPO_INVALID_ARGUMENT and a message, never a crash. */
    GpoEngine *engine = NULL;
    EXPECT(gpo_engine_new(NULL, NULL, &engine) == GPO_INVALID_ARGUMENT && engine == NULL);
    EXPECT(strstr(gpo_last_error(), "model_path is NULL") != NULL);
    EXPECT(gpo_engine_new(model, NULL, NULL) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_engine_new("/nonexistent.gguf", NULL, &engine) == GPO_IO_ERROR && engine == NULL);
    EXPECT(gpo_model_check(argv[0]) == GPO_MODEL_ERROR); /* this executable is not a GGUF file */
    GpoTrajectories *t = NULL;
    EXPECT(gpo_generate(NULL, "x", false, 1, NULL, &t) == GPO_INVALID_ARGUMENT && t == NULL);
    EXPECT(gpo_trajectories_count(NULL) == 0 && gpo_trajectory_text(NULL, 0) == NULL);
    EXPECT(gpo_trajectory_tokens(NULL, 0, NULL, NULL, NULL) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_values_get(NULL, NULL, NULL, NULL) == -1);
    EXPECT(gpo_engine_cancel(NULL) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_run_cancel(NULL) == GPO_INVALID_ARGUMENT);
    /* Any int is a valid argument: out-of-range codes are described, not undefined behaviour. */
    EXPECT(strcmp(gpo_status_string(GPO_CANCELLED), "cancelled") == 0);
    EXPECT(strcmp(gpo_status_string(99), "unknown status") == 0);
    EXPECT(strcmp(gpo_status_string(-1), "unknown status") == 0);

    GpoEngineParams ep = gpo_engine_default_params();
    ep.n_parallel = 4;
    ep.n_ctx_per_seq = 256;
    EXPECT(ep.sampling == GPO_SAMPLING_AUTO);
    ep.sampling = 7;
    EXPECT(gpo_engine_new(model, &ep, &engine) == GPO_INVALID_ARGUMENT && engine == NULL);
    EXPECT(strstr(gpo_last_error(), "GPO_SAMPLING_HOST") != NULL);
    /* Everything below samples inside llama.cpp's decode graph (under ASan in CI). */
    ep.sampling = GPO_SAMPLING_GRAPH;
    EXPECT(gpo_engine_new(model, &ep, &engine) == GPO_OK && engine != NULL);
    if (!engine) return 1;

    /* Bad sampling values and empty prompts are rejected with the field named. */
    GpoSamplingParams sp = gpo_sampling_default_params();
    sp.top_p = 0.0f;
    EXPECT(gpo_generate(engine, "x", false, 1, &sp, &t) == GPO_INVALID_ARGUMENT && strstr(gpo_last_error(), "top_p"));
    sp = gpo_sampling_default_params();
    sp.max_tokens = 8;
    EXPECT(gpo_generate(engine, "x", false, 0, &sp, &t) == GPO_INVALID_ARGUMENT);

    EXPECT(gpo_generate(engine, "hello", false, 2, &sp, &t) == GPO_OK && gpo_trajectories_count(t) == 2);
    const int32_t *tok = NULL; const float *lp = NULL; size_t len = 0;
    EXPECT(gpo_trajectory_tokens(t, 1, &tok, &lp, &len) == GPO_OK && len == 8);
    long sum = 0;
    for (size_t i = 0; i < len; i++) sum += tok[i] + (lp[i] <= 0.0f); /* reads every element */
    EXPECT(sum > 0);
    const uint32_t *bounds = NULL; size_t n_steps = 0;
    EXPECT(gpo_trajectory_steps(t, 0, &bounds, &n_steps) == GPO_OK && n_steps >= 1 && bounds[2 * n_steps - 1] == 8);
    EXPECT(strlen(gpo_trajectory_text(t, 0)) < 1000 && gpo_trajectory_finish(t, 0) != NULL);

    /* Wrong indices and positions. */
    GpoTrajectories *f = NULL;
    EXPECT(gpo_fork(engine, t, 5, 0, 1, &sp, &f) == GPO_INVALID_ARGUMENT && strstr(gpo_last_error(), "out of range"));
    EXPECT(gpo_fork(engine, t, 0, 99, 1, &sp, &f) == GPO_INVALID_ARGUMENT && f == NULL);
    EXPECT(gpo_fork(engine, t, 0, 4, 3, &sp, &f) == GPO_OK && gpo_trajectories_count(f) == 3);
    gpo_trajectories_free(f);
    EXPECT(gpo_trajectory_text(t, 2) == NULL);

    /* A reward callback that fails aborts the call with GPO_CALLBACK_ERROR. */
    int calls = 0;
    GpoValues *values = NULL;
    GpoValueParams vp = gpo_value_default_params();
    vp.sampling = sp;
    EXPECT(gpo_step_values(engine, t, 0, &vp, failing_reward, &calls, &values) == GPO_CALLBACK_ERROR && values == NULL);
    EXPECT(calls == 2);
    EXPECT(gpo_step_values(engine, t, 0, &vp, NULL, NULL, &values) == GPO_INVALID_ARGUMENT);
    vp.critical_mode = 9;
    calls = -100;
    EXPECT(gpo_step_values(engine, t, 0, &vp, failing_reward, &calls, &values) == GPO_INVALID_ARGUMENT);

    /* Verifiers: bad JSON, bad pattern, a score. */
    GpoVerifier *v = NULL;
    EXPECT(gpo_verifier_new("{\"kind\": ", &v) == GPO_INVALID_ARGUMENT && v == NULL);
    EXPECT(gpo_verifier_new("{\"kind\": \"regex\", \"pattern\": \"(\"}", &v) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_verifier_new(NULL, &v) == GPO_OK);
    float score = -1;
    EXPECT(gpo_verifier_score(v, "q", "so the answer is 8", "8", &score) == GPO_OK && score == 1.0f);
    EXPECT(gpo_verifier_score(v, "q", NULL, "8", &score) == GPO_INVALID_ARGUMENT);
    gpo_verifier_free(v);

    /* Trainer: wrong reward count, wrong adapter path, then a real step. */
    GpoTrainer *tr = NULL;
    EXPECT(gpo_trainer_new(model, "{\"lora\": {\"rank\": 0}}", &tr) == GPO_INVALID_ARGUMENT && tr == NULL);
    EXPECT(gpo_trainer_new(model, "{\"temperature\": 1.0, \"lora\": {\"rank\": 2, \"alpha\": 4.0}}", &tr) == GPO_OK);
    float rewards[2] = {1.0f, 0.0f};
    GpoStepReport rep;
    EXPECT(gpo_trainer_step(tr, t, rewards, 1, NULL, &rep) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_trainer_step(tr, t, NULL, 2, NULL, &rep) == GPO_INVALID_ARGUMENT);
    EXPECT(gpo_trainer_step(tr, t, rewards, 2, NULL, &rep) == GPO_OK && rep.step == 1 && !rep.skipped);
    char path[4096];
    snprintf(path, sizeof path, "%s/abi_adapter.gguf", dir);
    EXPECT(gpo_trainer_export(tr, path) == GPO_OK);
    uint64_t version = 0;
    EXPECT(gpo_engine_set_adapter(engine, "/nonexistent/adapter.gguf", 1.0f, &version) == GPO_IO_ERROR);
    EXPECT(gpo_engine_set_adapter(engine, model, 1.0f, &version) == GPO_MODEL_ERROR); /* a model, not an adapter */
    EXPECT(gpo_engine_set_adapter(engine, path, 1.0f, &version) == GPO_OK && version == 1);
    EXPECT(gpo_engine_remove_adapter(engine, &version) == GPO_OK && version == 2);
    gpo_trainer_free(tr);
    gpo_trajectories_free(t);

    /* Cancel a long call from another thread. */
    /* gpo_engine_cancel() stops the calls in flight, so it is repeated until the call (which
       cannot finish by itself in that time) has started and returned, however slow the machine. */
    struct gen_args ga = { engine, GPO_OK, 0 };
    pthread_t th;
    pthread_create(&th, NULL, long_generate, &ga);
    while (!atomic_load(&ga.done)) {
        EXPECT(gpo_engine_cancel(engine) == GPO_OK);
        usleep(20 * 1000);
    }
    pthread_join(th, NULL);
    EXPECT(ga.status == GPO_CANCELLED);
    gpo_engine_free(engine);

    /* A whole run, stopped by its progress callback after the first iteration. */
    GpoRun *run = NULL;
    EXPECT(gpo_run_new("/nonexistent.toml", &run) == GPO_IO_ERROR && run == NULL);
    EXPECT(gpo_run_new(run_cfg, &run) == GPO_OK);
    int seen = 0;
    EXPECT(gpo_run_start(run, stop_after_first, &seen) == GPO_CANCELLED && seen == 1);
    EXPECT(gpo_run_start(run, NULL, NULL) == GPO_OK); /* resumes and finishes */
    gpo_run_free(run);

    printf(failures ? "FAILED: %d\n" : "ok\n", failures);
    return failures ? 1 : 0;
}
