/* edgecam's tracker step: Norfair's model (a Kalman filter a box coordinate, hit counters,
 * an initialisation delay, greedy IoU matching of initialised tracks first), one call a
 * frame.
 *
 * Called through ctypes by edgecam.vision.tracking (NumpyTracker) on every video frame.
 * The numpy version it replaces cost about twenty numpy calls a frame, each a few
 * microseconds of Python holding the GIL on the video's streaming thread. The arithmetic is
 * numpy's, operation for operation in double precision (built without contraction into
 * fused multiply-adds), so the tracks are the ones the numpy version gave; tests/
 * test_tracking.py keeps that version as the reference and compares them bit for bit.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int32_t edgecam_match_iou(const double *candidates, int32_t n, const double *objects,
                          int32_t k, double threshold, double *work, int32_t *rows,
                          int32_t *cols);

/* The tracks, one row each: n live rows of cap, and the rows a step shows (out_, cap
 * rows each). Coordinates are x1, y1, x2, y2. */
typedef struct {
    double *pos;  /* cap x 4 */
    double *vel;  /* cap x 4 */
    double *pv;   /* cap x 4: position variance */
    double *pvc;  /* cap x 4: position-velocity covariance */
    double *vv;   /* cap x 4: velocity variance */
    int64_t *hits;
    int64_t *ids; /* 0 while initialising */
    float *conf;  /* the last detection's score */
    float *out_xyxy; /* cap x 4 */
    float *out_conf;
    float *out_attr; /* NaN unless a detection hit the track on this step */
    int64_t *out_ids;
    uint8_t *out_matched; /* a detection hit the track on this step */
    int64_t n;
    int64_t cap;
    int64_t next_id;
    double threshold; /* the largest 1 - IoU that matches */
    int64_t hit_max;
    int64_t delay; /* hits a new track needs before it gets an id */
} TrackTable;

/* Norfair's OptimizedKalmanFilter constants. */
static const double R = 4.0, Q = 0.1;

static void move_row(TrackTable *t, int64_t from, int64_t to) {
    memcpy(t->pos + 4 * to, t->pos + 4 * from, 4 * sizeof(double));
    memcpy(t->vel + 4 * to, t->vel + 4 * from, 4 * sizeof(double));
    memcpy(t->pv + 4 * to, t->pv + 4 * from, 4 * sizeof(double));
    memcpy(t->pvc + 4 * to, t->pvc + 4 * from, 4 * sizeof(double));
    memcpy(t->vv + 4 * to, t->vv + 4 * from, 4 * sizeof(double));
    t->hits[to] = t->hits[from];
    t->ids[to] = t->ids[from];
    t->conf[to] = t->conf[from];
}

static void kalman_update(TrackTable *t, int64_t row, const double *z) {
    for (int c = 0; c < 4; c++) {
        int64_t at = 4 * row + c;
        double error = z[c] - t->pos[at];
        double a = t->pvc[at] + t->vv[at];
        double added = t->pv[at] + t->pvc[at] + a + Q + R;
        double k_pos = 1.0 - R / added;
        double k_vel = a / added;
        t->pos[at] += k_pos * error;
        t->vel[at] += k_vel * error;
        t->pv[at] = k_pos * R;
        t->pvc[at] = k_vel * R;
        t->vv[at] += Q - k_vel * k_vel * added;
    }
}

static void promote(TrackTable *t, int64_t row) {
    if (t->ids[row] == 0 && t->hits[row] > t->delay) t->ids[row] = t->next_id++;
}

/* Scratch space for one step, allocated before anything changes. */
typedef struct {
    double *boxes, *objs, *cands, *work;
    int64_t *det_of, *order, *obj_row, *cand_det;
    int32_t *pairs;
    float *attr;
    uint8_t *matched, *is_free;
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->boxes);
    free(s->det_of);
    free(s->pairs);
    free(s->attr);
    free(s->matched);
}

/* For n rows and m detections; 0 when out of memory. */
static int scratch_alloc(Scratch *s, int64_t n, int64_t m) {
    memset(s, 0, sizeof *s);
    s->boxes = malloc((size_t)(4 * m + 4 * n + 4 * m + n * m + 1) * sizeof(double));
    s->det_of = malloc((size_t)(3 * n + m + 1) * sizeof(int64_t));
    s->pairs = malloc((size_t)(2 * (n < m ? n : m) + 1) * sizeof(int32_t));
    s->attr = malloc((size_t)(n + m + 1) * sizeof(float));
    s->matched = calloc((size_t)(n + 2 * m + 1), 1);
    if (!s->boxes || !s->det_of || !s->pairs || !s->attr || !s->matched) {
        scratch_free(s);
        return 0;
    }
    s->objs = s->boxes + 4 * m;
    s->cands = s->objs + 4 * n;
    s->work = s->cands + 4 * m;
    s->order = s->det_of + n;
    s->obj_row = s->order + n;
    s->cand_det = s->obj_row + n;
    s->is_free = s->matched + n + m;
    return 1;
}

