// CPU (and, in CUDA builds, GPU) kernels of RoiAlign3D / RoiAlign3DGrad.
//
// CPU forward: one unit per RoI; its per-axis taps (roi_align_3d_math.h: trilinear weights factor
// per axis, so a bin touches at most (s + 1)^3 voxels) are computed once and serve its o^3
// bins, each accumulating channel vectors, contiguous in the channels-last layout, in
// register-resident 128-byte chunks.
// CPU backward: one unit per slab of z-slices of one batch item, a contiguous range of
// grad_features: the unit zeroes it (one memset, leaving it in cache) and scatters into it the
// taps of its batch item's RoIs that fall inside it, so there are no races, no atomics, no
// per-thread copies and no second pass over the dense gradient.
// Both run inline on the calling thread when the work is small, else on TensorFlow's intra-op
// pool with dynamic chunking (ParallelFor below).
#if GOOGLE_CUDA
#define EIGEN_USE_GPU
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <vector>

#include "roi_align_3d_kernels.h"
#include "roi_align_3d_math.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tensorflow {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
#if GOOGLE_CUDA
using GPUDevice = Eigen::GpuDevice;
#endif

// Attributes common to both ops, read and checked once at kernel construction.
struct Attrs {
  int output_size = 2;
  int sampling_ratio = 2;
  float spatial_scale = 1.0f;
  bool aligned = true;
};

absl::Status ReadAttrs(OpKernelConstruction* ctx, Attrs* a) {
  TF_RETURN_IF_ERROR(ctx->GetAttr("output_size", &a->output_size));
  TF_RETURN_IF_ERROR(ctx->GetAttr("sampling_ratio", &a->sampling_ratio));
  TF_RETURN_IF_ERROR(ctx->GetAttr("spatial_scale", &a->spatial_scale));
  TF_RETURN_IF_ERROR(ctx->GetAttr("aligned", &a->aligned));
  if (a->output_size < 1) {
    return errors::InvalidArgument("RoiAlign3D: `output_size` must be >= 1, got ",
                                   a->output_size);
  }
  if (a->sampling_ratio < 1) {
    return errors::InvalidArgument("RoiAlign3D: `sampling_ratio` must be >= 1, got ",
                                   a->sampling_ratio);
  }
  return absl::OkStatus();
}

// Run-time validation of shapes and box indices; errors name the offending argument. `fshape`
// is the features' shape ([B, D, H, W, C]); `rois_name`/`rois_tensor` is the tensor whose first
// dimension is R (boxes for the forward). Fills `p`.
absl::Status Validate(const TensorShape& fshape, const Tensor& boxes, const Tensor& box_indices,
                      const Attrs& a, roi_align_3d::Params* p) {
  if (fshape.dims() != 5) {
    return errors::InvalidArgument("RoiAlign3D: `features` must have rank 5 [B, D, H, W, C], got ",
                                   fshape.DebugString());
  }
  if (boxes.dims() != 2 || boxes.dim_size(1) != 6) {
    return errors::InvalidArgument(
        "RoiAlign3D: `boxes` must be [R, 6] as (z1, y1, x1, z2, y2, x2), got ",
        boxes.shape().DebugString());
  }
  if (box_indices.dims() != 1 || box_indices.dim_size(0) != boxes.dim_size(0)) {
    return errors::InvalidArgument("RoiAlign3D: `box_indices` must be [R] with R = ",
                                   boxes.dim_size(0), " (rows of `boxes`), got ",
                                   box_indices.shape().DebugString());
  }
  constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
  for (int d = 1; d < 4; ++d) {
    if (fshape.dim_size(d) > kMaxDim) {
      return errors::InvalidArgument("RoiAlign3D: `features` spatial size too large: ",
                                     fshape.DebugString());
    }
  }
  p->batch = fshape.dim_size(0);
  p->depth = static_cast<int>(fshape.dim_size(1));
  p->height = static_cast<int>(fshape.dim_size(2));
  p->width = static_cast<int>(fshape.dim_size(3));
  p->channels = fshape.dim_size(4);
  p->num_rois = boxes.dim_size(0);
  p->output_size = a.output_size;
  p->sampling_ratio = a.sampling_ratio;
  p->spatial_scale = a.spatial_scale;
  p->aligned = a.aligned;
  if (p->num_rois > 0 && (p->depth == 0 || p->height == 0 || p->width == 0)) {
    return errors::InvalidArgument("RoiAlign3D: `features` has an empty spatial dimension ",
                                   fshape.DebugString(), " but there are ", p->num_rois, " boxes");
  }
  const auto idx = box_indices.flat<int32>();
  for (int64_t r = 0; r < p->num_rois; ++r) {
    if (idx(r) < 0 || idx(r) >= p->batch) {
      return errors::InvalidArgument("RoiAlign3D: `box_indices`[", r, "] = ", idx(r),
                                     " is outside [0, ", p->batch, ") (batch size of `features`)");
    }
  }
  return absl::OkStatus();
}

