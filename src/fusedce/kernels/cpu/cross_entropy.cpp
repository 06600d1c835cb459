// cross_entropy with index targets and with probability targets: forward (per-row loss and row
// stats)
// and backward (the gradient with respect to the logits). The formulas are reference.py's.
#include "common.h"
#include "ops.h"

namespace fusedce {
namespace {

// Per-row values in the accumulation dtype. Inputs that arrive in another dtype (a caller's
// float64 grad for float32 logits, say) are converted: O(rows).
Tensor per_row(const Tensor& t, at::ScalarType acc_dtype) {
  return t.scalar_type() == acc_dtype ? t : t.to(acc_dtype);
}

// ---------------------------------------------------------------------------------------------
// Index targets
// ---------------------------------------------------------------------------------------------

// Rows stats are written as (outer, inner, 2): the max m, then ls = log Σ exp(x - m).
template <typename acc>
inline void store_stats(acc* stats, int64_t r, acc m, acc ls) {
  stats[2 * r] = m;
  stats[2 * r + 1] = ls;
}

// Forward: the row stats m and ls = log Σ exp(x - m), and
// loss = (1-ε)·w[t]·((m - x[t]) + ls) + (ε/C)·Σ w_c((m - x_c) + ls). m and ls are never summed into
// a rounded lse, and the smoothing sum is W·ls - Σ w_c(x_c - m), so that nothing cancels when the
// logits sit far from zero.
template <typename scalar_t>
void ce_forward_kernel(const Tensor& x, const Tensor& target, const std::optional<Tensor>& weight,
                       int64_t ignore_index, double smoothing, Tensor& loss, Tensor& stats) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto tv = view2<int64_t>(target);
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const acc total_w = w.total;
  const bool smooth = smoothing > 0;
  const acc eps = smooth ? static_cast<acc>(smoothing) : acc(0);
  const acc eps_per_class = eps / static_cast<acc>(classes);
  acc* loss_p = loss.data_ptr<acc>();
  acc* stats_p = stats.data_ptr<acc>();

  // A row's loss from its max, its log-sum, its target logit and Σ w_c(x_c - m).
  auto row_loss = [&](int64_t t, acc m, acc ls, acc x_t, acc shifted) -> acc {
    if (t == ignore_index) {
      return 0;  // torch masks the loss of an ignored row, even a NaN one
    }
    const acc w_t = wp ? wp[t] : acc(1);
    acc l = w_t * ((m - x_t) + ls);
    if (smooth) {
      l = (1 - eps) * l + eps_per_class * (total_w * ls - shifted);
    }
    return l;
  };

