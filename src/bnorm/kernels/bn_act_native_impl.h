/* The kernels for one element type T (float or double), named with the suffix SFX.
 * Included twice by bn_act_native.c. */
#define FN(name) CAT(name, SFX)
#define V ((int64_t)(NB * VW))             /* channels per block in the rows loops */
#define LANES ((int64_t)(128 / sizeof(T)))  /* values per step of the planes loops' sums */
#define VW ((int64_t)(32 / sizeof(T)))      /* values per explicit vector (32 bytes) */
#define NV 4                                /* explicit vectors of partial sums: LANES / VW */
#define NB 8                                /* explicit vectors per channel block (rows) */
#define HW ((int)(16 / sizeof(T)))          /* values per half vector */

typedef T FN(vec) __attribute__((vector_size(32)));
typedef ITYPE FN(ivec) __attribute__((vector_size(32))); /* T's size, for masks */
typedef T FN(hvec) __attribute__((vector_size(16)));      /* half a vector */

static inline FN(vec) FN(load)(const T *p) {
    FN(vec) v;
    memcpy(&v, p, sizeof v); /* (an unaligned load) */
    return v;
}

static inline void FN(store)(T *p, FN(vec) v) { memcpy(p, &v, sizeof v); }

static inline FN(vec) FN(splat)(T value) {
    FN(vec) v = {0};
    return v + value;
}

/* a(z) and dz = dy·a'(z) of the piecewise-linear activation, for `relu` a constant in the
 * function that uses them (each kernel is inlined twice, relu = 1 for slope 0, so every
 * select is a single one the compiler vectorizes). ReLU is a select, not a product with
 * 0: relu(−inf) = 0 and relu(NaN) = NaN, as torch.relu, and an infinite dy where z ≤ 0
 * gives 0, as the other kernels' derivative. */
#define ACT(z, slope) (relu ? ((z) < 0 ? (T)0 : (z)) : ((z) > 0 ? (z) : (z) * (slope)))
#define DACT(g, z, slope)                                                                  \
    ({                                                                                     \
        const T g_ = (g); /* read unconditionally: a conditional read compiled to a */     \
        relu ? ((z) > 0 ? g_ : (T)0) : ((z) > 0 ? g_ : g_ * (slope)); /* masked load */    \
    })
#define INLINE static inline __attribute__((always_inline))

/* scale = γ/√(σ²+ε), shift = β − μ·scale (γ = 1 where w is NULL, β = 0 where b is):
 * one function, so that the forward and the backward (which recomputes
 * z = x·scale + shift + r) round them identically. */
static __attribute__((noinline)) void FN(coefficients)(
    int64_t C, const T *w, const T *b, const T *mean, const T *invstd, T *scale, T *shift) {
    for (int64_t c = 0; c < C; c++) {
        scale[c] = (w ? w[c] : (T)1) * invstd[c];
        shift[c] = (b ? b[c] : (T)0) - mean[c] * scale[c];
    }
}

static int64_t FN(parts)(int64_t R, int64_t C, int64_t B) {
    return B > 1 ? R * C : ((R + ROWS - 1) / ROWS) * C;
}

/* The sum of NV vectors of partial sums in T, as a fixed pairwise tree: the vectors
 * first, then the lanes of the one left (its halves added as 16-byte vectors). A few
 * instructions, where summing LANES values one by one cost more than a 64-value plane's
 * loads. */
INLINE T FN(vsum)(FN(vec) *A) {
    const FN(vec) v = (A[0] + A[1]) + (A[2] + A[3]);
    FN(hvec) lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (const char *)&v + sizeof lo, sizeof hi);
    const FN(hvec) h = lo + hi;
    T a[HW];
    memcpy(a, &h, sizeof a);
    for (int w = HW / 2; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) a[l] += a[l + w];
    return a[0];
}

/* Σ (x − pv) and Σ (x − pv)² over n values in T: whole vectors summed into NV explicit
 * vectors of partial sums (GCC/Clang vector extensions: the accumulators stay in
 * registers), vector k of each LANES values into accumulator k, then the sums of the
 * vectors (vsum), then the values after the last whole vector one by one. */
