// CPU kernels for weights stored in blocks of 32 inputs, as GGUF files store them:
//   4 bits: value = code * scale + min (Q4_0, Q4_1, K-quants' sub-blocks, our own int4)
//   8 bits: value = code * scale (Q8_0, our own int8)
// Activations are rounded to 8 bits per block of 32 (one float scale each), so a block's dot
// product is an integer one (AVX2 maddubs and madd; one dpbusd on a CPU with AVX-VNNI, the same
// integers). Each output row of each input row is summed in one fixed order whatever the number of
// input rows, so an input row's result never depends on the other rows of the call: MTP's verify
// rows equal one-row steps bit for bit.
//
// Weights kept in tiles (cpu_blocks.py: tile_codes; every weight the engine loads) take the tiled
// kernel: one output per 32-bit lane, so a row of a block costs a few vector ops for a whole tile
// of outputs (16 with AVX-512 VNNI, which cpu_build.py picks from the CPU, else 8). The vector ops
// are what a multi-row step (verify, batches, prompts) is bound by. Weights in rows take the column
// kernel (with AVX-512 VNNI two blocks per instruction). The builds sum in different orders, so
// they differ in the last bits.
//
// Also here: a step of a dense Llama-family decoder stack (norms, projections, rotary, paged-KV
// write and attention (attention.cpp), SwiGLU) in one call, for every step over the paged cache.
//
// Built at first use (kernels/cpu_build.py) and called through ctypes; the structs of blocks.h
// mirror the ctypes ones in kernels/cpu_blocks.py and kernels/cpu_decoder.py.

#include "blocks.h"

namespace {

using blocks::Acts;
using blocks::exp_shifted;
using blocks::hsum;
using blocks::max_of;

// Rows from which the small per-row ops (norms, rounding, rotary, SwiGLU) are split between the
// threads; below it a fork costs more than it saves. Rows never depend on it.
const int PARALLEL_ROWS = 16;

// e^x for 8 floats: x = n ln2 + r, e^r by Cephes' expf polynomial (about 1 ulp), times 2^n.
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
    __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)));
}

}  // namespace

namespace blocks {

// e^(x[i] - shift) in place for count floats (the tail padded through a small buffer); returns
// their sum, added in 8 lanes then across them.
float exp_shifted(float* x, int64_t count, float shift) {
    __m256 s = _mm256_set1_ps(shift);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), s));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    if (i < count) {
        float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        memcpy(tail, x + i, sizeof(float) * (count - i));
        _mm256_storeu_ps(tail, exp8(_mm256_sub_ps(_mm256_loadu_ps(tail), s)));
        memcpy(x + i, tail, sizeof(float) * (count - i));
        for (int64_t j = 0; j < count - i; j++) {
            sum += tail[j];
        }
    }
    return sum;
}

// The largest of count floats.
float max_of(const float* x, int64_t count) {
    __m256 most = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        most = _mm256_max_ps(most, _mm256_loadu_ps(x + i));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, most);
    float top = lanes[0];
    for (int j = 1; j < 8; j++) {
        top = fmaxf(top, lanes[j]);
    }
    for (; i < count; i++) {
        top = fmaxf(top, x[i]);
    }
    return top;
}

}  // namespace blocks

namespace {

// Rounds rows of x [m, k] to 8-bit blocks.
void quantize_rows(const float* x, int m, int k, Acts& a) {
    int nb = k / QK;
    a.q.resize((size_t)m * k);
    a.d.resize((size_t)m * nb);
    a.s.resize((size_t)m * nb);
#ifdef __AVX512VNNI__
    a.d8.resize((size_t)m * nb * 8);
#endif
#pragma omp parallel for if (m >= PARALLEL_ROWS)
    for (size_t b = 0; b < (size_t)m * nb; b++) {
        const float* xb = x + b * QK;
        __m256 sign_bit = _mm256_set1_ps(-0.0f);
        __m256 most = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8) {
            most = _mm256_max_ps(most, _mm256_andnot_ps(sign_bit, _mm256_loadu_ps(xb + j)));
        }
        __m128 half = _mm_max_ps(_mm256_castps256_ps128(most), _mm256_extractf128_ps(most, 1));
        half = _mm_max_ps(half, _mm_movehl_ps(half, half));
        half = _mm_max_ss(half, _mm_movehdup_ps(half));
        float amax = _mm_cvtss_f32(half);
        float d = amax / 127.0f;
        float inv = 0.0f;
        if (d > 0.0f) {
            inv = 1.0f / d;
        }
        int sum = 0;
        int8_t* qb = a.q.data() + b * QK;
        for (int j = 0; j < QK; j++) {
            int v = (int)nearbyintf(xb[j] * inv);
            qb[j] = (int8_t)v;
            sum += v;
        }
        a.d[b] = d;
        a.s[b] = d * (float)sum;
#ifdef __AVX512VNNI__
        _mm256_storeu_ps(a.d8.data() + b * 8, _mm256_set1_ps(d));
#endif
    }
}

