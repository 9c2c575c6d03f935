// Replay of the fused LoRA linear's launch sequences from C++, for eager calls (CUDA flavour only).
//
// Why: at small shapes an eager training step of lora_linear is bound by the host, not the GPU.
// Its Python glue (buffer allocation, TMA descriptors, the Triton launcher, casts) cost ~230 us per
// forward and ~660 us per backward on the H100's host at 8192 x 1024 -> 1024, against ~140 / ~540
// for the naive PyTorch composition (benchmarks/RESULTS.md, eighteenth session), and autograd runs
// the backward's Python on its device thread, ~1.8x slower than the calling thread.
//
// What: the Python path runs once per *key* (every tensor's dtype, sizes, strides, 16-byte alignment
// and device; the op's scalars; the deterministic-algorithms flag) and writes down what it did as a
// small program (lora_kernels/ops/replay.py): allocations, Triton launches (compiled function,
// grid, launch options, each kernel parameter as a tensor slot, a TMA descriptor of a slot, or raw
// bits), sums over dim 0 and casts. Every decision that Python took (tile tables, splits, which kernel,
// the kernels' integer arguments) is a function of the key, so later calls with the same key replay
// the program here: same kernels, same arguments, same order, same stream, bit-identical results.
//
// and cuBLAS products: y.addmm_(a, b, beta, alpha) (accumulating into a Triton kernel's output, or
// beta = 0: writing a product into a buffer) and
// alpha * op(a) @ op(b) (optionally with an fp32 result from 16-bit operands).
//
//   replay_run(kind, tensors, scalars, flags) -> (status, outputs)
//       status 0: first sight of the key, 1: replayed, 2: declined key, 3: seen before, record it now
//   replay_register(kind, tensors, scalars, flags, program) -> number of plans held
//
// Kernel parameters follow Triton 3.x's launcher ABI (triton/backends/nvidia/driver.py): the
// non-constexpr arguments in order, a TMA descriptor as a CUtensorMap passed by value followed by its
// shape (i32) and strides (i64) (the Python side writes those as raw values), then two null pointers
// (global and profile scratch; plans needing either are declined on the Python side).
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
#include <vector>

namespace lora_kernels {
namespace {

using at::Tensor;

// ---- program encoding (int64 words; lora_kernels/ops/replay.py writes the same) ------------------
enum Op : int64_t { kAlloc = 1, kLaunch = 2, kSum0 = 3, kCast = 4, kOutputs = 5, kAddmm = 6, kMm = 7 };
enum Param : int64_t { kPtr = 1, kRaw = 2, kTma = 3 };
constexpr int64_t kDeclined = -1;  // program of a key the Python path could not write down
constexpr size_t kMaxPlansPerKind = 512;

// ---- the driver entry points, looked up once in libcuda (as Triton's launcher does) -------------
using LaunchKernelEx = CUresult (*)(const CUlaunchConfig*, CUfunction, void**, void**);
using TensorMapEncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                          const cuuint64_t*, const cuuint32_t*, const cuuint32_t*,
                                          CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
                                          CUtensorMapFloatOOBfill);
using GetErrorString = CUresult (*)(CUresult, const char**);

struct Driver {
  LaunchKernelEx launch = nullptr;
  TensorMapEncodeTiled encode = nullptr;
  GetErrorString error_string = nullptr;
};

const Driver& driver() {
  static const Driver d = [] {
    Driver out;
    void* lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    TORCH_CHECK(lib != nullptr, "lora_kernels replay: cannot open libcuda.so.1: ", dlerror());
    out.launch = reinterpret_cast<LaunchKernelEx>(dlsym(lib, "cuLaunchKernelEx"));
    out.encode = reinterpret_cast<TensorMapEncodeTiled>(dlsym(lib, "cuTensorMapEncodeTiled"));
    out.error_string = reinterpret_cast<GetErrorString>(dlsym(lib, "cuGetErrorString"));
    TORCH_CHECK(out.launch && out.encode && out.error_string,
                "lora_kernels replay: libcuda lacks cuLaunchKernelEx / cuTensorMapEncodeTiled (driver too old)");
    return out;
  }();
  return d;
}

void check_cu(CUresult res, const char* what) {
  if (res == CUDA_SUCCESS) return;
  const char* msg = nullptr;
  driver().error_string(res, &msg);
  TORCH_CHECK(false, "lora_kernels replay: ", what, " failed: ", msg ? msg : "unknown CUDA error");
}

// ---- keys ----------------------------------------------------------------------------------------
using Key = std::vector<int64_t>;

Key make_key(int64_t kind, const c10::List<std::optional<Tensor>>& tensors, at::ArrayRef<double> scalars,
             at::IntArrayRef flags) {
  Key key;
  key.reserve(8 + tensors.size() * 12 + scalars.size() + flags.size());
  key.push_back(kind);
  key.push_back(at::globalContext().deterministicAlgorithms() ? 1 : 0);
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<Tensor> maybe = tensors.get(i);
    if (!maybe.has_value() || !maybe->defined()) {
      key.push_back(-1);
      continue;
    }
    const Tensor& t = *maybe;
    key.push_back(static_cast<int64_t>(t.scalar_type()));
    key.push_back(t.device().is_cuda() ? t.device().index() : -2);
    key.push_back(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? 1 : 0);
    key.push_back(t.dim());
    for (int64_t d = 0; d < t.dim(); ++d) {
      key.push_back(t.size(d));
      key.push_back(t.stride(d));
    }
  }
  key.push_back(static_cast<int64_t>(scalars.size()));
  for (double s : scalars) {
    int64_t bits;
    static_assert(sizeof(bits) == sizeof(s));
    std::memcpy(&bits, &s, sizeof(bits));
    key.push_back(bits);
  }
  key.insert(key.end(), flags.begin(), flags.end());
  return key;
}

