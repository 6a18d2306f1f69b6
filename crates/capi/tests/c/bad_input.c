/* Bad input driven from C: every case must return its negative code with a message, never crash.
 * Built and run by crates/capi/tests/hosts.rs:
 *   bad_input LLAMA_MODEL LLAMA_ADAPTER OTHER_BASE_ADAPTER UNSUPPORTED_ARCH_MODEL NOT_AN_ADAPTER
 * Prints "ok NAME" or "FAIL NAME: why" per case; the exit status is the number of failures. */
#include <stdio.h>
#include <string.h>

#include "iapt.h"

static int failures = 0;
static char err[256];

static void expect(const char *name, int32_t got, int32_t want, const char *needle) {
    int ok = got == want && strlen(err) > 0 && (!needle || strstr(err, needle));
    if (ok) printf("ok %s\n", name);
    else {
        printf("FAIL %s: code %d (want %d), message \"%s\" (want it to contain \"%s\")\n", name, got, want, err, needle ? needle : "");
        failures++;
    }
    err[0] = '\0';
}

static void quiet(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static struct llama_batch prefix_batch(int n, int first_pos, int seq) {
    struct llama_batch b = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; i++) {
        b.token[i] = 1;
        b.pos[i] = first_pos + i;
        b.n_seq_id[i] = 1;
        b.seq_id[i][0] = seq;
        b.logits[i] = i == n - 1;
    }
    b.n_tokens = n;
    return b;
}

