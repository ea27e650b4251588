/* The CPU serving step's fused parts, called by kernels/cpu_step.py with the GIL released.
 *
 * torch does the two GEMMs (MKL at ~70% of one core's fp32 peak); what torch cannot fuse is everything around
 * them: the gather of the old rows, and the LSTM cell's element-wise part with the scatter of the new rows. As
 * torch ops those were ~10 passes over [rows, H] buffers per layer and as many GIL round trips (each op takes
 * and drops it), about 0.5 of the step's ~1 µs per event at H=64 on a 2-core Xeon. Here they are two passes:
 *
 *   gather_rows:  out[r] = reset[r] ? 0 : table[slots[r]]                          (the GEMM's h input)
 *   lstm_cell:    z = gates[r] + bias (torch gate order i, f, g, o);
 *                 c' = sigmoid(f) * (reset[r] ? 0 : c[slots[r]]) + sigmoid(i) * tanh(g)
 *                 h' = sigmoid(o) * tanh(c');  c[slots[r]] = c', h[slots[r]] = h', h_out[r] = h'
 *
 * Forecast models with per-stream adaptation (daemon/normalization.py, "per-stream adaptation and the guard") run
 * it inside the same chunked pass over the rows (cpu_step.py), on the packed rows of the adaptation table, updated
 * in place:
 *
 *   adapt_begin:  layer 0's gather_rows, and in the same loop per row: a reset row starts from the initial row;
 *                 score the previous forecast (the guard's running averages), update the stream's scale and
 *                 count, write the LSTM's inputs clip(dx / scale) and finish's factor scale[cols] * gain. Each
 *                 row's adaptation row and h row are prefetched together, so their misses overlap.
 *   adapt_finish: after the chunk's head: keep the model's predicted change; out = x[cols] + factor * change
 *                 (the chunk's rows were touched a chunk ago, not a whole wave ago: in L2 or L3, not memory).
 *
 * As torch ops these were ~25 ops per wave (a gather, a scatter, fixed costs of a few µs each): 22-47% of the
 * serving step; as two passes of their own around the step, 8-14% (the rows were read from memory again after
 * the step's state-table traffic evicted them). The arithmetic is normalization.py's, lerp included (torch's
 * two-sided form, so a weight of 1 lands exactly on the new value); the count-dependent rates come from its table.
 * Row layout (I inputs, O columns): scale[I] count prev[O] cross[O] dd[O] tt[O], and with the level regressor
 * (train.level_rate = r > 0) sprev[O] cs[O] ss[O] ms[O] level[O] after them; no season (the seasonal ring stays in
 * torch). With the level, begin also moves each stream's level toward its event, forms the level's change sprev =
 * clip((level - x) / scale), scores it and picks the guard's mix (g, a) of the model's change and that one
 * (normalization.guard_coefficients); finish serves x + scale * (g * change + a * sprev).
 *
 * A reset row reads as zero whatever the table holds (a dead stream may hold NaN; 0 * NaN would be NaN).
 * Slots are distinct within a call (the daemon's waves guarantee it), so the scatter has no write conflicts,
 * and calls on disjoint slot sets may run on different threads at once.
 *
 * exp is Cephes' expf polynomial (relative error ~1e-7 on [-87, 88], the input clamped there), written
 * branch-free so gcc vectorizes the loop over H; sigmoid and tanh are rational in e^-z, which needs three
 * divisions per element instead of five. No -ffast-math: NaN and Inf keep their IEEE meaning, and no
 * process-wide FP flags change. The body is compiled for AVX-512, AVX2+FMA and baseline x86-64 (or the
 * compiler's default elsewhere) and picked once by CPU feature at import.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))
#define PREFETCH_ROWS 4 /* rows ahead: slots are random rows of tables far larger than the caches */

INLINE float exp_approx(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round(x / ln2): 1.5 * 2^23 */
    float r = x - n * 0.693359375f; /* ln2 in two parts, so r = x - n ln2 stays exact */
    r = r - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    int32_t bits; /* y * 2^n through the exponent field; n is in [-126, 127], so y stays normal */
    memcpy(&bits, &y, sizeof bits);
    bits += (int32_t)n << 23;
    memcpy(&y, &bits, sizeof y);
    return y;
}

