// Runs the CUDA launchers of csrc/multi_lora_kernels.cu under the CPU emulation (shim.h), in the
// order csrc/multi_lora_cuda.cpp calls them (forward in each regime, then the backward), and
// compares every output with a float64 loop. The stable sort of the keys (at::sort in the glue) is
// std::stable_sort here. Exit status 0 when every case is within tolerance.
//   check_kernels         the quick set (CI)
//   check_kernels full    every case
#include "shim.h"
#include "multi_lora_kernels.cuh"
#include <algorithm>
#include <numeric>
#include <random>
#include <string>
using namespace lora_kernels;

template <typename T> T fromf(float v);
template <> float fromf<float>(float v) { return v; }
template <> __half fromf<__half>(float v) { return __float2half_rn(v); }
template <> __nv_bfloat16 fromf<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
inline float tf(float v) { return v; }
inline float tf(__half v) { return __half2float(v); }
inline float tf(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> DType dt();
template <> DType dt<float>() { return DType::kFloat32; }
template <> DType dt<__half>() { return DType::kFloat16; }
template <> DType dt<__nv_bfloat16>() { return DType::kBFloat16; }

struct Segs { std::vector<int64_t> perm; std::vector<int32_t> seg, tile; Segments view; };
Segs make_segments(const std::vector<int64_t>& idx, int64_t M, int L) {
  Segs s;
  std::vector<int32_t> keys(M);
  if (make_keys(IntVec{idx.data(), true}, M, L, keys.data(), nullptr) != cudaSuccess) abort();
  s.perm.resize(M);
  std::iota(s.perm.begin(), s.perm.end(), 0);
  std::stable_sort(s.perm.begin(), s.perm.end(), [&](int64_t a, int64_t b) { return keys[a] < keys[b]; });
  std::vector<int32_t> sorted(M);
  for (int64_t i = 0; i < M; ++i) sorted[i] = keys[s.perm[i]];
  s.seg.assign(L + 2, -7); s.tile.assign(L + 2, -7);
  if (build_segments(sorted.data(), M, L, s.seg.data(), s.tile.data(), nullptr) != cudaSuccess) abort();
  s.view = Segments{s.perm.data(), s.seg.data(), s.tile.data(), max_tiles(M, L)};
  // the one-block builder (the glue's path for M <= kSortMaxRows) gives exactly the same tables
  if (M <= kSortMaxRows) {
    std::vector<int64_t> perm2(M, -7);
    std::vector<int32_t> seg2(L + 2, -7), tile2(L + 2, -7);
    if (sort_segments(IntVec{idx.data(), true}, M, L, perm2.data(), seg2.data(), tile2.data(), nullptr) != cudaSuccess) abort();
    if (perm2 != s.perm || seg2 != s.seg || tile2 != s.tile) {
      std::printf("FAIL: sort_segments differs from the stable sort (M=%ld L=%d)\n", long(M), L);
      std::exit(1);
    }
  }
  return s;
}

struct Case {
  int64_t M, K, N; int R, L; int sms; bool decode; bool ranks; int x_pad; double none; bool bad;
};

static int failures = 0;
void expect(bool ok, const std::string& what) { if (!ok) { ++failures; std::printf("FAIL: %s\n", what.c_str()); } }

double relerr(const std::vector<double>& got, const std::vector<double>& want) {
  double n = 0, d = 0;
  for (size_t i = 0; i < got.size(); ++i) { n += (got[i] - want[i]) * (got[i] - want[i]); d += want[i] * want[i]; }
  return d > 0 ? std::sqrt(n / d) : std::sqrt(n);
}

// The shrink's L2 prefetches: each 16-byte aligned, a multiple of 16 bytes, inside one row of x (a
// row with an adapter) or inside A_l of an adapter some row uses, none overlapping another, and
// together exactly those rows and adapters: nothing outside the tensors, nothing missed.
template <typename T>
void check_prefetches(const T* x, int64_t sx, int64_t K, const T* A, int R, int L, const std::vector<int64_t>& idx) {
  const int64_t M = static_cast<int64_t>(idx.size()), es = sizeof(T);
  std::vector<char> used(L, 0);
  int64_t want_x = 0, want_a = 0;
  for (int64_t v : idx) if (v >= 0 && v < L) { used[v] = 1; want_x += K * es; }
  for (int l = 0; l < L; ++l) if (used[l]) want_a += R * K * es;
  auto inside = [](const char* p, int64_t n, const void* base, int64_t len) {
    const char* b = static_cast<const char*>(base);
    return p >= b && p + n <= b + len;
  };
  int64_t got_x = 0, got_a = 0;
  bool ok = true;
  auto pf = emu::g_prefetches;
  std::sort(pf.begin(), pf.end());
  for (size_t i = 0; i < pf.size(); ++i) {
    const char* p = static_cast<const char*>(pf[i].first);
    const int64_t n = pf[i].second;
    ok = ok && n > 0 && n % 16 == 0 && reinterpret_cast<uintptr_t>(p) % 16 == 0;
    if (i + 1 < pf.size()) ok = ok && p + n <= static_cast<const char*>(pf[i + 1].first);
    bool hit = false;
    for (int64_t r = 0; r < M && !hit; ++r)
      if (idx[r] >= 0 && idx[r] < L && inside(p, n, x + r * sx, K * es)) { hit = true; got_x += n; }
    for (int l = 0; l < L && !hit; ++l)
      if (used[l] && inside(p, n, A + int64_t(l) * R * K, R * K * es)) { hit = true; got_a += n; }
    ok = ok && hit;
  }
  char buf[160];
  std::snprintf(buf, sizeof buf, "prefetch M=%ld K=%ld R=%d L=%d: %zu ranges, x %ld/%ld bytes, A %ld/%ld",
                long(M), long(K), R, L, pf.size(), long(got_x), long(want_x), long(got_a), long(want_a));
  expect(ok && got_x == want_x && got_a == want_a, buf);
}

template <typename T>
void run_case(const Case& c, double tol, std::mt19937& rng) {
  std::normal_distribution<float> nd;
  std::uniform_real_distribution<double> ud;
  const int64_t M = c.M, K = c.K, N = c.N; const int R = c.R, L = c.L;
  const int64_t sx = K + c.x_pad;
  std::vector<T> xbuf(M * sx + 8);
  T* x = xbuf.data() + (c.x_pad ? 1 : 0);  // x_pad != 0: misaligned rows
  std::vector<T> A(L * R * K), B(L * N * R);
  std::vector<float> scales(L);
  std::vector<int64_t> ranks(L), idx(M);
  for (auto& v : xbuf) v = fromf<T>(nd(rng));
  for (auto& v : A) v = fromf<T>(nd(rng) / std::sqrt(float(K)));
  for (auto& v : B) v = fromf<T>(nd(rng) / std::sqrt(float(R)));
  for (auto& v : scales) v = 0.5f + float(ud(rng));
  for (int l = 0; l < L; ++l) ranks[l] = c.ranks ? 1 + rng() % R : R;
  if (c.ranks) {  // NaN past the rank must not leak
    for (int l = 0; l < L; ++l) for (int j = ranks[l]; j < R; ++j) {
      for (int64_t k = 0; k < K; ++k) A[(l * R + j) * K + k] = fromf<T>(NAN);
      for (int64_t n = 0; n < N; ++n) B[(l * N + n) * R + j] = fromf<T>(NAN);
    }
  }
  for (auto& v : idx) {
    v = rng() % L;
    if (ud(rng) < c.none) v = -1;
    if (c.bad && ud(rng) < 0.1) v = (rng() % 2) ? L + 5 : -3;
  }
  IntVec rk = c.ranks ? IntVec{ranks.data(), true} : IntVec{};
  auto lof = [&](int64_t i) { return (idx[i] >= 0 && idx[i] < L) ? int(idx[i]) : -1; };
  // reference, double
  std::vector<double> S_ref(M * R, 0), y_ref(M * N, 0);
  for (int64_t i = 0; i < M; ++i) {
    int l = lof(i); if (l < 0) continue;
    for (int j = 0; j < ranks[l]; ++j) { double a = 0; for (int64_t k = 0; k < K; ++k) a += double(tf(x[i * sx + k])) * tf(A[(l * R + j) * K + k]); S_ref[i * R + j] = a; }
    for (int64_t n = 0; n < N; ++n) { double a = 0; for (int j = 0; j < ranks[l]; ++j) a += S_ref[i * R + j] * tf(B[(l * N + n) * R + j]); y_ref[i * N + n] = scales[l] * a; }
  }
  // forward, as fwd_cuda_impl
  std::vector<T> y(M * N, fromf<T>(12345.f));
  std::vector<float> S(M * R, 777.f);
  int split;
  std::vector<float> part;
  float* S_ptr;
  if (c.decode) {
    int kc; split = bgmv_shrink_split(M, K, c.sms, &kc);
    part.assign(size_t(split) * M * R, 999.f);
    expect(bgmv_shrink(dt<T>(), BgmvShrinkArgs{x, sx, A.data(), IntVec{idx.data(), true}, rk, part.data(), M, K, R, L, split, kc}, nullptr) == cudaSuccess, "bgmv_shrink launch");
    expect(bgmv_expand(dt<T>(), BgmvExpandArgs{part.data(), split, B.data(), IntVec{idx.data(), true}, rk, scales.data(), y.data(), split > 1 ? S.data() : nullptr, M, N, R, L}, c.sms, nullptr) == cudaSuccess, "bgmv_expand launch");
  } else {
    Segs sg = make_segments(idx, M, L);
    int64_t dc; split = sgmv_shrink_split(M, L, K, R, c.sms, &dc);
    part.assign(size_t(split) * M * R, 999.f);
    expect(sgmv_shrink(dt<T>(), SgmvShrinkArgs{x, sx, A.data(), true, K, R, L, sg.view, rk, part.data(), M, split, dc}, nullptr) == cudaSuccess, "sgmv_shrink launch");
    expect(sgmv_expand(dt<T>(), SgmvExpandArgs{part.data(), split, B.data(), true, N, R, L, sg.view, rk, scales.data(), y.data(), N, split > 1 ? S.data() : nullptr, M}, c.sms, nullptr) == cudaSuccess, "sgmv_expand launch");
  }
  S_ptr = split > 1 ? S.data() : part.data();
  // the register kernels of the segment forward (16-bit, aligned rows, R % 8 == 0, R <= 64), as the
  // glue runs them where rows_kernels_ok, against the same reference
  const bool rows_ok = !c.decode && rows_kernels_ok(dt<T>(), x, sx, K, A.data(), B.data(), R, y.data(), N, N);
  if (rows_ok) {
    Segs sg = make_segments(idx, M, L);
    int64_t dc; const int rs = rows_shrink_split(M, L, K, c.sms, &dc);
    std::vector<float> rpart(size_t(rs) * M * R, 999.f), rS(M * R, 777.f);
    std::vector<T> ry(M * N, fromf<T>(12345.f));
    // with the L2 prefetch the glue turns on when it sorts in the call (a hint: same results)
    const bool pf = L <= kPrefetchMaxAdapters;
    emu::g_prefetches.clear();
    expect(rows_shrink(dt<T>(), SgmvShrinkArgs{x, sx, A.data(), true, K, R, L, sg.view, rk, rpart.data(), M, rs, dc}, nullptr,
                       pf ? IntVec{idx.data(), true} : IntVec{}) == cudaSuccess,
           "rows_shrink launch");
    if (pf) check_prefetches(x, sx, K, A.data(), R, L, idx);
    expect(rows_expand(dt<T>(), SgmvExpandArgs{rpart.data(), rs, B.data(), true, N, R, L, sg.view, rk, scales.data(), ry.data(), N, rs > 1 ? rS.data() : nullptr, M}, c.sms, nullptr) == cudaSuccess, "rows_expand launch");
    const float* rS_ptr = rs > 1 ? rS.data() : rpart.data();
    std::vector<double> ryd(M * N), rSd(M * R);
    for (int64_t i = 0; i < M * N; ++i) ryd[i] = tf(ry[i]);
    for (int64_t i = 0; i < M * R; ++i) rSd[i] = rS_ptr[i];
    const double r1 = relerr(ryd, y_ref), r2 = relerr(rSd, S_ref);
    char rb[160];
    std::snprintf(rb, sizeof rb, "rows kernels %s M=%ld K=%ld N=%ld R=%d L=%d split=%d", typeid(T).name(), long(M), long(K), long(N), R, L, rs);
    expect(r1 <= tol && std::isfinite(r1), std::string(rb) + " y err " + std::to_string(r1));
    expect(r2 <= 1e-5 && std::isfinite(r2), std::string(rb) + " S err " + std::to_string(r2));
    for (int64_t i = 0; i < M; ++i) if (lof(i) < 0) for (int64_t n = 0; n < N; ++n) expect(tf(ry[i * N + n]) == 0.f, std::string(rb) + " none row not 0");
    std::printf("%-88s y %.1e S %.1e\n", rb, r1, r2);
    // direct mode (no sort: every block finds its rows from the raw indices): the same rows in the
    // same order, so the same bits; no segment tables to read
    if (M <= kDirectMaxRows && L + 1 <= kDirectMaxGroups) {
      std::vector<float> dpart(size_t(rs) * M * R, 999.f), dS(M * R, 777.f);
      std::vector<T> dy_(M * N, fromf<T>(12345.f));
      const Segments dview{nullptr, nullptr, nullptr, max_tiles(M, L)};
      SgmvShrinkArgs dsa{x, sx, A.data(), true, K, R, L, dview, rk, dpart.data(), M, rs, dc};
      dsa.direct = IntVec{idx.data(), true};
      expect(rows_shrink(dt<T>(), dsa, nullptr) == cudaSuccess, "rows_shrink launch (direct)");
      SgmvExpandArgs dea{dpart.data(), rs, B.data(), true, N, R, L, dview, rk, scales.data(), dy_.data(), N, rs > 1 ? dS.data() : nullptr, M};
      dea.direct = IntVec{idx.data(), true};
      expect(rows_expand(dt<T>(), dea, c.sms, nullptr) == cudaSuccess, "rows_expand launch (direct)");
      expect(std::memcmp(dy_.data(), ry.data(), ry.size() * sizeof(T)) == 0, std::string(rb) + " direct mode: y differs from the sorted mode");
      const float* dS_ptr = rs > 1 ? dS.data() : dpart.data();
      expect(std::memcmp(dS_ptr, rS_ptr, size_t(M) * R * sizeof(float)) == 0, std::string(rb) + " direct mode: S differs from the sorted mode");
    }
  }
  std::vector<double> yg(M * N), Sg(M * R);
  for (int64_t i = 0; i < M * N; ++i) yg[i] = tf(y[i]);
  for (int64_t i = 0; i < M * R; ++i) Sg[i] = S_ptr[i];
  char buf[256];
  std::snprintf(buf, sizeof buf, "%s M=%ld K=%ld N=%ld R=%d L=%d sms=%d %s ranks=%d pad=%d bad=%d", typeid(T).name(), M, K, N, R, L, c.sms, c.decode ? "decode" : "segment", c.ranks, c.x_pad, c.bad);
  double e1 = relerr(yg, y_ref), e2 = relerr(Sg, S_ref);
  expect(e1 <= tol && std::isfinite(e1), std::string(buf) + " y err " + std::to_string(e1));
  expect(e2 <= 1e-5 && std::isfinite(e2), std::string(buf) + " S err " + std::to_string(e2));
  for (int64_t i = 0; i < M; ++i) if (lof(i) < 0) for (int64_t n = 0; n < N; ++n) expect(tf(y[i * N + n]) == 0.f, std::string(buf) + " none row not 0");

  // backward, as bwd_cuda_impl (always segments)
  std::vector<T> dy(M * N);
  for (auto& v : dy) v = fromf<T>(nd(rng));
  std::vector<double> G_ref(M * R, 0), dx_ref(M * K, 0), dA_ref(L * R * K, 0), dB_ref(L * N * R, 0);
  for (int64_t i = 0; i < M; ++i) {
    int l = lof(i); if (l < 0) continue;
    for (int j = 0; j < ranks[l]; ++j) { double a = 0; for (int64_t n = 0; n < N; ++n) a += double(tf(dy[i * N + n])) * tf(B[(l * N + n) * R + j]); G_ref[i * R + j] = a; }
    for (int64_t k = 0; k < K; ++k) { double a = 0; for (int j = 0; j < ranks[l]; ++j) a += G_ref[i * R + j] * tf(A[(l * R + j) * K + k]); dx_ref[i * K + k] = scales[l] * a; }
    for (int j = 0; j < ranks[l]; ++j) {
      for (int64_t k = 0; k < K; ++k) dA_ref[(l * R + j) * K + k] += scales[l] * G_ref[i * R + j] * tf(x[i * sx + k]);
      for (int64_t n = 0; n < N; ++n) dB_ref[(l * N + n) * R + j] += scales[l] * double(tf(dy[i * N + n])) * S_ref[i * R + j];
    }
  }
  Segs sg = make_segments(idx, M, L);
  int64_t dc; int gs = sgmv_shrink_split(M, L, N, R, c.sms, &dc);
  std::vector<float> gpart(size_t(gs) * M * R, 999.f);
  expect(sgmv_shrink(dt<T>(), SgmvShrinkArgs{dy.data(), N, B.data(), false, N, R, L, sg.view, rk, gpart.data(), M, gs, dc}, nullptr) == cudaSuccess, "G shrink");
  std::vector<float> G(M * R, 0.f);
  for (int p = 0; p < gs; ++p) for (int64_t e = 0; e < M * R; ++e) G[e] += gpart[p * M * R + e];
  std::vector<T> dx(M * K, fromf<T>(4321.f));
  expect(sgmv_expand(dt<T>(), SgmvExpandArgs{G.data(), 1, A.data(), false, K, R, L, sg.view, rk, scales.data(), dx.data(), K, nullptr, M}, c.sms, nullptr) == cudaSuccess, "dx expand");
  auto reduce = [&](const void* U, int64_t su, const void* V, int64_t sv, int64_t P, int64_t Q, bool rank_on_p, std::vector<double>& out) {
    int runs = seg_outer_split(M, L, P, Q, c.sms);
    std::vector<T> o(L * P * Q, fromf<T>(555.f));
    std::vector<float> ws(size_t(runs) * L * P * Q, 888.f);
    expect(seg_outer(dt<T>(), SegOuterArgs{U, su, V, sv, P, Q, R, L, rank_on_p, sg.view, rk, scales.data(), runs == 1 ? o.data() : nullptr, runs > 1 ? ws.data() : nullptr, runs, M}, nullptr) == cudaSuccess, "seg_outer");
    out.assign(L * P * Q, 0);
    for (int64_t e = 0; e < L * P * Q; ++e) {
      if (runs == 1) out[e] = tf(o[e]);
      else { double s = 0; for (int p = 0; p < runs; ++p) s += ws[p * L * P * Q + e]; out[e] = tf(fromf<T>(float(s))); }
    }
    return runs;
  };
  std::vector<double> dA, dB;
  std::vector<T> G_t(M * R), S_t(M * R);  // the glue rounds G and S to T for seg_outer
  for (int64_t e = 0; e < M * R; ++e) { G_t[e] = fromf<T>(G[e]); S_t[e] = fromf<T>(S_ptr[e]); }
  const int runs_a = reduce(G_t.data(), R, x, sx, R, K, true, dA);
  const int runs_b = reduce(dy.data(), N, S_t.data(), R, N, R, false, dB);
  std::vector<double> Gd(G.begin(), G.end()), dxd(M * K);
  for (int64_t e = 0; e < M * K; ++e) dxd[e] = tf(dx[e]);
  double eg = relerr(Gd, G_ref), ex = relerr(dxd, dx_ref), ea = relerr(dA, dA_ref), eb = relerr(dB, dB_ref);
  expect(eg <= 1e-5, std::string(buf) + " G err " + std::to_string(eg));
  expect(ex <= tol * 1.5 && std::isfinite(ex), std::string(buf) + " dx err " + std::to_string(ex));
  expect(ea <= tol * 1.5 && std::isfinite(ea), std::string(buf) + " dA err " + std::to_string(ea));
  expect(eb <= tol * 1.5 && std::isfinite(eb), std::string(buf) + " dB err " + std::to_string(eb));
  for (int l = 0; l < L; ++l) for (int j = ranks[l]; j < R; ++j) {
    for (int64_t k = 0; k < K; ++k) expect(dA[(l * R + j) * K + k] == 0, std::string(buf) + " dA past rank");
    for (int64_t n = 0; n < N; ++n) expect(dB[(l * N + n) * R + j] == 0, std::string(buf) + " dB past rank");
  }
  std::printf("%-88s y %.1e S %.1e G %.1e dx %.1e dA %.1e dB %.1e (splits: fwd %d, G %d, dA %d, dB %d)\n", buf, e1,
              e2, eg, ex, ea, eb, split, gs, runs_a, runs_b);

  // G and dx on the register kernels, as bwd_cuda_impl runs them where rows_kernels_ok: the forward's
  // shrink on (dy, B.T [L, R, N]), then its expand on (the partials, A.T [L, K, R]), which also sums
  // the partials into G
  std::vector<T> Bt(L * R * N), At(L * K * R);
  for (int l = 0; l < L; ++l)
    for (int j = 0; j < R; ++j) {
      for (int64_t n = 0; n < N; ++n) Bt[(l * R + j) * N + n] = B[(l * N + n) * R + j];
      for (int64_t k = 0; k < K; ++k) At[(l * K + k) * R + j] = A[(l * R + j) * K + k];
    }
  std::vector<T> rdx(M * K, fromf<T>(4321.f));
  if (rows_kernels_ok(dt<T>(), dy.data(), N, N, Bt.data(), At.data(), R, rdx.data(), K, K)) {
    int64_t rdc; const int rgs = rows_shrink_split(M, L, N, c.sms, &rdc);
    std::vector<float> rgpart(size_t(rgs) * M * R, 999.f), rG(M * R, 777.f);
    expect(rows_shrink(dt<T>(), SgmvShrinkArgs{dy.data(), N, Bt.data(), true, N, R, L, sg.view, rk, rgpart.data(), M, rgs, rdc}, nullptr) == cudaSuccess, "rows G shrink");
    expect(rows_expand(dt<T>(), SgmvExpandArgs{rgpart.data(), rgs, At.data(), true, K, R, L, sg.view, rk, scales.data(), rdx.data(), K, rgs > 1 ? rG.data() : nullptr, M}, c.sms, nullptr) == cudaSuccess, "rows dx expand");
    const float* rG_ptr = rgs > 1 ? rG.data() : rgpart.data();
    std::vector<double> rGd(rG_ptr, rG_ptr + M * R), rdxd(M * K);
    for (int64_t e = 0; e < M * K; ++e) rdxd[e] = tf(rdx[e]);
    const double rg = relerr(rGd, G_ref), rx = relerr(rdxd, dx_ref);
    expect(rg <= 1e-5 && std::isfinite(rg), std::string(buf) + " rows kernels G err " + std::to_string(rg));
    expect(rx <= tol * 1.5 && std::isfinite(rx), std::string(buf) + " rows kernels dx err " + std::to_string(rx));
    for (int64_t i = 0; i < M; ++i) if (lof(i) < 0) {
      for (int64_t k = 0; k < K; ++k) expect(tf(rdx[i * K + k]) == 0.f, std::string(buf) + " rows kernels: dx of a none row not 0");
      for (int j = 0; j < R; ++j) expect(rG_ptr[i * R + j] == 0.f, std::string(buf) + " rows kernels: G of a none row not 0");
    }
    std::printf("%-88s rows kernels: G %.1e dx %.1e (split %d)\n", buf, rg, rx, rgs);
  }

  // dA and dB as bwd_cuda_impl computes them where spread_rows_worth: G and S spread into [M, L R]
  // (scaled, in their adapter's column block), then one GEMM each, done here in double
  if (spread_rows_worth(L, R)) {
    const int64_t LR = int64_t(L) * R;
    std::vector<T> Gx(M * LR, fromf<T>(555.f)), Sx(M * LR, fromf<T>(555.f));
    expect(spread_rows(dt<T>(), G.data(), IntVec{idx.data(), true}, rk, scales.data(), Gx.data(), M, R, L, nullptr) == cudaSuccess, "spread G");
    expect(spread_rows(dt<T>(), S_ptr, IntVec{idx.data(), true}, rk, scales.data(), Sx.data(), M, R, L, nullptr) == cudaSuccess, "spread S");
    std::vector<double> gA(L * R * K, 0), gB(L * N * R, 0);
    for (int64_t i = 0; i < M; ++i)
      for (int64_t c = 0; c < LR; ++c) {
        const double gv = tf(Gx[i * LR + c]), sv = tf(Sx[i * LR + c]);
        const int l = int(c / R), j = int(c % R);
        if (l != lof(i) || j >= ranks[l]) {
          expect(gv == 0 && sv == 0, std::string(buf) + " spread: nonzero outside the row's adapter block");
          continue;
        }
        for (int64_t k = 0; k < K; ++k) gA[c * K + k] += gv * tf(x[i * sx + k]);
        for (int64_t n = 0; n < N; ++n) gB[(l * N + n) * R + j] += double(tf(dy[i * N + n])) * sv;
      }
    for (auto& v : gA) v = tf(fromf<T>(float(v)));  // the GEMMs write T
    for (auto& v : gB) v = tf(fromf<T>(float(v)));
    const double sa = relerr(gA, dA_ref), sb = relerr(gB, dB_ref);
    expect(sa <= tol * 1.5 && std::isfinite(sa), std::string(buf) + " spread GEMM dA err " + std::to_string(sa));
    expect(sb <= tol * 1.5 && std::isfinite(sb), std::string(buf) + " spread GEMM dB err " + std::to_string(sb));
    std::printf("%-88s spread GEMMs: dA %.1e dB %.1e\n", buf, sa, sb);
  }
}

int main(int argc, char** argv) {
  std::mt19937 rng(1234);
  const bool full = argc > 1 && std::string(argv[1]) == "full";
  // M, K, N, R, L, sms, decode, ranks (NaN past them), x_pad (misaligned rows), none, bad indices
  std::vector<Case> cases = {
    {1, 40, 24, 5, 3, 132, true, false, 0, 0.0, false},      // one row, scalar paths (R % 8 != 0)
    {7, 64, 48, 16, 3, 132, true, true, 0, 0.3, true},       // decode: K split, -1 rows, out-of-range rows
    {7, 64, 48, 16, 3, 132, false, true, 0, 0.3, true},      // segment: the same batch
    {20, 520, 264, 24, 3, 132, true, false, 3, 0.1, false},  // misaligned x rows: scalar loads of x
    {20, 520, 264, 24, 3, 132, false, false, 3, 0.1, false},
    {9, 300, 100, 130, 2, 132, false, true, 0, 0.0, false},  // r_max > 64: three rank blocks
    {9, 300, 100, 130, 2, 132, true, true, 0, 0.0, false},
    {7, 2049, 40, 16, 2, 132, false, false, 0, 0.0, false},  // K = 2049: segment shrink split in K
    {600, 64, 72, 16, 1, 132, false, false, 0, 0.0, false},  // one long segment: dA/dB in row runs
    // one SM: the shrink's cp.async ring runs 16+ steps per block (K = 1000, not a multiple of 32),
    // expand blocks walk every column block with two rank chunks (S kept for 16-bit types, rebuilt
    // per chunk for fp32, r_max = 40 > 32)
    {40, 1000, 200, 40, 3, 1, false, true, 0, 0.1, false},
    {40, 1000, 131, 37, 3, 1, false, false, 0, 0.1, false},  // R % 8 != 0: scalar B tiles in the pipelines
    // register kernels (segment forward): many adapters of a few rows each, -1 and bad rows, ranks
    {96, 256, 64, 32, 24, 132, false, true, 0, 0.1, true},
    {50, 136, 56, 8, 5, 132, false, false, 0, 0.2, false},    // R = 8: one n-tile
    {70, 264, 96, 64, 2, 3, false, true, 0, 0.0, false},      // R = 64, 35 rows per adapter: passes of 16 rows
    {200, 64, 40, 32, 2, 132, false, true, 0, 0.1, false},    // R = 32, long segments: two row groups per pass
    {70, 136, 520, 16, 2, 1, false, false, 0, 0.1, false},    // one SM: each expand warp walks 3 column units
    {48, 136, 200, 24, 4, 2, false, true, 0, 0.1, false},     // R = 24: each B row's last 16-byte piece lies past R (not loaded)
    {20, 64, 600, 64, 3, 132, false, true, 0, 0.0, false},    // R = 64: two 16-byte pieces of B per row and lane
    // direct mode at its bound on rows: ~12 of the 15 slots past the groups' first tiles taken, the
    // "no adapter" group's included; then 13 groups of ~80 rows, one tile past the first each
    {1000, 32, 16, 8, 3, 132, false, false, 0, 0.1, true},
    {1024, 16, 24, 16, 12, 132, false, true, 0, 0.05, false},
  };
  // the one-block segment builder against the stable sort (make_segments compares them), at the
  // sizes of its variants, with rows past the adapters and bad indices
  for (int64_t M : {0, 1, 100, 1024, 1025, 4096, 5000, 8192}) {
    for (int L : {1, 7, 16, 255, 256, 300}) {  // the counting sort up to L = 255 (4-bit keys up to 15), the radix sort past it
      std::vector<int64_t> idx(M);
      for (auto& v : idx) v = int64_t(rng() % (L + 2)) - 1 + ((rng() % 50 == 0) ? L + 9 : 0);
      make_segments(idx, M, L);
    }
  }
  if (full) {
    cases.push_back({7, 40, 24, 5, 3, 132, false, true, 0, 0.3, false});
    cases.push_back({70, 72, 40, 16, 4, 1, false, false, 0, 0.2, false});
    cases.push_back({70, 72, 40, 16, 4, 132, false, false, 0, 0.2, false});
    cases.push_back({133, 128, 136, 8, 5, 132, false, true, 0, 0.2, false});
    cases.push_back({133, 128, 136, 8, 5, 132, true, true, 0, 0.2, false});
    cases.push_back({300, 64, 64, 16, 1, 4, false, false, 0, 0.0, false});
  }
  for (const Case& c : cases) {
    run_case<float>(c, 1e-5, rng);
    run_case<__nv_bfloat16>(c, 1e-2, rng);
    run_case<__half>(c, 2e-3, rng);
  }
  std::printf("failures: %d\n", failures);
  return failures != 0;
}
