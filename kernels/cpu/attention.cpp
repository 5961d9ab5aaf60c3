// Attention of a step's queries over the paged KV cache, for the one-call decoder (blocks.cpp).
//
// A query head attends to keys 0 .. its KV position of its sequence, block by block of the cache:
// scaled dot products (8 keys at a time, then one by one), a softmax, the values weighted in key
// order. Each query's arithmetic depends only on its position, never on the other tokens of the
// step, so verify rows equal one-row steps bit for bit.
//
// The queries of a step are ordered so that those sharing key and value reads come together: by
// sequence, then KV group (the group's query heads and a verify step's rows). A thread takes a
// stretch of that order and goes through the cache once per group, each block's keys and values
// used by every query of the group while they are in the L1 cache. At long contexts the keys and
// values are most of what a step reads, and a verify step's extra rows cost little more reading.

#include "blocks.h"

#include <omp.h>

#include <algorithm>

namespace {

using blocks::exp_shifted;
using blocks::hsum;
using blocks::max_of;

#ifdef __AVX512F__
// A 16-lane sum as 8 lanes: its halves added.
inline __m256 fold(__m512 v) {
    __m256 high = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    return _mm256_add_ps(_mm512_castps512_ps256(v), high);
}
#endif

// The products of q and 8 keys (key j at k + j * stride), summed over the head's dims into 8 lanes
// a key, q loaded once for the 8. AVX-512 takes 16 dims an instruction where head_dim allows.
inline void eight_dots(const float* q, const float* k, size_t stride, int head_dim, __m256* acc) {
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        __m512 wide[8];
        for (int j = 0; j < 8; j++) {
            wide[j] = _mm512_setzero_ps();
        }
        for (int d = 0; d < head_dim; d += 16) {
            __m512 qv = _mm512_loadu_ps(q + d);
            for (int j = 0; j < 8; j++) {
                wide[j] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k + j * stride + d), wide[j]);
            }
        }
        for (int j = 0; j < 8; j++) {
            acc[j] = fold(wide[j]);
        }
        return;
    }
#endif
    for (int j = 0; j < 8; j++) {
        acc[j] = _mm256_setzero_ps();
    }
    for (int d = 0; d < head_dim; d += 8) {
        __m256 qv = _mm256_loadu_ps(q + d);
        for (int j = 0; j < 8; j++) {
            acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * stride + d), acc[j]);
        }
    }
}

// The products of q and one key, summed over the head's dims into 8 lanes (as eight_dots).
inline __m256 one_dot(const float* q, const float* k, int head_dim) {
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        __m512 wide = _mm512_setzero_ps();
        for (int d = 0; d < head_dim; d += 16) {
            wide = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_loadu_ps(k + d), wide);
        }
        return fold(wide);
    }
#endif
    __m256 acc = _mm256_setzero_ps();
    for (int d = 0; d < head_dim; d += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), _mm256_loadu_ps(k + d), acc);
    }
    return acc;
}

// q's dot products with 8 keys (key j at k + j * stride), scaled, into scores[0 .. 8): the 8 sums
// are reduced together.
inline void eight_scores(const float* q, const float* k, size_t stride, int head_dim, float scale,
                         float* scores) {
    __m256 acc[8];
    eight_dots(q, k, stride, head_dim, acc);
    __m256 low = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m256 high = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
    __m256 sums = _mm256_add_ps(_mm256_permute2f128_ps(low, high, 0x20),
                                _mm256_permute2f128_ps(low, high, 0x31));
    _mm256_storeu_ps(scores, _mm256_mul_ps(sums, _mm256_set1_ps(scale)));
}

// The scaled dot products of q with the first count keys of a cache block (key i at
// base + i * stride): eight at a time, then one by one. Which way a key goes depends only on its
// index and count, both fixed by the query's position, never on the other tokens of the step.
void block_scores(const float* q, const float* base, size_t stride, int count, int head_dim,
                  float scale, float* scores) {
    int i = 0;
    for (; i + 8 <= count; i += 8) {
        eight_scores(q, base + i * stride, stride, head_dim, scale, scores + i);
    }
    for (; i < count; i++) {
        scores[i] = hsum(one_dot(q, base + i * stride, head_dim)) * scale;
    }
}

// Keys in cache block b of a sequence of len keys, blocks of bs.
inline int keys_in_block(int64_t len, int64_t b, int bs) {
    int64_t left = len - b * bs;
    if (left < bs) {
        return (int)left;
    }
    return bs;
}