int main(int argc, char **argv) {
    if (argc != 6) {
        fprintf(stderr, "usage: bad_input LLAMA_MODEL LLAMA_ADAPTER OTHER_BASE_ADAPTER UNSUPPORTED_ARCH_MODEL NOT_AN_ADAPTER\n");
        return 100;
    }
    llama_log_set(quiet, NULL);
    llama_backend_init();

    /* NULL handles and pointers. */
    expect("adapter_load(NULL path)", iapt_adapter_load(NULL, err, sizeof err) ? 0 : IAPT_ERR_NULL, IAPT_ERR_NULL, "NULL");
    expect("hook_new(NULL model)", iapt_hook_new(NULL, err, sizeof err) ? 0 : IAPT_ERR_NULL, IAPT_ERR_NULL, "model is NULL");
    expect("set_adapter(NULL hook)", iapt_hook_set_adapter(NULL, 0, NULL, 1, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    expect("prepare(NULL hook)", iapt_hook_prepare(NULL, NULL, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    expect("finish(NULL hook)", iapt_hook_finish(NULL, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    expect("set_context(NULL hook)", iapt_hook_set_context(NULL, NULL, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    strcpy(err, "-");
    expect("n_soft_tokens(NULL)", iapt_adapter_n_soft_tokens(NULL), IAPT_ERR_NULL, NULL);
    iapt_adapter_free(NULL);
    iapt_hook_free(NULL);
    strcpy(err, "-");
    expect("eval_callback(NULL hook) claims nothing", iapt_hook_eval_callback(NULL, true, NULL) ? 1 : 0, 0, NULL);
    /* A NULL err buffer is allowed; a tiny one is truncated and NUL-terminated. */
    if (iapt_hook_finish(NULL, NULL, 0) != IAPT_ERR_NULL) { printf("FAIL finish(NULL, err NULL)\n"); failures++; }
    char tiny[5];
    memset(tiny, 'x', sizeof tiny);
    if (iapt_hook_finish(NULL, tiny, sizeof tiny) != IAPT_ERR_NULL || tiny[4] != '\0' || strcmp(tiny, "hook") != 0) {
        printf("FAIL err truncation: \"%.5s\"\n", tiny);
        failures++;
    } else printf("ok err buffer truncated and NUL-terminated\n");

    /* Not an adapter. */
    expect("adapter_load(not an adapter)", iapt_adapter_load(argv[5], err, sizeof err) ? 0 : IAPT_ERR_ADAPTER, IAPT_ERR_ADAPTER, argv[5]);

    /* A hook for an unsupported architecture. */
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *other = llama_model_load_from_file(argv[4], mp);
    if (!other) { printf("FAIL cannot load %s\n", argv[4]); return 100; }
    expect("hook_new(unsupported architecture)", iapt_hook_new(other, err, sizeof err) ? 0 : IAPT_ERR_UNSUPPORTED_ARCH, IAPT_ERR_UNSUPPORTED_ARCH,
           "is not supported (supported: llama");
    llama_model_free(other);

    struct llama_model *model = llama_model_load_from_file(argv[1], mp);
    iapt_adapter *adapter = iapt_adapter_load(argv[2], err, sizeof err);
    iapt_adapter *foreign = iapt_adapter_load(argv[3], err, sizeof err);
    iapt_hook *hook = model ? iapt_hook_new(model, err, sizeof err) : NULL;
    if (!model || !adapter || !foreign || !hook) { printf("FAIL setup: %s\n", err); return 100; }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 64;
    cp.n_batch = 64;
    cp.n_threads = cp.n_threads_batch = 1;
    cp.kv_unified = true;
    cp.cb_eval = iapt_hook_eval_callback;
    cp.cb_eval_user_data = hook;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    expect("set_context(NULL context)", iapt_hook_set_context(hook, NULL, err, sizeof err), IAPT_ERR_NULL, "context is NULL");
    if (!ctx || iapt_hook_set_context(hook, ctx, err, sizeof err) != IAPT_OK) { printf("FAIL context: %s\n", err); return 100; }
    const int m = iapt_adapter_n_soft_tokens(adapter);

    /* An adapter for another base model (its architecture differs). */
    expect("set_adapter(adapter for another base)", iapt_hook_set_adapter(hook, 0, foreign, 4, err, sizeof err), IAPT_ERR_INCOMPATIBLE,
           "wrong base model?");
    /* n_instruction <= 0, or instruction plus soft slots beyond the context (llama_n_ctx: 64 rounded up
     * by llama.cpp to a multiple of 256). */
    expect("set_adapter(n_instruction 0)", iapt_hook_set_adapter(hook, 0, adapter, 0, err, sizeof err), IAPT_ERR_RANGE, "n_instruction is 0");
    expect("set_adapter(n_instruction -3)", iapt_hook_set_adapter(hook, 0, adapter, -3, err, sizeof err), IAPT_ERR_RANGE, "n_instruction is -3");
    expect("set_adapter(beyond the context)", iapt_hook_set_adapter(hook, 0, adapter, (int32_t)llama_n_ctx(ctx) - m + 1, err, sizeof err),
           IAPT_ERR_RANGE, "exceed the context of");
    int32_t fits = iapt_hook_set_adapter(hook, 0, adapter, (int32_t)llama_n_ctx(ctx) - m, err, sizeof err);
    strcpy(err, "-");
    expect("set_adapter(just fits the context)", fits, IAPT_OK, NULL);
    expect("set_adapter(negative sequence)", iapt_hook_set_adapter(hook, -1, adapter, 4, err, sizeof err), IAPT_ERR_RANGE, "negative");

    /* The prefix cache's calls: NULLs and ranges, and batch tokens that differ from the declared ones. */
    const llama_token twos[4] = {2, 2, 2, 2};
    expect("set_adapter_tokens(NULL hook)", iapt_hook_set_adapter_tokens(NULL, 0, adapter, twos, 4, 0, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    expect("set_adapter_tokens(NULL tokens)", iapt_hook_set_adapter_tokens(hook, 0, adapter, NULL, 4, 0, err, sizeof err), IAPT_ERR_NULL, "tokens is NULL");
    expect("set_adapter_tokens(n_kept beyond n_instruction)", iapt_hook_set_adapter_tokens(hook, 0, adapter, twos, 4, 5, err, sizeof err),
           IAPT_ERR_RANGE, "n_kept is 5");
    expect("set_adapter_tokens(n_kept -1)", iapt_hook_set_adapter_tokens(hook, 0, adapter, twos, 4, -1, err, sizeof err), IAPT_ERR_RANGE, "n_kept is -1");
    expect("set_adapter_tokens(n_instruction 0)", iapt_hook_set_adapter_tokens(hook, 0, adapter, twos, 0, 0, err, sizeof err), IAPT_ERR_RANGE,
           "n_instruction is 0");
    expect("set_cache(NULL hook)", iapt_hook_set_cache(NULL, 0, err, sizeof err), IAPT_ERR_NULL, "hook is NULL");
    expect("set_cache(-1)", iapt_hook_set_cache(hook, -1, err, sizeof err), IAPT_ERR_RANGE, "max_bytes is -1");
    strcpy(err, "-");
    expect("cache_stats(NULL hook)", iapt_hook_cache_stats(NULL, NULL, NULL, NULL, NULL), IAPT_ERR_NULL, NULL);
    int32_t k = iapt_hook_set_adapter_tokens(hook, 1, adapter, twos, 4, 0, err, sizeof err);
    strcpy(err, "-");
    expect("set_adapter_tokens(nothing kept) reuses nothing", k, 0, NULL);
    struct llama_batch ones = prefix_batch(4 + m, 0, 1);
    expect("prepare(tokens differ from the declared ones)", iapt_hook_prepare(hook, &ones, err, sizeof err), IAPT_ERR_BATCH,
           "differs from the instruction token 2");
    llama_batch_free(ones);
    iapt_hook_set_adapter(hook, 1, NULL, 0, err, sizeof err);

    /* finish without prepare. */
    expect("finish without prepare", iapt_hook_finish(hook, err, sizeof err), IAPT_ERR_STATE, "without iapt_hook_prepare");

    /* Batches that do not match what was set: sequence 0 has 4 instruction rows + m soft slots. */
    if (iapt_hook_set_adapter(hook, 0, adapter, 4, err, sizeof err) != IAPT_OK) { printf("FAIL set_adapter: %s\n", err); return 100; }
    iapt_adapter_free(adapter); /* the hook keeps its own reference */
    expect("prepare(NULL batch)", iapt_hook_prepare(hook, NULL, err, sizeof err), IAPT_ERR_NULL, "batch is NULL");
    struct llama_batch late = prefix_batch(3, 2, 0);
    expect("prepare(prefix not starting at 0)", iapt_hook_prepare(hook, &late, err, sizeof err), IAPT_ERR_BATCH, "expected position 0");
    struct llama_batch gap = prefix_batch(4, 0, 0);
    gap.pos[2] = 3;
    expect("prepare(positions with a gap)", iapt_hook_prepare(hook, &gap, err, sizeof err), IAPT_ERR_BATCH, "consecutive positions");
    struct llama_batch shared = prefix_batch(2, 0, 0);
    shared.n_seq_id[1] = 2;
    /* llama_batch_init(.., n_seq_max 1) has room for one id per row: row 1 points at our own pair. */
    static llama_seq_id two[2] = {0, 1};
    llama_seq_id *own = shared.seq_id[1];
    shared.seq_id[1] = two;
    expect("prepare(prefix row in two sequences)", iapt_hook_prepare(hook, &shared, err, sizeof err), IAPT_ERR_BATCH, "belongs to 2 sequences");
    struct llama_batch nopos = prefix_batch(2, 0, 0);
    llama_pos *saved = nopos.pos;
    nopos.pos = NULL;
    expect("prepare(batch without pos)", iapt_hook_prepare(hook, &nopos, err, sizeof err), IAPT_ERR_BATCH, "explicit positions");
    nopos.pos = saved;

    /* prepare twice; then a decode of another batch than the prepared one: finish reports it. */
    struct llama_batch whole = prefix_batch(4 + m, 0, 0);
    struct llama_batch part = prefix_batch(2, 0, 0);
    if (iapt_hook_prepare(hook, &whole, err, sizeof err) != IAPT_OK) { printf("FAIL prepare: %s\n", err); return 100; }
    expect("prepare twice", iapt_hook_prepare(hook, &whole, err, sizeof err), IAPT_ERR_STATE, "twice");
    expect("set_adapter between prepare and finish", iapt_hook_set_adapter(hook, 1, NULL, 1, err, sizeof err), IAPT_ERR_STATE, "between");
    int rc = llama_decode(ctx, part);
    expect("finish after decoding another batch", rc == 0 ? iapt_hook_finish(hook, err, sizeof err) : -100, IAPT_ERR_DECODE, "split the batch differently");
    /* After the failure the sequence restarts at 0: the right batch now works. */
    llama_memory_clear(llama_get_memory(ctx), true);
    err[0] = '\0';
    int32_t p = iapt_hook_prepare(hook, &whole, err, sizeof err);
    rc = llama_decode(ctx, whole);
    int32_t f = iapt_hook_finish(hook, err, sizeof err);
    if (p != IAPT_OK || rc != 0 || f != IAPT_OK) { printf("FAIL recovery: prepare %d decode %d finish %d: %s\n", p, rc, f, err); failures++; }
    else printf("ok a correct decode after the failure\n");
    struct llama_batch again = prefix_batch(2, 1, 0);
    expect("prepare(prefix decoded again without restarting at 0)", iapt_hook_prepare(hook, &again, err, sizeof err), IAPT_ERR_BATCH,
           "expected position");
    llama_batch_free(again);

    llama_batch_free(late); llama_batch_free(gap); llama_batch_free(nopos); llama_batch_free(whole); llama_batch_free(part);
    shared.seq_id[1] = own;
    shared.n_seq_id[1] = 1;
    llama_batch_free(shared);
    llama_free(ctx);
    iapt_hook_free(hook);
    iapt_adapter_free(foreign);
    llama_model_free(model);
    printf("%d failure(s)\n", failures);
    return failures;
}
