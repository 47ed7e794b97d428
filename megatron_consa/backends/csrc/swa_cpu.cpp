// Banded (sliding-window) flash attention for the CPU: forward and backward.
//
// The CPU flash kernel of PyTorch (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
// has no window: its only ways to skip work are `is_causal` and an additive mask
// that it still multiplies through. This kernel follows the same tiled, online-softmax
// scheme, but each query tile only visits the keys its rows can see:
//
//   query p sees key j  iff  j <= p  and  (j > p - W  or  j < S)
//
// (window W >= 1, S attention sinks; megatron_consa.backends.torch_attention's convention).
// A query tile [m0, m1) reads the sink keys [0, min(S, k0)) and the window keys
// [k0, m1) with k0 = max(0, m0 - W + 1); tiles entirely inside the visible set skip
// the masking. The backward recomputes the probabilities from the forward's
// log-sum-exp and accumulates dK/dV per task in fp32, so no key-sized gradient is
// ever materialised per query block.
//
// Layout: q [b, hq, s, d], k, v [b, hkv, s, d] (any strides, last dim contiguous),
// hq = hkv * rep, query head h reads KV head h / rep. Results are contiguous.
// Matrix products go to MKL (sgemm_ / dgemm_ / cblas_gemm_bf16bf16f32), which
// torch's CPU build exports, except where oneDNN brgemm serves better: the bf16 forward
// on VNNI-packed blocks (AMX or AVX512-BF16; PackedHead), and fp32 forward and backward in
// AVX-512 builds (HeadCopy), which bf16 also takes, converted as it goes, where it has no
// bf16 products of its own (bf16_as_fp32). Everything else is ATen's vectorised helpers.

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec_half.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta,
                            float* c, int ldc);
}

namespace {

using at::vec::Vectorized;

constexpr int kCblasColMajor = 102;
constexpr int kCblasNoTrans = 111;
constexpr int kCblasTrans = 112;

// Column-major C[m, n] = alpha * op(A) * op(B) + beta * C (BLAS semantics), with
// operands of scalar_t and C in the accumulation type.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  sgemm_(ta ? "T" : "N", tb ? "T" : "N", &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                 int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  const int im = m, in = n, ik = k, ilda = lda, ildb = ldb, ildc = ldc;
  dgemm_(ta ? "T" : "N", tb ? "T" : "N", &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
}

inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const at::BFloat16* a,
                 int64_t lda, const at::BFloat16* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_gemm_bf16bf16f32(kCblasColMajor, ta ? kCblasTrans : kCblasNoTrans, tb ? kCblasTrans : kCblasNoTrans,
                         m, n, k, alpha, reinterpret_cast<const uint16_t*>(a), lda,
                         reinterpret_cast<const uint16_t*>(b), ldb, beta, c, ldc);
}

// Store a vector of the accumulation type as scalar_t (bf16: rounded, half the bytes).
template <typename scalar_t, typename acc_t>
inline void store_as(scalar_t* dst, const Vectorized<acc_t>& x) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    x.store(dst);
  } else {
    at::vec::convert_from_float<scalar_t>(x, x).store(dst, Vectorized<acc_t>::size());
  }
}

// exp(x) for the softmax's shifted scores (x <= 0 up to rounding). In fp32 on AVX-512: 2^n p(r)
// with n = round(x log2 e), r = x - n ln 2 and ATen's exp_u20 polynomial on r, the power of two
// applied by vscalefps, in 10 instructions where exp_u20's integer exponent arithmetic and range
// masks take 18 (the softmax was an eighth of the fp32 forward at a 2048 window). As exp_u20,
// 0 below ln(FLT_MIN) (a hidden score's -inf gives exactly 0); unlike it, a NaN stays NaN
// (exp_u20 gives its upper clamp's exp for it). Elsewhere exp_u20 (fp64: the precise exp), a
// NaN put back.
#if defined(CPU_CAPABILITY_AVX512)
// c[0] + c[1] x + ... + c[5] x^5, by Horner's rule (five fmas)
inline __m512 polynomial5(__m512 x, const float (&c)[6]) {
  __m512 y = _mm512_fmadd_ps(x, _mm512_set1_ps(c[5]), _mm512_set1_ps(c[4]));
  for (int k = 3; k >= 0; --k) y = _mm512_fmadd_ps(x, y, _mm512_set1_ps(c[k]));
  return y;
}

// exp_u20's polynomial for e^r, |r| <= ln(2) / 2, and the same for 2^f (coefficients times
// ln(2)^k), |f| <= 1/2
constexpr float kExpPoly[6] = {1.0f, 0.999999701f, 0.499991506f, 0.166676521f, 0.0418978221f, 0.00828929059f};
constexpr float kExp2Poly[6] = {1.0f, 0.6931469440460205f, 0.24022242426872253f, 0.055507391691207886f,
                                0.009671487845480442f, 0.0013263088185340166f};
#endif

template <typename acc_t>
inline Vectorized<acc_t> softmax_exp(const Vectorized<acc_t>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3365448f), _CMP_NLT_UQ);  // NaN too
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147182f), x);
    return _mm512_maskz_scalef_ps(keep, polynomial5(r, kExpPoly), n);
  }
#endif
  return Vectorized<acc_t>::blendv(x.exp_u20(), x, x.isnan());
}

// 2^t for the forward's softmax, given t = log2(e) x: the same exp in base 2, where the scale,
// log2(e) and the row max fold into the one fma that forms t (the caller's), and the range
// reduction f = t - n is a subtraction (exact) instead of a multiply and an fma: 9
// instructions for softmax_exp's 10, 2 fewer on the FMA pipes. p(f) is exp_u20's polynomial
// with its coefficients times ln(2)^k. 0 below 2^-126 (FLT_MIN), a NaN stays NaN. Elsewhere
// softmax_exp(t ln 2).
template <typename acc_t>
inline Vectorized<acc_t> softmax_exp2(const Vectorized<acc_t>& t) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __mmask16 keep = _mm512_cmp_ps_mask(t, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);  // NaN too
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n);
    return _mm512_maskz_scalef_ps(keep, polynomial5(f, kExp2Poly), n);
  }
#endif
  return softmax_exp(t * Vectorized<acc_t>(static_cast<acc_t>(0.693147180559945309)));
}

// max(a, b), NaN where either is: a NaN score makes its row's running max, and so the row,
// NaN (std::max(a, NaN) is a: a row seeing nothing but NaN would look empty).
template <typename T>
inline T max_or_nan(T a, T b) {
  return (b > a || b != b) ? b : a;
}

template <typename T>
inline void fill(T* data, T value, int64_t n) {
  std::fill(data, data + n, value);
}

// Zero n elements with whole-vector stores (a short, branch-light loop: the rows'
// spans differ, and memset's size dispatch mispredicts on them).
template <typename T>
inline void zero(T* data, int64_t n) {
  using V = Vectorized<T>;
  const V z(T(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) z.store(data + i);
  if (i < n) z.store(data + i, n - i);
}

// Per-thread scratch that outlives the call: buffers above glibc's mmap threshold
// would otherwise be mapped and page-faulted afresh on every call, which on a VM
// cost a tenth of a small call. Grow-only; `slot` names the buffer (unique across
// element types, which may coincide). Cache-line aligned: AMX tile loads of a packed
// block that straddle lines read twice the lines (the bf16 forward ran 10% slower).
template <typename T>
T* scratch(int slot, int64_t n) {
  constexpr int64_t kLine = 64;
  static_assert(kLine % alignof(T) == 0, "scratch elements must align within a cache line");
  thread_local std::vector<unsigned char> buffers[35];
  std::vector<unsigned char>& buffer = buffers[slot];
  const int64_t bytes = n * static_cast<int64_t>(sizeof(T)) + kLine;
  if (static_cast<int64_t>(buffer.size()) < bytes) buffer.resize(bytes);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + kLine - 1) / kLine * kLine);
}

// Row-major scores[qB, kB] (row stride ldp) = scale * Q[m0:m1] K[n0:n1]^T.
template <typename scalar_t, typename acc_t>
inline void scores(const scalar_t* q, int64_t q_ld, const scalar_t* k, int64_t k_ld, int64_t qB, int64_t kB,
                   int64_t ldp, int64_t d, acc_t scale, acc_t* out) {
  gemm(true, false, kB, qB, d, scale, k, k_ld, q, q_ld, acc_t(0), out, ldp);
}

// Score rows are padded to whole vectors (16 floats on AVX-512), so the softmax loops
// have no scalar tail: a window of W + qT - 1 keys is rarely a multiple of 16.
constexpr int64_t kRowAlign = 16;
inline int64_t padded(int64_t n) { return (n + kRowAlign - 1) / kRowAlign * kRowAlign; }

// A tile's rows: the `rep` query heads of one KV head at the positions [m0, m0 + qB),
// head-major (row i is head i / qB at position m0 + i % qB), so the heads that share
// K/V share one matrix product.
struct RowTile {
  int64_t m0, qB, rep;
  int64_t rows() const { return rep * qB; }
};

// The columns of one score row (query p; keys n0..n1 of a tile) that the softmax
// visits: the whole vectors [c0, c1) around the keys p sees, with the hidden entries
// among them set to -inf. A row sees at most W keys (and the sinks) of a tile up to
// W + qT - 1 keys wide, so the columns outside [c0, c1), hidden, are not visited: the
// caller writes their probabilities as zeros. c0 == c1 when the row sees nothing here.
struct Span {
  int64_t c0, c1;
  bool empty() const { return c0 == c1; }
};

