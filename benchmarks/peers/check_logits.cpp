// Loads a GGUF the way the llama.cpp peer runs it (all layers on the GPU if there is one, routed
// experts on the CPU), decodes a random prompt and a few tokens, and checks that every logit is
// finite and that they vary: the benchmark's random weights must not turn into NaN or a constant.
//
//   check_logits MODEL.gguf [n_prompt=64] [n_gen=4] [threads=0: llama.cpp's default]
// Prints one line per decode and "ok"; exits 1 on the first non-finite or constant logits.

#include "ggml-backend.h"
#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

static bool check(const float * logits, int n_vocab, const char * what) {
    double sum = 0, sq = 0;
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < n_vocab; ++i) {
        const float v = logits[i];
        if (!std::isfinite(v)) {
            std::printf("%s: logit %d is %f\n", what, i, v);
            return false;
        }
        sum += v;
        sq += double(v) * v;
        lo = v < lo ? v : lo;
        hi = v > hi ? v : hi;
    }
    const double mean = sum / n_vocab, sd = std::sqrt(std::max(0.0, sq / n_vocab - mean * mean));
    std::printf("%s: logits finite, mean %.4g sd %.4g min %.4g max %.4g\n", what, mean, sd, lo, hi);
    if (!(sd > 0)) {
        std::printf("%s: logits are constant\n", what);
        return false;
    }
    return true;
}

int main(int argc, char ** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf [n_prompt] [n_gen] [threads]\n", argv[0]);
        return 2;
    }
    const int n_prompt = argc > 2 ? std::atoi(argv[2]) : 64;
    const int n_gen = argc > 3 ? std::atoi(argv[3]) : 4;
    const int threads = argc > 4 ? std::atoi(argv[4]) : 0;
    if (n_prompt < 1 || n_gen < 0) {
        std::fprintf(stderr, "n_prompt must be >= 1 and n_gen >= 0\n");
        return 2;
    }

    ggml_backend_load_all();
    llama_backend_init();
    ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    if (cpu == nullptr) {
        std::fprintf(stderr, "no CPU backend found next to the binary\n");
        return 1;
    }
    // the benchmark's -ot exps=CPU
    const llama_model_tensor_buft_override overrides[] = {{"exps", ggml_backend_dev_buffer_type(cpu)},
                                                          {nullptr, nullptr}};
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 99;
    mp.tensor_buft_overrides = overrides;
    mp.load_mode = LLAMA_LOAD_MODE_NONE;
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (model == nullptr) {
        std::fprintf(stderr, "could not load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_gen + 16;
    cp.n_batch = cp.n_ubatch = n_prompt;
    if (threads > 0) {
        cp.n_threads = cp.n_threads_batch = threads;
    }
    llama_context * ctx = llama_init_from_model(model, cp);
    if (ctx == nullptr) {
        std::fprintf(stderr, "could not create a context\n");
        llama_model_free(model);
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    std::mt19937 rng(1234);
    std::vector<llama_token> tokens(n_prompt);
    for (auto & t : tokens) {
        t = llama_token(rng() % n_vocab);
    }

    bool ok = llama_decode(ctx, llama_batch_get_one(tokens.data(), n_prompt)) == 0;
    char what[64];
    std::snprintf(what, sizeof what, "prefill %d", n_prompt);
    ok = ok && check(llama_get_logits_ith(ctx, -1), n_vocab, what);
    for (int i = 0; ok && i < n_gen; ++i) {
        llama_token t = llama_token(rng() % n_vocab);
        ok = llama_decode(ctx, llama_batch_get_one(&t, 1)) == 0;
        std::snprintf(what, sizeof what, "decode %d", i);
        ok = ok && check(llama_get_logits_ith(ctx, -1), n_vocab, what);
    }
    std::printf("%s\n", ok ? "ok" : "FAILED");
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return ok ? 0 : 1;
}
