// The draft steps of one MTP layer in one call: for each draft step, the token embedding,
// enorm / hnorm, eh_proj, the decoder block over the paged MTP KV, the head over the draft
// vocabulary and its argmax, or, sampling, q (temperature, top-k, top-p, min-p) and the exponential
// race of engine/noise.py. On a 2-core CPU a draft step's ~20 PyTorch ops and their Python cost more
// than its weights; here a step costs what its projections cost.
//
// Step 0 runs the MTP layer over the positions the main model computed (several a request: its
// last verified token and the accepted drafts, or a prompt chunk); its last row per request
// continues. Step s (1 ..) reads row r's draft s - 1 at rotary position last + s + 1 and writes
// the MTP KV at position last + s, as the per-step path does (engine/models/mtp.py).

#include <algorithm>

#include "blocks.h"

extern "C" {

struct DraftLayer {
    const float* enorm;          // [hidden]
    const float* hnorm;          // [hidden]
    QWeight eh_proj;             // [hidden, 2 hidden]
    const float* shared_norm;    // [hidden]
    QWeight embed;               // [vocab, hidden]: the token embeddings, read row by row
    QWeight head;                // [draft vocab, hidden]
    const int64_t* vocab_ids;    // [head.n]: the token of each head row; null: the row itself
    int32_t hidden_first;        // eh_proj reads [hnorm(h), enorm(e)]
    int32_t post_norm_feedback;  // the next step reads shared_norm(y), not y
};

// How each request of a draft call picks its drafts.
struct DraftSampling {
    const float* temperatures;  // [m]: 0 greedy (the argmax), else the race over q
    const int32_t* top_k;       // [m]: q's top-k, 0 off (null: off for all)
    const float* top_p;         // [m]: q's top-p, 1 off
    const float* min_p;         // [m]: q's min-p, 0 off
    const int64_t* keys;        // [m, width, 2]: the keys of the race of each request's draft j
    float* probs;               // [m, width, head.n]: the q each sampled draft was drawn from, or null
};

}  // extern "C"

namespace {

using blocks::Acts;
using blocks::Buffers;

// Row `token`'s codes, scales and minimums (4 bits) of a tiled weight, gathered into rows' order.
void untile_row(const QWeight& w, int64_t token, std::vector<uint8_t>& codes,
                std::vector<float>& scale, std::vector<float>& mins) {
    int nb = w.k / QK;
    int block_bytes = w.bits == 4 ? QK / 2 : QK;
    int64_t t = token / TILE;
    int j = token % TILE;
    codes.resize((size_t)nb * block_bytes);
    scale.resize(nb);
    mins.resize(nb);
    for (int b = 0; b < nb; b++) {
        size_t tb = (size_t)t * nb + b;
        for (int g = 0; g < block_bytes / 4; g++) {
            memcpy(&codes[b * block_bytes + 4 * g], w.codes + ((tb * block_bytes / 4 + g) * TILE + j) * 4, 4);
        }
        scale[b] = w.scale[tb * TILE + j];
        if (w.bits == 4) {
            mins[b] = w.min[tb * TILE + j];
        }
    }
}

// Row `token` of an embedding stored as a block weight, dequantized into out [w.k]: code times
// scale, rounded, plus the minimum, as kernels/quant.py dequantizes (no fused multiply-add).
__attribute__((optimize("fp-contract=off"))) void embed_row(const QWeight& w, int64_t token, float* out) {
    int nb = w.k / QK;
    const uint8_t* codes = w.codes + token * (w.k * w.bits / 8);
    const float* scale = w.scale + token * nb;
    const float* mins = nullptr;
    if (w.bits == 4) {
        mins = w.min + token * nb;
    }
    std::vector<uint8_t> tiled_codes;
    std::vector<float> tiled_scale, tiled_mins;
    if (w.tiled) {
        untile_row(w, token, tiled_codes, tiled_scale, tiled_mins);
        codes = tiled_codes.data();
        scale = tiled_scale.data();
        mins = tiled_mins.data();
    }
    if (w.bits == 8) {
        for (int j = 0; j < w.k; j++) {
            out[j] = (float)(int8_t)codes[j] * scale[j / QK];
        }
        return;
    }
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < QK / 2; j++) {
            uint8_t byte = codes[b * QK / 2 + j];
            out[b * QK + j] = (float)(byte & 0x0F) * scale[b] + mins[b];
            out[b * QK + j + QK / 2] = (float)(byte >> 4) * scale[b] + mins[b];
        }
    }
}

// The index of the largest of count floats (the first one on ties, as torch.argmax).
int64_t argmax(const float* x, int count) {
    int64_t best = 0;
    for (int i = 1; i < count; i++) {
        if (x[i] > x[best]) {
            best = i;
        }
    }
    return best;
}

