"""Byte units. Everything is computed in integer bytes; only report.py turns bytes into strings."""

BYTES_PER_GIB = 1024**3
BYTES_PER_MIB = 1024**2

# Element sizes of the dtypes the budget talks about (torch.finfo(...).bits // 8).
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "int8": 1}

