/* iapt_run: generation with IAPT adapters in plain C, on llama.cpp's C API and libiapt.
 *
 *   cc iapt_run.c -o iapt_run $(pkg-config --cflags --libs iapt)
 *   iapt_run -m base.gguf -a adapter.iapt.safetensors -p 1,309,201 [-a ADAPTER2 -p IDS2] \
 *            [-n N_PREDICT] [-c N_CTX] [-u N_UBATCH] [-t THREADS] [-d LOGITS_PREFIX] [-x 1] [-b N_CHUNK] \
 *            [-T TEMP -K TOP_K -P TOP_P -M MIN_P -S SEED] [-s N_SLOTS] [-C 0]
 *
 * Each -a/-p pair is one request (at most 8): the instruction ids, then m placeholder tokens
 * (id 0) whose rows the hook overwrites with the adapter's soft tokens. The requests run in waves
 * of N_SLOTS (-s; default all at once), request i on sequence i % N_SLOTS, all of a wave
 * prefilled together. A request keeps the KV of the leading instruction tokens it shares with the
 * previous request on its sequence (a host's own prompt reuse, as llama-cpp-python's) as far as
 * the hook's prefix cache can go on from there (iapt_hook_set_adapter_tokens) and decodes the
 * rest; it prints "reused I: K" (K positions not decoded again). `-C 0` turns the cache off.
 * `-a none` runs a sequence without adapter. F32 KV cache and flash attention off (the settings of
 * `iapt run --kv-type f32 --flash-attn off`). Generation is greedy, or with -T > 0 llama.cpp's
 * sampler chain top-k, top-p, min-p, temperature, seeded draw (each stage only when it filters:
 * the chain of `iapt run --temp T --top-k K --top-p P --min-p M --seed S`), one chain per sequence
 * that has seen its prompt; it stops at an end-of-generation token. Prints "seq S: id id ..." and
 * "text S: ..." (the pieces of the tokens before an end-of-generation token) per sequence; with
 * -d, writes the logits of every step of sequence S to LOGITS_PREFIX-S.npy (float32 [steps,
 * n_vocab]). `-x 1` skips the optional iapt_hook_set_context (the hook then learns n_ubatch from
 * the first ubatch); `-b N` prefills in decodes of at most N rows (chunked prefill).
 * Exit: 0 success, 1 a failure (message on stderr), 2 bad usage. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "iapt.h"

#define MAX_SEQS 8

struct seq {
    int reused; /* leading positions kept from the previous request on its sequence */
    const char *adapter_path;
    iapt_adapter *adapter;
    llama_token *prompt;
    int n_prompt, m, done, n_out, batch_row;
    llama_token *out;
    FILE *dump;
    struct llama_sampler *chain; /* NULL: greedy */
};

/* The sampler settings of -T/-K/-P/-M/-S. */
struct sampling {
    float temp, top_p, min_p;
    int top_k;
    uint32_t seed;
};

/* A chain with the stages that filter (as the engine builds it), having seen the prompt. */
static struct llama_sampler *new_chain(const struct sampling *sp, const llama_token *prompt, int n_prompt) {
    struct llama_sampler *c = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (sp->top_k > 0) llama_sampler_chain_add(c, llama_sampler_init_top_k(sp->top_k));
    if (sp->top_p < 1.0f) llama_sampler_chain_add(c, llama_sampler_init_top_p(sp->top_p, 1));
    if (sp->min_p > 0.0f) llama_sampler_chain_add(c, llama_sampler_init_min_p(sp->min_p, 1));
    llama_sampler_chain_add(c, llama_sampler_init_temp(sp->temp));
    llama_sampler_chain_add(c, llama_sampler_init_dist(sp->seed));
    for (int i = 0; i < n_prompt; i++) llama_sampler_accept(c, prompt[i]);
    return c;
}

static int usage(const char *msg) {
    fprintf(stderr, "iapt_run: %s\nusage: iapt_run -m MODEL (-a ADAPTER|none -p IDS)... [-n N] [-c N_CTX] [-u N_UBATCH] [-t THREADS] [-d PREFIX] [-x 1] [-b N_CHUNK] [-T TEMP -K TOP_K -P TOP_P -M MIN_P -S SEED] [-s N_SLOTS] [-C 0]\n", msg);
    return 2;
}

static int parse_ids(const char *s, llama_token **out) {
    int n = 1;
    for (const char *p = s; *p; p++) n += *p == ',';
    *out = malloc(sizeof(llama_token) * (size_t)n);
    char *end;
    for (int i = 0; i < n; i++) {
        errno = 0;
        long v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || (*end != ',' && *end != '\0')) return -1;
        (*out)[i] = (llama_token)v;
        s = end + (*end == ',');
    }
    return n;
}

