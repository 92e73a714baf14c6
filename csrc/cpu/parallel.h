// How finely a CPU kernel splits its work over threads.
//
// at::parallel_for(begin, end, grain, f) runs f inline, with no parallel region, when the
// range is under `grain` items, and otherwise gives each thread at least `grain` items. A
// parallel region costs a few microseconds alone, and beside a busy process it waits for a
// descheduled thread's time slice (milliseconds); a decode step is hundreds of small ops.
// So each task gets at least kMinWork units of work (elements read, or 4-byte words copied):
// the same bar as ATen's own elementwise ops (at::internal::GRAIN_SIZE).
#pragma once

#include <algorithm>
#include <cstdint>

namespace tts {

constexpr int64_t kMinWork = 32768;

// Items per task when each item costs `work_per_item` units.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinWork / std::max<int64_t>(1, work_per_item));
}

}  // namespace tts