#ifdef __AVX512VNNI__
// a.u = the rounded codes plus 128: the unsigned operand of the 8-bit tiled kernel (only it needs
// them, so only its projections make them).
void unsigned_codes(Acts& a) {
    a.u.resize(a.q.size());
    for (size_t i = 0; i < a.q.size(); i++) {
        a.u[i] = (uint8_t)(a.q[i] + 128);
    }
}
#endif

// A weight block (32 codes) as unsigned magnitudes for maddubs, and its signed codes (8 bits:
// the activations take the weight's sign, so that |w| * (x * sign(w)) = w * x).
// codes: the block's 16 bytes (4 bits, GGUF's nibble order) or 32 bytes (8 bits).
template <int BITS>
inline __m256i load_block(const uint8_t* codes, __m256i* sign) {
    if (BITS == 4) {
        __m128i t = _mm_loadu_si128((const __m128i*)codes);
        __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
        return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
    }
    *sign = _mm256_loadu_si256((const __m256i*)codes);
    return _mm256_sign_epi8(*sign, *sign);
}

// A weight block's dot product with 32 activation codes, as 8 float partial sums.
template <int BITS>
inline __m256 dot_block(__m256i magnitude, __m256i sign, const int8_t* x) {
    __m256i xv = _mm256_loadu_si256((const __m256i*)x);
    if (BITS == 8) {
        xv = _mm256_sign_epi8(xv, sign);
    }
#ifdef __AVXVNNI__
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), magnitude, xv));
#else
    __m256i pairs = _mm256_maddubs_epi16(magnitude, xv);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
}

// Sum over blocks of a weight row's minimums times the row's block sums (4 bits): the part of
// the dot product that the codes' offset adds. Never inlined: inlined into the rows of a column, the
// compiler may vectorize its scalar tail across the rows and fuse its multiply-adds there but not
// in a one-row call, and a row's result would depend on the rows beside it.
__attribute__((noinline)) float min_term(const float* wmin, const float* xs, int nb) {
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    for (; b + 8 <= nb; b += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(wmin + b), _mm256_loadu_ps(xs + b), acc);
    }
    float sum = hsum(acc);
    for (; b < nb; b++) {
        sum += wmin[b] * xs[b];
    }
    return sum;
}

// Writes row m of output column n: the sum of its blocks' products and, 4 bits, the minimums' part.
template <int BITS>
inline void store_row(float sum, const QWeight& w, const Acts& a, int n, int m, float* out,
                      int ldo) {
    if (BITS == 4) {
        int nb = w.k / QK;
        sum += min_term(w.min + (size_t)n * nb, a.s.data() + (size_t)m * nb, nb);
    }
    out[(size_t)m * ldo + n] = sum;
}

#ifdef __AVX512VNNI__

// Two weight blocks (64 codes) as unsigned magnitudes for dpbusd, in the inputs' order; 8 bits:
// the negative codes as a mask, to move their sign onto the activations.
template <int BITS>
inline __m512i load_pair(const uint8_t* codes, __mmask64* negative) {
    if (BITS == 4) {
        __m256i t = _mm256_loadu_si256((const __m256i*)codes);
        __m256i low = _mm256_and_si256(t, _mm256_set1_epi8(0x0F));
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(t, 4), _mm256_set1_epi8(0x0F));
        // 128-bit lanes [low 0, low 1, high 0, high 1] to [low 0, high 0, low 1, high 1]
        __m512i z = _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
        return _mm512_shuffle_i64x2(z, z, _MM_SHUFFLE(3, 1, 2, 0));
    }
    __m512i w = _mm512_loadu_si512(codes);
    *negative = _mm512_movepi8_mask(w);
    return _mm512_abs_epi8(w);
}

