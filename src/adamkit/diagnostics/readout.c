/* A Monitor's sampled step in C (adamkit/diagnostics/native.py builds and calls it).
 *
 * adamkit_gather: the sampled entries of many tensors, as float64 (see its comment).
 *
 * adamkit_row_sums: the reductions of signals.batch_sums (see its comment).
 *
 * adamkit_percentiles: nearest-rank percentiles of a sample, per row and weighted per
 * scope, the native form of adamkit.diagnostics.signals.row_percentiles and of
 * signals.percentiles with weights: one stable ordering of every counted entry, then one
 * walk of the order per scope.
 *
 *   eff       [T, K] float64, row-major; NaN: the entry does not count
 *   w         [T] the weight of each entry of a row (a scope's percentiles)
 *   scopes    [S, T] 1 where the row belongs to the scope
 *   q         [Q] percentiles in [0, 100]
 *   row_out   [T, Q] the entry at rank max(ceil(q/100 * n - 1e-9) - 1, 0) of each row's n
 *             entries in value order; NaN for a row without entries
 *   scope_out [S, Q] the first entry, in value order (equal values in row-major order), whose
 *             running weight reaches q/100 * total * (1 - 1e-12), the weights added one by one
 *             in that order; NaN for a scope without entries
 *   work      scratch of adamkit_percentiles_work_bytes(T, K, Q) bytes, 8-byte aligned
 *
 * The order (value_order) is stable: equal values keep their row-major order, and -0.0
 * equals +0.0, as in NumPy's comparisons.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* The value of an IEEE half (float16) from its bits. */
static double half_value(uint16_t h) {
    int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
    double sign = (h >> 15) ? -1.0 : 1.0;
    if (exponent == 0x1F) return mantissa ? NAN : sign * INFINITY;
    if (exponent == 0) return sign * ldexp(mantissa, -24); /* zero and subnormals */
    return sign * ldexp(mantissa + 1024, exponent - 25);
}

/* Copies the sampled entries of `count` tensors into `out` (float64): tensor i, at address
 * ptr[i], of element type dtype[i] (0 float32, 1 float64, 2 bfloat16, 3 float16), gives
 * runs[i] runs of length[i] adjacent entries, stride[i] entries apart, written end to end
 * from out[dest[i]]. */
