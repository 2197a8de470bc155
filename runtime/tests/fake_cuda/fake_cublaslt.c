/* A fake libcublasLt.so for testing fpdt's cuBLASLt binding and the model's
 * GEMMs on machines without a GPU, beside fake_cuda.c (whose "device"
 * memory is host memory and whose streams run work when it is enqueued).
 * cublasLtMatmul computes D = alpha op(A) op(B) + beta C (+ bias[row]) in
 * column-major order right away, on the host: A and B bf16, C and D bf16
 * or f32 (C is D in fpdt), f32 accumulation in k order, D rounded once.
 * It refuses what the real library would where that is cheap: unknown
 * handles and descriptors, types other than these, leading dimensions
 * below the stored rows, a null A, B or D, a workspace smaller than the
 * heuristic asked for. Build:
 *   cc -shared -fPIC -o libcublasLt.so.13 fake_cublaslt.c
 * It is a test double: no speed, no algorithms, no concurrency. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

typedef int Status;
#define SUCCESS 0
#define NOT_INITIALIZED 1
#define INVALID_VALUE 7
#define NOT_SUPPORTED 15

#define R_32F 0
#define R_16BF 14
#define COMPUTE_32F 68

#define HMAGIC 0x484c
#define DMAGIC 0x444c
#define LMAGIC 0x4c4c
#define PMAGIC 0x504c

typedef struct { int magic; } Handle;
typedef struct {
    int magic;
    int32_t transa, transb;
    uint32_t epilogue;
    const void *bias;
    int32_t bias_type;
} Desc;
typedef struct { int magic; int type; uint64_t rows, cols; int64_t ld; } Layout;
typedef struct { int magic; uint64_t max_workspace; } Pref;
typedef struct { uint64_t data[8]; } Algo;
typedef struct {
    Algo algo;
    size_t workspace_size;
    Status state;
    float waves_count;
    int reserved[4];
} Heuristic;

size_t cublasLtGetVersion(void) { return 130100; }

const char *cublasLtGetStatusName(Status s) {
    switch (s) {
    case SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    default: return "CUBLAS_STATUS_UNKNOWN";
    }
}
const char *cublasLtGetStatusString(Status s) {
    switch (s) {
    case SUCCESS: return "success";
    case INVALID_VALUE: return "an invalid value was used as an argument (fake cuBLASLt)";
    case NOT_SUPPORTED: return "the functionality requested is not supported (fake cuBLASLt)";
    default: return "unknown error (fake cuBLASLt)";
    }
}

Status cublasLtCreate(void **h) {
    if (!h) return INVALID_VALUE;
    Handle *x = malloc(sizeof *x); x->magic = HMAGIC; *h = x; return SUCCESS;
}
Status cublasLtDestroy(void *h) {
    Handle *x = h; if (!x || x->magic != HMAGIC) return NOT_INITIALIZED;
    x->magic = 0; free(x); return SUCCESS;
}

Status cublasLtMatmulDescCreate(void **d, int compute, int scale) {
    if (!d || compute != COMPUTE_32F || scale != R_32F) return NOT_SUPPORTED;
    Desc *x = calloc(1, sizeof *x); x->magic = DMAGIC; x->epilogue = 1; x->bias_type = -1;
    *d = x; return SUCCESS;
}
Status cublasLtMatmulDescSetAttribute(void *d, int attr, const void *buf, size_t n) {
    Desc *x = d; if (!x || x->magic != DMAGIC || !buf) return INVALID_VALUE;
    switch (attr) {
    case 3: if (n != 4) return INVALID_VALUE; memcpy(&x->transa, buf, 4); break;
    case 4: if (n != 4) return INVALID_VALUE; memcpy(&x->transb, buf, 4); break;
    case 7: if (n != 4) return INVALID_VALUE; memcpy(&x->epilogue, buf, 4); break;
    case 8: if (n != sizeof(void *)) return INVALID_VALUE; memcpy(&x->bias, buf, n); break;
    case 26: if (n != 4) return INVALID_VALUE; memcpy(&x->bias_type, buf, 4); break;
    default: return NOT_SUPPORTED;
    }
    return SUCCESS;
}
Status cublasLtMatmulDescDestroy(void *d) {
    Desc *x = d; if (!x || x->magic != DMAGIC) return INVALID_VALUE;
    x->magic = 0; free(x); return SUCCESS;
}

Status cublasLtMatrixLayoutCreate(void **l, int type, uint64_t rows, uint64_t cols, int64_t ld) {
    if (!l) return INVALID_VALUE;
    if (type != R_32F && type != R_16BF) return NOT_SUPPORTED;
    if (rows == 0 || cols == 0 || ld < (int64_t)rows) return INVALID_VALUE;
    Layout *x = malloc(sizeof *x);
    x->magic = LMAGIC; x->type = type; x->rows = rows; x->cols = cols; x->ld = ld;
    *l = x; return SUCCESS;
}
Status cublasLtMatrixLayoutSetAttribute(void *l, int attr, const void *buf, size_t n) {
    (void)attr; (void)buf; (void)n;
    Layout *x = l; return (!x || x->magic != LMAGIC) ? INVALID_VALUE : NOT_SUPPORTED;
}
Status cublasLtMatrixLayoutDestroy(void *l) {
    Layout *x = l; if (!x || x->magic != LMAGIC) return INVALID_VALUE;
    x->magic = 0; free(x); return SUCCESS;
}

Status cublasLtMatmulPreferenceCreate(void **p) {
    if (!p) return INVALID_VALUE;
    Pref *x = calloc(1, sizeof *x); x->magic = PMAGIC; *p = x; return SUCCESS;
}
Status cublasLtMatmulPreferenceSetAttribute(void *p, int attr, const void *buf, size_t n) {
    Pref *x = p; if (!x || x->magic != PMAGIC || !buf) return INVALID_VALUE;
    if (attr == 1 && n == 8) memcpy(&x->max_workspace, buf, 8);
    return SUCCESS;
}
Status cublasLtMatmulPreferenceDestroy(void *p) {
    Pref *x = p; if (!x || x->magic != PMAGIC) return INVALID_VALUE;
    x->magic = 0; free(x); return SUCCESS;
}

/* The one "algorithm": no workspace. */
Status cublasLtMatmulAlgoGetHeuristic(void *h, void *d, void *a, void *b, void *c, void *dd,
                                      void *p, int requested, Heuristic *out, int *returned) {
    Handle *hx = h;
    if (!hx || hx->magic != HMAGIC) return NOT_INITIALIZED;
    if (!d || !a || !b || !c || !dd || !p || requested < 1 || !out || !returned) return INVALID_VALUE;
    memset(out, 0, sizeof *out);
    out->state = SUCCESS; out->waves_count = 1.0f;
    *returned = 1;
    return SUCCESS;
}

