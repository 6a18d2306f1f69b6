// The C++ side of iapt-llama's FFI: every llama.cpp call that can throw a C++ exception goes
// through one of these functions, which catch it and turn it into a status and a message, so that
// no exception ever unwinds into Rust (which would abort the process). llama.cpp's own tools do the
// same around these calls (e.g. llama.cpp's tokenizer throws std::out_of_range for a character
// that a vocabulary without byte fallback cannot encode).
//
// Every function returns 0 when the wrapped call returned (its result in *out) and 1 when it
// threw (the exception's message, NUL-terminated and truncated to err_size, in err).

#include "llama.h"
#include "gguf.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>

namespace {

void put(char * err, size_t err_size, const char * msg) {
    if (err == nullptr || err_size == 0) {
        return;
    }
    std::strncpy(err, msg, err_size - 1);
    err[err_size - 1] = '\0';
}

template <class F>
int guarded(char * err, size_t err_size, F && f) {
    try {
        f();
        return 0;
    } catch (const std::exception & e) {
        put(err, err_size, e.what());
    } catch (...) {
        put(err, err_size, "an unknown C++ exception");
    }
    return 1;
}

}  // namespace

extern "C" {

int iapt_shim_tokenize(const llama_vocab * vocab, const char * text, int32_t text_len, llama_token * tokens, int32_t n_tokens_max,
                       bool add_special, bool parse_special, int32_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_tokenize(vocab, text, text_len, tokens, n_tokens_max, add_special, parse_special); });
}

int iapt_shim_token_to_piece(const llama_vocab * vocab, llama_token token, char * buf, int32_t length, int32_t lstrip, bool special,
                             int32_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_token_to_piece(vocab, token, buf, length, lstrip, special); });
}

int iapt_shim_decode(llama_context * ctx, llama_batch batch, int32_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_decode(ctx, batch); });
}

int iapt_shim_chat_apply_template(const char * tmpl, const llama_chat_message * chat, size_t n_msg, bool add_ass, char * buf, int32_t length,
                                  int32_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_chat_apply_template(tmpl, chat, n_msg, add_ass, buf, length); });
}

int iapt_shim_model_load_from_file(const char * path, llama_model_params params, llama_model ** out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_model_load_from_file(path, params); });
}

int iapt_shim_init_from_model(llama_model * model, llama_context_params params, llama_context ** out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_init_from_model(model, params); });
}

int iapt_shim_sampler_apply(llama_sampler * smpl, llama_token_data_array * cur_p, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { llama_sampler_apply(smpl, cur_p); });
}

int iapt_shim_sampler_accept(llama_sampler * smpl, llama_token token, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { llama_sampler_accept(smpl, token); });
}

int iapt_shim_model_quantize(const char * fname_inp, const char * fname_out, const llama_model_quantize_params * params, uint32_t * out,
                             char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_model_quantize(fname_inp, fname_out, params); });
}

int iapt_shim_gguf_init_from_file(const char * fname, gguf_init_params params, gguf_context ** out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = gguf_init_from_file(fname, params); });
}

int iapt_shim_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1, bool * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_memory_seq_rm(mem, seq_id, p0, p1); });
}

int iapt_shim_memory_seq_cp(llama_memory_t mem, llama_seq_id src, llama_seq_id dst, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { llama_memory_seq_cp(mem, src, dst, -1, -1); });
}

int iapt_shim_state_seq_get(llama_context * ctx, llama_seq_id seq, uint8_t * dst, size_t size, size_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = dst == nullptr ? llama_state_seq_get_size(ctx, seq) : llama_state_seq_get_data(ctx, dst, size, seq); });
}

int iapt_shim_state_seq_set(llama_context * ctx, const uint8_t * src, size_t size, llama_seq_id seq, size_t * out, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { *out = llama_state_seq_set_data(ctx, src, size, seq); });
}

int iapt_shim_memory_clear(llama_memory_t mem, bool data, char * err, size_t err_size) {
    return guarded(err, err_size, [&] { llama_memory_clear(mem, data); });
}

}  // extern "C"