// A last, unpaired block, the upper half zero.
template <int BITS>
inline __m512i load_last(const uint8_t* codes, __mmask64* negative) {
    __m256i sign = _mm256_setzero_si256();
    __m512i w = _mm512_zextsi256_si512(load_block<BITS>(codes, &sign));
    if (BITS == 8) {
        *negative = _mm512_movepi8_mask(_mm512_zextsi256_si512(sign));
    }
    return w;
}

// Two blocks' dot products with 64 activation codes: 8 float partial sums per block.
template <int BITS>
inline __m512 dot_pair(__m512i magnitude, __mmask64 negative, __m512i x) {
    if (BITS == 8) {
        x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
    }
    return _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), magnitude, x));
}

// Adds a pair of blocks (b, b + 1) of R rows into acc: each row's scales, then its dot products.
template <int R, int BITS>
inline void add_pair(__m512i wv, __mmask64 negative, __m512 ws, const int8_t* xq, const float* xd,
                     int nb, int b, __m512* acc) {
    for (int r = 0; r < R; r++) {
        __m512 d = _mm512_mul_ps(ws, _mm512_loadu_ps(xd + ((size_t)r * nb + b) * 8));
        __m512i xv = _mm512_loadu_si512(xq + (size_t)r * nb * QK + b * QK);
        acc[r] = _mm512_fmadd_ps(dot_pair<BITS>(wv, negative, xv), d, acc[r]);
    }
}

// Output column n of input rows m0 .. m0 + R, two blocks at a time (as rows_of below).
template <int R, int BITS>
void rows_of(const QWeight& w, int n, const Acts& a, int m0, float* out, int ldo) {
    const int nb = w.k / QK;
    const int block_bytes = BITS == 4 ? QK / 2 : QK;
    const uint8_t* codes = w.codes + (size_t)n * nb * block_bytes;
    const float* scale = w.scale + (size_t)n * nb;
    const int8_t* xq = a.q.data() + (size_t)m0 * nb * QK;
    const float* xd = a.d8.data() + (size_t)m0 * nb * 8;
    // lanes 0-7 take the first block's scale, 8-15 the second's
    const __m512i pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm512_setzero_ps();
    }
    __mmask64 negative = 0;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        __m512i wv = load_pair<BITS>(codes + b * block_bytes, &negative);
        __m128 two = _mm_castpd_ps(_mm_load_sd((const double*)(scale + b)));
        __m512 ws = _mm512_permutexvar_ps(pair, _mm512_castps128_ps512(two));
        add_pair<R, BITS>(wv, negative, ws, xq, xd, nb, b, acc);
    }
    if (b < nb) {  // the last block, unpaired: its upper half zero
        __m512i wv = load_last<BITS>(codes + b * block_bytes, &negative);
        __m512 ws = _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(scale[b]));
        for (int r = 0; r < R; r++) {
            const float* row_d = xd + ((size_t)r * nb + b) * 8;
            __m512 d = _mm512_mul_ps(ws, _mm512_maskz_loadu_ps(0x00FF, row_d));
            const int8_t* row_q = xq + (size_t)r * nb * QK + b * QK;
            __m512i xv = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i*)row_q));
            acc[r] = _mm512_fmadd_ps(dot_pair<BITS>(wv, negative, xv), d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        store_row<BITS>(_mm512_reduce_add_ps(acc[r]), w, a, n, m0 + r, out, ldo);
    }
}

// A tile's block b of 4-bit codes as the eight dpbusd operands of its input groups (4 g .. 4 g + 3):
// four 64-byte vectors whose byte 4 j + i holds column j's inputs 4 h + i (low nibble) and
// 16 + 4 h + i (high nibble).
inline void load_tile4(const uint8_t* codes, __m512i* wv) {
    const __m512i low_bits = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 4; h++) {
        __m512i v = _mm512_loadu_si512(codes + h * 64);
        wv[h] = _mm512_and_si512(v, low_bits);
        wv[h + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low_bits);
    }
}

