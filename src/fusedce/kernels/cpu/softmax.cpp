// log_softmax and softmax over the class dim of the canonical form: forward and backward.
// Outputs and gradients are contiguous (outer, C, inner), as torch's are.
#include "common.h"
#include "ops.h"

namespace fusedce {
namespace {

// Forward: out = (x - m) - ls (log_softmax) with ls = log Σ exp(x - m), or exp(x - m) / Σ exp(x - m)
// (softmax): torch's order of operations, exact under a large common offset (never x - rounded
// lse), and a small probability keeps its few ulp. A row whose max is not finite has a NaN ls
// and 1/Σ, hence a NaN output everywhere, as in reference.
template <typename scalar_t, bool kLog>
void softmax_forward_kernel(const Tensor& x, Tensor& out) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  const int64_t outer = x.size(0), classes = x.size(1), inner = x.size(2);
  const auto xv = view3<const scalar_t>(x);
  const auto ov = view3<scalar_t>(out);

  if (row_contiguous(xv.s1, classes) && row_contiguous(ov.s1, classes)) {
    dispatch_bool(streamable_rows(ov, inner, out.nbytes()), [&](auto kStream) {
      at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
        for_each_row_max_ahead(xv, begin, end, inner, classes, [&](int64_t r, int64_t o, int64_t i,
                                                                   const scalar_t* row, acc m, auto& ahead) {
          acc ls = kNaN<acc>, inv = kNaN<acc>;
          if (std::isfinite(m)) {
            const acc rest = row_rest(row, classes, m, ahead);  // the outputs' precision: see there
            ls = std::log1p(rest);
            inv = acc(1) / (acc(1) + rest);
          }
          const AVec vm(m), vl(ls), vinv(inv);
          map_row<kStream>(row, ov.row(o, i), classes, [&](const AVec& v, int64_t, int64_t) {
            if constexpr (kLog) {
              return (v - vm) - vl;
            } else {
              return SumExp<kSumExpDegree<scalar_t>>{}(v - vm) * vinv;
            }
          });
        });
        if constexpr (kStream) {
          stream_fence();
        }
      });
    });
    return;
  }

  for_each_tile<acc>(outer, inner, classes, 1, [&](const TileRows& rows, acc* tile, int64_t ld) {
    InOutTile<acc, scalar_t> io(xv, ov, classes, rows, tile, ld);
    const acc* src = io.src;
    acc* dst = io.dst;
    const int64_t sld = io.sld, dld = io.dld;
    __at_align__ acc m[kMaxTileRows], ls[kMaxTileRows], inv[kMaxTileRows];
    tile_stats(src, sld, classes, rows.n, m, ls, kLog ? nullptr : inv);
    for (int64_t lb = 0; lb < rows.n; lb += AVec::size()) {
      const AVec vm = AVec::loadu(m + lb), vl = AVec::loadu(ls + lb);
      const AVec vinv = kLog ? AVec(0) : AVec::loadu(inv + lb);
      for (int64_t c = 0; c < classes; ++c) {
        const AVec shifted = AVec::loadu(src + c * sld + lb) - vm;
        if constexpr (kLog) {
          (shifted - vl).store(dst + c * dld + lb);
        } else {
          (shifted.exp() * vinv).store(dst + c * dld + lb);
        }
      }
    }
    io.finish();
  });
}

// log_softmax backward: grad - exp(out)·Σ grad. exp_u20 is safe when the row's max output is
// neither NaN nor large (a log_softmax output is ≤ 0; -inf gives 0, so a -inf input passes the
// upstream gradient through).
template <typename acc>
inline bool fast_exp_ok(acc max_out) {
  return !std::isnan(max_out) && max_out < acc(80);
}