  if (row_contiguous(xv.s1, classes)) {
    dispatch_bool(smooth, [&](auto kSmooth) {
      dispatch_bool(wp != nullptr, [&](auto kWeight) {
        at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
          for_each_row_max_ahead(xv, begin, end, inner, classes, [&](int64_t r, int64_t o, int64_t i,
                                                                     const scalar_t* row, acc m, auto& ahead) {
            acc ls = kNaN<acc>, shifted = 0;
            if (std::isfinite(m)) {  // otherwise the row's log-sum is NaN, and so is its loss
              if constexpr (!kSmooth) {
                ls = std::log1p(row_rest(row, classes, m, ahead));  // the loss's precision: see there
              } else {
                // Σ w_c(x_c - m) beside the sum: the class weights need the classes in order.
                const AVec vm(m);
                ExpSumRest<acc, kSumExpDegree<scalar_t>> sum;
                AVec wsum(0);
                for_each_vec(row, classes, -kInf<acc>, [&](const AVec& v, int64_t j, int64_t n) {
                  ahead.advance_to(j + n);
                  const AVec d = v - vm;  // padding is -inf: exp gives 0
                  sum.add(d);
                  if constexpr (kWeight) {
                    wsum += mask_tail(load_acc(wp + j, n) * d, n);
                  } else {
                    wsum += mask_tail(d, n);
                  }
                });
                ls = std::log1p(sum.total());
                shifted = hsum(wsum);
              }
            }
            const int64_t t = tv(o, i);
            const acc x_t = t == ignore_index ? acc(0) : static_cast<acc>(row[t * xv.s1]);
            store_stats(stats_p, r, m, ls);
            loss_p[r] = row_loss(t, m, ls, x_t, shifted);
          });
        });
      });
    });
    return;
  }

  // A block of a tile's losses, vectorised across its rows, in block_stats's exp pass: x_t (and
  // w_t, and Σ w_c(x_c - m) when smoothing) are picked class by class by comparing each lane's
  // target with the class (a scalar gather per row was most of a small-C tile's time). Targets
  // are held as accumulation values, -1 for an ignored row, which matches no class; the caller
  // keeps C within the values the accumulation dtype counts exactly.
  auto block_losses = [&](auto kSmooth, auto kWeight, auto kNV, const acc* src, int64_t sld,
                          const acc* tf, int64_t r0, int64_t n) {
    constexpr int NV = decltype(kNV)::value;
    constexpr int64_t L = AVec::size();
    AVec t[NV], xt[NV], wt[NV], m[NV], rest[NV];
    KahanSum<acc> shifted[NV];
    for (int v = 0; v < NV; ++v) {
      t[v] = AVec::loadu(tf + v * L);
      xt[v] = AVec(0);
      wt[v] = AVec(kWeight ? acc(0) : acc(1));
    }
    block_stats<NV>(src, sld, classes, m, rest, [&](int64_t c, int v, const AVec& x, const AVec& d) {
      const AVec vc(static_cast<acc>(c));
      xt[v] = select_eq(t[v], vc, x, xt[v]);
      if constexpr (kWeight) {
        wt[v] = select_eq(t[v], vc, AVec(wp[c]), wt[v]);
      }
      if constexpr (kSmooth) {  // compensated, as the exp sum
        shifted[v].add(kWeight ? AVec(wp[c]) * d : d);
      }
    });
    __at_align__ acc ms[NV * L], lss[NV * L];
    const AVec one_minus_eps(1 - eps), vepc(eps_per_class), vtotal(total_w), zero(0), none(-1);
    for (int v = 0; v < NV; ++v) {
      const AVec vl = rest[v].log1p() + (m[v] - m[v]);  // NaN where the max is not finite
      AVec l = wt[v] * ((m[v] - xt[v]) + vl);
      if constexpr (kSmooth) {
        l = one_minus_eps * l + vepc * (vtotal * vl - shifted[v].sum);
      }
      // torch masks the loss of an ignored row, even a NaN one.
      l = select_eq(t[v], none, zero, l);
      const int64_t real = std::min<int64_t>(L, n - v * L);  // >= 1: lanes are whole vectors
      if (real == L) {
        l.store(loss_p + r0 + v * L);
      } else {
        l.store(loss_p + r0 + v * L, real);
      }
      m[v].store(ms + v * L);
      vl.store(lss + v * L);
    }
    for (int64_t b = 0; b < std::min<int64_t>(NV * L, n); ++b) {
      store_stats(stats_p, r0 + b, ms[b], lss[b]);
    }
  };

  dispatch_bool(smooth, [&](auto kSmooth) {
    dispatch_bool(wp != nullptr, [&](auto kWeight) {
      for_each_tile<acc>(outer, inner, classes, 1, [&](const TileRows& rows, acc* tile, int64_t ld) {
        // Read float32/float64 tiles in place (sld = class stride); gather the others.
        const acc* src = direct_tile<acc>(xv, rows, ld);
        int64_t sld = xv.s1;
        if (src == nullptr) {
          gather_tile(xv, classes, rows, tile, ld);
          src = tile;
          sld = ld;
        }
        if (classes <= kExactIndices<acc>) {
          __at_align__ acc tf[kMaxTileRows + AVec::size()];
          for (int64_t b = 0; b < ld; ++b) {
            const int64_t t = b < rows.n ? tv(rows.o(b), rows.i(b)) : ignore_index;
            tf[b] = t == ignore_index ? acc(-1) : static_cast<acc>(t);
          }
          for_each_block<acc>(rows.n, [&](int64_t lb, auto kNV) {
            block_losses(kSmooth, kWeight, kNV, src + lb, sld, tf + lb, rows.r0 + lb, rows.n - lb);
          });
          return;
        }
        // More classes than the accumulation dtype counts exactly: a scalar gather per row.
        __at_align__ acc m[kMaxTileRows], ls[kMaxTileRows], shifted[kMaxTileRows];
        tile_stats(src, sld, classes, rows.n, m, ls);
        if (smooth) {
          for (int64_t lb = 0; lb < rows.n; lb += AVec::size()) {
            const AVec vm = AVec::loadu(m + lb);
            KahanSum<acc> wsum;
            for (int64_t c = 0; c < classes; ++c) {
              wsum.add(AVec(wp ? wp[c] : acc(1)) * (AVec::loadu(src + c * sld + lb) - vm));
            }
            wsum.sum.store(shifted + lb);
          }
        }
        for (int64_t b = 0; b < rows.n; ++b) {
          const int64_t t = tv(rows.o(b), rows.i(b));
          const acc x_t = t == ignore_index ? acc(0) : src[t * sld + b];
          store_stats(stats_p, rows.r0 + b, m[b], ls[b]);
          loss_p[rows.r0 + b] = row_loss(t, m[b], ls[b], x_t, smooth ? shifted[b] : acc(0));
        }
      });
    });
  });
}

