// Flash-style attention for CPU, forward and backward: the kernel, on raw fp32 pointers. The Paddle op around
// it is flash_attention_cpu.cc; see there for the contract.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace ernie_flash {

constexpr int BK = 64;  // keys per tile: a score row of 64 floats is eight AVX registers
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Query rows per tile, per head: the g heads of one kv head share a tile, so keep g * bq about 128.
inline int rows_per_head(int64_t g) { return g <= 2 ? 64 : (g <= 4 ? 32 : 16); }

// expf by range reduction and the Cephes polynomial; branch-free so GCC vectorises the loops that call it.
// Relative error about 2e-7 on [-87, 0]; below -87 (and for -inf, a masked score) it returns exactly 0.
inline float fast_exp(float x) {
  float xc = std::min(std::max(x, -87.0f), 88.0f);
  float n = std::floor(xc * 1.44269504088896341f + 0.5f);
  float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

struct Shape {
  int64_t b, s, nh, hd, nkv, t, g, off, bq, nqb, nkb;
};

// Is there enough work (multiply-adds of the attention) to wake a second thread? Waking costs microseconds
// on an idle machine but a scheduler tick (milliseconds) on a busy one: a decode step stays on one thread.
inline bool worth_threads(const Shape& d) {
  return static_cast<double>(d.b) * d.nh * d.s * d.t * d.hd > 1e7;  // about 0.2 ms on one core
}

inline Shape make_shape(int64_t b, int64_t s, int64_t nh, int64_t hd, int64_t nkv, int64_t t) {
  Shape d;
  d.b = b, d.s = s, d.nh = nh, d.hd = hd, d.nkv = nkv, d.t = t;
  d.g = d.nh / d.nkv, d.off = d.t - d.s;
  d.bq = rows_per_head(d.g);
  d.nqb = (d.s + d.bq - 1) / d.bq, d.nkb = (d.t + BK - 1) / BK;
  return d;
}

// Per key tile and batch row: the smallest and largest kend, so whole tiles are classified without a look
// at single keys. [b, nkb] each.
inline void tile_bounds(const Shape& d, const int32_t* kend, std::vector<int32_t>* lo, std::vector<int32_t>* hi) {
  lo->assign(d.b * d.nkb, std::numeric_limits<int32_t>::max());
  hi->assign(d.b * d.nkb, 0);
  for (int64_t bb = 0; bb < d.b; ++bb)
    for (int64_t j = 0; j < d.t; ++j) {
      int64_t idx = bb * d.nkb + j / BK;
      (*lo)[idx] = std::min((*lo)[idx], kend[bb * d.t + j]);
      (*hi)[idx] = std::max((*hi)[idx], kend[bb * d.t + j]);
    }
}

// Load the rows of query tile (i0, nr) for all g heads of kv head kvh into dst [g * nr, hd], times scale.
inline void load_rows(const float* src, const Shape& d, int64_t bb, int64_t kvh, int64_t i0, int64_t nr, float scale,
               float* dst) {
  for (int64_t gi = 0; gi < d.g; ++gi)
    for (int64_t r = 0; r < nr; ++r) {
      const float* x = src + ((bb * d.s + i0 + r) * d.nh + kvh * d.g + gi) * d.hd;
      float* y = dst + (gi * nr + r) * d.hd;
      for (int64_t e = 0; e < d.hd; ++e) y[e] = x[e] * scale;
    }
}

// Key tile j0..j0+nc of [b, nkv, t, hd] transposed to dst [hd, BK], zero past nc.
inline void load_transposed(const float* src, const Shape& d, int64_t bb, int64_t kvh, int64_t j0, int64_t nc, float* dst) {
  const float* base = src + ((bb * d.nkv + kvh) * d.t + j0) * d.hd;
  std::fill(dst, dst + d.hd * BK, 0.0f);
  for (int64_t c = 0; c < nc; ++c)
    for (int64_t e = 0; e < d.hd; ++e) dst[e * BK + c] = base[c * d.hd + e];
}

// GCC vector extensions: AVX2 registers with -march=native on x86, plain SSE/NEON or scalar code elsewhere.
typedef float v8 __attribute__((vector_size(32)));
inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof(v)); }
inline v8 splat(float x) { return v8{x, x, x, x, x, x, x, x}; }
typedef int32_t v8i __attribute__((vector_size(32)));

