// Worker threads shared by maxjax's native kernels, and `ParallelFor` to spread a kernel's chunks over them.
#ifndef MAXJAX_NATIVE_WORKERS_H_
#define MAXJAX_NATIVE_WORKERS_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#ifdef __linux__
#include <sched.h>
#endif

namespace maxjax {

// Chunks claimed from a shared counter by the caller and by the workers. The caller can finish every chunk
// alone, so a worker that starts late (or never) only finds nothing left.
struct Work {
  void (*call)(const void* fn, int64_t chunk);
  const void* fn;
  int64_t chunks;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Run() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      call(fn, c);
      done.fetch_add(1);
    }
  }
};

inline void Pause() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Worker threads that spin for a while after each job before they sleep. Why not XLA's intra-op pool
// (ffi::ThreadPool): waking a sleeping pool thread costs tens of microseconds, as long as a small product
// itself, and a decode step runs ~120 of them back to back with short kernels in between.
class Workers {
 public:
  static Workers& Get() {
    static Workers* workers = new Workers();  // never destroyed: its threads live as long as the process
    return *workers;
  }
  int64_t size() const { return static_cast<int64_t>(threads_.size()); }

  // Runs `work` on the caller and the workers; returns when every chunk is done and no worker holds `work`.
  void Run(Work* work) {
    std::unique_lock<std::mutex> serial(run_mutex_, std::try_to_lock);
    if (!serial.owns_lock()) {  // another job is running (XLA ran two kernels at once): this one alone
      work->Run();
      return;
    }
    job_.store(work);
    generation_.fetch_add(1);
    if (sleeping_.load() > 0) {
      std::lock_guard<std::mutex> lock(sleep_mutex_);
      wake_.notify_all();
    }
    work->Run();
    while (work->done.load() < work->chunks) std::this_thread::yield();
    job_.store(nullptr);
    while (active_.load() > 0) std::this_thread::yield();
  }

 private:
  Workers() {
    int available = static_cast<int>(std::thread::hardware_concurrency());
#ifdef __linux__
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0) available = CPU_COUNT(&cpus);  // this process's cores
#endif
    for (int i = 1; i < available; ++i) threads_.emplace_back([this] { Loop(); });
    for (auto& thread : threads_) thread.detach();
  }

  void Loop() {
    uint64_t seen = generation_.load();
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinMicros);
      while (generation_.load() == seen && std::chrono::steady_clock::now() < until) Pause();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(sleep_mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load();
      active_.fetch_add(1);
      if (Work* work = job_.load()) work->Run();
      active_.fetch_sub(1);
    }
  }

  static constexpr int kSpinMicros = 100;  // 50-1000 measured alike on SmolLM2 decode (batch 1 and 32)
  std::vector<std::thread> threads_;
  std::mutex run_mutex_, sleep_mutex_;
  std::condition_variable wake_;
  std::atomic<Work*> job_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> sleeping_{0}, active_{0};
};

// fn(chunk) for every chunk in [0, chunks), on the caller and the workers.
template <typename F>
void ParallelFor(int64_t chunks, const F& fn) {
  if (chunks == 1) {  // nothing to share: no worker woken
    fn(0);
    return;
  }
  Work work;
  work.call = [](const void* f, int64_t chunk) { (*static_cast<const F*>(f))(chunk); };
  work.fn = &fn;
  work.chunks = chunks;
  Workers::Get().Run(&work);
}

// fn(chunk) for every chunk in [0, chunks), on the caller and on up to `helpers` tasks that `schedule(task)`
// starts elsewhere (XLA's intra-op thread pool). For long kernels (a prefill's products): waking a pool thread
// costs tens of microseconds, nothing against milliseconds, and no thread of ours then spins beside XLA's.
// A helper that starts after every chunk is claimed finds nothing to do; the work it holds outlives the call.
template <typename F, typename Schedule>
void ParallelForOn(int64_t chunks, const F& fn, int64_t helpers, const Schedule& schedule) {
  auto work = std::make_shared<Work>();
  work->call = [](const void* f, int64_t chunk) { (*static_cast<const F*>(f))(chunk); };
  work->fn = &fn;
  work->chunks = chunks;
  for (int64_t i = 0; i < std::min(helpers, chunks - 1); ++i) schedule([work] { work->Run(); });
  work->Run();
  while (work->done.load() < work->chunks) std::this_thread::yield();
}

// How many chunks to cut a job into: a few per thread, so a late worker still gets a share.
inline int64_t ChunkCount(int64_t units) {
  return std::min<int64_t>(units, 4 * (Workers::Get().size() + 1));
}

// fn(first, end) over `units` cut into `ChunkCount(units)` ranges, on the caller and maxjax's workers: a short
// call's work (a decode step's tasks or rows).
template <typename F>
void ForRanges(int64_t units, const F& fn) {
  const int64_t chunks = ChunkCount(units);
  ParallelFor(chunks, [&](int64_t c) { fn(units * c / chunks, units * (c + 1) / chunks); });
}

// A kernel call is long from this many rows (or queries): a prefill chunk's, not a decode step's.
constexpr int64_t kLongCallRows = 64;

// fn(chunk) for every chunk in [0, chunks): a long call on XLA's intra-op thread pool (`pool.Schedule`), a short
// one on maxjax's spinning workers (see `Workers` and `ParallelForOn` for why each).
template <typename Pool, typename F>
void ParallelFor(Pool& pool, bool long_call, int64_t chunks, const F& fn) {
  if (long_call) {
    ParallelForOn(chunks, fn, Workers::Get().size(), [&](auto task) { pool.Schedule(std::move(task)); });
  } else {
    ParallelFor(chunks, fn);
  }
}

// fn(first, end) over `units` (weight panels) cut into chunks: one unit per chunk for a long call, so that the
// threads finish together (a few chunks per thread left one idle for up to a chunk, ~5% of a prefill product).
template <typename Pool, typename F>
void ForUnits(Pool& pool, int64_t rows, int64_t units, const F& fn) {
  if (rows < kLongCallRows) return ForRanges(units, fn);
  ParallelFor(pool, true, units, [&](int64_t unit) { fn(unit, unit + 1); });
}

}  // namespace maxjax

#endif  // MAXJAX_NATIVE_WORKERS_H_