template <typename acc_t>
inline Span visible_span(acc_t* row, int64_t p, int64_t n0, int64_t n1, int64_t W, int64_t S) {
  const int64_t hi = std::min(n1, p + 1) - n0;       // keys after the query are hidden
  const int64_t win = std::max(n0, p - W + 1) - n0;  // the window's first key
  const int64_t lo = n0 < S ? 0 : win;               // sinks in the tile: from its first key
  if (hi <= lo) return {0, 0};
  const Span span{lo / kRowAlign * kRowAlign, padded(hi)};
  using Vec = Vectorized<acc_t>;
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity()), first{static_cast<acc_t>(lo)}, end{static_cast<acc_t>(hi)};
  const Vec lane = Vec::arange(acc_t(0), acc_t(1));  // a constant: built once, not per vector
  auto hide_edges = [&](int64_t c) {  // one vector: keep the lanes of columns [lo, hi), branch-free
    const Vec column = lane + Vec(static_cast<acc_t>(c));
    Vec::blendv(neg_inf, Vec::loadu(row + c), (column >= first) & (column < end)).store(row + c);
  };
  for (int64_t c = span.c0; c < span.c0 + kRowAlign; c += Vec::size()) hide_edges(c);
  for (int64_t c = std::max(span.c0 + kRowAlign, span.c1 - kRowAlign); c < span.c1; c += Vec::size()) hide_edges(c);
  const int64_t gap = std::max<int64_t>(0, S - n0);  // keys older than the window, not sinks
  if (n0 < S && gap < std::min(win, hi)) {
    fill(row + gap, -std::numeric_limits<acc_t>::infinity(), std::min(win, hi) - gap);
  }
  return span;
}

// The key ranges a query tile [m0, m1) reads: the sinks below its window, then its window.
struct KeyRanges {
  int64_t sink_end;   // sinks [0, sink_end)
  int64_t win_begin;  // window [win_begin, win_end)
  int64_t win_end;
  int64_t keys() const { return sink_end + (win_end - win_begin); }
};

// `align`: the window range starts at a multiple of it (the packed bf16 path reads keys
// in blocks of 64); the keys added below the window are masked like any other.
inline KeyRanges key_ranges(int64_t m0, int64_t m1, int64_t W, int64_t S, int64_t align = 1) {
  const int64_t k0 = std::max<int64_t>(0, m0 - W + 1) / align * align;
  return {std::min<int64_t>(S, k0), k0, m1};
}

// Key tiles of at most kT keys, as equal as the vector width allows (a window of
// W + qT - 1 keys in tiles of kT would leave a thin, slow last tile).
// With `align` > 1 (a multiple of kRowAlign dividing kT) every tile starts at a multiple of it.
template <typename F>
inline void for_each_tile(int64_t begin, int64_t end, int64_t kT, int64_t align, F&& f) {
  if (begin >= end) return;
  const int64_t n = end - begin, tiles = (n + kT - 1) / kT;
  const int64_t unit = std::max(kRowAlign, align);
  const int64_t step = std::min(kT, ((n + tiles - 1) / tiles + unit - 1) / unit * unit);
  for (int64_t n0 = begin; n0 < end; n0 += step) f(n0, std::min(n0 + step, end));
}

template <typename F>
inline void for_each_key_tile(const KeyRanges& kr, int64_t kT, int64_t align, F&& f) {
  for_each_tile(0, kr.sink_end, kT, align, f);
  for_each_tile(kr.win_begin, kr.win_end, kT, align, f);
}

// Rows [m0, m0 + qB) of the `rep` heads h0.. of x (strides sh, sm) as one [rep*qB, D] block of
// out_t: a pointer into x when they already are one (rep == 1, no conversion), else copied (bf16
// converted to fp32 for the fp32 products) into `buf`.
template <typename out_t, typename scalar_t>
inline const out_t* tile_rows(const scalar_t* x, int64_t sh, int64_t sm, const RowTile& rt, int64_t D,
                              out_t* buf, int64_t* ld) {
  if constexpr (std::is_same_v<out_t, scalar_t>) {
    if (rt.rep == 1) {
      *ld = sm;
      return x;
    }
  }
  for (int64_t hr = 0; hr < rt.rep; ++hr) {
    for (int64_t r = 0; r < rt.qB; ++r) {
      at::vec::convert<scalar_t, out_t>(x + hr * sh + r * sm, buf + (hr * rt.qB + r) * D, D);
    }
  }
  *ld = D;
  return buf;
}

// The packed bf16 forward (machines with bf16 dot products: AMX, like PyTorch's own CPU
// flash kernel for bf16, and AVX512-BF16): K^T and V are packed into the VNNI layout in blocks of
// kPackBlock keys, and each tile's products are oneDNN brgemm calls on them. Each thread
// packs the blocks its own tiles read, just before it reads them, into its own scratch:
// no pass over all of K and V before the tiles, and no second parallel region.
// Key tiles start at multiples of kKeyStep (AMX's bf16 reduction step, the 32 keys of one
// tile row): a window of W = 32 then reads 96 keys for 64 queries, not 128. A tile that
// starts mid-block takes that block's second half in a Q K^T call of its own (32 columns
// of the block's K^T); V's VNNI rows run on across blocks, so P V starts at any even key.
constexpr int64_t kPackBlock = 64;
constexpr int64_t kKeyStep = 32;

// Whether oneDNN's brgemm runs bf16 products on bf16 dot-product instructions here: AMX, or
// AVX512-BF16 (AMD Zen 4, Intel Cooper Lake). torch's could_pack(bf16) asks for AMX only, as
// its own packing routine does; ours is PackedHead's, and brgemm takes the VNNI blocks on
// AVX512-BF16 as well (on a Zen 4 core, about 2x the fp32 products' rate at a tile's shapes).
inline bool amx_bf16() { return at::native::cpublas::could_pack(at::kBFloat16); }

inline bool bf16_products() {
#if defined(CPU_CAPABILITY_AVX512)
  static const bool avx512_bf16 = __builtin_cpu_supports("avx512bf16");
  return amx_bf16() || avx512_bf16;
#else
  return false;  // PackedHead's VNNI packing is compiled for AVX-512 only
#endif
}

inline bool can_pack_bf16(int64_t D) { return D % kPackBlock == 0 && bf16_products(); }

// The backward on packed bf16 blocks where the bf16 dot products are AVX512-BF16's (Zen 4: the
// fp32-products backward there took about twice its time). With AMX the backward keeps MKL's bf16
// GEMM, on which it was measured (this path was not, there).
inline bool packs_bf16_backward(int64_t D) { return can_pack_bf16(D) && !amx_bf16(); }

// One thread's packed key blocks of one (b, KV head): the sink blocks [0, sink_blocks),
// then the window blocks [base, hi), stored one after the other in the thread's scratch.
// The sinks are packed at once, the window blocks as the thread's tiles reach them
// (pack_until), while they are in cache from the tile before.
class PackedHead {
 public:
  using bf16 = at::BFloat16;
  static constexpr int64_t P = kPackBlock;

  PackedHead() = default;
  // K/V rows `ks`, `vs` (row strides ksn, vsn; N keys, head dim D); window blocks [lo, hi).
  // The backward packs K both ways (K^T for the scores, its rows for dQ: vs = ks) and V's
  // transpose only (for dP; vs = nullptr), in scratch slots of their own.
  PackedHead(const bf16* ks, int64_t ksn, const bf16* vs, int64_t vsn, int64_t N, int64_t D, int64_t S,
             int64_t lo, int64_t hi, int kt_slot = 16, int v_slot = 17)
      : ks_(ks), vs_(vs), ksn_(ksn), vsn_(vsn), N_(N), D_(D) {
    sink_blocks_ = std::min((S + P - 1) / P, hi);
    base_ = packed_until_ = std::max(lo, sink_blocks_);
    blocks_ = sink_blocks_ + std::max<int64_t>(0, hi - base_);
    kt_ = scratch<bf16>(kt_slot, blocks_ * D * P);
    v_ = vs ? scratch<bf16>(v_slot, D / P * blocks_ * P * P) : nullptr;
    for (int64_t block = 0; block < sink_blocks_; ++block) pack(block);
  }

  void pack_until(int64_t block_end) {
    for (; packed_until_ < block_end; ++packed_until_) pack(packed_until_);
  }

  // K^T of a block from its column `key` % 64 on: [D, 64] in VNNI, [D/2, 64, 2] (row stride 64)
  const bf16* k_t(int64_t key) const { return kt_ + local(key) / P * D_ * P + key % P * 2; }
  // V from `key` (even) on, 64 columns from column 64 * dc: VNNI [keys/2, 64, 2] over consecutive blocks
  const bf16* v(int64_t dc, int64_t key) const { return v_ + dc * blocks_ * P * P + local(key) * P; }

 private:
  // a key's place among the packed ones (the tiles of one call never straddle the gap)
  int64_t local(int64_t key) const {
    const int64_t block = key / P, offset = key % P;
    return (block < sink_blocks_ ? block : sink_blocks_ + (block - base_)) * P + offset;
  }