// Backward: grad_c = g·[(1-ε)·w[t]·(p_c - δ_ct) + (ε/C)·(W·p_c - w_c)], written as
// coef·p_c - sw·w_c - δ_ct·tg with coef = ((1-ε)·w[t] + (ε/C)·W)·g, sw = (ε/C)·g, tg = (1-ε)·w[t]·g.
// g is 0 on ignored rows and multiplies everything, so an ignored NaN row stays NaN (reference).
// p_c = exp((x_c - m) - ls), torch's log-probability rounding, from the forward's row stats.
template <typename scalar_t>
void ce_backward_kernel(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                        const std::optional<Tensor>& weight, const Tensor& stats,
                        int64_t ignore_index, double smoothing, Tensor& out) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto ov = view3<scalar_t>(out);
  const auto tv = view2<int64_t>(target);
  const auto gv = view2<acc>(grad_loss);
  const auto mv = view2<acc>(stats.select(2, 0)), lv = view2<acc>(stats.select(2, 1));
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const acc total_w = w.total;
  const acc eps = static_cast<acc>(smoothing);
  // As reference: no smoothing term unless ε > 0 (a NaN ε still makes (1-ε)·w[t], hence g, NaN).
  const bool smooth = smoothing > 0;
  const acc eps_per_class = smooth ? eps / static_cast<acc>(classes) : acc(0);

  struct Coefs {
    int64_t t;  // the target, or 0 for an ignored row (reference's `safe`)
    acc g, coef, sw, tg;
  };
  // From a row's target t and upstream gradient g_row.
  auto coefs_of = [&](int64_t t, acc g_row) -> Coefs {
    const bool valid = t != ignore_index;
    const int64_t safe = valid ? t : 0;
    const acc g = valid ? g_row : acc(0);
    const acc target_coef = (1 - eps) * (wp ? wp[safe] : acc(1));
    return {safe, g, (target_coef + eps_per_class * total_w) * g, eps_per_class * g,
            target_coef * g};
  };
  auto coefs = [&](int64_t o, int64_t i) -> Coefs { return coefs_of(tv(o, i), gv(o, i)); };
  // The target class's gradient from log p_t, g multiplied last, as in reference:
  // g·((pc·p_t - (ε/C)·w_t) - tc), with pc = tc + (ε/C)·W (W = Σ w_c). Where p_t > 1/2 it is
  // formed as g·(pc·(p_t - 1) + (ε/C)·(W - w_t)) from p_t - 1 = expm1(log p_t): in a confident row
  // p_t - 1 rounded from p_t loses every digit (0 where the truth is -1e-41), and the fast exp's
  // error would survive the cancellation. Below 1/2 the first form keeps the small pc·p_t apart
  // from the smoothing terms (the second would cancel pc against (ε/C)·W). Exactly 0 when C = 1.
  // For a vector of rows (their log p_t, w_t and g) with Sleef's 1-ulp exp and expm1: both forms
  // are made and each lane picks its own (a NaN log p_t the second). The tile path takes it a
  // vector of rows at a time, rather than a libm call per row.
  auto target_grads = [&](const AVec& log_p_t, const AVec& w_t, const AVec& g) -> AVec {
    const AVec epc(eps_per_class), total(total_w);
    const AVec tc = AVec(1 - eps) * w_t;
    const AVec pc = tc + epc * total;
    const AVec confident = g * (pc * log_p_t.expm1() + epc * (total - w_t));
    const AVec other = g * ((pc * log_p_t.exp() - epc * w_t) - tc);
    return AVec::blendv(other, confident, log_p_t > AVec(-acc(0.6931471805599453)));
  };
  // One row's (the row path's): its lane of a broadcast.
  auto target_grad = [&](const Coefs& k, acc x_t, acc m, acc ls) -> acc {
    __at_align__ acc lanes[AVec::size()];
    target_grads(AVec((x_t - m) - ls), AVec(wp ? wp[k.t] : acc(1)), AVec(k.g)).store(lanes);
    return lanes[0];
  };

  if (row_contiguous(xv.s1, classes) && row_contiguous(ov.s1, classes)) {
    // In place, the plain store finds its line in the cache, where the load left it.
    const bool stream = out.data_ptr() != x.data_ptr() && streamable_rows(ov, inner, out.nbytes());
    dispatch_bool(smooth, [&](auto kSmooth) {
      dispatch_bool(wp != nullptr, [&](auto kWeight) {
        dispatch_bool(stream, [&](auto kStream) {
          at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
            for (int64_t r = begin; r < end; ++r) {
              const int64_t o = r / inner, i = r - o * inner;
              const scalar_t* row = xv.row(o, i);
              scalar_t* dst = ov.row(o, i);
              const Coefs k = coefs(o, i);
              const acc m = mv(o, i), ls = lv(o, i);
              // Read before the row is overwritten (out may be x itself).
              const acc x_t = static_cast<acc>(row[k.t * xv.s1]);
              const AVec vm(m), vl(ls), vc(k.coef), vsw(k.sw);
              dispatch_row_grad_exp<scalar_t, decltype(kSmooth)::value>(std::isfinite(ls), [&](auto exp_fn) {
                map_row<kStream>(row, dst, classes, [&](const AVec& v, int64_t j, int64_t n) {
                  // exp((x - m) - ls); RowGradExp::shifted saves 16-bit rows an instruction a vector
                  AVec grad = vc * exp_fn.shifted(v - vm, vl);
                  if constexpr (kSmooth) {
                    if constexpr (kWeight) {
                      grad = grad - vsw * load_acc(wp + j, n);
                    } else {
                      grad = grad - vsw;
                    }
                  }
                  return grad;
                });
              });
              // The target class: recomputed from x_t in the accumulation dtype, not patched in
              // the (possibly 16-bit) output.
              dst[k.t * ov.s1] = static_cast<scalar_t>(target_grad(k, x_t, m, ls));
            }
            if constexpr (kStream) {
              stream_fence();
            }
          });
        });
      });
    });
    return;
  }

  for_each_tile<acc>(outer, inner, classes, 1, [&](const TileRows& rows, acc* tile, int64_t ld) {
    InOutTile<acc, scalar_t> io(xv, ov, classes, rows, tile, ld);
    const acc* src = io.src;
    acc* dst = io.dst;
    const int64_t sld = io.sld, dld = io.dld;
    __at_align__ acc m[kMaxTileRows], ls[kMaxTileRows], coef[kMaxTileRows], sw[kMaxTileRows];
    __at_align__ acc tf[kMaxTileRows], x_t[kMaxTileRows];
    Coefs k[kMaxTileRows];
    // Per-row values. Within one outer index, each per-row tensor is a pointer and a stride:
    // no (o, i) pair per row, whose index products were a large share of the per-row work.
    dispatch_bool(rows.one_outer, [&](auto kOne) {
      const int64_t o0 = rows.o(0), i0 = rows.i(0);
      auto at = [&](const auto& v, int64_t b) {
        if constexpr (kOne) {
          return v.data[o0 * v.s0 + (i0 + b) * v.s1];
        } else {
          return v(rows.o(b), rows.i(b));
        }
      };
      for (int64_t b = 0; b < rows.n; ++b) {
        k[b] = coefs_of(at(tv, b), at(gv, b));
        m[b] = at(mv, b);
        ls[b] = at(lv, b);
      }
    });
    for (int64_t b = 0; b < ld; ++b) {
      if (b >= rows.n) {
        k[b] = {0, 0, 0, 0, 0};
        m[b] = ls[b] = 0;
      }
      coef[b] = k[b].coef;
      sw[b] = k[b].sw;
      tf[b] = static_cast<acc>(k[b].t);
      x_t[b] = 0;
    }
    // x_t is picked in the class loop below, by comparing each lane's target with the class, as
    // the forward's block_losses does: a load per row at its target class reads a random one of
    // `classes` distant runs before the loop has streamed them in, a cache miss per row that was
    // half of the backward's time. Past the classes the accumulation dtype counts exactly, the
    // per-row load it is.
    const bool pick = classes <= kExactIndices<acc>;
    if (!pick) {
      for (int64_t b = 0; b < rows.n; ++b) {
        x_t[b] = src[k[b].t * sld + b];
      }
    }
    // Block by block (see block_stats), class by class within a block, every per-row value in
    // registers. p_c = exp((x_c - m) - ls), as in the row path.
    dispatch_bool(smooth, [&](auto kSmooth) {
      // The row path's exps: exp_u20 flushes a subnormal p_c (1e-41 for logits 94 apart) to 0.
      dispatch_row_grad_exp<scalar_t, decltype(kSmooth)::value>(all_finite(ls, rows.n), [&](auto exp_fn) {
        for_each_block<acc>(rows.n, [&](int64_t lb, auto kNV) {
          constexpr int NV = decltype(kNV)::value;
          constexpr int64_t L = AVec::size();
          AVec vm[NV], vl[NV], vcoef[NV], vsw[NV], t[NV], xt[NV];
          for (int v = 0; v < NV; ++v) {
            vm[v] = AVec::loadu(m + lb + v * L);
            vl[v] = AVec::loadu(ls + lb + v * L);
            vcoef[v] = AVec::loadu(coef + lb + v * L);
            vsw[v] = AVec::loadu(sw + lb + v * L);
            t[v] = AVec::loadu(tf + lb + v * L);
            xt[v] = AVec(0);
          }
          for (int64_t c = 0; c < classes; ++c) {
            const acc* run = src + c * sld + lb;
            acc* out_run = dst + c * dld + lb;
            const AVec vc(static_cast<acc>(c));
            const AVec wc(kSmooth && wp ? wp[c] : acc(1));
            for (int v = 0; v < NV; ++v) {
              __builtin_prefetch(run + (v + 4 * NV) * L);  // as block_stats
              const AVec x = AVec::loadu(run + v * L);
              if (pick) {
                xt[v] = select_eq(t[v], vc, x, xt[v]);
              }
              AVec grad = vcoef[v] * exp_fn((x - vm[v]) - vl[v]);
              if constexpr (kSmooth) {
                grad = grad - vsw[v] * wc;
              }
              grad.store(out_run + v * L);
            }
          }
          if (pick) {
            for (int v = 0; v < NV; ++v) {
              xt[v].store(x_t + lb + v * L);
            }
          }
          // The target class, from x_t read in or before the class loop (src may be dst), while
          // the block's output is still in L1: target_grads a vector of rows at a time, then one
          // store per row.
          const int64_t end = std::min(lb + NV * L, rows.n);
          __at_align__ acc grad_t[NV * L], w_t[NV * L], g[NV * L];
          for (int64_t b = lb; b < lb + NV * L; ++b) {
            const bool real = b < end;
            w_t[b - lb] = real && wp ? wp[k[b].t] : acc(1);
            g[b - lb] = real ? k[b].g : acc(0);
          }
          for (int v = 0; v < NV; ++v) {
            const int64_t o = v * L;
            const AVec log_p_t = (AVec::loadu(x_t + lb + o) - vm[v]) - vl[v];
            target_grads(log_p_t, AVec::loadu(w_t + o), AVec::loadu(g + o)).store(grad_t + o);
          }
          for (int64_t b = lb; b < end; ++b) {
            dst[k[b].t * dld + b] = grad_t[b - lb];
          }
        });
      });
    });
    io.finish();
  });
}

