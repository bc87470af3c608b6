"""CUDA C source of the CacheGen GPU kernels (compiled at run time by CuPy's NVRTC; see :mod:`codec._gpu`).

Every kernel mirrors a step of the CPU path in :mod:`codec.cachegen` and :mod:`codec._rans` with the same IEEE
operations (explicit ``__*_rn`` intrinsics, compiled with ``--fmad=false``), so both paths give the same bytes
and the same values. Coefficient buffers are ``[S, nsec, T, G]`` (stream type, section, token, coefficient: one
batched GEMM per stream type over all sections); symbol buffers are in stream order ``[nsec, S, T * G]``.
A kernel that meets bad input sets a bit in ``err[section]`` and never reads outside the section.
"""

SOURCE = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;
typedef unsigned short u16;
typedef unsigned char u8;

#define FULL 0xffffffffu
#define RANS_L 65536u
#define ZMAX 524287
#define E_STATE 1
#define E_WORDS 2
#define E_ESC 4
#define E_RANGE 8
#define E_END 16
#define E_FREQ 32
#define E_FINITE 64

__device__ __forceinline__ u32 ld32(const u8* p) {
    return (u32)p[0] | ((u32)p[1] << 8) | ((u32)p[2] << 16) | ((u32)p[3] << 24);
}

__device__ __forceinline__ u16 f2bf(float f) {  // round to nearest even, as torch does
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r) : "f"(f));
    return r;
}

// ---------------------------------------------------------------------------------------------------- decode
// Steps both rANS decoders share (they differ only in where the tables live).

// Renormalize a warp's states: lanes whose state fell below L take the stream's next 16-bit words in lane order
// (never past its cnt words; rd counts every word asked for, so an overrun shows as rd > cnt).
__device__ __forceinline__ u32 renorm(u32 xn, bool need, const u8* wp, int cnt, int& rd, u32 lt) {
    u32 m = __ballot_sync(FULL, need);
    if (need) {
        int k = rd + __popc(m & lt);
        if (k < cnt) xn = (xn << 16) | (u32)wp[2 * k] | ((u32)wp[2 * k + 1] << 8);
    }
    rd += __popc(m);
    return xn;
}

// Record an escape (stream << 32 | index among the stream's escapes, zout index) in the section's own slots;
// returns E_ESC when the section declared fewer exceptions.
__device__ __forceinline__ int record_escape(int w, int s, int sec, int nsec, i64 n, i64 zi, int index,
                                             int* esc_n, const int* n_exc, const i64* exc_pre, i64* esc_rec) {
    int k = atomicAdd(esc_n + sec, 1);  // records of a section: its declared exception count
    if (k >= n_exc[sec]) return E_ESC;
    i64 r = exc_pre[sec] + k;
    esc_rec[2 * r] = ((i64)w << 32) | (i64)index;
    esc_rec[2 * r + 1] = ((i64)s * nsec + sec) * n + zi;
    return 0;
}

// The low `width` raw bits at bit position p of a stream's raw area.
__device__ __forceinline__ u32 raw_bits(const u8* rp, i64 p, int width) {
    if (!width) return 0;
    const u8* bp = rp + (p >> 3);
    int sh = (int)(p & 7);
    u32 v = bp[0];
    if (sh + width > 8) v |= (u32)bp[1] << 8;
    if (sh + width > 16) v |= (u32)bp[2] << 16;
    return (v >> sh) & ((1u << width) - 1u);
}

// Level z of a symbol (table offset lo, raw bits) written as z * step_int (exact); E_RANGE when out of range.
__device__ __forceinline__ int put_level(double* zo, i64 zi, int sym, int lo, int width, u32 low, double step) {
    i64 z = (i64)(sym + lo - 1) * (1LL << width) + (i64)low;
    zo[zi] = __dmul_rn((double)z, step);
    return z > ZMAX || z < -ZMAX ? E_RANGE : 0;
}

