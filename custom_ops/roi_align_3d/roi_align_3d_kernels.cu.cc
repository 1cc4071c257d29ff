// CUDA kernels of RoiAlign3D / RoiAlign3DGrad: one thread per output element (RoI, bin,
// channel). Their bodies are roi_align_3d_math.h's forward_elements / backward_elements, which
// the standalone CuPy harness (tests/cuda_harness.py) runs too. Only CUDA runtime headers are
// included, so this file also compiles where TensorFlow's GPU headers are missing (build.py
// compile-check).
#if GOOGLE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "roi_align_3d_kernels.h"
#include "roi_align_3d_math.h"

namespace roi_align_3d {
namespace {

constexpr int kThreads = 256;
// Grid-stride loops: a bounded grid is enough to fill any current GPU.
constexpr long long kMaxBlocks = 1 << 16;

template <typename T>
__global__ void ForwardKernel(Params p, const T* __restrict__ features, const T* __restrict__ boxes,
                              const int32_t* __restrict__ box_indices, T* __restrict__ output) {
  forward_elements(features, boxes, box_indices, output, p.num_rois, p.depth, p.height, p.width,
                   p.channels, p.output_size, p.sampling_ratio, p.spatial_scale, p.aligned);
}

template <typename T>
__global__ void BackwardKernel(Params p, const T* __restrict__ grads, const T* __restrict__ boxes,
                               const int32_t* __restrict__ box_indices, T* grad_features) {
  backward_elements(grads, boxes, box_indices, grad_features, p.num_rois, p.depth, p.height,
                    p.width, p.channels, p.output_size, p.sampling_ratio, p.spatial_scale,
                    p.aligned);
}

int NumBlocks(long long total) {
  return static_cast<int>(std::min<long long>((total + kThreads - 1) / kThreads, kMaxBlocks));
}

// Copies the host-validated box indices to the device. The staging vector is pageable memory,
// for which cudaMemcpyAsync returns only after the source has been copied out, so the host
// tensor may be released as soon as the op returns.
cudaError_t StageIndices(cudaStream_t stream, const Params& p, const int32_t* host,
                         int32_t* dev) {
  std::vector<int32_t> staged(host, host + p.num_rois);
  return cudaMemcpyAsync(dev, staged.data(), sizeof(int32_t) * p.num_rois,
                         cudaMemcpyHostToDevice, stream);
}

}  // namespace

template <typename T>
const char* LaunchForwardGpu(void* stream_ptr, const Params& p, const T* features, const T* boxes,
                             const int32_t* host_box_indices, int32_t* dev_box_indices,
                             T* output) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const long long total = p.num_rois * p.output_size * p.output_size * p.output_size * p.channels;
  if (total == 0) return nullptr;
  cudaError_t err = StageIndices(stream, p, host_box_indices, dev_box_indices);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  ForwardKernel<T><<<NumBlocks(total), kThreads, 0, stream>>>(p, features, boxes,
                                                               dev_box_indices, output);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template <typename T>
const char* LaunchBackwardGpu(void* stream_ptr, const Params& p, const T* grads, const T* boxes,
                              const int32_t* host_box_indices, int32_t* dev_box_indices,
                              T* grad_features) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const long long map_elems =
      p.batch * static_cast<long long>(p.depth) * p.height * p.width * p.channels;
  cudaError_t err = cudaMemsetAsync(grad_features, 0, sizeof(T) * map_elems, stream);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  const long long total = p.num_rois * p.output_size * p.output_size * p.output_size * p.channels;
  if (total == 0) return nullptr;
  err = StageIndices(stream, p, host_box_indices, dev_box_indices);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  BackwardKernel<T><<<NumBlocks(total), kThreads, 0, stream>>>(p, grads, boxes, dev_box_indices,
                                                                grad_features);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

template const char* LaunchForwardGpu<float>(void*, const Params&, const float*, const float*,
                                             const int32_t*, int32_t*, float*);
template const char* LaunchForwardGpu<double>(void*, const Params&, const double*, const double*,
                                              const int32_t*, int32_t*, double*);
template const char* LaunchBackwardGpu<float>(void*, const Params&, const float*, const float*,
                                              const int32_t*, int32_t*, float*);
template const char* LaunchBackwardGpu<double>(void*, const Params&, const double*,
                                               const double*, const int32_t*, int32_t*, double*);

}  // namespace roi_align_3d

#endif  // GOOGLE_CUDA
