/* A stand-in libnvrtc for GStreamer 1.22's CUDA converters on a CUDA 13 machine.
 *
 * GStreamer 1.22 compiles its CUDA kernels with --gpu-architecture=compute_52 (compute_30
 * for old NVRTCs); CUDA 13's NVRTC no longer takes either, so nvcodec registers no
 * cudaconvertscale there. This library forwards every call to the real NVRTC
 * (EDGECAM_REAL_NVRTC, default libnvrtc.so.13) and swaps that option for
 * EDGECAM_NVRTC_ARCH (default --gpu-architecture=compute_90, the H100/H200's).
 * Used only to run the nvidia media backend on the GPU benchmark machine:
 *   GST_CUDA_NVRTC_LIBNAME=/path/to/libnvrtc_arch.so
 * Build: gcc -O2 -shared -fPIC -o libnvrtc_arch.so nvrtc_arch.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int result_t; /* nvrtcResult */
typedef void *program_t; /* nvrtcProgram */

static void *real_symbol(const char *name)
{
    static void *lib;
    if (lib == NULL) {
        const char *path = getenv("EDGECAM_REAL_NVRTC");
        lib = dlopen(path != NULL ? path : "libnvrtc.so.13", RTLD_NOW | RTLD_LOCAL);
        if (lib == NULL)
            return NULL;
    }
    return dlsym(lib, name);
}

#define FORWARD(name, params, args)                                   \
    result_t name params                                              \
    {                                                                 \
        result_t(*f) params = (result_t(*) params)real_symbol(#name); \
        return f != NULL ? f args : 7; /* NVRTC_ERROR_INTERNAL_ERROR */ \
    }

FORWARD(nvrtcCreateProgram,
        (program_t * prog, const char *src, const char *name, int n, const char *const *headers,
         const char *const *includes),
        (prog, src, name, n, headers, includes))
FORWARD(nvrtcDestroyProgram, (program_t * prog), (prog))
FORWARD(nvrtcGetPTX, (program_t prog, char *ptx), (prog, ptx))
FORWARD(nvrtcGetPTXSize, (program_t prog, size_t *size), (prog, size))
FORWARD(nvrtcGetProgramLog, (program_t prog, char *log), (prog, log))
FORWARD(nvrtcGetProgramLogSize, (program_t prog, size_t *size), (prog, size))
FORWARD(nvrtcGetCUBIN, (program_t prog, char *cubin), (prog, cubin))
FORWARD(nvrtcGetCUBINSize, (program_t prog, size_t *size), (prog, size))

result_t nvrtcCompileProgram(program_t prog, int n, const char *const *options)
{
    static const char prefix[] = "--gpu-architecture=";
    const char *arch = getenv("EDGECAM_NVRTC_ARCH");
    const char *swapped[64];
    result_t (*f)(program_t, int, const char *const *) =
        (result_t(*)(program_t, int, const char *const *))real_symbol("nvrtcCompileProgram");
    if (f == NULL || n > 64)
        return 7;
    for (int k = 0; k < n; k++)
        swapped[k] = strncmp(options[k], prefix, sizeof prefix - 1) == 0
                         ? (arch != NULL ? arch : "--gpu-architecture=compute_90")
                         : options[k];
    return f(prog, n, swapped);
}