// End of a stream: every lane's state back at L and every word consumed; errors of the warp to err[sec].
__device__ __forceinline__ void finish_stream(u32 x, int rd, int cnt, int bad, int lane, int w, int sec, int nesc,
                                              int* esc_cnt, int* err) {
    if (x != RANS_L || rd != cnt) bad |= E_END;
    bad = __reduce_or_sync(FULL, (unsigned)bad);
    if (lane == 0) {
        esc_cnt[w] = nesc;
        if (bad) atomicOr(err + sec, bad);
    }
}

// One warp per stream w = sec * S + s; lane = rANS lane. Writes ri = z * step_int (exact) to zout[s, sec, t, g];
// escapes are recorded (stream << 32 | index among the stream's escapes, zout index) for esc_fix, in the section's
// own slots (exc_pre[sec] .. + n_exc[sec]), so that a corrupt section cannot take a good section's slots.
extern "C" __global__ void rans_decode(
    const u8* __restrict__ buf, const i64* __restrict__ word_off, const int* __restrict__ word_cnt,
    const i64* __restrict__ state_off, const i64* __restrict__ raw_off,
    const u32* __restrict__ dec, const int* __restrict__ tidmap, const int* __restrict__ wpre,
    const int* __restrict__ lo, const double* __restrict__ stepi,
    double* __restrict__ zout, int* __restrict__ esc_cnt, i64* __restrict__ esc_rec, int* __restrict__ esc_n,
    const int* __restrict__ n_exc, const i64* __restrict__ exc_pre, int* __restrict__ err,
    int nsec, int S, int T, int G)
{
    int w = (int)((blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (w >= nsec * S) return;  // uniform per warp
    int sec = w / S, s = w - sec * S;
    int n = T * G;
    const u8* wp = buf + word_off[w];
    int cnt = word_cnt[w];
    u32 x = ld32(buf + state_off[w] + 4 * lane);
    int bad = x < RANS_L ? E_STATE : 0;
    int g = lane, t = 0;
    while (g >= G) { g -= G; t++; }
    const int* tm = tidmap + (i64)s * G;
    const int* wq = wpre + (i64)s * (G + 1);
    const double* sp = stepi + (i64)s * G;
    const u8* rp = buf + raw_off[w];
    int W = wq[G];
    double* zo = zout + ((i64)s * nsec + sec) * (i64)n;
    u32 lt = (1u << lane) - 1u;
    int rd = 0, nesc = 0, steps = (n + 31) / 32;
    for (int j = 0; j < steps; j++) {
        bool active = 32 * j + lane < n;
        u32 xn = x;
        int sym = 1, tid = 0;
        if (active) {
            tid = tm[g];
            u32 d = dec[(u32)tid * 4096u + (x & 4095u)];
            sym = (int)(d >> 24);
            xn = (((d >> 12) & 4095u) + 1u) * (x >> 12) + (d & 4095u);
        }
        x = renorm(xn, active && xn < RANS_L, wp, cnt, rd, lt);
        bool esc = active && sym == 0;
        u32 em = __ballot_sync(FULL, esc);
        if (active) {
            i64 zi = (i64)t * G + g;
            if (esc) {
                bad |= record_escape(w, s, sec, nsec, n, zi, nesc + __popc(em & lt), esc_n, n_exc, exc_pre, esc_rec);
            } else {
                int b0 = wq[g], width = wq[g + 1] - b0;
                bad |= put_level(zo, zi, sym, lo[tid], width, raw_bits(rp, (i64)t * W + b0, width), sp[g]);
            }
        }
        nesc += __popc(em);
        if (rd > cnt) { bad |= E_WORDS; break; }  // rd is the same in every lane
        g += 32;
        while (g >= G) { g -= G; t++; }
    }
    finish_stream(x, rd, cnt, bad, lane, w, sec, nesc, esc_cnt, err);
}

// The same decoder with the stream type's tables in shared memory: grid (ceil(nsec / warps), S), one stream type
// per block, so the random slot lookups hit shared memory instead of L1. sym_tab: u8 [tables, 4096] slot -> symbol;
// info: u32 [tables, A] freq | cum << 16; uniq: [S, U] the tables a stream type uses; coef: [S, G] local table |
// raw width << 8 | (lo + 32768) << 12.
extern "C" __global__ void rans_decode_smem(
    const u8* __restrict__ buf, const i64* __restrict__ word_off, const int* __restrict__ word_cnt,
    const i64* __restrict__ state_off, const i64* __restrict__ raw_off,
    const u8* __restrict__ sym_tab, const u32* __restrict__ info, int A, const int* __restrict__ uniq, int U,
    const u32* __restrict__ coef, const int* __restrict__ wpre, const double* __restrict__ stepi,
    double* __restrict__ zout, int* __restrict__ esc_cnt, i64* __restrict__ esc_rec, int* __restrict__ esc_n,
    const int* __restrict__ n_exc, const i64* __restrict__ exc_pre, int* __restrict__ err,
    int nsec, int S, int T, int G)
{
    extern __shared__ u32 smem[];
    int s = blockIdx.y;
    u32* s_info = smem;                                  // U * 256
    u32* s_coef = s_info + U * 256;                      // G
    int* s_wpre = (int*)(s_coef + G);                    // G + 1
    double* s_step = (double*)(smem + ((U * 256 + 2 * G + 1 + 1) & ~1));  // G, 8-byte aligned
    u8* s_sym = (u8*)(s_step + G);                       // U * 4096
    const int* us = uniq + (i64)s * U;
    for (int k = threadIdx.x; k < U * 1024; k += blockDim.x)
        ((u32*)s_sym)[k] = ((const u32*)(sym_tab + (i64)us[k >> 10] * 4096))[k & 1023];
    for (int k = threadIdx.x; k < U * 256; k += blockDim.x)
        s_info[k] = (k & 255) < A ? info[(i64)us[k >> 8] * A + (k & 255)] : 0u;
    for (int k = threadIdx.x; k < G; k += blockDim.x) {
        s_coef[k] = coef[(i64)s * G + k];
        s_step[k] = stepi[(i64)s * G + k];
    }
    for (int k = threadIdx.x; k <= G; k += blockDim.x) s_wpre[k] = wpre[(i64)s * (G + 1) + k];
    __syncthreads();
    int sec = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (sec >= nsec) return;  // uniform per warp
    int w = sec * S + s;
    int n = T * G;
    const u8* wp = buf + word_off[w];
    int cnt = word_cnt[w];
    u32 x = ld32(buf + state_off[w] + 4 * lane);
    int bad = x < RANS_L ? E_STATE : 0;
    int g = lane, t = 0;
    while (g >= G) { g -= G; t++; }
    const u8* rp = buf + raw_off[w];
    int W = s_wpre[G];
    double* zo = zout + ((i64)s * nsec + sec) * (i64)n;
    u32 lt = (1u << lane) - 1u;
    int rd = 0, nesc = 0, steps = (n + 31) / 32;
    for (int j = 0; j < steps; j++) {
        bool active = 32 * j + lane < n;
        u32 xn = x, cf = 0;
        int sym = 1;
        if (active) {
            cf = s_coef[g];
            int u = cf & 255;
            sym = s_sym[u * 4096 + (x & 4095u)];
            u32 e = s_info[u * 256 + sym];
            xn = (e & 0xffffu) * (x >> 12) + (x & 4095u) - (e >> 16);
        }
        x = renorm(xn, active && xn < RANS_L, wp, cnt, rd, lt);
        bool esc = active && sym == 0;
        u32 em = __ballot_sync(FULL, esc);
        if (active) {
            i64 zi = (i64)t * G + g;
            if (esc) {
                bad |= record_escape(w, s, sec, nsec, n, zi, nesc + __popc(em & lt), esc_n, n_exc, exc_pre, esc_rec);
            } else {
                int width = (cf >> 8) & 15;
                bad |= put_level(zo, zi, sym, (int)(cf >> 12) - 32768, width,
                                 raw_bits(rp, (i64)t * W + s_wpre[g], width), s_step[g]);
            }
        }
        nesc += __popc(em);
        if (rd > cnt) { bad |= E_WORDS; break; }
        g += 32;
        while (g >= G) { g -= G; t++; }
    }
    finish_stream(x, rd, cnt, bad, lane, w, sec, nesc, esc_cnt, err);
}

// One thread per recorded escape: its level comes from the section's exception list.
extern "C" __global__ void esc_fix(
    const u8* __restrict__ buf, const i64* __restrict__ exc_off, const int* __restrict__ n_exc,
    const i64* __restrict__ esc_rec, int esc_cap, const i64* __restrict__ esc_base,
    const double* __restrict__ stepi, double* __restrict__ zout, int* __restrict__ err,
    int nsec, int S, int T, int G)
{
    i64 k = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (k >= esc_cap) return;
    i64 a = esc_rec[2 * k], zi = esc_rec[2 * k + 1];
    if (a < 0) return;  // an unused slot (filled with -1)
    int w = (int)(a >> 32), sec = w / S;
    i64 e = esc_base[w] + (a & 0xffffffffLL);
    if (e >= n_exc[sec]) { atomicOr(err + sec, E_ESC); return; }
    int v = (int)ld32(buf + exc_off[sec] + 4 * e);
    if (v > ZMAX || v < -ZMAX) { atomicOr(err + sec, E_RANGE); return; }
    i64 per_s = (i64)nsec * T * G;
    int s = (int)(zi / per_s), g = (int)(zi % G);
    zout[zi] = __dmul_rn((double)v, stepi[(i64)s * G + g]);
}

// back[s, sec, t, g] -> out[sec][l, kv, t, h, d]: x = fp32(back * 2**-(shift+13) / weight + mean), then the dtype.
// Grid: x = s * nsec + sec, y = groups of EPI_TOKENS tokens; a thread keeps one coefficient (channel) for all its
// tokens, so the channel's mean, weight and output column are computed once.
#define EPI_TOKENS 8
extern "C" __global__ void dec_epilogue(
    const double* __restrict__ back, const u8* __restrict__ buf, const i64* __restrict__ km_off,
    const i64* __restrict__ vb_off, const float* __restrict__ mean, const double* __restrict__ weight,
    double pscale, const u64* __restrict__ outp, i64 sl, i64 skv, i64 st, i64 sh, i64 sd, int dtype,
    int nsec, int S, int T, int G, int C, int D)
{
    int row = blockIdx.x;
    int s = row / nsec, sec = row - s * nsec;
    int ng = C / G, nl = S / (2 * ng);
    int l = s / (2 * ng), kv = (s / ng) & 1, c0 = (s % ng) * G;
    i64 kmo = km_off[sec], vbo = vb_off[sec * nl + l];
    int isz = dtype == 2 ? 4 : 2;
    u8* base = (u8*)outp[sec] + (l * sl + kv * skv) * isz;
    const double* bk = back + (i64)row * T * G;
    int t0 = blockIdx.y * EPI_TOKENS, t1 = min(T, t0 + EPI_TOKENS);
    for (int g = threadIdx.x; g < G; g += blockDim.x) {
        int c = c0 + g, lc = (l * 2 + kv) * C + c;
        float m = mean[lc];
        if (kv == 0 && kmo >= 0) {
            const u8* kp = buf + kmo + 2 * ((i64)l * C + c);
            m = __uint_as_float(((u32)kp[0] | ((u32)kp[1] << 8)) << 16);
        }
        double wt = weight[lc], md = (double)m;
        u8* col = base + ((c / D) * sh + (c % D) * sd) * isz;
        double vals[EPI_TOKENS];  // all loads first: the stores below may alias as far as the compiler knows
        #pragma unroll
        for (int k = 0; k < EPI_TOKENS; k++) vals[k] = t0 + k < t1 ? bk[(i64)(t0 + k) * G + g] : 0.0;
        #pragma unroll
        for (int k = 0; k < EPI_TOKENS; k++) {
            int t = t0 + k;
            if (t >= t1) break;
            u8* o = col + t * st * isz;
            if (t == 0 && vbo >= 0) {
                const u8* src = buf + vbo + (i64)(kv * C + c) * isz;
                for (int q = 0; q < isz; q++) o[q] = src[q];
                continue;
            }
            double v = __dadd_rn(__ddiv_rn(__dmul_rn(vals[k], pscale), wt), md);
            float f = __double2float_rn(v);
            if (dtype == 0) *(u16*)o = f2bf(f);
            else if (dtype == 1) *(u16*)o = f2h(f);
            else *(float*)o = f;
        }
    }
}

// ---------------------------------------------------------------------------------------------------- encode
// x: float32 [nsec, nl, 2, T, C]. Key mean per (sec, l, c): float64 sum over tokens 1..T-1 in token order (as
// numpy sums over a middle axis), / count, to float32, to bf16.
extern "C" __global__ void enc_keymean(const float* __restrict__ x, float* __restrict__ km, u16* __restrict__ km_bits,
                                       int nsec, int nl, int T, int C)
{
    i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= (i64)nsec * nl * C) return;
    i64 r = idx / C;
    int c = (int)(idx - r * C);
    const float* k = x + r * 2 * (i64)T * C + c;
    int t0 = T > 1 ? 1 : 0;
    double sum = 0.0;
    for (int t = t0; t < T; t++) sum = __dadd_rn(sum, (double)k[(i64)t * C]);
    float f = __double2float_rn(__ddiv_rn(sum, (double)(T - t0)));
    u16 b = f2bf(f);
    km_bits[idx] = b;
    km[idx] = __uint_as_float((u32)b << 16);
}

__device__ __forceinline__ double sq(float v) { double d = (double)v; return __dmul_rn(d, d); }

// numpy's pairwise summation (8 accumulators up to 128 values, halving above), so the sums are bit-identical.
__device__ double pairwise_sq(const float* v, int n) {
    if (n < 8) {
        double r = 0.0;
        for (int i = 0; i < n; i++) r = __dadd_rn(r, sq(v[i]));
        return r;
    }
    if (n <= 128) {
        double r[8];
        for (int k = 0; k < 8; k++) r[k] = sq(v[k]);
        int i = 8;
        for (; i < n - (n % 8); i += 8)
            for (int k = 0; k < 8; k++) r[k] = __dadd_rn(r[k], sq(v[i + k]));
        double res = __dadd_rn(__dadd_rn(__dadd_rn(r[0], r[1]), __dadd_rn(r[2], r[3])),
                               __dadd_rn(__dadd_rn(r[4], r[5]), __dadd_rn(r[6], r[7])));
        for (; i < n; i++) res = __dadd_rn(res, sq(v[i]));
        return res;
    }
    int n2 = n / 2;
    n2 -= n2 % 8;
    return __dadd_rn(pairwise_sq(v, n2), pairwise_sq(v + n2, n - n2));
}

// Value norm of every (sec, l, t).
extern "C" __global__ void enc_norms(const float* __restrict__ x, double* __restrict__ norms,
                                     int nsec, int nl, int T, int C)
{
    i64 idx = blockIdx.x * (i64)blockDim.x + threadIdx.x;
    if (idx >= (i64)nsec * nl * T) return;
    i64 r = idx / T;
    int t = (int)(idx - r * T);
    norms[idx] = sqrt(pairwise_sq(x + ((r * 2 + 1) * T + t) * (i64)C, C));
}

// xi = clip(rint(fp32(fp32(x - mean) * weight) * 2**shift), +-2**31) into X[s, sec, t, g].
// Grid: x = row ((sec * nl + l) * 2 + kv) * T + t, threads over the C channels.
extern "C" __global__ void enc_forward(const float* __restrict__ x, const float* __restrict__ km,
                                       const float* __restrict__ mean, const float* __restrict__ weight,
                                       double p2s, int use_km, double* __restrict__ X, int* __restrict__ err,
                                       int nsec, int nl, int T, int C, int G)
{
    int row = blockIdx.x;
    int t = row % T, r = row / T, kv = r & 1;
    r >>= 1;
    int l = r % nl, sec = r / nl;
    int ng = C / G;
    const float* xr = x + (i64)row * C;
    const float* mr = (kv == 0 && use_km) ? km + ((i64)sec * nl + l) * C : mean + (l * 2 + kv) * C;
    const float* wr = weight + (l * 2 + kv) * C;
    for (int c = threadIdx.x; c < C; c += blockDim.x) {
        if (!isfinite(xr[c])) atomicOr(err, E_FINITE);
        float w = __fmul_rn(__fsub_rn(xr[c], mr[c]), wr[c]);
        double xi = rint(__dmul_rn((double)w, p2s));
        xi = fmin(fmax(xi, -2147483648.0), 2147483648.0);
        int s = (l * 2 + kv) * ng + c / G;
        X[(((i64)s * nsec + sec) * T + t) * G + c % G] = xi;
    }
}

// Y[s, sec, t, g] -> z, symbol, raw low bits, exceptions; written in stream order [sec, s, t * G + g].
// Grid: x = s * nsec + sec, y covers T * G in blocks of 4 * blockDim.x.
extern "C" __global__ void enc_symbols(const double* __restrict__ Y, const double* __restrict__ scale,
                                       const u8* __restrict__ vflag, const int* __restrict__ tidmap,
                                       const int* __restrict__ raw_bits, const int* __restrict__ lo,
                                       const int* __restrict__ size, u8* __restrict__ sym_out,
                                       u16* __restrict__ low_out, int* __restrict__ zesc,
                                       int nsec, int S, int T, int G, int nl)
{
    int row = blockIdx.x;
    int s = row / nsec, sec = row - s * nsec;
    int l = s / (S / nl);
    int n = T * G;
    const double* yr = Y + (i64)row * n;
    const double* sc = scale + (i64)s * G;
    const int* tm = tidmap + (i64)s * G;
    i64 ob = ((i64)sec * S + s) * n;
    bool sink = vflag[sec * nl + l] != 0;
    for (int r = 0; r < 4; r++) {
        int i = (blockIdx.y * 4 + r) * blockDim.x + threadIdx.x;
        if (i >= n) return;
        int t = i / G, g = i - t * G;
        double zf = rint(__dmul_rn(yr[i], sc[g]));
        zf = fmin(fmax(zf, -(double)ZMAX), (double)ZMAX);
        int z = (int)zf;
        if (t == 0 && sink) z = 0;
        int tid = tm[g], b = raw_bits[tid];
        int sym = (z >> b) - lo[tid] + 1;
        bool esc = sym < 1 || sym >= size[tid];
        sym_out[ob + i] = esc ? 0 : (u8)sym;
        low_out[ob + i] = (u16)(z & ((1 << b) - 1));
        if (esc) zesc[ob + i] = z;
    }
}

// One warp per stream: rANS encode (steps backwards, lanes backwards within a step). Words go to scratch in
// encoder order (gather_words reverses them); final states and word counts per stream.
extern "C" __global__ void rans_encode(const u8* __restrict__ sym_in, const u32* __restrict__ enc, int A,
                                       const int* __restrict__ tidmap, u16* __restrict__ scratch, int cap,
                                       u32* __restrict__ states, int* __restrict__ counts, int* __restrict__ esc_cnt,
                                       int* __restrict__ err, int nsec, int S, int T, int G)
{
    int w = (int)((blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (w >= nsec * S) return;
    int s = w % S;
    int n = T * G, steps = (n + 31) / 32;
    const u8* sy = sym_in + (i64)w * n;
    const int* tm = tidmap + (i64)s * G;
    u16* out = scratch + (i64)w * cap;
    int i0 = 32 * (steps - 1) + lane;
    int t = i0 / G, g = i0 - t * G;
    u32 x = RANS_L;
    int ptr = 0, bad = 0, nesc = 0;
    for (int j = steps - 1; j >= 0; j--) {
        bool active = 32 * j + lane < n;
        u32 f = 1, cm = 0;
        int sym = active ? sy[32 * j + lane] : 1;
        nesc += __popc(__ballot_sync(FULL, sym == 0));
        if (active) {
            u32 e = enc[(u32)tm[g] * (u32)A + sym];
            f = e & 0xffffu;
            cm = e >> 16;
            if (f == 0) { bad = E_FREQ; f = 1; }
        }
        bool need = active && (u64)x >= ((u64)f << 20);
        u32 m = __ballot_sync(FULL, need);
        if (need) {
            int after = lane == 31 ? 0 : __popc(m >> (lane + 1));
            out[ptr + after] = (u16)(x & 0xffffu);
            x >>= 16;
        }
        ptr += __popc(m);
        if (active) x = ((x / f) << 12) + (x % f) + cm;
        g -= 32;
        while (g < 0) { g += G; t--; }
    }
    states[(i64)w * 32 + lane] = x;
    bad = __reduce_or_sync(FULL, (unsigned)bad);
    if (lane == 0) {
        counts[w] = ptr;
        esc_cnt[w] = nesc;
        if (bad) atomicOr(err, bad);
    }
}

// Stream w's escaped levels, in symbol order, as little-endian i32 to outb[dst[w]..] (one warp per stream).
extern "C" __global__ void esc_gather(const u8* __restrict__ sym_in, const int* __restrict__ zesc,
                                      const int* __restrict__ esc_cnt, const i64* __restrict__ dst,
                                      u8* __restrict__ outb, int nsec, int S, int n)
{
    int w = (int)((blockIdx.x * (i64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (w >= nsec * S || esc_cnt[w] == 0) return;  // uniform per warp
    const u8* sy = sym_in + (i64)w * n;
    const int* zz = zesc + (i64)w * n;
    u8* d = outb + dst[w];
    u32 lt = (1u << lane) - 1u;
    int k = 0;
    for (int j = 0; j < (n + 31) / 32; j++) {
        int i = 32 * j + lane;
        bool e = i < n && sy[i] == 0;
        u32 m = __ballot_sync(FULL, e);
        if (e) {
            u32 v = (u32)zz[i];
            u8* q = d + 4 * (i64)(k + __popc(m & lt));
            q[0] = (u8)v; q[1] = (u8)(v >> 8); q[2] = (u8)(v >> 16); q[3] = (u8)(v >> 24);
        }
        k += __popc(m);
    }
}

// Stream w's words, reversed, to outb[dst[w]..] as little-endian u16 (dst may be odd).
extern "C" __global__ void gather_words(const u16* __restrict__ scratch, int cap, const int* __restrict__ counts,
                                        const i64* __restrict__ dst, u8* __restrict__ outb)
{
    int w = blockIdx.x;
    int cnt = counts[w];
    const u16* src = scratch + (i64)w * cap;
    u8* d = outb + dst[w];
    for (int k = threadIdx.x; k < cnt; k += blockDim.x) {
        u16 v = src[cnt - 1 - k];
        d[2 * k] = (u8)(v & 255);
        d[2 * k + 1] = (u8)(v >> 8);
    }
}

// Raw low bits of stream w, LSB-first, byte-aligned run at outb[dst[w]..]; one thread per output byte.
extern "C" __global__ void raw_pack(const u16* __restrict__ low, const int* __restrict__ wpre,
                                    const i64* __restrict__ dst, u8* __restrict__ outb, int S, int T, int G)
{
    int w = blockIdx.x, s = w % S;
    const int* wq = wpre + (i64)s * (G + 1);
    int W = wq[G];
    if (W == 0) return;
    i64 nbytes = ((i64)T * W + 7) / 8;
    const u16* lv = low + (i64)w * T * G;
    for (i64 k = threadIdx.x; k < nbytes; k += blockDim.x) {
        i64 bit = 8 * k, end = bit + 8;
        int t = (int)(bit / W);
        int rem = (int)(bit - (i64)t * W);
        int a = 0, b = G;  // largest g with wq[g] <= rem (wq[G] = W > rem)
        while (b - a > 1) {
            int mid = (a + b) >> 1;
            if (wq[mid] <= rem) a = mid; else b = mid;
        }
        int g = a;
        u32 byte = 0;
        while (bit < end && t < T) {
            i64 start = (i64)t * W + wq[g];
            int width = wq[g + 1] - wq[g];
            int off = (int)(bit - start);
            int take = min(width - off, (int)(end - bit));
            if (take > 0) {
                byte |= (((u32)lv[(i64)t * G + g] >> off) & ((1u << take) - 1u)) << (int)(bit - 8 * k);
                bit += take;
            }
            if (++g == G) { g = 0; t++; }
        }
        outb[dst[w] + k] = (u8)byte;
    }
}
"""