  void pack(int64_t block) {  // keys past N are zero
    const int64_t j0 = block * P, keys = std::min(P, N_ - j0), i = local(j0) / P;
    // K^T in VNNI: elements 2c, 2c+1 of key n are 32-bit word (c, n), so the block is the
    // transpose of its keys' [keys, D/2] words (bit moves only)
    float* kt_block = reinterpret_cast<float*>(kt_ + i * D_ * P);
    if (keys < P) zero(kt_block, D_ / 2 * P);
    at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(ks_ + j0 * ksn_), ksn_ / 2, kt_block, P,
                                  static_cast<int>(keys), static_cast<int>(D_ / 2));
    for (int64_t dc = 0; vs_ && dc < D_ / P; ++dc) {  // V block [64 keys, 64 columns], VNNI [32, 64, 2]
      bf16* v_block = v_ + (dc * blocks_ + i) * P * P;
      if (keys < P) zero(v_block, P * P);
      at::vec::pack_vnni2(vs_ + j0 * vsn_ + dc * P, v_block, vsn_, keys, P);
    }
  }

  const bf16* ks_ = nullptr;
  const bf16* vs_ = nullptr;
  int64_t ksn_ = 0, vsn_ = 0, N_ = 0, D_ = 0;
  int64_t sink_blocks_ = 0, base_ = 0, blocks_ = 0, packed_until_ = 0;
  bf16* kt_ = nullptr;
  bf16* v_ = nullptr;
};

// Row-major C[R, ldp] = A[R, D] B^T (unscaled) over the packed blocks of `b` from key n0 (n0 a
// multiple of kKeyStep; B^T: K^T in both passes, V^T for the backward's dP), a block or its
// second half per call.
inline void packed_scores(int64_t R, int64_t D, const at::BFloat16* a, int64_t lda, const PackedHead& b, int64_t n0,
                          int64_t ldp, float* c) {
  for (int64_t col = 0; col < ldp;) {
    const int64_t cols = std::min(kPackBlock - (n0 + col) % kPackBlock, ldp - col);
    at::native::cpublas::brgemm(R, cols, D, lda, kPackBlock, ldp, false, a, b.k_t(n0 + col), c + col);
    col += cols;
  }
}

// fp32 forward and backward on AVX-512 machines: oneDNN brgemm ukernels (torch's
// cpublas::brgemm) instead of MKL's sgemm, which packs both operands on every call (a tile's
// products are small: 32 rows, a window of keys, d = 64) and on AMD takes its generic path.
// brgemm is row-major without a transpose, so each thread keeps K^T of the (b, KV head) its
// tiles read, built key by key as they reach it (each key transposed once), like PackedHead.
// On a Zen 4 core, brgemm did a tile's products at 1.3-1.4x MKL's speed.
#if defined(CPU_CAPABILITY_AVX512)
constexpr bool kBrgemmFp32 = true;
#else
constexpr bool kBrgemmFp32 = false;  // AVX2: MKL sgemm (measured on Zen 2; brgemm was not)
#endif

inline bool can_brgemm_fp32() { return kBrgemmFp32; }

// bf16 on the fp32 brgemm products, where the fp32 brgemm path runs and bf16 takes no faster
// one: where it does not pack (AVX-512 without bf16 dot products, or a head dim not a
// multiple of 64). The passes are asked apart, as their products are chosen apart, but the
// answer is the same: the backward's faster routes (packed on AVX512-BF16, MKL's bf16 GEMM
// with AMX) take exactly the head dims the forward packs. Without AMX,
// MKL's bf16 GEMM was slower than our fp32 products on nearly every grid shape (AMD Zen 4,
// before the packed paths ran there: docs/benchmarks/attention_cpu_grid_zen4.md). Each thread converts the
// query rows of its tile and the K/V of its (b, KV head) as its tiles reach them (HeadCopy),
// into its own scratch, and rounds the results as it stores them. Converting whole tensors
// first cost a sixth of a small call (n=1024).
inline bool bf16_as_fp32(int64_t D, bool /*backward*/) { return can_brgemm_fp32() && !can_pack_bf16(D); }

#if defined(CPU_CAPABILITY_AVX512)
// A whole 16 x 16 block, in registers: ATen's transpose_mxn_16x16 runs the same 64 shuffles
// through a VectorizedN the compiler keeps on the stack, and was about 4% of the fp32
// forward at n = 2048, W = 512 (building K^T).
inline void transpose_16x16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {  // 32-bit pairs
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // 64-bit pairs
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  for (int i = 0; i < 16; i += 8) {  // 128-bit lanes
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int i = 0; i < 8; ++i) {
    _mm512_storeu_ps(dst + i * ldd, _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88));
    _mm512_storeu_ps(dst + (i + 8) * ldd, _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd));
  }
}
#endif

// Rows x cols of `src` (row stride lds) as cols x rows at dst (row stride ldd), for brgemm,
// which takes no transposed operand: K^T (HeadCopy), the backward's Q^T, dO^T and dQ^T.
inline void transpose_into(const float* src, int64_t lds, int64_t rows, int64_t cols, float* dst, int64_t ldd) {
#if defined(CPU_CAPABILITY_AVX512)
  const int64_t rows16 = rows / 16 * 16, cols16 = cols / 16 * 16;
  for (int64_t i = 0; i < rows16; i += 16) {
    for (int64_t j = 0; j < cols16; j += 16) transpose_16x16(src + i * lds + j, lds, dst + j * ldd + i, ldd);
  }
  if (cols16 < cols) {  // the last columns of the whole row blocks, then the last rows
    at::vec::transpose_mxn<float>(src + cols16, lds, dst + cols16 * ldd, ldd, static_cast<int>(rows16),
                                  static_cast<int>(cols - cols16));
  }
  if (rows16 < rows) {
    at::vec::transpose_mxn<float>(src + rows16 * lds, lds, dst + rows16, ldd, static_cast<int>(rows - rows16),
                                  static_cast<int>(cols));
  }
#else
  at::vec::transpose_mxn<float>(src, lds, dst, ldd, static_cast<int>(rows), static_cast<int>(cols));
#endif
}

// The same for bf16, in ATen's blocks of at most 32 x 32 (the packed backward's P^T and dS^T).
inline void transpose_bf16(const at::BFloat16* src, int64_t lds, int64_t rows, int64_t cols, at::BFloat16* dst,
                           int64_t ldd) {
  for (int64_t i = 0; i < rows; i += 32) {
    for (int64_t j = 0; j < cols; j += 32) {
      at::vec::transpose_mxn<at::BFloat16>(src + i * lds + j, lds, dst + j * ldd + i, ldd,
                                           static_cast<int>(std::min<int64_t>(32, rows - i)),
                                           static_cast<int>(std::min<int64_t>(32, cols - j)));
    }
  }
}

// One (b, KV head)'s K or V in fp32 for the brgemm products, in one thread's scratch `slot`:
// transposed ([D, ld], column j = key j: K^T, since brgemm takes no transposed operand) or as
// rows ([keys, ld]: V in the forward, K and V in the backward). Rows
// of an fp32 source are read where they are; everything else is copied (bf16 converted) as the
// tiles reach the keys: the sinks below the first tile's window at once, the keys from `lo` on
// as copy_until asks, each key once. The transposed ld is padded(N) plus a line, so that the
// rows of a long sequence are not a power of two apart (they would share cache sets).
enum class Layout { kTransposed, kRows };

template <typename scalar_t>
class HeadCopy {
 public:
  HeadCopy() = default;
  HeadCopy(int slot, Layout layout, const scalar_t* xs, int64_t xsn, int64_t N, int64_t D, int64_t S, int64_t lo)
      : xs_(xs), xsn_(xsn), D_(D), transposed_(layout == Layout::kTransposed), done_(lo) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (!transposed_) {  // in place
        data_ = xs;
        ld_ = xsn;
        done_ = N;
        return;
      }
    }
    ld_ = transposed_ ? padded(N) + kRowAlign : D;
    copy_ = scratch<float>(slot, transposed_ ? D * ld_ : N * D);
    data_ = copy_;
    copy(0, std::min(S, lo));
  }

  void copy_until(int64_t key_end) {
    if (key_end > done_) copy(done_, key_end);
    done_ = std::max(done_, key_end);
  }

  // from key `key` on: a column of K^T, or a row
  const float* at(int64_t key) const { return data_ + (transposed_ ? key : key * ld_); }
  int64_t ld() const { return ld_; }

 private:
  static constexpr int64_t kChunk = 64;  // bf16 keys converted at a time before their transpose
  static constexpr int kStagingSlot = 22;

  void copy(int64_t j0, int64_t j1) {  // keys [j0, j1)
    if (j1 <= j0) return;
    if (!transposed_) {
      for (int64_t j = j0; j < j1; ++j) at::vec::convert<scalar_t, float>(xs_ + j * xsn_, copy_ + j * D_, D_);
    } else if constexpr (std::is_same_v<scalar_t, float>) {
      transpose_into(xs_ + j0 * xsn_, xsn_, j1 - j0, D_, copy_ + j0, ld_);
    } else {  // converted in chunks of rows, each transposed while in cache
      float* rows = scratch<float>(kStagingSlot, kChunk * D_);
      for (int64_t c0 = j0; c0 < j1; c0 += kChunk) {
        const int64_t c1 = std::min(j1, c0 + kChunk);
        for (int64_t j = c0; j < c1; ++j) at::vec::convert<scalar_t, float>(xs_ + j * xsn_, rows + (j - c0) * D_, D_);
        transpose_into(rows, D_, c1 - c0, D_, copy_ + c0, ld_);
      }
    }
  }

  const scalar_t* xs_ = nullptr;
  int64_t xsn_ = 0, D_ = 0;
  bool transposed_ = true;
  int64_t ld_ = 0, done_ = 0;
  float* copy_ = nullptr;
  const float* data_ = nullptr;
};