INLINE void FN(lanes_moments)(const T *p, T pv, int64_t n, T *s1, T *s2) {
    FN(vec) A[NV] = {0}, Q[NV] = {0};
    const FN(vec) P = FN(splat)(pv);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < NV; k++) {
            FN(vec) d = FN(load)(p + j + k * VW) - P;
            A[k] += d;
            Q[k] += d * d;
        }
#define MOMENTS_VECTOR(k)                                                                  \
    if (j + VW <= n) {                                                                     \
        FN(vec) d = FN(load)(p + j) - P;                                                   \
        A[k] += d;                                                                         \
        Q[k] += d * d;                                                                     \
        j += VW;                                                                           \
    }
    MOMENTS_VECTOR(0) /* (at most NV − 1 = 3 whole vectors left; constant indices keep */
    MOMENTS_VECTOR(1) /* the accumulators in registers) */
    MOMENTS_VECTOR(2)
#undef MOMENTS_VECTOR
    T a = FN(vsum)(A), q = FN(vsum)(Q);
    for (; j < n; j++) {
        T d = p[j] - pv;
        a += d;
        q += d * d;
    }
    *s1 = a;
    *s2 = q;
}

/* One plane's Σ (x − pv) and Σ (x − pv)², in blocks of BLOCK values, each summed in T
 * (lanes_moments: no chain of dependent additions, the loop runs at the speed of its
 * loads), the blocks added in double. */
INLINE void FN(plane_moments)(const T *p, T pv, int64_t B, double *s1_out, double *s2_out) {
    double s1 = 0, s2 = 0;
    for (int64_t j0 = 0; j0 < B; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < B ? j0 + BLOCK : B;
        T a, q;
        FN(lanes_moments)(p + j0, pv, j1 - j0, &a, &q);
        s1 += a;
        s2 += q;
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* A channel's μ, 1/√(σ² + ε) and biased σ² (double) from the sums of x − x0 over count
 * values. */
INLINE void FN(channel_stats)(
    double s1, double s2, double count, T x0, double eps, T *mean, T *invstd, double *var) {
    double m = s1 / count;
    double v = s2 / count - m * m;
    if (v < 0) v = 0;
    *mean = (T)((double)x0 + m);
    *invstd = (T)(1.0 / sqrt(v + eps));
    *var = v;
}

/* One plane of y = a(x·s + t + r) (r: NULL without a residual). */
INLINE void FN(plane_out)(
    const T *x, const T *r, T *y, int64_t B, T s, T t, T slope, const int relu) {
    if (r) {
#pragma omp simd
        for (int64_t j = 0; j < B; j++) {
            T z = x[j] * s + t + r[j];
            y[j] = ACT(z, slope);
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < B; j++) {
            T z = x[j] * s + t;
            y[j] = ACT(z, slope);
        }
    }
}

/* One value of dz = dy·a'(x·s + t + r) at offset o (written to dz_out with a residual),
 * added to the sums a += dz and q += dz·(x − m). */
INLINE void FN(grad_value)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t o, T s, T t, T m, T slope, T *a,
    T *q, const int relu) {
    T z = x[o] * s + t;
    if (r) z += r[o];
    const T g = DACT(dy[o], z, slope);
    if (r) dz_out[o] = g;
    *a += g;
    *q += g * (x[o] - m);
}

/* One vector of dz = dy·a'(x·S + T + r) at offset o (written to dz_out with a residual),
 * added to the partial sums A += dz and Q += dz·(x − M). */
INLINE void FN(grad_vector)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t o, FN(vec) S, FN(vec) TT,
    FN(vec) M, FN(vec) SL, FN(vec) *A, FN(vec) *Q, const int relu) {
    const FN(vec) xv = FN(load)(x + o), gv = FN(load)(dy + o);
    FN(vec) z = xv * S + TT;
    if (r) z += FN(load)(r + o);
    const FN(ivec) pos = z > 0; /* all ones where z > 0 (false for NaN) */
    FN(vec) g = (FN(vec))(pos & (FN(ivec))gv);
    if (!relu) g = (FN(vec))((FN(ivec))g | (~pos & (FN(ivec))(gv * SL)));
    if (r) FN(store)(dz_out + o, g);
    *A += g;
    *Q += g * (xv - M);
}