struct DraftBuffers {
    std::vector<float> normed, logits, embeds, pair;
    Acts acts;
    Buffers block;
};

// The cache slot of KV position kv of request r (row r of s's block tables).
inline int64_t slot_of(const Step& s, int r, int64_t kv) {
    const int32_t* table = s.block_tables + (size_t)r * s.bt_stride;
    return (int64_t)table[kv / s.block_size] * s.block_size + kv % s.block_size;
}

// Row `column` of the draft head as a token id.
inline int64_t token_of(const DraftLayer& dl, int64_t column) {
    if (dl.vocab_ids == nullptr) {
        return column;
    }
    return dl.vocab_ids[column];
}

// Top-k, then top-p, of logits x [n] as engine/truncation.py cuts them: the dropped ones set to
// -inf. Top-k keeps every logit tied with the k-th largest; top-p keeps the tokens, in descending
// order (ties by column), whose mass before them under the top-k renormalized distribution is below
// top_p; the largest always stays. Returns whether any is dropped.
bool cut_logits(float* x, int n, int top_k, float top_p) {
    bool k_on = top_k > 0 && top_k < n;
    bool p_on = top_p < 1.0f;
    if (!k_on && !p_on) {
        return false;
    }
    std::vector<int> order(n);
    for (int j = 0; j < n; j++) {
        order[j] = j;
    }
    std::sort(order.begin(), order.end(), [x](int a, int b) {
        return x[a] > x[b] || (x[a] == x[b] && a < b);
    });
    if (k_on) {
        float kth = x[order[top_k - 1]];
        for (int j = 0; j < n; j++) {
            if (x[j] < kth) {
                x[j] = -INFINITY;
            }
        }
    }
    if (!p_on) {
        return true;
    }
    float most = x[order[0]];
    double total = 0.0;
    for (int j = 0; j < n; j++) {
        total += exp((double)x[j] - most);
    }
    double before = 0.0;
    for (int i = 0; i < n; i++) {
        int c = order[i];
        if (i > 0 && before >= top_p) {
            x[c] = -INFINITY;
            continue;
        }
        before += exp((double)x[c] - most) / total;
    }
    return true;
}

// Softmax of logits x [n] in place, the -inf ones 0.
void softmax(float* x, int n, bool truncated) {
    float most = blocks::max_of(x, n);
    float total = 0.0f;
    if (truncated) {
        for (int j = 0; j < n; j++) {
            if (x[j] == -INFINITY) {
                x[j] = 0.0f;
            } else {
                x[j] = expf(x[j] - most);
            }
            total += x[j];
        }
    } else {
        total = blocks::exp_shifted(x, n, most);
    }
    float inv = 1.0f / total;
    for (int j = 0; j < n; j++) {
        x[j] *= inv;
    }
}

// Probabilities q [n] below min_p times the largest set to 0, the rest renormalized.
void keep_min_p(float* q, int n, float min_p) {
    float threshold = min_p * blocks::max_of(q, n);
    float total = 0.0f;
    for (int j = 0; j < n; j++) {
        if (q[j] < threshold) {
            q[j] = 0.0f;
        }
        total += q[j];
    }
    for (int j = 0; j < n; j++) {
        q[j] /= total;
    }
}

// The column drawn from logits [n] of request r's draft `step`: q as engine/sampler.py
// processed_probs makes it (the temperature, top-k and top-p, softmax, min-p) in place, kept in
// sp.probs if asked, then the race over q keyed on the request's keys for this draft.
int64_t sample_column(const DraftLayer& dl, const DraftSampling& sp, int r, int step, int width,
                      float* logits) {
    int n = dl.head.n;
    float temperature = sp.temperatures[r];
    for (int j = 0; j < n; j++) {
        logits[j] /= temperature;
    }
    bool truncated = false;
    if (sp.top_k != nullptr) {
        truncated = cut_logits(logits, n, sp.top_k[r], sp.top_p[r]);
    }
    softmax(logits, n, truncated);
    if (sp.min_p != nullptr && sp.min_p[r] > 0.0f) {
        keep_min_p(logits, n, sp.min_p[r]);
    }
    size_t at = (size_t)r * width + step;
    if (sp.probs != nullptr) {
        memcpy(sp.probs + at * n, logits, sizeof(float) * n);
    }
    uint32_t key0 = (uint32_t)sp.keys[2 * at];
    uint32_t key1 = (uint32_t)sp.keys[2 * at + 1];
    return blocks::race_row(logits, dl.vocab_ids, n, key0, key1);
}

