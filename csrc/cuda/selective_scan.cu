// CUDA kernels of lesionkit::selective_scan (Mamba S6) and selective_scan_2d (the fused SS2D
// core) (docs/ops.md); cross_scan and cross_merge are in cross_scan.cu. Mirrors
// csrc/cpu/selective_scan.cpp.
//
// One block of kThreads threads per (batch, channel). The sequence is walked in chunks of
// kScanChunk = kThreads * kItems steps; thread i holds kItems consecutive steps. Each step is
// the affine map h -> a h + b with a = exp(dt A_j), b = dt B_j u; per state index j the
// threads compose their steps, a block-wide exclusive scan of those maps (warp shuffles, then
// the warp totals) gives each thread the map of all steps before it, and the state carried
// from the previous chunk (shared memory) closes the recurrence. The state entering each chunk
// is the forward's checkpoint.
//
// The backward walks the chunks in reverse: it recomputes the chunk's states per j from its
// checkpoint (the same forward scan), then runs the adjoint recurrence q_t = a_t (dy_t C_t +
// q_{t+1}) (q_t = dL/dh_{t-1} through step t) as a reverse block scan. dB and dC, shared by the
// channels of a group, are accumulated with float atomics (as mamba does); dA, dD, d(bias) are
// reduced in the block and written per (batch, channel), then summed over the batch.
//
// The fused 2D kernel runs the same scan for the four directions of a (batch, channel), reading
// x, dt, B and C in spatial layout through each direction's index map and summing the four
// outputs into one float row (the block owns the row, so no atomics).
//
// Determinism: the forward is bitwise reproducible; the backward is not (the atomics sum dB,
// dC and dA in whatever order the warps arrive), so both backward entry points call
// alertNotDeterministic, like PyTorch's own atomics-based CUDA ops: an error under
// torch.use_deterministic_algorithms(True), a warning with warn_only=True (docs/ss2d.md).

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../selective_scan.h"
#include "block_reduce.cuh"
#include "launch.cuh"

namespace lesionkit {
namespace {

constexpr int kThreads = 128;
constexpr int kItems = 4;
constexpr int kWarps = kThreads / 32;
static_assert(kThreads * kItems == kScanChunk, "a CUDA block's chunk must match kScanChunk");
constexpr unsigned kFullMask = 0xffffffffu;

// h -> a h + b.
template <typename T>
struct Affine {
  T a, b;
};

template <typename T>
__device__ __forceinline__ Affine<T> identity() {
  return {T(1), T(0)};
}

// The map `first` then `second`.
template <typename T>
__device__ __forceinline__ Affine<T> compose(const Affine<T>& first, const Affine<T>& second) {
  return {first.a * second.a, second.a * first.b + second.b};
}

// Exclusive scan of one map per thread in thread order (kReverse: from the last thread to the
// first). Returns the composition of every earlier thread's map (identity for the first).
// `totals` holds kWarps maps; the function ends with a barrier so it can be reused at once.
template <bool kReverse, typename T>
__device__ Affine<T> block_exclusive_scan(Affine<T> v, Affine<T>* totals) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Affine<T> other;
    if (kReverse) {
      other.a = __shfl_down_sync(kFullMask, v.a, offset);
      other.b = __shfl_down_sync(kFullMask, v.b, offset);
      if (lane + offset < 32) v = compose(other, v);
    } else {
      other.a = __shfl_up_sync(kFullMask, v.a, offset);
      other.b = __shfl_up_sync(kFullMask, v.b, offset);
      if (lane >= offset) v = compose(other, v);
    }
  }
  // v: inclusive scan within the warp.
  if (lane == (kReverse ? 0 : 31)) totals[warp] = v;
  __syncthreads();
  Affine<T> prefix = identity<T>();
  if (kReverse) {
    for (int w = kWarps - 1; w > warp; --w) prefix = compose(prefix, totals[w]);
  } else {
    for (int w = 0; w < warp; ++w) prefix = compose(prefix, totals[w]);
  }
  Affine<T> exclusive;
  if (kReverse) {
    exclusive.a = __shfl_down_sync(kFullMask, v.a, 1);
    exclusive.b = __shfl_down_sync(kFullMask, v.b, 1);
    if (lane == 31) exclusive = identity<T>();
  } else {
    exclusive.a = __shfl_up_sync(kFullMask, v.a, 1);
    exclusive.b = __shfl_up_sync(kFullMask, v.b, 1);
    if (lane == 0) exclusive = identity<T>();
  }
  __syncthreads();
  return compose(prefix, exclusive);
}