// [0, n) cut into `parts` runs of consecutive items of about equal total cost(i) (> 0), as
// bounds: run j is [bounds[j], bounds[j + 1]).
template <typename Cost>
std::vector<int64_t> balanced_runs(int64_t n, int64_t parts, Cost&& cost) {
  parts = std::max<int64_t>(1, std::min(parts, n));
  std::vector<int64_t> prefix(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) prefix[i + 1] = prefix[i] + cost(i);
  std::vector<int64_t> bounds(parts + 1, n);
  bounds[0] = 0;
  for (int64_t j = 1; j < parts; ++j) {
    // run j starts at the first item with at least j / parts of the total before it
    bounds[j] = std::lower_bound(prefix.begin(), prefix.end(), prefix[n] * j / parts) - prefix.begin();
  }
  return bounds;
}

// How a forward tile does its products: MKL (any dtype), oneDNN brgemm on VNNI-packed
// bf16 blocks (PackedHead), or oneDNN brgemm in fp32 on a transposed K (HeadCopy; bf16
// inputs converted as the tiles reach them).
enum class Products { kBlas, kPackedBf16, kBrgemmFp32 };

template <typename scalar_t, Products products = Products::kBlas>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                    at::Tensor& lse, int64_t W, int64_t S, double scale_d, int64_t qT, int64_t kT) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool reduced = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool Packed = products == Products::kPackedBf16, Brgemm = products == Products::kBrgemmFp32;
  constexpr bool unscaled = Packed || Brgemm;  // brgemm has no alpha: the softmax applies the scale
  static_assert(!Packed || std::is_same_v<scalar_t, at::BFloat16>, "the packed path is bf16's");
  static_assert(!Brgemm || std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>,
                "the fp32 brgemm path takes fp32 or bf16 (converted)");
  // what the products read (the brgemm path: fp32, bf16 converted) and the probabilities' type
  // (bf16 for bf16 products, else the accumulation type)
  using prod_t = std::conditional_t<Brgemm, float, scalar_t>;
  using p_t = std::conditional_t<reduced && !Brgemm, scalar_t, acc_t>;
  constexpr bool converted = Brgemm && reduced, reduced_p = !std::is_same_v<p_t, acc_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t rep = Hq / Hkv;
  const int64_t nqt = (N + qT - 1) / qT;
  const int64_t align = Packed ? kKeyStep : 1;
  if (Packed) kT = std::max(kPackBlock, kT / kPackBlock * kPackBlock);
  const int64_t max_rows = rep * qT, ldmax = padded(kT);
  TORCH_INTERNAL_ASSERT(!Packed || k.stride(2) % 2 == 0, "swa_cpu: the packed path reads key rows as 32-bit words");
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  scalar_t* od = out.data_ptr<scalar_t>();
  acc_t* ld = lse.data_ptr<acc_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsm = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);

  // The threads take runs of tasks of about equal work: a tile's work is the keys it reads,
  // fewer for the first W positions, so equal counts gave the thread with a lone KV head's
  // second half (GQA 8 in the grid, W = n/4) a third more work than the other.
  const std::vector<int64_t> bounds = balanced_runs(B * Hkv * nqt, at::get_num_threads(), [&](int64_t task) {
    const int64_t m0 = task % nqt * qT;
    return key_ranges(m0, std::min(N, m0 + qT), W, S, align).keys();
  });
  at::parallel_for(0, static_cast<int64_t>(bounds.size()) - 1, 1, [&](int64_t run_begin, int64_t run_end) {
    const int64_t begin = bounds[run_begin], end = bounds[run_end];
    acc_t* qk = scratch<acc_t>(0, max_rows * ldmax);
    acc_t* dst = scratch<acc_t>(1, max_rows * D);
    acc_t* row_max = scratch<acc_t>(2, max_rows);
    acc_t* row_sum = scratch<acc_t>(3, max_rows);
    p_t* qk_reduced = scratch<p_t>(4, reduced_p ? max_rows * ldmax : 0);
    prod_t* q_pack = scratch<prod_t>(5, rep > 1 || converted ? max_rows * D : 0);
    const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
    // row groups of the softmax: G rows' lane vectors, reduced per row by one transpose
    constexpr int64_t G = Vec::size();
    alignas(64) acc_t lanes[G * G], lanes_t[G * G], group_max[G], group_sum[G];
    Span spans[G];
    auto reduce_rows = [&](auto op, acc_t* result) {  // result[i] = op over the lanes of row i
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<acc_t, float>) {
        transpose_16x16(lanes, G, lanes_t, G);
      } else {
        at::vec::transpose_mxn<acc_t>(lanes, G, lanes_t, G, G, G);
      }
#else
      at::vec::transpose_mxn<acc_t>(lanes, G, lanes_t, G, G, G);
#endif
      Vec acc = Vec::loadu(lanes_t);
      for (int64_t j = 1; j < G; ++j) acc = op(acc, Vec::loadu(lanes_t + j * G));
      acc.store(result);
    };
    PackedHead packed{};
    HeadCopy<scalar_t> k_t{}, v_rows{};
    int64_t head_bg = -1;  // the (b, g) whose K/V the thread keeps packed or copied
    for (int64_t task = begin; task < end; ++task) {
      const int64_t t = task % nqt, g = (task / nqt) % Hkv, b = task / (nqt * Hkv);
      const int64_t m0 = t * qT, m1 = std::min(N, m0 + qT);
      const bool new_head = b * Hkv + g != head_bg;
      head_bg = b * Hkv + g;
      if constexpr (Packed) {
        if (new_head) {  // this thread's tiles of (b, g): t .. t_last
          const int64_t t_last = std::min(end - 1, (head_bg + 1) * nqt - 1) - head_bg * nqt;
          const int64_t lo = key_ranges(m0, m1, W, S, kPackBlock).win_begin / kPackBlock;
          const int64_t hi = (std::min(N, (t_last + 1) * qT) + kPackBlock - 1) / kPackBlock;
          packed = PackedHead(kd + b * ksb + g * ksh, ksn, vd + b * vsb + g * vsh, vsn, N, D, S, lo, hi);
        }
        const int64_t blocks_end = (m1 + kPackBlock - 1) / kPackBlock;
        packed.pack_until(blocks_end);
      }
      if constexpr (Brgemm) {
        if (new_head) {
          const int64_t lo = key_ranges(m0, m1, W, S).win_begin;
          k_t = HeadCopy<scalar_t>(16, Layout::kTransposed, kd + b * ksb + g * ksh, ksn, N, D, S, lo);
          v_rows = HeadCopy<scalar_t>(17, Layout::kRows, vd + b * vsb + g * vsh, vsn, N, D, S, lo);
        }
        k_t.copy_until(m1);
        v_rows.copy_until(m1);
      }
      const RowTile rt{m0, m1 - m0, rep};
      const int64_t R = rt.rows();
      int64_t q_ld = 0;
      const prod_t* qp = tile_rows(qd + b * qsb + g * rep * qsh + m0 * qsm, qsh, qsm, rt, D, q_pack, &q_ld);
      const scalar_t* kp = kd + b * ksb + g * ksh;
      const scalar_t* vp = vd + b * vsb + g * vsh;
      fill(row_max, neg_inf, R);
      fill(row_sum, acc_t(0), R);
      // the first key tile's P V overwrites dst (a row that sees none of it gets P = 0);
      // the fallback bf16 gemm is not relied on to skip reading C at beta = 0
      bool overwrite = !reduced_p || Packed;
      if (!overwrite) fill(dst, acc_t(0), R * D);
      for_each_key_tile(key_ranges(m0, m1, W, S, align), kT, align, [&](int64_t n0, int64_t n1) {
        const int64_t kB = n1 - n0;
        const int64_t ldp = Packed ? (kB + kKeyStep - 1) / kKeyStep * kKeyStep : padded(kB);
        if constexpr (Packed) {
          packed_scores(R, D, qp, q_ld, packed, n0, ldp, qk);
        } else if constexpr (Brgemm) {
          at::native::cpublas::brgemm(R, kB, D, q_ld, k_t.ld(), ldp, false, qp, k_t.at(n0), qk);
        } else {
          scores(qp, q_ld, kp + n0 * ksn, ksn, R, kB, ldp, D, scale, qk);
        }
        // The softmax, a group of G rows at a time: each pass's per-row loops are short (a
        // window of 32 keys is 2-3 vectors), so the row max and sum are reduced for the whole
        // group at once (one transpose) instead of one horizontal reduction per row.
        for (int64_t g0 = 0; g0 < R; g0 += G) {
          const int64_t rows = std::min(G, R - g0);
          // pass 1: each row's span (its hidden probabilities zeroed) and lane-wise max
          for (int64_t i = 0; i < G; ++i) {
            Vec vmax(neg_inf);
            if (i < rows) {
              const int64_t r = g0 + i;
              acc_t* row = qk + r * ldp;
              p_t* out_row = reduced_p ? qk_reduced + r * ldp : reinterpret_cast<p_t*>(row);
              const Span span = spans[i] = visible_span(row, rt.m0 + r % rt.qB, n0, n1, W, S);
              // P V reads every column: hidden ones are 0 (a separate bf16 row: zeroed whole)
              if constexpr (reduced_p) {
                zero(out_row, ldp);
              } else {
                zero(out_row, span.c0);
                zero(out_row + span.c1, ldp - span.c1);
              }
              // plain max (it may drop a NaN lane: the NaN reaches the row through its exp,
              // or through max_or_nan where the max itself came out NaN)
              for (int64_t c = span.c0; c < span.c1; c += Vec::size()) vmax = at::vec::clamp_min(Vec::loadu(row + c), vmax);
            }
            vmax.store(lanes + i * G);
          }
          reduce_rows([](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, group_max);
          // pass 2: probabilities against the new row max, and lane-wise sums. The brgemm
          // paths' scores are unscaled: scale > 0, so they scale the max and fold it into the exp.
          for (int64_t i = 0; i < G; ++i) {
            Vec vsum(acc_t(0)), vsum2(acc_t(0));
            if (i < rows && !spans[i].empty()) {
              const int64_t r = g0 + i;
              const Span span = spans[i];
              acc_t* row = qk + r * ldp;
              p_t* out_row = reduced_p ? qk_reduced + r * ldp : reinterpret_cast<p_t*>(row);
              const acc_t new_max = group_max[i] =
                  max_or_nan(row_max[r], group_max[i] * (unscaled ? scale : acc_t(1)));
              if (new_max == neg_inf) {  // nothing of this row visible yet
                zero(out_row + span.c0, span.c1 - span.c0);
              } else {
                // t = log2(e) (scale x - max): base 2, the scale and log2(e) in one factor
                constexpr acc_t log2e = static_cast<acc_t>(1.44269504088896340736);
                const Vec shift(-new_max * log2e), vscale((unscaled ? scale : acc_t(1)) * log2e);
                int64_t c = span.c0;
                if constexpr (reduced_p) {  // two vectors per bf16 store
                  for (; c + 2 * Vec::size() <= span.c1; c += 2 * Vec::size()) {
                    const Vec e0 = softmax_exp2(at::vec::fmadd(Vec::loadu(row + c), vscale, shift));
                    const Vec e1 = softmax_exp2(at::vec::fmadd(Vec::loadu(row + c + Vec::size()), vscale, shift));
                    at::vec::convert_from_float<p_t>(e0, e1).store(out_row + c);
                    vsum += e0;
                    vsum2 += e1;
                  }
                }
                for (; c < span.c1; c += Vec::size()) {
                  const Vec x = Vec::loadu(row + c);
                  const Vec e = softmax_exp2(at::vec::fmadd(x, vscale, shift));
                  store_as<p_t>(out_row + c, e);
                  vsum += e;
                }
              }
            }
            (vsum + vsum2).store(lanes + i * G);
          }
          reduce_rows([](const Vec& x, const Vec& y) { return x + y; }, group_sum);
          // pass 3: the online softmax's running max and sum, what was summed so far rescaled
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t r = g0 + i;
            const acc_t new_max = group_max[i];
            if (spans[i].empty() || new_max == neg_inf) continue;
            const bool rescale = row_max[r] != neg_inf && new_max != row_max[r];  // nothing yet in the first tile
            const acc_t factor = rescale ? std::exp(row_max[r] - new_max) : acc_t(1);
            row_sum[r] = row_sum[r] * factor + group_sum[i];
            if (rescale) {
              acc_t* drow = dst + r * D;
              at::vec::map<acc_t>([factor](Vec x) { return x * Vec(factor); }, drow, drow, D);
            }
            row_max[r] = new_max;
          }
        }
        // dst[R, d] += P V
        if constexpr (Packed) {  // 64 columns of V per call, over the tile's keys (P is 0 past kB)
          for (int64_t dc = 0; dc < D / kPackBlock; ++dc) {
            const at::BFloat16* vb = packed.v(dc, n0);
            at::native::cpublas::brgemm(R, kPackBlock, ldp, ldp, kPackBlock, D, !overwrite, qk_reduced, vb, dst + dc * kPackBlock);
          }
        } else if constexpr (Brgemm) {
          at::native::cpublas::brgemm(R, D, kB, ldp, v_rows.ld(), D, !overwrite, qk, v_rows.at(n0), dst);
        } else if constexpr (reduced_p) {
          gemm(false, false, D, R, kB, acc_t(1), vp + n0 * vsn, vsn, qk_reduced, ldp, acc_t(1), dst, D);
        } else {
          gemm(false, false, D, R, kB, acc_t(1), vp + n0 * vsn, vsn, qk, ldp, overwrite ? acc_t(0) : acc_t(1), dst, D);
        }
        overwrite = false;
      });
      for (int64_t hr = 0; hr < rep; ++hr) {
        const int64_t row0 = (b * Hq + g * rep + hr) * N + m0;  // contiguous [b, hq, s] row
        for (int64_t r = 0; r < rt.qB; ++r) {
          const int64_t i = hr * rt.qB + r;
          const acc_t inv = acc_t(1) / row_sum[i];
          at::vec::map<scalar_t>([inv](Vec x) { return x * Vec(inv); }, od + (row0 + r) * D, dst + i * D, D);
        }
        at::vec::map2<acc_t>([](Vec m, Vec sum) { return m + sum.log(); }, ld + row0, row_max + hr * rt.qB,
                             row_sum + hr * rt.qB, rt.qB);
      }
    }
    if constexpr (Packed) at::native::cpublas::brgemm_release();  // this thread's AMX state
  });
}

