/* A fake libcuda.so.1 for testing fpdt's cuda backend on machines without a
 * GPU: "device" memory is host memory, copies are memcpy, events complete
 * when recorded (timestamped with the host clock), and cuLaunchKernel runs
 * the few test kernels of runtime/tests/cuda.rs and comm's reductions
 * (comm/kernels/reduce.ptx) natively (others are
 * no-ops). It checks what a real driver would refuse where that is cheap:
 * unknown handles, frees of unknown pointers, a launch asking for more
 * dynamic shared memory than its function's attribute allows, no current
 * context. Build: cc -shared -fPIC -o libcuda.so.1 fake_cuda.c
 * It is a test double, not a driver: timing and concurrency are not real. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include <time.h>

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
#define OK 0
#define INVALID_VALUE 1
#define OUT_OF_MEMORY 2
#define NOT_INITIALIZED 3
#define INVALID_CONTEXT 201
#define INVALID_HANDLE 400
#define NOT_FOUND 500
#define LAUNCH_OUT_OF_RESOURCES 701
#define LAUNCH_FAILED 719

static int initialized;
static __thread void *current_ctx;
static int ctx_token = 7;
static size_t free_bytes = (size_t)8 << 30;

CUresult cuInit(unsigned flags) { (void)flags; initialized = 1; return OK; }
CUresult cuDriverGetVersion(int *v) { *v = 13000; return OK; }
CUresult cuGetErrorName(CUresult r, const char **s) {
    switch (r) {
    case OUT_OF_MEMORY: *s = "CUDA_ERROR_OUT_OF_MEMORY"; return OK;
    case INVALID_VALUE: *s = "CUDA_ERROR_INVALID_VALUE"; return OK;
    case INVALID_CONTEXT: *s = "CUDA_ERROR_INVALID_CONTEXT"; return OK;
    case LAUNCH_OUT_OF_RESOURCES: *s = "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES"; return OK;
    case LAUNCH_FAILED: *s = "CUDA_ERROR_LAUNCH_FAILED"; return OK;
    default: *s = "CUDA_ERROR_FAKE"; return OK;
    }
}
CUresult cuGetErrorString(CUresult r, const char **s) {
    (void)r; *s = "reported by the fake driver"; return OK;
}
CUresult cuDeviceGetCount(int *n) { if (!initialized) return NOT_INITIALIZED; *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice *d, int ordinal) {
    if (ordinal != 0) return INVALID_VALUE; *d = 0; return OK;
}
CUresult cuDeviceGetName(char *name, int len, CUdevice d) {
    (void)d; strncpy(name, "Fake GPU", (size_t)len); return OK;
}
CUresult cuDeviceGetPCIBusId(char *id, int len, CUdevice d) {
    (void)d; strncpy(id, "0000:1B:00.0", (size_t)len); return OK;
}
CUresult cuDeviceTotalMem_v2(size_t *b, CUdevice d) { (void)d; *b = (size_t)8 << 30; return OK; }
CUresult cuDeviceGetAttribute(int *v, int attr, CUdevice d) {
    (void)d;
    switch (attr) {
    case 1: *v = 1024; break;            /* max threads per block */
    case 5: *v = 2147483647; break;      /* grid x */
    case 6: case 7: *v = 65535; break;   /* grid y, z */
    case 16: *v = 4; break;              /* SMs */
    case 75: *v = 9; break;              /* cc major */
    case 76: *v = 0; break;              /* cc minor */
    case 40: *v = 2; break;              /* copy engines */
    case 97: *v = 227 * 1024; break;     /* shared memory opt-in */
    default: return INVALID_VALUE;
    }
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(void **ctx, CUdevice d) { (void)d; *ctx = &ctx_token; return OK; }
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { (void)d; return OK; }
CUresult cuCtxSetCurrent(void *ctx) {
    if (ctx != &ctx_token) return INVALID_CONTEXT; current_ctx = ctx; return OK;
}
#define NEED_CTX do { if (current_ctx != &ctx_token) return INVALID_CONTEXT; } while (0)
CUresult cuMemGetInfo_v2(size_t *f, size_t *t) { NEED_CTX; *f = free_bytes; *t = (size_t)8 << 30; return OK; }