// Four bytes of a row's codes as one 32-bit lane, repeated in every lane.
inline __m512i four_of(const void* x) {
    int32_t four;
    memcpy(&four, x, 4);
    return _mm512_set1_epi32(four);
}

// Columns 16 t .. 16 t + 15 of input rows m0 .. m0 + R, from weights in tiles of 16 columns
// (cpu_blocks.py: tile_codes). A dpbusd lane is a column, fed four inputs of a row at once, so each
// row of a block takes eight dpbusd and one conversion to float for all 16 columns, where the column
// kernel above takes a dpbusd, a conversion and a scale per column and pair of blocks; the weights
// are unpacked once for the R rows. 4 bits: unsigned codes times the signed activations, plus the
// minimums' part; 8 bits: the activations made unsigned (q + 128) times the signed codes, from a
// start of -128 times the block's code sum, which is the integer sum of the codes times q. Each row
// sums its blocks in order in its own accumulator, whatever R is, and no lane is summed across.
template <int R, int BITS>
void tile_rows(const QWeight& w, int t, const Acts& a, int m0, float* out, int ldo) {
    const int nb = w.k / QK;
    const int block_bytes = BITS == 4 ? QK / 2 : QK;
    const uint8_t* codes = w.codes + (size_t)t * nb * TILE * block_bytes;
    const size_t first = (size_t)t * nb * TILE;  // the tile's first block value
    __m512 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm512_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        __m512i wv[8];
        if (BITS == 4) {
            load_tile4(codes + (size_t)b * TILE * block_bytes, wv);
        } else {
            for (int g = 0; g < 8; g++) {
                wv[g] = _mm512_loadu_si512(codes + ((size_t)b * 8 + g) * 64);
            }
        }
        __m512 ws;
        __m512 wm = _mm512_setzero_ps();
        __m512i start = _mm512_setzero_si512();
        size_t at = first + (size_t)b * TILE;
        if (w.half != nullptr) {
            __m512i both = _mm512_loadu_si512(w.half + 2 * at);
            ws = _mm512_cvtph_ps(_mm512_castsi512_si256(both));
            __m256i second = _mm512_extracti64x4_epi64(both, 1);
            if (BITS == 4) {
                wm = _mm512_cvtph_ps(second);
            } else {  // -128 times the code sum
                __m512i sums = _mm512_cvtepi16_epi32(second);
                start = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 7));
            }
        } else {
            ws = _mm512_loadu_ps(w.scale + at);
            if (BITS == 4) {
                wm = _mm512_loadu_ps(w.min + at);
            } else {
                start = _mm512_loadu_si512((const int32_t*)w.min + at);
            }
        }
        for (int r = 0; r < R; r++) {
            size_t rb = (size_t)(m0 + r) * nb + b;
            __m512i dot;
            if (BITS == 4) {
                dot = _mm512_setzero_si512();
                for (int g = 0; g < 8; g++) {
                    dot = _mm512_dpbusd_epi32(dot, wv[g], four_of(a.q.data() + rb * QK + 4 * g));
                }
            } else {
                dot = start;
                for (int g = 0; g < 8; g++) {
                    dot = _mm512_dpbusd_epi32(dot, four_of(a.u.data() + rb * QK + 4 * g), wv[g]);
                }
            }
            __m512 d = _mm512_mul_ps(ws, _mm512_set1_ps(a.d[rb]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), d, acc[r]);
            if (BITS == 4) {
                acc[r] = _mm512_fmadd_ps(wm, _mm512_set1_ps(a.s[rb]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm512_storeu_ps(out + (size_t)(m0 + r) * ldo + (size_t)t * TILE, acc[r]);
    }
}

#else

// Output column n of input rows m0 .. m0 + R. A weight block is unpacked once for the R rows.
// Each row sums its blocks in order in one accumulator (few enough registers for four rows, none
// spilled), the same order whatever R is: a row's result never depends on the rows beside it.
template <int R, int BITS>
void rows_of(const QWeight& w, int n, const Acts& a, int m0, float* out, int ldo) {
    const int nb = w.k / QK;
    const int block_bytes = BITS == 4 ? QK / 2 : QK;
    const uint8_t* codes = w.codes + (size_t)n * nb * block_bytes;
    const float* scale = w.scale + (size_t)n * nb;
    const int8_t* xq = a.q.data() + (size_t)m0 * nb * QK;
    const float* xd = a.d.data() + (size_t)m0 * nb;
    __m256 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
    }
    __m256i sign = _mm256_setzero_si256();
    for (int b = 0; b < nb; b++) {
        __m256i wv = load_block<BITS>(codes + b * block_bytes, &sign);
        __m256 ws = _mm256_broadcast_ss(scale + b);
        for (int r = 0; r < R; r++) {
            __m256 d = _mm256_mul_ps(ws, _mm256_broadcast_ss(xd + (size_t)r * nb + b));
            __m256 p = dot_block<BITS>(wv, sign, xq + (size_t)r * nb * QK + b * QK);
            acc[r] = _mm256_fmadd_ps(p, d, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        store_row<BITS>(hsum(acc[r]), w, a, n, m0 + r, out, ldo);
    }
}

// Four bytes of a row's codes as one 32-bit lane, repeated in every lane.
inline __m256i four_of(const void* x) {
    int32_t four;
    memcpy(&four, x, 4);
    return _mm256_set1_epi32(four);
}

// The integer dot products of a tile's block of 4-bit codes with R rows' blocks x[r] (one column a
// lane). The block is four 32-byte vectors; byte 4 j + i of vector h holds column j's inputs
// 4 h + i (low nibble) and 16 + 4 h + i (high nibble). Each vector is unpacked once and used by
// every row at once, so the rows' sums stay in registers. Without VNNI, maddubs pairs (at most
// 2 * 15 * 127) add up over the block in 16 bits (at most 30480, no overflow) before one madd
// widens them.
template <int R>
inline void tile_dots4(const uint8_t* codes, const int8_t* const* x, __m256i* dot) {
    const __m256i low_bits = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; r++) {
        dot[r] = _mm256_setzero_si256();
    }
    for (int h = 0; h < 4; h++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(codes + h * 32));
        __m256i low = _mm256_and_si256(v, low_bits);
        __m256i high = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_bits);
        for (int r = 0; r < R; r++) {
#ifdef __AVXVNNI__
            dot[r] = _mm256_dpbusd_avx_epi32(dot[r], low, four_of(x[r] + 4 * h));
            dot[r] = _mm256_dpbusd_avx_epi32(dot[r], high, four_of(x[r] + 16 + 4 * h));
#else
            __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(low, four_of(x[r] + 4 * h)),
                                             _mm256_maddubs_epi16(high, four_of(x[r] + 16 + 4 * h)));
            dot[r] = _mm256_add_epi16(dot[r], pairs);
#endif
        }
    }
