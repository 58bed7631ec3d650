// The element loops of ernie-quant's streaming pass (libernie/kernels/quant_kernel.py loads this with ctypes).
// Each function is the compiled twin of a numpy path and must give the same bytes:
//   absmax_bits  <- _abs_bits(...).max(...)       (tools/ernie-quant/ernie_quant/stream.py)
//   rtn_round    <- round_to_grid + the error sums (libernie/quant/gptq.py: q = rint(w / scale), float64 rule)
//   fp8_encode   <- encode_e4m3(w / scale) + decode (libernie/quant/fp8.py)
//   pack_int4    <- pack_int4_rows (libernie/quant/packing.py)
// Storage dtypes: 0 = F32, 1 = F16, 2 = BF16. Matrices are row-major [rows, cols] storage. No threads here: the
// caller runs blocks of rows on its own worker threads (ctypes releases the GIL during each call).
// Built without -ffast-math and with -ffp-contract=off: every float operation is the one numpy does
// (-fno-trapping-math only lets the selects vectorize; it changes no result).
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t CHUNK = 1024;   // columns widened at a time: the chunk and its temporaries stay in L1

inline float bits_f32(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }
inline uint32_t f32_bits(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }

// n storage elements at src (dtype dt) -> float32 (exact).
inline void widen(const void* src, int dt, int64_t n, float* out) {
    if (dt == 0) {
        std::memcpy(out, src, n * 4);
    } else if (dt == 2) {
        const uint16_t* p = static_cast<const uint16_t*>(src);
        for (int64_t j = 0; j < n; ++j) out[j] = bits_f32(uint32_t(p[j]) << 16);
    } else {
        const _Float16* p = static_cast<const _Float16*>(src);
        for (int64_t j = 0; j < n; ++j) out[j] = float(p[j]);
    }
}

inline int esize(int dt) { return dt == 0 ? 4 : 2; }

template <typename T>
void absmax_t(const T* p, int64_t rows, int64_t cols, int64_t g, T mask, T* out) {
    for (int64_t i = 0; i < rows; ++i) {
        T* m = out + (i / g) * cols;
        const T* r = p + i * cols;
        if (i % g == 0) {
            for (int64_t j = 0; j < cols; ++j) m[j] = r[j] & mask;
        } else {
            for (int64_t j = 0; j < cols; ++j) { T a = r[j] & mask; m[j] = a > m[j] ? a : m[j]; }
        }
    }
}

}  // namespace

extern "C" {

// max |w| as bits (sign cleared) over each group of g consecutive rows, per column: out [rows / g, cols] of the
// storage's unsigned type (uint32 for F32, uint16 otherwise). rows is a multiple of g.
void absmax_bits(const void* src, int dt, int64_t rows, int64_t cols, int64_t g, void* out) {
    if (dt == 0)
        absmax_t(static_cast<const uint32_t*>(src), rows, cols, g, uint32_t(0x7FFFFFFF), static_cast<uint32_t*>(out));
    else
        absmax_t(static_cast<const uint16_t*>(src), rows, cols, g, uint16_t(0x7FFF), static_cast<uint16_t*>(out));
}

// q = rint(w / s) (float64 rule: a float32 quotient, redone in float64 within 2^-15 of a .5), s = scale[i / g]
// per column; q stored as int8 [rows, cols]; sums[0] += sum((q s - w)^2), sums[1] += sum(w^2) (float32
// products and sums per chunk, float64 across chunks). The scales are group_scale of these very values' amax,
// so |q| <= qmax: no clip (libernie/quant/gptq.py round_to_grid).
void rtn_round(const void* src, int dt, int64_t rows, int64_t cols, int64_t g, const float* scale, int8_t* q,
               double* sums) {
    const float band = 0.5f - 1.0f / 32768.0f;
    float w[CHUNK], r[CHUNK];
    double err = 0.0, ref = 0.0;
    const char* base = static_cast<const char*>(src);
    for (int64_t i = 0; i < rows; ++i) {
        const float* s_row = scale + (i / g) * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += CHUNK) {
            const int64_t n = cols - c0 < CHUNK ? cols - c0 : CHUNK;
            const float* s = s_row + c0;
            widen(base + (i * cols + c0) * esize(dt), dt, n, w);
            int near = 0;
#pragma omp simd reduction(| : near)
            for (int64_t j = 0; j < n; ++j) {
                float t = w[j] / s[j];
                float k = std::rint(t);
                r[j] = k;
                near |= std::fabs(t - k) > band;
            }
            if (near) {
                for (int64_t j = 0; j < n; ++j) {
                    float t = w[j] / s[j];
                    if (std::fabs(t - r[j]) > band) r[j] = float(std::rint(double(w[j]) / double(s[j])));
                }
            }
            int8_t* qo = q + i * cols + c0;
            float e32 = 0.0f, r32 = 0.0f;
#pragma omp simd reduction(+ : e32, r32)
            for (int64_t j = 0; j < n; ++j) {
                qo[j] = int8_t(int(r[j]));
                float d = r[j] * s[j];
                d -= w[j];
                e32 += d * d;
                r32 += w[j] * w[j];
            }
            err += e32;
            ref += r32;
        }
    }
    sums[0] += err;
    sums[1] += ref;
}