__device__ __forceinline__ float dev_exp(float x) { return __expf(x); }
__device__ __forceinline__ double dev_exp(double x) { return exp(x); }
__device__ __forceinline__ float dev_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dev_log1p(double x) { return log1p(x); }

template <typename T>
__device__ __forceinline__ T dev_softplus(T x) {
  return x > T(20) ? x : dev_log1p(dev_exp(x));
}

template <typename T>
__device__ __forceinline__ T dev_sigmoid(T x) {
  return T(1) / (T(1) + dev_exp(-x));
}

template <typename scalar_t, typename acc_t>
struct ScanArgs {
  int64_t dim, length, state, groups, height, width;
  bool softplus;
  const scalar_t *u, *delta, *z, *B, *C;
  const acc_t *A, *D, *bias;
  // forward
  scalar_t* out;         // 1D output
  acc_t* out_float;      // 1D output instead of `out` when it is float32 from 16-bit inputs
  acc_t* out_acc;        // 2D output row sums (B, D, L)
  acc_t* last_state;     // (b, d, n) or nullptr
  acc_t* checkpoints;
  // backward
  const acc_t* grad_out;  // in the accumulation dtype, whatever the output's
  const acc_t* grad_last;
  scalar_t *du, *ddelta, *dz;
  acc_t* du_acc;  // 2D: dx row sums
  acc_t *dB, *dC;  // float accumulators in B's layout
  acc_t *dA_part, *dD_part, *dbias_part;  // per (batch, scan row)
};

// One scan row: where its inputs are and how step t maps to a position.
template <typename scalar_t, typename acc_t>
struct RowView {
  const scalar_t *u, *delta, *B, *C, *z;
  const acc_t *grad_out, *A;
  acc_t D, bias;
  acc_t* checkpoints;
  int64_t param;  // index into the (batch, row) partials
  int64_t seq;    // offset of the row's (b, d, l) tensors (ddelta; 1D: du, dz, out)
  int dir;        // cross-scan direction, -1 for the 1D scan
};

template <bool k2D, typename scalar_t, typename acc_t>
__device__ __forceinline__ RowView<scalar_t, acc_t> row_view(const ScanArgs<scalar_t, acc_t>& p,
                                                             int64_t idx, int k) {
  const int64_t L = p.length, n = p.state, chunks = (L + kScanChunk - 1) / kScanChunk;
  RowView<scalar_t, acc_t> r;
  const int64_t b = idx / p.dim, d = idx % p.dim;
  if (k2D) {
    const int64_t kd = k * p.dim + d, row = (b * kDirections + k) * p.dim + d;
    r.u = p.u + idx * L;
    r.delta = p.delta + row * L;
    r.B = p.B + (b * kDirections + k) * n * L;
    r.C = p.C + (b * kDirections + k) * n * L;
    r.z = nullptr;
    r.grad_out = p.grad_out ? p.grad_out + idx * L : nullptr;
    r.A = p.A + kd * n;
    r.D = p.D[kd];
    r.bias = p.bias[kd];
    r.checkpoints = p.checkpoints + row * chunks * n;
    r.param = b * kDirections * p.dim + kd;
    r.seq = row * L;
    r.dir = k;
  } else {
    const int64_t grp = d / (p.dim / p.groups);
    r.u = p.u + idx * L;
    r.delta = p.delta + idx * L;
    r.B = p.B + (b * p.groups + grp) * n * L;
    r.C = p.C + (b * p.groups + grp) * n * L;
    r.z = p.z ? p.z + idx * L : nullptr;
    r.grad_out = p.grad_out ? p.grad_out + idx * L : nullptr;
    r.A = p.A + d * n;
    r.D = p.D ? p.D[d] : acc_t(0);
    r.bias = p.bias ? p.bias[d] : acc_t(0);
    r.checkpoints = p.checkpoints + idx * chunks * n;
    r.param = idx;
    r.seq = idx * L;
    r.dir = -1;
  }
  return r;
}

template <bool k2D, typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t position(const ScanArgs<scalar_t, acc_t>& p, int dir, int64_t t) {
  return k2D ? direction_index(dir, t, p.height, p.width) : t;
}

