/* Drives a whole GPO run from C: the same TOML configuration `gpo train --config` reads,
 * a progress line per iteration, Ctrl-C stops at the next iteration boundary and the same
 * command resumes from the last checkpoint.
 *
 *   cc -std=c11 examples/c/gpo_run.c -Iinclude -Ltarget/release -lgpo -o gpo_run
 *   LD_LIBRARY_PATH=target/release ./gpo_run configs/quick.toml
 */
#include <math.h>
#include <signal.h>
#include <stdio.h>

#include "gpo.h"

static GpoRun *volatile running = NULL;

static void on_sigint(int sig) {
    (void)sig;
    if (running) gpo_run_cancel(running); /* async-signal-safe: only sets a flag */
}

static int32_t progress(void *user_data, const GpoProgress *p) {
    (void)user_data;
    printf("iteration %zu/%zu: reward %.2f", p->iteration + 1, p->iterations, p->reward_mean);
    if (!isnan(p->loss)) printf(", loss %.4f", p->loss);
    printf(", %llu rollouts, adapter v%llu", (unsigned long long)p->rollouts,
           (unsigned long long)p->adapter_version);
    if (!isnan(p->heldout_accuracy)) printf(", held-out %.0f%%", 100.0 * p->heldout_accuracy);
    printf("\n");
    fflush(stdout);
    return 0; /* non-zero would stop the run after this iteration */
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s run.toml\n", argv[0]);
        return 2;
    }
    GpoRun *run = NULL;
    if (gpo_run_new(argv[1], &run) != GPO_OK) {
        fprintf(stderr, "gpo_run_new: %s\n", gpo_last_error());
        return 1;
    }
    running = run;
    signal(SIGINT, on_sigint);
    GpoStatus st = gpo_run_start(run, progress, NULL);
    running = NULL;
    if (st == GPO_CANCELLED) {
        printf("stopped; run the same command again to resume\n");
    } else if (st != GPO_OK) {
        fprintf(stderr, "gpo_run_start: %s\n", gpo_last_error());
    } else {
        printf("done\n");
    }
    gpo_run_free(run);
    return st == GPO_OK || st == GPO_CANCELLED ? 0 : 1;
}