/* Σ dz and Σ dz·(x − m) over n values in T, dz = dy·a'(x·s + t + r), summed as
 * lanes_moments sums; with a residual, dz is also written to dz_out. */
INLINE void FN(lanes_grad)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t n, T s, T t, T m, T slope,
    T *s1, T *s2, const int relu) {
    FN(vec) A[NV] = {0}, Q[NV] = {0};
    const FN(vec) S = FN(splat)(s), TT = FN(splat)(t), M = FN(splat)(m), SL = FN(splat)(slope);
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES)
        for (int k = 0; k < NV; k++)
            FN(grad_vector)(dy, x, r, dz_out, j + k * VW, S, TT, M, SL, A + k, Q + k, relu);
    for (int k = 0; k < NV - 1 && j + VW <= n; k++, j += VW) /* (constant indices: the */
        if (k == 0)                                           /* sums stay in registers) */
            FN(grad_vector)(dy, x, r, dz_out, j, S, TT, M, SL, A + 0, Q + 0, relu);
        else if (k == 1)
            FN(grad_vector)(dy, x, r, dz_out, j, S, TT, M, SL, A + 1, Q + 1, relu);
        else
            FN(grad_vector)(dy, x, r, dz_out, j, S, TT, M, SL, A + 2, Q + 2, relu);
    T a = FN(vsum)(A), q = FN(vsum)(Q);
    for (; j < n; j++) FN(grad_value)(dy, x, r, dz_out, j, s, t, m, slope, &a, &q, relu);
    *s1 = a;
    *s2 = q;
}

/* One plane's Σ dz and Σ dz·(x − m), in blocks of BLOCK values each summed in T
 * (lanes_grad), the blocks added in double (as plane_moments). */
