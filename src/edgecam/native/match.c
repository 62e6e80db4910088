/* edgecam's tracker matching: Norfair's IoU distance and its greedy assignment, in one call.
 *
 * Called through ctypes by edgecam.vision.tracking (NumpyTracker) on every detection frame:
 * a few microseconds here against about twenty numpy calls a matched pair. The arithmetic
 * is numpy's, operation for operation in double precision (built without contraction into
 * fused multiply-adds), so the pairs are the ones numpy's version of the same rule gives.
 */

#include <float.h>
#include <math.h>
#include <stdint.h>

/* numpy's maximum, minimum and clip(x, 0, None): a NaN in is a NaN out. */
static double np_max(double a, double b) {
    return isnan(a) ? a : (isnan(b) ? b : (a > b ? a : b));
}

static double np_min(double a, double b) {
    return isnan(a) ? a : (isnan(b) ? b : (a < b ? a : b));
}

static double clip0(double x) {
    return isnan(x) ? x : (x > 0 ? x : 0);
}

/* 1 - IoU of boxes a and b (x1, y1, x2, y2); NaN where the union is empty. */
static double iou_distance(const double *a, const double *b) {
    double area_a = (a[2] - a[0]) * (a[3] - a[1]);
    double area_b = (b[2] - b[0]) * (b[3] - b[1]);
    double w = clip0(np_min(a[2], b[2]) - np_max(a[0], b[0]));
    double h = clip0(np_min(a[3], b[3]) - np_max(a[1], b[1]));
    double inter = w * h;
    return 1 - inter / (area_a + area_b - inter);
}

/* Match n candidate boxes to k object boxes (both n x 4 / k x 4, row-major): while the
 * closest remaining pair (first in row-major order among equals) is nearer than
 * `threshold`, take it and remove its row and column. NaN distances never match; infinite
 * ones are taken as the largest finite numbers (numpy's nan_to_num). `work` holds n * k
 * doubles. The pairs go to rows[i], cols[i] in the order taken; returns how many. */
int32_t edgecam_match_iou(const double *candidates, int32_t n, const double *objects,
                          int32_t k, double threshold, double *work, int32_t *rows,
                          int32_t *cols) {
    if (n <= 0 || k <= 0) return 0;
    const double never = threshold + 1;
    for (int32_t i = 0; i < n; i++) {
        for (int32_t j = 0; j < k; j++) {
            double d = iou_distance(candidates + 4 * i, objects + 4 * j);
            if (isnan(d))
                d = never;
            else if (isinf(d))
                d = d > 0 ? DBL_MAX : -DBL_MAX;
            work[(int64_t)i * k + j] = d;
        }
    }
    int32_t pairs = 0;
    for (;;) {
        int64_t best = 0;
        for (int64_t at = 1; at < (int64_t)n * k; at++)
            if (work[at] < work[best]) best = at;
        if (!(work[best] < threshold)) return pairs;
        int32_t row = (int32_t)(best / k), col = (int32_t)(best % k);
        rows[pairs] = row;
        cols[pairs] = col;
        pairs++;
        for (int32_t j = 0; j < k; j++) work[(int64_t)row * k + j] = never;
        for (int32_t i = 0; i < n; i++) work[(int64_t)i * k + col] = never;
    }
}