// Per-axis taps of RoIs: trilinear weights factor per axis, so the o^3 bins of a RoI need only
// 3 * o tap lists (6 for o = 2), computed once per RoI. A table holds `slots` RoIs in flat
// arrays (one allocation each, whatever the number of RoIs).
template <typename T>
class TapTable {
 public:
  TapTable(int output_size, int sampling_ratio, int64_t slots)
      : o_(output_size),
        cap_(2 * sampling_ratio),
        lists_(3 * output_size),
        n_(slots * lists_),
        idx_(slots * lists_ * cap_),
        w_(slots * lists_ * cap_) {}

  // Fills `slot` with the taps of `box`; returns false when the RoI reads no voxel at all (an
  // axis without taps: the box lies more than one voxel outside the map).
  bool Fill(int64_t slot, const T* box, const roi_align_3d::Params& p) {
    T start[3], bin[3];
    roi_align_3d::roi_geometry(box, static_cast<T>(p.spatial_scale), p.aligned, o_, start, bin);
    const int sizes[3] = {p.depth, p.height, p.width};
    bool any[3] = {false, false, false};
    for (int a = 0; a < 3; ++a) {
      for (int q = 0; q < o_; ++q) {
        const int64_t k = slot * lists_ + a * o_ + q;
        n_[k] = roi_align_3d::bin_axis_taps(start[a], bin[a], q, p.sampling_ratio, sizes[a],
                                            idx_.data() + k * cap_, w_.data() + k * cap_);
        any[a] = any[a] || n_[k] > 0;
      }
    }
    return any[0] && any[1] && any[2];
  }
  int count(int64_t slot, int axis, int q) const { return n_[slot * lists_ + axis * o_ + q]; }
  const int* index(int64_t slot, int axis, int q) const {
    return idx_.data() + (slot * lists_ + axis * o_ + q) * cap_;
  }
  const T* weight(int64_t slot, int axis, int q) const {
    return w_.data() + (slot * lists_ + axis * o_ + q) * cap_;
  }

 private:
  int o_;
  int cap_;
  int64_t lists_;
  std::vector<int> n_;
  std::vector<int> idx_;
  std::vector<T> w_;
};

// Channels per register-resident chunk: 128 bytes, i.e. four AVX2 (eight SSE) accumulators, so
// the 32-channel maps of the detector take a single pass over the taps of a bin with four
// independent FMA chains.
template <typename T>
constexpr int64_t kChunk = 128 / sizeof(T);

// The taps of one bin (pz, py, px) of one RoI of a TapTable.
template <typename T>
struct BinTaps {
  BinTaps(const TapTable<T>& t, int64_t slot, int pz, int py, int px)
      : nz(t.count(slot, 0, pz)),
        ny(t.count(slot, 1, py)),
        nx(t.count(slot, 2, px)),
        zi(t.index(slot, 0, pz)),
        yi(t.index(slot, 1, py)),
        xi(t.index(slot, 2, px)),
        zw(t.weight(slot, 0, pz)),
        yw(t.weight(slot, 1, py)),
        xw(t.weight(slot, 2, px)) {}
  int nz, ny, nx;
  const int *zi, *yi, *xi;
  const T *zw, *yw, *xw;
};