// ---------------------------------------------------------------------------------------------
// Probability targets: t' = t·(1-ε) + ε/C when ε > 0; x, target and weight share one dtype.
// ---------------------------------------------------------------------------------------------

template <typename acc>
struct SmoothedTarget {
  acc scale, shift;  // t' = scale·t + shift

  SmoothedTarget(double smoothing, int64_t classes)
      : scale(smoothing > 0 ? static_cast<acc>(1 - smoothing) : acc(1)),
        shift(smoothing > 0 ? static_cast<acc>(smoothing / static_cast<double>(classes)) : acc(0)) {}

  Vectorized<acc> operator()(const Vectorized<acc>& t) const {
    return Vectorized<acc>(scale) * t + Vectorized<acc>(shift);
  }
};

// Forward: loss = Σ_c w_c·t'_c·((m - x_c) + ls), term by term: the form lse·Σ w·t' - Σ w·t'·x
// cancels when the loss is small. Three passes over the row (max, exp-sum, loss); the second and
// third hit the cache, so the logits come from memory once.
template <typename scalar_t>
void ce_prob_forward_kernel(const Tensor& x, const Tensor& target,
                            const std::optional<Tensor>& weight, double smoothing, Tensor& loss,
                            Tensor& stats) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto tv = view3<const scalar_t>(target);
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const SmoothedTarget<acc> smoothed(smoothing, classes);
  acc* loss_p = loss.data_ptr<acc>();
  acc* stats_p = stats.data_ptr<acc>();

  if (row_contiguous(xv.s1, classes) && row_contiguous(tv.s1, classes)) {
    at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
      for_each_row_max_ahead(xv, begin, end, inner, classes, [&](int64_t r, int64_t o, int64_t i,
                                                                 const scalar_t* row, acc m, auto& ahead) {
        if (!std::isfinite(m)) {
          // The log-sum is NaN, and every term of the loss with it.
          store_stats(stats_p, r, m, kNaN<acc>);
          loss_p[r] = kNaN<acc>;
          return;
        }
        const AVec vm(m);
        const acc ls = std::log1p(row_rest(row, classes, m, ahead));  // the loss's precision
        const AVec vl(ls);
        AVec l(0);
        for_each_vec2(row, tv.row(o, i), classes,
                      [&](const AVec& v, const AVec& t, int64_t j, int64_t n) {
                        AVec term = smoothed(t) * ((vm - v) + vl);
                        if (wp) {
                          term = load_acc(wp + j, n) * term;
                        }
                        l += mask_tail(term, n);
                      });
        store_stats(stats_p, r, m, ls);
        loss_p[r] = hsum(l);
      });
    });
    return;
  }

  for_each_tile<acc>(outer, inner, classes, 2, [&](const TileRows& rows, acc* tile, int64_t ld) {
    acc* ttile = tile + classes * ld;
    gather_tile(xv, classes, rows, tile, ld);
    gather_tile(tv, classes, rows, ttile, ld);
    __at_align__ acc m[kMaxTileRows], ls[kMaxTileRows], l_out[kMaxTileRows];
    tile_stats(tile, ld, classes, rows.n, m, ls);
    for (int64_t lb = 0; lb < rows.n; lb += AVec::size()) {
      const AVec vm = AVec::loadu(m + lb), vl = AVec::loadu(ls + lb);
      KahanSum<acc> l;
      for (int64_t c = 0; c < classes; ++c) {
        const AVec t = smoothed(AVec::loadu(ttile + c * ld + lb));
        l.add(AVec(wp ? wp[c] : acc(1)) * t * ((vm - AVec::loadu(tile + c * ld + lb)) + vl));
      }
      l.sum.store(l_out + lb);
    }
    for (int64_t b = 0; b < rows.n; ++b) {
      store_stats(stats_p, rows.r0 + b, m[b], ls[b]);
      loss_p[rows.r0 + b] = l_out[b];
    }
  });
}

