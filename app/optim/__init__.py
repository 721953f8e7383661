"""The numerics: optimizers, schedulers, gradient processing. numpy only; no HTTP, no store."""