// ---- plans ---------------------------------------------------------------------------------------
// The last descriptor encoded for one TMA parameter of a plan, by its tensor's base address. Within
// a plan only that address can change between calls: the tensor's sizes and strides are part of
// the key (inputs) or fixed by the plan (its allocations and results). In a training loop the
// caching allocator hands the same addresses back step after step, so most calls copy 128 bytes
// here instead of calling cuTensorMapEncodeTiled: 9-15 descriptors a training step at 8192 x 1024
// -> 1024 and 2048 x 2048 -> 512, ~0.5 us each on the H100's host, so 5-8 us of a 350-600 us step.
struct TmaCache {
  std::mutex mutex;
  bool valid = false;
  const void* base = nullptr;
  CUtensorMap map;
};

struct TmaParam {
  int slot;
  int64_t swizzle, elem_size, elem_type, rank, padding;
  cuuint32_t box[5];
  std::shared_ptr<TmaCache> cache = std::make_shared<TmaCache>();
};

std::atomic<bool> g_tma_cache{true};      // replay_tma_cache(False): encode every descriptor (A/B timing)
std::atomic<int64_t> g_tma_encodes{0};    // cuTensorMapEncodeTiled calls made by replays

struct ParamSpec {
  int64_t kind;     // kPtr, kRaw, kTma
  int64_t value;    // slot (kPtr; -1: null) or raw bits (kRaw)
  int tma = -1;     // index into Launch::tmas (kTma)
};

struct Launch {
  CUfunction function;
  unsigned grid[3];
  unsigned threads;
  unsigned shared;
  bool pdl;
  std::vector<ParamSpec> params;
  std::vector<TmaParam> tmas;
};

struct Step {
  int64_t op;
  int dst = -1, src = -1, src2 = -1;  // kAddmm: dst = beta * dst + alpha * src @ op(src2); kMm: dst = alpha * op(src) @ op(src2)
  bool transpose = false;             // op(src2) = src2.T
  bool transpose_a = false;           // kMm: op(src) = src.T
  bool has_dtype = false;             // kMm: the result in `dtype` (else the operands')
  double alpha = 1.0, beta = 1.0;
  bool zero = false;
  at::ScalarType dtype = at::kFloat;
  std::vector<int64_t> sizes;
  int launch = -1;
};

struct Plan {
  bool declined = false;
  int n_slots = 0;
  std::vector<Step> steps;
  std::vector<Launch> launches;
  std::vector<int> outputs;
};

std::mutex g_mutex;
std::map<Key, std::shared_ptr<const Plan>> g_plans;
size_t g_counts[8] = {0};
// Keys seen once without a plan. A key is recorded on its second call, so a workload whose shapes
// never repeat (e.g. a new sequence length every step) never pays for recording.
std::set<Key> g_seen;
constexpr size_t kMaxSeen = 4096;

