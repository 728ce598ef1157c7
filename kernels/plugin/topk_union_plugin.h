// TensorRT IPluginV3 "TopkUnion" (version "1", namespace "sed"): the top-k union of class logits as one layer.
//
//   input 0   scores  float32 | float16, (M, ...) linear: M classes first, the rest flattened to pixels
//   input 1   k       int64, 1 element, read on the device (an ordinary runtime tensor, not a shape tensor)
//   output 0  kept    int64, (K,), ascending class indices; K is data dependent (0 <= K <= M)
//   output 1  count   int64, 0-D size tensor holding K (declared with IExprBuilder::declareSizeTensor)
//
// Plugin fields (creator getFieldNames, serialised with the engine): opt_kept (int32, default 64), the
// tuning value TensorRT uses for K; max_classes (int32, default 1024), the most rows M the layer accepts. The
// workspace is sized from max_classes, not from the profile: after the first CER point M depends on the
// previous kept count, so the profile cannot bound it. enqueue refuses M > max_classes and hands the kernel the
// size TensorRT granted, so the kernel's own size check stays meaningful. Nothing depends on k. The kernel lives in ../topk_union.cu.
#pragma once

#include <NvInferRuntime.h>

#include <cstdint>
#include <string>
#include <vector>

namespace sed_plugins {

constexpr char const* kTopkUnionName = "TopkUnion";
constexpr char const* kTopkUnionVersion = "1";
constexpr char const* kTopkUnionNamespace = "sed";
constexpr int32_t kDefaultOptKept = 64;
constexpr int32_t kDefaultMaxClasses = 1024;

class TopkUnionPlugin final : public nvinfer1::IPluginV3,
                              public nvinfer1::IPluginV3OneCore,
                              public nvinfer1::IPluginV3OneBuild,
                              public nvinfer1::IPluginV3OneRuntime {
 public:
  TopkUnionPlugin(int32_t optKept, int32_t maxClasses);
  TopkUnionPlugin(TopkUnionPlugin const& other);
  TopkUnionPlugin& operator=(TopkUnionPlugin const&) = delete;

  // IPluginV3
  nvinfer1::IPluginCapability* getCapabilityInterface(nvinfer1::PluginCapabilityType type) noexcept override;
  nvinfer1::IPluginV3* clone() noexcept override;

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override;
  int32_t getOutputDataTypes(nvinfer1::DataType* outputTypes, int32_t nbOutputs, nvinfer1::DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override;
  int32_t getOutputShapes(nvinfer1::DimsExprs const* inputs, int32_t nbInputs, nvinfer1::DimsExprs const* shapeInputs,
                          int32_t nbShapeInputs, nvinfer1::DimsExprs* outputs, int32_t nbOutputs,
                          nvinfer1::IExprBuilder& exprBuilder) noexcept override;
  bool supportsFormatCombination(int32_t pos, nvinfer1::DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override;
  int32_t configurePlugin(nvinfer1::DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* out, int32_t nbOutputs) noexcept override;
  size_t getWorkspaceSize(nvinfer1::DynamicPluginTensorDesc const* inputs, int32_t nbInputs,
                          nvinfer1::DynamicPluginTensorDesc const* outputs, int32_t nbOutputs) const noexcept override;

  // IPluginV3OneRuntime
  int32_t onShapeChange(nvinfer1::PluginTensorDesc const* in, int32_t nbInputs, nvinfer1::PluginTensorDesc const* out,
                        int32_t nbOutputs) noexcept override;
  int32_t enqueue(nvinfer1::PluginTensorDesc const* inputDesc, nvinfer1::PluginTensorDesc const* outputDesc,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override;
  nvinfer1::IPluginV3* attachToContext(nvinfer1::IPluginResourceContext* context) noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldsToSerialize() noexcept override;

 private:
  void initFields();

  int32_t mOptKept;
  int32_t mMaxClasses;
  std::vector<nvinfer1::PluginField> mFields;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

class TopkUnionPluginCreator final : public nvinfer1::IPluginCreatorV3One {
 public:
  TopkUnionPluginCreator();

  char const* getPluginName() const noexcept override;
  char const* getPluginVersion() const noexcept override;
  char const* getPluginNamespace() const noexcept override;
  nvinfer1::PluginFieldCollection const* getFieldNames() noexcept override;
  nvinfer1::IPluginV3* createPlugin(char const* name, nvinfer1::PluginFieldCollection const* fc,
                                    nvinfer1::TensorRTPhase phase) noexcept override;

 private:
  std::vector<nvinfer1::PluginField> mFieldNames;
  nvinfer1::PluginFieldCollection mFieldCollection{};
};

}  // namespace sed_plugins