INLINE void FN(plane_grad)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t B, T s, T t, T m, T slope,
    double *s1_out, double *s2_out, const int relu) {
    double s1 = 0, s2 = 0;
    for (int64_t j0 = 0; j0 < B; j0 += BLOCK) {
        const int64_t j1 = j0 + BLOCK < B ? j0 + BLOCK : B;
        T a, q;
        FN(lanes_grad)(dy + j0, x + j0, r ? r + j0 : NULL, r ? dz_out + j0 : NULL, j1 - j0, s, t,
                       m, slope, &a, &q, relu);
        s1 += a;
        s2 += q;
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* A channel's dx coefficients k = −scale/(σ²+ε)·mean(dz·(x − μ)), c = −scale·mean(dz), and
 * dγ, dβ, from the sums s1 = Σ dz, s2 = Σ dz·(x − μ) over count values. */
INLINE void FN(channel_grad)(
    double s1, double s2, double count, T invstd, T scale, T *k, T *c, T *dw, T *db) {
    *k = (T)(-(double)(invstd * invstd * scale) * s2 / count);
    *c = (T)(-(double)scale * s1 / count);
    *dw = (T)((double)invstd * s2);
    *db = (T)s1;
}

/* One plane of dx = dz·s + (x − m)·k + c, dz read from dz (a residual's gradient) or
 * recomputed from dy (dz NULL). */
INLINE void FN(plane_dx)(
    const T *dy, const T *x, const T *dz, T *dx, int64_t B, T s, T t, T m, T k, T c,
    T slope, const int relu) {
    if (dz) {
#pragma omp simd
        for (int64_t j = 0; j < B; j++) dx[j] = dz[j] * s + (x[j] - m) * k + c;
    } else {
#pragma omp simd
        for (int64_t j = 0; j < B; j++) {
            T z = x[j] * s + t;
            T g = DACT(dy[j], z, slope);
            dx[j] = g * s + (x[j] - m) * k + c;
        }
    }
}

/* Rows r0..r1 of the channels c0 .. c0 + nb·VW (nb whole vectors, nb ≤ NB): the sums
 * of x − pv and (x − pv)², pv = each channel's first value, into a and q. nb is a
 * constant where this is inlined (BLOCK_DISPATCH), so the partial sums are explicit
 * vectors held in registers across the rows, a whole row's channels in one sweep. */
INLINE void FN(rows_moments)(
    const T *x, int64_t C, int64_t c0, int64_t r0, int64_t r1, T *a, T *q, const int nb) {
    FN(vec) A[NB] = {0}, Q[NB] = {0}, P[NB];
    for (int k = 0; k < nb; k++) P[k] = FN(load)(x + c0 + k * VW);
    for (int64_t row = r0; row < r1; row++)
        for (int k = 0; k < nb; k++) {
            const FN(vec) d = FN(load)(x + row * C + c0 + k * VW) - P[k];
            A[k] += d;
            Q[k] += d * d;
        }
    for (int k = 0; k < nb; k++) {
        FN(store)(a + k * VW, A[k]);
        FN(store)(q + k * VW, Q[k]);
    }
}

/* As rows_moments, the sums of dz and dz·(x − μ) (grad_vector) over rows r0..r1. */
INLINE void FN(rows_grad)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t C, int64_t c0, int64_t r0,
    int64_t r1, const T *scale, const T *shift, const T *mean, T slope, T *a, T *q,
    const int relu, const int nb) {
    FN(vec) A[NB] = {0}, Q[NB] = {0}, S[NB], TT[NB], M[NB];
    const FN(vec) SL = FN(splat)(slope);
    for (int k = 0; k < nb; k++) {
        S[k] = FN(load)(scale + c0 + k * VW);
        TT[k] = FN(load)(shift + c0 + k * VW);
        M[k] = FN(load)(mean + c0 + k * VW);
    }
    for (int64_t row = r0; row < r1; row++)
        for (int k = 0; k < nb; k++)
            FN(grad_vector)(dy, x, r, dz_out, row * C + c0 + k * VW, S[k], TT[k], M[k], SL,
                            A + k, Q + k, relu);
    for (int k = 0; k < nb; k++) {
        FN(store)(a + k * VW, A[k]);
        FN(store)(q + k * VW, Q[k]);
    }
}

/* Per-part sums of d = x − pivot[c] and d², pivot[c] = the channel's first value. */
static void FN(moment_parts)(
    const T *x, int64_t R, int64_t C, int64_t B, double *p1, double *p2, int nt) {
    int par = nt > 1 && R * C * B >= PARALLEL_MIN;
    if (B > 1) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (par)
        for (int64_t n = 0; n < R; n++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t i = n * C + c;
                FN(plane_moments)(x + i * B, x[c * B], B, p1 + i, p2 + i);
            }
        return;
    }
    const int64_t K = (R + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
    for (int64_t k = 0; k < K; k++) {
        const int64_t r0 = k * ROWS, r1 = r0 + ROWS < R ? r0 + ROWS : R;
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            const int64_t w = C - c0 < V ? C - c0 : V;
            const int nb = (int)(w / VW); /* whole vectors; then w − nb·VW single channels */
            T a[V], q[V];
#define MOMENTS_BLOCK(NBK) FN(rows_moments)(x, C, c0, r0, r1, a, q, NBK)
            BLOCK_DISPATCH(nb, MOMENTS_BLOCK);
#undef MOMENTS_BLOCK
            for (int64_t v = nb * VW; v < w; v++) {
                const T pv = x[c0 + v];
                T sa = 0, sq = 0;
                for (int64_t row = r0; row < r1; row++) {
                    T d = x[row * C + c0 + v] - pv;
                    sa += d;
                    sq += d * d;
                }
                a[v] = sa;
                q[v] = sq;
            }
            for (int64_t v = 0; v < w; v++) {
                p1[k * C + c0 + v] = a[v];
                p2[k * C + c0 + v] = q[v];
            }
        }
    }
}