INLINE void prefetch_row(const float *row, int64_t H, int write) {
    for (int64_t k = 0; k < H; k += 16) { /* one cache line = 16 floats */
        if (write)
            __builtin_prefetch(row + k, 1, 3);
        else
            __builtin_prefetch(row + k, 0, 3);
    }
}

INLINE void gather_body(const float *restrict table, const int64_t *restrict slots, const uint8_t *restrict reset,
                        float *restrict out, int64_t n, int64_t H) {
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_ROWS < n)
            prefetch_row(table + slots[r + PREFETCH_ROWS] * H, H, 0);
        if (reset != NULL && reset[r])
            memset(out + r * H, 0, (size_t)H * sizeof(float));
        else
            memcpy(out + r * H, table + slots[r] * H, (size_t)H * sizeof(float));
    }
}

INLINE void cell_body(const float *restrict gates, const float *restrict bias, float *restrict c_table,
                      float *restrict h_table, const int64_t *restrict slots, const uint8_t *restrict reset,
                      float *restrict h_out, int64_t n, int64_t H) {
    for (int64_t r = 0; r < n; r++) {
        if (r + PREFETCH_ROWS < n) {
            const int64_t ahead = slots[r + PREFETCH_ROWS] * H;
            prefetch_row(c_table + ahead, H, 1);
            prefetch_row(h_table + ahead, H, 1);
        }
        const float *restrict z = gates + r * 4 * H;
        float *restrict c_row = c_table + slots[r] * H;
        float *restrict h_row = h_table + slots[r] * H;
        float *restrict o_row = h_out + r * H;
        const int zero = reset != NULL && reset[r];
        for (int64_t j = 0; j < H; j++) {
            /* sigmoid(a) = 1 / (1 + e^-a); tanh(a) = (1 - e^-2a) / (1 + e^-2a) */
            const float ei = exp_approx(-(z[j] + bias[j]));
            const float ef = exp_approx(-(z[H + j] + bias[H + j]));
            const float eg = exp_approx(-2.0f * (z[2 * H + j] + bias[2 * H + j]));
            const float eo = exp_approx(-(z[3 * H + j] + bias[3 * H + j]));
            const float c_old = zero ? 0.0f : c_row[j];
            const float c = c_old / (1.0f + ef) + (1.0f - eg) / ((1.0f + ei) * (1.0f + eg));
            const float ec = exp_approx(-2.0f * c);
            const float h = (1.0f - ec) / ((1.0f + eo) * (1.0f + ec));
            c_row[j] = c;
            h_row[j] = h;
            o_row[j] = h;
        }
    }
}

INLINE float lerp(float self, float end, float weight) { /* torch's CPU lerp, both sides computed: a blend */
    const float near = self + weight * (end - self), far = end - (end - self) * (1.0f - weight);
    /* |weight| < 0.5, as torch's weight < 0.5 && weight > -0.5 (NaN: far), without the && whose branches kept
     * gcc from vectorizing the loops that call this */
    return __builtin_fabsf(weight) < 0.5f ? near : far;
}

INLINE float clip(float v, float bound) { return v < -bound ? -bound : (v > bound ? bound : v); } /* NaN stays */

INLINE void prefetch_small(const float *row, int64_t width) {
    for (int64_t k = 0; k < width; k += 16)
        __builtin_prefetch(row + k, 1, 3);
    __builtin_prefetch(row + width - 1, 1, 3); /* rows are not line-aligned: the last line may be one more */
}

typedef struct {
    float *table; /* [S, width] */
    int64_t S, width, I, O;
    const int64_t *slots, *cols; /* cols: the forecast columns [O]; NULL: every feature (O = I) */
    int64_t n;
    double level; /* train.level_rate: the level regressor's rate; 0: none (the row has no fields for it) */
} adapt_rows;