// One backward task: the `rep` query heads of KV head g of batch b, queries [q0, q1).
struct Task {
  int64_t b, g, q0, q1;
  KeyRanges keys;    // keys any of its queries reads
  int64_t offset;    // first row in the side dK/dV buffer (segments after the first)
};

// The backward's products: MKL (any dtype); oneDNN brgemm in fp32 on AVX-512 (kBrgemmFp32), in
// the keys-by-queries frame (below); or oneDNN brgemm on bf16 dot products (kPackedBf16): K^T,
// K's rows and V^T packed in VNNI blocks per task as the tiles reach them (PackedHead, as the
// forward), the tile's Q and dO rows packed in VNNI pairs for dK and dV, P and dS rounded to
// bf16 for their products (as the MKL bf16 path and torch's own bf16 backward do).
//
// The fp32 brgemm path works on S^T, P^T, dP^T and dS^T, [keys, rows], since brgemm takes no
// transposed operand and dV = P^T dO, dK = dS^T Q read them so: S^T = K Q^T and dP^T = V dO^T
// from K's and V's rows, dQ^T = K^T dS^T on the K^T kept per task (HeadCopy; bf16 inputs
// converted), Q^T, dO^T and dQ^T transposed once per query tile instead of P and dS per key
// tile (which took 5-7% of the backward). The softmax's values run along a key's row, one
// vector per 16 query rows, masked by the rows' positions where a key is not seen by all.
template <typename scalar_t, Products products = Products::kBlas>
void backward_kernel(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const at::Tensor& lse, at::Tensor& grad_q, at::Tensor& grad_k,
                     at::Tensor& grad_v, int64_t W, int64_t S, double scale_d, int64_t qT, int64_t kT) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr bool reduced = !std::is_same_v<scalar_t, acc_t>;
  constexpr bool Packed = products == Products::kPackedBf16, Brgemm = products == Products::kBrgemmFp32;
  // brgemm has no alpha: its scores are unscaled, the scale goes into the exp and dS (the
  // brgemm frame applies it itself; `unscaled` is the row frame's, where the packed path runs)
  constexpr bool unscaled = Packed;
  static_assert(!Packed || std::is_same_v<scalar_t, at::BFloat16>, "the packed path is bf16's");
  static_assert(!Brgemm || std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>,
                "the brgemm backward takes fp32 or bf16 (converted)");
  using prod_t = std::conditional_t<Brgemm, float, scalar_t>;  // as in the forward
  using p_t = std::conditional_t<reduced && !Brgemm, scalar_t, acc_t>;
  constexpr bool converted = Brgemm && reduced, reduced_p = !std::is_same_v<p_t, acc_t>;
  const acc_t scale = static_cast<acc_t>(scale_d);
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), D = q.size(3), Hkv = k.size(1);
  const int64_t rep = Hq / Hkv;
  const int64_t align = Packed ? kKeyStep : 1;  // as the forward: key tiles from multiples of 32
  if (Packed) kT = std::max(kPackBlock, kT / kPackBlock * kPackBlock);
  const int64_t max_rows = rep * qT, ldmax = padded(kT), ldt = padded(max_rows);
  TORCH_INTERNAL_ASSERT(!Packed || (k.stride(2) % 2 == 0 && v.stride(2) % 2 == 0),
                        "swa_cpu: the packed path reads key rows as 32-bit words");

  // Segments of the queries per (b, g): enough tasks for the threads, each about a few
  // windows long so that the dK/dV rows shared between segments stay few. The
  // first segment of each (b, g) accumulates into dK/dV themselves (its keys start at
  // 0), the others into side buffers summed onto them afterwards.
  const int64_t threads = at::get_num_threads();
  const int64_t want = std::max<int64_t>(1, (4 * threads + B * Hkv - 1) / (B * Hkv));
  const int64_t min_len = std::max<int64_t>(qT, 2 * W);
  int64_t seg_len = std::max<int64_t>(min_len, (N + want - 1) / want);
  seg_len = (seg_len + qT - 1) / qT * qT;
  // cut at about equal work (the first W positions read fewer keys), in whole query tiles
  const int64_t nqt = (N + qT - 1) / qT;
  const std::vector<int64_t> cuts = balanced_runs(nqt, (N + seg_len - 1) / seg_len, [&](int64_t t) {
    return key_ranges(t * qT, std::min(N, (t + 1) * qT), W, S, align).keys();
  });
  std::vector<std::pair<int64_t, int64_t>> segments;  // [q0, q1), the same for every (b, g)
  for (size_t j = 0; j + 1 < cuts.size(); ++j) {
    if (cuts[j] < cuts[j + 1]) segments.emplace_back(cuts[j] * qT, std::min(N, cuts[j + 1] * qT));
  }
  const int64_t per_head = static_cast<int64_t>(segments.size());
  std::vector<Task> tasks;
  int64_t side_rows = 0;
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < Hkv; ++g) {
      for (const auto& [q0, q1] : segments) {
        const KeyRanges kr = key_ranges(q0, q1, W, S, align);  // the keys its tiles read
        tasks.push_back({b, g, q0, q1, kr, side_rows});
        if (q0 > 0) side_rows += kr.keys();
      }
    }
  }
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  // fp32/fp64: dK/dV accumulate in grad_k/grad_v; bf16: in fp32 copies.
  at::Tensor acc_k = reduced ? at::zeros({B, Hkv, N, D}, q.options().dtype(acc_type)) : grad_k.zero_();
  at::Tensor acc_v = reduced ? at::zeros({B, Hkv, N, D}, q.options().dtype(acc_type)) : grad_v.zero_();
  at::Tensor side = at::zeros({2, side_rows, D}, q.options().dtype(acc_type));
  acc_t* akd = acc_k.data_ptr<acc_t>();
  acc_t* avd = acc_v.data_ptr<acc_t>();
  acc_t* dk_side = side.data_ptr<acc_t>();
  acc_t* dv_side = dk_side + side_rows * D;

  const scalar_t* god = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* qd = q.const_data_ptr<scalar_t>();
  const scalar_t* kd = k.const_data_ptr<scalar_t>();
  const scalar_t* vd = v.const_data_ptr<scalar_t>();
  const scalar_t* od = out.const_data_ptr<scalar_t>();
  const acc_t* ld = lse.const_data_ptr<acc_t>();
  scalar_t* gqd = grad_q.data_ptr<scalar_t>();
  const int64_t qsb = q.stride(0), qsh = q.stride(1), qsm = q.stride(2);
  const int64_t ksb = k.stride(0), ksh = k.stride(1), ksn = k.stride(2);
  const int64_t vsb = v.stride(0), vsh = v.stride(1), vsn = v.stride(2);

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t begin, int64_t end) {
    // the row frame's P, dP then dS [R, ldp] (the brgemm path's frame is below)
    acc_t* attn = scratch<acc_t>(6, Brgemm ? 0 : max_rows * ldmax);
    acc_t* grad_attn = scratch<acc_t>(7, Brgemm ? 0 : max_rows * ldmax);
    acc_t* dsum = scratch<acc_t>(8, ldt);  // padded: the brgemm path reads them as whole vectors
    acc_t* norm = scratch<acc_t>(9, ldt);
    acc_t* dq = scratch<acc_t>(10, max_rows * D);
    p_t* attn_reduced = scratch<p_t>(11, reduced_p ? max_rows * ldmax : 0);
    p_t* grad_attn_reduced = scratch<p_t>(12, reduced_p ? max_rows * ldmax : 0);
    prod_t* q_pack = scratch<prod_t>(13, rep > 1 || converted ? max_rows * D : 0);
    prod_t* go_pack = scratch<prod_t>(14, rep > 1 || converted ? max_rows * D : 0);
    acc_t* out_row = scratch<acc_t>(24, converted ? D : 0);  // a row of O, converted
    Span* spans = scratch<Span>(15, Brgemm ? 0 : max_rows);
    // the brgemm path's keys-by-queries frame: P^T and dP^T, then dS^T, [kB, ldt]; Q^T, dO^T,
    // dQ^T [D, ldt]; the query rows' positions (padding: -1, seen by no key)
    acc_t* attn_t = scratch<acc_t>(20, Brgemm ? ldmax * ldt : 0);
    acc_t* grad_attn_t = scratch<acc_t>(21, Brgemm ? ldmax * ldt : 0);
    acc_t* q_t = scratch<acc_t>(31, Brgemm ? D * ldt : 0);
    acc_t* go_t = scratch<acc_t>(32, Brgemm ? D * ldt : 0);
    acc_t* dq_t = scratch<acc_t>(33, Brgemm ? D * ldt : 0);
    acc_t* positions = scratch<acc_t>(34, Brgemm ? ldt : 0);
    HeadCopy<scalar_t> v_rows{}, k_rows{};
    HeadCopy<float> k_t{};  // transposed from k_rows (an fp32 K, converted once)
    // the packed path: P^T and dS^T in bf16 [kB, R + 1], the tile's Q and dO rows in VNNI
    // pairs [(R + 1) / 2, D, 2] (an odd last row paired with zeros), K and V^T per task
    using bf16 = at::BFloat16;
    bf16* p_t_rows = scratch<bf16>(25, Packed ? ldmax * ldt : 0);
    bf16* ds_t_rows = scratch<bf16>(26, Packed ? ldmax * ldt : 0);
    bf16* q_vnni = scratch<bf16>(27, Packed ? (max_rows + 1) * D : 0);
    bf16* go_vnni = scratch<bf16>(28, Packed ? (max_rows + 1) * D : 0);
    PackedHead k_packed{}, v_t_packed{};
    auto mul = [](Vec x, Vec y) { return x * y; };
    auto add = [](Vec x, Vec y) { return x + y; };
    for (int64_t ti = begin; ti < end; ++ti) {
      const Task& task = tasks[ti];
      const scalar_t* kp = kd + task.b * ksb + task.g * ksh;
      const scalar_t* vp = vd + task.b * vsb + task.g * vsh;
      if constexpr (Brgemm) {
        const int64_t lo = key_ranges(task.q0, std::min(task.q1, task.q0 + qT), W, S).win_begin;
        k_rows = HeadCopy<scalar_t>(23, Layout::kRows, kp, ksn, N, D, S, lo);
        k_t = HeadCopy<float>(18, Layout::kTransposed, k_rows.at(0), k_rows.ld(), N, D, S, lo);
        v_rows = HeadCopy<scalar_t>(19, Layout::kRows, vp, vsn, N, D, S, lo);
      }
      if constexpr (Packed) {  // the task's blocks, packed as its tiles reach them
        const int64_t lo = key_ranges(task.q0, std::min(task.q1, task.q0 + qT), W, S, kPackBlock).win_begin / kPackBlock;
        const int64_t hi = (task.q1 + kPackBlock - 1) / kPackBlock;
        k_packed = PackedHead(kp, ksn, kp, ksn, N, D, S, lo, hi);
        v_t_packed = PackedHead(vp, vsn, nullptr, 0, N, D, S, lo, hi, 29, 30);
      }
      const bool first = task.q0 == 0;
      acc_t* dk_task = first ? akd + (task.b * Hkv + task.g) * N * D : dk_side + task.offset * D;
      acc_t* dv_task = first ? avd + (task.b * Hkv + task.g) * N * D : dv_side + task.offset * D;
      // row of key j in dk_task: the keys themselves for the first segment, else sinks then window
      auto local_row = [&](int64_t j) {
        if (first) return j;
        return j < task.keys.sink_end ? j : task.keys.sink_end + (j - task.keys.win_begin);
      };
      for (int64_t m0 = task.q0; m0 < task.q1; m0 += qT) {
        const int64_t m1 = std::min(task.q1, m0 + qT);
        const RowTile rt{m0, m1 - m0, rep};
        const int64_t R = rt.rows();
        const int64_t h0 = task.g * rep;
        const int64_t row0 = (task.b * Hq + h0) * N + m0;  // contiguous [b, hq, s] row of (h0, m0)
        int64_t q_ld = 0, go_ld = 0;
        const prod_t* qp = tile_rows(qd + task.b * qsb + h0 * qsh + m0 * qsm, qsh, qsm, rt, D, q_pack, &q_ld);
        const prod_t* gop = tile_rows(god + row0 * D, N * D, D, rt, D, go_pack, &go_ld);
        for (int64_t hr = 0; hr < rep; ++hr) {
          for (int64_t r = 0; r < rt.qB; ++r) {
            const int64_t i = hr * rt.qB + r, row = row0 + hr * N + r;
            norm[i] = ld[row];
            if constexpr (converted) {  // from the converted rows, as the fp32 kernel sums them
              at::vec::convert<scalar_t, acc_t>(od + row * D, out_row, D);
              dsum[i] = at::vec::map2_reduce_all<acc_t>(mul, add, gop + i * go_ld, out_row, D);
            } else {
              dsum[i] = at::vec::map2_reduce_all<scalar_t>(mul, add, god + row * D, od + row * D, D);
            }
          }
        }
        if constexpr (!Brgemm) fill(dq, acc_t(0), R * D);  // the brgemm frame writes it from dQ^T
        if constexpr (Brgemm) {
          k_rows.copy_until(m1);  // before k_t, which reads it
          k_t.copy_until(m1);
          v_rows.copy_until(m1);
          transpose_into(qp, q_ld, R, D, q_t, ldt);
          transpose_into(gop, go_ld, R, D, go_t, ldt);
          fill(dq_t, acc_t(0), D * ldt);
          for (int64_t i = 0; i < ldt; ++i) positions[i] = i < R ? static_cast<acc_t>(m0 + i % rt.qB) : acc_t(-1);
          fill(norm + R, acc_t(0), ldt - R);
          fill(dsum + R, acc_t(0), ldt - R);
        }
        const int64_t R2 = (R + 1) / 2 * 2;  // the packed path's reduction over rows: pairs
        if constexpr (Packed) {
          const int64_t blocks_end = (m1 + kPackBlock - 1) / kPackBlock;
          k_packed.pack_until(blocks_end);
          v_t_packed.pack_until(blocks_end);
          at::vec::pack_vnni2(qp, q_vnni, q_ld, R, D);
          at::vec::pack_vnni2(gop, go_vnni, go_ld, R, D);
        }
        // A^T of a bf16 [R, kB] tile for brgemm's A [kB, R2] (column R zero when R is odd)
        auto transposed = [&](const bf16* src, int64_t ldp, int64_t kB, bf16* dst) {
          transpose_bf16(src, ldp, R, kB, dst, ldt);
          if (R2 > R) {
            for (int64_t j = 0; j < kB; ++j) dst[j * ldt + R] = bf16(0.0f);
          }
          return dst;
        };
        for_each_key_tile(key_ranges(m0, m1, W, S, align), kT, align, [&](int64_t n0, int64_t n1) {
          const int64_t kB = n1 - n0;
          const int64_t ldp = Packed ? (kB + kKeyStep - 1) / kKeyStep * kKeyStep : padded(kB);
          acc_t* dk_rows = dk_task + local_row(n0) * D;
          acc_t* dv_rows = dv_task + local_row(n0) * D;
          if constexpr (Brgemm) {
            using at::native::cpublas::brgemm;
            // S^T = K Q^T and dP^T = V dO^T [kB, R] (unscaled)
            brgemm(kB, R, D, k_rows.ld(), ldt, ldt, false, k_rows.at(n0), q_t, attn_t);
            brgemm(kB, R, D, v_rows.ld(), ldt, ldt, false, v_rows.at(n0), go_t, grad_attn_t);
            // P^T = exp(scale S^T - lse), dS^T = scale P^T (dP^T - rowsum(dO * O)), both 0 where
            // a row does not see the key: key j is seen by positions [j, j + W) (from j on, a sink)
            const Vec vscale(scale), zero_v(acc_t(0));
            for (int64_t j = n0; j < n1; ++j) {
              acc_t* p_row = attn_t + (j - n0) * ldt;
              acc_t* ds_row = grad_attn_t + (j - n0) * ldt;
              const bool sink = j < S, all = j <= m0 && (sink || j + W >= m1);
              const Vec from(static_cast<acc_t>(j)), to(static_cast<acc_t>(sink ? N : j + W - 1));
              for (int64_t c = 0; c < R; c += Vec::size()) {
                Vec pv = softmax_exp(at::vec::fmsub(Vec::loadu(p_row + c), vscale, Vec::loadu(norm + c)));
                Vec ds = pv * (Vec::loadu(ds_row + c) - Vec::loadu(dsum + c)) * vscale;
                if (!all) {
                  const Vec pos = Vec::loadu(positions + c);
                  const Vec seen = (pos >= from) & (pos <= to);
                  pv = Vec::blendv(zero_v, pv, seen);
                  ds = Vec::blendv(zero_v, ds, seen);
                }
                pv.store(p_row + c);
                ds.store(ds_row + c);
              }
            }
            // dV += P^T dO ;  dK += dS^T Q ;  dQ^T += K^T dS^T
            brgemm(kB, D, R, ldt, go_ld, D, true, attn_t, gop, dv_rows);
            brgemm(kB, D, R, ldt, q_ld, D, true, grad_attn_t, qp, dk_rows);
            brgemm(D, R, kB, k_t.ld(), ldt, ldt, true, k_t.at(n0), grad_attn_t, dq_t);
          } else {  // the row frame: P, dP, dS [R, kB]
            // P = exp(scale * Q K^T - lse), hidden entries 0
            if constexpr (Packed) {
              packed_scores(R, D, qp, q_ld, k_packed, n0, ldp, attn);
            } else {
              scores(qp, q_ld, kp + n0 * ksn, ksn, R, kB, ldp, D, scale, attn);
            }
            const Vec vscale(unscaled ? scale : acc_t(1));
            for (int64_t r = 0; r < R; ++r) {
              const Vec shift(norm[r]);
              acc_t* row = attn + r * ldp;
              p_t* row_reduced = attn_reduced + r * ldp;
              const Span span = spans[r] = visible_span(row, m0 + r % rt.qB, n0, n1, W, S);
              zero(row, span.c0);
              zero(row + span.c1, ldp - span.c1);
              if constexpr (reduced_p) {
                zero(row_reduced, span.c0);
                zero(row_reduced + span.c1, ldp - span.c1);
              }
              for (int64_t c = span.c0; c < span.c1; c += Vec::size()) {
                const Vec x = Vec::loadu(row + c);
                const Vec e = softmax_exp(unscaled ? at::vec::fmsub(x, vscale, shift) : x - shift);
                e.store(row + c);
                if constexpr (reduced_p) store_as<p_t>(row_reduced + c, e);
              }
            }
            const p_t* P = reduced_p ? attn_reduced : reinterpret_cast<const p_t*>(attn);
            // dV[kB, d] += P^T dO ;  dP = dO V^T
            if constexpr (Packed) {
              at::native::cpublas::brgemm(kB, D, R2, ldt, D, D, true, transposed(attn_reduced, ldp, kB, p_t_rows),
                                          go_vnni, dv_rows);
              packed_scores(R, D, gop, go_ld, v_t_packed, n0, ldp, grad_attn);
            } else {
              gemm(false, true, D, kB, R, acc_t(1), gop, go_ld, P, ldp, acc_t(1), dv_rows, D);
              scores(gop, go_ld, vp + n0 * vsn, vsn, R, kB, ldp, D, acc_t(1), grad_attn);
            }
            // dS = P * (dP - rowsum(dO * O)): 0 outside the span, as P (brgemm: times the scale,
            // which the BLAS path's dQ and dK products apply)
            for (int64_t r = 0; r < R; ++r) {
              const Vec ds(dsum[r]);
              acc_t* dp = grad_attn + r * ldp;
              p_t* ds_row = reduced_p ? grad_attn_reduced + r * ldp : reinterpret_cast<p_t*>(dp);
              const acc_t* p = attn + r * ldp;
              const Span span = spans[r];
              zero(ds_row, span.c0);
              zero(ds_row + span.c1, ldp - span.c1);
              for (int64_t c = span.c0; c < span.c1; c += Vec::size()) {
                const Vec grad = Vec::loadu(p + c) * (Vec::loadu(dp + c) - ds);
                store_as<p_t>(ds_row + c, unscaled ? grad * vscale : grad);
              }
            }
            const p_t* dS = reduced_p ? grad_attn_reduced : reinterpret_cast<const p_t*>(grad_attn);
            // dQ[R, d] += scale * dS K ;  dK[kB, d] += scale * dS^T Q
            if constexpr (Packed) {  // dQ: 64 columns of K's VNNI rows per call, over the tile's keys (dS is 0 past kB)
              for (int64_t dc = 0; dc < D / kPackBlock; ++dc) {
                at::native::cpublas::brgemm(R, kPackBlock, ldp, ldp, kPackBlock, D, true, dS, k_packed.v(dc, n0),
                                            dq + dc * kPackBlock);
              }
              at::native::cpublas::brgemm(kB, D, R2, ldt, D, D, true, transposed(dS, ldp, kB, ds_t_rows), q_vnni,
                                          dk_rows);
            } else {
              gemm(false, false, D, R, kB, scale, kp + n0 * ksn, ksn, dS, ldp, acc_t(1), dq, D);
              gemm(false, true, D, kB, R, scale, qp, q_ld, dS, ldp, acc_t(1), dk_rows, D);
            }
          }
        });
        if constexpr (Brgemm) transpose_into(dq_t, ldt, D, R, dq, D);
        for (int64_t hr = 0; hr < rep; ++hr) {
          scalar_t* gqp = gqd + (row0 + hr * N) * D;
          const acc_t* src = dq + hr * rt.qB * D;
          if constexpr (reduced) {
            at::vec::convert<acc_t, scalar_t>(src, gqp, rt.qB * D);
          } else {
            std::copy(src, src + rt.qB * D, gqp);
          }
        }
      }
    }
    if constexpr (Packed) at::native::cpublas::brgemm_release();  // this thread's AMX state
  });

  // Sum the later segments' dK/dV rows onto the keys, one (b, g) per work item.
  if (per_head > 1) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bg = begin; bg < end; ++bg) {
        acc_t* kdst = akd + bg * N * D;
        acc_t* vdst = avd + bg * N * D;
        for (int64_t si = 1; si < per_head; ++si) {
          const Task& task = tasks[bg * per_head + si];
          auto add = [&](int64_t j0, int64_t j1, int64_t local0) {
            const int64_t n = (j1 - j0) * D;
            const acc_t* ks = dk_side + (task.offset + local0) * D;
            const acc_t* vs = dv_side + (task.offset + local0) * D;
            at::vec::map2<acc_t>([](Vec x, Vec y) { return x + y; }, kdst + j0 * D, kdst + j0 * D, ks, n);
            at::vec::map2<acc_t>([](Vec x, Vec y) { return x + y; }, vdst + j0 * D, vdst + j0 * D, vs, n);
          };
          add(0, task.keys.sink_end, 0);
          add(task.keys.win_begin, task.keys.win_end, task.keys.sink_end);
        }
      }
    });
  }
  if (reduced) {
    grad_k.copy_(acc_k);
    grad_v.copy_(acc_v);
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t W, int64_t S,
                  int64_t qT, int64_t kT, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "swa_cpu: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "swa_cpu: expected [b, h, s, d] tensors");
  TORCH_CHECK(k.sizes() == v.sizes(), "swa_cpu: k and v must have the same shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3),
              "swa_cpu: q and k disagree on batch/seq/head_dim");
  TORCH_CHECK(q.size(1) >= 1 && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "swa_cpu: query heads must be a positive multiple of KV heads");
  TORCH_CHECK(q.size(3) >= 1, "swa_cpu: head_dim must be >= 1");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "swa_cpu: q, k, v dtypes differ: ",
              q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  // the products run on unscaled scores: the row max is taken before scaling
  TORCH_CHECK(scale > 0 && std::isfinite(scale), "swa_cpu: scale must be a positive finite number, got ", scale);
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "swa_cpu: the last dim must be contiguous");
  TORCH_CHECK(W >= 1 && S >= 0 && qT >= 1 && kT >= 1, "swa_cpu: window, tiles >= 1 and sinks >= 0");
}