// Vectors of 32 bytes (GCC/Clang vector extensions: AVX registers, or pairs of SSE registers in
// a portable build) for the full 128-byte chunks. Plain arrays were kept on the stack and
// zeroed with `rep stos` per bin, which cost more than a small bin's taps.
template <typename T>
struct Simd;
template <>
struct Simd<float> {
  typedef float V __attribute__((vector_size(32)));
};
template <>
struct Simd<double> {
  typedef double V __attribute__((vector_size(32)));
};
template <typename T>
using VecT = typename Simd<T>::V;
template <typename T>
constexpr int kVecsPerChunk = static_cast<int>(kChunk<T> * sizeof(T) / sizeof(VecT<T>));

template <typename T>
inline VecT<T> LoadV(const T* p) {
  VecT<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void StoreV(T* p, VecT<T> v) {
  std::memcpy(p, &v, sizeof(v));
}

// Calls fn(voxel, w) for every tap of bin `t` whose z-index lies in [z0, z1): `voxel` points at
// the tap's voxel (z, y, x) of `map` ([D, H, W, C], or a channel offset into it), w = zw * yw * xw
// is its weight. P is T or const T.
template <typename T, typename P, typename Fn>
inline void ForEachTap(const BinTaps<T>& t, int z0, int z1, int64_t H, int64_t W, int64_t C,
                       P* map, Fn fn) {
  for (int a = 0; a < t.nz; ++a) {
    if (t.zi[a] < z0 || t.zi[a] >= z1) continue;
    for (int b = 0; b < t.ny; ++b) {
      const T wzy = t.zw[a] * t.yw[b];
      P* row = map + (t.zi[a] * H + t.yi[b]) * W * C;
      for (int c = 0; c < t.nx; ++c) fn(row + t.xi[c] * C, wzy * t.xw[c]);
    }
  }
}

// One bin of the forward for the full chunk of channels [c0, c0 + kChunk): the accumulators
// are vector registers, so each tap costs one load and one FMA per vector. Even and odd y-taps
// go to two accumulator sets, which doubles the independent FMA chains (8 for a 32-channel
// float bin: enough to hide the FMA latency).
template <typename T>
inline void ForwardBinFull(T* __restrict__ dst, const T* fmap, const BinTaps<T>& t, int64_t H,
                           int64_t W, int64_t C, int64_t c0, T inv_count) {
  using V = VecT<T>;
  constexpr int kV = kVecsPerChunk<T>;
  constexpr int kL = static_cast<int>(sizeof(V) / sizeof(T));
  V acc0[kV], acc1[kV];
  for (int v = 0; v < kV; ++v) acc0[v] = acc1[v] = V{};
  const int64_t row_stride = W * C;
  for (int a = 0; a < t.nz; ++a) {
    const T* plane = fmap + t.zi[a] * H * row_stride + c0;
    const T wz = t.zw[a] * inv_count;
    int b = 0;
    for (; b + 1 < t.ny; b += 2) {
      const T wzy0 = wz * t.yw[b];
      const T wzy1 = wz * t.yw[b + 1];
      const T* row0 = plane + t.yi[b] * row_stride;
      const T* row1 = plane + t.yi[b + 1] * row_stride;
      for (int c = 0; c < t.nx; ++c) {
        const T w0 = wzy0 * t.xw[c];
        const T w1 = wzy1 * t.xw[c];
        const T* src0 = row0 + t.xi[c] * C;
        const T* src1 = row1 + t.xi[c] * C;
        for (int v = 0; v < kV; ++v) acc0[v] += w0 * LoadV(src0 + v * kL);
        for (int v = 0; v < kV; ++v) acc1[v] += w1 * LoadV(src1 + v * kL);
      }
    }
    if (b < t.ny) {
      const T wzy = wz * t.yw[b];
      const T* row = plane + t.yi[b] * row_stride;
      for (int c = 0; c < t.nx; ++c) {
        const T w = wzy * t.xw[c];
        const T* src = row + t.xi[c] * C;
        for (int v = 0; v < kV; ++v) acc0[v] += w * LoadV(src + v * kL);
      }
    }
  }
  for (int v = 0; v < kV; ++v) StoreV(dst + c0 + v * kL, acc0[v] + acc1[v]);
}

// The forward for a partial chunk of `width` < kChunk channels from c0 of a map of `depth`
// z-slices (C not a multiple of kChunk; scalar code, off the detector's hot path).
template <typename T>
inline void ForwardBinTail(T* __restrict__ dst, const T* fmap, const BinTaps<T>& t, int depth,
                           int64_t H, int64_t W, int64_t C, int64_t c0, int64_t width,
                           T inv_count) {
  T acc[kChunk<T>];
  for (int64_t k = 0; k < width; ++k) acc[k] = T(0);
  ForEachTap(t, 0, depth, H, W, C, fmap + c0, [&](const T* __restrict__ src, T w) {
    for (int64_t k = 0; k < width; ++k) acc[k] += w * src[k];
  });
  for (int64_t k = 0; k < width; ++k) dst[c0 + k] = acc[k] * inv_count;
}

// One bin of the backward for the full chunk of channels [c0, c0 + kChunk) and the z-slices
// [z0, z1) of `gmap` (one batch item): grad_features += w * g for every tap in the slab.
template <typename T>
inline void BackwardBinFull(T* gmap, const T* g, const BinTaps<T>& t, int z0, int z1, int64_t H,
                            int64_t W, int64_t C, int64_t c0, T inv_count) {
  using V = VecT<T>;
  constexpr int kV = kVecsPerChunk<T>;
  constexpr int kL = static_cast<int>(sizeof(V) / sizeof(T));
  V gv[kV];
  for (int v = 0; v < kV; ++v) gv[v] = LoadV(g + c0 + v * kL) * inv_count;
  ForEachTap(t, z0, z1, H, W, C, gmap + c0, [&](T* dst, T w) {
    for (int v = 0; v < kV; ++v) StoreV(dst + v * kL, LoadV(dst + v * kL) + w * gv[v]);
  });
}

// The backward for a partial chunk of `width` < kChunk channels from c0 (scalar code).
template <typename T>
inline void BackwardBinTail(T* gmap, const T* g, const BinTaps<T>& t, int z0, int z1, int64_t H,
                            int64_t W, int64_t C, int64_t c0, int64_t width, T inv_count) {
  T gv[kChunk<T>];
  for (int64_t k = 0; k < width; ++k) gv[k] = g[c0 + k] * inv_count;
  ForEachTap(t, z0, z1, H, W, C, gmap + c0, [&](T* __restrict__ dst, T w) {
    for (int64_t k = 0; k < width; ++k) dst[k] += w * gv[k];
  });
}

// Work below this estimated single-thread time runs inline on the calling thread: waking a pool
// thread and handing it work costs tens of microseconds, more on a loaded machine.
constexpr double kInlineNs = 60e3;
// Chunks aim at this much work each (and at least kChunksPerThread per thread), so that a
// helper thread the OS schedules late holds up the caller by at most one small chunk.
constexpr double kChunkNs = 20e3;
constexpr int64_t kChunksPerThread = 4;

// Runs fn(begin, end) over [0, n), given an estimate of the single-thread cost of one unit.
// Small jobs run inline. Larger ones are cut into chunks that the calling thread and up to
// num_threads - 1 pool threads claim from a shared atomic counter: unlike a static split
// (Shard / Eigen's parallelFor, where the caller waits for every block it handed out), the
// caller never waits for a chunk no thread has started, so a pool thread that gets no CPU
// (other processes on a small machine) costs nothing but its wake-up.
void ParallelFor(OpKernelContext* ctx, int64_t n, double unit_ns,
                 const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const double total_ns = unit_ns * static_cast<double>(n);
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t threads = std::min<int64_t>(
      std::max(1, workers->num_threads), static_cast<int64_t>(total_ns / kInlineNs) + 1);
  if (threads <= 1 || n == 1) {
    fn(0, n);
    return;
  }
  const int64_t want = std::max<int64_t>(threads * kChunksPerThread,
                                         static_cast<int64_t>(total_ns / kChunkNs));
  const int64_t nchunks = std::min<int64_t>(n, want);
  const int64_t chunk = (n + nchunks - 1) / nchunks;
  struct State {
    std::atomic<int64_t> next{0};
    int64_t done = 0;  // Guarded by mu.
    int64_t nchunks = 0;
    int64_t chunk = 0;
    int64_t n = 0;
    const std::function<void(int64_t, int64_t)>* fn = nullptr;  // Valid until done == nchunks.
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  state->nchunks = (n + chunk - 1) / chunk;
  state->chunk = chunk;
  state->n = n;
  state->fn = &fn;
  // A thread only touches `fn` after claiming a chunk, and the caller returns only once every
  // chunk is done, so late helpers (holding `state` alive) find the counter spent and leave.
  auto drain = [](State* s) {
    int64_t finished = 0;
    for (;;) {
      const int64_t c = s->next.fetch_add(1, std::memory_order_relaxed);
      if (c >= s->nchunks) break;
      (*s->fn)(c * s->chunk, std::min(s->n, (c + 1) * s->chunk));
      ++finished;
    }
    if (finished > 0) {
      std::lock_guard<std::mutex> lock(s->mu);
      s->done += finished;
      if (s->done == s->nchunks) s->cv.notify_all();
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    workers->workers->Schedule([state, drain]() { drain(state.get()); });
  }
  drain(state.get());
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&]() { return state->done == state->nchunks; });
}

// Rough single-thread costs (ns) on a current x86 core, for ParallelFor's decisions only.
template <typename T>
double TapCostNs(int64_t channels) {
  return 1.0 + static_cast<double>(channels) * sizeof(T) / 64.0;  // ~1 ns per 64 bytes.
}

// Sizes of one call as the CPU loops use them.
template <typename T>
struct Sizes {
  explicit Sizes(const roi_align_3d::Params& p)
      : o(p.output_size),
        o3(static_cast<int64_t>(o) * o * o),
        C(p.channels),
        H(p.height),
        W(p.width),
        slice(H * W * C),
        map_stride(p.depth * slice),
        inv_count(T(1) / roi_align_3d::samples_per_bin<T>(p.sampling_ratio)) {}
  int o;
  int64_t o3;  // Bins per RoI.
  int64_t C, H, W;
  int64_t slice;       // Elements of one z-slice of one batch item.
  int64_t map_stride;  // Elements of one batch item.
  T inv_count;         // 1 / samples per bin.
};

// Calls fn(t, offset, c0, width) for every bin of the RoI in `slot` of `taps`, in the order of
// its pooled block [o, o, o, C] (offset = bin * C is the bin's first element there), and every
// chunk [c0, c0 + width) of its channels: whole kChunk chunks, then a narrower last one when C
// is not a multiple of kChunk.
template <typename T, typename Fn>
inline void ForEachBinChunk(const TapTable<T>& taps, int64_t slot, int o, int64_t C, Fn fn) {
  for (int pz = 0, bin = 0; pz < o; ++pz) {
    for (int py = 0; py < o; ++py) {
      for (int px = 0; px < o; ++px, ++bin) {
        const BinTaps<T> t(taps, slot, pz, py, px);
        for (int64_t c0 = 0; c0 < C; c0 += kChunk<T>) {
          fn(t, bin * C, c0, std::min(kChunk<T>, C - c0));
        }
      }
    }
  }
}

template <typename T>
void ForwardCpu(OpKernelContext* ctx, const roi_align_3d::Params& p, const T* features,
                const T* boxes, const int32* box_indices, T* output) {
  const Sizes<T> s(p);
  // Units are RoIs: the taps are computed once per RoI and serve its o^3 bins.
  auto work = [&](int64_t begin, int64_t end) {
    TapTable<T> taps(s.o, p.sampling_ratio, 1);
    for (int64_t r = begin; r < end; ++r) {
      T* out = output + r * s.o3 * s.C;
      if (!taps.Fill(0, boxes + 6 * r, p)) {
        std::fill(out, out + s.o3 * s.C, T(0));
        continue;
      }
      const T* fmap = features + box_indices[r] * s.map_stride;
      ForEachBinChunk(taps, 0, s.o, s.C,
                      [&](const BinTaps<T>& t, int64_t offset, int64_t c0, int64_t width) {
                        T* dst = out + offset;
                        if (width == kChunk<T>) {
                          ForwardBinFull<T>(dst, fmap, t, s.H, s.W, s.C, c0, s.inv_count);
                        } else {
                          ForwardBinTail<T>(dst, fmap, t, p.depth, s.H, s.W, s.C, c0, width,
                                            s.inv_count);
                        }
                      });
    }
  };
  const double taps_per_bin = std::pow(p.sampling_ratio + 1.0, 3.0);
  ParallelFor(ctx, p.num_rois, 100.0 + s.o3 * taps_per_bin * TapCostNs<T>(s.C), work);
}

template <typename T>
void BackwardCpu(OpKernelContext* ctx, const roi_align_3d::Params& p, const T* grads,
                 const T* boxes, const int32* box_indices, T* grad_features) {
  const Sizes<T> s(p);
  // Taps of every RoI, computed once, and the z-range [zlo, zhi] each RoI writes.
  TapTable<T> taps(s.o, p.sampling_ratio, p.num_rois);
  std::vector<int> zlo(p.num_rois), zhi(p.num_rois);
  // RoIs grouped by batch item (stable counting sort), RoIs that read nothing left out.
  std::vector<int64_t> offsets(p.batch + 1, 0);
  for (int64_t r = 0; r < p.num_rois; ++r) {
    zlo[r] = p.depth;
    zhi[r] = -1;
    if (!taps.Fill(r, boxes + 6 * r, p)) continue;
    for (int q = 0; q < s.o; ++q) {
      const int* zi = taps.index(r, 0, q);
      for (int a = 0; a < taps.count(r, 0, q); ++a) {
        zlo[r] = std::min(zlo[r], zi[a]);
        zhi[r] = std::max(zhi[r], zi[a]);
      }
    }
    ++offsets[box_indices[r] + 1];
  }
  for (int64_t b = 0; b < p.batch; ++b) offsets[b + 1] += offsets[b];
  std::vector<int64_t> order(offsets.back());
  {
    std::vector<int64_t> fill(offsets.begin(), offsets.end() - 1);
    for (int64_t r = 0; r < p.num_rois; ++r) {
      if (zhi[r] >= 0) order[fill[box_indices[r]]++] = r;
    }
  }
  // Units are slabs of consecutive z-slices of one batch item: a contiguous range of
  // grad_features, so a unit zeroes its slab with one memset while it is cache-resident and then
  // scatters into it every tap of its batch item's RoIs that falls inside it. Units own disjoint
  // memory: no races, no atomics, no per-thread copies, and each voxel receives its
  // contributions in RoI order, as in a serial loop.
  constexpr int64_t kSlabBytes = 128 * 1024;
  const int64_t slab = std::max<int64_t>(
      1, std::min<int64_t>(p.depth, kSlabBytes / std::max<int64_t>(1, s.slice * sizeof(T))));
  const int64_t slabs_per_item = (p.depth + slab - 1) / slab;
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t b = u / slabs_per_item;
      const int z0 = static_cast<int>((u % slabs_per_item) * slab);
      const int z1 = static_cast<int>(std::min<int64_t>(p.depth, z0 + slab));
      T* gmap = grad_features + b * s.map_stride;
      std::memset(gmap + z0 * s.slice, 0, (z1 - z0) * s.slice * sizeof(T));
      for (int64_t k = offsets[b]; k < offsets[b + 1]; ++k) {
        const int64_t r = order[k];
        if (zhi[r] < z0 || zlo[r] >= z1) continue;
        const T* g = grads + r * s.o3 * s.C;
        ForEachBinChunk(taps, r, s.o, s.C,
                        [&](const BinTaps<T>& t, int64_t offset, int64_t c0, int64_t width) {
                          const T* gb = g + offset;
                          if (width == kChunk<T>) {
                            BackwardBinFull<T>(gmap, gb, t, z0, z1, s.H, s.W, s.C, c0,
                                               s.inv_count);
                          } else {
                            BackwardBinTail<T>(gmap, gb, t, z0, z1, s.H, s.W, s.C, c0, width,
                                               s.inv_count);
                          }
                        });
      }
    }
  };
  const int64_t units = p.batch * slabs_per_item;
  const double taps_per_roi = s.o3 * std::pow(p.sampling_ratio + 1.0, 3.0);
  const double zero_ns = static_cast<double>(slab * s.slice * sizeof(T)) / 16.0;  // ~16 B/ns.
  const double rois_per_unit =
      static_cast<double>(order.size()) / std::max<int64_t>(1, units) *
      std::min(2.0, static_cast<double>(slabs_per_item));  // RoIs straddle slabs.
  const double scatter_ns = rois_per_unit * taps_per_roi / std::max<int64_t>(1, slabs_per_item) *
                            TapCostNs<T>(s.C);
  ParallelFor(ctx, units, zero_ns + scatter_ns + 50.0, work);
}