void adamkit_gather(int64_t count, const uint64_t *ptr, const int32_t *dtype,
                    const int64_t *runs, const int64_t *length, const int64_t *stride,
                    const int64_t *dest, double *out) {
    for (int64_t i = 0; i < count; i++) {
        double *to = out + dest[i];
        for (int64_t r = 0; r < runs[i]; r++) {
            int64_t at = r * stride[i];
            switch (dtype[i]) {
            case 0: {
                const float *from = (const float *)(uintptr_t)ptr[i] + at;
                for (int64_t j = 0; j < length[i]; j++) *to++ = from[j];
                break;
            }
            case 1: {
                const double *from = (const double *)(uintptr_t)ptr[i] + at;
                for (int64_t j = 0; j < length[i]; j++) *to++ = from[j];
                break;
            }
            case 2: {
                const uint16_t *from = (const uint16_t *)(uintptr_t)ptr[i] + at;
                for (int64_t j = 0; j < length[i]; j++) {
                    uint32_t bits = (uint32_t)from[j] << 16;
                    float f;
                    memcpy(&f, &bits, sizeof f);
                    *to++ = f;
                }
                break;
            }
            default: {
                const uint16_t *from = (const uint16_t *)(uintptr_t)ptr[i] + at;
                for (int64_t j = 0; j < length[i]; j++) *to++ = half_value(from[j]);
            }
            }
        }
    }
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#define LANES 8 /* partial sums, so that the loop vectorizes without reassociation */

/* The reductions of signals.batch_sums over each row's first k[i] entries (the others are
 * zeros, or masked where eps <= 0: NumPy's result either way), for rows with w[i] != 0 (the
 * others are left alone). The entries are computed by the caller with
 * adamkit.rule (u = m_hat / (sqrt(v_hat) + eps), root = sqrt(v_hat)); here they are only added
 * and counted, "active" meaning root > 0:
 *   out[0..4][i] = w * (sum u^2, sum v, #active, #active with root < eps,
 *                       #active with |u| > large)
 * u, root and v are [T, K], row-major. The sums add in eight lanes, so they differ from
 * NumPy's pairwise sums by rounding only. */
CLONES
void adamkit_row_sums(int64_t T, int64_t K, const int64_t *k, const double *w, const double *u,
                      const double *root, const double *v, const double *eps, double large,
                      double *out) {
    for (int64_t i = 0; i < T; i++) {
        if (w[i] == 0.0) continue;
        const double *ui = u + i * K, *ri = root + i * K, *vi = v + i * K;
        double acc[5][LANES] = {{0}};
        const double e = eps[i];
        int64_t j = 0;
#define ADD(l, at)                                   \
    do {                                             \
        double on = ri[at] > 0;                      \
        acc[0][l] += ui[at] * ui[at];                \
        acc[1][l] += vi[at];                         \
        acc[2][l] += on;                             \
        acc[3][l] += on * (ri[at] < e);              \
        acc[4][l] += on * (fabs(ui[at]) > large);    \
    } while (0)
        for (; j + LANES <= k[i]; j += LANES)
            for (int l = 0; l < LANES; l++) ADD(l, j + l);
        for (; j < k[i]; j++) ADD(0, j);
#undef ADD
        for (int s = 0; s < 5; s++) {
            double total = 0.0;
            for (int l = 0; l < LANES; l++) total += acc[s][l];
            out[s * T + i] = w[i] * total;
        }
    }
}

#define DIGIT 11
#define BUCKETS (1 << DIGIT)
#define PASSES 3 /* 3 * 11 >= 32 */

/* The key of the float32 rounding of x: orders like x, but distinct values may share it. */
static inline uint32_t short_key(double x) {
    float f = (float)(x + 0.0);
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return (b >> 31) ? ~b : (b | 0x80000000U);
}

#define VALUE(p) eff[((p) >> shift) * K + ((p) & mask)]

/* Stable insertion sort of pos[a, b) by value, giving up once it has moved entries more
 * than `budget` places in all (returns 0 then, 1 when sorted). */
static int insertion(const double *eff, int64_t K, int shift, uint32_t mask, uint32_t *pos,
                     int64_t a, int64_t b, int64_t budget) {
    for (int64_t i = a + 1; i < b; i++) {
        uint32_t p = pos[i];
        double x = VALUE(p);
        int64_t j = i;
        while (j > a && VALUE(pos[j - 1]) > x) {
            pos[j] = pos[j - 1];
            j--;
        }
        pos[j] = p;
        budget -= i - j;
        if (budget < 0) return 0;
    }
    return 1;
}

/* Stable merge sort of pos[0, n) by value, with tmp[0, n) as scratch. */
static void merge_sort(const double *eff, int64_t K, int shift, uint32_t mask, uint32_t *pos,
                       uint32_t *tmp, int64_t n) {
    const int64_t RUN = 16;
    for (int64_t i = 0; i < n; i += RUN)
        insertion(eff, K, shift, mask, pos, i, i + RUN < n ? i + RUN : n, INT64_MAX);
    uint32_t *src = pos, *dst = tmp;
    for (int64_t width = RUN; width < n; width *= 2) {
        for (int64_t lo = 0; lo < n; lo += 2 * width) {
            int64_t mid = lo + width < n ? lo + width : n;
            int64_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int64_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) /* equal values: the left run first */
                dst[k++] = VALUE(src[j]) < VALUE(src[i]) ? src[j++] : src[i++];
            while (i < mid) dst[k++] = src[i++];
            while (j < hi) dst[k++] = src[j++];
        }
        uint32_t *t = src;
        src = dst;
        dst = t;
    }
    if (src != pos) memcpy(pos, src, sizeof(uint32_t) * n);
}

/* The n counted entries of eff (not NaN), as (row << shift) | column, in value order. By
 * their 32-bit keys first, with a least-significant-digit radix sort (three passes at most;
 * stable, so equal keys stay in row-major order); then a stable insertion pass by value,
 * which moves only entries that share a key. Where that would move many (values that
 * collapse in float32: below about 1e-38 or above 3e38), a stable merge sort instead. The
 * result is in pos or in pos2 (returned); the other buffer is free. */
static uint32_t *value_order(const double *eff, int64_t T, int64_t K, int shift, int64_t n,
                             uint32_t *pos, uint32_t *pos2, uint32_t *key, uint32_t *key2,
                             uint32_t (*counts)[BUCKETS]) {
    const uint32_t mask = (1U << shift) - 1;
    int64_t m = 0;
    memset(counts, 0, sizeof(uint32_t) * PASSES * BUCKETS);
    for (int64_t r = 0; r < T; r++)
        for (int64_t c = 0; c < K; c++) {
            double x = eff[r * K + c];
            if (isnan(x)) continue;
            uint32_t k = short_key(x);
            for (int p = 0; p < PASSES; p++) counts[p][(k >> (p * DIGIT)) & (BUCKETS - 1)]++;
            key[m] = k;
            pos[m++] = (uint32_t)((r << shift) | c);
        }
    for (int p = 0; p < PASSES; p++) {
        uint32_t *c = counts[p];
        if (c[(key[0] >> (p * DIGIT)) & (BUCKETS - 1)] == (uint32_t)n) continue; /* shared */
        uint32_t sum = 0;
        for (int b = 0; b < BUCKETS; b++) {
            uint32_t here = c[b];
            c[b] = sum;
            sum += here;
        }
        for (int64_t i = 0; i < n; i++) {
            uint32_t at = c[(key[i] >> (p * DIGIT)) & (BUCKETS - 1)]++;
            key2[at] = key[i];
            pos2[at] = pos[i];
        }
        uint32_t *t = key;
        key = key2;
        key2 = t;
        t = pos;
        pos = pos2;
        pos2 = t;
    }
    if (insertion(eff, K, shift, mask, pos, 0, n, 4 * n + 64)) return pos;
    m = 0; /* start again from row-major order */
    for (int64_t r = 0; r < T; r++)
        for (int64_t c = 0; c < K; c++)
            if (!isnan(eff[r * K + c])) pos[m++] = (uint32_t)((r << shift) | c);
    merge_sort(eff, K, shift, mask, pos, pos2, n);
    return pos;
}