// e4m3fn codes of w / scale (float32 division) for n finite elements, clipped to +-448 first; rounding to
// nearest even on the float32 bits as libernie/quant/fp8.py does; sums as rtn_round's with the decoded codes.
void fp8_encode(const void* src, int dt, int64_t n_all, float scale, uint8_t* codes, double* sums) {
    const float magic = 16384.0f;            // 2^14: a + 2^14 rounds a to the subnormal step 2^-9
    const uint32_t magic_bits = f32_bits(magic);
    const float min_normal = 1.0f / 64.0f;   // 2^-6
    float w[CHUNK];
    double err = 0.0, ref = 0.0;
    const char* base = static_cast<const char*>(src);
    for (int64_t c0 = 0; c0 < n_all; c0 += CHUNK) {
        const int64_t n = n_all - c0 < CHUNK ? n_all - c0 : CHUNK;
        widen(base + c0 * esize(dt), dt, n, w);
        uint8_t* co = codes + c0;
        float e32 = 0.0f, r32 = 0.0f;
#pragma omp simd reduction(+ : e32, r32)
        for (int64_t j = 0; j < n; ++j) {
            float x = w[j] / scale;
            float a = std::fabs(x);
            a = a < 448.0f ? a : 448.0f;
            uint32_t bits = f32_bits(a);
            uint32_t rn = ((bits >> 20) & 1u) + 0x7FFFFu + bits;
            rn = (rn >> 20) - (120u << 3);
            uint32_t sub = f32_bits(a + magic) - magic_bits;
            uint32_t c = a < min_normal ? sub : rn;
            c |= (f32_bits(x) >> 24) & 0x80u;
            uint8_t code = uint8_t(c);
            co[j] = code;
            // decode: exponent field 0 -> m * 2^-9, else (1 + m/8) 2^(e-7) as float32 bits
            uint32_t e = (code >> 3) & 0xFu, m = code & 0x7u;
            float v = e ? bits_f32(((e + 120u) << 23) | (m << 20)) : float(m) * (1.0f / 512.0f);
            v = (code & 0x80u) ? -v : v;
            float d = v * scale;
            d -= w[j];
            e32 += d * d;
            r32 += w[j] * w[j];
        }
        err += e32;
        ref += r32;
    }
    sums[0] += err;
    sums[1] += ref;
}

// int4 values q [rows, cols] (rows even) -> [rows / 2, cols]: row 2k in the low nibble, row 2k + 1 in the high one.
void pack_int4(const int8_t* q, int64_t rows, int64_t cols, int8_t* out) {
    for (int64_t k = 0; k < rows / 2; ++k) {
        const int8_t* lo = q + 2 * k * cols;
        const int8_t* hi = lo + cols;
        int8_t* o = out + k * cols;
        for (int64_t j = 0; j < cols; ++j) o[j] = int8_t(uint8_t((uint8_t(lo[j]) & 0x0Fu) | (uint8_t(hi[j]) << 4)));
    }
}

}  // extern "C"