// Device dispatch: the CPU path above, or the CUDA launchers of roi_align_3d_kernels.cu.cc.
// Forward and Backward take input 0 (features or grads), boxes, box_indices and output 0.
template <typename Device, typename T>
struct Impl;

template <typename T>
struct Impl<CPUDevice, T> {
  static constexpr auto Forward = ForwardCpu<T>;
  static constexpr auto Backward = BackwardCpu<T>;
};

#if GOOGLE_CUDA
// Runs a CUDA launcher (both have this signature) with R int32 of device scratch for the
// host-validated box indices.
template <typename T, const char* (*Launch)(void*, const roi_align_3d::Params&, const T*,
                                            const T*, const int32_t*, int32_t*, T*)>
void RunGpu(OpKernelContext* ctx, const roi_align_3d::Params& p, const T* in, const T* boxes,
            const int32* box_indices, T* out) {
  Tensor scratch;
  OP_REQUIRES_OK(ctx, ctx->allocate_temp(DT_INT32, TensorShape({p.num_rois}), &scratch));
  const char* err = Launch(ctx->eigen_device<GPUDevice>().stream(), p, in, boxes, box_indices,
                           scratch.flat<int32>().data(), out);
  OP_REQUIRES(ctx, err == nullptr,
              errors::Internal(ctx->op_kernel().type_string(), " CUDA launch failed: ", err));
}