// acc[0 .. 8 * LANES) += the values' dims [0, 8 * LANES) of count keys (key i at base + i * stride)
// weighted by probs, key by key in order; one register per 8 dims, so the keys' chains of adds
// overlap. acc goes through memory between blocks of the cache, which leaves its sums as they are.
template <int LANES>
void weighted_block(const float* base, size_t stride, int count, const float* probs, float* acc) {
    __m256 sums[LANES];
    for (int v = 0; v < LANES; v++) {
        sums[v] = _mm256_loadu_ps(acc + v * 8);
    }
    for (int i = 0; i < count; i++) {
        __m256 p = _mm256_set1_ps(probs[i]);
        for (int v = 0; v < LANES; v++) {
            sums[v] = _mm256_fmadd_ps(p, _mm256_loadu_ps(base + i * stride + v * 8), sums[v]);
        }
    }
    for (int v = 0; v < LANES; v++) {
        _mm256_storeu_ps(acc + v * 8, sums[v]);
    }
}

#ifdef __AVX512F__
// As weighted_block, 16 dims a register.
template <int LANES>
void weighted_block16(const float* base, size_t stride, int count, const float* probs,
                      float* acc) {
    __m512 sums[LANES];
    for (int v = 0; v < LANES; v++) {
        sums[v] = _mm512_loadu_ps(acc + v * 16);
    }
    for (int i = 0; i < count; i++) {
        __m512 p = _mm512_set1_ps(probs[i]);
        for (int v = 0; v < LANES; v++) {
            sums[v] = _mm512_fmadd_ps(p, _mm512_loadu_ps(base + i * stride + v * 16), sums[v]);
        }
    }
    for (int v = 0; v < LANES; v++) {
        _mm512_storeu_ps(acc + v * 16, sums[v]);
    }
}
#endif

// acc[0 .. head_dim) += a block's count values (value i at base + i * stride) weighted by probs:
// 64 dims at a time, then the rest (16 at a time with AVX-512 where head_dim allows, else 8).
void weighted_values(const float* base, size_t stride, int count, int head_dim, const float* probs,
                     float* acc) {
    int d0 = 0;
#ifdef __AVX512F__
    if (head_dim % 16 == 0) {
        for (; d0 + 64 <= head_dim; d0 += 64) {
            weighted_block16<4>(base + d0, stride, count, probs, acc + d0);
        }
        for (; d0 < head_dim; d0 += 16) {
            weighted_block16<1>(base + d0, stride, count, probs, acc + d0);
        }
        return;
    }
#endif
    for (; d0 + 64 <= head_dim; d0 += 64) {
        weighted_block<8>(base + d0, stride, count, probs, acc + d0);
    }
    for (; d0 < head_dim; d0 += 8) {
        weighted_block<1>(base + d0, stride, count, probs, acc + d0);
    }
}

// Query heads that share a sequence and a KV group: pairs[0 .. n) (token * num_heads + head).
// They go through the cache block by block, each block's keys and then its values taken by every
// query in turn while the block is in the L1 cache; each query's arithmetic is the same as alone.
void attend_queries(const Model& md, const Layer& ly, const Step& s, const float* qkv,
                    const int* pairs, int n, std::vector<float>& scores, float* out) {
    int hd = md.head_dim;
    int bs = s.block_size;
    int width = (md.num_heads + 2 * md.num_kv_heads) * hd;
    int first_token = pairs[0] / md.num_heads;
    int g = (pairs[0] % md.num_heads) / (md.num_heads / md.num_kv_heads);
    size_t kv_size = (size_t)md.num_kv_heads * hd;
    const int32_t* table = s.block_tables + (size_t)s.token_seq[first_token] * s.bt_stride;
    int64_t longest = 0;
    for (int i = 0; i < n; i++) {
        longest = std::max(longest, s.kv_positions[pairs[i] / md.num_heads] + 1);
    }
    scores.resize((size_t)n * longest);
    for (int64_t b = 0; b * bs < longest; b++) {
        const float* keys = ly.k_cache + (size_t)table[b] * bs * kv_size + g * hd;
        for (int i = 0; i < n; i++) {
            int t = pairs[i] / md.num_heads;
            int64_t len = s.kv_positions[t] + 1;
            if (b * bs >= len) {
                continue;
            }
            const float* q = qkv + (size_t)t * width + (pairs[i] % md.num_heads) * hd;
            float* row = scores.data() + (size_t)i * longest + b * bs;
            block_scores(q, keys, kv_size, keys_in_block(len, b, bs), hd, md.scale, row);
        }
    }
    for (int i = 0; i < n; i++) {
        int64_t len = s.kv_positions[pairs[i] / md.num_heads] + 1;
        float* row = scores.data() + (size_t)i * longest;
        float inv = 1.0f / exp_shifted(row, len, max_of(row, len));
        for (int64_t j = 0; j < len; j++) {
            row[j] *= inv;
        }
        memset(out + (size_t)pairs[i] * hd, 0, sizeof(float) * hd);
    }
    for (int64_t b = 0; b * bs < longest; b++) {
        const float* values = ly.v_cache + (size_t)table[b] * bs * kv_size + g * hd;
        for (int i = 0; i < n; i++) {
            int64_t len = s.kv_positions[pairs[i] / md.num_heads] + 1;
            if (b * bs >= len) {
                continue;
            }
            int count = keys_in_block(len, b, bs);
            const float* probs = scores.data() + (size_t)i * longest + b * bs;
            weighted_values(values, kv_size, count, hd, probs, out + (size_t)pairs[i] * hd);
        }
    }
}

