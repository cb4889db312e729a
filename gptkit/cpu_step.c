/* One decoding step of a Llama-style GPT on the CPU, in fp32: a token in, its logits out, the
 * keys and values written into the KV cache. cpu_step.py compiles this file for the CPU it runs
 * on (-march=native) and calls gk_step once per generated token.
 *
 * Why C: a batch-1 decoding step reads every weight once, so its floor is the time to stream
 * the weights from memory. PyTorch's eager step makes ~56 operator calls per layer, and at a
 * few microseconds each the 30 layers of SmolLM2-135M spent ~4 ms a step beside ~10 ms of
 * matrix-vector products; Inductor's CPU lowering turns one-row products into loops slower
 * than BLAS. Here the whole step is one call: norms, rope, attention and the SwiGLU are plain
 * loops over a few thousand floats, and the products are a GEMV that streams each weight row
 * once, the threads splitting the rows.
 *
 * The model it serves (cpu_step.py checks): pre-norm RMSNorm blocks, rotary positions (the
 * tables come from the model, so any rope variant it builds is served), grouped-query
 * attention, a SwiGLU MLP, optional biases on the linear layers, row-major fp32 weights.
 * Shapes: C = n_embd, H = query heads, Hkv = key/value heads, D = head_dim, I = the MLP's
 * hidden width, V = vocabulary, S = positions attended (pos + 1).
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
    /* scratch, owned by the caller */
    float *x;                    /* [C] the residual stream */
    float *xn;                   /* [C] a normed copy, or a layer's output before the residual */
    float *qkv;                  /* [(H + 2 Hkv) D] */
    float *att;                  /* [H D] */
    float *h;                    /* [2 I] */
    float *scores;               /* [H, max_len] */
} Model;

/* The KV cache of one sequence: keys and values of layer l, head g, position t at
 * k + l * layer_stride + g * head_stride + t * D (kv_cache.py's [L, B, Hkv, M, D], one row). */
typedef struct {
    float *k, *v;
    long layer_stride, head_stride;
} Cache;

/* y = W x (+ b), W [N, K] row-major, inside a parallel region: the threads split the rows.
 * Four rows at a time share each load of x; the implicit barrier at the end of the second loop
 * makes y complete for every thread on return. */
static void gemv(const float *restrict W, const float *restrict b, const float *restrict x,
                 float *restrict y, int N, int K) {
    const int blocks = N / 4;
#pragma omp for schedule(static) nowait
    for (int blk = 0; blk < blocks; blk++) {
        const float *w0 = W + (size_t)4 * blk * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
        for (int k = 0; k < K; k++) {
            s0 += w0[k] * x[k];
            s1 += w1[k] * x[k];
            s2 += w2[k] * x[k];
            s3 += w3[k] * x[k];
        }
        float *o = y + 4 * blk;
        o[0] = s0, o[1] = s1, o[2] = s2, o[3] = s3;
        if (b)
            for (int i = 0; i < 4; i++) o[i] += b[4 * blk + i];
    }
#pragma omp for schedule(static)
    for (int n = 4 * blocks; n < N; n++) {
        float s = b ? b[n] : 0.0f;
        for (int k = 0; k < K; k++) s += W[(size_t)n * K + k] * x[k];
        y[n] = s;
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
    for (int t = 0; t < S; t++) {
        float s = 0;
        for (int i = 0; i < D; i++) s += q[i] * K[(size_t)t * D + i];
        scores[t] = s * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    for (int t = 0; t < S; t++) sum += scores[t] = expf(scores[t] - top);
    for (int i = 0; i < D; i++) out[i] = 0;
    for (int t = 0; t < S; t++) {
        const float p = scores[t] / sum;
        for (int i = 0; i < D; i++) out[i] += p * V[(size_t)t * D + i];
    }
}

/* The logits [V] of `token` at position `pos`, whose keys and values go to column `pos` of
 * `cache`; columns 0..pos-1 must hold the sequence so far. One parallel region for the whole
 * step: the threads meet at barriers, not at a fork per operation. */
void gk_step(const Model *m, const Cache *cache, int token, int pos, int threads,
             float *logits) {
    const int C = m->C, H = m->H, Hkv = m->Hkv, D = m->D, I = m->I;
    const int qkv_rows = (H + 2 * Hkv) * D, group = H / Hkv;
    float *x = m->x, *xn = m->xn, *qkv = m->qkv, *h = m->h;
    for (int i = 0; i < C; i++) x[i] = m->emb[(size_t)token * C + i];
#pragma omp parallel num_threads(threads)
    {
        for (int l = 0; l < m->n_layer; l++) {
            const Layer *L = &m->layers[l];
            float *k = cache->k + l * cache->layer_stride, *v = cache->v + l * cache->layer_stride;
#pragma omp single
            rmsnorm(x, L->norm1, xn, C, m->eps);
            gemv(L->qkv_w, L->qkv_b, xn, qkv, qkv_rows, C);
#pragma omp single
            {   /* rotate q and k (the first H + Hkv heads), then write k and v to the cache */
                for (int head = 0; head < H + Hkv; head++)
                    rope(qkv + head * D, m->cos + (size_t)pos * D, m->sin + (size_t)pos * D, D);
                for (int g = 0; g < Hkv; g++)
                    for (int i = 0; i < D; i++) {
                        k[g * cache->head_stride + (size_t)pos * D + i] = qkv[(H + g) * D + i];
                        v[g * cache->head_stride + (size_t)pos * D + i] = qkv[(H + Hkv + g) * D + i];
                    }
            }
#pragma omp for schedule(static)
            for (int head = 0; head < H; head++) {
                const long kv = (head / group) * cache->head_stride;
                attend(qkv + head * D, k + kv, v + kv, m->scores + (size_t)head * (pos + 1),
                       m->att + head * D, pos + 1, D);
            }
            gemv(L->proj_w, L->proj_b, m->att, xn, C, H * D);
#pragma omp single
            {
                for (int i = 0; i < C; i++) x[i] += xn[i];
                rmsnorm(x, L->norm2, xn, C, m->eps);
            }
            gemv(L->fc_w, L->fc_b, xn, h, 2 * I, C);
#pragma omp for schedule(static)
            for (int i = 0; i < I; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * h[I + i];  /* silu(gate) * up */
            gemv(L->down_w, L->down_b, h, xn, C, I);
#pragma omp single
            for (int i = 0; i < C; i++) x[i] += xn[i];
        }
#pragma omp single
        rmsnorm(x, m->norm_f, xn, C, m->eps);
        gemv(m->head, NULL, xn, logits, m->V, C);
    }
}

/* y = W x for W [N, K] row-major, the step's product alone: what the GEMV bound measures. */
void gk_gemv(const float *W, const float *x, float *y, int N, int K, int threads) {
#pragma omp parallel num_threads(threads)
    gemv(W, NULL, x, y, N, K);
}
