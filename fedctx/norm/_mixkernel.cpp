// Fused CPU passes of the Gaussian-mixture normalizations (fedctx.norm.uan, fedctx.norm.mixture).
//
// One pass reads x (N, C, S) once and evaluates, per activation, the K responsibilities
//   l_k = q_k - ((x - mu_k) r_k)^2 / 2,   tau_k = exp(l_k) / (sum_j exp(l_j) + [eps])
// in registers (never an (N, K, C, S) tensor). fedctx/norm/_mixkernel.py documents the math
// of each pass and builds this file once per element type FEDCTX_T and component count
// FEDCTX_K; every function handles the channels [c0, c1) so that Python threads (ctypes drops
// the GIL) split the channels between them.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

// Explicit SIMD (GCC/Clang vector extensions): one vector holds L lanes of T (8 floats with
// AVX2); the compiler splits it where the machine's vectors are narrower.
template <typename T>
struct Simd {
  typedef T V __attribute__((vector_size(32)));
  static constexpr int L = 32 / sizeof(T);
};
typedef float VF __attribute__((vector_size(32)));
typedef int32_t VI __attribute__((vector_size(32)));
typedef double VD __attribute__((vector_size(32)));

// exp for x <= 0 (every exponent here is l - max l <= 0); Cephes' expf polynomial, ~1 ulp,
// e^-87 ~ 1.6e-38 for anything smaller.
inline VF vexp(VF x) {
  x = x < -87.0f ? VF{} - 87.0f : x;
  const VF n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const VF f = x - n * 0.693359375f + n * 2.12194440e-4f;
  VF p = f * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * f + 8.3334519073e-3f;
  p = p * f + 4.1665795894e-2f;
  p = p * f + 1.6666665459e-1f;
  p = p * f + 5.0000001201e-1f;
  p = p * f * f + f + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  return p * reinterpret_cast<const VF&>(bits);
}
inline VD vexp(VD x) {  // float64 (tests, gradcheck): the C library's exp per lane
  for (int j = 0; j < 4; ++j) x[j] = std::exp(x[j]);
  return x;
}

template <typename T, int K>
struct Mixture {
  using V = typename Simd<T>::V;
  static constexpr int L = Simd<T>::L;
  T q[K], mu[K], r[K];
  T log_eps;
  bool use_eps;

  Mixture(const T* q_, const T* mu_, const T* r_, int64_t C, int64_t c, T le, int ue)
      : log_eps(le), use_eps(ue != 0) {
    for (int k = 0; k < K; ++k) {
      q[k] = q_[k * C + c];
      mu[k] = mu_[k * C + c];
      r[k] = r_[k * C + c];
    }
  }

  // tau[k] for the lanes of x.
  inline void assign(V x, V* tau) const {
    V mx = V{} + (use_eps ? log_eps : -INFINITY);
    for (int k = 0; k < K; ++k) {
      const V z = (x - mu[k]) * r[k];
      tau[k] = q[k] - T(0.5) * z * z;
      mx = tau[k] > mx ? tau[k] : mx;
    }
    V den = use_eps ? vexp(log_eps - mx) : V{};
    for (int k = 0; k < K; ++k) {
      tau[k] = vexp(tau[k] - mx);
      den += tau[k];
    }
    const V inv = T(1) / den;
    for (int k = 0; k < K; ++k) tau[k] *= inv;
  }
};

// Lanes [s, s + L) of a row, and 1/0 for the lanes inside/past its end.
template <typename T>
inline typename Simd<T>::V load(const T* row, int64_t s, int64_t S, typename Simd<T>::V* mask) {
  using V = typename Simd<T>::V;
  V v{}, m{};
  if (s + Simd<T>::L <= S) {
    std::memcpy(&v, row + s, sizeof v);
    *mask = V{} + T(1);
    return v;
  }
  for (int j = 0; s + j < S; ++j) {
    v[j] = row[s + j];
    m[j] = T(1);
  }
  *mask = m;
  return v;
}

template <typename T>
inline void store(T* row, int64_t s, int64_t S, typename Simd<T>::V v) {
  if (s + Simd<T>::L <= S) {
    std::memcpy(row + s, &v, sizeof v);
    return;
  }
  for (int j = 0; s + j < S; ++j) row[s + j] = v[j];
}

