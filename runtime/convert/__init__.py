"""scikit-learn -> ONNX, parity checks, profile building (the convert extra)."""
