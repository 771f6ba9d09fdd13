"""The data stage: dataset registry, readers, format converters, rendering, encoding and batching."""