// Backward: grad_c = g·(S·p_c - w_c·t'_c) with S = Σ_k w_k·t'_k.
template <typename scalar_t>
void ce_prob_backward_kernel(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                             const std::optional<Tensor>& weight, const Tensor& stats,
                             double smoothing, Tensor& out) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto tv = view3<const scalar_t>(target);
  const auto ov = view3<scalar_t>(out);
  const auto gv = view2<acc>(grad_loss);
  const auto mv = view2<acc>(stats.select(2, 0)), lv = view2<acc>(stats.select(2, 1));
  const auto w = acc_weight<scalar_t>(weight, classes);
  const acc* wp = w.data();
  const SmoothedTarget<acc> smoothed(smoothing, classes);

  if (row_contiguous(xv.s1, classes) && row_contiguous(tv.s1, classes) &&
      row_contiguous(ov.s1, classes)) {
    at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t o = r / inner, i = r - o * inner;
        const scalar_t* trow = tv.row(o, i);
        AVec s(0);
        for_each_vec(trow, classes, 0, [&](const AVec& t, int64_t j, int64_t n) {
          const AVec wt = smoothed(t);
          s += mask_tail(wp ? load_acc(wp + j, n) * wt : wt, n);
        });
        const acc ls = lv(o, i);
        const acc g = gv(o, i);
        const AVec vs(hsum(s) * g), vg(g), vm(mv(o, i)), vl(ls);
        // S·p_c - w_c·t'_c cancels where p matches the target: the degree-6 exp (kCancels).
        dispatch_row_grad_exp<scalar_t, true>(std::isfinite(ls), [&](auto exp_fn) {
          map_row2(xv.row(o, i), trow, ov.row(o, i), classes,
                   [&](const AVec& v, const AVec& t, int64_t j, int64_t n) {
                     AVec wt = smoothed(t);
                     if (wp) {
                       wt = load_acc(wp + j, n) * wt;
                     }
                     return vs * exp_fn((v - vm) - vl) - vg * wt;
                   });
        });
      }
    });
    return;
  }

  for_each_tile<acc>(outer, inner, classes, 2, [&](const TileRows& rows, acc* tile, int64_t ld) {
    acc* ttile = tile + classes * ld;
    gather_tile(xv, classes, rows, tile, ld);
    gather_tile(tv, classes, rows, ttile, ld);
    __at_align__ acc m[kMaxTileRows], ls[kMaxTileRows], g[kMaxTileRows];
    for (int64_t b = 0; b < ld; ++b) {
      m[b] = b < rows.n ? mv(rows.o(b), rows.i(b)) : acc(0);
      ls[b] = b < rows.n ? lv(rows.o(b), rows.i(b)) : acc(0);
      g[b] = b < rows.n ? gv(rows.o(b), rows.i(b)) : acc(0);
    }
    dispatch_exp(all_finite(ls, rows.n), [&](auto exp_fn) {
      for (int64_t lb = 0; lb < rows.n; lb += AVec::size()) {
        KahanSum<acc> s;
        for (int64_t c = 0; c < classes; ++c) {
          s.add(AVec(wp ? wp[c] : acc(1)) * smoothed(AVec::loadu(ttile + c * ld + lb)));
        }
        const AVec vg = AVec::loadu(g + lb), vm = AVec::loadu(m + lb), vl = AVec::loadu(ls + lb);
        const AVec vs = s.sum * vg;
        for (int64_t c = 0; c < classes; ++c) {
          acc* p = tile + c * ld + lb;
          const AVec wt = AVec(wp ? wp[c] : acc(1)) * smoothed(AVec::loadu(ttile + c * ld + lb));
          (vs * exp_fn((AVec::loadu(p) - vm) - vl) - vg * wt).store(p);
        }
      }
    });
    scatter_tile(tile, ld, classes, rows, ov);
  });
}

