// TensorRT IPluginV3 wrapper of the top-k-union kernel; see topk_union_plugin.h for the I/O contract.
// Host code only (compiled by the host compiler): the kernel is linked from ../topk_union.cu, so this file
// never mixes device code with TensorRT headers (nvcc 13 anonymous-namespace pitfall).
#include "topk_union_plugin.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <exception>
#include <new>
#include <string>

#include "../topk_union.h"

using namespace nvinfer1;

namespace sed_plugins {
namespace {

std::atomic<ILoggerFinder*> gLoggerFinder{nullptr};

void logError(std::string const& msg) noexcept {
  ILoggerFinder* finder = gLoggerFinder.load();
  ILogger* logger = finder != nullptr ? finder->findLogger() : nullptr;
  if (logger != nullptr) {
    std::string const line = std::string("[sed::TopkUnion] ") + msg;
    logger->log(ILogger::Severity::kERROR, line.c_str());
  }
}

constexpr int32_t kInScores = 0;
constexpr int32_t kInK = 1;
constexpr int32_t kOutKept = 0;
constexpr int32_t kOutCount = 1;
constexpr int32_t kNbInputs = 2;
constexpr int32_t kNbOutputs = 2;

int64_t pixelsOf(Dims const& d) noexcept {
  int64_t p = 1;
  for (int32_t i = 1; i < d.nbDims; ++i) p *= d.d[i];
  return p;
}

}  // namespace

// ------------------------------------------------------------------------------------------- plugin

TopkUnionPlugin::TopkUnionPlugin(int32_t optKept, int32_t maxClasses)
    : mOptKept(std::max(optKept, 1)), mMaxClasses(std::max(maxClasses, 1)) {
  initFields();
}

TopkUnionPlugin::TopkUnionPlugin(TopkUnionPlugin const& other)
    : IPluginV3(),
      IPluginV3OneCore(),
      IPluginV3OneBuild(),
      IPluginV3OneRuntime(),
      mOptKept(other.mOptKept),
      mMaxClasses(other.mMaxClasses) {
  initFields();
}

void TopkUnionPlugin::initFields() {
  mFields.clear();
  mFields.emplace_back("opt_kept", &mOptKept, PluginFieldType::kINT32, 1);
  mFields.emplace_back("max_classes", &mMaxClasses, PluginFieldType::kINT32, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
  mFieldCollection.fields = mFields.data();
}

IPluginCapability* TopkUnionPlugin::getCapabilityInterface(PluginCapabilityType type) noexcept {
  switch (type) {
    case PluginCapabilityType::kBUILD:
      return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME:
      return static_cast<IPluginV3OneRuntime*>(this);
    case PluginCapabilityType::kCORE:
      return static_cast<IPluginV3OneCore*>(this);
  }
  return nullptr;
}

IPluginV3* TopkUnionPlugin::clone() noexcept {
  try {
    return new TopkUnionPlugin(*this);
  } catch (std::exception const& e) {
    logError(std::string("clone failed: ") + e.what());
    return nullptr;
  }
}

char const* TopkUnionPlugin::getPluginName() const noexcept { return kTopkUnionName; }
char const* TopkUnionPlugin::getPluginVersion() const noexcept { return kTopkUnionVersion; }
char const* TopkUnionPlugin::getPluginNamespace() const noexcept { return kTopkUnionNamespace; }

int32_t TopkUnionPlugin::getNbOutputs() const noexcept { return kNbOutputs; }

int32_t TopkUnionPlugin::getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const*,
                                            int32_t nbInputs) const noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  outputTypes[kOutKept] = DataType::kINT64;
  outputTypes[kOutCount] = DataType::kINT64;
  return 0;
}