INLINE int64_t adapt_width(adapt_rows a) { return a.I + 1 + (a.level > 0.0 ? 9 : 4) * a.O; }

/* The pointers' shapes are checked by cpu_step.py; the indices here, where the check costs a pass over a few
 * integers (in torch, a min and a max of the slots were 2 ops more per wave). */
static int adapt_indices_ok(adapt_rows a) {
    for (int64_t r = 0; r < a.n; r++)
        if (a.slots[r] < 0 || a.slots[r] >= a.S)
            return 0;
    for (int64_t j = 0; a.cols != NULL && j < a.O; j++)
        if (a.cols[j] < 0 || a.cols[j] >= a.I)
            return 0;
    return a.width == adapt_width(a);
}

/* The row's fields, the wave's buffers and dx never overlap: no runtime alias checks (gcc versioned every loop
 * for them, ~3 per loop per row). */
#define IVDEP _Pragma("GCC ivdep")

/* The guard's running averages for one row: column j's target is dx[c] / scale[c] with c = COL(j). (Every feature
 * forecast, c = j: adapt_begin_body runs this, the scale's loop and FACTOR_LOOP as one loop.) */
#define SCORE_LOOP(COL)                                                                                            \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float target = clip(xd[COL] / scale[COL], clip_at), h = prev[j];                                     \
        cross[j] = lerp(cross[j], target * h, weight);                                                             \
        dd[j] = lerp(dd[j], h * h, weight);                                                                        \
        tt[j] = lerp(tt[j], target * target, weight);                                                              \
    }

#define FACTOR_LOOP(COL)                                                                                           \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float g = cross[j] / (dd[j] > 1e-12f ? dd[j] : 1e-12f);                                             \
        factor[r * O + j] = scale[COL] * (g < 0.0f ? 0.0f : (g > 1.0f ? 1.0f : g));                                \
    }

/* The scale's update for every input, and the LSTM's inputs clip(dx / new scale). */
#define SCALE_LOOP                                                                                                 \
    IVDEP for (int64_t i = 0; i < I; i++) {                                                                        \
        const float cap = scale[i] * scale_clip, size = xd[i] < 0 ? -xd[i] : xd[i];                                \
        const float s = lerp(scale[i], size < cap ? size : cap, rate);                                             \
        scale[i] = s < floor_at ? floor_at : s;                                                                    \
        in[i] = clip(xd[i] / scale[i], clip_at);                                                                   \
    }

INLINE float unit_clamp(float v) { return v < 0.0f ? 0.0f : (v > 1.0f ? 1.0f : v); } /* NaN stays */

/* The level regressor's share of scoring: its change forecast at the previous event (sprev) meets the same target. */
#define LEVEL_SCORE_LOOP(COL)                                                                                      \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float target = clip(xd[COL] / scale[COL], clip_at), h = prev[j], sp = sprev[j];                     \
        cs[j] = lerp(cs[j], target * sp, weight);                                                                  \
        ss[j] = lerp(ss[j], sp * sp, weight);                                                                      \
        ms[j] = lerp(ms[j], h * sp, weight);                                                                       \
    }

/* normalization.guard_coefficients for one column: the three candidates' (g, a) from the running averages, with its
 * arithmetic and its tie rule (a tie keeps the earlier candidate). */
INLINE void guard_pick(float cr, float d, float c2, float q, float m, float *g_out, float *a_out) {
    const float g0 = unit_clamp(cr / (d > 1e-12f ? d : 1e-12f)), a1 = unit_clamp(c2 / (q > 1e-12f ? q : 1e-12f));
    const float e0 = (g0 * d - 2.0f * cr) * g0, e1 = (a1 * q - 2.0f * c2) * a1;
    float det = d * q - m * m;
    det = det > 1e-12f ? det : 1e-12f;
    const float g2 = unit_clamp((cr * q - c2 * m) / det), a2 = unit_clamp((c2 * d - cr * m) / det);
    const float e2 = (g2 * d - 2.0f * cr) * g2 + (a2 * q - 2.0f * c2) * a2 + 2.0f * (g2 * a2) * m;
    const int alone = e1 < e0, both = (e2 < e0) & (e2 < e1); /* e2 < torch.minimum(e0, e1), NaN included (false) */
    *g_out = both ? g2 : (alone ? 0.0f : g0);
    *a_out = both ? a2 : (alone ? a1 : 0.0f);
}