/* Allocations: a short table, so a free of an unknown pointer fails. */
#define MAXA 64
static void *allocs[MAXA];
static size_t alloc_len[MAXA];
CUresult cuMemAlloc_v2(CUdeviceptr *p, size_t n) {
    NEED_CTX;
    if (n > free_bytes) return OUT_OF_MEMORY;
    void *m = NULL;
    if (posix_memalign(&m, 4096, n) != 0) return OUT_OF_MEMORY;
    for (int i = 0; i < MAXA; i++) if (!allocs[i]) {
        allocs[i] = m; alloc_len[i] = n; *p = (CUdeviceptr)(uintptr_t)m; return OK;
    }
    free(m); return OUT_OF_MEMORY;
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    NEED_CTX;
    for (int i = 0; i < MAXA; i++) if (allocs[i] == (void *)(uintptr_t)p) { free(allocs[i]); allocs[i] = NULL; return OK; }
    return INVALID_VALUE;
}
/* Test support: the device allocation holding `p` (its base and length),
 * so a launch hook can run a kernel over the memory its pointers reach. */
int fake_cuda_allocation(CUdeviceptr p, CUdeviceptr *base, size_t *len) {
    for (int i = 0; i < MAXA; i++) {
        uintptr_t b = (uintptr_t)allocs[i];
        if (allocs[i] && p >= b && p < b + alloc_len[i]) { *base = b; *len = alloc_len[i]; return 1; }
    }
    return 0;
}
CUresult cuMemHostRegister_v2(void *p, size_t n, unsigned flags) { NEED_CTX; (void)p; (void)n; (void)flags; return OK; }
CUresult cuMemHostUnregister(void *p) { NEED_CTX; (void)p; return OK; }

/* Streams and events. */
typedef struct { int magic; } Stream;
typedef struct { int magic; double t_ms; int recorded; } Event;
#define SMAGIC 0x5157
#define EMAGIC 0x4556
static double now_ms(void) {
    struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}
static int bad_stream(void *s) { return s && ((Stream *)s)->magic != SMAGIC; }
CUresult cuStreamCreate(void **s, unsigned flags) {
    NEED_CTX; (void)flags; Stream *x = malloc(sizeof *x); x->magic = SMAGIC; *s = x; return OK;
}
CUresult cuStreamDestroy_v2(void *s) { if (!s || bad_stream(s)) return INVALID_HANDLE; ((Stream *)s)->magic = 0; free(s); return OK; }
CUresult cuStreamSynchronize(void *s) { return bad_stream(s) ? INVALID_HANDLE : OK; }
CUresult cuStreamWaitEvent(void *s, void *e, unsigned f) {
    (void)f; if (bad_stream(s) || !e || ((Event *)e)->magic != EMAGIC) return INVALID_HANDLE; return OK;
}
CUresult cuEventCreate(void **e, unsigned flags) {
    NEED_CTX; (void)flags; Event *x = calloc(1, sizeof *x); x->magic = EMAGIC; *e = x; return OK;
}
CUresult cuEventDestroy_v2(void *e) { if (!e || ((Event *)e)->magic != EMAGIC) return INVALID_HANDLE; ((Event *)e)->magic = 0; free(e); return OK; }
CUresult cuEventRecord(void *e, void *s) {
    if (!e || ((Event *)e)->magic != EMAGIC || bad_stream(s)) return INVALID_HANDLE;
    ((Event *)e)->t_ms = now_ms(); ((Event *)e)->recorded = 1; return OK;
}
CUresult cuEventQuery(void *e) { return (!e || ((Event *)e)->magic != EMAGIC) ? INVALID_HANDLE : OK; }
CUresult cuEventSynchronize(void *e) { return cuEventQuery(e); }
CUresult cuEventElapsedTime(float *ms, void *a, void *b) {
    Event *x = a, *y = b;
    if (!x || !y || x->magic != EMAGIC || y->magic != EMAGIC) return INVALID_HANDLE;
    if (!x->recorded || !y->recorded) return INVALID_HANDLE;
    *ms = (float)(y->t_ms - x->t_ms); return OK;
}
CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, void *s) {
    if (bad_stream(s)) return INVALID_HANDLE;
    memcpy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, n); return OK;
}

/* Modules and the test kernels. */
typedef struct { int magic; char name[64]; int shared_allowed; const char *module; } Function;
/* Test support: kernels other than the native ones go to this hook when a
 * process installs one (fpdt_runtime::cuda::fake runs them in the PTX
 * interpreter); it returns 0 on success. dims: grid x y z, block x y z. */
typedef int (*LaunchHook)(const char *ptx, const char *entry, const unsigned *dims,
                          unsigned shared, void **params);