// The (outer, inner, 2) row stats for a per-row (outer, inner) result.
Tensor empty_stats(const Tensor& loss) {
  return pooled_empty({loss.size(0), loss.size(1), 2}, loss.options());
}

void check_canonical(const Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form, got ",
              x.dim(), " dims");
}

// Index targets need a class to pick, as reference's gather does (once every target is known to
// be ignore_index: check_targets runs first).
void check_has_classes(const Tensor& x) {
  TORCH_CHECK(x.size(1) > 0 || x.size(0) * x.size(2) == 0,
              "index 0 is out of bounds for dimension 1 with size 0");
}

}  // namespace

std::tuple<Tensor, Tensor> ce_forward(const Tensor& x, const Tensor& target,
                                      const std::optional<Tensor>& weight, int64_t ignore_index,
                                      double smoothing) {
  check_canonical(x);
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), x.size(0), x.size(2), x.size(1), ignore_index);
  check_has_classes(x);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = pooled_empty({x.size(0), x.size(2)}, x.options().dtype(acc_dtype));
  Tensor stats = empty_stats(loss);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_forward",
                                  [&] {
                                    ce_forward_kernel<scalar_t>(x, t, weight, ignore_index,
                                                                smoothing, loss, stats);
                                  });
  return {loss, stats};
}