/* After the scale's update: the level moves toward this event (weight 1 at a stream's first: it starts there), its
 * change in stream scales is the next sprev, and the guard picks (g, a); finish reads factor = g, offset = a sprev. */
#define LEVEL_LOOP(COL)                                                                                            \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float xv = xe[COL];                                                                                  \
        level[j] = lerp(level[j], xv, level_weight);                                                               \
        const float sp = clip((level[j] - xv) / scale[COL], clip_at);                                              \
        sprev[j] = sp;                                                                                             \
        float g, a_;                                                                                               \
        guard_pick(cross[j], dd[j], cs[j], ss[j], ms[j], &g, &a_);                                                 \
        factor[r * O + j] = g;                                                                                     \
        offset[r * O + j] = a_ * sp;                                                                               \
    }

INLINE void adapt_begin_body(adapt_rows a, const uint8_t *restrict reset, const float *restrict init,
                             const float *restrict dx, float *restrict inputs, float *restrict factor,
                             const float *restrict steps, int64_t nsteps, float clip_at, float scale_clip,
                             float floor_at, const float *restrict h_table, float *restrict h_out, int64_t H,
                             const float *restrict events, float *restrict offset) {
    const int64_t I = a.I, O = a.O;
    const int leveled = a.level > 0.0;
    /* normalization.adapt_begin's weight (n == 0) * (1 - r) + r, in its float32 rounding */
    const float level_rest = (float)(1.0 - a.level), level_rate = (float)a.level;
    for (int64_t r = 0; r < a.n; r++) {
        if (r + PREFETCH_ROWS < a.n) {
            prefetch_small(a.table + a.slots[r + PREFETCH_ROWS] * a.width, a.width);
            prefetch_row(h_table + a.slots[r + PREFETCH_ROWS] * H, H, 0);
        }
        /* layer 0's gather (gather_body's work for this row) */
        if (reset != NULL && reset[r])
            memset(h_out + r * H, 0, (size_t)H * sizeof(float));
        else
            memcpy(h_out + r * H, h_table + a.slots[r] * H, (size_t)H * sizeof(float));
        float *restrict row = a.table + a.slots[r] * a.width;
        if (reset != NULL && reset[r])
            memcpy(row, init, (size_t)a.width * sizeof(float));
        float *restrict scale = row, *restrict count = row + I, *restrict prev = row + I + 1;
        float *restrict cross = prev + O, *restrict dd = prev + 2 * O, *restrict tt = prev + 3 * O;
        const float *restrict xd = dx + r * I;
        int64_t k = (int64_t)count[0];
        k = k < nsteps - 1 ? k : nsteps - 1;
        const float rate = steps[2 * k], weight = steps[2 * k + 1];
        float *restrict in = inputs + r * I;
        /* every feature forecast (O = I), no level: the three loops below as one, same arithmetic */
        if (a.cols == NULL && !leveled) {
            IVDEP for (int64_t j = 0; j < I; j++) {
                const float x = xd[j], s_old = scale[j], h = prev[j], target = clip(x / s_old, clip_at);
                const float cr = lerp(cross[j], target * h, weight), d = lerp(dd[j], h * h, weight);
                cross[j] = cr, dd[j] = d, tt[j] = lerp(tt[j], target * target, weight);
                const float cap = s_old * scale_clip, size = x < 0 ? -x : x;
                float s = lerp(s_old, size < cap ? size : cap, rate);
                s = s < floor_at ? floor_at : s;
                scale[j] = s, in[j] = clip(x / s, clip_at);
                const float g = cr / (d > 1e-12f ? d : 1e-12f);
                factor[r * O + j] = s * (g < 0.0f ? 0.0f : (g > 1.0f ? 1.0f : g));
            }
            count[0] += 1.0f;
            continue;
        }
        if (leveled) {
            float *restrict sprev = prev + 4 * O, *restrict cs = prev + 5 * O, *restrict ss = prev + 6 * O;
            float *restrict ms = prev + 7 * O, *restrict level = prev + 8 * O;
            const float *restrict xe = events + r * I;
            const float level_weight = (k == 0 ? level_rest : 0.0f) + level_rate;
            /* the level's fields follow tt; scored, like the model's, in the scale before this change */
            if (a.cols == NULL) {
                SCORE_LOOP(j)
                LEVEL_SCORE_LOOP(j)
                SCALE_LOOP
                LEVEL_LOOP(j)
            } else {
                SCORE_LOOP(a.cols[j])
                LEVEL_SCORE_LOOP(a.cols[j])
                SCALE_LOOP
                LEVEL_LOOP(a.cols[j])
            }
            count[0] += 1.0f;
            continue;
        }
        SCORE_LOOP(a.cols[j])
        SCALE_LOOP
        /* finish's factor scale[c] * gain, while the row is in L1: finish then writes prev only */
        FACTOR_LOOP(a.cols[j])
        count[0] += 1.0f;
    }
}

