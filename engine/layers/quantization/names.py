"""The `--quantization` values (vLLM's names), in one place for the CLI, EngineConfig and the loader."""

QUANTIZATION_METHODS: tuple[str, ...] = ("fp8", "awq", "gptq", "compressed-tensors")
