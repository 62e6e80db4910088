/* edgecam's drawing core: box outlines and opaque label images written into an I420 frame.
 *
 * Called through ctypes by edgecam.media.overlay (DirectRenderer), once a frame for all of
 * its boxes: the per-box work runs here, without the GIL, instead of a dozen numpy calls a
 * box. Plain C with no Python API, so it builds with a C compiler alone.
 *
 * Coordinates are pixels of the luma plane; everything is clipped to the frame. The chroma
 * planes are at half resolution (I420), their rows `uv_stride` bytes apart.
 */

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* The calls' signatures, as a number: edgecam.native refuses a core built from other
 * sources (an upgrade not rebuilt would pass its arguments shifted). Raise it with any change
 * to an exported function's arguments, here, in match.c or in track.c, and in the Python. */
int32_t edgecam_abi(void) {
    return 2;
}

static int clamp(int value, int lo, int hi) {
    return value < lo ? lo : (value > hi ? hi : value);
}

/* Positions from the caller are kept within +-FAR: off any picture, and far enough from
 * INT_MAX that no clipping arithmetic below overflows. */
#define FAR (1 << 28)

static int far(int64_t v) {
    return v < -FAR ? -FAR : (v > FAR ? FAR : (int)v);
}

/* A float pixel value, truncated to 8 bits as numpy casts it; NaN and out-of-range values
 * (which numpy leaves undefined) go to the nearest end. */
static uint8_t to_u8(float value) {
    return !(value > 0.0f) ? 0 : (value >= 255.0f ? 255 : (uint8_t)value);
}

/* v / 2 rounded down (C's division rounds toward zero): chroma coordinates of luma ones. */
static int half(int v) {
    return v >= 0 ? v / 2 : -((1 - v) / 2);
}

/* Fill [x1, x2) x [y1, y2) of one plane (width pw, height ph) with `value`. */
static void fill(uint8_t *plane, int stride, int pw, int ph, int x1, int y1, int x2, int y2,
                 uint8_t value) {
    x1 = clamp(x1, 0, pw);
    x2 = clamp(x2, 0, pw);
    y1 = clamp(y1, 0, ph);
    y2 = clamp(y2, 0, ph);
    if (x1 >= x2) return;
    for (int row = y1; row < y2; row++)
        memset(plane + (ptrdiff_t)row * stride + x1, value, (size_t)(x2 - x1));
}

/* GCC turns short byte loops into memset calls: for the few bytes a row of an outline's
 * sides, the call costs more than the bytes. */
#if defined(__GNUC__) && !defined(__clang__)
#define BYTE_LOOPS __attribute__((optimize("no-tree-loop-distribute-patterns")))
#else
#define BYTE_LOOPS
#endif

/* The four sides of [x1, x2) x [y1, y2), `lw` pixels wide inside it, on one plane; the
 * left and right ones in one pass over the rows. */
BYTE_LOOPS static void outline(uint8_t *plane, int stride, int pw, int ph, int x1, int y1,
                               int x2, int y2, int lw, uint8_t value) {
    fill(plane, stride, pw, ph, x1, y1, x2, y1 + lw, value);
    fill(plane, stride, pw, ph, x1, y2 - lw, x2, y2, value);
    int l1 = clamp(x1, 0, pw), l2 = clamp(x1 + lw, 0, pw);
    int r1 = clamp(x2 - lw, 0, pw), r2 = clamp(x2, 0, pw);
    int top = clamp(y1, 0, ph), bottom = clamp(y2, 0, ph);
    for (int row = top; row < bottom; row++) {
        uint8_t *p = plane + (ptrdiff_t)row * stride;
        for (int c = l1; c < l2; c++) p[c] = value;
        for (int c = r1; c < r2; c++) p[c] = value;
    }
}

/* Copy a w x h image (rows w bytes apart) onto a plane with its top-left at (x, y). */
static void copy(uint8_t *plane, int stride, int pw, int ph, const uint8_t *image, int w, int h,
                 int x, int y) {
    int c0 = x < 0 ? -x : 0, r0 = y < 0 ? -y : 0;
    int c1 = w < pw - x ? w : pw - x, r1 = h < ph - y ? h : ph - y;
    if (c0 >= c1) return;
    for (int r = r0; r < r1; r++)
        memcpy(plane + (ptrdiff_t)(y + r) * stride + x + c0, image + (ptrdiff_t)r * w + c0,
               (size_t)(c1 - c0));
}