#ifndef __AVXVNNI__
    for (int r = 0; r < R; r++) {
        dot[r] = _mm256_madd_epi16(dot[r], _mm256_set1_epi16(1));
    }
#endif
}

// The same for a tile's block of 8-bit codes (eight 32-byte vectors, inputs 4 g .. 4 g + 3 in
// vector g): the weights' magnitudes times the rows' codes given the weights' signs (pairs at most
// 2 * 128 * 127, no saturation), widened per vector.
template <int R>
inline void tile_dots8(const uint8_t* codes, const int8_t* const* x, __m256i* dot) {
    for (int r = 0; r < R; r++) {
        dot[r] = _mm256_setzero_si256();
    }
    for (int g = 0; g < 8; g++) {
        __m256i sign = _mm256_loadu_si256((const __m256i*)(codes + g * 32));
        __m256i magnitude = _mm256_sign_epi8(sign, sign);
        for (int r = 0; r < R; r++) {
            __m256i xv = _mm256_sign_epi8(four_of(x[r] + 4 * g), sign);
#ifdef __AVXVNNI__
            dot[r] = _mm256_dpbusd_avx_epi32(dot[r], magnitude, xv);
#else
            __m256i pairs = _mm256_maddubs_epi16(magnitude, xv);
            dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
#endif
        }
    }
}