/* ranks [T, Q], row starts and counts [T] each, radix counts, keys and positions twice */
int64_t adamkit_percentiles_work_bytes(int64_t T, int64_t K, int64_t Q) {
    return 8 * T * (Q + 2) + 4 * PASSES * BUCKETS + 16 * T * K;
}

void adamkit_percentiles(const double *eff, int64_t T, int64_t K, const double *w,
                         const uint8_t *scopes, int64_t S, const double *q, int64_t Q,
                         double *row_out, double *scope_out, void *work) {
    int64_t *rank = (int64_t *)work; /* [T, Q] */
    int64_t *start = rank + T * Q, *seen = start + T;
    uint32_t (*counts)[BUCKETS] = (uint32_t (*)[BUCKETS])(seen + T);
    uint32_t *pos = (uint32_t *)(counts + PASSES), *pos2 = pos + T * K;
    uint32_t *key = pos2 + T * K, *key2 = key + T * K;
    int64_t n = 0;
    for (int64_t r = 0; r < T; r++) {
        int64_t count = 0;
        for (int64_t c = 0; c < K; c++) count += !isnan(eff[r * K + c]);
        for (int64_t j = 0; j < Q; j++) {
            int64_t at = (int64_t)ceil(q[j] / 100.0 * (double)count - 1e-9) - 1;
            rank[r * Q + j] = at < 0 ? 0 : at;
            row_out[r * Q + j] = NAN;
        }
        start[r] = n;
        seen[r] = count;
        n += count;
    }
    for (int64_t s = 0; s < S * Q; s++) scope_out[s] = NAN;
    if (n == 0) return;
    int shift = 0;
    while ((INT64_C(1) << shift) < K) shift++;
    const uint32_t mask = (1U << shift) - 1;
    uint32_t *order = value_order(eff, T, K, shift, n, pos, pos2, key, key2, counts);
    uint32_t *by_row = order == pos ? pos2 : pos;

    for (int64_t i = 0; i < n; i++) { /* each row's entries, in value order */
        int64_t r = order[i] >> shift;
        by_row[start[r]++] = order[i];
    }
    for (int64_t r = 0; r < T; r++) {
        int64_t first = start[r] - seen[r];
        for (int64_t j = 0; j < Q && seen[r]; j++)
            row_out[r * Q + j] = VALUE(by_row[first + rank[r * Q + j]]);
    }
    for (int64_t s = 0; s < S; s++) {
        const uint8_t *in = scopes + s * T;
        double total = 0.0;
        int64_t members = 0, last = -1;
        for (int64_t i = 0; i < n; i++)
            if (in[order[i] >> shift]) {
                total += w[order[i] >> shift];
                members++;
                last = i;
            }
        if (!members) continue;
        double *out = scope_out + s * Q, *target = (double *)rank; /* the ranks are used */
        double next = INFINITY;
        for (int64_t j = 0; j < Q; j++) {
            target[j] = (q[j] / 100.0 * total) * (1 - 1e-12);
            next = target[j] < next ? target[j] : next;
        }
        int64_t left = Q;
        double running = 0.0;
        for (int64_t i = 0; i < n && left; i++) {
            int64_t r = order[i] >> shift;
            if (!in[r]) continue;
            running += w[r];
            if (running < next) continue; /* no threshold reached yet */
            next = INFINITY;
            for (int64_t j = 0; j < Q; j++) {
                if (isnan(out[j]) && running >= target[j]) {
                    out[j] = VALUE(order[i]);
                    left--;
                }
                if (isnan(out[j])) next = target[j] < next ? target[j] : next;
            }
        }
        for (int64_t j = 0; j < Q; j++) /* past every entry (q > 100): the last one */
            if (isnan(out[j])) out[j] = VALUE(order[last]);
    }
}
