"""Greedy generation with an IAPT adapter in llama-cpp-python's low-level API, through libiapt.

llama-cpp-python loads llama.cpp's libllama.so; libiapt.so (loaded here with ctypes) uses the same
one, so the hook reads and writes the very tensors llama.cpp computes. Setup (scripts/install-libiapt
and scripts/setup-llama-cpp-python do it):

    LLAMA_CPP_LIB_PATH=PREFIX/lib python llama_cpp_iapt.py --lib PREFIX/lib/libiapt.so \
        -m base.gguf -a adapter.iapt.safetensors -p 1,309,201 [-p 1,309,201,77 ...] [-n 16]

Each -p is one request, run one after another on sequence 0 of one context: a request keeps the
KV of the instruction tokens it shares with the previous one (as llama-cpp-python's `Llama` keeps
a common prompt prefix) as far as libiapt's prefix cache can go on from there
(`iapt_hook_set_adapter_tokens`), and decodes the rest. Prints, per request, "reused: K" (positions
not decoded again) and the generated token ids ("tokens: 48 143 ..."). Exit 1 on any libiapt
error. The llama.cpp settings are those of `iapt run --temp 0 --kv-type f32 --flash-attn off`.
"""

import argparse
import ctypes
import sys

import llama_cpp


def load_libiapt(path):
    lib = ctypes.CDLL(path)
    err_args = [ctypes.c_char_p, ctypes.c_size_t]
    lib.iapt_version.restype = ctypes.c_char_p
    lib.iapt_adapter_load.argtypes = [ctypes.c_char_p] + err_args
    lib.iapt_adapter_load.restype = ctypes.c_void_p
    lib.iapt_adapter_free.argtypes = [ctypes.c_void_p]
    lib.iapt_adapter_n_soft_tokens.argtypes = [ctypes.c_void_p]
    lib.iapt_adapter_n_soft_tokens.restype = ctypes.c_int32
    lib.iapt_hook_new.argtypes = [ctypes.c_void_p] + err_args
    lib.iapt_hook_new.restype = ctypes.c_void_p
    lib.iapt_hook_free.argtypes = [ctypes.c_void_p]
    lib.iapt_hook_set_context.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + err_args
    lib.iapt_hook_set_adapter.argtypes = [ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.c_int32] + err_args
    lib.iapt_hook_set_adapter_tokens.argtypes = [
        ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32), ctypes.c_int32, ctypes.c_int32,
    ] + err_args
    lib.iapt_hook_prepare.argtypes = [ctypes.c_void_p, ctypes.POINTER(llama_cpp.llama_batch)] + err_args
    lib.iapt_hook_finish.argtypes = [ctypes.c_void_p] + err_args
    for f in ("iapt_hook_set_context", "iapt_hook_set_adapter", "iapt_hook_set_adapter_tokens", "iapt_hook_prepare", "iapt_hook_finish"):
        getattr(lib, f).restype = ctypes.c_int32
    return lib


class Err:
    def __init__(self):
        self.buf = ctypes.create_string_buffer(512)

    def args(self):
        return [self.buf, len(self.buf)]

    def check(self, rc, what):
        if rc != 0:
            sys.exit(f"llama_cpp_iapt: {what}: {self.buf.value.decode(errors='replace')} (code {rc})")


def generate(iapt, err, hook, ctx, vocab, n_vocab, prompt, m, start, n_predict):
    """Greedy tokens of one request on sequence 0, whose positions 0..start-1 are in the KV: the
    rest of the instruction and the m placeholder slots in one decode, then one token per decode."""
    n = len(prompt) + m
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i, p in enumerate(range(start, n)):
        batch.token[i] = prompt[p] if p < len(prompt) else 0
        batch.pos[i] = p
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = p == n - 1
    batch.n_tokens = n - start
    out, row, pos = [], n - start - 1, n
    for _ in range(n_predict):
        err.check(iapt.iapt_hook_prepare(hook, ctypes.byref(batch), *err.args()), "iapt_hook_prepare")
        rc = llama_cpp.llama_decode(ctx, batch)
        err.check(iapt.iapt_hook_finish(hook, *err.args()), "iapt_hook_finish")
        if rc != 0:
            sys.exit(f"llama_cpp_iapt: llama_decode returned {rc}")
        logits = llama_cpp.llama_get_logits_ith(ctx, row)
        best = max(range(n_vocab), key=lambda v: logits[v])
        out.append(best)
        if llama_cpp.llama_vocab_is_eog(vocab, best):
            break
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = best, pos, 1, 0, True
        batch.n_tokens, row, pos = 1, 0, pos + 1
    llama_cpp.llama_batch_free(batch)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True, help="path of libiapt.so")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-a", "--adapter", required=True)
    ap.add_argument("-p", "--prompt-tokens", required=True, action="append", help="comma-separated instruction token ids (repeat: requests one after another)")
    ap.add_argument("-n", "--n-predict", type=int, default=16)
    args = ap.parse_args()
    prompts = [[int(t) for t in p.split(",")] for p in args.prompt_tokens]

    iapt = load_libiapt(args.lib)
    err = Err()
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(args.model.encode(), llama_cpp.llama_model_default_params())
    if not model:
        sys.exit(f"llama_cpp_iapt: cannot load {args.model}")
    vocab = llama_cpp.llama_model_get_vocab(model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)

    hook = iapt.iapt_hook_new(model, *err.args())
    if not hook:
        err.check(-1, "iapt_hook_new")
    adapter = iapt.iapt_adapter_load(args.adapter.encode(), *err.args())
    if not adapter:
        err.check(-1, "iapt_adapter_load")
    m = iapt.iapt_adapter_n_soft_tokens(adapter)

    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = cp.n_batch = 256
    cp.n_threads = cp.n_threads_batch = 1
    cp.type_k = cp.type_v = llama_cpp.GGML_TYPE_F32
    cp.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.kv_unified = True
    # libiapt's C function itself (no Python trampoline, no GIL in the decode), and the hook.
    address = ctypes.cast(iapt.iapt_hook_eval_callback, ctypes.c_void_p).value
    cp.cb_eval = llama_cpp.ggml_backend_sched_eval_callback(address)
    cp.cb_eval_user_data = hook
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        sys.exit("llama_cpp_iapt: cannot create the context")
    err.check(iapt.iapt_hook_set_context(hook, ctx, *err.args()), "iapt_hook_set_context")
    previous = []
    for prompt in prompts:
        # The instruction tokens this sequence's KV holds already (the previous request's), as far
        # as the hook's prefix cache can go on from: keep those, drop the rest, decode from there.
        kept = next((i for i, (a, b) in enumerate(zip(prompt, previous)) if a != b), min(len(prompt), len(previous)))
        ids = (ctypes.c_int32 * len(prompt))(*prompt)
        reused = iapt.iapt_hook_set_adapter_tokens(hook, 0, adapter, ids, len(prompt), kept, *err.args())
        if reused < 0:
            err.check(reused, "iapt_hook_set_adapter_tokens")
        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(ctx), 0, reused, -1)
        print("reused:", reused)
        print("tokens:", " ".join(map(str, generate(iapt, err, hook, ctx, vocab, n_vocab, prompt, m, reused, args.n_predict))))
        previous = prompt
    iapt.iapt_adapter_free(adapter)  # the hook holds its own reference until it is freed
    llama_cpp.llama_free(ctx)
    iapt.iapt_hook_free(hook)  # after llama_free
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