int32_t TopkUnionPlugin::getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t,
                                         DimsExprs* outputs, int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || inputs[kInScores].nbDims < 1) {
    logError("expects (scores (M, ...), k) -> (kept, count)");
    return -1;
  }
  IDimensionExpr const* classes = inputs[kInScores].d[0];  // upper bound of K
  IDimensionExpr const* opt = exprBuilder.operation(DimensionOperation::kMIN, *classes, *exprBuilder.constant(mOptKept));
  IDimensionExpr const* kept = exprBuilder.declareSizeTensor(kOutCount, *opt, *classes);
  if (kept == nullptr) return -1;
  outputs[kOutKept].nbDims = 1;
  outputs[kOutKept].d[0] = kept;
  outputs[kOutCount].nbDims = 0;  // a size tensor is 0-D
  return 0;
}

bool TopkUnionPlugin::supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                                int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || pos < 0 || pos >= kNbInputs + kNbOutputs) return false;
  PluginTensorDesc const& d = inOut[pos].desc;
  if (d.format != TensorFormat::kLINEAR) return false;
  if (pos == kInScores) return d.type == DataType::kFLOAT || d.type == DataType::kHALF;
  return d.type == DataType::kINT64;  // k, kept, count
}

int32_t TopkUnionPlugin::configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                                         DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
  if (in[kInScores].desc.dims.nbDims < 1) {
    logError("scores must have the class axis first");
    return -1;
  }
  return 0;
}

size_t TopkUnionPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                                         DynamicPluginTensorDesc const*, int32_t) const noexcept {
  (void)inputs;
  if (nbInputs != kNbInputs) return 0;
  return sed_kernels::topk_union_workspace_size(mMaxClasses);  // the granted size; enqueue passes the same
}

int32_t TopkUnionPlugin::onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                                       int32_t nbOutputs) noexcept {
  if (nbInputs != kNbInputs || nbOutputs != kNbOutputs || in[kInScores].dims.nbDims < 1) return -1;
  return 0;
}

int32_t TopkUnionPlugin::enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                                 void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  Dims const& dims = inputDesc[kInScores].dims;
  int64_t const classes = dims.d[0];
  int64_t const pixels = pixelsOf(dims);
  if (classes > mMaxClasses) {
    logError("scores have " + std::to_string(classes) + " rows but the plugin was built for max_classes " +
             std::to_string(mMaxClasses) + "; rebuild the bundle with a larger --max-classes");
    return -1;
  }
  sed_kernels::TopkUnionDType const dtype = inputDesc[kInScores].type == DataType::kHALF
                                                ? sed_kernels::TopkUnionDType::kFloat16
                                                : sed_kernels::TopkUnionDType::kFloat32;
  cudaError_t const err = sed_kernels::topk_union_launch(
      inputs[kInScores], dtype, classes, pixels, static_cast<int64_t const*>(inputs[kInK]), 0,
      static_cast<int64_t*>(outputs[kOutKept]), static_cast<int64_t*>(outputs[kOutCount]), workspace,
      sed_kernels::topk_union_workspace_size(mMaxClasses), stream);
  if (err != cudaSuccess) {
    logError(std::string("kernel launch failed: ") + cudaGetErrorString(err));
    return -1;
  }
  return 0;
}

IPluginV3* TopkUnionPlugin::attachToContext(IPluginResourceContext*) noexcept { return clone(); }

PluginFieldCollection const* TopkUnionPlugin::getFieldsToSerialize() noexcept { return &mFieldCollection; }

// ------------------------------------------------------------------------------------------ creator

TopkUnionPluginCreator::TopkUnionPluginCreator() {
  mFieldNames.emplace_back("opt_kept", nullptr, PluginFieldType::kINT32, 1);
  mFieldNames.emplace_back("max_classes", nullptr, PluginFieldType::kINT32, 1);
  mFieldCollection.nbFields = static_cast<int32_t>(mFieldNames.size());
  mFieldCollection.fields = mFieldNames.data();
}