double bits_to_double(int64_t bits) {  // a double passed through the int64 program words
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

struct Reader {
  at::IntArrayRef words;
  size_t pos = 0;
  int64_t next() {
    TORCH_CHECK(pos < words.size(), "lora_kernels replay: program ends early at word ", pos);
    return words[pos++];
  }
};

std::shared_ptr<const Plan> parse(at::IntArrayRef program, int n_inputs) {
  auto plan = std::make_shared<Plan>();
  if (program.size() == 1 && program[0] == kDeclined) {
    plan->declined = true;
    return plan;
  }
  Reader r{program};
  plan->n_slots = n_inputs;
  auto slot_ok = [&](int64_t s, bool allow_null) {
    TORCH_CHECK((allow_null && s == -1) || (s >= 0 && s < plan->n_slots),
                "lora_kernels replay: slot ", s, " out of range (", plan->n_slots, " slots)");
    return static_cast<int>(s);
  };
  while (r.pos < program.size()) {
    Step step;
    step.op = r.next();
    switch (step.op) {
      case kAlloc: {
        step.dst = static_cast<int>(r.next());
        TORCH_CHECK(step.dst == plan->n_slots, "lora_kernels replay: allocations must take the next slot");
        plan->n_slots += 1;
        step.zero = r.next() != 0;
        step.dtype = static_cast<at::ScalarType>(r.next());
        const int64_t ndim = r.next();
        for (int64_t d = 0; d < ndim; ++d) step.sizes.push_back(r.next());
        break;
      }
      case kLaunch: {
        Launch l;
        l.function = reinterpret_cast<CUfunction>(static_cast<uintptr_t>(r.next()));
        for (unsigned& g : l.grid) g = static_cast<unsigned>(r.next());
        l.threads = static_cast<unsigned>(r.next());
        l.shared = static_cast<unsigned>(r.next());
        l.pdl = r.next() != 0;
        const int64_t n_params = r.next();
        for (int64_t i = 0; i < n_params; ++i) {
          ParamSpec p;
          p.kind = r.next();
          if (p.kind == kPtr) {
            p.value = slot_ok(r.next(), true);
          } else if (p.kind == kRaw) {
            p.value = r.next();
          } else if (p.kind == kTma) {
            TmaParam t;
            t.slot = slot_ok(r.next(), false);
            t.swizzle = r.next();
            t.elem_size = r.next();
            t.elem_type = r.next();
            t.rank = r.next();
            TORCH_CHECK(t.rank >= 1 && t.rank <= 5, "lora_kernels replay: TMA rank ", t.rank);
            for (int64_t d = 0; d < t.rank; ++d) t.box[d] = static_cast<cuuint32_t>(r.next());
            t.padding = r.next();
            p.tma = static_cast<int>(l.tmas.size());
            l.tmas.push_back(t);
          } else {
            TORCH_CHECK(false, "lora_kernels replay: unknown parameter kind ", p.kind);
          }
          l.params.push_back(p);
        }
        step.launch = static_cast<int>(plan->launches.size());
        plan->launches.push_back(std::move(l));
        break;
      }
      case kSum0:
      case kCast: {
        step.dst = static_cast<int>(r.next());
        TORCH_CHECK(step.dst == plan->n_slots, "lora_kernels replay: results must take the next slot");
        step.src = slot_ok(r.next(), false);
        plan->n_slots += 1;
        if (step.op == kCast) step.dtype = static_cast<at::ScalarType>(r.next());
        break;
      }
      case kAddmm: {
        step.dst = slot_ok(r.next(), false);
        step.src = slot_ok(r.next(), false);
        step.src2 = slot_ok(r.next(), false);
        step.transpose = r.next() != 0;
        step.alpha = bits_to_double(r.next());
        step.beta = bits_to_double(r.next());
        break;
      }
      case kMm: {
        step.dst = static_cast<int>(r.next());
        TORCH_CHECK(step.dst == plan->n_slots, "lora_kernels replay: results must take the next slot");
        step.src = slot_ok(r.next(), false);
        step.transpose_a = r.next() != 0;
        step.src2 = slot_ok(r.next(), false);
        step.transpose = r.next() != 0;
        const int64_t dtype = r.next();
        step.has_dtype = dtype >= 0;
        if (step.has_dtype) step.dtype = static_cast<at::ScalarType>(dtype);
        step.alpha = bits_to_double(r.next());
        plan->n_slots += 1;
        break;
      }
      case kOutputs: {
        const int64_t n = r.next();
        for (int64_t i = 0; i < n; ++i) plan->outputs.push_back(slot_ok(r.next(), false));
        continue;  // not a step
      }
      default:
        TORCH_CHECK(false, "lora_kernels replay: unknown step ", step.op);
    }
    plan->steps.push_back(std::move(step));
  }
  TORCH_CHECK(!plan->outputs.empty(), "lora_kernels replay: a program must name its outputs");
  return plan;
}

// The descriptor Triton's fill_tma_descriptor builds for a TensorDescriptor over `t` (its sizes and
// strides, innermost first), with the kernel's box, swizzle and element type.
void encode_tma(CUtensorMap* map, const TmaParam& p, const Tensor& t) {
  TORCH_CHECK(t.dim() == p.rank, "lora_kernels replay: TMA rank mismatch");
  cuuint64_t dims[5], strides[5];
  cuuint32_t box[5], elem_strides[5] = {1, 1, 1, 1, 1};
  const int rank = static_cast<int>(p.rank);
  for (int i = 0; i < rank; ++i) {
    dims[rank - 1 - i] = static_cast<cuuint64_t>(t.size(i));
    box[rank - 1 - i] = p.box[i];
  }
  for (int i = 0; i + 1 < rank; ++i) strides[rank - 2 - i] = static_cast<cuuint64_t>(p.elem_size * t.stride(i));
  check_cu(driver().encode(map, static_cast<CUtensorMapDataType>(p.elem_type), rank, t.data_ptr(), dims, strides,
                           box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                           static_cast<CUtensorMapSwizzle>(p.swizzle), CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                           p.padding ? CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
                                     : CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
           "cuTensorMapEncodeTiled");
  g_tma_encodes.fetch_add(1, std::memory_order_relaxed);
}

// The descriptor of TMA parameter p over t into *map: from p's cache when t's base address is the
// one it was last encoded for.
void tma_param(CUtensorMap* map, const TmaParam& p, const Tensor& t) {
  if (!g_tma_cache.load(std::memory_order_relaxed)) {
    encode_tma(map, p, t);
    return;
  }
  TmaCache& c = *p.cache;
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!c.valid || c.base != t.data_ptr()) {
    c.valid = false;  // (stays so if encoding throws)
    encode_tma(&c.map, p, t);
    c.base = t.data_ptr();
    c.valid = true;
  }
  std::memcpy(map, &c.map, sizeof(CUtensorMap));
}

void launch(const Launch& l, const std::vector<Tensor>& slots, CUstream stream) {
  if (static_cast<uint64_t>(l.grid[0]) * l.grid[1] * l.grid[2] == 0) return;
  std::vector<CUtensorMap> maps(l.tmas.size());  // CUtensorMap is declared 64-byte aligned
  std::vector<uint64_t> values(l.params.size() + 2, 0);  // + global and profile scratch (null)
  std::vector<void*> params(l.params.size() + 2);
  for (size_t i = 0; i < l.params.size(); ++i) {
    const ParamSpec& p = l.params[i];
    if (p.kind == kTma) {
      tma_param(&maps[p.tma], l.tmas[p.tma], slots[l.tmas[p.tma].slot]);
      params[i] = &maps[p.tma];
      continue;
    }
    if (p.kind == kPtr) {
      values[i] = p.value < 0 ? 0 : reinterpret_cast<uintptr_t>(slots[p.value].data_ptr());
    } else {
      values[i] = static_cast<uint64_t>(p.value);  // little-endian: the parameter's bytes come first
    }
    params[i] = &values[i];
  }
  params[l.params.size()] = &values[l.params.size()];
  params[l.params.size() + 1] = &values[l.params.size() + 1];

  CUlaunchAttribute attrs[1];
  CUlaunchConfig config;
  std::memset(&config, 0, sizeof(config));
  config.gridDimX = l.grid[0];
  config.gridDimY = l.grid[1];
  config.gridDimZ = l.grid[2];
  config.blockDimX = l.threads;
  config.blockDimY = 1;
  config.blockDimZ = 1;
  config.sharedMemBytes = l.shared;
  config.hStream = stream;
  config.attrs = attrs;
  config.numAttrs = 0;
  if (l.pdl) {
    attrs[0].id = CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION;
    attrs[0].value.programmaticStreamSerializationAllowed = 1;
    config.numAttrs = 1;
  }
  check_cu(driver().launch(&config, l.function, params.data(), nullptr), "cuLaunchKernelEx");
}

std::vector<Tensor> execute(const Plan& plan, const c10::List<std::optional<Tensor>>& tensors) {
  std::vector<Tensor> slots(plan.n_slots);
  at::Device device(at::kCUDA);
  bool have_device = false;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<Tensor> maybe = tensors.get(i);
    if (maybe.has_value() && maybe->defined()) {
      slots[i] = *maybe;
      if (!have_device) {
        device = maybe->device();
        have_device = true;
      }
    }
  }
  TORCH_CHECK(have_device, "lora_kernels replay: no CUDA tensor among the inputs");
  c10::cuda::CUDAGuard guard(device);
  const CUstream stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const Step& s : plan.steps) {
    switch (s.op) {
      case kAlloc: {
        const auto options = at::TensorOptions().dtype(s.dtype).device(device);
        slots[s.dst] = s.zero ? at::zeros(s.sizes, options) : at::empty(s.sizes, options);
        break;
      }
      case kLaunch:
        launch(plan.launches[s.launch], slots, stream);
        break;
      case kSum0:
        slots[s.dst] = slots[s.src].sum(0);
        break;
      case kCast:
        slots[s.dst] = slots[s.src].to(s.dtype);
        break;
      case kAddmm:  // cuBLAS (its TF32 choice follows torch's flags at the call, as in Python)
        slots[s.dst].addmm_(slots[s.src], s.transpose ? slots[s.src2].t() : slots[s.src2], s.beta, s.alpha);
        break;
      case kMm: {  // the same calls as lora_linear.py's _mm, so the same cuBLAS kernels and bits
        const Tensor a = s.transpose_a ? slots[s.src].t() : slots[s.src];
        const Tensor b = s.transpose ? slots[s.src2].t() : slots[s.src2];
        Tensor out;
        if (!s.has_dtype && s.alpha != 1.0) {  // alpha in cuBLAS's epilogue; beta = 0 reads nothing
          out = at::empty({a.size(0), b.size(1)}, a.options());
          out.addmm_(a, b, 0.0, s.alpha);
        } else {
          out = s.has_dtype ? at::mm(a, b, s.dtype) : at::mm(a, b);
          if (s.alpha != 1.0) out.mul_(s.alpha);
        }
        slots[s.dst] = out;
        break;
      }
    }
  }
  std::vector<Tensor> out;
  out.reserve(plan.outputs.size());
  for (int o : plan.outputs) out.push_back(slots[o]);
  return out;
}