/* Per-part sums of dz = dy·a'(z) and dz·(x − μ), z = x·scale + shift (+ r); with a
 * residual, dz is also written to dz_out (it is the residual's gradient). */
INLINE void FN(grad_parts)(
    const T *dy, const T *x, const T *r, T *dz_out, int64_t R, int64_t C, int64_t B,
    const T *scale, const T *shift, const T *mean, T slope, double *p1, double *p2, int nt,
    const int relu) {
    int par = nt > 1 && R * C * B >= PARALLEL_MIN;
    if (B > 1) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (par)
        for (int64_t n = 0; n < R; n++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t i = n * C + c, o = i * B;
                FN(plane_grad)(dy + o, x + o, r ? r + o : NULL, r ? dz_out + o : NULL, B,
                               scale[c], shift[c], mean[c], slope, p1 + i, p2 + i, relu);
            }
        return;
    }
    const int64_t K = (R + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
    for (int64_t k = 0; k < K; k++) {
        const int64_t r0 = k * ROWS, r1 = r0 + ROWS < R ? r0 + ROWS : R;
        for (int64_t c0 = 0; c0 < C; c0 += V) {
            const int64_t w = C - c0 < V ? C - c0 : V;
            const int nb = (int)(w / VW); /* whole vectors; then w − nb·VW single channels */
            T a[V], q[V];
#define GRAD_BLOCK(NBK)                                                                     \
    FN(rows_grad)(dy, x, r, dz_out, C, c0, r0, r1, scale, shift, mean, slope, a, q, relu, NBK)
            BLOCK_DISPATCH(nb, GRAD_BLOCK);
#undef GRAD_BLOCK
            for (int64_t v = nb * VW; v < w; v++) {
                const int64_t c = c0 + v;
                const T s = scale[c], t = shift[c], m = mean[c];
                T sa = 0, sq = 0;
                for (int64_t row = r0; row < r1; row++)
                    FN(grad_value)(dy, x, r, dz_out, row * C + c, s, t, m, slope, &sa, &sq, relu);
                a[v] = sa;
                q[v] = sq;
            }
            for (int64_t v = 0; v < w; v++) {
                p1[k * C + c0 + v] = a[v];
                p2[k * C + c0 + v] = q[v];
            }
        }
    }
}

/* Σ over the parts of each channel, in part order (independent of the thread count). */
static void FN(combine)(int64_t n, int64_t C, const double *p, double *out) {
    for (int64_t c = 0; c < C; c++) out[c] = 0;
    for (int64_t i = 0; i < n; i += C)
        for (int64_t c = 0; c < C; c++) out[c] += p[i + c];
}

/* The running update (torch.lerp's formula, in T) from the batch's μ and biased σ² over
 * count values, all channels or none: with skip_nonfinite, none if any statistic is not
 * finite. Returns 1 (updated) or 0 (skipped), and counts the batch in tracked or
 * skipped (where given). */
static int FN(running)(
    int64_t C, const T *mean, const double *v64, double count, T *rm, T *rv, double alpha,
    int skip_nonfinite, int64_t *tracked, int64_t *skipped) {
    const T f = (T)(count / (count - 1 > 1 ? count - 1 : 1));
    const T wt = (T)alpha;
    int ok = 1;
    if (skip_nonfinite)
        for (int64_t c = 0; c < C; c++)
            if (!isfinite(mean[c]) || !isfinite((T)v64[c] * f)) ok = 0;
    if (ok)
        for (int64_t c = 0; c < C; c++) {
            T um = mean[c], uv = (T)v64[c] * f;
            rm[c] = wt < (T)0.5 ? rm[c] + wt * (um - rm[c]) : um - (um - rm[c]) * ((T)1 - wt);
            rv[c] = wt < (T)0.5 ? rv[c] + wt * (uv - rv[c]) : uv - (uv - rv[c]) * ((T)1 - wt);
        }
    int64_t *counter = ok ? tracked : skipped;
    if (counter) *counter += 1;
    return ok;
}