// The thread's kItems steps of chunk c: u, dt, dt * u, softplus' derivative. Steps past the end
// get dt = u = 0, the identity map.
template <bool k2D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_items(const ScanArgs<scalar_t, acc_t>& p,
                                           const RowView<scalar_t, acc_t>& r, int64_t t0,
                                           acc_t* u, acc_t* dt, acc_t* dtu, acc_t* dsoft,
                                           int64_t* pos) {
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    const int64_t t = t0 + threadIdx.x * kItems + i;
    if (t < p.length) {
      const int64_t q = position<k2D>(p, r.dir, t);
      pos[i] = q;
      u[i] = static_cast<acc_t>(r.u[q]);
      const acc_t pre = static_cast<acc_t>(r.delta[q]) + r.bias;
      dt[i] = p.softplus ? dev_softplus(pre) : pre;
      dsoft[i] = p.softplus ? dev_sigmoid(pre) : acc_t(1);
    } else {
      pos[i] = -1;
      u[i] = dt[i] = acc_t(0);
      dsoft[i] = acc_t(0);
    }
    dtu[i] = dt[i] * u[i];
  }
}

// Forward recurrence of state index j over the chunk: fills h (state after each item) and the
// state before the thread's first item; `carry` holds the state entering the chunk on entry
// and leaving it on exit.
template <bool k2D, typename scalar_t, typename acc_t>
__device__ __forceinline__ void scan_state_forward(const ScanArgs<scalar_t, acc_t>& p,
                                                   const RowView<scalar_t, acc_t>& r, int j,
                                                   const int64_t* pos, const acc_t* dt,
                                                   const acc_t* dtu, acc_t* a, acc_t* h,
                                                   acc_t& h_before, acc_t* carry,
                                                   Affine<acc_t>* totals) {
  const acc_t A = r.A[j];
  Affine<acc_t> local = identity<acc_t>();
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    a[i] = dev_exp(dt[i] * A);
    const acc_t Bv = pos[i] >= 0 ? static_cast<acc_t>(r.B[j * p.length + pos[i]]) : acc_t(0);
    h[i] = dtu[i] * Bv;  // the map's b for now
    local = compose(local, Affine<acc_t>{a[i], h[i]});
  }
  const acc_t entering = carry[j];  // read before the scan's barriers
  const Affine<acc_t> prefix = block_exclusive_scan<false>(local, totals);
  acc_t state = prefix.a * entering + prefix.b;
  h_before = state;
#pragma unroll
  for (int i = 0; i < kItems; ++i) {
    state = a[i] * state + h[i];
    h[i] = state;
  }
  if (threadIdx.x == kThreads - 1) carry[j] = state;
}