static float load(int type, const void *p, uint64_t i) {
    return type == R_32F ? ((const float *)p)[i] : bf16_to_float(((const uint16_t *)p)[i]);
}

Status cublasLtMatmul(void *h, void *desc, const void *alpha, const void *A, void *la,
                      const void *B, void *lb, const void *beta, const void *C, void *lc,
                      void *D, void *ld, const Algo *algo, void *ws, size_t ws_bytes,
                      void *stream) {
    (void)ws; (void)ws_bytes; (void)stream; (void)algo;
    Handle *hx = h; Desc *dx = desc;
    Layout *a = la, *b = lb, *c = lc, *d = ld;
    if (!hx || hx->magic != HMAGIC) return NOT_INITIALIZED;
    if (!dx || dx->magic != DMAGIC || !a || a->magic != LMAGIC || !b || b->magic != LMAGIC ||
        !c || c->magic != LMAGIC || !d || d->magic != LMAGIC)
        return INVALID_VALUE;
    if (!alpha || !beta || !A || !B || !D) return INVALID_VALUE;
    if (a->type != R_16BF || b->type != R_16BF || c->type != d->type) return NOT_SUPPORTED;
    int ta = dx->transa == 1, tb = dx->transb == 1;
    uint64_t m = d->rows, n = d->cols;
    uint64_t k = ta ? a->rows : a->cols;
    if ((ta ? a->cols : a->rows) != m) return INVALID_VALUE;
    if ((tb ? b->rows : b->cols) != n || (tb ? b->cols : b->rows) != k) return INVALID_VALUE;
    int bias = dx->epilogue == 4;
    if (bias && !dx->bias) return INVALID_VALUE;
    int bias_type = dx->bias_type < 0 ? d->type : dx->bias_type;
    float al, be;
    memcpy(&al, alpha, 4); memcpy(&be, beta, 4);
    const void *Cp = C ? C : D;
    for (uint64_t j = 0; j < n; j++) {
        for (uint64_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (uint64_t p = 0; p < k; p++) {
                float x = bf16_to_float(((const uint16_t *)A)[ta ? p + i * a->ld : i + p * a->ld]);
                float y = bf16_to_float(((const uint16_t *)B)[tb ? j + p * b->ld : p + j * b->ld]);
                acc += x * y;
            }
            float v = al * acc;
            if (be != 0.0f) v += be * load(c->type, Cp, i + j * c->ld);
            if (bias) v += load(bias_type, dx->bias, i);
            uint64_t at = i + j * d->ld;
            if (d->type == R_32F) ((float *)D)[at] = v;
            else ((uint16_t *)D)[at] = float_to_bf16(v);
        }
    }
    return SUCCESS;
}