static LaunchHook launch_hook;
void fake_cuda_set_launch_hook(LaunchHook h) { launch_hook = h; }
#define FMAGIC 0x464e
CUresult cuModuleLoadDataEx(void **m, const void *image, unsigned n, int *opts, void **vals) {
    NEED_CTX; (void)n; (void)opts; (void)vals;
    if (!image || !strstr((const char *)image, ".entry")) return INVALID_VALUE;
    *m = strdup((const char *)image); /* the caller may free its image */
    return OK;
}
CUresult cuModuleUnload(void *m) { free(m); return OK; }
CUresult cuModuleGetFunction(void **f, void *m, const char *name) {
    NEED_CTX;
    char pat[80]; snprintf(pat, sizeof pat, ".entry %s", name);
    if (!strstr((const char *)m, pat)) return NOT_FOUND;
    Function *x = calloc(1, sizeof *x); x->magic = FMAGIC; x->shared_allowed = 48 * 1024;
    strncpy(x->name, name, sizeof x->name - 1); x->module = m; *f = x; return OK;
}
CUresult cuFuncSetAttribute(void *f, int attr, int v) {
    Function *x = f; if (!x || x->magic != FMAGIC) return INVALID_HANDLE;
    if (attr == 8) { if (v > 227 * 1024) return INVALID_VALUE; x->shared_allowed = v; }
    return OK;
}
/* comm/kernels/reduce.ptx's entries, natively: out = in0 op in1 op ... in
 * rank order, in float (double for f64), rounded once; op 0 sum, 1 avg,
 * 2 max, 3 min, a NaN wins for max and min. */
static double fake_load(const char *dt, const void *p, unsigned i) {
    if (!strcmp(dt, "f32")) return ((const float *)p)[i];
    if (!strcmp(dt, "f64")) return ((const double *)p)[i];
    if (!strcmp(dt, "bf16")) return bf16_to_float(((const uint16_t *)p)[i]);
    return (float)((const _Float16 *)p)[i];
}
static int fake_reduce(const char *dt, void **params) {
    void *out = *(void **)params[0];
    unsigned n = *(unsigned *)params[1], count = *(unsigned *)params[2], op = *(unsigned *)params[3];
    int wide = !strcmp(dt, "f64");
    if (count < 1 || count > 8 || op > 3) return INVALID_VALUE;
    for (unsigned i = 0; i < n; i++) {
        double a = fake_load(dt, *(void **)params[4], i);
        float af = (float)a;
        for (unsigned k = 1; k < count; k++) {
            double x = fake_load(dt, *(void **)params[4 + k], i);
            float xf = (float)x;
            if (wide) {
                if (op <= 1) a = a + x;
                else if (a == a && (x != x || (op == 2 ? x > a : x < a))) a = x;
            } else {
                if (op <= 1) af = af + xf;
                else if (af == af && (xf != xf || (op == 2 ? xf > af : xf < af))) af = xf;
            }
        }
        if (op == 1) { if (wide) a = a / (double)count; else af = af / (float)count; }
        if (!strcmp(dt, "f32")) ((float *)out)[i] = af;
        else if (wide) ((double *)out)[i] = a;
        else if (!strcmp(dt, "bf16")) ((uint16_t *)out)[i] = float_to_bf16(af);
        else ((_Float16 *)out)[i] = (_Float16)af;
    }
    return OK;
}

/* Host functions run at once: the fake's streams complete as enqueued. */
CUresult cuLaunchHostFunc(void *s, void (*fn)(void *), void *user) {
    if (bad_stream(s) || !fn) return INVALID_HANDLE;
    fn(user);
    return OK;
}

CUresult cuLaunchKernel(void *f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned shared, void *s, void **params, void **extra) {
    (void)extra;
    Function *x = f;
    if (!x || x->magic != FMAGIC || bad_stream(s)) return INVALID_HANDLE;
    if ((int)shared > x->shared_allowed) return LAUNCH_OUT_OF_RESOURCES;
    if (bx * by * bz > 1024) return INVALID_VALUE;
    if (!strcmp(x->name, "add_one_f32")) {
        float *out = *(float **)params[0]; const float *in = *(float **)params[1];
        unsigned n = *(unsigned *)params[2];
        for (unsigned i = 0; i < n && i < gx * bx; i++) out[i] = in[i] + 1.0f;
    } else if (!strcmp(x->name, "reverse_shared")) {
        float *out = *(float **)params[0]; const float *in = *(float **)params[1];
        unsigned n = *(unsigned *)params[2];
        if ((size_t)n * 4 > shared) return LAUNCH_OUT_OF_RESOURCES;
        for (unsigned i = 0; i < n; i++) out[i] = in[n - 1 - i];
    } else if (!strncmp(x->name, "reduce_", 7)) {
        return fake_reduce(x->name + 7, params);
    } else if (!strcmp(x->name, "spin")) {
        float *out = *(float **)params[0]; out[0] = 1.0f;
    } else if (launch_hook) {
        unsigned dims[6] = {gx, gy, gz, bx, by, bz};
        if (launch_hook(x->module, x->name, dims, shared, params) != 0) return LAUNCH_FAILED;
    }
    return OK;
}