template <bool k2D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scan_forward_kernel(ScanArgs<scalar_t, acc_t> p) {
  __shared__ acc_t carry[kScanMaxState];
  __shared__ Affine<acc_t> totals[kWarps];
  const int64_t idx = blockIdx.x;
  const int64_t L = p.length, n = p.state;
  for (int k = 0; k < (k2D ? kDirections : 1); ++k) {
    const auto r = row_view<k2D>(p, idx, k);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) carry[j] = acc_t(0);
    __syncthreads();
    for (int64_t t0 = 0, c = 0; t0 < L; t0 += kScanChunk, ++c) {
      acc_t u[kItems], dt[kItems], dtu[kItems], dsoft[kItems], a[kItems], h[kItems], y[kItems];
      int64_t pos[kItems];
      load_items<k2D>(p, r, t0, u, dt, dtu, dsoft, pos);
#pragma unroll
      for (int i = 0; i < kItems; ++i) y[i] = r.D * u[i];
      for (int j = 0; j < n; ++j) {
        if (threadIdx.x == 0) r.checkpoints[c * n + j] = carry[j];
        acc_t h_before;
        scan_state_forward<k2D>(p, r, j, pos, dt, dtu, a, h, h_before, carry, totals);
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          if (pos[i] >= 0) y[i] += static_cast<acc_t>(r.C[j * L + pos[i]]) * h[i];
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (pos[i] < 0) continue;
        if (k2D) {
          acc_t* o = p.out_acc + idx * L + pos[i];
          *o = k == 0 ? y[i] : *o + y[i];
        } else {
          acc_t v = y[i];
          if (r.z) {
            const acc_t zz = static_cast<acc_t>(r.z[pos[i]]);
            v *= zz * dev_sigmoid(zz);
          }
          if (p.out_float) {
            p.out_float[r.seq + pos[i]] = v;
          } else {
            p.out[r.seq + pos[i]] = static_cast<scalar_t>(v);
          }
        }
      }
      __syncthreads();  // `carry` is written by the last thread and read by all in the next chunk
    }
    __syncthreads();  // the next direction adds to rows this one wrote, and reuses `carry`
    if (!k2D && p.last_state != nullptr) {
      for (int64_t j = threadIdx.x; j < n; j += kThreads) p.last_state[idx * n + j] = carry[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void atomic_add(T* address, T value) {
  atomicAdd(address, value);
}

template <bool k2D, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) scan_backward_kernel(ScanArgs<scalar_t, acc_t> p) {
  __shared__ acc_t carry[kScanMaxState];    // forward state entering the chunk
  __shared__ acc_t q_carry[kScanMaxState];  // dL/dh at the chunk's end, from later chunks
  __shared__ acc_t dA[kScanMaxState];
  __shared__ Affine<acc_t> totals[kWarps];
  __shared__ acc_t scratch[32];
  const int64_t idx = blockIdx.x;
  const int64_t L = p.length, n = p.state, chunks = (L + kScanChunk - 1) / kScanChunk;
  for (int k = 0; k < (k2D ? kDirections : 1); ++k) {
    const auto r = row_view<k2D>(p, idx, k);
    for (int64_t j = threadIdx.x; j < n; j += kThreads) {
      q_carry[j] = (!k2D && p.grad_last) ? p.grad_last[idx * n + j] : acc_t(0);
      dA[j] = acc_t(0);
    }
    __syncthreads();
    acc_t dD_sum = 0, dbias_sum = 0;
    for (int64_t c = chunks - 1; c >= 0; --c) {
      const int64_t t0 = c * kScanChunk;
      acc_t u[kItems], dt[kItems], dtu[kItems], dsoft[kItems], a[kItems], h[kItems];
      acc_t dy[kItems], ddt[kItems], sum_gB[kItems];
      int64_t pos[kItems];
      load_items<k2D>(p, r, t0, u, dt, dtu, dsoft, pos);
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        dy[i] = pos[i] >= 0 ? r.grad_out[pos[i]] : acc_t(0);
        ddt[i] = sum_gB[i] = acc_t(0);
      }
      if (r.z) {
        // The gate needs y: one forward pass over the chunk first.
        acc_t y[kItems];
#pragma unroll
        for (int i = 0; i < kItems; ++i) y[i] = r.D * u[i];
        __syncthreads();  // the previous chunk's scans may still be writing `carry`
        for (int64_t j = threadIdx.x; j < n; j += kThreads) carry[j] = r.checkpoints[c * n + j];
        __syncthreads();
        for (int j = 0; j < n; ++j) {
          acc_t h_before;
          scan_state_forward<k2D>(p, r, j, pos, dt, dtu, a, h, h_before, carry, totals);
#pragma unroll
          for (int i = 0; i < kItems; ++i) {
            if (pos[i] >= 0) y[i] += static_cast<acc_t>(r.C[j * L + pos[i]]) * h[i];
          }
        }
#pragma unroll
        for (int i = 0; i < kItems; ++i) {
          if (pos[i] < 0) continue;
          const acc_t zz = static_cast<acc_t>(r.z[pos[i]]);
          const acc_t sg = dev_sigmoid(zz);
          p.dz[r.seq + pos[i]] =
              static_cast<scalar_t>(dy[i] * y[i] * sg * (acc_t(1) + zz * (acc_t(1) - sg)));
          dy[i] *= zz * sg;
        }
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) dD_sum += dy[i] * u[i];
      __syncthreads();  // the gate's pass may have just written `carry`
      for (int64_t j = threadIdx.x; j < n; j += kThreads) carry[j] = r.checkpoints[c * n + j];
      __syncthreads();
      for (int j = 0; j < n; ++j) {
        acc_t h_before;
        scan_state_forward<k2D>(p, r, j, pos, dt, dtu, a, h, h_before, carry, totals);
        // Adjoint, later steps first: q_t = a_t (beta_t + q_{t+1}), beta_t = dy_t C_t.
        acc_t beta[kItems];
        Affine<acc_t> local = identity<acc_t>();
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          beta[i] = pos[i] >= 0 ? dy[i] * static_cast<acc_t>(r.C[j * L + pos[i]]) : acc_t(0);
          local = compose(local, Affine<acc_t>{a[i], a[i] * beta[i]});
        }
        const acc_t leaving = q_carry[j];
        const Affine<acc_t> later = block_exclusive_scan<true>(local, totals);
        acc_t q = later.a * leaving + later.b;
        const acc_t A = r.A[j];
        acc_t dA_local = 0;
#pragma unroll
        for (int i = kItems - 1; i >= 0; --i) {
          const acc_t g = beta[i] + q;  // dL/dh_t
          const acc_t h_prev = i == 0 ? h_before : h[i - 1];
          const acc_t gha = g * h_prev * a[i];
          ddt[i] += gha * A;
          dA_local += gha * dt[i];
          if (pos[i] >= 0) {
            const acc_t Bv = static_cast<acc_t>(r.B[j * L + pos[i]]);
            sum_gB[i] += g * Bv;
            const int64_t bc = (r.B - p.B) + j * L + pos[i];
            atomic_add(p.dB + bc, g * dtu[i]);
            atomic_add(p.dC + bc, dy[i] * h[i]);
          }
          q = a[i] * g;
        }
        if (threadIdx.x == 0) q_carry[j] = q;
        dA_local = lesionkit::cuda::warp_sum(dA_local);
        if ((threadIdx.x & 31) == 0) atomicAdd(&dA[j], dA_local);
      }
#pragma unroll
      for (int i = 0; i < kItems; ++i) {
        if (pos[i] < 0) continue;
        const acc_t ddt_i = ddt[i] + sum_gB[i] * u[i];
        const acc_t du_i = dy[i] * r.D + sum_gB[i] * dt[i];
        const acc_t ddelta_i = ddt_i * dsoft[i];
        dbias_sum += ddelta_i;
        p.ddelta[r.seq + pos[i]] = static_cast<scalar_t>(ddelta_i);
        if (k2D) {
          acc_t* o = p.du_acc + idx * L + pos[i];
          *o = k == 0 ? du_i : *o + du_i;
        } else {
          p.du[r.seq + pos[i]] = static_cast<scalar_t>(du_i);
        }
      }
      __syncthreads();  // `q_carry` is written by thread 0 and read by all in the next chunk
    }
    dD_sum = lesionkit::cuda::block_sum(dD_sum, scratch);
    dbias_sum = lesionkit::cuda::block_sum(dbias_sum, scratch);
    if (threadIdx.x == 0) {
      p.dD_part[r.param] = dD_sum;
      p.dbias_part[r.param] = dbias_sum;
    }
    __syncthreads();  // dA complete; the next direction's rows see this one's dx
    for (int64_t j = threadIdx.x; j < n; j += kThreads) p.dA_part[r.param * n + j] = dA[j];
    __syncthreads();
  }
}