std::tuple<int64_t, std::vector<Tensor>> replay_run(int64_t kind, const c10::List<std::optional<Tensor>>& tensors,
                                                    at::ArrayRef<double> scalars, at::IntArrayRef flags) {
  const Key key = make_key(kind, tensors, scalars, flags);
  std::shared_ptr<const Plan> plan;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    auto it = g_plans.find(key);
    if (it == g_plans.end()) {
      if (g_seen.count(key)) return {3, {}};
      if (g_seen.size() >= kMaxSeen) g_seen.clear();
      g_seen.insert(key);
      return {0, {}};
    }
    plan = it->second;
  }
  if (plan->declined) return {2, {}};
  return {1, execute(*plan, tensors)};
}

int64_t replay_register(int64_t kind, const c10::List<std::optional<Tensor>>& tensors, at::ArrayRef<double> scalars,
                        at::IntArrayRef flags, at::IntArrayRef program) {
  TORCH_CHECK(kind >= 0 && kind < 8, "lora_kernels replay: kind ", kind, " out of range [0, 8)");
  auto plan = parse(program, static_cast<int>(tensors.size()));
  const Key key = make_key(kind, tensors, scalars, flags);
  std::lock_guard<std::mutex> lock(g_mutex);
  if (g_plans.count(key) == 0) {
    if (g_counts[kind] >= kMaxPlansPerKind) return static_cast<int64_t>(g_counts[kind]);  // enough keys
    g_counts[kind] += 1;
  }
  g_plans[key] = std::move(plan);
  g_seen.erase(key);
  return static_cast<int64_t>(g_counts[kind]);
}

}  // namespace

