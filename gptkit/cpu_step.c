/* One decoding step of a Llama-style GPT on the CPU, in fp32: a token (or the few tokens of a
 * speculative check) in, logits out, the keys and values written into the KV cache.
 * cpu_step.py compiles this file for the CPU it runs on (-march=native) and calls gk_step once
 * per step.
 *
 * Why C: a batch-1 decoding step reads every weight once, so its floor is the time to stream
 * the weights from memory. PyTorch's eager step makes ~56 operator calls per layer, and at a
 * few microseconds each the 30 layers of SmolLM2-135M spent ~4 ms a step beside ~10 ms of
 * matrix-vector products on a 2-core AMD EPYC (AVX-512; ~14 ms on the AVX2 one); Inductor's
 * CPU lowering turns one-row products into loops slower than BLAS. Here the whole step is one call: norms, rope, attention and the SwiGLU are plain
 * loops over a few thousand floats, and the products stream each weight row once, the
 * threads splitting the rows.
 *
 * The model it serves (cpu_step.py checks): pre-norm RMSNorm blocks, rotary positions (the
 * tables come from the model, so any rope variant it builds is served), grouped-query
 * attention, a SwiGLU MLP, optional biases on the linear layers, row-major fp32 weights.
 * Shapes: C = n_embd, H = query heads, Hkv = key/value heads, D = head_dim, I = the MLP's
 * hidden width, V = vocabulary, T = tokens in this call, S = positions attended (pos + T).
 */
#include <math.h>
#include <stddef.h>

typedef struct {
    const float *norm1;          /* [C] */
    const float *qkv_w, *qkv_b;  /* [(H + 2 Hkv) D, C], [(H + 2 Hkv) D] or NULL */
    const float *proj_w, *proj_b;  /* [C, H D], [C] or NULL */
    const float *norm2;          /* [C] */
    const float *fc_w, *fc_b;    /* [2 I, C] (gate rows, then up rows), [2 I] or NULL */
    const float *down_w, *down_b;  /* [C, I], [C] or NULL */
} Layer;

typedef struct {
    int n_layer, C, H, Hkv, D, I, V;
    float eps;                   /* RMSNorm's epsilon */
    const float *emb;            /* [V, C] token embeddings */
    const float *norm_f;         /* [C] */
    const float *head;           /* [V, C] the LM head (the embeddings when tied) */
    const float *cos, *sin;      /* [block_size, D] rope tables, half-split (model.rope_tables) */
    const Layer *layers;         /* [n_layer] */
    /* scratch, owned by the caller, for up to T_max tokens a call */
    float *x;                    /* [T_max, C] the residual stream */
    float *xn;                   /* [T_max, C] a normed copy, or a layer's output */
    float *qkv;                  /* [T_max, (H + 2 Hkv) D] */
    float *att;                  /* [T_max, H D] */
    float *h;                    /* [T_max, 2 I] */
    float *scores;               /* [T_max H, S] S = positions attended, at most */
} Model;

/* The KV cache of one sequence: keys and values of layer l, head g, position t at
 * k + l * layer_stride + g * head_stride + t * D (kv_cache.py's [L, B, Hkv, M, D], one row). */
typedef struct {
    float *k, *v;
    long layer_stride, head_stride;
} Cache;

/* out[r] = w_r . x for the four rows w_r = w + r * ld: four independent sums (the compiler
 * vectorises each), where one sum at a time would wait on its own latency chain. */
static inline void dot4(const float *restrict w, size_t ld, const float *restrict x, int K,
                        float *restrict out) {
    const float *w0 = w, *w1 = w + ld, *w2 = w1 + ld, *w3 = w2 + ld;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (int k = 0; k < K; k++) {
        s0 += w0[k] * x[k];
        s1 += w1[k] * x[k];
        s2 += w2[k] * x[k];
        s3 += w3[k] * x[k];
    }
    out[0] = s0, out[1] = s1, out[2] = s2, out[3] = s3;
}