template <bool k2D, typename scalar_t, typename acc_t>
void launch_forward(const ScanArgs<scalar_t, acc_t>& args, int64_t blocks) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  scan_forward_kernel<k2D, scalar_t, acc_t>
      <<<cuda::grid_x(blocks, "batch * dim"), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool k2D, typename scalar_t, typename acc_t>
void launch_backward(const ScanArgs<scalar_t, acc_t>& args, int64_t blocks) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  scan_backward_kernel<k2D, scalar_t, acc_t>
      <<<cuda::grid_x(blocks, "batch * dim"), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* opt_ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// ---------------------------------------------------------------------------------------------
// selective_scan

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_scan_cuda(
    const at::Tensor& u_in, const at::Tensor& delta_in, const at::Tensor& A_in,
    const at::Tensor& B_in, const at::Tensor& C_in, const std::optional<at::Tensor>& D_in,
    const std::optional<at::Tensor>& z_in, const std::optional<at::Tensor>& bias_in,
    bool delta_softplus, std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(u_in.is_cuda(), "u should be a CUDA tensor for the CUDA kernel, got one on ",
              u_in.device());
  const ScanShape s = check_selective_scan_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in,
                                                  bias_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto acc_opts = u_in.options().dtype(scan_acc_type(u_in.scalar_type()));
  const auto out_type = scan_out_type(u_in.scalar_type(), out_dtype);
  auto out = at::empty(u_in.sizes(), u_in.options().dtype(out_type));
  auto last_state = at::zeros({s.batch, s.dim, s.state}, acc_opts);
  auto checkpoints = at::empty({s.batch, s.dim, scan_chunks(s.length), s.state}, acc_opts);
  if (s.batch == 0 || s.dim == 0 || s.length == 0) return {out, last_state, checkpoints};
  const auto u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
  const auto B = B_in.contiguous(), C = C_in.contiguous();
  const auto D = D_in.has_value() ? D_in->contiguous() : at::Tensor();
  const auto z = z_in.has_value() ? z_in->contiguous() : at::Tensor();
  const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(), "selective_scan_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ScanArgs<scalar_t, acc_t> args{};
    args.dim = s.dim; args.length = s.length; args.state = s.state; args.groups = s.groups;
    args.softplus = delta_softplus;
    args.u = u.const_data_ptr<scalar_t>(); args.delta = delta.const_data_ptr<scalar_t>();
    args.z = opt_ptr<scalar_t>(z); args.B = B.const_data_ptr<scalar_t>(); args.C = C.const_data_ptr<scalar_t>();
    args.A = A.const_data_ptr<acc_t>(); args.D = opt_ptr<acc_t>(D); args.bias = opt_ptr<acc_t>(bias);
    if (out_type != u.scalar_type()) {
      args.out_float = out.mutable_data_ptr<acc_t>();
    } else {
      args.out = out.mutable_data_ptr<scalar_t>();
    }
    args.last_state = last_state.mutable_data_ptr<acc_t>();
    args.checkpoints = checkpoints.mutable_data_ptr<acc_t>();
    launch_forward<false>(args, s.batch * s.dim);
  });
  return {out, last_state, checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
selective_scan_backward_cuda(const at::Tensor& grad_out_in,
                             const std::optional<at::Tensor>& grad_last_in, const at::Tensor& u_in,
                             const at::Tensor& delta_in, const at::Tensor& A_in,
                             const at::Tensor& B_in, const at::Tensor& C_in,
                             const std::optional<at::Tensor>& D_in,
                             const std::optional<at::Tensor>& z_in,
                             const std::optional<at::Tensor>& bias_in, bool delta_softplus,
                             const at::Tensor& checkpoints_in) {
  TORCH_CHECK(u_in.is_cuda(), "u should be a CUDA tensor for the CUDA kernel, got one on ",
              u_in.device());
  at::globalContext().alertNotDeterministic("lesionkit::selective_scan_backward (CUDA: dB, dC, dA by atomics)");
  const ScanShape s = check_selective_scan_inputs(u_in, delta_in, A_in, B_in, C_in, D_in, z_in,
                                                  bias_in);
  const c10::cuda::CUDAGuard guard(u_in.device());
  const auto acc = scan_acc_type(u_in.scalar_type());
  const auto acc_opts = u_in.options().dtype(acc);
  TORCH_CHECK(grad_out_in.sizes() == u_in.sizes(), "grad_out should have u's shape ", u_in.sizes(),
              ", got ", grad_out_in.sizes());
  check_grad_out_type(grad_out_in, u_in.scalar_type());
  check_checkpoints(checkpoints_in, {s.batch, s.dim}, s.length, s.state, acc);
  check_on_device(u_in.device(), "u",
                  {{"grad_out", &grad_out_in},
                   {"grad_last_state", grad_last_in.has_value() ? &*grad_last_in : nullptr},
                   {"checkpoints", &checkpoints_in}});
  if (grad_last_in.has_value()) {
    TORCH_CHECK(grad_last_in->sizes() == at::IntArrayRef({s.batch, s.dim, s.state}),
                "grad_last_state should have shape (b, d, n) = (", s.batch, ", ", s.dim, ", ",
                s.state, "), got ", grad_last_in->sizes());
  }
  auto du = at::empty(u_in.sizes(), u_in.options());
  auto ddelta = at::empty(u_in.sizes(), u_in.options());
  auto dz = z_in.has_value() ? at::empty(u_in.sizes(), u_in.options()) : at::empty({0}, u_in.options());
  auto dB_acc = at::zeros(B_in.sizes(), acc_opts);
  auto dC_acc = at::zeros(C_in.sizes(), acc_opts);
  auto dA_part = at::zeros({s.batch, s.dim, s.state}, acc_opts);
  auto dD_part = at::zeros({s.batch, s.dim}, acc_opts);
  auto dbias_part = at::zeros({s.batch, s.dim}, acc_opts);
  if (s.batch > 0 && s.dim > 0 && s.length > 0) {
    const auto u = u_in.contiguous(), delta = delta_in.contiguous(), A = A_in.contiguous();
    const auto B = B_in.contiguous(), C = C_in.contiguous();
    const auto go = grad_out_in.to(acc).contiguous();
    const auto D = D_in.has_value() ? D_in->contiguous() : at::Tensor();
    const auto z = z_in.has_value() ? z_in->contiguous() : at::Tensor();
    const auto bias = bias_in.has_value() ? bias_in->contiguous() : at::Tensor();
    const auto ckpt = checkpoints_in.contiguous();
    const auto grad_last = grad_last_in.has_value() ? grad_last_in->to(acc).contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u.scalar_type(),
                                    "selective_scan_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ScanArgs<scalar_t, acc_t> args{};
      args.dim = s.dim; args.length = s.length; args.state = s.state; args.groups = s.groups;
      args.softplus = delta_softplus;
      args.u = u.const_data_ptr<scalar_t>(); args.delta = delta.const_data_ptr<scalar_t>();
      args.z = opt_ptr<scalar_t>(z); args.B = B.const_data_ptr<scalar_t>(); args.C = C.const_data_ptr<scalar_t>();
      args.A = A.const_data_ptr<acc_t>(); args.D = opt_ptr<acc_t>(D); args.bias = opt_ptr<acc_t>(bias);
      args.checkpoints = const_cast<acc_t*>(ckpt.const_data_ptr<acc_t>());
      args.grad_out = go.const_data_ptr<acc_t>(); args.grad_last = opt_ptr<acc_t>(grad_last);
      args.du = du.mutable_data_ptr<scalar_t>(); args.ddelta = ddelta.mutable_data_ptr<scalar_t>();
      args.dz = z.defined() ? dz.mutable_data_ptr<scalar_t>() : nullptr;
      args.dB = dB_acc.mutable_data_ptr<acc_t>(); args.dC = dC_acc.mutable_data_ptr<acc_t>();
      args.dA_part = dA_part.mutable_data_ptr<acc_t>(); args.dD_part = dD_part.mutable_data_ptr<acc_t>();
      args.dbias_part = dbias_part.mutable_data_ptr<acc_t>();
      launch_backward<false>(args, s.batch * s.dim);
    });
  }
  auto dD = D_in.has_value() ? dD_part.sum(0) : at::empty({0}, acc_opts);
  auto dbias = bias_in.has_value() ? dbias_part.sum(0) : at::empty({0}, acc_opts);
  return {du, ddelta, dA_part.sum(0), dB_acc.to(B_in.scalar_type()), dC_acc.to(C_in.scalar_type()),
          dD, dz, dbias};
}

