"""Task-memory file: numpy + safetensors only, shared by the compiler and the torch-free runtime."""
from emloc_edge.memory.format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SUPPORTED_VERSIONS,
    ChunkRecord,
    LayerMemory,
    MemoryMeta,
    TaskMemory,
    payload_sha256,
)
from emloc_edge.memory.convert import with_precision
from emloc_edge.memory.quantize import (
    PRECISIONS,
    decode,
    dequantize,
    encode,
    quantize_keys,
    quantize_values,
    roundtrip,
)

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "SUPPORTED_VERSIONS",
    "PRECISIONS",
    "ChunkRecord",
    "LayerMemory",
    "MemoryMeta",
    "TaskMemory",
    "payload_sha256",
    "quantize_keys",
    "quantize_values",
    "dequantize",
    "encode",
    "decode",
    "roundtrip",
    "with_precision",
]
