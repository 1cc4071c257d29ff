// Per-sample arithmetic of 3D RoI Align and the bodies of its CUDA kernels, shared by the CPU
// kernels, the CUDA kernels and the standalone CUDA harness (tests/cuda_harness.py compiles this
// header with NVRTC). No TensorFlow includes on purpose: the harness must run on a machine with
// a GPU but without TensorFlow.
//
// Convention (identical to tf_agg3d/ops/roi_align.py, the reference): features are
// [B, D, H, W, C] channels-last; a box is (z1, y1, x1, z2, y2, x2) in continuous feature
// coordinates where voxel i spans [i, i + 1). Detectron2's ROIAlign extended to 3D: the box is
// scaled by spatial_scale, shifted by -0.5 when aligned (else its size is forced to >= 1), split
// into o^3 bins, and each bin averages sampling_ratio^3 trilinear samples at sub-bin centres.
// Per axis, a sample outside [-1, size] contributes 0; one in [-1, 0] is clamped to 0; one
// beyond size - 1 is clamped to size - 1 (both neighbours = size - 1), like bilinear_interpolate.
#ifndef TF_AGG3D_ROI_ALIGN_3D_MATH_H_
#define TF_AGG3D_ROI_ALIGN_3D_MATH_H_

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RA3D_HD __host__ __device__ __forceinline__
#else
#define RA3D_HD inline
#endif