// ---------------------------------------------------------------------------------------------
// selective_scan_2d

std::tuple<at::Tensor, at::Tensor> selective_scan_2d_cuda(
    const at::Tensor& x_in, const at::Tensor& dt_in, const at::Tensor& A_in, const at::Tensor& B_in,
    const at::Tensor& C_in, const at::Tensor& D_in, const at::Tensor& bias_in, bool dt_softplus,
    std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(x_in.is_cuda(), "x should be a CUDA tensor for the CUDA kernel, got one on ",
              x_in.device());
  const Scan2dShape s = check_selective_scan_2d_inputs(x_in, dt_in, A_in, B_in, C_in, D_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto out_type = scan_out_type(x_in.scalar_type(), out_dtype);
  const auto acc_opts = x_in.options().dtype(scan_acc_type(x_in.scalar_type()));
  const int64_t L = s.length();
  auto out_acc = at::empty(x_in.sizes(), acc_opts);
  auto checkpoints = at::empty({s.batch, kDirections, s.dim, scan_chunks(L), s.state}, acc_opts);
  if (s.batch == 0 || s.dim == 0 || L == 0) return {out_acc.to(out_type), checkpoints};
  const auto x = x_in.contiguous(), dt = dt_in.contiguous(), A = A_in.contiguous();
  const auto B = B_in.contiguous(), C = C_in.contiguous(), D = D_in.contiguous();
  const auto bias = bias_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "selective_scan_2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    ScanArgs<scalar_t, acc_t> args{};
    args.dim = s.dim; args.length = L; args.state = s.state; args.groups = kDirections;
    args.height = s.height; args.width = s.width; args.softplus = dt_softplus;
    args.u = x.const_data_ptr<scalar_t>(); args.delta = dt.const_data_ptr<scalar_t>();
    args.B = B.const_data_ptr<scalar_t>(); args.C = C.const_data_ptr<scalar_t>();
    args.A = A.const_data_ptr<acc_t>(); args.D = D.const_data_ptr<acc_t>(); args.bias = bias.const_data_ptr<acc_t>();
    args.out_acc = out_acc.mutable_data_ptr<acc_t>();
    args.checkpoints = checkpoints.mutable_data_ptr<acc_t>();
    launch_forward<true>(args, s.batch * s.dim);
  });
  return {out_acc.to(out_type), checkpoints};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
