/* The float32 FMA peak of one x86 core with AVX2: twelve independent chains of 8-wide fused
 * multiply-adds (enough to cover the FMA latency on two FMA pipes), 16 flops each.
 * The ceiling behind the CPU read's numbers in docs/performance.md ("The CPU read against its
 * peers"); run one copy per core to see the machine's:
 *
 *     gcc -O2 -mavx2 -mfma -o /tmp/fma tools/cpu_fma_peak.c && /tmp/fma
 *     (/tmp/fma & /tmp/fma; wait)        # both cores of a 2-core machine at once
 */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12

int main(void) {
    __m256 acc[CHAINS];
    const __m256 b = _mm256_set1_ps(1.0000001f), c = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    const long iterations = 400000000L;
    struct timespec start, stop;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long n = 0; n < iterations; n++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], b, c);
    }
    clock_gettime(CLOCK_MONOTONIC, &stop);
    double seconds = (stop.tv_sec - start.tv_sec) + (stop.tv_nsec - start.tv_nsec) * 1e-9;
    float sum = 0, lanes[8];
    for (int i = 0; i < CHAINS; i++) {  /* use the results: the loop is not optimised away */
        _mm256_storeu_ps(lanes, acc[i]);
        sum += lanes[0];
    }
    printf("%.1f GFLOP/s float32 FMA on one core (checksum %g)\n",
           iterations * CHAINS * 16.0 / seconds / 1e9, sum);
    return 0;
}
