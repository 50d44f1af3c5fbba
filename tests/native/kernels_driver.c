/* Test driver for the kernels on another architecture (cross-compiled, run under qemu by
 * tests/test_kernels_aarch64.py): reads cases from argv[1], writes results to argv[2].
 *
 * A case is int64 [qtype, n, k, m], then n rows of the weight's bytes, then m * k float32
 * activations. For each case the output is m * n float32 of one pl_linear call on all rows (two
 * threads), then m * n float32 computed one row at a time on one thread. The first line of
 * stdout names the kernels' backend.
 */
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>

const char *pl_backend(void);
int pl_linear(const int64_t *desc, int nw, const void *x, int x_bf16, int64_t ldx, int64_t m, int64_t k, int y_bf16,
              int nthreads, int method);
int pl_type_info(int qtype, int64_t *block, int64_t *type_size);

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    FILE *in = fopen(argv[1], "rb"), *out = fopen(argv[2], "wb");
    if (!in || !out) return 2;
    printf("%s\n", pl_backend());
    int64_t h[4];
    while (fread(h, sizeof h, 1, in) == 1) {
        int64_t qtype = h[0], n = h[1], k = h[2], m = h[3], block, size;
        if (!pl_type_info((int)qtype, &block, &size)) return 3;
        int64_t row = k / block * size;
        uint8_t *w = malloc((size_t)(n * row));
        float *x = malloc((size_t)(m * k) * 4), *y = malloc((size_t)(m * n) * 4), *y1 = malloc((size_t)n * 4);
        if (!w || !x || !y || !y1) return 4;
        if (fread(w, 1, (size_t)(n * row), in) != (size_t)(n * row) || fread(x, 4, (size_t)(m * k), in) != (size_t)(m * k))
            return 5;
        int64_t desc[6] = {qtype, (int64_t)(intptr_t)w, row, n, (int64_t)(intptr_t)y, n};
        if (pl_linear(desc, 1, x, 0, k, m, k, 0, 2, 0)) return 6;
        fwrite(y, 4, (size_t)(m * n), out);
        for (int64_t r = 0; r < m; r++) {
            int64_t d1[6] = {qtype, (int64_t)(intptr_t)w, row, n, (int64_t)(intptr_t)y1, n};
            if (pl_linear(d1, 1, x + r * k, 0, k, 1, k, 0, 1, 0)) return 7;
            fwrite(y1, 4, (size_t)n, out);
        }
        free(w); free(x); free(y); free(y1);
    }
    fclose(out);
    return 0;
}