#define FINISH_LOOP(COL)                                                                                           \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float ch = change[r * O + j];                                                                        \
        prev[j] = ch;                                                                                              \
        out[r * O + j] = x[r * I + COL] + factor[r * O + j] * ch;                                                  \
    }

/* With the level: normalization.adapt_finish's x + scale * (g * change + a * sprev), begin's g and a * sprev. */
#define FINISH_LEVEL_LOOP(COL)                                                                                     \
    IVDEP for (int64_t j = 0; j < O; j++) {                                                                        \
        const float ch = change[r * O + j];                                                                        \
        prev[j] = ch;                                                                                              \
        out[r * O + j] = x[r * I + COL] + scale[COL] * (factor[r * O + j] * ch + offset[r * O + j]);               \
    }

/* Only prev is written back to the rows (prefetched for writing); the rest is sequential. With the level
 * (offset != NULL) the row's scale is read too. */
INLINE void adapt_finish_body(adapt_rows a, const float *restrict factor, const float *restrict x,
                              const float *restrict change, float *restrict out, const float *restrict offset) {
    const int64_t I = a.I, O = a.O;
    for (int64_t r = 0; r < a.n; r++) {
        if (r + PREFETCH_ROWS < a.n) {
            const float *ahead = a.table + a.slots[r + PREFETCH_ROWS] * a.width;
            __builtin_prefetch(ahead + I + 1, 1, 3);
            if (offset != NULL)
                __builtin_prefetch(ahead, 0, 3);
        }
        float *restrict prev = a.table + a.slots[r] * a.width + I + 1;
        if (offset != NULL) {
            const float *restrict scale = a.table + a.slots[r] * a.width;
            if (a.cols == NULL) {
                FINISH_LEVEL_LOOP(j)
            } else {
                FINISH_LEVEL_LOOP(a.cols[j])
            }
        } else if (a.cols == NULL) {
            FINISH_LOOP(j)
        } else {
            FINISH_LOOP(a.cols[j])
        }
    }
}

#define BEGIN_ARGS                                                                                                 \
    adapt_rows a, const uint8_t *restrict reset, const float *restrict init, const float *restrict dx,             \
        float *restrict inputs, float *restrict factor, const float *restrict steps, int64_t nsteps, float clip_at, \
        float scale_clip, float floor_at, const float *restrict h_table, float *restrict h_out, int64_t H,         \
        const float *restrict events, float *restrict offset
#define BEGIN_CALL                                                                                                 \
    a, reset, init, dx, inputs, factor, steps, nsteps, clip_at, scale_clip, floor_at, h_table, h_out, H, events, offset
#define FINISH_ARGS                                                                                                \
    adapt_rows a, const float *restrict factor, const float *restrict x, const float *restrict change,             \
        float *restrict out, const float *restrict offset
#define FINISH_CALL a, factor, x, change, out, offset