// Columns 8 t .. 8 t + 7 of input rows m0 .. m0 + R, from weights in tiles of 8 columns
// (cpu_blocks.py: tile_codes): a 32-bit lane is a column, fed four inputs of a row at once, so a
// row of a block costs eight multiplies and one conversion to float for all 8 columns, where the
// column kernel takes a multiply, a widening, a conversion and a scale per column. The weights are
// unpacked once for the R rows. Each row sums its blocks in order in its own accumulator, whatever
// R is, and no lane is summed across.
template <int R, int BITS>
void tile_rows(const QWeight& w, int t, const Acts& a, int m0, float* out, int ldo) {
    const int nb = w.k / QK;
    const int block_bytes = BITS == 4 ? QK / 2 : QK;
    const uint8_t* codes = w.codes + (size_t)t * nb * TILE * block_bytes;
    const float* scale = w.scale + (size_t)t * nb * TILE;
    const float* mins = nullptr;
    if (BITS == 4) {
        mins = w.min + (size_t)t * nb * TILE;
    }
    const uint16_t* half = nullptr;
    if (BITS == 4 && w.half != nullptr) {
        half = w.half + (size_t)t * nb * 2 * TILE;
    }
    __m256 acc[R];
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const int8_t* x[R];
        for (int r = 0; r < R; r++) {
            x[r] = a.q.data() + ((size_t)(m0 + r) * nb + b) * QK;
        }
        __m256i dot[R];
        if (BITS == 4) {
            tile_dots4<R>(codes + (size_t)b * TILE * block_bytes, x, dot);
        } else {
            tile_dots8<R>(codes + (size_t)b * TILE * block_bytes, x, dot);
        }
        __m256 ws;
        __m256 wm = _mm256_setzero_ps();
        if (half != nullptr) {
            __m256i both = _mm256_loadu_si256((const __m256i*)(half + (size_t)b * 2 * TILE));
            ws = _mm256_cvtph_ps(_mm256_castsi256_si128(both));
            wm = _mm256_cvtph_ps(_mm256_extracti128_si256(both, 1));
        } else {
            ws = _mm256_loadu_ps(scale + (size_t)b * TILE);
            if (BITS == 4) {
                wm = _mm256_loadu_ps(mins + (size_t)b * TILE);
            }
        }
        for (int r = 0; r < R; r++) {
            size_t rb = (size_t)(m0 + r) * nb + b;
            __m256 d = _mm256_mul_ps(ws, _mm256_set1_ps(a.d[rb]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r]), d, acc[r]);
            if (BITS == 4) {
                acc[r] = _mm256_fmadd_ps(wm, _mm256_set1_ps(a.s[rb]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out + (size_t)(m0 + r) * ldo + (size_t)t * TILE, acc[r]);
    }
}

#endif  // __AVX512VNNI__

// Rows [m0, m1) of the tile t: eight at a time, then the rest in one call.
template <int BITS>
void tile(const QWeight& w, int t, const Acts& a, int m0, int m1, float* out, int ldo) {
    int m = m0;
    for (; m + 8 <= m1; m += 8) {
        tile_rows<8, BITS>(w, t, a, m, out, ldo);
    }
    switch (m1 - m) {
        case 7: tile_rows<7, BITS>(w, t, a, m, out, ldo); break;
        case 6: tile_rows<6, BITS>(w, t, a, m, out, ldo); break;
        case 5: tile_rows<5, BITS>(w, t, a, m, out, ldo); break;
        case 4: tile_rows<4, BITS>(w, t, a, m, out, ldo); break;
        case 3: tile_rows<3, BITS>(w, t, a, m, out, ldo); break;
        case 2: tile_rows<2, BITS>(w, t, a, m, out, ldo); break;
        case 1: tile_rows<1, BITS>(w, t, a, m, out, ldo); break;
        default: break;
    }
}

// Rows [m0, m1) of the column n: four at a time, then three (a verify step with two drafts) or two,
// then one.
template <int BITS>
void column(const QWeight& w, int n, const Acts& a, int m0, int m1, float* out, int ldo) {
    int m = m0;
    for (; m + 4 <= m1; m += 4) {
        rows_of<4, BITS>(w, n, a, m, out, ldo);
    }
    if (m + 3 == m1) {
        rows_of<3, BITS>(w, n, a, m, out, ldo);
        return;
    }
    for (; m + 2 <= m1; m += 2) {
        rows_of<2, BITS>(w, n, a, m, out, ldo);
    }
    for (; m < m1; m++) {
        rows_of<1, BITS>(w, n, a, m, out, ldo);
    }
}

// Rows of input per pass over the weight: a pass keeps its activations in cache.
const int ROW_CHUNK = 64;

// out [m, n] = a (rounded rows) times w, threads splitting the output columns: each thread takes
// the same columns of every chunk of rows and goes on to the next chunk without waiting.
void gemm(const QWeight& w, const Acts& a, int m, float* out) {
#pragma omp parallel
    for (int m0 = 0; m0 < m; m0 += ROW_CHUNK) {
        int m1 = m0 + ROW_CHUNK;
        if (m1 > m) {
            m1 = m;
        }
        if (w.tiled) {
#pragma omp for schedule(static) nowait
            for (int t = 0; t < w.n / TILE; t++) {
                if (w.bits == 4) {
                    tile<4>(w, t, a, m0, m1, out, w.n);
                } else {
                    tile<8>(w, t, a, m0, m1, out, w.n);
                }
            }
            continue;
        }
#pragma omp for schedule(static) nowait
        for (int n = 0; n < w.n; n++) {
            if (w.bits == 4) {
                column<4>(w, n, a, m0, m1, out, w.n);
            } else {
                column<8>(w, n, a, m0, m1, out, w.n);
            }
        }
    }
}

void add_bias(float* x, const float* bias, int m, int n) {
    if (bias == nullptr) {
        return;
    }
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < n; j++) {
            x[(size_t)i * n + j] += bias[j];
        }
    }
}