/* Forward: statistics, the running update, then y = a(x·scale + shift + r).
 * Returns 1 (running statistics updated), 0 (skipped: a non-finite statistic),
 * -1 (no running statistics given), -2 (out of memory; nothing written), -3 (no values;
 * nothing read or written). With running statistics, the counter tracked (ok) or
 * skipped (not ok) is incremented, where given. */
INLINE int FN(fwd)(
    const T *x, const T *r, T *y, int64_t R, int64_t C, int64_t B, const T *w, const T *b,
    double eps, double slope_d, T *mean, T *invstd, T *var, T *rm, T *rv, double alpha,
    int skip_nonfinite, int64_t *tracked, int64_t *skipped, int nt, const int relu) {
    const T slope = (T)slope_d;
    if (R * B == 0 || C == 0) return -3; /* no values: nothing read or written */
    const int64_t n = FN(parts)(R, C, B);
    double *p = (double *)malloc((2 * n + 2 * C) * sizeof(double));
    T *coef = (T *)malloc(2 * C * sizeof(T));
    if (!p || !coef) {
        free(p);
        free(coef);
        return -2;
    }
    T *scale = coef, *shift = coef + C;
    double *s1 = p + 2 * n, *s2 = s1 + C;
    double *v64 = s1; /* the variance in double, written over s1 once it is used */
    const double count = (double)R * (double)B;
    int par = nt > 1 && R * C * B >= PARALLEL_MIN;
    FN(moment_parts)(x, R, C, B, p, p + n, nt);
    FN(combine)(n, C, p, s1);
    FN(combine)(n, C, p + n, s2);
    for (int64_t c = 0; c < C; c++)
        FN(channel_stats)(s1[c], s2[c], count, x[c * B], eps, mean + c, invstd + c, v64 + c);
    FN(coefficients)(C, w, b, mean, invstd, scale, shift);
    if (B > 1) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (par)
        for (int64_t n = 0; n < R; n++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t o = (n * C + c) * B;
                FN(plane_out)(x + o, r ? r + o : NULL, y + o, B, scale[c], shift[c], slope, relu);
            }
    } else {
        /* Rows: each row's C channels in one loop (the coefficients read from their
         * arrays, in L1). */
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
        for (int64_t row = 0; row < R; row++) {
            const int64_t o = row * C;
            if (r) {
#pragma omp simd
                for (int64_t v = 0; v < C; v++) {
                    T z = x[o + v] * scale[v] + shift[v] + r[o + v];
                    y[o + v] = ACT(z, slope);
                }
            } else {
#pragma omp simd
                for (int64_t v = 0; v < C; v++) {
                    T z = x[o + v] * scale[v] + shift[v];
                    y[o + v] = ACT(z, slope);
                }
            }
        }
    }
    if (var)
        for (int64_t c = 0; c < C; c++) var[c] = (T)v64[c];
    int status = -1;
    if (rm)
        status = FN(running)(C, mean, v64, count, rm, rv, alpha, skip_nonfinite, tracked, skipped);
    free(p);
    free(coef);
    return status;
}

/* Backward: dγ = (1/√(σ²+ε))·Σ dz·(x − μ), dβ = Σ dz, dr = dz (with a residual) and
 * dx = dz·scale + (x − μ)·k + c, k = −scale/(σ²+ε)·mean(dz·(x − μ)), c = −scale·mean(dz).
 * Without a residual dz is recomputed from dy in the second pass instead of stored.
 * Returns 0, -2 (out of memory; nothing written) or -3 (no values). */