Tensor ce_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                   const std::optional<Tensor>& weight, const Tensor& stats, int64_t ignore_index,
                   double smoothing, bool inplace) {
  check_canonical(x);
  const Tensor t = long_targets(target);
  check_targets(view2<int64_t>(t), x.size(0), x.size(2), x.size(1), ignore_index);
  check_has_classes(x);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = inplace ? x : empty_like_canonical(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_backward", [&] {
        ce_backward_kernel<scalar_t>(per_row(grad_loss, acc_dtype), x, t, weight,
                                     per_row(stats, acc_dtype), ignore_index, smoothing, out);
      });
  return out;
}

std::tuple<Tensor, Tensor> ce_prob_forward(const Tensor& x, const Tensor& target,
                                           const std::optional<Tensor>& weight,
                                           double smoothing) {
  check_canonical(x);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor loss = pooled_empty({x.size(0), x.size(2)}, x.options().dtype(acc_dtype));
  Tensor stats = empty_stats(loss);
  if (x.size(1) == 0) {  // the max of no classes, the log of an empty sum, an empty loss sum
    return {loss.fill_(0), stats.fill_(-std::numeric_limits<double>::infinity())};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_prob_forward", [&] {
        ce_prob_forward_kernel<scalar_t>(x, target.to(x.scalar_type()), weight, smoothing, loss,
                                         stats);
      });
  return {loss, stats};
}

Tensor ce_prob_backward(const Tensor& grad_loss, const Tensor& x, const Tensor& target,
                        const std::optional<Tensor>& weight, const Tensor& stats, double smoothing,
                        bool inplace) {
  check_canonical(x);
  const auto acc_dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  Tensor out = inplace ? x : empty_like_canonical(x);
  if (x.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_ce_prob_backward", [&] {
        ce_prob_backward_kernel<scalar_t>(per_row(grad_loss, acc_dtype), x,
                                          target.to(x.scalar_type()), weight,
                                          per_row(stats, acc_dtype), smoothing, out);
      });
  return out;
}

}  // namespace fusedce