bool replay_tma_cache(bool enabled) {
  return g_tma_cache.exchange(enabled);
}

int64_t replay_tma_encodes() {
  return g_tma_encodes.load();
}

int64_t replay_clear() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int64_t n = static_cast<int64_t>(g_plans.size());
  g_plans.clear();
  g_seen.clear();
  for (size_t& c : g_counts) c = 0;
  return n;
}

}  // namespace lora_kernels

TORCH_LIBRARY_FRAGMENT(lora_kernels_ext, m) {
  m.def("replay_run(int kind, Tensor?[] tensors, float[] scalars, int[] flags) -> (int, Tensor[])");
  m.def("replay_register(int kind, Tensor?[] tensors, float[] scalars, int[] flags, int[] program) -> int");
  m.def("replay_clear() -> int", &lora_kernels::replay_clear);
  // TMA descriptors reused by base address (on by default); returns the previous setting
  m.def("replay_tma_cache(bool enabled) -> bool", &lora_kernels::replay_tma_cache);
  m.def("replay_tma_encodes() -> int", &lora_kernels::replay_tma_encodes);
}

TORCH_LIBRARY_IMPL(lora_kernels_ext, CUDA, m) {
  m.impl("replay_run", &lora_kernels::replay_run);
  m.impl("replay_register", &lora_kernels::replay_register);
}