template <typename T>
inline double hsum(typename Simd<T>::V v) {
  double t = 0;
  for (int j = 0; j < Simd<T>::L; ++j) t += v[j];
  return t;
}

// stats: out (3, K, C) = sum over (n, s) of tau_k, tau_k (x - mu_k), tau_k (x - mu_k)^2.
template <typename T, int K>
void stats(const T* x, int64_t N, int64_t C, int64_t S, const T* q, const T* mu, const T* r,
           T log_eps, int use_eps, int64_t c0, int64_t c1, double* out) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  for (int64_t c = c0; c < c1; ++c) {
    const Mixture<T, K> p(q, mu, r, C, c, log_eps, use_eps);
    double tot[3][K] = {};
    for (int64_t n = 0; n < N; ++n) {
      const T* row = x + (n * C + c) * S;
      V acc[3][K] = {};
      for (int64_t s = 0; s < S; s += L) {
        V mask, tau[K];
        const V xv = load(row, s, S, &mask);
        p.assign(xv, tau);
        for (int k = 0; k < K; ++k) {
          const V t = tau[k] * mask, d = xv - p.mu[k];
          acc[0][k] += t;
          acc[1][k] += t * d;
          acc[2][k] += t * d * d;
        }
      }
      for (int i = 0; i < 3; ++i)
        for (int k = 0; k < K; ++k) tot[i][k] += hsum<T>(acc[i][k]);
    }
    for (int i = 0; i < 3; ++i)
      for (int k = 0; k < K; ++k) out[(i * K + k) * C + c] = tot[i][k];
  }
}

// mix: y = sum_k tau_k a_k (x - e_k) + b.
template <typename T, int K>
void mix(const T* x, int64_t N, int64_t C, int64_t S, const T* q, const T* mu, const T* r,
         T log_eps, int use_eps, const T* a_, const T* e_, const T* b, int64_t c0, int64_t c1,
         T* y) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  for (int64_t c = c0; c < c1; ++c) {
    const Mixture<T, K> p(q, mu, r, C, c, log_eps, use_eps);
    T a[K], ae[K];
    for (int k = 0; k < K; ++k) {
      a[k] = a_[k * C + c];
      ae[k] = a[k] * e_[k * C + c];
    }
    for (int64_t n = 0; n < N; ++n) {
      const T* row = x + (n * C + c) * S;
      T* yrow = y + (n * C + c) * S;
      for (int64_t s = 0; s < S; s += L) {
        V mask, tau[K], out = V{} + b[c];
        const V xv = load(row, s, S, &mask);
        p.assign(xv, tau);
        for (int k = 0; k < K; ++k) out += tau[k] * (a[k] * xv - ae[k]);
        store(yrow, s, S, out);
      }
    }
  }
}