std::vector<at::Tensor> swa_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t window,
                                    int64_t sinks, double scale, int64_t q_tile, int64_t kv_tile, bool allow_pack) {
  check_inputs(q, k, v, window, sinks, q_tile, kv_tile, scale);
  at::Tensor out = at::empty(q.sizes(), q.options());
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(acc));
  AT_DISPATCH_SWITCH(q.scalar_type(), "swa_forward",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      if (allow_pack && can_brgemm_fp32()) {
        forward_kernel<scalar_t, Products::kBrgemmFp32>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile);
      } else {
        forward_kernel<scalar_t>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile);
      }
    })
    AT_DISPATCH_CASE(at::kDouble, [&] { forward_kernel<scalar_t>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      // the packed path reads key rows as 32-bit words: an odd row stride takes MKL's
      if (allow_pack && bf16_as_fp32(q.size(3), false)) {
        forward_kernel<scalar_t, Products::kBrgemmFp32>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile);
      } else if (allow_pack && can_pack_bf16(q.size(3)) && k.stride(2) % 2 == 0) {
        forward_kernel<scalar_t, Products::kPackedBf16>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile);
      } else {
        forward_kernel<scalar_t>(q, k, v, out, lse, window, sinks, scale, q_tile, kv_tile);
      }
    }));
  return {out, lse};
}