// Rotate-half rotary of one head in place: x * cos + swap_halves(x) * sin (signed tables).
void rotate(float* x, const float* cos, const float* sin, int head_dim) {
    int half = head_dim / 2;
    float tmp[512];
    for (int j = 0; j < half; j++) {
        tmp[j] = x[j] * cos[j] + x[j + half] * sin[j];
        tmp[j + half] = x[j + half] * cos[j + half] + x[j] * sin[j + half];
    }
    memcpy(x, tmp, sizeof(float) * head_dim);
}

// q, k rotated, k and v written to the cache: qkv [T, q + 2 kv].
void rotate_and_store(const Model& md, const Layer& ly, const Step& s, float* qkv) {
    int hd = md.head_dim;
    int width = (md.num_heads + 2 * md.num_kv_heads) * hd;
#pragma omp parallel for if (s.num_tokens >= PARALLEL_ROWS)
    for (int t = 0; t < s.num_tokens; t++) {
        float* row = qkv + (size_t)t * width;
        const float* cos = md.cos + s.positions[t] * hd;
        const float* sin = md.sin + s.positions[t] * hd;
        for (int h = 0; h < md.num_heads + md.num_kv_heads; h++) {
            rotate(row + h * hd, cos, sin, hd);
        }
        if (s.slots[t] < 0) {
            continue;
        }
        size_t kv_size = (size_t)md.num_kv_heads * hd;
        const float* k = row + md.num_heads * hd;
        memcpy(ly.k_cache + s.slots[t] * kv_size, k, sizeof(float) * kv_size);
        memcpy(ly.v_cache + s.slots[t] * kv_size, k + kv_size, sizeof(float) * kv_size);
    }
}

void silu_mul(const float* gate_up, int m, int inter, float* out) {
    __m256 one = _mm256_set1_ps(1.0f);
#pragma omp parallel for if (m >= PARALLEL_ROWS)
    for (int i = 0; i < m; i++) {
        const float* gate = gate_up + (size_t)i * 2 * inter;
        const float* up = gate + inter;
        float* dst = out + (size_t)i * inter;
        for (int j = 0; j < inter; j += 8) {
            __m256 g = _mm256_loadu_ps(gate + j);
            __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(dst + j, _mm256_mul_ps(silu, _mm256_loadu_ps(up + j)));
        }
    }
}

void add_into(float* x, const float* y, size_t count) {
    for (size_t i = 0; i < count; i++) {
        x[i] += y[i];
    }
}

}  // namespace

