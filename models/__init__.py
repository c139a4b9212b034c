"""Model sources: the real SmolLM2 (GGUF -> ONNX), seeded synthetic configs, test fixtures."""
