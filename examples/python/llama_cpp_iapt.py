"""Greedy generation with an IAPT adapter in llama-cpp-python's low-level API, through libiapt.

llama-cpp-python loads llama.cpp's libllama.so; libiapt.so (loaded here with ctypes) uses the same
one, so the hook reads and writes the very tensors llama.cpp computes. Setup (scripts/install-libiapt
and scripts/setup-llama-cpp-python do it):

    LLAMA_CPP_LIB_PATH=PREFIX/lib python llama_cpp_iapt.py --lib PREFIX/lib/libiapt.so \
        -m base.gguf -a adapter.iapt.safetensors -p 1,309,201 [-n 16]

Prints the generated token ids on one line ("tokens: 48 143 ..."). Exit 1 on any libiapt error.
The llama.cpp settings are those of `iapt run --temp 0 --kv-type f32 --flash-attn off`.
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
    lib.iapt_hook_prepare.argtypes = [ctypes.c_void_p, ctypes.POINTER(llama_cpp.llama_batch)] + err_args
    lib.iapt_hook_finish.argtypes = [ctypes.c_void_p] + err_args
    for f in ("iapt_hook_set_context", "iapt_hook_set_adapter", "iapt_hook_prepare", "iapt_hook_finish"):
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", required=True, help="path of libiapt.so")
    ap.add_argument("-m", "--model", required=True)
    ap.add_argument("-a", "--adapter", required=True)
    ap.add_argument("-p", "--prompt-tokens", required=True, help="comma-separated instruction token ids")
    ap.add_argument("-n", "--n-predict", type=int, default=16)
    args = ap.parse_args()
    prompt = [int(t) for t in args.prompt_tokens.split(",")]

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
    err.check(iapt.iapt_hook_set_adapter(hook, 0, adapter, len(prompt), *err.args()), "iapt_hook_set_adapter")
    iapt.iapt_adapter_free(adapter)  # the hook holds its own reference

    n = len(prompt) + m
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    for i in range(n):
        batch.token[i] = prompt[i] if i < len(prompt) else 0
        batch.pos[i] = i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == n - 1
    batch.n_tokens = n
    out, row, pos = [], n - 1, n
    for _ in range(args.n_predict):
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
    print("tokens:", " ".join(map(str, out)))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    iapt.iapt_hook_free(hook)  # after llama_free
    llama_cpp.llama_model_free(model)


if __name__ == "__main__":
    main()