INLINE int FN(bwd)(
    const T *dy, const T *x, const T *r, T *dx, T *dr, int64_t R, int64_t C, int64_t B,
    const T *w, const T *b, const T *mean, const T *invstd, double slope_d, T *dw, T *db,
    int nt, const int relu) {
    const T slope = (T)slope_d;
    if (R * B == 0 || C == 0) return -3; /* no values: nothing read or written */
    const int64_t n = FN(parts)(R, C, B);
    double *p = (double *)malloc((2 * n + 2 * C) * sizeof(double));
    T *coef = (T *)malloc(4 * C * sizeof(T));
    if (!p || !coef) {
        free(p);
        free(coef);
        return -2;
    }
    double *s1 = p + 2 * n, *s2 = s1 + C;
    T *scale = coef, *shift = coef + C, *k = coef + 2 * C, *cc = coef + 3 * C;
    FN(coefficients)(C, w, b, mean, invstd, scale, shift);
    const double count = (double)R * (double)B;
    int par = nt > 1 && R * C * B >= PARALLEL_MIN;
    FN(grad_parts)(dy, x, r, dr, R, C, B, scale, shift, mean, slope, p, p + n, nt, relu);
    FN(combine)(n, C, p, s1);
    FN(combine)(n, C, p + n, s2);
    for (int64_t c = 0; c < C; c++)
        FN(channel_grad)(s1[c], s2[c], count, invstd[c], scale[c], k + c, cc + c, dw + c, db + c);
    if (B > 1) {
#pragma omp parallel for collapse(2) num_threads(nt) schedule(static) if (par)
        for (int64_t n = 0; n < R; n++)
            for (int64_t c = 0; c < C; c++) {
                const int64_t o = (n * C + c) * B;
                FN(plane_dx)(dy + o, x + o, r ? dr + o : NULL, dx + o, B, scale[c], shift[c],
                             mean[c], k[c], cc[c], slope, relu);
            }
    } else {
        /* Rows: each row's C channels in one loop (no accumulators here: the
         * coefficients are read from their arrays, in L1, not held in registers). */
#pragma omp parallel for num_threads(nt) schedule(static) if (par)
        for (int64_t row = 0; row < R; row++) {
            const int64_t o = row * C;
            if (r) {
#pragma omp simd
                for (int64_t v = 0; v < C; v++)
                    dx[o + v] = dr[o + v] * scale[v] + (x[o + v] - mean[v]) * k[v] + cc[v];
            } else {
#pragma omp simd
                for (int64_t v = 0; v < C; v++) {
                    T z = x[o + v] * scale[v] + shift[v];
                    T g = DACT(dy[o + v], z, slope);
                    dx[o + v] = g * scale[v] + (x[o + v] - mean[v]) * k[v] + cc[v];
                }
            }
        }
    }
    free(p);
    free(coef);
    return 0;
}

/* The entry points: each kernel compiled for ReLU and for any other slope. */
int FN(bnorm_fwd)(
    const T *x, const T *r, T *y, int64_t R, int64_t C, int64_t B, const T *w, const T *b,
    double eps, double slope_d, T *mean, T *invstd, T *var, T *rm, T *rv, double alpha,
    int skip_nonfinite, int64_t *tracked, int64_t *skipped, int nt) {
    if (slope_d == 0)
        return FN(fwd)(x, r, y, R, C, B, w, b, eps, slope_d, mean, invstd, var, rm, rv, alpha,
                       skip_nonfinite, tracked, skipped, nt, 1);
    return FN(fwd)(x, r, y, R, C, B, w, b, eps, slope_d, mean, invstd, var, rm, rv, alpha,
                   skip_nonfinite, tracked, skipped, nt, 0);
}

int FN(bnorm_bwd)(
    const T *dy, const T *x, const T *r, T *dx, T *dr, int64_t R, int64_t C, int64_t B,
    const T *w, const T *b, const T *mean, const T *invstd, double slope_d, T *dw, T *db,
    int nt) {
    if (slope_d == 0)
        return FN(bwd)(dy, x, r, dx, dr, R, C, B, w, b, mean, invstd, slope_d, dw, db, nt, 1);
    return FN(bwd)(dy, x, r, dx, dr, R, C, B, w, b, mean, invstd, slope_d, dw, db, nt, 0);
}

#undef FN
#undef INLINE
#undef V
#undef LANES
#undef VW
#undef NV
#undef NB
#undef HW
#undef ACT
#undef DACT
