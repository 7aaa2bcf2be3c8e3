// A cache of the large output buffers the CPU kernels return.
//
// PyTorch's CPU allocator does not cache: glibc serves every allocation above its mmap ceiling (32 MiB)
// with fresh pages from the OS, which zeroes each page on first touch, and the pages go back to the OS
// when the tensor dies. A (64, 128, 32, 32) float32 InstanceNorm++ output pays that on every call: about
// 2-5 ms of page clearing against a 2.5 ms kernel. Loops (training steps, samplers, benchmarks) free and
// reallocate the same sizes over and over, so the CPU kernels take their large outputs from here instead:
// a freed buffer is kept (up to a cap) and handed to the next output of the same size class, its pages
// already mapped. The same idea as PyTorch's CUDA caching allocator, for outputs of fastscore's kernels
// only; everything else still goes through PyTorch's allocator.
//
// - Outputs under kMinBytes come from PyTorch's allocator (glibc reuses those itself).
// - Sizes are rounded up to 2 MiB and buffers are 2 MiB aligned with transparent huge pages requested, so
//   a fresh buffer costs one fault per 2 MiB rather than per 4 KiB.
// - Free buffers are kept up to FASTSCORE_CPU_CACHE_MB (default 1024; 0 turns the cache off), the least
//   recently freed ones released first; fastscore.empty_cache() releases all of them.
// - The profiler's memory accounting sees every allocation and release, cached or not.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <list>
#include <mutex>
#include <new>
#include <unordered_map>
#include <vector>

#include "cpu_kernel_utils.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastscore {
namespace cpu {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(4) << 20;

// Transparent huge pages for a 2 MiB aligned buffer: one fault per 2 MiB on first touch instead of 512.
void advise_huge_pages(void* ptr, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  madvise(ptr, bytes, MADV_HUGEPAGE);
#else
  (void)ptr;
  (void)bytes;
#endif
}

// The cap in MiB, as bytes. The byte count must fit both size_t and int64 (cache_stats reports it as an
// int64): a larger value is refused rather than wrapped, which would silently lift the cap or turn the
// cache off (2^44 MiB is 2^64 bytes, i.e. 0).
size_t cap_from_env() {
  const char* v = std::getenv("FASTSCORE_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return size_t(1024) << 20;
  constexpr unsigned long long kMaxBytes =
      std::min<unsigned long long>(std::numeric_limits<int64_t>::max(), std::numeric_limits<size_t>::max());
  constexpr long long kMaxMb = static_cast<long long>(kMaxBytes >> 20);
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  const bool out_of_range = errno == ERANGE;  // strtoll saturates at LLONG_MIN / LLONG_MAX
  TORCH_CHECK_VALUE(end != v && *end == '\0' && mb >= 0,
                    "FASTSCORE_CPU_CACHE_MB: expected a non-negative whole number of MiB, got '", v, "'");
  TORCH_CHECK_VALUE(!out_of_range && mb <= kMaxMb, "FASTSCORE_CPU_CACHE_MB: '", v,
                    "' MiB overflows a 64-bit byte count; expected a whole number of MiB from 0 to ", kMaxMb);
  return size_t(mb) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : cap_(cap_from_env()) {}

  c10::DataPtr allocate(size_t nbytes) override {
    const size_t bytes = (std::max(nbytes, size_t(1)) + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.rbegin(); it != free_.rend(); ++it) {  // the most recently freed first
        if (it->bytes == bytes) {
          ptr = it->ptr;
          free_.erase(std::next(it).base());
          cached_ -= bytes;
          break;
        }
      }
    }
    if (ptr == nullptr) {
      if (posix_memalign(&ptr, kHugePage, bytes) != 0) {
        empty();  // the cached buffers may be what stands in the way
        TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0, "fastscore: out of CPU memory allocating ",
                    bytes, " bytes");
      }
      advise_huge_pages(ptr, bytes);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_.emplace(ptr, bytes);
      in_use_ += bytes;
      report(ptr, int64_t(bytes));
    }
    return {ptr, ptr, &OutputCache::release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

  // Frees every cached buffer (the ones in use stay theirs).
  void empty() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (const Block& b : free_) drop.push_back(b.ptr);
      free_.clear();
      cached_ = 0;
    }
    for (void* p : drop) std::free(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(in_use_), int64_t(cached_), int64_t(cap_)};
  }

  // After fork() the child has one thread: a lock some other parent thread held is reset.
  void reset_lock_after_fork() { new (&mu_) std::mutex(); }

 private:
  struct Block {
    void* ptr;
    size_t bytes;
  };

  static void release(void* ptr);

  void give_back(void* ptr) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      const auto it = live_.find(ptr);
      const size_t bytes = it->second;
      live_.erase(it);
      in_use_ -= bytes;
      report(ptr, -int64_t(bytes));
      if (bytes > cap_) {
        drop.push_back(ptr);
      } else {
        free_.push_back({ptr, bytes});
        cached_ += bytes;
        while (cached_ > cap_) {  // least recently freed first
          drop.push_back(free_.front().ptr);
          cached_ -= free_.front().bytes;
          free_.pop_front();
        }
      }
    }
    for (void* p : drop) std::free(p);
  }

  void report(void* ptr, int64_t delta) const {
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(ptr, delta, in_use_, in_use_ + cached_, c10::Device(c10::DeviceType::CPU));
  }

  std::mutex mu_;
  std::list<Block> free_;                      // oldest first
  std::unordered_map<void*, size_t> live_;     // buffers handed out: their rounded sizes
  size_t in_use_ = 0, cached_ = 0;
  const size_t cap_;
};

// Never destroyed: tensors may outlive static destruction at interpreter exit.
OutputCache& cache() {
  static OutputCache* c = [] {
    auto* made = new OutputCache();
    pthread_atfork(nullptr, nullptr, [] { cache().reset_lock_after_fork(); });
    return made;
  }();
  return *c;
}

void OutputCache::release(void* ptr) { cache().give_back(ptr); }

}  // namespace

void output_cache_empty() { cache().empty(); }

std::vector<int64_t> output_cache_stats() { return cache().stats(); }

at::Tensor fresh_output_like(const at::Tensor& x) {
  TORCH_INTERNAL_ASSERT(x.device().is_cpu());
  if (size_t(x.nbytes()) < kMinBytes || !x.is_non_overlapping_and_dense()) return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           x.scalar_type());
}

}  // namespace cpu
}  // namespace fastscore
