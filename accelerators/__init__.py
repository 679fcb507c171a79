"""The Lightning <-> cerebras.pytorch bridge (registers accelerator "cerebras" on import)."""