/* A NumPy .npy header for float32 [rows, cols]; the row count is patched at the end. */
static void npy_header(FILE *f, long rows, long cols) {
    char dict[128];
    int n = snprintf(dict, sizeof dict, "{'descr': '<f4', 'fortran_order': False, 'shape': (%10ld, %ld), }", rows, cols);
    int total = 10 + n + 1, pad = (64 - total % 64) % 64;
    unsigned short hlen = (unsigned short)(n + pad + 1);
    fwrite("\x93NUMPY\x01\x00", 1, 8, f);
    fputc(hlen & 0xff, f);
    fputc(hlen >> 8, f);
    fwrite(dict, 1, (size_t)n, f);
    for (int i = 0; i < pad; i++) fputc(' ', f);
    fputc('\n', f);
}

/* llama.cpp's log, errors only. */
static void quiet(enum ggml_log_level level, const char *text, void *ud) {
    (void)ud;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* The next token of a sequence from batch row `row`: greedy, or drawn by its chain; 1 when the
 * sequence is done. */
static int take(struct seq *q, struct llama_context *ctx, int row, const struct llama_vocab *vocab, int n_vocab, int n_predict) {
    const float *logits = llama_get_logits_ith(ctx, row);
    int best = 0;
    if (q->chain) best = llama_sampler_sample(q->chain, ctx, row);
    else for (int v = 1; v < n_vocab; v++) if (logits[v] > logits[best]) best = v;
    if (q->dump) fwrite(logits, sizeof(float), (size_t)n_vocab, q->dump);
    q->out[q->n_out++] = best;
    q->done = llama_vocab_is_eog(vocab, best) || q->n_out == n_predict;
    return q->done;
}

static int check(int32_t rc, const char *what, const char *err) {
    if (rc != IAPT_OK) fprintf(stderr, "iapt_run: %s: %s (code %d)\n", what, err, rc);
    return rc != IAPT_OK;
}

/* prepare, decode, finish: 0 or 1 (message on stderr). */
static int decode(iapt_hook *hook, struct llama_context *ctx, struct llama_batch batch, char *err, size_t err_size) {
    if (check(iapt_hook_prepare(hook, &batch, err, err_size), "prepare", err)) return 1;
    int rc = llama_decode(ctx, batch);
    int32_t hrc = iapt_hook_finish(hook, err, err_size); /* after every decode, whatever it returned */
    if (rc != 0) { fprintf(stderr, "iapt_run: llama_decode returned %d\n", rc); return 1; }
    return check(hrc, "finish", err);
}

/* The length of the common prefix of two token arrays. */
static int common_prefix(const llama_token *a, int na, const llama_token *b, int nb) {
    int i = 0;
    while (i < na && i < nb && a[i] == b[i]) i++;
    return i;
}

/* One wave: requests q[0..n) on sequences 0..n-1, bound, prefilled together (from what each
 * sequence's KV keeps of the previous request, prev[s]) and generated until all are done.
 * Request i of the whole run is q[s] with i = first + s. 0 or 1 (message on stderr). */
static int run_wave(struct seq *q, int n, struct seq **prev, iapt_hook *hook, struct llama_context *ctx,
                    const struct llama_vocab *vocab, int n_vocab, int n_predict, int n_ctx, int n_chunk,
                    const struct sampling *sp, const char *dump_prefix, int first) {
    char err[512];
    llama_memory_t mem = llama_get_memory(ctx);
    int total = 0;
    for (int s = 0; s < n; s++) {
        struct seq *r = &q[s];
        /* The host's own prompt reuse: the instruction tokens this sequence's KV holds already. */
        int kept = prev[s] ? common_prefix(r->prompt, r->n_prompt, prev[s]->prompt, prev[s]->n_prompt) : 0;
        if (r->adapter_path) {
            iapt_adapter *a = iapt_adapter_load(r->adapter_path, err, sizeof err);
            if (!a) { fprintf(stderr, "iapt_run: %s\n", err); return 1; }
            r->m = iapt_adapter_n_soft_tokens(a);
            r->reused = iapt_hook_set_adapter_tokens(hook, s, a, r->prompt, r->n_prompt, kept, err, sizeof err);
            /* The hook holds its own reference: the caller's can go now. */
            iapt_adapter_free(a);
            if (r->reused < 0) return check(r->reused, "set_adapter_tokens", err);
        } else {
            if (check(iapt_hook_set_adapter(hook, s, NULL, 0, err, sizeof err), "set_adapter", err)) return 1;
            r->reused = kept < r->n_prompt ? kept : r->n_prompt - 1; /* the last token's logits are needed */
        }
        llama_memory_seq_rm(mem, s, r->reused, -1);
        total += r->n_prompt + r->m - r->reused;
        r->out = malloc(sizeof(llama_token) * (size_t)n_predict);
        if (sp->temp > 0.0f) r->chain = new_chain(sp, r->prompt, r->n_prompt);
        if (dump_prefix) {
            char path[4096];
            snprintf(path, sizeof path, "%s-%d.npy", dump_prefix, first + s);
            if (!(r->dump = fopen(path, "wb"))) { fprintf(stderr, "iapt_run: cannot write %s\n", path); return 1; }
            npy_header(r->dump, 0, n_vocab);
        }
    }
    if (total > n_ctx) { fprintf(stderr, "iapt_run: %d prompt rows exceed the context of %d\n", total, n_ctx); return 1; }

    /* The prefill: every request's instruction and soft slots not kept, in batch order, decoded in
     * chunks of at most n_chunk rows (-b; default all in one decode). A chunk may end inside a
     * sequence's instruction or soft slots: the hook carries its state to the next decode. */
    struct llama_batch all = llama_batch_init(total, 0, 1);
    for (int s = 0; s < n; s++) {
        struct seq *r = &q[s];
        for (int p = r->reused; p < r->n_prompt + r->m; p++) {
            int i = all.n_tokens++;
            all.token[i] = p < r->n_prompt ? r->prompt[p] : 0;
            all.pos[i] = p;
            all.n_seq_id[i] = 1;
            all.seq_id[i][0] = s;
            all.logits[i] = p == r->n_prompt + r->m - 1;
            if (all.logits[i]) r->batch_row = i;
        }
    }
    if (n_chunk <= 0 || n_chunk > total) n_chunk = total;
    struct llama_batch batch = llama_batch_init(total > n ? total : n, 0, 1);
    int failed = 0, active = n;
    for (int k = 0; k < total && !failed; k += n_chunk) {
        batch.n_tokens = k + n_chunk < total ? n_chunk : total - k;
        for (int i = 0; i < batch.n_tokens; i++) {
            batch.token[i] = all.token[k + i];
            batch.pos[i] = all.pos[k + i];
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = all.seq_id[k + i][0];
            batch.logits[i] = all.logits[k + i];
        }
        if ((failed = decode(hook, ctx, batch, err, sizeof err))) break;
        for (int s = 0; s < n; s++) {
            struct seq *r = &q[s];
            if (r->batch_row >= k && r->batch_row < k + batch.n_tokens)
                active -= take(r, ctx, r->batch_row - k, vocab, n_vocab, n_predict);
        }
    }
    /* Generation: one token per active request per decode. */
    while (!failed && active > 0) {
        batch.n_tokens = 0;
        for (int s = 0; s < n; s++) {
            struct seq *r = &q[s];
            if (r->done) continue;
            int i = batch.n_tokens++;
            batch.token[i] = r->out[r->n_out - 1];
            batch.pos[i] = r->n_prompt + r->m + r->n_out - 1;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = s;
            batch.logits[i] = 1;
            r->batch_row = i;
        }
        if ((failed = decode(hook, ctx, batch, err, sizeof err))) break;
        for (int s = 0; s < n; s++)
            if (!q[s].done) active -= take(&q[s], ctx, q[s].batch_row, vocab, n_vocab, n_predict);
    }
    llama_batch_free(all);
    llama_batch_free(batch);
    return failed;
}

int main(int argc, char **argv) {
    const char *model_path = NULL, *dump_prefix = NULL;
    struct seq seqs[MAX_SEQS];
    int n_seqs = 0, n_adapters = 0, n_predict = 16, n_ctx = 256, n_ubatch = 512, threads = 1, no_set_context = 0, n_chunk = 0;
    int n_slots = 0, cache = 1;
    struct sampling sp = { 0.0f, 1.0f, 0.0f, 0, 0 };
    memset(seqs, 0, sizeof seqs);
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc) return usage("every option takes a value");
        const char *v = argv[++i];
        if (!strcmp(a, "-m")) model_path = v;
        else if (!strcmp(a, "-a")) {
            if (n_adapters >= MAX_SEQS) return usage("at most 8 sequences");
            seqs[n_adapters++].adapter_path = strcmp(v, "none") ? v : NULL;
        } else if (!strcmp(a, "-p")) {
            if (n_seqs >= n_adapters) return usage("-p must follow its -a");
            if ((seqs[n_seqs].n_prompt = parse_ids(v, &seqs[n_seqs].prompt)) <= 0) return usage("-p takes comma-separated token ids");
            n_seqs++;
        } else if (!strcmp(a, "-n")) n_predict = atoi(v);
        else if (!strcmp(a, "-c")) n_ctx = atoi(v);
        else if (!strcmp(a, "-u")) n_ubatch = atoi(v);
        else if (!strcmp(a, "-t")) threads = atoi(v);
        else if (!strcmp(a, "-d")) dump_prefix = v;
        else if (!strcmp(a, "-x")) no_set_context = atoi(v);
        else if (!strcmp(a, "-b")) n_chunk = atoi(v);
        else if (!strcmp(a, "-T")) sp.temp = strtof(v, NULL);
        else if (!strcmp(a, "-K")) sp.top_k = atoi(v);
        else if (!strcmp(a, "-P")) sp.top_p = strtof(v, NULL);
        else if (!strcmp(a, "-M")) sp.min_p = strtof(v, NULL);
        else if (!strcmp(a, "-S")) sp.seed = (uint32_t)strtoul(v, NULL, 10);
        else if (!strcmp(a, "-s")) n_slots = atoi(v);
        else if (!strcmp(a, "-C")) cache = atoi(v);
        else return usage("unknown option");
    }
    if (n_slots <= 0 || n_slots > n_seqs) n_slots = n_seqs;
    if (!model_path || n_seqs == 0 || n_seqs != n_adapters || n_predict < 1 || n_ctx < 1 || n_ubatch < 1 || threads < 1)
        return usage("give -m and one -p per -a; -n, -c, -u, -t positive");

    char err[512];
    fprintf(stderr, "iapt_run: libiapt %s\n", iapt_version());
    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) { fprintf(stderr, "iapt_run: cannot load %s\n", model_path); return 1; }
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    iapt_hook *hook = iapt_hook_new(model, err, sizeof err);
    if (!hook) { fprintf(stderr, "iapt_run: %s\n", err); return 1; }

    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)n_ctx;
    cp.n_batch = (uint32_t)n_ctx;
    cp.n_ubatch = (uint32_t)n_ubatch;
    cp.n_seq_max = (uint32_t)n_slots;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.type_k = cp.type_v = GGML_TYPE_F32;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.kv_unified = true; /* rows stay in batch order across ubatches, as the hook expects */
    cp.cb_eval = iapt_hook_eval_callback;
    cp.cb_eval_user_data = hook;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "iapt_run: cannot create the context\n"); return 1; }
    if (!no_set_context && check(iapt_hook_set_context(hook, ctx, err, sizeof err), "set_context", err)) return 1;
    if (!cache && check(iapt_hook_set_cache(hook, 0, err, sizeof err), "set_cache", err)) return 1;

    int failed = 0;
    struct seq *prev[MAX_SEQS] = { 0 }; /* the last request on each sequence */
    for (int w0 = 0; w0 < n_seqs && !failed; w0 += n_slots) {
        int w1 = w0 + n_slots < n_seqs ? w0 + n_slots : n_seqs;
        failed = run_wave(seqs + w0, w1 - w0, prev, hook, ctx, vocab, n_vocab, n_predict, n_ctx, n_chunk, &sp, dump_prefix, w0);
        for (int s = w0; s < w1; s++) prev[s - w0] = &seqs[s];
    }
    for (int s = 0; s < n_seqs; s++) {
        struct seq *q = &seqs[s];
        printf("reused %d: %d\n", s, q->reused);
        printf("seq %d:", s);
        for (int i = 0; i < q->n_out; i++) printf(" %d", q->out[i]);
        printf("\ntext %d: ", s);
        for (int i = 0; i < q->n_out && !llama_vocab_is_eog(vocab, q->out[i]); i++) {
            char piece[256];
            int n = llama_token_to_piece(vocab, q->out[i], piece, sizeof piece, 0, false);
            if (n > 0) fwrite(piece, 1, (size_t)n, stdout);
        }
        printf("\n");
        if (q->chain) llama_sampler_free(q->chain);
        if (q->dump) {
            fseek(q->dump, 0, SEEK_SET);
            npy_header(q->dump, q->n_out, n_vocab);
            fclose(q->dump);
        }
        free(q->out);
        free(q->prompt);
    }
    llama_free(ctx);
    iapt_hook_free(hook); /* after llama_free: no callback can run any more */
    llama_model_free(model);
    llama_backend_free();
    return failed;
}