#ifdef __AVX512F__
#include <immintrin.h>

/* Y[t][r] = w_r . x_t for four rows w of W and four rows x of X (a speculative check's
 * tokens): 16 sums in 16 registers of 16 floats, each load of a weight row's 16 floats used by
 * four products. Written with intrinsics because the compiler's own vectorisation of the same
 * loop in C kept fewer sums in registers (81 GFLOP/s at four rows on a 2-core AMD EPYC). */
static void tile4x4(const float *const w[4], const float *const x[4], int K, float *const y[4]) {
    const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
    __m512 s00 = _mm512_setzero_ps(), s01 = s00, s02 = s00, s03 = s00, s10 = s00, s11 = s00,
           s12 = s00, s13 = s00, s20 = s00, s21 = s00, s22 = s00, s23 = s00, s30 = s00,
           s31 = s00, s32 = s00, s33 = s00;
    for (int k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        const __m512 a0 = _mm512_maskz_loadu_ps(m, w0 + k), a1 = _mm512_maskz_loadu_ps(m, w1 + k);
        const __m512 a2 = _mm512_maskz_loadu_ps(m, w2 + k), a3 = _mm512_maskz_loadu_ps(m, w3 + k);
#define ROW(t)                                                       \
        {                                                            \
            const __m512 b = _mm512_maskz_loadu_ps(m, x[t] + k);     \
            s##t##0 = _mm512_fmadd_ps(a0, b, s##t##0);               \
            s##t##1 = _mm512_fmadd_ps(a1, b, s##t##1);               \
            s##t##2 = _mm512_fmadd_ps(a2, b, s##t##2);               \
            s##t##3 = _mm512_fmadd_ps(a3, b, s##t##3);               \
        }
        ROW(0) ROW(1) ROW(2) ROW(3)
#undef ROW
    }
#define OUT(t)                                                                              \
    y[t][0] = _mm512_reduce_add_ps(s##t##0), y[t][1] = _mm512_reduce_add_ps(s##t##1),       \
    y[t][2] = _mm512_reduce_add_ps(s##t##2), y[t][3] = _mm512_reduce_add_ps(s##t##3);
    OUT(0) OUT(1) OUT(2) OUT(3)
#undef OUT
}
#endif

/* Y = X W^T (+ b) for T rows X [T, K] (row stride ldx), W [N, K] row-major, Y [T, N], inside
 * a parallel region: the threads split W's rows. A block of four rows (4 K floats, in L1) is
 * read from memory once, the next block prefetched meanwhile, and multiplied by every row of X,
 * so a few rows cost little more than one: the weights' streaming bounds both. The implicit
 * barrier at the end of the last loop makes Y complete for every thread on return. */
static void gemm(const float *restrict W, const float *restrict b, const float *restrict X,
                 int ldx, float *restrict Y, int T, int N, int K) {
    const int blocks = N / 4;
#pragma omp for schedule(static) nowait
    for (int blk = 0; blk < blocks; blk++) {
        const float *w0 = W + (size_t)4 * blk * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        if (blk + 1 < blocks)  /* the next block, while this one computes */
            for (int k = 0; k < 4 * K; k += 16) __builtin_prefetch(w0 + 4 * K + k);
        int t = 0;
#ifdef __AVX512F__
        /* tiles of four tokens; the last tile of two or three repeats its last token into a
           discarded output (its products cost less than a second pass over the weights) */
        for (; T - t >= 2; t += 4) {
            const float *w[4] = {w0, w1, w2, w3}, *x[4];
            float *out[4], discard[4];
            for (int j = 0; j < 4; j++) {
                const int row = t + j < T ? t + j : T - 1;
                x[j] = X + (size_t)row * ldx;
                out[j] = t + j < T ? Y + (size_t)(t + j) * N + 4 * blk : discard;
            }
            tile4x4(w, x, K, out);
            if (b)
                for (int j = 0; j < 4 && t + j < T; j++)
                    for (int i = 0; i < 4; i++) out[j][i] += b[4 * blk + i];
        }
        if (t > T) t = T;
#endif
        for (; t + 2 <= T; t += 2) {  /* two rows of X at once: 8 sums, 6 loads per k */
            const float *x = X + (size_t)t * ldx, *z = x + ldx;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0, r0 = 0, r1 = 0, r2 = 0, r3 = 0;
            for (int k = 0; k < K; k++) {
                s0 += w0[k] * x[k], r0 += w0[k] * z[k];
                s1 += w1[k] * x[k], r1 += w1[k] * z[k];
                s2 += w2[k] * x[k], r2 += w2[k] * z[k];
                s3 += w3[k] * x[k], r3 += w3[k] * z[k];
            }
            float *y = Y + (size_t)t * N + 4 * blk, *u = y + N;
            y[0] = s0, y[1] = s1, y[2] = s2, y[3] = s3;
            u[0] = r0, u[1] = r1, u[2] = r2, u[3] = r3;
            if (b)
                for (int i = 0; i < 4; i++) y[i] += b[4 * blk + i], u[i] += b[4 * blk + i];
        }
        for (; t < T; t++) {
            float *y = Y + (size_t)t * N + 4 * blk;
            dot4(w0, K, X + (size_t)t * ldx, K, y);
            if (b)
                for (int i = 0; i < 4; i++) y[i] += b[4 * blk + i];
        }
    }
#pragma omp for schedule(static)
    for (int n = 4 * blocks; n < N; n++)
        for (int t = 0; t < T; t++) {
            float s = b ? b[n] : 0.0f;
            for (int k = 0; k < K; k++) s += W[(size_t)n * K + k] * X[(size_t)t * ldx + k];
            Y[(size_t)t * N + n] = s;
        }
}

static void rmsnorm(const float *restrict x, const float *restrict w, float *restrict out, int C,
                    float eps) {
    float ss = 0;
    for (int i = 0; i < C; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / C + eps);
    for (int i = 0; i < C; i++) out[i] = x[i] * r * w[i];
}

/* x * cos + roll(x, D/2) * sin, the table's sin holding rotate_half's sign (model.apply_rope). */
static void rope(float *restrict x, const float *restrict cos, const float *restrict sin, int D) {
    const int half = D / 2;
    for (int i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        x[i] = a * cos[i] + b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* Query head `head` attends to positions 0..S-1 of its key/value head: softmax(q K^T / sqrt(D)) V. */
static void attend(const float *restrict q, const float *restrict K, const float *restrict V,
                   float *restrict scores, float *restrict out, int S, int D) {
    const float scale = 1.0f / sqrtf((float)D);
    float top = -INFINITY, sum = 0;
    int t = 0;
    for (; t + 4 <= S; t += 4) {  /* four keys at a time */
        dot4(K + (size_t)t * D, D, q, D, scores + t);
        for (int j = t; j < t + 4; j++) scores[j] *= scale;
    }
    for (; t < S; t++) {
        float s = 0;
        for (int i = 0; i < D; i++) s += q[i] * K[(size_t)t * D + i];
        scores[t] = s * scale;
    }
    for (t = 0; t < S; t++) top = scores[t] > top ? scores[t] : top;
    for (t = 0; t < S; t++) sum += scores[t] = expf(scores[t] - top);
    for (int i = 0; i < D; i++) out[i] = 0;
    for (t = 0; t < S; t++) {
        const float p = scores[t] / sum;
        for (int i = 0; i < D; i++) out[i] += p * V[(size_t)t * D + i];
    }
}

/* The logits of T tokens at positions pos..pos+T-1 (only the last one's when last_only):
 * logits [T or 1, V]. Their keys and values go to those columns of `cache`, whose columns
 * 0..pos-1 must hold the sequence so far; each token attends to the columns up to its own. One
 * parallel region for the whole call: the threads meet at barriers, not at a fork per
 * operation. Returns 0, or -1 with nothing written when a token is outside the vocabulary. */
int gk_step(const Model *m, const Cache *cache, const long long *tokens, int T, int pos,
            int last_only, int threads, float *logits) {
    const int C = m->C, H = m->H, Hkv = m->Hkv, D = m->D, I = m->I;
    const int qkv_rows = (H + 2 * Hkv) * D, group = H / Hkv, S = pos + T;
    float *x = m->x, *xn = m->xn, *qkv = m->qkv, *h = m->h;
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->V) return -1;
    for (int t = 0; t < T; t++)
        for (int i = 0; i < C; i++) x[t * C + i] = m->emb[(size_t)tokens[t] * C + i];
#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *L = &m->layers[l];
            float *k = cache->k + l * cache->layer_stride, *v = cache->v + l * cache->layer_stride;
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) rmsnorm(x + t * C, L->norm1, xn + t * C, C, m->eps);
            gemm(L->qkv_w, L->qkv_b, xn, C, qkv, T, qkv_rows, C);
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                /* rotate q and k (the first H + Hkv heads), then write k and v to the cache */
                float *row = qkv + (size_t)t * qkv_rows;
                const size_t at = (size_t)(pos + t) * D;
                for (int head = 0; head < H + Hkv; head++)
                    rope(row + head * D, m->cos + at, m->sin + at, D);
                for (int g = 0; g < Hkv; g++)
                    for (int i = 0; i < D; i++) {
                        k[g * cache->head_stride + at + i] = row[(H + g) * D + i];
                        v[g * cache->head_stride + at + i] = row[(H + Hkv + g) * D + i];
                    }
            }
#pragma omp for schedule(static)
            for (int th = 0; th < T * H; th++) {
                const int t = th / H, head = th % H;
                const long kv = (head / group) * cache->head_stride;
                attend(qkv + (size_t)t * qkv_rows + head * D, k + kv, v + kv,
                       m->scores + (size_t)th * S, m->att + ((size_t)t * H + head) * D,
                       pos + t + 1, D);
            }
            gemm(L->proj_w, L->proj_b, m->att, H * D, xn, T, C, H * D);
#pragma omp for schedule(static)
            for (int t = 0; t < T; t++) {
                for (int i = 0; i < C; i++) x[t * C + i] += xn[t * C + i];
                rmsnorm(x + t * C, L->norm2, xn + t * C, C, m->eps);
            }
            gemm(L->fc_w, L->fc_b, xn, C, h, T, 2 * I, C);
#pragma omp for schedule(static)
            for (int ti = 0; ti < T * I; ti++) {  /* silu(gate) * up */
                float *row = h + (size_t)(ti / I) * 2 * I;
                const int i = ti % I;
                row[i] = row[i] / (1.0f + expf(-row[i])) * row[I + i];
            }
            gemm(L->down_w, L->down_b, h, 2 * I, xn, T, C, I);  /* the silu rows */
#pragma omp for schedule(static)
            for (int ti = 0; ti < T * C; ti++) x[ti] += xn[ti];
        }
        const int first = last_only ? T - 1 : 0;
#pragma omp for schedule(static)
        for (int t = first; t < T; t++) rmsnorm(x + t * C, m->norm_f, xn + t * C, C, m->eps);
        gemm(m->head, NULL, xn + (size_t)first * C, C, logits, T - first, m->V, C);
    }
    return 0;
}

/* Y = X W^T for X [T, K], W [N, K] row-major: the step's product alone (the GEMV bound). */
void gk_gemm(const float *W, const float *X, float *Y, int T, int N, int K, int threads) {
#pragma omp parallel num_threads(threads)
    gemm(W, NULL, X, K, Y, T, N, K);
}
