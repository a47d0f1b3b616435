// A CPU emulation of the CUDA built-ins that custom_ops/panel_cuda_kernels.cuh uses, so that its kernels run where
// no GPU is (tests/test_cuda_kernels.py). It stands in for CUDA's own cuda_runtime_api.h (this directory comes
// first on the include path) and is no CUDA: one std::thread per CUDA thread, one block at a time, every shuffle,
// vote and __syncwarp/__syncthreads a barrier of the whole block. The tests launch one tile (G lanes) per block
// for the row kernels, so a block barrier is the tile's; what they check is the kernels' arithmetic, indexing,
// reductions and NaN rules, not scheduling, memory coalescing or speed.
#ifndef KERAS_IMPLICIT_CUDA_EMULATION_H_
#define KERAS_IMPLICIT_CUDA_EMULATION_H_

#include <atomic>
#include <barrier>
#include <thread>
#include <vector>

#define __host__
#define __device__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static  // one block at a time: a static local is the block's
#define KERAS_IMPLICIT_EXTERN_SHARED extern

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
using cudaStream_t = void*;

namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The block being run: its barrier and the slots through which its threads exchange values.
struct Block {
  explicit Block(unsigned threads) : barrier(threads), values(threads), flags(threads) {}
  std::barrier<> barrier;
  std::vector<double> values;  // float and double values, both exact as double
  std::vector<char> flags;
};

inline thread_local Dim3 thread_index;
inline Dim3 block_index, block_dim;
inline Block* block = nullptr;

// Runs kernel() on `blocks` blocks of `threads` threads, block after block.
template <class Kernel>
void Launch(unsigned blocks, unsigned threads, Kernel kernel) {
  for (unsigned b = 0; b < blocks; ++b) {
    Block current(threads);
    block = &current;
    block_index.x = b;
    block_dim.x = threads;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([t, &kernel] {
        thread_index.x = t;
        kernel();
      });
    }
    for (std::thread& thread : pool) thread.join();
    block = nullptr;
  }
}

}  // namespace emulation

#define threadIdx (::emulation::thread_index)
#define blockIdx (::emulation::block_index)
#define blockDim (::emulation::block_dim)

inline void __syncthreads() { emulation::block->barrier.arrive_and_wait(); }
inline void __syncwarp(unsigned) { emulation::block->barrier.arrive_and_wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width) {
  emulation::Block& block = *emulation::block;
  const unsigned lane = threadIdx.x;
  block.values[lane] = static_cast<double>(value);
  block.barrier.arrive_and_wait();
  const unsigned source = lane ^ static_cast<unsigned>(lane_mask);
  // CUDA: a source lane outside the lane's group of `width` gives the lane's own value.
  const T result = source / width == lane / width ? static_cast<T>(block.values[source]) : value;
  block.barrier.arrive_and_wait();
  return result;
}

inline bool __any_sync(unsigned, bool predicate) {
  emulation::Block& block = *emulation::block;
  block.flags[threadIdx.x] = predicate;
  block.barrier.arrive_and_wait();
  bool any = false;
  for (char flag : block.flags) any |= flag != 0;
  block.barrier.arrive_and_wait();
  return any;
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  std::atomic_ref<unsigned long long> word(*address);
  unsigned long long old = word.load();
  while (value < old && !word.compare_exchange_weak(old, value)) {
  }
  return old;
}

#endif  // KERAS_IMPLICIT_CUDA_EMULATION_H_