char const* TopkUnionPluginCreator::getPluginName() const noexcept { return kTopkUnionName; }
char const* TopkUnionPluginCreator::getPluginVersion() const noexcept { return kTopkUnionVersion; }
char const* TopkUnionPluginCreator::getPluginNamespace() const noexcept { return kTopkUnionNamespace; }
PluginFieldCollection const* TopkUnionPluginCreator::getFieldNames() noexcept { return &mFieldCollection; }

IPluginV3* TopkUnionPluginCreator::createPlugin(char const*, PluginFieldCollection const* fc,
                                                TensorRTPhase) noexcept {
  try {
    int32_t optKept = kDefaultOptKept;
    int32_t maxClasses = kDefaultMaxClasses;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      if (f.name == nullptr) continue;
      int32_t* target = std::strcmp(f.name, "opt_kept") == 0      ? &optKept
                        : std::strcmp(f.name, "max_classes") == 0 ? &maxClasses
                                                                  : nullptr;
      if (target == nullptr) continue;  // unknown fields: ignored
      if (f.type != PluginFieldType::kINT32 || f.length != 1 || f.data == nullptr) {
        logError(std::string("field ") + f.name + " must be one int32");
        return nullptr;
      }
      *target = *static_cast<int32_t const*>(f.data);
    }
    return new TopkUnionPlugin(optKept, maxClasses);
  } catch (std::exception const& e) {
    logError(std::string("createPlugin failed: ") + e.what());
    return nullptr;
  }
}

}  // namespace sed_plugins

// ---------------------------------------------------------------------------------------- registration

// The library is built with hidden visibility; only these entry points are exported.
#define SED_PLUGIN_EXPORT extern "C" __attribute__((visibility("default")))

namespace {
sed_plugins::TopkUnionPluginCreator& creatorInstance() {
  static sed_plugins::TopkUnionPluginCreator creator;
  return creator;
}
}  // namespace

// IPluginRegistry::loadLibrary, `trtexec --dynamicPlugins`, `--setPluginsToSerialize`, and
// tensorrt.get_plugin_registry().load_library() call these two.
// The CUDA architectures of the kernel inside (also searchable in the file as "SED_CUDA_ARCHS=...").
SED_PLUGIN_EXPORT char const* sed_topk_union_plugin_cuda_archs() { return sed_kernels::topk_union_cuda_archs(); }

SED_PLUGIN_EXPORT void setLoggerFinder(ILoggerFinder* finder) { sed_plugins::gLoggerFinder.store(finder); }

SED_PLUGIN_EXPORT IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static IPluginCreatorInterface* const creators[] = {&creatorInstance()};
  nbCreators = 1;
  return creators;
}

// initLibNvInferPlugins-style entry for hosts that link libnvinfer and register explicitly (ctypes callers).
SED_PLUGIN_EXPORT bool initSedTopkUnionPlugin(void* logger, char const* libNamespace) {
  (void)logger;
  char const* ns = libNamespace != nullptr && libNamespace[0] != '\0' ? libNamespace : sed_plugins::kTopkUnionNamespace;
  if (std::strcmp(ns, sed_plugins::kTopkUnionNamespace) != 0) return false;  // the ONNX nodes name "sed"
  return getPluginRegistry()->registerCreator(creatorInstance(), ns);
}

#ifdef SED_PLUGIN_STATIC_REGISTRATION
// For `trtexec --staticPlugins` / plain dlopen: register at load time (needs libnvinfer linked). Written out
// instead of REGISTER_TENSORRT_PLUGIN because that macro passes an empty namespace to registerCreator, while
// the ONNX nodes and getPluginNamespace() say "sed". Off by default: with loadLibrary the creator would then be
// registered twice (once here, once from getCreators).
namespace {
struct StaticRegistration {
  StaticRegistration() { getPluginRegistry()->registerCreator(creatorInstance(), sed_plugins::kTopkUnionNamespace); }
};
StaticRegistration const gStaticRegistration{};
}  // namespace
#endif