template <typename T>
struct Impl<GPUDevice, T> {
  static constexpr auto Forward = RunGpu<T, roi_align_3d::LaunchForwardGpu<T>>;
  static constexpr auto Backward = RunGpu<T, roi_align_3d::LaunchBackwardGpu<T>>;
};
#endif  // GOOGLE_CUDA

// What both ops share: the attributes, read once at construction, and the inputs boxes and
// box_indices (1 and 2), validated against the features' shape.
class RoiAlign3DBase : public OpKernel {
 public:
  explicit RoiAlign3DBase(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ReadAttrs(ctx, &attrs_));
  }

 protected:
  // Checks boxes and box_indices against `fshape`, fills `p` and returns the shape of the pooled
  // tensor [R, o, o, o, C] (the forward's output, the gradient's `grads`).
  absl::Status Prepare(OpKernelContext* ctx, const TensorShape& fshape, roi_align_3d::Params* p,
                       TensorShape* pooled) const {
    TF_RETURN_IF_ERROR(Validate(fshape, ctx->input(1), ctx->input(2), attrs_, p));
    const int64_t o = attrs_.output_size;
    *pooled = TensorShape({p->num_rois, o, o, o, p->channels});
    return absl::OkStatus();
  }

  // Allocates output 0 of `shape` and, unless it is empty, fills it with `run` (Impl's Forward
  // or Backward) from input 0.
  template <typename T, typename Run>
  static void RunInto(OpKernelContext* ctx, const roi_align_3d::Params& p,
                      const TensorShape& shape, Run run) {
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, shape, &out));
    if (out->NumElements() == 0) return;
    run(ctx, p, ctx->input(0).flat<T>().data(), ctx->input(1).flat<T>().data(),
        ctx->input(2).flat<int32>().data(), out->flat<T>().data());
  }

 private:
  Attrs attrs_;
};

