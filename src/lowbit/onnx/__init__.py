"""ONNX in, ONNX out: calibrate with ONNX Runtime, place Q/DQ for TensorRT or ONNX Runtime, static and dynamic."""