std::vector<at::Tensor> swa_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                     int64_t window, int64_t sinks, double scale, int64_t q_tile, int64_t kv_tile,
                                     bool allow_brgemm) {
  check_inputs(q, k, v, window, sinks, q_tile, kv_tile, scale);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), "swa_cpu: grad_out/out must match q");
  const at::Tensor go = grad_out.contiguous(), o = out.contiguous(), l = lse.contiguous();
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  AT_DISPATCH_SWITCH(q.scalar_type(), "swa_backward",
    AT_DISPATCH_CASE(at::kFloat, [&] {
      if (allow_brgemm && can_brgemm_fp32()) {
        backward_kernel<scalar_t, Products::kBrgemmFp32>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale,
                                                         q_tile, kv_tile);
      } else {
        backward_kernel<scalar_t>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale, q_tile, kv_tile);
      }
    })
    AT_DISPATCH_CASE(at::kDouble, [&] { backward_kernel<scalar_t>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale, q_tile, kv_tile); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] {
      // the packed path reads key rows as 32-bit words: an odd row stride takes the paths below
      // (MKL's on a machine that packs, as in the forward)
      if (allow_brgemm && packs_bf16_backward(q.size(3)) && k.stride(2) % 2 == 0 && v.stride(2) % 2 == 0) {
        backward_kernel<scalar_t, Products::kPackedBf16>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale,
                                                         q_tile, kv_tile);
      } else if (allow_brgemm && bf16_as_fp32(q.size(3), true)) {
        backward_kernel<scalar_t, Products::kBrgemmFp32>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale,
                                                         q_tile, kv_tile);
      } else {
        backward_kernel<scalar_t>(go, q, k, v, o, l, grad_q, grad_k, grad_v, window, sinks, scale, q_tile, kv_tile);
      }
    }));
  return {grad_q, grad_k, grad_v};
}

