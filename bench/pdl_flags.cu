// How long one kernel boundary costs in a CUDA graph, by how the next kernel learns that the
// one before it is done. A chain of N small kernels (G blocks of 256 threads each; every
// thread reads one value the kernel before wrote and writes one), captured as a graph and
// replayed; prints µs per kernel for:
//   plain   no launch attribute: the next kernel starts when the last one has ended
//   pdl     programmatic serialization, launch_dependents at the start, griddepcontrol.wait
//           before the first read (the decode graph's form)
//   flag    as pdl, but instead of griddepcontrol.wait one thread a block spins on the
//           kernel before's arrival counter (ld.acquire.gpu) until all its blocks have
//           added to it (each block: barrier, fence, atomicAdd when its stores are done)
//   flag_late  as flag, launch_dependents only after the counter wait (one kernel ahead)
// Build and run on the device (no Rust needed):
//   nvcc -O2 -arch=sm_90a bench/pdl_flags.cu -o /tmp/pdl_flags && /tmp/pdl_flags
#include <cstdio>
#include <cuda_runtime.h>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) {                                                               \
            printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_));                 \
            return 1;                                                                          \
        }                                                                                      \
    } while (0)

__device__ __forceinline__ void trigger() { asm volatile("griddepcontrol.launch_dependents;" ::: "memory"); }
__device__ __forceinline__ void gwait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ int ld_acquire(const int* p) {
    int v;
    asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// mode: 0 plain, 1 pdl, 2 flag, 3 flag_late
__global__ void step(const float* __restrict__ in, float* __restrict__ out, int n, int mode,
                     int* flags, int i, int prev_blocks) {
    if (mode == 1 || mode == 2) trigger();
    if (mode == 1) gwait();
    if ((mode == 2 || mode == 3) && i > 0) {
        if (threadIdx.x == 0)
            while (ld_acquire(flags + i - 1) < prev_blocks) {
            }
        __syncthreads();
    }
    if (mode == 3) trigger();
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    const float v = in[(t * 7) % n];
    out[t % n] = v * 0.5f + 1.0f;
    if (mode >= 2) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(flags + i, 1);
        }
    }
}

int main(int argc, char** argv) {
    const int N = 200, REPS = 30;
    const int grids[] = {1, 32, 132, 264, 1024};
    const char* names[] = {"plain", "pdl", "flag", "flag_late"};
    float *a, *b;
    int* flags;
    const int n = 1024 * 256;
    CK(cudaMalloc(&a, n * 4));
    CK(cudaMalloc(&b, n * 4));
    CK(cudaMemset(a, 0, n * 4));
    CK(cudaMalloc(&flags, N * 4));
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    printf("grid,mode,us_per_kernel\n");
    for (int g : grids) {
        for (int mode = 0; mode < 4; mode++) {
            cudaGraph_t graph;
            CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
            CK(cudaMemsetAsync(flags, 0, N * 4, s));
            for (int i = 0; i < N; i++) {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(g);
                cfg.blockDim = dim3(256);
                cfg.stream = s;
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                at[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.attrs = at;
                cfg.numAttrs = (mode > 0 && i > 0) ? 1 : 0;
                const float* in = (i & 1) ? b : a;
                float* out = (i & 1) ? a : b;
                CK(cudaLaunchKernelEx(&cfg, step, in, out, n, mode, flags, i, g));
            }
            CK(cudaStreamEndCapture(s, &graph));
            cudaGraphExec_t ex;
            CK(cudaGraphInstantiate(&ex, graph, 0));
            for (int w = 0; w < 3; w++) CK(cudaGraphLaunch(ex, s));
            cudaEvent_t e0, e1;
            CK(cudaEventCreate(&e0));
            CK(cudaEventCreate(&e1));
            CK(cudaEventRecord(e0, s));
            for (int r = 0; r < REPS; r++) CK(cudaGraphLaunch(ex, s));
            CK(cudaEventRecord(e1, s));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            printf("%d,%s,%.3f\n", g, names[mode], ms * 1000.0f / (REPS * N));
            CK(cudaGraphExecDestroy(ex));
            CK(cudaGraphDestroy(graph));
        }
    }
    return 0;
}
