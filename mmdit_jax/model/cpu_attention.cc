// Attention for the CPU as an XLA FFI custom call: the forward (output and log-sum-exp) and the backward
// (dq, dk, dv), float32, on (B, S, H, K) arrays as the model holds them (no transposed copies).
//
// Why: XLA's CPU backend runs attention as YNNPACK fusions at 28-60 GFLOP/s on one core, the softmax inside
// them, and needs head-major copies of q, k and v; torch's CPU SDPA kernel takes about 60 % of that time
// (docs/performance.md). This kernel does what torch's does: per (batch, head), a block of query rows at a
// time, the logits of the block against every key (a block x S_kv panel that stays in cache), the softmax
// in place, then the product with v. The backward recomputes the probabilities from the saved log-sum-exp.
//
// The products are one register-blocked GEMM micro-kernel (8 rows x 2 vectors of accumulators with
// AVX-512, 6 x 2 with AVX2), written with GCC's vector extensions at the machine's vector width and compiled
// for the machine at hand (-march=native), so the same source gives AVX-512, AVX2 or NEON code. Work is
// split over (batch, head[, query chunk]) tasks on XLA's intra-op thread pool.
//
// Built at first use by mmdit_jax/model/cpu_attention.py (g++ or clang++, cached by source hash and CPU).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The machine's widest float vector: W lanes (16 with AVX-512, 8 with AVX, else 4: SSE, NEON). A wider
// GCC vector than the hardware's is lowered through memory (AVX2 ran this kernel at 6 GFLOP/s that way).
#if defined(__AVX512F__)
constexpr int W = 16;
#elif defined(__AVX__)
constexpr int W = 8;
#else
constexpr int W = 4;
#endif
// Rows of the micro-kernel's tile: its 2*MR accumulators, two B vectors and a broadcast fit the registers
// (32 vector registers with AVX-512 and on AArch64, 16 otherwise).
#if defined(__AVX512F__) || defined(__aarch64__)
constexpr int MR = 8;
#else
constexpr int MR = 6;
#endif
typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

inline vf load(const float* p) {
  vf x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(x)); }
template <size_t... I>
inline vf splat_lanes(float a, std::index_sequence<I...>) {
  return vf{((void)I, a)...};
}
// A broadcast, from memory where `a` is (written as {a, a, ...}: a loop of lane stores, or 0 + a, compile
// to worse code).
inline vf splat(float a) { return splat_lanes(a, std::make_index_sequence<W>{}); }

// exp (the softmax's shifted logits, <= 0): Cephes' expf polynomial, 2^n by exponent bits.
inline vf vexp(vf x) {
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf t = x * 1.44269504088896341f;
  const vf n = (t + 12582912.0f) - 12582912.0f;  // round to nearest
  vf r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float hsum(vf x) {
  float s = 0.0f;
  for (int i = 0; i < W; ++i) s += x[i];
  return s;
}
inline float hmax(vf x) {
  float m = x[0];
  for (int i = 1; i < W; ++i) m = std::max(m, x[i]);
  return m;
}

// C[R x W*NV] (+)= op(A)[R x L] . B[L x W*NV]; op(A)[r][l] = TA ? A[l*lda + r] : A[r*lda + l].
template <int R, int NV, bool TA>
inline void tile(int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C, int64_t ldc,
                 bool accumulate) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = accumulate ? load(C + r * ldc + W * v) : vf{};
  for (int64_t l = 0; l < L; ++l) {
    vf b[NV];
    for (int v = 0; v < NV; ++v) b[v] = load(B + l * ldb + W * v);
    for (int r = 0; r < R; ++r) {
      const vf a = splat(TA ? A[l * lda + r] : A[r * lda + l]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(C + r * ldc + W * v, acc[r][v]);
}

template <int NV, bool TA>
inline void tail(int rows, int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool acc) {
  switch (rows) {
    case 1: return tile<1, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 2: return tile<2, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 3: return tile<3, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 4: return tile<4, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 5: return tile<5, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 6: return tile<6, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
    case 7: return tile<7, NV, TA>(L, A, lda, B, ldb, C, ldc, acc);
  }
}

// C[M x N] (+)= op(A)[M x L] . B[L x N], N a multiple of W.
template <bool TA>
void gemm(int64_t M, int64_t N, int64_t L, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
          int64_t ldc, bool acc) {
  for (int64_t j = 0; j < N; j += 2 * W) {
    const bool two = N - j >= 2 * W;
    for (int64_t i = 0; i < M; i += MR) {
      const float* a = TA ? A + i : A + i * lda;
      float* c = C + i * ldc + j;
      const int rows = static_cast<int>(std::min<int64_t>(MR, M - i));
      if (rows == MR) {
        if (two) tile<MR, 2, TA>(L, a, lda, B + j, ldb, c, ldc, acc);
        else tile<MR, 1, TA>(L, a, lda, B + j, ldb, c, ldc, acc);
      } else {
        if (two) tail<2, TA>(rows, L, a, lda, B + j, ldb, c, ldc, acc);
        else tail<1, TA>(rows, L, a, lda, B + j, ldb, c, ldc, acc);
      }
    }
  }
}

// Runs f(0..n-1) on the calling thread and up to num_threads - 1 of the pool's. The caller waits only for
// tasks that a thread has taken, so a helper that starts late (its thread busy elsewhere) finds nothing
// left and never holds the caller up.
template <class F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& f) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t done = 0;
  };
  auto shared = std::make_shared<Shared>();
  const F* fp = &f;
  auto run = [shared, n, fp]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      (*fp)(i);
      std::lock_guard<std::mutex> lock(shared->mu);
      if (++shared->done == n) shared->cv.notify_all();
    }
  };
  for (int64_t w = 0; w < helpers; ++w) pool.Schedule([run] { run(); });
  run();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done == n; });
}