// Backward. kLog: grad - exp(out)·Σ_c grad. Otherwise (softmax): out·(grad - Σ_c grad·out), with
// Σ_c grad·out compensated (CompensatedDot) for float32, as reference.softmax_backward takes it
// in float64. Not for the half types, whose own rounding of out is far coarser, nor float64.
template <typename scalar_t, bool kLog>
void softmax_backward_kernel(const Tensor& grad_out, const Tensor& out, Tensor& grad) {
  using acc = acc_t<scalar_t>;
  using AVec = Vectorized<acc>;
  constexpr bool kPrecise = std::is_same_v<scalar_t, float>;
  const int64_t outer = out.size(0), classes = out.size(1), inner = out.size(2);
  const auto gv = view3<const scalar_t>(grad_out);
  const auto yv = view3<const scalar_t>(out);
  const auto dv = view3<scalar_t>(grad);

  if (row_contiguous(gv.s1, classes) && row_contiguous(yv.s1, classes) &&
      row_contiguous(dv.s1, classes)) {
    dispatch_bool(streamable_rows(dv, inner, grad.nbytes()), [&](auto kStream) {
      at::parallel_for(0, outer * inner, row_grain(classes), [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t o = r / inner, i = r - o * inner;
          const scalar_t* grow = gv.row(o, i);
          const scalar_t* yrow = yv.row(o, i);
          AVec sum(0);
          CompensatedDot<acc> dot;  // kPrecise: see there
          if constexpr (kLog) {  // Σ grad alone: the outputs are read once, in the second pass
            for_each_vec(grow, classes, acc(0), [&](const AVec& g, int64_t, int64_t) { sum += g; });
          } else {
            for_each_vec2(grow, yrow, classes, [&](const AVec& g, const AVec& y, int64_t, int64_t) {
              if constexpr (kPrecise) {
                dot.add(g, y);
              } else {
                sum += g * y;
              }
            });
          }
          acc s_hi = hsum(sum), s_lo = 0;
          if constexpr (!kLog && kPrecise) {
            dot.total(s_hi, s_lo);
          }
          const AVec vs(s_hi), vs_lo(s_lo);
          if constexpr (kLog) {
            // The inline exp (SumExp: about twelve instructions a vector where exp_u20 takes about
            // twenty, and within an ulp) takes any argument, so no row needs the precise path;
            // degree 6 even for 16-bit rows, whose g - exp(y)·Σ may cancel.
            map_row2<kStream>(grow, yrow, dv.row(o, i), classes,
                              [&](const AVec& g, const AVec& y, int64_t, int64_t) {
                                return g - SumExp<>{}(y) * vs;
                              });
          } else {
            // g - s_hi is exact where it cancels (Sterbenz), and s_lo then adds the digits.
            map_row2<kStream>(grow, yrow, dv.row(o, i), classes,
                              [&](const AVec& g, const AVec& y, int64_t, int64_t) {
                                return y * ((g - vs) - vs_lo);
                              });
          }
        }
        if constexpr (kStream) {
          stream_fence();
        }
      });
    });
    return;
  }

  for_each_tile<acc>(outer, inner, classes, 2, [&](const TileRows& rows, acc* tile, int64_t ld) {
    // As in forward: full float32/float64 tiles are used where they lie.
    const acc* gsrc = direct_tile<acc>(gv, rows, ld);
    const acc* ysrc = direct_tile<acc>(yv, rows, ld);
    acc* dst = direct_tile<acc>(dv, rows, ld);
    int64_t gld = gv.s1, yld = yv.s1, dld = dv.s1;
    const bool direct = gsrc != nullptr && ysrc != nullptr && dst != nullptr;
    if (!direct) {
      acc* ytile = tile + classes * ld;
      gather_tile(gv, classes, rows, tile, ld);
      gather_tile(yv, classes, rows, ytile, ld);
      gsrc = dst = tile;
      ysrc = ytile;
      gld = yld = dld = ld;
    }
    for (int64_t lb = 0; lb < rows.n; lb += AVec::size()) {
      AVec sum(0), max_out(-kInf<acc>), sum_lo(0);
      CompensatedDot<acc> dot;  // kPrecise: lane-wise, each lane one row (no lane combination)
      for (int64_t c = 0; c < classes; ++c) {
        const AVec g = AVec::loadu(gsrc + c * gld + lb), y = AVec::loadu(ysrc + c * yld + lb);
        if constexpr (kLog) {
          sum += g;
          max_out = at::vec::maximum(max_out, y);  // padding lanes hold 0: harmless
        } else if constexpr (kPrecise) {
          dot.add(g, y);
        } else {
          sum += g * y;
        }
      }
      if constexpr (!kLog && kPrecise) {
        // hi + lo per lane; a lane whose sum is not finite keeps it, with lo = 0 (see total()).
        const AVec t = dot.sum + dot.err;
        const AVec finite = (t - t) == AVec(0);
        sum = AVec::blendv(dot.sum, t, finite);
        sum_lo = AVec::blendv(AVec(0), dot.err - (t - dot.sum), finite);
      }
      auto body = [&](auto exp_fn) {
        for (int64_t c = 0; c < classes; ++c) {
          const AVec g = AVec::loadu(gsrc + c * gld + lb), y = AVec::loadu(ysrc + c * yld + lb);
          acc* p = dst + c * dld + lb;
          if constexpr (kLog) {
            (g - exp_fn(y) * sum).store(p);
          } else {
            (y * ((g - sum) - sum_lo)).store(p);
          }
        }
      };
      if constexpr (kLog) {
        dispatch_exp(fast_exp_ok(hmax(max_out)), body);
      } else {
        body(FastExp{});  // no exponential in softmax's backward
      }
    }
    if (!direct) {
      scatter_tile(tile, ld, classes, rows, dv);
    }
  });
}

void check_canonical(const Tensor& x) {
  TORCH_CHECK(x.dim() == 3, "fusedce: expected the canonical (outer, C, inner) form, got ",
              x.dim(), " dims");
}

template <bool kLog>
Tensor forward(const Tensor& x) {
  check_canonical(x);
  Tensor out = empty_like_canonical(x);
  if (out.numel() == 0) {  // no rows, or no classes
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fusedce_softmax_forward",
                                  [&] { softmax_forward_kernel<scalar_t, kLog>(x, out); });
  return out;
}

template <bool kLog>
Tensor backward(const Tensor& grad_out, const Tensor& out) {
  check_canonical(out);
  const Tensor g = grad_out.scalar_type() == out.scalar_type() ? grad_out : grad_out.to(out.scalar_type());
  Tensor grad = empty_like_canonical(out);
  if (grad.numel() == 0) {
    return grad;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fusedce_softmax_backward",
                                  [&] { softmax_backward_kernel<scalar_t, kLog>(g, out, grad); });
  return grad;
}

}  // namespace

Tensor log_softmax_forward(const Tensor& x) { return forward<true>(x); }
Tensor log_softmax_backward(const Tensor& grad_out, const Tensor& out) { return backward<true>(grad_out, out); }
Tensor softmax_forward(const Tensor& x) { return forward<false>(x); }
Tensor softmax_backward(const Tensor& grad_out, const Tensor& out) { return backward<false>(grad_out, out); }

}  // namespace fusedce
