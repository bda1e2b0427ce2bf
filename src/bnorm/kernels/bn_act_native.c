/* bnorm's native CPU kernels for act(BN(x) + r) in training, with a piecewise-linear
 * activation a(z) = z for z > 0, slope·z otherwise (identity: slope 1, ReLU: 0, leaky
 * ReLU: its negative slope).
 *
 * A tensor is a contiguous (R, C, B) array: R rows, C channels, B contiguous values per
 * channel in a row. NCHW is (N, C, H·W); channels_last and (N, L, C) inputs are
 * (N·H·W, C, 1). Two loop shapes: planes (B > 1), each (row, channel) plane a
 * contiguous run of B values; rows (B == 1), each row C contiguous channels.
 *
 * Sums: each plane, or each chunk of ROWS rows, is summed in the input precision in
 * blocks of at most BLOCK values, and those partial sums are added in double, always in
 * the same order: the results do not depend on the thread count.
 *
 * Built by bnorm.kernels.native (gcc -O3 -fopenmp) and called through ctypes; every
 * pointer is to contiguous memory of the stated size, checked by the caller.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 1024
#define ROWS 256
#define PARALLEL_MIN 32768 /* elements: below, the loops run on the calling thread */
/* CALL(k) for k = nb, 1 ≤ nb ≤ 8, as a constant: each width of the rows loops' channel
 * blocks compiled on its own, its partial sums in registers (none for nb = 0). */
#define BLOCK_DISPATCH(nb, CALL)                                                           \
    switch (nb) {                                                                          \
    case 1: CALL(1); break;                                                                \
    case 2: CALL(2); break;                                                                \
    case 3: CALL(3); break;                                                                \
    case 4: CALL(4); break;                                                                \
    case 5: CALL(5); break;                                                                \
    case 6: CALL(6); break;                                                                \
    case 7: CALL(7); break;                                                                \
    case 8: CALL(8); break;                                                                \
    default: break;                                                                        \
    }

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

#define T float
#define ITYPE int32_t
#define SFX _f32
#include "bn_act_native_impl.h"
#undef T
#undef ITYPE
#undef SFX

#define T double
#define ITYPE int64_t
#define SFX _f64
#include "bn_act_native_impl.h"
#undef T
#undef ITYPE
#undef SFX