// The rate (GFLOP/s, all of torch's threads at once) of oneDNN brgemm's C[M, N] = A[M, K] B[K, N]
// on cache-resident operands, as the kernel's tiles run it: fp32 (rows of B and C a line more
// than N apart, as the kernel pads them), or bf16 on VNNI-packed B where bf16 dot products run
// (else 0). For a benchmark's ceiling: on AMD, torch.mm's large products take MKL's generic
// path and run below what these tile products reach.
double tile_product_gflops(at::ScalarType dtype, int64_t M, int64_t N, int64_t K, double seconds) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "tile_product_gflops: dtype fp32 or bf16, not ", dtype);
  TORCH_CHECK(M >= 1 && N >= 1 && K >= 1 && seconds > 0, "tile_product_gflops: sizes >= 1 and seconds > 0");
  const bool bf16 = dtype == at::kBFloat16;
  if (bf16 && (!bf16_products() || K % 2 != 0)) return 0.0;
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> calls{0};
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t ld = bf16 ? N : padded(N) + kRowAlign;
      std::vector<float> a(M * K, 0.5f), b(K * ld, 0.25f), c(M * ld);
      std::vector<at::BFloat16> a16(bf16 ? M * K : 0, at::BFloat16(0.5f)), b16(bf16 ? K * N : 0, at::BFloat16(0.25f));
      auto call = [&] {
        if (bf16) {  // B in VNNI pairs [K / 2, N, 2]: any layout of equal values
          at::native::cpublas::brgemm(M, N, K, K, N, N, false, a16.data(), b16.data(), c.data(), true);
        } else {
          at::native::cpublas::brgemm(M, N, K, K, ld, ld, false, a.data(), b.data(), c.data());
        }
      };
      call();  // the kernel's generation, outside the count
      int64_t done = 0;
      const auto until = clock::now() + std::chrono::duration<double>(seconds);
      while (clock::now() < until) {
        for (int i = 0; i < 16; ++i) call();
        done += 16;
      }
      calls += done;
      if (bf16) at::native::cpublas::brgemm_release();
    }
  });
  const double elapsed = std::chrono::duration<double>(clock::now() - start).count();
  return 2.0 * M * N * K * static_cast<double>(calls.load()) / elapsed / 1e9;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &swa_forward, "Banded SWA forward: (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("window"), py::arg("sinks"), py::arg("scale"), py::arg("q_tile"), py::arg("kv_tile"),
        py::arg("allow_pack") = true);
  m.def("packs_bf16", &can_pack_bf16, "Whether the bf16 forward uses packed oneDNN brgemm here, for this head dim");
  m.def("packs_bf16_backward", &packs_bf16_backward, "Whether the bf16 backward uses packed oneDNN brgemm here, "
        "for this head dim");
  m.def("amx_bf16", &amx_bf16, "Whether bf16 products run on AMX here (else AVX512-BF16 where packs_bf16)");
  m.def("brgemm_fp32", &can_brgemm_fp32, "Whether the fp32 forward and backward use oneDNN brgemm here");
  m.def("bf16_as_fp32", &bf16_as_fp32, "Whether bf16 forward (backward=False) or backward calls run the fp32 brgemm "
        "kernel here, for this head dim", py::arg("head_dim"), py::arg("backward"));
  m.def("tile_product_gflops", &tile_product_gflops, "GFLOP/s of oneDNN brgemm at a tile's shape [M, K] x [K, N] "
        "on all threads (fp32, or bf16 VNNI where bf16 dot products run, else 0)", py::arg("dtype"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("seconds"));
  m.def("backward", &swa_backward, "Banded SWA backward: (grad_q, grad_k, grad_v)", py::arg("grad_out"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("window"), py::arg("sinks"),
        py::arg("scale"), py::arg("q_tile"), py::arg("kv_tile"), py::arg("allow_brgemm") = true);
}
