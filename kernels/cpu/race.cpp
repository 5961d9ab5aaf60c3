// The exponential race that samples a token (engine/noise.py, engine/sampler.py): for each row of
// probabilities p, argmax over tokens t of p[t] / E[t], where E[t] = -log(u), u = (h + 0.5) / 2^32
// and h is the 32-bit hash of (the row's two keys, t). PyTorch computes every E of the vocabulary,
// about 1 ms a row on a CPU; here most are never computed:
//   - a token of probability 0 never wins;
//   - -log(u) >= 1 - u, so a token whose 1 - u is already above p[t] / best (the best quotient so
//     far, with a margin that covers every rounding below) cannot win, and its log is skipped.
// The tokens that may win get E as PyTorch computes it (double log, rounded to float32; the
// quotient in float32; ties to the first index), so the winner is the same, but for the last bit
// of a double log (the C library's against PyTorch's), which the rounding to float32 hides for all
// but about one value in 10^8.

#include "blocks.h"

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x846CA68Bu;
    return x ^ (x >> 16);
}

namespace blocks {

int64_t race_row(const float* p, const int64_t* ids, int64_t count, uint32_t key0, uint32_t key1) {
    const double unit = 1.0 / 4294967296.0;
    float best = 0.0f;
    int64_t winner = 0;
    for (int64_t i = 0; i < count; i++) {
        float pt = p[i];
        if (!(pt > 0.0f)) {
            continue;
        }
        int64_t t = i;
        if (ids != nullptr) {
            t = ids[i];
        }
        uint32_t h = mix32(mix32((uint32_t)t ^ key0) ^ key1);
        double u = ((double)h + 0.5) * unit;
        if (best > 0.0f && (1.0 - u) * (double)best > (double)pt * 1.0001) {
            continue;
        }
        float e = (float)(-log(u));
        float quotient = pt / e;
        if (quotient > best) {
            best = quotient;
            winner = i;
        }
    }
    return winner;
}

}  // namespace blocks

extern "C" {

// probs [rows, vocab] float32; keys [rows, 2], each in [0, 2^32); out [rows]
void race_argmax(const float* probs, const int64_t* keys, int64_t rows, int64_t vocab,
                 int64_t* out) {
#pragma omp parallel for if (rows > 1)
    for (int64_t r = 0; r < rows; r++) {
        out[r] = blocks::race_row(probs + r * vocab, nullptr, vocab, (uint32_t)keys[2 * r],
                                  (uint32_t)keys[2 * r + 1]);
    }
}

}  // extern "C"