#define GATHER_ARGS \
    const float *restrict table, const int64_t *restrict slots, const uint8_t *restrict reset, float *restrict out, \
        int64_t n, int64_t H
#define GATHER_CALL table, slots, reset, out, n, H
#define CELL_ARGS                                                                                          \
    const float *restrict gates, const float *restrict bias, float *restrict c_table, float *restrict h_table, \
        const int64_t *restrict slots, const uint8_t *restrict reset, float *restrict h_out, int64_t n, int64_t H
#define CELL_CALL gates, bias, c_table, h_table, slots, reset, h_out, n, H

typedef void (*gather_fn)(GATHER_ARGS);
typedef void (*cell_fn)(CELL_ARGS);
typedef void (*begin_fn)(BEGIN_ARGS);
typedef void (*finish_fn)(FINISH_ARGS);

static void gather_base(GATHER_ARGS) { gather_body(GATHER_CALL); }
static void cell_base(CELL_ARGS) { cell_body(CELL_CALL); }
static void begin_base(BEGIN_ARGS) { adapt_begin_body(BEGIN_CALL); }
static void finish_base(FINISH_ARGS) { adapt_finish_body(FINISH_CALL); }
#if defined(__x86_64__) && defined(__GNUC__)
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
AVX512 static void gather_avx512(GATHER_ARGS) { gather_body(GATHER_CALL); }
AVX512 static void cell_avx512(CELL_ARGS) { cell_body(CELL_CALL); }
AVX512 static void begin_avx512(BEGIN_ARGS) { adapt_begin_body(BEGIN_CALL); }
AVX512 static void finish_avx512(FINISH_ARGS) { adapt_finish_body(FINISH_CALL); }
AVX2 static void gather_avx2(GATHER_ARGS) { gather_body(GATHER_CALL); }
AVX2 static void cell_avx2(CELL_ARGS) { cell_body(CELL_CALL); }
AVX2 static void begin_avx2(BEGIN_ARGS) { adapt_begin_body(BEGIN_CALL); }
AVX2 static void finish_avx2(FINISH_ARGS) { adapt_finish_body(FINISH_CALL); }
#endif

static gather_fn gather_impl = gather_base;
static cell_fn cell_impl = cell_base;
static begin_fn begin_impl = begin_base;
static finish_fn finish_impl = finish_base;
static const char *isa = "baseline";

/* Pointers arrive as integers (torch.Tensor.data_ptr()); cpu_step.py checks dtype, device, contiguity and
 * shapes before every call, since nothing here can. reset = 0 means no row is reset. */
