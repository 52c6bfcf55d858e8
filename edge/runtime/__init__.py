"""Running compiled models with ONNX Runtime: sessions, encoders, generators. No torch here."""
