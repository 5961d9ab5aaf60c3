// What the CPU kernels' sources share: the structs ctypes mirrors (kernels/cpu_blocks.py,
// kernels/cpu_decoder.py, kernels/cpu_draft.py) and the steps the MTP draft loop (draft.cpp)
// takes from the block kernels (blocks.cpp) and attention (attention.cpp).

#pragma once

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <vector>

#define QK 32
#ifdef __AVX512VNNI__
#define TILE 16
#else
#define TILE 8
#endif

extern "C" {

struct QWeight {
    const uint8_t* codes;  // bits 4: [n, k/2], byte j of a block = value j (low), j + 16 (high)
                           // bits 8: [n, k] int8
    const float* scale;    // [n, k/32]
    const float* min;      // bits 4: [n, k/32]; bits 8 tiled with AVX-512 VNNI: int32, -128
                           // times each block's code sum (the start of the kernel's integer
                           // sums) unless half carries the code sums; else null
    int32_t bits;
    int32_t n;
    int32_t k;
    int32_t tiled;         // in tiles of TILE columns (cpu_blocks.py: tile_codes): codes
                           // [n/TILE, k/32, groups, TILE, 4] bytes (groups: 4 for 4 bits, 8 for
                           // 8 bits), scale and min [n/TILE, k/32, TILE]
    const uint16_t* half;  // tiled, where float16 holds the scales exactly (GGUF's Q4_0, Q4_1
                           // and Q8_0): [n/TILE, k/32, 2, TILE], each block's scales in float16,
                           // then its minimums in float16 (bits 4) or its code sums in int16
                           // (bits 8 with AVX-512 VNNI, the start sums over -128): a block of a
                           // tile reads one 64-byte line (AVX-512) for both, not a line of each;
                           // else null
};

struct Layer {
    const float* input_norm;         // [hidden]
    const float* post_norm;          // [hidden]
    QWeight qkv;                     // [q + 2 kv, hidden]
    const float* qkv_bias;           // [q + 2 kv] or null
    QWeight o;                       // [hidden, q]
    const float* o_bias;             // [hidden] or null
    QWeight gate_up;                 // [2 inter, hidden]
    QWeight down;                    // [hidden, inter]
    float* k_cache;                  // [blocks, block_size, kv_heads, head_dim]
    float* v_cache;
};

struct Model {
    int32_t num_layers;
    int32_t hidden;
    int32_t num_heads;
    int32_t num_kv_heads;
    int32_t head_dim;
    int32_t intermediate;
    float eps;
    float scale;        // attention scale
    const float* cos;   // [positions, head_dim]: [cos, cos]
    const float* sin;   // [positions, head_dim]: [-sin, sin]
    const Layer* layers;
};

struct Step {
    int32_t num_tokens;
    const int64_t* positions;     // [T], rotary positions
    const int64_t* kv_positions;  // [T], positions in the KV cache (MTP layers: rotary - 1)
    const int64_t* slots;         // [T], -1: not written
    const int32_t* token_seq;     // [T], the token's row of block_tables
    const int32_t* block_tables;  // [B, bt_stride]
    int32_t bt_stride;
    int32_t block_size;
};

}  // extern "C"

namespace blocks {

struct Acts {
    std::vector<int8_t> q;  // [m, k]
    std::vector<float> d;   // [m, k/32]
    std::vector<float> s;   // [m, k/32]: d * sum of the block's codes
#ifdef __AVX512VNNI__
    std::vector<float> d8;  // [m, k/32 * 8]: each d 8 times, the lanes of a block's sums
    std::vector<uint8_t> u; // [m, k]: q + 128, the unsigned operand of the 8-bit tiled kernel
                            // (made by the projections that use it only)
#endif
};

struct Buffers {
    std::vector<float> normed, qkv, attn, proj, gate_up, act;
    Acts acts;
};

// out [m, d] = rows of x [m, d] normalized (root mean square) times weight; out may be x.
void rms_norm(const float* x, const float* weight, int m, int d, float eps, float* out);

// out [m, w.n] = x [m, w.k] rounded to 8-bit blocks, times w.
void project(const QWeight& w, const float* x, int m, Acts& acts, float* out);

// Attention of every (token, head) pair of the step over the paged cache (attention.cpp): qkv
// [T, q + 2 kv] rotated, out [T, q].
void attend(const Model& md, const Layer& ly, const Step& s, const float* qkv, float* out);

// One decoder layer of md over the step's tokens: x [T, hidden], the residual stream, in place.
void layer_forward(const Model& md, const Layer& ly, const Step& s, float* x, Buffers& b);

// The sum of 8 lanes.
inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v);
    __m128 hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

// The largest of count floats.
float max_of(const float* x, int64_t count);

// e^(x[i] - shift) in place for count floats; returns their sum.
float exp_shifted(float* x, int64_t count, float shift);

// The index i of the winner of the exponential race over probabilities p [count] whose tokens are
// ids[i] (null: i), keyed on (key0, key1) (race.cpp, engine/noise.py).
int64_t race_row(const float* p, const int64_t* ids, int64_t count, uint32_t key0, uint32_t key1);

}  // namespace blocks
