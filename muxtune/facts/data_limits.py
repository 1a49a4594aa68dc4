"""Default caps on what a dataset may cost to read: the engine applies them, the CLI and the
staging Jobs (operator image, no engine) offer them as flags."""

DEFAULT_MAX_FILE_BYTES = 1 << 30  # 1 GiB of JSON lines is far more than a PEFT task trains on
DEFAULT_MAX_LINE_BYTES = 16 << 20  # 16 MiB: a 131072-token example needs well under 2 MiB