selective_scan_2d_backward_cuda(const at::Tensor& grad_out_in, const at::Tensor& x_in,
                                const at::Tensor& dt_in, const at::Tensor& A_in,
                                const at::Tensor& B_in, const at::Tensor& C_in,
                                const at::Tensor& D_in, const at::Tensor& bias_in,
                                bool dt_softplus, const at::Tensor& checkpoints_in) {
  TORCH_CHECK(x_in.is_cuda(), "x should be a CUDA tensor for the CUDA kernel, got one on ",
              x_in.device());
  at::globalContext().alertNotDeterministic("lesionkit::selective_scan_2d_backward (CUDA: dB, dC, dA by atomics)");
  const Scan2dShape s = check_selective_scan_2d_inputs(x_in, dt_in, A_in, B_in, C_in, D_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto acc = scan_acc_type(x_in.scalar_type());
  const auto acc_opts = x_in.options().dtype(acc);
  TORCH_CHECK(grad_out_in.sizes() == x_in.sizes(), "grad_out should have x's shape ", x_in.sizes(),
              ", got ", grad_out_in.sizes());
  check_grad_out_type(grad_out_in, x_in.scalar_type());
  const int64_t L = s.length();
  check_checkpoints(checkpoints_in, {s.batch, kDirections, s.dim}, L, s.state, acc);
  check_on_device(x_in.device(), "x", {{"grad_out", &grad_out_in}, {"checkpoints", &checkpoints_in}});
  auto dx_acc = at::zeros(x_in.sizes(), acc_opts);
  auto ddt = at::empty(dt_in.sizes(), dt_in.options());
  auto dB_acc = at::zeros(B_in.sizes(), acc_opts);
  auto dC_acc = at::zeros(C_in.sizes(), acc_opts);
  auto dA_part = at::zeros({s.batch, kDirections, s.dim, s.state}, acc_opts);
  auto dD_part = at::zeros({s.batch, kDirections, s.dim}, acc_opts);
  auto dbias_part = at::zeros({s.batch, kDirections, s.dim}, acc_opts);
  if (s.batch > 0 && s.dim > 0 && L > 0) {
    const auto x = x_in.contiguous(), dt = dt_in.contiguous(), A = A_in.contiguous();
    const auto B = B_in.contiguous(), C = C_in.contiguous(), D = D_in.contiguous();
    const auto bias = bias_in.contiguous(), go = grad_out_in.to(acc).contiguous();
    const auto ckpt = checkpoints_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(),
                                    "selective_scan_2d_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      ScanArgs<scalar_t, acc_t> args{};
      args.dim = s.dim; args.length = L; args.state = s.state; args.groups = kDirections;
      args.height = s.height; args.width = s.width; args.softplus = dt_softplus;
      args.u = x.const_data_ptr<scalar_t>(); args.delta = dt.const_data_ptr<scalar_t>();
      args.B = B.const_data_ptr<scalar_t>(); args.C = C.const_data_ptr<scalar_t>();
      args.A = A.const_data_ptr<acc_t>(); args.D = D.const_data_ptr<acc_t>(); args.bias = bias.const_data_ptr<acc_t>();
      args.checkpoints = const_cast<acc_t*>(ckpt.const_data_ptr<acc_t>());
      args.grad_out = go.const_data_ptr<acc_t>();
      args.du_acc = dx_acc.mutable_data_ptr<acc_t>(); args.ddelta = ddt.mutable_data_ptr<scalar_t>();
      args.dB = dB_acc.mutable_data_ptr<acc_t>(); args.dC = dC_acc.mutable_data_ptr<acc_t>();
      args.dA_part = dA_part.mutable_data_ptr<acc_t>(); args.dD_part = dD_part.mutable_data_ptr<acc_t>();
      args.dbias_part = dbias_part.mutable_data_ptr<acc_t>();
      launch_backward<true>(args, s.batch * s.dim);
    });
  }
  return {dx_acc.to(x_in.scalar_type()), ddt, dA_part.sum(0), dB_acc.to(B_in.scalar_type()),
          dC_acc.to(C_in.scalar_type()), dD_part.sum(0), dbias_part.sum(0)};
}

}  // namespace
}  // namespace lesionkit

TORCH_LIBRARY_IMPL(lesionkit, CUDA, m) {
  m.impl("selective_scan", &lesionkit::selective_scan_cuda);
  m.impl("selective_scan_backward", &lesionkit::selective_scan_backward_cuda);
  m.impl("selective_scan_2d", &lesionkit::selective_scan_2d_cuda);
  m.impl("selective_scan_2d_backward", &lesionkit::selective_scan_2d_backward_cuda);
}