namespace blocks {

// d: a multiple of 8 (of 32: the hidden size of block weights).
void rms_norm(const float* x, const float* weight, int m, int d, float eps, float* out) {
#pragma omp parallel for if (m >= PARALLEL_ROWS)
    for (int i = 0; i < m; i++) {
        const float* row = x + (size_t)i * d;
        __m256 squares = _mm256_setzero_ps();
        for (int j = 0; j < d; j += 8) {
            __m256 v = _mm256_loadu_ps(row + j);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        float inv = 1.0f / sqrtf(hsum(squares) / (float)d + eps);
        for (int j = 0; j < d; j++) {
            out[(size_t)i * d + j] = row[j] * inv * weight[j];
        }
    }
}

void project(const QWeight& w, const float* x, int m, Acts& acts, float* out) {
    quantize_rows(x, m, w.k, acts);
#ifdef __AVX512VNNI__
    if (w.tiled && w.bits == 8) {
        unsigned_codes(acts);
    }
#endif
    gemm(w, acts, m, out);
}

void layer_forward(const Model& md, const Layer& ly, const Step& s, float* x, Buffers& b) {
    int T = s.num_tokens;
    int H = md.hidden;
    int q_size = md.num_heads * md.head_dim;
    b.normed.resize((size_t)T * H);
    b.qkv.resize((size_t)T * ly.qkv.n);
    b.attn.resize((size_t)T * q_size);
    b.proj.resize((size_t)T * H);
    b.gate_up.resize((size_t)T * 2 * md.intermediate);
    b.act.resize((size_t)T * md.intermediate);

    rms_norm(x, ly.input_norm, T, H, md.eps, b.normed.data());
    project(ly.qkv, b.normed.data(), T, b.acts, b.qkv.data());
    add_bias(b.qkv.data(), ly.qkv_bias, T, ly.qkv.n);
    rotate_and_store(md, ly, s, b.qkv.data());
    blocks::attend(md, ly, s, b.qkv.data(), b.attn.data());
    project(ly.o, b.attn.data(), T, b.acts, b.proj.data());
    add_bias(b.proj.data(), ly.o_bias, T, H);
    add_into(x, b.proj.data(), (size_t)T * H);

    rms_norm(x, ly.post_norm, T, H, md.eps, b.normed.data());
    project(ly.gate_up, b.normed.data(), T, b.acts, b.gate_up.data());
    silu_mul(b.gate_up.data(), T, md.intermediate, b.act.data());
    project(ly.down, b.act.data(), T, b.acts, b.proj.data());
    add_into(x, b.proj.data(), (size_t)T * H);
}

}  // namespace blocks

extern "C" {

using blocks::Acts;
using blocks::Buffers;
using blocks::project;
using blocks::layer_forward;

// out [m, w.n] = x [m, w.k] times the block weight w (x rounded to 8-bit blocks first).
void mtp_linear(const float* x, int32_t m, const QWeight* w, float* out) {
    Acts acts;
    project(*w, x, m, acts, out);
}

// Rows of x [m, k] rounded to 8-bit blocks and back: what the kernels multiply (for tests).
void mtp_round_rows(const float* x, int32_t m, int32_t k, float* out) {
    Acts acts;
    quantize_rows(x, m, k, acts);
    for (size_t i = 0; i < (size_t)m * k; i++) {
        out[i] = acts.q[i] * acts.d[i / QK];
    }
}

// Columns per tile of a tiled weight (cpu_blocks.py: tile_codes): 16 with AVX-512 VNNI, else 8.
int32_t mtp_tile_width() {
    return TILE;
}

// Whether 8-bit tiled weights carry their start sums (-128 times each block's code sum) in min:
// the AVX-512 VNNI kernel multiplies unsigned activations (q + 128) by the signed codes.
int32_t mtp_tile_starts() {
#ifdef __AVX512VNNI__
    return 1;
#else
    return 0;
#endif
}

// Every decoder layer of md over the step's tokens: x [T, hidden], the residual stream, in place.
void mtp_decoder_layers(const Model* md, const Step* s, float* x) {
    Buffers buffers;
    for (int i = 0; i < md->num_layers; i++) {
        layer_forward(*md, md->layers[i], *s, x, buffers);
    }
}

}  // extern "C"