// tokens[i] = the draft `step` of request rows[i] from its fed-back state y[i] (n rows): the
// argmax of its draft logits, or a draw from them (DraftSampling). With conf, conf[i] = the head's
// probability of its likeliest token: the softmax's largest (greedy) or q's largest (sampled).
void choose(const Model& md, const DraftLayer& dl, const DraftSampling& sp, const float* y,
            const int32_t* rows, int n, int step, int width, DraftBuffers& b, int64_t* tokens,
            float* conf) {
    int H = md.hidden;
    int N = dl.head.n;
    const float* normed = y;
    if (!dl.post_norm_feedback) {
        b.normed.resize((size_t)n * H);
        blocks::rms_norm(y, dl.shared_norm, n, H, md.eps, b.normed.data());
        normed = b.normed.data();
    }
    b.logits.resize((size_t)n * N);
    blocks::project(dl.head, normed, n, b.acts, b.logits.data());
    for (int i = 0; i < n; i++) {
        float* logits = b.logits.data() + (size_t)i * N;
        int r = rows[i];
        if (sp.temperatures == nullptr || sp.temperatures[r] <= 0.0f) {
            int64_t column = argmax(logits, N);
            tokens[i] = token_of(dl, column);
            if (conf != nullptr) {
                conf[i] = 1.0f / blocks::exp_shifted(logits, N, logits[column]);
            }
        } else {
            tokens[i] = token_of(dl, sample_column(dl, sp, r, step, width, logits));
            if (conf != nullptr) {
                conf[i] = blocks::max_of(logits, N);
            }
        }
    }
}

// x [m, hidden] = eh_proj of the normed embeddings of tokens and the normed states y.
void block_input(const Model& md, const DraftLayer& dl, const int64_t* tokens, const float* y,
                 int m, DraftBuffers& b, float* x) {
    int H = md.hidden;
    b.embeds.resize((size_t)m * H);
    b.pair.resize((size_t)m * 2 * H);
    for (int i = 0; i < m; i++) {
        embed_row(dl.embed, tokens[i], b.embeds.data() + (size_t)i * H);
    }
    int e_at = dl.hidden_first ? H : 0;
    int h_at = H - e_at;
    for (int i = 0; i < m; i++) {
        float* row = b.pair.data() + (size_t)i * 2 * H;
        blocks::rms_norm(b.embeds.data() + (size_t)i * H, dl.enorm, 1, H, md.eps, row + e_at);
        blocks::rms_norm(y + (size_t)i * H, dl.hnorm, 1, H, md.eps, row + h_at);
    }
    blocks::project(dl.eh_proj, b.pair.data(), m, b.acts, x);
}

// Whether request r's chain goes on after its draft `step`: the running product of the head's
// confidences (`chain`) stays at or above p_min (0: always). A draft that takes it below is
// dropped and num_drafts[r] becomes the drafts kept.
bool keep_draft(float p_min, float conf, int r, int step, float* chain, int32_t* num_drafts) {
    if (p_min <= 0.0f) {
        return true;
    }
    chain[r] *= conf;
    if (chain[r] >= p_min) {
        return true;
    }
    num_drafts[r] = step;
    return false;
}