namespace roi_align_3d {

// One sample along one axis: the two neighbouring voxel indices and their linear weights. A
// sample that contributes nothing has both weights 0 (and safe indices 0), so the trilinear
// weight, a product over axes, is 0 whenever any axis is out of range.
template <typename T>
struct AxisSample {
  int lo;
  int hi;
  T w_lo;
  T w_hi;
};

template <typename T>
RA3D_HD AxisSample<T> interpolate_axis(T coord, int size) {
  AxisSample<T> s;
  // Written as a negated conjunction so that NaN coordinates count as outside (no UB in the
  // float-to-int conversion below); size <= 0 has no voxel to read.
  if (size <= 0 || !(coord >= T(-1) && coord <= T(size))) {
    s.lo = 0;
    s.hi = 0;
    s.w_lo = T(0);
    s.w_hi = T(0);
    return s;
  }
  if (coord <= T(0)) coord = T(0);
  int lo = static_cast<int>(coord);
  int hi;
  if (lo >= size - 1) {
    lo = size - 1;
    hi = size - 1;
    coord = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = coord - static_cast<T>(lo);
  s.lo = lo;
  s.hi = hi;
  s.w_lo = T(1) - l;
  s.w_hi = l;
  return s;
}

// Start and bin length of a box along its three axes (z, y, x). `box` points at 6 values.
// The expression order is the reference's, so float32 results agree bit for bit.
template <typename T>
RA3D_HD void roi_geometry(const T* box, T spatial_scale, bool aligned, int output_size,
                          T* start, T* bin) {
  const T offset = aligned ? T(0.5) : T(0);
  for (int a = 0; a < 3; ++a) {
    const T s = box[a] * spatial_scale - offset;
    const T e = box[a + 3] * spatial_scale - offset;
    T len = e - s;
    // Detectron2's legacy (aligned=False) behaviour: never a box smaller than one voxel.
    if (!aligned && len < T(1)) len = T(1);
    start[a] = s;
    bin[a] = len / static_cast<T>(output_size);
  }
}

// Coordinate of sample i (of sampling_ratio) inside bin p along one axis: sub-bin centres.
template <typename T>
RA3D_HD T sample_coord(T start, T bin, int p, int i, int sampling_ratio) {
  return start + static_cast<T>(p) * bin +
         (static_cast<T>(i) + T(0.5)) * bin / static_cast<T>(sampling_ratio);
}

// The distinct voxel indices that the sampling_ratio samples of bin p touch along one axis,
// with their summed weights. Because trilinear weights factor per axis, a bin's value is
// sum_{a,b,c} wz[a] wy[b] wx[c] f[z_a, y_b, x_c] / sampling_ratio^3 over these taps: at most
// (sampling_ratio + 1)^3 channel vectors instead of 8 sampling_ratio^3 (27 vs 64 for ratio 2).
// `idx` and `w` need room for 2 * sampling_ratio entries. Returns the number of taps.
template <typename T>
RA3D_HD int bin_axis_taps(T start, T bin, int p, int sampling_ratio, int size, int* idx, T* w) {
  int n = 0;
  for (int i = 0; i < sampling_ratio; ++i) {
    const AxisSample<T> s = interpolate_axis(sample_coord(start, bin, p, i, sampling_ratio), size);
    if (s.w_lo == T(0) && s.w_hi == T(0)) continue;
    const int ids[2] = {s.lo, s.hi};
    const T ws[2] = {s.w_lo, s.w_hi};
    for (int k = 0; k < 2; ++k) {
      int j = 0;
      while (j < n && idx[j] != ids[k]) ++j;
      if (j == n) {
        idx[n] = ids[k];
        w[n] = T(0);
        ++n;
      }
      w[j] += ws[k];
    }
  }
  return n;
}

// Number of samples a bin averages, sampling_ratio^3, as T.
template <typename T>
RA3D_HD T samples_per_bin(int sampling_ratio) {
  const T s = static_cast<T>(sampling_ratio);
  return s * s * s;
}

// Direct sampling of bin (pz, py, px), the GPU formulation (no scratch arrays): calls
// fn(offset, w) for the 8 corners of each of its sampling_ratio^3 samples, w = wz * wy * wx being
// the corner's trilinear weight and offset = ((z * H + y) * W + x) * C its voxel's distance from
// channel c of the map. A corner of an out-of-range sample has w = 0 (and in-range indices).
template <typename T, typename Fn>
RA3D_HD void for_each_sample_corner(int D, int H, int W, long long C, const T* start, const T* bin,
                                    int pz, int py, int px, int sampling_ratio, Fn fn) {
  for (int iz = 0; iz < sampling_ratio; ++iz) {
    const AxisSample<T> sz =
        interpolate_axis(sample_coord(start[0], bin[0], pz, iz, sampling_ratio), D);
    for (int iy = 0; iy < sampling_ratio; ++iy) {
      const AxisSample<T> sy =
          interpolate_axis(sample_coord(start[1], bin[1], py, iy, sampling_ratio), H);
      for (int ix = 0; ix < sampling_ratio; ++ix) {
        const AxisSample<T> sx =
            interpolate_axis(sample_coord(start[2], bin[2], px, ix, sampling_ratio), W);
        const int zs[2] = {sz.lo, sz.hi};
        const int ys[2] = {sy.lo, sy.hi};
        const int xs[2] = {sx.lo, sx.hi};
        const T wz[2] = {sz.w_lo, sz.w_hi};
        const T wy[2] = {sy.w_lo, sy.w_hi};
        const T wx[2] = {sx.w_lo, sx.w_hi};
        for (int a = 0; a < 2; ++a)
          for (int b = 0; b < 2; ++b)
            for (int c = 0; c < 2; ++c) {
              fn(((static_cast<long long>(zs[a]) * H + ys[b]) * W + xs[c]) * C,
                 wz[a] * wy[b] * wx[c]);
            }
      }
    }
  }
}

// Value of one output element (one bin, one channel). `fmap` points at channel c of batch item
// b; voxel (z, y, x) is at ((z * H + y) * W + x) * C.
template <typename T>
RA3D_HD T bin_value(const T* fmap, int D, int H, int W, long long C, const T* start,
                    const T* bin, int pz, int py, int px, int sampling_ratio) {
  T acc = T(0);
  for_each_sample_corner(D, H, W, C, start, bin, pz, py, px, sampling_ratio,
                         [&](long long off, T w) { acc += w * fmap[off]; });
  return acc / samples_per_bin<T>(sampling_ratio);
}

// Backward of bin_value: adds g * d(bin_value)/d(f) into `gmap` (channel c of batch item b)
// through `add(T* dst, T value)`, atomicAdd on the GPU. Zero-weight corners are skipped.
template <typename T, typename AddFn>
RA3D_HD void bin_scatter(T* gmap, int D, int H, int W, long long C, const T* start, const T* bin,
                         int pz, int py, int px, int sampling_ratio, T g, AddFn add) {
  const T gs = g / samples_per_bin<T>(sampling_ratio);
  for_each_sample_corner(D, H, W, C, start, bin, pz, py, px, sampling_ratio,
                         [&](long long off, T w) {
                           if (w != T(0)) add(gmap + off, w * gs);
                         });
}

#if defined(__CUDACC__) || defined(__HIPCC__)
// The GPU kernels: one thread per element (RoI, bin, channel) of the pooled tensor
// [R, o, o, o, C], grid-stride. Both the op's kernels (roi_align_3d_kernels.cu.cc) and the
// standalone harness (tests/cuda_harness.py) are thin wrappers around forward_elements and
// backward_elements, so the harness tests the op's device code itself.

// One element of the pooled tensor as its thread sees it.
template <typename T>
struct PooledElement {
  long long index;       // Flat index into [R, o, o, o, C].
  long long map_offset;  // Channel c of the RoI's batch item in a [B, D, H, W, C] map.
  int pz, py, px;        // The bin.
  T start[3];            // The RoI's geometry (roi_geometry).
  T bin[3];
};

// Calls fn(const PooledElement<T>&) for every element of this thread.
template <typename T, typename Fn>
__device__ __forceinline__ void for_each_pooled_element(long long num_rois, int D, int H, int W,
                                                        long long C, int output_size,
                                                        float spatial_scale, bool aligned,
                                                        const T* boxes, const int* box_indices,
                                                        Fn fn) {
  const int o = output_size;
  const long long o3 = static_cast<long long>(o) * o * o;
  const long long map_stride = static_cast<long long>(D) * H * W * C;
  const long long total = num_rois * o3 * C;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<long long>(blockDim.x) * gridDim.x) {
    const long long u = i / C;
    const int rem = static_cast<int>(u % o3);
    const long long r = u / o3;
    PooledElement<T> e;
    e.index = i;
    e.map_offset = box_indices[r] * map_stride + i % C;
    e.pz = rem / (o * o);
    e.py = (rem / o) % o;
    e.px = rem % o;
    roi_geometry(boxes + 6 * r, static_cast<T>(spatial_scale), aligned, o, e.start, e.bin);
    fn(e);
  }
}

__device__ __forceinline__ void atomic_add(float* dst, float v) { atomicAdd(dst, v); }

__device__ __forceinline__ void atomic_add(double* dst, double v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 600
  // No native double atomicAdd before sm_60: compare-and-swap loop.
  auto* addr = reinterpret_cast<unsigned long long*>(dst);
  unsigned long long old = *addr, assumed;
  do {
    assumed = old;
    old = atomicCAS(addr, assumed,
                    __double_as_longlong(v + __longlong_as_double(static_cast<long long>(assumed))));
  } while (assumed != old);
#else
  atomicAdd(dst, v);
#endif
}

// output[i] = bin_value for the elements of this thread.
template <typename T>
__device__ __forceinline__ void forward_elements(const T* features, const T* boxes,
                                                 const int* box_indices, T* output,
                                                 long long num_rois, int D, int H, int W,
                                                 long long C, int output_size, int sampling_ratio,
                                                 float spatial_scale, bool aligned) {
  for_each_pooled_element(num_rois, D, H, W, C, output_size, spatial_scale, aligned, boxes,
                          box_indices, [&](const PooledElement<T>& e) {
                            output[e.index] = bin_value(features + e.map_offset, D, H, W, C,
                                                        e.start, e.bin, e.pz, e.py, e.px,
                                                        sampling_ratio);
                          });
}

// grad_features += the scatter of grads[i] for the elements of this thread (atomically: bins
// of one RoI and RoIs of one batch item overlap). grad_features must be zeroed beforehand.
template <typename T>
__device__ __forceinline__ void backward_elements(const T* grads, const T* boxes,
                                                  const int* box_indices, T* grad_features,
                                                  long long num_rois, int D, int H, int W,
                                                  long long C, int output_size,
                                                  int sampling_ratio, float spatial_scale,
                                                  bool aligned) {
  for_each_pooled_element(num_rois, D, H, W, C, output_size, spatial_scale, aligned, boxes,
                          box_indices, [&](const PooledElement<T>& e) {
                            bin_scatter(grad_features + e.map_offset, D, H, W, C, e.start, e.bin,
                                        e.pz, e.py, e.px, sampling_ratio, grads[e.index],
                                        [](T* dst, T v) { atomic_add(dst, v); });
                          });
}
#endif  // __CUDACC__ || __HIPCC__

}  // namespace roi_align_3d

#endif  // TF_AGG3D_ROI_ALIGN_3D_MATH_H_
