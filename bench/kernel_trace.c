// A CUPTI injection library that records every kernel's start and end on the GPU, so the
// kernels of a decode graph can be seen as they overlap (nsys is not installed on the device
// machines, and ncu serializes kernels). Development aid, not part of the product.
//
// Build on the device machine (its CUDA toolkit has the CUPTI headers and library):
//   L=/usr/local/cuda/targets/x86_64-linux
//   gcc -shared -fPIC -O2 -I$L/include bench/kernel_trace.c -o /tmp/libtrace.so \
//       -L$L/lib -lcupti -Wl,-rpath,$L/lib
// Run any CUDA program with it:
//   CUDA_INJECTION64_PATH=/tmp/libtrace.so TRACE_OUT=/tmp/trace.csv \
//       ds4 cuda model --layers 8 --ctx 4096 --decode 16
// Each line: start_ns,end_ns,stream,correlation,graph,graph_node,grid_x,grid_y,name (a graph
// launch's kernels share its correlation id). bench/trace_layers.py summarizes a decode trace.
// The trace costs ~15% of the decode rate (bench/RESULTS.md, twenty-ninth session); the
// kernels' own times and overlaps are what it is for.
#include <cupti.h>
#include <stdio.h>
#include <stdlib.h>

static FILE* out;

static void CUPTIAPI buffer_requested(uint8_t** buf, size_t* size, size_t* max_records) {
    *size = 16 << 20;
    *buf = (uint8_t*)aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI buffer_completed(CUcontext ctx, uint32_t stream, uint8_t* buf, size_t size,
                                      size_t valid) {
    CUpti_Activity* rec = NULL;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind != CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL) continue;
        // Later record versions only append fields: these offsets hold for all of them.
        const CUpti_ActivityKernel10* k = (const CUpti_ActivityKernel10*)rec;
        fprintf(out, "%llu,%llu,%u,%u,%u,%llu,%d,%d,%s\n", (unsigned long long)k->start,
                (unsigned long long)k->end, k->streamId, k->correlationId, k->graphId,
                (unsigned long long)k->graphNodeId, k->gridX, k->gridY, k->name);
    }
    free(buf);
}

static void flush_at_exit(void) {
    cuptiActivityFlushAll(1);
    if (out) fflush(out);
}

// Called by the CUDA driver when CUDA_INJECTION64_PATH names this library.
int InitializeInjection(void) {
    const char* path = getenv("TRACE_OUT");
    out = fopen(path ? path : "/tmp/trace.csv", "w");
    if (!out) return 0;
    cuptiActivityRegisterCallbacks(buffer_requested, buffer_completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    cuptiActivityFlushPeriod(200);
    atexit(flush_at_exit);
    return 1;
}