template <typename Device, typename T>
class RoiAlign3DOp : public RoiAlign3DBase {
 public:
  using RoiAlign3DBase::RoiAlign3DBase;

  void Compute(OpKernelContext* ctx) override {
    roi_align_3d::Params p;
    TensorShape pooled;
    OP_REQUIRES_OK(ctx, Prepare(ctx, ctx->input(0).shape(), &p, &pooled));
    RunInto<T>(ctx, p, pooled, Impl<Device, T>::Forward);
  }
};

template <typename Device, typename T>
class RoiAlign3DGradOp : public RoiAlign3DBase {
 public:
  using RoiAlign3DBase::RoiAlign3DBase;

  void Compute(OpKernelContext* ctx) override {
    const Tensor& grads = ctx->input(0);
    const Tensor& shape_t = ctx->input(3);
    OP_REQUIRES(ctx, shape_t.dims() == 1 && shape_t.NumElements() == 5,
                errors::InvalidArgument("RoiAlign3DGrad: `features_shape` must be [5], got ",
                                        shape_t.shape().DebugString()));
    TensorShape fshape;
    OP_REQUIRES_OK(ctx, TensorShapeUtils::MakeShape(shape_t.vec<int32>(), &fshape));
    roi_align_3d::Params p;
    TensorShape gshape;
    OP_REQUIRES_OK(ctx, Prepare(ctx, fshape, &p, &gshape));
    OP_REQUIRES(ctx, grads.shape() == gshape,
                errors::InvalidArgument("RoiAlign3DGrad: `grads` must be ", gshape.DebugString(),
                                        ", got ", grads.shape().DebugString()));
    RunInto<T>(ctx, p, fshape, Impl<Device, T>::Backward);
  }
};

}  // namespace