/* Match the free detections to the rows of one group (initialised: ids > 0, or not: ids
 * == 0), closest pair first; a matched row gets its detection's index in det_of and is
 * added to order. Returns the new length of order. */
static int64_t match_group(TrackTable *t, int initialised, int64_t m, Scratch *s,
                           int64_t done) {
    int64_t k = 0, c = 0;
    for (int64_t i = 0; i < t->n; i++) {
        if (initialised ? t->ids[i] > 0 : t->ids[i] == 0) {
            memcpy(s->objs + 4 * k, t->pos + 4 * i, 4 * sizeof(double));
            s->obj_row[k++] = i;
        }
    }
    for (int64_t j = 0; j < m; j++) {
        if (s->is_free[j]) {
            memcpy(s->cands + 4 * c, s->boxes + 4 * j, 4 * sizeof(double));
            s->cand_det[c++] = j;
        }
    }
    if (!k || !c) return done;
    int64_t small = k < c ? k : c;
    int32_t found = edgecam_match_iou(s->cands, (int32_t)c, s->objs, (int32_t)k, t->threshold,
                                      s->work, s->pairs, s->pairs + small);
    for (int32_t p = 0; p < found; p++) {
        int64_t det = s->cand_det[s->pairs[p]], row = s->obj_row[s->pairs[small + p]];
        s->is_free[det] = 0;
        s->det_of[row] = det;
        s->order[done++] = row;
    }
    return done;
}

/* Advance the tracks one frame: remove the expired, predict; then, with m > 0 detections
 * (boxes, scores, attributes), `period` frames after the previous ones, match them, update
 * the filter and start new tracks from the unmatched. t must have room for n + m rows.
 * The shown tracks (initialised, not expired) go to t's out_ rows. Returns how many; -1
 * when out of memory, the tracks then untouched. */
int64_t edgecam_track_step(TrackTable *t, const float *det_xyxy, const float *det_conf,
                           const float *det_attr, int64_t m, int64_t period) {
    Scratch s;
    if (m < 0) m = 0;
    if (!scratch_alloc(&s, t->n, m)) return -1;
    int64_t n = 0;
    for (int64_t i = 0; i < t->n; i++) {
        if (t->hits[i] >= 0) {
            if (i != n) move_row(t, i, n);
            n++;
        }
    }
    t->n = n;
    for (int64_t i = 0; i < n; i++) {
        t->hits[i] -= 1;
        for (int c = 0; c < 4; c++) t->pos[4 * i + c] += t->vel[4 * i + c];
        s.attr[i] = NAN;
    }
    if (m > 0) {
        for (int64_t j = 0; j < 4 * m; j++) s.boxes[j] = (double)det_xyxy[j];
        memset(s.is_free, 1, (size_t)m);
        int64_t hit = match_group(t, 1, m, &s, 0);
        hit = match_group(t, 0, m, &s, hit);
        for (int64_t h = 0; h < hit; h++) {
            int64_t row = s.order[h], det = s.det_of[row];
            s.matched[row] = 1;
            s.attr[row] = det_attr[det];
            t->conf[row] = det_conf[det];
            kalman_update(t, row, s.boxes + 4 * det);
            int64_t hits = t->hits[row] + 2 * period;
            t->hits[row] = hits < t->hit_max ? hits : t->hit_max;
        }
        for (int64_t h = 0; h < hit; h++) promote(t, s.order[h]);
        for (int64_t j = 0; j < m; j++) {
            if (!s.is_free[j]) continue;
            int64_t row = t->n++;
            for (int c = 0; c < 4; c++) {
                t->pos[4 * row + c] = s.boxes[4 * j + c];
                t->vel[4 * row + c] = 0.0;
                t->pv[4 * row + c] = 10.0;
                t->pvc[4 * row + c] = 0.0;
                t->vv[4 * row + c] = 1.0;
            }
            t->hits[row] = period;
            t->ids[row] = 0;
            t->conf[row] = det_conf[j];
            s.matched[row] = 1; /* seen by this frame's detector: it votes like a matched one */
            s.attr[row] = det_attr[j];
            promote(t, row);
        }
    }
    int64_t shown = 0;
    for (int64_t i = 0; i < t->n; i++) {
        if (t->ids[i] <= 0 || t->hits[i] < 0) continue;
        for (int c = 0; c < 4; c++) t->out_xyxy[4 * shown + c] = (float)t->pos[4 * i + c];
        t->out_conf[shown] = t->conf[i];
        t->out_attr[shown] = s.attr[i];
        t->out_ids[shown] = t->ids[i];
        t->out_matched[shown] = s.matched[i];
        shown++;
    }
    scratch_free(&s);
    return shown;
}
