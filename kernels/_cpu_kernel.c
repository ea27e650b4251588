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

static void gather_base(GATHER_ARGS) { gather_body(GATHER_CALL); }
static void cell_base(CELL_ARGS) { cell_body(CELL_CALL); }
#if defined(__x86_64__) && defined(__GNUC__)
#define AVX512 __attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
#define AVX2 __attribute__((target("avx2,fma")))
AVX512 static void gather_avx512(GATHER_ARGS) { gather_body(GATHER_CALL); }
AVX512 static void cell_avx512(CELL_ARGS) { cell_body(CELL_CALL); }
AVX2 static void gather_avx2(GATHER_ARGS) { gather_body(GATHER_CALL); }
AVX2 static void cell_avx2(CELL_ARGS) { cell_body(CELL_CALL); }
#endif

static gather_fn gather_impl = gather_base;
static cell_fn cell_impl = cell_base;
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

static PyMethodDef methods[] = {
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
    } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
        gather_impl = gather_avx2, cell_impl = cell_avx2, isa = "avx2";
    }
#endif
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddStringConstant(m, "ISA", isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