#define REGISTER_CPU(T)                                                                      \
  REGISTER_KERNEL_BUILDER(Name("RoiAlign3D").Device(DEVICE_CPU).TypeConstraint<T>("T"),      \
                          RoiAlign3DOp<CPUDevice, T>);                                       \
  REGISTER_KERNEL_BUILDER(Name("RoiAlign3DGrad").Device(DEVICE_CPU).TypeConstraint<T>("T"),  \
                          RoiAlign3DGradOp<CPUDevice, T>);
REGISTER_CPU(float);
REGISTER_CPU(double);
#undef REGISTER_CPU

#if GOOGLE_CUDA
// box_indices (and features_shape) live in host memory: indices are validated on the host with
// the same InvalidArgument errors as on the CPU, then copied to the device by the launcher.
#define REGISTER_GPU(T)                                                   \
  REGISTER_KERNEL_BUILDER(Name("RoiAlign3D")                              \
                              .Device(DEVICE_GPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .HostMemory("box_indices"),                 \
                          RoiAlign3DOp<GPUDevice, T>);                    \
  REGISTER_KERNEL_BUILDER(Name("RoiAlign3DGrad")                          \
                              .Device(DEVICE_GPU)                         \
                              .TypeConstraint<T>("T")                     \
                              .HostMemory("box_indices")                  \
                              .HostMemory("features_shape"),              \
                          RoiAlign3DGradOp<GPUDevice, T>);
REGISTER_GPU(float);
REGISTER_GPU(double);
#undef REGISTER_GPU
#endif  // GOOGLE_CUDA

}  // namespace tensorflow