/* Draw `n` boxes in order, each its outline then its label (if any). Each box is 13
 * values of `boxes`:
 *
 *   x1, y1, x2, y2     the outline, ends exclusive, `line` luma pixels wide inside them;
 *   Y, U, V            its colour;
 *   luma, chroma       the label's images (addresses; 0 for no label): luma width x height
 *                      bytes, chroma the U then the V image, (width / 2) x (height / 2) each;
 *   x, y, width, height  where the label goes (x, y even), and its size (even).
 */
void edgecam_draw_boxes(uint8_t *y, uint8_t *u, uint8_t *v, int32_t y_stride, int32_t uv_stride,
                        int32_t width, int32_t height, int32_t n, const int64_t *boxes,
                        int32_t line) {
    int cw = (width + 1) / 2, ch = (height + 1) / 2, cl = (line + 1) / 2;
    for (int k = 0; k < n; k++) {
        const int64_t *b = boxes + 13 * k;
        int x1 = far(b[0]), y1 = far(b[1]), x2 = far(b[2]), y2 = far(b[3]);
        outline(y, y_stride, width, height, x1, y1, x2, y2, line, (uint8_t)b[4]);
        int cx1 = half(x1), cy1 = half(y1), cx2 = half(x2 + 1), cy2 = half(y2 + 1);
        outline(u, uv_stride, cw, ch, cx1, cy1, cx2, cy2, cl, (uint8_t)b[5]);
        outline(v, uv_stride, cw, ch, cx1, cy1, cx2, cy2, cl, (uint8_t)b[6]);
        const uint8_t *luma = (const uint8_t *)(uintptr_t)b[7];
        const uint8_t *chroma = (const uint8_t *)(uintptr_t)b[8];
        if (luma == NULL || chroma == NULL) continue;
        int lx = far(b[9]), ly = far(b[10]), iw = far(b[11]), ih = far(b[12]);
        copy(y, y_stride, width, height, luma, iw, ih, lx, ly);
        int hw = iw / 2, hh = ih / 2;
        copy(u, uv_stride, cw, ch, chroma, hw, hh, half(lx), half(ly));
        copy(v, uv_stride, cw, ch, chroma + (ptrdiff_t)hw * hh, hw, hh, half(lx), half(ly));
    }
}

/* Blend a translucent iw x ih image onto `planes` planes (each pw x ph, `plane_step` bytes
 * after the one before) with its top-left at (x, y), clipped to them: each pixel becomes
 * pixel * keep + add + 0.5, in float and in that order, as numpy computes it, then
 * truncated. `add` holds an iw x ih image a plane, one after another; `keep` one for all. */
void edgecam_blend(uint8_t *plane, int64_t plane_step, int32_t planes, int32_t stride,
                   int32_t pw, int32_t ph, const float *add, const float *keep, int32_t iw,
                   int32_t ih, int32_t x, int32_t y) {
    x = far(x);
    y = far(y);
    int c0 = x < 0 ? -x : 0, r0 = y < 0 ? -y : 0;
    int c1 = iw < pw - x ? iw : pw - x, r1 = ih < ph - y ? ih : ph - y;
    if (c0 >= c1) return;
    for (int k = 0; k < planes; k++) {
        const float *a = add + (ptrdiff_t)k * iw * ih;
        for (int r = r0; r < r1; r++) {
            uint8_t *p = plane + k * plane_step + (ptrdiff_t)(y + r) * stride + x;
            const float *ar = a + (ptrdiff_t)r * iw, *kr = keep + (ptrdiff_t)r * iw;
            for (int c = c0; c < c1; c++) {
                float value = (float)p[c] * kr[c] + ar[c];
                p[c] = to_u8(value + 0.5f);
            }
        }
    }
}

/* Put n glyph images (8-bit coverage; 4 values each of `glyphs`: address, width, height,
 * x) onto a zeroed w x h canvas, each with its top-left at (x, 0), keeping the larger
 * coverage where they overlap; clipped to the canvas. */
void edgecam_coverage(const int64_t *glyphs, int32_t n, uint8_t *canvas, int32_t w,
                      int32_t h) {
    for (int k = 0; k < n; k++) {
        const int64_t *g = glyphs + 4 * k;
        const uint8_t *image = (const uint8_t *)(uintptr_t)g[0];
        int gw = far(g[1]), gh = far(g[2]), x = far(g[3]);
        int c0 = x < 0 ? -x : 0, c1 = gw < w - x ? gw : w - x, rows = gh < h ? gh : h;
        for (int r = 0; r < rows; r++) {
            uint8_t *p = canvas + (ptrdiff_t)r * w + x;
            const uint8_t *q = image + (ptrdiff_t)r * gw;
            for (int c = c0; c < c1; c++)
                if (q[c] > p[c]) p[c] = q[c];
        }
    }
}