constexpr int64_t kBlockQ = 64;

struct Dims {
  int64_t B, Sq, Skv, H, K, Skv_pad;
  int64_t q_row() const { return H * K; }  // stride between consecutive tokens, in floats
  // Offsets of (batch, head) bh's first token in q (and its outputs) and in k, v.
  int64_t q_offset(int64_t bh) const { return bh / H * Sq * q_row() + bh % H * K; }
  int64_t kv_offset(int64_t bh) const { return bh / H * Skv * q_row() + bh % H * K; }
};

// kt[K x Skv_pad] = x[b, :, h, :] transposed (zero columns past Skv), 16 tokens at a time: each write is
// one contiguous run, and the 16 rows read stay in L1.
void pack_transposed(const float* x, const Dims& d, float* kt) {
  for (int64_t s0 = 0; s0 < d.Skv_pad; s0 += 16) {
    const int64_t n = std::min<int64_t>(16, std::max<int64_t>(0, d.Skv - s0));
    for (int64_t c = 0; c < d.K; ++c) {
      float* out = kt + c * d.Skv_pad + s0;
      for (int64_t s = 0; s < n; ++s) out[s] = x[(s0 + s) * d.q_row() + c];
      for (int64_t s = n; s < 16; ++s) out[s] = 0.0f;
    }
  }
}

// Per-thread scratch, kept between calls (no allocation, and no page faults, per call).
float* scratch(int slot, size_t floats) {
  thread_local std::vector<float> buffers[8];
  if (buffers[slot].size() < floats) buffers[slot].resize(floats);
  return buffers[slot].data();
}

// xp[Skv_pad x K] = x[b, :, h, :] (zero rows past Skv).
void pack_rows(const float* x, const Dims& d, float* xp) {
  for (int64_t s = 0; s < d.Skv; ++s) std::memcpy(xp + s * d.K, x + s * d.q_row(), d.K * sizeof(float));
  std::fill(xp + d.Skv * d.K, xp + d.Skv_pad * d.K, 0.0f);
}

// Row i of s (Skv_pad wide): p = softmax(scale * s) in place, zero past Skv; returns the log-sum-exp.
float softmax_row(float* s, const Dims& d, float scale) {
  const int64_t full = d.Skv / W * W;
  vf mv = splat(-INFINITY);
  for (int64_t j = 0; j < full; j += W) {
    const vf x = load(s + j);
    mv = x > mv ? x : mv;
  }
  float m = hmax(mv);
  for (int64_t j = full; j < d.Skv; ++j) m = std::max(m, s[j]);
  const float shift = m * scale;
  vf sum{};
  for (int64_t j = 0; j < full; j += W) {
    const vf p = vexp(load(s + j) * scale - shift);
    store(s + j, p);
    sum += p;
  }
  float l = hsum(sum);
  if (full < d.Skv) {
    vf x = splat(-87.0f);
    for (int64_t j = full; j < d.Skv; ++j) x[j - full] = s[j] * scale - shift;
    const vf p = vexp(x);
    for (int64_t j = full; j < d.Skv; ++j) {
      s[j] = p[j - full];
      l += p[j - full];
    }
  }
  const float inv = 1.0f / l;
  for (int64_t j = 0; j < full; j += W) store(s + j, load(s + j) * inv);
  for (int64_t j = full; j < d.Skv; ++j) s[j] *= inv;
  std::fill(s + d.Skv, s + d.Skv_pad, 0.0f);
  return shift + std::log(l);
}

Dims dims_of(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], kd[1], qd[2], qd[3], 0};
  d.Skv_pad = (d.Skv + 31) / 32 * 32;
  return d;
}