static PyObject *py_gather_rows(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long table, slots, reset, out;
    long long n, H;
    if (!PyArg_ParseTuple(args, "KKKKLL", &table, &slots, &reset, &out, &n, &H))
        return NULL;
    Py_BEGIN_ALLOW_THREADS gather_impl((const float *)(uintptr_t)table, (const int64_t *)(uintptr_t)slots,
                                       (const uint8_t *)(uintptr_t)reset, (float *)(uintptr_t)out, n, H);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_lstm_cell(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long gates, bias, c_table, h_table, slots, reset, h_out;
    long long n, H;
    if (!PyArg_ParseTuple(args, "KKKKKKKLL", &gates, &bias, &c_table, &h_table, &slots, &reset, &h_out, &n, &H))
        return NULL;
    Py_BEGIN_ALLOW_THREADS cell_impl((const float *)(uintptr_t)gates, (const float *)(uintptr_t)bias,
                                     (float *)(uintptr_t)c_table, (float *)(uintptr_t)h_table,
                                     (const int64_t *)(uintptr_t)slots, (const uint8_t *)(uintptr_t)reset,
                                     (float *)(uintptr_t)h_out, n, H);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

#define PTR(type, v) ((type)(uintptr_t)(v))

#define WIDTH_ERROR                                                                                                \
    "a slot outside [0, %lld), a column outside [0, %lld), a row width other than I + 1 + 4 O (I + 1 + 9 O with "  \
    "the level) or the level's buffers missing"

static PyObject *py_adapt_begin(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long table, slots, cols, reset, init, dx, inputs, factor, steps, h_table, h_out, events, offset;
    long long S, width, I, O, n, nsteps, H;
    float clip_at, scale_clip, floor_at;
    double level;
    if (!PyArg_ParseTuple(args, "KLLKKLLLKKKKKKLfffKKLdKK", &table, &S, &width, &slots, &cols, &n, &I, &O, &reset,
                          &init, &dx, &inputs, &factor, &steps, &nsteps, &clip_at, &scale_clip, &floor_at, &h_table,
                          &h_out, &H, &level, &events, &offset))
        return NULL;
    adapt_rows a = {PTR(float *, table), S, width, I, O, PTR(const int64_t *, slots), PTR(const int64_t *, cols), n,
                    level};
    if (!adapt_indices_ok(a) || (level > 0.0 && (events == 0 || offset == 0)))
        return PyErr_Format(PyExc_ValueError, "adapt_begin: " WIDTH_ERROR, S, I);
    Py_BEGIN_ALLOW_THREADS begin_impl(a, PTR(const uint8_t *, reset), PTR(const float *, init),
                                            PTR(const float *, dx), PTR(float *, inputs), PTR(float *, factor),
                                            PTR(const float *, steps), nsteps, clip_at, scale_clip, floor_at,
                                            PTR(const float *, h_table), PTR(float *, h_out), H,
                                            PTR(const float *, events), PTR(float *, offset));
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_adapt_finish(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long table, slots, cols, factor, x, change, out, offset;
    long long S, width, I, O, n;
    double level;
    if (!PyArg_ParseTuple(args, "KLLKKLLLKKKKdK", &table, &S, &width, &slots, &cols, &n, &I, &O, &factor, &x, &change,
                          &out, &level, &offset))
        return NULL;
    adapt_rows a = {PTR(float *, table), S, width, I, O, PTR(const int64_t *, slots), PTR(const int64_t *, cols), n,
                    level};
    if (!adapt_indices_ok(a) || (level > 0.0 && offset == 0))
        return PyErr_Format(PyExc_ValueError, "adapt_finish: " WIDTH_ERROR, S, I);
    Py_BEGIN_ALLOW_THREADS finish_impl(a, PTR(const float *, factor), PTR(const float *, x), PTR(const float *, change),
                                       PTR(float *, out), level > 0.0 ? PTR(const float *, offset) : NULL);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"adapt_begin", py_adapt_begin, METH_VARARGS,
     "adapt_begin(table, S, width, slots, cols, n, I, O, reset, init, dx, inputs, factor, steps, nsteps, clip, "
     "scale_clip, floor, h_table, h_out, H, level, events, offset): per-stream adaptation before the step "
     "(normalization.adapt_begin) and layer 0's gather_rows(h_table, slots, reset, h_out, n, H), one pass "
     "(pointers); level > 0: the level regressor's, from the events, with a * sprev in offset"},
    {"adapt_finish", py_adapt_finish, METH_VARARGS,
     "adapt_finish(table, S, width, slots, cols, n, I, O, factor, x, change, out, level, offset): the guarded "
     "forecast (normalization.adapt_finish)"},
    {"gather_rows", py_gather_rows, METH_VARARGS,
     "gather_rows(table, slots, reset, out, n, H): out[r] = 0 if reset[r] else table[slots[r]] (pointers)"},
    {"lstm_cell", py_lstm_cell, METH_VARARGS,
     "lstm_cell(gates, bias, c, h, slots, reset, h_out, n, H): the LSTM cell's element-wise part and scatter"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT, .m_name = "_cpu_kernel", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__cpu_kernel(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw")) {
        gather_impl = gather_avx512, cell_impl = cell_avx512, isa = "avx512";
        begin_impl = begin_avx512, finish_impl = finish_avx512;
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        gather_impl = gather_avx2, cell_impl = cell_avx2, isa = "avx2";
        begin_impl = begin_avx2, finish_impl = finish_avx2;
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