/* A box label, opaque, from a w x h coverage image (rows `stride` bytes apart; w and h
 * even): the box colour (Y, U, V) where the text does not cover it, black (luma `black`:
 * 16, or 0 at full range) where it does. In float as numpy computes it: m = coverage / 255,
 * luma Y + (black - Y) * m; chroma from the 2 x 2 means of m; each + 0.5, truncated. out_y
 * is w x h, out_uv the U then the V image, (w / 2) x (h / 2) each. */
void edgecam_label(const uint8_t *coverage, int32_t stride, int32_t w, int32_t h, int32_t luma,
                   int32_t u, int32_t v, int32_t black, uint8_t *out_y, uint8_t *out_uv) {
    const float yl = (float)luma, ys = (float)(black - luma);
    const float ul = (float)u, us = (float)(128 - u), vl = (float)v, vs = (float)(128 - v);
    int hw = w / 2, hh = h / 2;
    for (int r = 0; r < h; r++)
        for (int c = 0; c < w; c++) {
            float m = (float)coverage[(ptrdiff_t)r * stride + c] / 255.0f;
            float value = yl + ys * m;
            out_y[(ptrdiff_t)r * w + c] = to_u8(value + 0.5f);
        }
    for (int r = 0; r < hh; r++)
        for (int c = 0; c < hw; c++) {
            const uint8_t *top = coverage + (ptrdiff_t)(2 * r) * stride + 2 * c;
            const uint8_t *bottom = top + stride;
            float upper = (float)top[0] / 255.0f + (float)top[1] / 255.0f;
            float lower = (float)bottom[0] / 255.0f + (float)bottom[1] / 255.0f;
            float mh = (upper + lower) / 4.0f; /* numpy's order for these 2 x 2 means */
            float uu = ul + us * mh, vv = vl + vs * mh;
            out_uv[(ptrdiff_t)r * hw + c] = to_u8(uu + 0.5f);
            out_uv[(ptrdiff_t)(hh + r) * hw + c] = to_u8(vv + 0.5f);
        }
}

/* A line of text in colour (Y, U, V) on a black band (luma `black`) of opacity
 * `band_alpha`, from a w x h coverage image (rows `stride` bytes apart; w and h even), as
 * translucent images (see edgecam_blend): with m = coverage / 255 and band = band_alpha *
 * (1 - m), luma adds m * Y + band * black and keeps 1 - m - band; chroma the same from the
 * 2 x 2 means of m and band, with U and V (over 128). In float as numpy computes it. y_add
 * and y_keep are w x h; uv_add the U then the V image, (w / 2) x (h / 2) each, as c_keep. */
void edgecam_text(const uint8_t *coverage, int32_t stride, int32_t w, int32_t h, int32_t luma,
                  int32_t u, int32_t v, int32_t black, float band_alpha, float *y_add,
                  float *y_keep, float *uv_add, float *c_keep) {
    const float dark = (float)black;
    int hw = w / 2, hh = h / 2;
    for (int r = 0; r < h; r++)
        for (int c = 0; c < w; c++) {
            float m = (float)coverage[(ptrdiff_t)r * stride + c] / 255.0f;
            float band = band_alpha * (1.0f - m);
            ptrdiff_t at = (ptrdiff_t)r * w + c;
            y_add[at] = m * (float)luma + band * dark;
            y_keep[at] = 1.0f - m - band;
        }
    for (int r = 0; r < hh; r++)
        for (int c = 0; c < hw; c++) {
            const uint8_t *top = coverage + (ptrdiff_t)(2 * r) * stride + 2 * c;
            const uint8_t *q[4] = {top, top + 1, top + stride, top + stride + 1};
            float m[4], band[4];
            for (int i = 0; i < 4; i++) {
                m[i] = (float)*q[i] / 255.0f;
                band[i] = band_alpha * (1.0f - m[i]);
            }
            float mh = ((m[0] + m[1]) + (m[2] + m[3])) / 4.0f; /* numpy's order, as above */
            float bh = ((band[0] + band[1]) + (band[2] + band[3])) / 4.0f;
            ptrdiff_t at = (ptrdiff_t)r * hw + c;
            uv_add[at] = mh * (float)u + bh * 128.0f;
            uv_add[(ptrdiff_t)hh * hw + at] = mh * (float)v + bh * 128.0f;
            c_keep[at] = 1.0f - mh - bh;
        }
}