ffi::Error check(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4)
    return ffi::Error::InvalidArgument("cpu attention: q, k, v must be (B, S, H, K)");
  if (kd[0] != qd[0] || kd[2] != qd[2] || kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] ||
      vd[2] != kd[2] || vd[3] != kd[3])
    return ffi::Error::InvalidArgument("cpu attention: q, k, v shapes disagree");
  if (qd[3] % 16 != 0)
    return ffi::Error::InvalidArgument("cpu attention: the head dimension must be a multiple of 16");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, float scale, ffi::ResultBuffer<ffi::F32> out,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (ffi::Error e = check(q, k, v); e.failure()) return e;
  const Dims d = dims_of(q, k);
  const int64_t heads = d.B * d.H, blocks = (d.Sq + kBlockQ - 1) / kBlockQ;
  // Enough tasks for every thread: split each (batch, head) into query chunks when there are few of them.
  const int64_t chunks = std::min(blocks, std::max<int64_t>(1, (2 * pool.num_threads() + heads - 1) / heads));
  const int64_t per_chunk = (blocks + chunks - 1) / chunks * kBlockQ;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, heads * chunks, [&](int64_t task) {
    const int64_t bh = task / chunks;
    const int64_t q0 = task % chunks * per_chunk, q1 = std::min(d.Sq, q0 + per_chunk);
    if (q0 >= q1) return;
    const int64_t base_q = d.q_offset(bh), base_kv = d.kv_offset(bh);
    float *kt = scratch(0, d.K * d.Skv_pad), *vr = scratch(1, d.Skv_pad * d.K), *s = scratch(2, kBlockQ * d.Skv_pad);
    pack_transposed(kp + base_kv, d, kt);
    pack_rows(vp + base_kv, d, vr);
    for (int64_t i0 = q0; i0 < q1; i0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, q1 - i0);
      gemm<false>(rows, d.Skv_pad, d.K, qp + base_q + i0 * d.q_row(), d.q_row(), kt, d.Skv_pad, s, d.Skv_pad,
                  false);
      for (int64_t i = 0; i < rows; ++i) lp[bh * d.Sq + i0 + i] = softmax_row(s + i * d.Skv_pad, d, scale);
      gemm<false>(rows, d.K, d.Skv_pad, s, d.Skv_pad, vr, d.K, op + base_q + i0 * d.q_row(), d.q_row(), false);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse,
                    ffi::Buffer<ffi::F32> dout, float scale, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (ffi::Error e = check(q, k, v); e.failure()) return e;
  const Dims d = dims_of(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *opp = o.typed_data(),
              *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, d.B * d.H, [&](int64_t bh) {
    const int64_t base_q = d.q_offset(bh), base_kv = d.kv_offset(bh);
    float *kt = scratch(0, d.K * d.Skv_pad), *vt = scratch(1, d.K * d.Skv_pad), *kr = scratch(2, d.Skv_pad * d.K);
    float *dk_acc = scratch(3, d.Skv_pad * d.K), *dv_acc = scratch(4, d.Skv_pad * d.K);
    float *p = scratch(5, kBlockQ * d.Skv_pad), *ds = scratch(6, kBlockQ * d.Skv_pad);
    pack_transposed(kp + base_kv, d, kt);
    pack_transposed(vp + base_kv, d, vt);
    pack_rows(kp + base_kv, d, kr);
    for (int64_t i0 = 0; i0 < d.Sq; i0 += kBlockQ) {
      const int64_t rows = std::min(kBlockQ, d.Sq - i0);
      const float* qb = qp + base_q + i0 * d.q_row();
      const float* gb = gp + base_q + i0 * d.q_row();
      const float* ob = opp + base_q + i0 * d.q_row();
      gemm<false>(rows, d.Skv_pad, d.K, qb, d.q_row(), kt, d.Skv_pad, p, d.Skv_pad, false);
      gemm<false>(rows, d.Skv_pad, d.K, gb, d.q_row(), vt, d.Skv_pad, ds, d.Skv_pad, false);
      for (int64_t i = 0; i < rows; ++i) {
        float* pr = p + i * d.Skv_pad;
        float* dr = ds + i * d.Skv_pad;
        const float shift = lp[bh * d.Sq + i0 + i];
        vf acc{};
        for (int64_t c = 0; c < d.K; c += W) acc += load(gb + i * d.q_row() + c) * load(ob + i * d.q_row() + c);
        const float delta = hsum(acc);
        // p = exp(scale * s - lse); ds = scale * p * (dp - delta); both zero past Skv.
        for (int64_t j = 0; j < d.Skv_pad; j += W) {
          const vf pj = vexp(load(pr + j) * scale - shift);
          store(pr + j, pj);
          store(dr + j, pj * (load(dr + j) - delta) * scale);
        }
        for (int64_t j = d.Skv; j < d.Skv_pad; ++j) pr[j] = dr[j] = 0.0f;
      }
      gemm<false>(rows, d.K, d.Skv_pad, ds, d.Skv_pad, kr, d.K, dqp + base_q + i0 * d.q_row(), d.q_row(), false);
      // dv += pᵀ·do, dk += dsᵀ·q (the first block writes them, the rest add to them)
      gemm<true>(d.Skv_pad, d.K, rows, p, d.Skv_pad, gb, d.q_row(), dv_acc, d.K, i0 > 0);
      gemm<true>(d.Skv_pad, d.K, rows, ds, d.Skv_pad, qb, d.q_row(), dk_acc, d.K, i0 > 0);
    }
    for (int64_t s = 0; s < d.Skv; ++s) {
      std::memcpy(dkp + base_kv + s * d.q_row(), dk_acc + s * d.K, d.K * sizeof(float));
      std::memcpy(dvp + base_kv + s * d.q_row(), dv_acc + s * d.K, d.K * sizeof(float));
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditCpuAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MmditCpuAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