// backward. With d_k = x - e_k, m_k = x - mu_k and g = dL/dy:
//   G_k  = g a_k d_k + u_k d_k + w_k (d_k^2 - v_k)            (dL/dtau_k)
//   gx   = sum_k tau_k (g a_k + u_k + 2 w_k d_k) - [tau_grad] sum_k dl_k m_k r_k^2
//   dl_k = tau_k (G_k - sum_j tau_j G_j)                        (dL/dl_k)
// out (5, K, C) = sums of g tau_k, g tau_k d_k, dl_k, dl_k m_k, dl_k m_k^2 (only the first two
// when ReduceOnly, and gx is then not written); gsum (C) = sum of g (not when ReduceOnly).
template <typename T, int K, bool ReduceOnly>
void backward(const T* x, const T* g, int64_t N, int64_t C, int64_t S, const T* q, const T* mu,
              const T* r, T log_eps, int use_eps, const T* a_, const T* e_, const T* v_,
              const T* u_, const T* w_, int tau_grad, int64_t c0, int64_t c1, T* gx,
              double* out, double* gsum) {
  using V = typename Simd<T>::V;
  constexpr int L = Simd<T>::L;
  constexpr int NS = ReduceOnly ? 2 : 5;
  for (int64_t c = c0; c < c1; ++c) {
    const Mixture<T, K> p(q, mu, r, C, c, log_eps, use_eps);
    T a[K], e[K], v[K], u[K], w[K], r2[K];
    for (int k = 0; k < K; ++k) {
      a[k] = a_[k * C + c];
      e[k] = e_[k * C + c];
      v[k] = v_[k * C + c];
      u[k] = u_[k * C + c];
      w[k] = w_[k * C + c];
      r2[k] = p.r[k] * p.r[k];
    }
    double tot[NS][K] = {}, gtot = 0;
    for (int64_t n = 0; n < N; ++n) {
      const T* row = x + (n * C + c) * S;
      const T* grow = g + (n * C + c) * S;
      V acc[NS][K] = {}, gacc{};
      for (int64_t s = 0; s < S; s += L) {
        V mask, tau[K];
        const V xv = load(row, s, S, &mask);
        const V gv = load(grow, s, S, &mask);  // zero past the row's end: no contribution
        p.assign(xv, tau);
        gacc += gv;
        V G[K], sg{}, o{};
        for (int k = 0; k < K; ++k) {
          const V gt = gv * tau[k], d = xv - e[k];
          acc[0][k] += gt;
          acc[1][k] += gt * d;
          if constexpr (!ReduceOnly) {
            G[k] = gv * a[k] * d + u[k] * d + w[k] * (d * d - v[k]);
            sg += tau[k] * G[k];
            o += tau[k] * (gv * a[k] + u[k] + T(2) * w[k] * d);
          }
        }
        if constexpr (!ReduceOnly) {
          if (tau_grad)
            for (int k = 0; k < K; ++k) {
              const V dl = tau[k] * (G[k] - sg) * mask, m = xv - p.mu[k];
              acc[2][k] += dl;
              acc[3][k] += dl * m;
              acc[4][k] += dl * m * m;
              o -= dl * m * r2[k];
            }
          store(gx + (n * C + c) * S, s, S, o);
        }
      }
      for (int i = 0; i < NS; ++i)
        for (int k = 0; k < K; ++k) tot[i][k] += hsum<T>(acc[i][k]);
      gtot += hsum<T>(gacc);
    }
    for (int i = 0; i < NS; ++i)
      for (int k = 0; k < K; ++k) out[(i * K + k) * C + c] = tot[i][k];
    if (!ReduceOnly) gsum[c] = gtot;
  }
}

}  // namespace

// One build per element type and component count (the Python side passes both as macros).
using Elem = FEDCTX_T;
constexpr int NumComponents = FEDCTX_K;

extern "C" void mixkernel_stats(const Elem* x, int64_t N, int64_t C, int64_t S, const Elem* q,
                                const Elem* mu, const Elem* r, Elem log_eps, int use_eps,
                                int64_t c0, int64_t c1, double* out) {
  stats<Elem, NumComponents>(x, N, C, S, q, mu, r, log_eps, use_eps, c0, c1, out);
}

extern "C" void mixkernel_mix(const Elem* x, int64_t N, int64_t C, int64_t S, const Elem* q,
                              const Elem* mu, const Elem* r, Elem log_eps, int use_eps,
                              const Elem* a, const Elem* e, const Elem* b, int64_t c0,
                              int64_t c1, Elem* y) {
  mix<Elem, NumComponents>(x, N, C, S, q, mu, r, log_eps, use_eps, a, e, b, c0, c1, y);
}

extern "C" void mixkernel_backward(int reduce_only, const Elem* x, const Elem* g, int64_t N,
                                   int64_t C, int64_t S, const Elem* q, const Elem* mu,
                                   const Elem* r, Elem log_eps, int use_eps, const Elem* a,
                                   const Elem* e, const Elem* v, const Elem* u, const Elem* w,
                                   int tau_grad, int64_t c0, int64_t c1, Elem* gx, double* out,
                                   double* gsum) {
  if (reduce_only)
    backward<Elem, NumComponents, true>(x, g, N, C, S, q, mu, r, log_eps, use_eps, a, e, v, u, w,
                                        tau_grad, c0, c1, gx, out, gsum);
  else
    backward<Elem, NumComponents, false>(x, g, N, C, S, q, mu, r, log_eps, use_eps, a, e, v, u,
                                         w, tau_grad, c0, c1, gx, out, gsum);
}