// The drafts of the rows r with num_drafts[r] > 0 (mtp_propose's drafts): y [m, hidden] each
// request's fed-back state after step 0 (overwritten), last [m] the KV position of its last
// computed token. A chain stops early where keep_draft says so.
void draft_loop(const Model& md, const DraftLayer& dl, const DraftSampling& sp, const Step& s,
                float* y, const int64_t* last, int32_t* num_drafts, int m, int width,
                float p_min, DraftBuffers& b, int64_t* drafts) {
    int H = md.hidden;
    std::vector<int32_t> rows;  // the requests still drafting, in order
    for (int r = 0; r < m; r++) {
        if (num_drafts[r] > 0) {
            rows.push_back(r);
        }
    }
    int n = (int)rows.size();
    if (n == 0) {
        return;
    }
    std::vector<int64_t> tokens(n);
    std::vector<float> x, ys((size_t)n * H), conf(n), chain(m, 1.0f);
    float* confs = p_min > 0.0f ? conf.data() : nullptr;
    for (int i = 0; i < n; i++) {
        memcpy(ys.data() + (size_t)i * H, y + (size_t)rows[i] * H, sizeof(float) * H);
    }
    choose(md, dl, sp, ys.data(), rows.data(), n, 0, width, b, tokens.data(), confs);
    for (int i = 0; i < n; i++) {
        if (keep_draft(p_min, conf[i], rows[i], 0, chain.data(), num_drafts)) {
            drafts[(size_t)rows[i] * width] = tokens[i];
        }
    }
    std::vector<int64_t> positions, kv_positions, slots;
    for (int step = 1; step < width; step++) {
        std::vector<int32_t> still;
        for (int32_t r : rows) {
            if (num_drafts[r] > step) {
                still.push_back(r);
            }
        }
        rows = still;
        n = (int)rows.size();
        if (n == 0) {
            break;
        }
        ys.resize((size_t)n * H);
        positions.resize(n);
        kv_positions.resize(n);
        slots.resize(n);
        for (int i = 0; i < n; i++) {
            int r = rows[i];
            tokens[i] = drafts[(size_t)r * width + step - 1];
            memcpy(ys.data() + (size_t)i * H, y + (size_t)r * H, sizeof(float) * H);
            int64_t kv = last[r] + step;
            kv_positions[i] = kv;
            positions[i] = kv + 1;
            slots[i] = slot_of(s, r, kv);
        }
        x.resize((size_t)n * H);
        block_input(md, dl, tokens.data(), ys.data(), n, b, x.data());
        Step st = {n, positions.data(), kv_positions.data(), slots.data(), rows.data(),
                   s.block_tables, s.bt_stride, s.block_size};
        blocks::layer_forward(md, md.layers[0], st, x.data(), b.block);
        if (dl.post_norm_feedback) {
            blocks::rms_norm(x.data(), dl.shared_norm, n, H, md.eps, x.data());
        }
        choose(md, dl, sp, x.data(), rows.data(), n, step, width, b, tokens.data(), confs);
        for (int i = 0; i < n; i++) {
            int r = rows[i];
            memcpy(y + (size_t)r * H, x.data() + (size_t)i * H, sizeof(float) * H);
            if (keep_draft(p_min, conf[i], r, step, chain.data(), num_drafts)) {
                drafts[(size_t)r * width + step] = tokens[i];
            }
        }
    }
}

}  // namespace

extern "C" {

// Draft step 0 and the drafts of m requests in one call: the MTP layer over the lengths[r]
// positions from starts[r] on that the main model computed for request r (hidden [T, hidden] its
// states there, tokens [T] the token after each), writing their MTP KV, then drafts [m, width], row
// r's first num_drafts[r] filled (none where it is 0: it only fills its KV), each picked as sp
// says; with p_min > 0 a chain stops where the product of the head's confidences in its drafts
// falls below p_min, and num_drafts[r] becomes the drafts made. md: the MTP layer's decoder block
// (one layer) over its KV cache; s: block_tables and block_size (one row per request) only.
void mtp_propose(const Model* md, const DraftLayer* dl, const DraftSampling* sp, const Step* s,
                 const float* hidden, const int64_t* tokens, const int64_t* starts,
                 const int32_t* lengths, int32_t* num_drafts, int32_t m, int32_t width,
                 float p_min, int64_t* drafts) {
    int H = md->hidden;
    DraftBuffers b;
    std::vector<int64_t> positions, kv_positions, slots, last(m);
    std::vector<int32_t> token_seq;
    for (int r = 0; r < m; r++) {
        for (int i = 0; i < lengths[r]; i++) {
            int64_t kv = starts[r] + i;
            kv_positions.push_back(kv);
            positions.push_back(kv + 1);
            slots.push_back(slot_of(*s, r, kv));
            token_seq.push_back(r);
        }
        last[r] = starts[r] + lengths[r] - 1;
    }
    int T = (int)positions.size();
    std::vector<float> x((size_t)T * H);
    block_input(*md, *dl, tokens, hidden, T, b, x.data());
    Step st = {T, positions.data(), kv_positions.data(), slots.data(), token_seq.data(),
               s->block_tables, s->bt_stride, s->block_size};
    blocks::layer_forward(*md, md->layers[0], st, x.data(), b.block);
    std::vector<float> y((size_t)m * H);
    int64_t end = -1;
    for (int r = 0; r < m; r++) {
        end += lengths[r];
        memcpy(y.data() + (size_t)r * H, x.data() + (size_t)end * H, sizeof(float) * H);
    }
    if (dl->post_norm_feedback) {
        blocks::rms_norm(y.data(), dl->shared_norm, m, H, md->eps, y.data());
    }
    draft_loop(*md, *dl, *sp, *s, y.data(), last.data(), num_drafts, m, width, p_min, b,
               drafts);
}

// Rows ids [n] of an embedding stored as a block weight, dequantized into out [n, w.k].
void mtp_embed_rows(const QWeight* w, const int64_t* ids, int32_t n, float* out) {
    for (int32_t i = 0; i < n; i++) {
        embed_row(*w, ids[i], out + (size_t)i * w->k);
    }
}

}  // extern "C"