// fast_exp on eight lanes (the same steps; rounding by the 1.5 * 2^23 trick instead of floor).
inline v8 exp8(v8 x) {
  const v8 lo = splat(-87.0f), hi = splat(88.0f), magic = splat(12582912.0f);
  v8 xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const v8 n = (xc * splat(1.44269504088896341f) + magic) - magic;
  const v8 r = xc - n * splat(0.693359375f) + n * splat(2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const v8i bits = (__builtin_convertvector(n, v8i) + 127) << 23;
  const v8 res = p * reinterpret_cast<const v8&>(bits);
  return x < lo ? splat(0.0f) : res;
}

inline float hmax(v8 x) {
  float m = x[0];
  for (int i = 1; i < 8; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline float hsum(v8 x) {
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += x[i];
  return s;
}

// sc[R, BK] = rows[R, hd] . kt[hd, BK]. Four rows by sixteen keys at a time: eight accumulators, so each
// loaded pair of key vectors feeds eight FMAs.
// Rows per register block: x86 with AVX-512 has 32 vector registers, everything else 16.
#ifdef __AVX512F__
constexpr int MR = 6, MS = 6;
#else
constexpr int MR = 4, MS = 6;
#endif

inline void scores(const float* rows, const float* kt, int64_t R, int64_t hd, float* sc) {
  int64_t r = 0;
  for (; r + MS <= R; r += MS)     // MS rows by sixteen keys: each pair of key vectors feeds 2 * MS FMAs
    for (int j = 0; j < BK; j += 16) {
      v8 acc[MS][2] = {};
      for (int64_t e = 0; e < hd; ++e) {
        const v8 b0 = load8(kt + e * BK + j), b1 = load8(kt + e * BK + j + 8);
        for (int i = 0; i < MS; ++i) {
          const v8 x = splat(rows[(r + i) * hd + e]);
          acc[i][0] += x * b0;
          acc[i][1] += x * b1;
        }
      }
      for (int i = 0; i < MS; ++i) {
        store8(sc + (r + i) * BK + j, acc[i][0]);
        store8(sc + (r + i) * BK + j + 8, acc[i][1]);
      }
    }
  for (; r < R; ++r) {
    v8 acc[BK / 8] = {};
    for (int64_t e = 0; e < hd; ++e) {
      const v8 x = splat(rows[r * hd + e]);
      for (int j = 0; j < BK / 8; ++j) acc[j] += x * load8(kt + e * BK + 8 * j);
    }
    for (int j = 0; j < BK / 8; ++j) store8(sc + r * BK + 8 * j, acc[j]);
  }
}

// out[M, col:col+8NV] += w[M, K] . x[K, col:col+8NV] (row strides ldo, ldx); w[i, k] sits at w[i * wi + k * wk],
// so a transposed w costs nothing. MR rows at a time: each loaded x vector feeds MR FMAs.
template <int NV>
void accumulate_cols(float* out, int64_t ldo, const float* w, int64_t wi, int64_t wk, const float* x, int64_t ldx,
                     int64_t M, int64_t K, int64_t col) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR) {
    v8 acc[MR][NV];
    for (int ii = 0; ii < MR; ++ii)
      for (int u = 0; u < NV; ++u) acc[ii][u] = load8(out + (i + ii) * ldo + col + 8 * u);
    for (int64_t k = 0; k < K; ++k) {
      v8 xv[NV];
      for (int u = 0; u < NV; ++u) xv[u] = load8(x + k * ldx + col + 8 * u);
      for (int ii = 0; ii < MR; ++ii) {
        const v8 wv = splat(w[(i + ii) * wi + k * wk]);
        for (int u = 0; u < NV; ++u) acc[ii][u] += wv * xv[u];
      }
    }
    for (int ii = 0; ii < MR; ++ii)
      for (int u = 0; u < NV; ++u) store8(out + (i + ii) * ldo + col + 8 * u, acc[ii][u]);
  }
  for (; i < M; ++i) {
    v8 acc[NV];
    for (int u = 0; u < NV; ++u) acc[u] = load8(out + i * ldo + col + 8 * u);
    for (int64_t k = 0; k < K; ++k) {
      const v8 wv = splat(w[i * wi + k * wk]);
      for (int u = 0; u < NV; ++u) acc[u] += wv * load8(x + k * ldx + col + 8 * u);
    }
    for (int u = 0; u < NV; ++u) store8(out + i * ldo + col + 8 * u, acc[u]);
  }
}

// out[M, hd] += w[M, K] . x[K, hd], w addressed as in accumulate_cols.
inline void accumulate(float* out, int64_t ldo, const float* w, int64_t wi, int64_t wk, const float* x, int64_t ldx,
                       int64_t M, int64_t K, int64_t hd) {
  int64_t col = 0;
  for (; col + 24 <= hd; col += 24) accumulate_cols<3>(out, ldo, w, wi, wk, x, ldx, M, K, col);
  if (col + 16 <= hd) accumulate_cols<2>(out, ldo, w, wi, wk, x, ldx, M, K, col), col += 16;
  if (col + 8 <= hd) accumulate_cols<1>(out, ldo, w, wi, wk, x, ldx, M, K, col), col += 8;
  for (; col < hd; ++col)
    for (int64_t i = 0; i < M; ++i) {
      float sum = out[i * ldo + col];
      for (int64_t k = 0; k < K; ++k) sum += w[i * wi + k * wk] * x[k * ldx + col];
      out[i * ldo + col] = sum;
    }
}

// Mask tile (rows i0.., keys j0..) in place with -inf where key j may not be seen from row p, or is past nc.
inline void mask_tile(float* sc, const Shape& d, const int32_t* kend_b, int64_t i0, int64_t nr, int64_t j0, int64_t nc) {
  for (int64_t gi = 0; gi < d.g; ++gi)
    for (int64_t r = 0; r < nr; ++r) {
      const int64_t p = i0 + r + d.off;
      float* row = sc + (gi * nr + r) * BK;
      for (int64_t c = 0; c < BK; ++c) {
        const int64_t j = j0 + c;
        if (c >= nc || j > p || p >= kend_b[j]) row[c] = NEG_INF;
      }
    }
}

// Is the tile fully masked (skip it), fully visible (no per-element mask), or mixed?
enum Tile { SKIP, FULL, MIXED };
inline Tile classify(int64_t p0, int64_t plast, int64_t j0, int64_t j1, int32_t kend_lo, int32_t kend_hi) {
  if (j0 > plast || kend_hi <= p0) return SKIP;     // past every row (causal) / expired before the first row
  if (j1 - 1 <= p0 && kend_lo > plast && j1 - j0 == BK) return FULL;
  return MIXED;
}


// out [b, s, nh, hd], lse [b, nh, s] from q [b, s, nh, hd], k/v [b, nkv, t, hd], kend [b, t].
inline void forward(const Shape& d, const float* Q, const float* K, const float* V, const int32_t* KE, float* O,
                    float* L) {
  std::vector<int32_t> lo, hi;
  tile_bounds(d, KE, &lo, &hi);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  const int64_t tasks = d.b * d.nkv * d.nqb, R = d.g * d.bq;

#pragma omp parallel if (worth_threads(d))
  {
    std::vector<float> qr(R * d.hd), kt(d.hd * BK), sc(R * BK), acc(R * d.hd), m(R), l(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t qb = d.nqb - 1 - task % d.nqb;  // longest (last) query tiles first: better balance
      const int64_t kvh = (task / d.nqb) % d.nkv, bb = task / (d.nqb * d.nkv);
      const int64_t i0 = qb * d.bq, nr = std::min(d.bq, d.s - i0), rows = d.g * nr;
      const int64_t p0 = i0 + d.off, plast = p0 + nr - 1;
      const int32_t* kend_b = KE + bb * d.t;
      load_rows(Q, d, bb, kvh, i0, nr, scale, qr.data());
      std::fill(acc.begin(), acc.begin() + rows * d.hd, 0.0f);
      std::fill(m.begin(), m.begin() + rows, NEG_INF);
      std::fill(l.begin(), l.begin() + rows, 0.0f);
      for (int64_t kb = 0; kb <= std::min(plast, d.t - 1) / BK; ++kb) {
        const int64_t j0 = kb * BK, nc = std::min<int64_t>(BK, d.t - j0);
        const Tile tile = classify(p0, plast, j0, j0 + nc, lo[bb * d.nkb + kb], hi[bb * d.nkb + kb]);
        if (tile == SKIP) continue;
        load_transposed(K, d, bb, kvh, j0, nc, kt.data());
        scores(qr.data(), kt.data(), rows, d.hd, sc.data());
        if (tile == MIXED) mask_tile(sc.data(), d, kend_b, i0, nr, j0, nc);
        const float* vb = V + ((bb * d.nkv + kvh) * d.t + j0) * d.hd;
        for (int64_t r = 0; r < rows; ++r) {
          float* row = sc.data() + r * BK;
          v8 vmx = load8(row);
          for (int c = 8; c < BK; c += 8) {
            const v8 x = load8(row + c);
            vmx = x > vmx ? x : vmx;
          }
          const float mx = hmax(vmx);
          const float mnew = std::max(m[r], mx);
          if (mnew == NEG_INF) {  // this row sees nothing in this tile or before it
            std::fill(row, row + BK, 0.0f);
            continue;
          }
          const float alpha = fast_exp(m[r] - mnew);
          v8 vsum = splat(0.0f);
          for (int c = 0; c < BK; c += 8) {
            const v8 e = exp8(load8(row + c) - splat(mnew));
            store8(row + c, e);
            vsum += e;
          }
          l[r] = l[r] * alpha + hsum(vsum);
          m[r] = mnew;
          if (alpha != 1.0f) {
            float* a = acc.data() + r * d.hd;
            for (int64_t e = 0; e < d.hd; ++e) a[e] *= alpha;
          }
        }
        accumulate(acc.data(), d.hd, sc.data(), BK, 1, vb, d.hd, rows, nc, d.hd);   // acc += P . V
      }
      for (int64_t gi = 0; gi < d.g; ++gi)
        for (int64_t r = 0; r < nr; ++r) {
          const int64_t R0 = gi * nr + r, h = kvh * d.g + gi;
          float* o = O + ((bb * d.s + i0 + r) * d.nh + h) * d.hd;
          const float inv = l[R0] > 0.0f ? 1.0f / l[R0] : 0.0f;
          for (int64_t e = 0; e < d.hd; ++e) o[e] = acc[R0 * d.hd + e] * inv;
          // A row that saw nothing gets lse = +inf, so the backward's exp(score - lse) is 0 there.
          L[(bb * d.nh + h) * d.s + i0 + r] =
              l[R0] > 0.0f ? m[R0] + std::log(l[R0]) : std::numeric_limits<float>::infinity();
        }
    }
  }
}

// dq [b, s, nh, hd] (zeroed by the caller), dk/dv [b, nkv, t, hd] from the forward's inputs, out and lse.
inline void backward(const Shape& d, const float* Q, const float* K, const float* V, const int32_t* KE,
                     const float* O, const float* L, const float* DO, float* DQ, float* DK, float* DV) {
  std::vector<int32_t> lo, hi;
  tile_bounds(d, KE, &lo, &hi);
  const float scale = 1.0f / std::sqrt(static_cast<float>(d.hd));
  // D[b, nh, s] = rowsum(dout * out): the softmax backward's correction term.
  std::vector<float> D(d.b * d.nh * d.s);
#pragma omp parallel for if (worth_threads(d))
  for (int64_t x = 0; x < d.b * d.s * d.nh; ++x) {
    const float *o = O + x * d.hd, *g = DO + x * d.hd;
    float sum = 0.0f;
    for (int64_t e = 0; e < d.hd; ++e) sum += o[e] * g[e];
    const int64_t h = x % d.nh, i = (x / d.nh) % d.s, bb = x / (d.nh * d.s);
    D[(bb * d.nh + h) * d.s + i] = sum;
  }
  // dq tiles are shared by every key tile's task: one lock per (b, kv head, query tile).
  std::vector<omp_lock_t> locks(d.b * d.nkv * d.nqb);
  for (auto& lk : locks) omp_init_lock(&lk);
  const int64_t tasks = d.b * d.nkv * d.nkb, R = d.g * d.bq;

#pragma omp parallel if (worth_threads(d))
  {
    std::vector<float> qr(R * d.hd), gr(R * d.hd), kt(d.hd * BK), vt(d.hd * BK), p(R * BK), dp(R * BK);
    std::vector<float> dk_acc(BK * d.hd), dv_acc(BK * d.hd), dq_loc(R * d.hd), lse_r(R), d_r(R);
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t kb = task % d.nkb, kvh = (task / d.nkb) % d.nkv, bb = task / (d.nkb * d.nkv);
      const int64_t j0 = kb * BK, nc = std::min<int64_t>(BK, d.t - j0);
      const int32_t* kend_b = KE + bb * d.t;
      const int32_t tlo = lo[bb * d.nkb + kb], thi = hi[bb * d.nkb + kb];
      const float* kb_rows = K + ((bb * d.nkv + kvh) * d.t + j0) * d.hd;
      load_transposed(K, d, bb, kvh, j0, nc, kt.data());
      load_transposed(V, d, bb, kvh, j0, nc, vt.data());
      std::fill(dk_acc.begin(), dk_acc.end(), 0.0f);
      std::fill(dv_acc.begin(), dv_acc.end(), 0.0f);
      for (int64_t qb = std::max<int64_t>(0, j0 - d.off) / d.bq; qb < d.nqb; ++qb) {
        const int64_t i0 = qb * d.bq, nr = std::min(d.bq, d.s - i0), rows = d.g * nr;
        const int64_t p0 = i0 + d.off, plast = p0 + nr - 1;
        if (p0 >= thi) break;  // every later row is past the end of every key of this tile
        const Tile tile = classify(p0, plast, j0, j0 + nc, tlo, thi);
        if (tile == SKIP) continue;
        load_rows(Q, d, bb, kvh, i0, nr, scale, qr.data());
        load_rows(DO, d, bb, kvh, i0, nr, 1.0f, gr.data());
        for (int64_t gi = 0; gi < d.g; ++gi)
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t src = (bb * d.nh + kvh * d.g + gi) * d.s + i0 + r;
            lse_r[gi * nr + r] = L[src];
            d_r[gi * nr + r] = D[src];
          }
        scores(qr.data(), kt.data(), rows, d.hd, p.data());
        if (tile == MIXED) mask_tile(p.data(), d, kend_b, i0, nr, j0, nc);
        scores(gr.data(), vt.data(), rows, d.hd, dp.data());      // dP = dO . V^T
        for (int64_t r = 0; r < rows; ++r) {
          float* pr = p.data() + r * BK;
          float* dpr = dp.data() + r * BK;
          const v8 lr = splat(lse_r[r]), dr = splat(d_r[r]);
          for (int c = 0; c < BK; c += 8) {
            const v8 pc = exp8(load8(pr + c) - lr);            // P, recomputed
            store8(pr + c, pc);
            store8(dpr + c, pc * (load8(dpr + c) - dr));       // dS (w.r.t. the scaled scores)
          }
        }
        // dV += P^T dO; dK += dS^T (scale q); dq = scale * dS K
        accumulate(dv_acc.data(), d.hd, p.data(), 1, BK, gr.data(), d.hd, nc, rows, d.hd);      // P^T: no copy
        accumulate(dk_acc.data(), d.hd, dp.data(), 1, BK, qr.data(), d.hd, nc, rows, d.hd);
        for (int64_t x = 0; x < rows * BK; ++x) dp[x] *= scale;
        std::fill(dq_loc.begin(), dq_loc.begin() + rows * d.hd, 0.0f);
        accumulate(dq_loc.data(), d.hd, dp.data(), BK, 1, kb_rows, d.hd, rows, nc, d.hd);
        omp_lock_t* lk = &locks[(bb * d.nkv + kvh) * d.nqb + qb];
        omp_set_lock(lk);
        for (int64_t gi = 0; gi < d.g; ++gi)
          for (int64_t r = 0; r < nr; ++r) {
            float* dst = DQ + ((bb * d.s + i0 + r) * d.nh + kvh * d.g + gi) * d.hd;
            const float* srcp = dq_loc.data() + (gi * nr + r) * d.hd;
            for (int64_t e = 0; e < d.hd; ++e) dst[e] += srcp[e];
          }
        omp_unset_lock(lk);
      }
      float* dkb = DK + ((bb * d.nkv + kvh) * d.t + j0) * d.hd;
      float* dvb = DV + ((bb * d.nkv + kvh) * d.t + j0) * d.hd;
      std::memcpy(dkb, dk_acc.data(), nc * d.hd * sizeof(float));
      std::memcpy(dvb, dv_acc.data(), nc * d.hd * sizeof(float));
    }
  }
  for (auto& lk : locks) omp_destroy_lock(&lk);
}

}  // namespace ernie_flash