// The step's (token, head) pairs in the order that shares key/value reads: by sequence (a run of
// tokens with the same block table), then query head (a KV group's heads are consecutive), then
// token.
std::vector<int> pairs_by_group(const Model& md, const Step& s) {
    std::vector<int> pairs;
    pairs.reserve((size_t)s.num_tokens * md.num_heads);
    int t0 = 0;
    while (t0 < s.num_tokens) {
        int t1 = t0 + 1;
        while (t1 < s.num_tokens && s.token_seq[t1] == s.token_seq[t0]) {
            t1++;
        }
        for (int h = 0; h < md.num_heads; h++) {
            for (int t = t0; t < t1; t++) {
                pairs.push_back(t * md.num_heads + h);
            }
        }
        t0 = t1;
    }
    return pairs;
}

// Splits the pairs into one stretch a thread, in order, of about equal cost (keys attended to, plus
// a fixed part): thread k takes [bounds[k], bounds[k + 1]).
std::vector<int> stretches(const Model& md, const Step& s, const std::vector<int>& pairs,
                           int threads) {
    std::vector<double> cost(pairs.size() + 1, 0.0);
    for (size_t i = 0; i < pairs.size(); i++) {
        int t = pairs[i] / md.num_heads;
        cost[i + 1] = cost[i] + (double)(s.kv_positions[t] + 1) + 16.0;
    }
    std::vector<int> bounds(threads + 1, (int)pairs.size());
    bounds[0] = 0;
    size_t i = 0;
    for (int k = 1; k < threads; k++) {
        double target = cost.back() * k / threads;
        while (i < pairs.size() && cost[i] < target) {
            i++;
        }
        bounds[k] = (int)i;
    }
    return bounds;
}

// Query heads taken together by attend_queries at most: bounds its scores to this many rows.
const int MAX_QUERIES = 48;

// Whether pairs a and b share a sequence and a KV group.
inline bool same_group(const Model& md, const Step& s, int a, int b) {
    int per_group = md.num_heads / md.num_kv_heads;
    int ta = a / md.num_heads;
    int tb = b / md.num_heads;
    bool same_seq = s.token_seq[ta] == s.token_seq[tb];
    return same_seq && (a % md.num_heads) / per_group == (b % md.num_heads) / per_group;
}

}  // namespace

namespace blocks {

// Attention of every (token, head) pair of the step: out [T, heads * head_dim]. Each thread takes a
// stretch of pairs_by_group's order and goes through it a group (at most MAX_QUERIES pairs) at a
// time, so a sequence's keys and values are read from memory about once per KV group.
void attend(const Model& md, const Layer& ly, const Step& s, const float* qkv, float* out) {
    std::vector<int> pairs = pairs_by_group(md, s);
    int threads = omp_get_max_threads();
    std::vector<int> bounds = stretches(md, s, pairs, threads);
#pragma omp parallel num_threads(threads)
    {
        std::vector<float> scores;
        // a stretch a thread; any the runtime gave no thread of its own go round the others
        for (int k = omp_get_thread_num(); k < threads; k += omp_get_num_threads()) {
            int i = bounds[k];
            while (i < bounds[k + 1]) {
                int j = i + 1;
                while (j < bounds[k + 1] && j - i < MAX_QUERIES &&
                       same_group(md, s, pairs[i], pairs[j])) {
                    j++;
                }
                attend_queries(md, ly, s, qkv, pairs.data() + i, j - i, scores, out);
                i = j;
            }
        }
    }
}

}  // namespace blocks
